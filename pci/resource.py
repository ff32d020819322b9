"""A look at a PCI function through sysfs (config file, resourceN mmaps).

For inspection without VFIO, e.g. reading a virtio-fs tag while the kernel's
driver still owns the function (`vfsdrv list`, bind-by-tag, the "mounted?"
check before unbinding). BAR mappings are read-only (writes raise); config
space can be written (root), which is how capability-based access windows are
driven when the kernel refuses BAR mmaps of a claimed device.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from .errors import BarError, PciError
from .function import DmaMemoryLike, MmioWindow, PciFunction, RegisterWindow
from .sysfs import Sysfs, normalize_bdf

IORESOURCE_MEM = 0x200


class _ReadOnlyWindow(MmioWindow):
    def _write(self, off: int, width: int, value: int) -> None:
        raise BarError(f"{self.name}: read-only sysfs mapping (write at {off:#x} refused)")


class SysfsFunction(PciFunction):
    def __init__(self, bdf: str, sysfs: Sysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()
        self.bdf = normalize_bdf(bdf)
        self.dir = self.sysfs.device_dir(self.bdf)
        self.name = f"sysfs:{self.bdf}"
        self._cfg_fd = os.open(self.dir / "config", os.O_RDWR | os.O_CLOEXEC)
        self._bars: list[tuple[int, int]] = []  # (start, end) per BAR
        self._flags: list[int] = []
        for line in (self.dir / "resource").read_text().splitlines()[:6]:
            start, end, flags = (int(x, 16) for x in line.split())
            self._bars.append((start, end))
            self._flags.append(flags)
        self._maps: dict[int, Any] = {}

    def __enter__(self) -> SysfsFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def config_read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > 4096:
            raise PciError(f"{self.name}: config read {offset:#x}+{length} out of range")
        data = os.pread(self._cfg_fd, length, offset)
        if len(data) != length:
            raise PciError(f"{self.name}: short config read at {offset:#x}")
        return data

    def config_write(self, offset: int, data: bytes) -> None:
        """Config space writes (root; the kernel serialises them with its driver's)."""
        if os.pwrite(self._cfg_fd, data, offset) != len(data):
            raise PciError(f"{self.name}: short config write at {offset:#x}")

    def bar_size(self, index: int) -> int:
        if index >= len(self._bars) or not self._flags[index] & IORESOURCE_MEM:
            return 0
        start, end = self._bars[index]
        return end - start + 1 if end > start else 0

    def bar_window(self, index: int, offset: int, length: int, name: str) -> RegisterWindow:
        size = self.bar_size(index)
        if size == 0 or offset + length > size:
            raise BarError(f"{self.name}: {name} is outside BAR{index} ({size:#x} bytes)")
        if index not in self._maps:
            from .._native import ffi

            fd = os.open(self.dir / f"resource{index}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            except OSError as e:
                raise BarError(
                    f"{self.name}: BAR{index} cannot be mapped through sysfs ({e.strerror}; "
                    "a kernel driver may own it)"
                ) from e
            finally:
                os.close(fd)
            self._maps[index] = (m, ffi.from_buffer(m))
        _, ptr = self._maps[index]
        return _ReadOnlyWindow(ptr + offset, length, name, keepalive=self)

    def alloc_dma(self, size: int, iova: bool) -> DmaMemoryLike:
        raise PciError(f"{self.name}: no DMA through a sysfs inspection handle")

    def close(self) -> None:
        from .._native import ffi

        self.unmapped = True
        for m, ptr in self._maps.values():
            ffi.release(ptr)
            m.close()
        self._maps.clear()
        if self._cfg_fd >= 0:
            os.close(self._cfg_fd)
            self._cfg_fd = -1

