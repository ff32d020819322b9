"""A PCI function as the transport layer sees it, and natural-width register windows.

`PciFunction` is the seam between bus plumbing and the virtio-pci transport:
`VfioPciDevice` (pci/device.py) implements it over VFIO, `EmulatedFunction`
(pci/emulated.py) over plain memory for tests. A `RegisterWindow` is a bounded
piece of a BAR accessed only with single, naturally sized and aligned loads and
stores (the virtio spec requires it; `struct.pack_into` may split accesses).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

from .errors import BarError, PciError


class RegisterWindow(ABC):
    """`length` bytes of device registers at some BAR offset."""

    def __init__(self, length: int, name: str) -> None:
        self.length = length
        self.name = name

    def _check(self, off: int, width: int) -> None:
        if off < 0 or off + width > self.length:
            raise BarError(
                f"{self.name}: {width}-byte access at {off:#x} outside the "
                f"{self.length:#x}-byte window"
            )
        if off % width:
            raise BarError(f"{self.name}: unaligned {width}-byte access at {off:#x}")

    @abstractmethod
    def _read(self, off: int, width: int) -> int: ...

    @abstractmethod
    def _write(self, off: int, width: int, value: int) -> None: ...

    def read8(self, off: int) -> int:
        self._check(off, 1)
        return self._read(off, 1)

    def read16(self, off: int) -> int:
        self._check(off, 2)
        return self._read(off, 2)

    def read32(self, off: int) -> int:
        self._check(off, 4)
        return self._read(off, 4)

    def write8(self, off: int, value: int) -> None:
        self._check(off, 1)
        self._write(off, 1, value & 0xFF)

    def write16(self, off: int, value: int) -> None:
        self._check(off, 2)
        self._write(off, 2, value & 0xFFFF)

    def write32(self, off: int, value: int) -> None:
        self._check(off, 4)
        self._write(off, 4, value & 0xFFFFFFFF)

    def write64(self, off: int, value: int) -> None:
        """A 64-bit register as two 32-bit stores, low half first (virtio rule)."""
        self.write32(off, value & 0xFFFFFFFF)
        self.write32(off + 4, value >> 32)

    def read_bytes(self, off: int, length: int) -> bytes:
        """Read a byte range using the widest aligned access at each position."""
        if off < 0 or off + length > self.length:
            raise BarError(
                f"{self.name}: {length}-byte read at {off:#x} outside the "
                f"{self.length:#x}-byte window"
            )
        out = bytearray()
        pos, end = off, off + length
        while pos < end:
            for width in (4, 2, 1):
                if pos % width == 0 and pos + width <= end:
                    out += self._read(pos, width).to_bytes(width, "little")
                    pos += width
                    break
        return bytes(out)

    def window(self, off: int, length: int, name: str | None = None) -> RegisterWindow:
        if off < 0 or length < 0 or off + length > self.length:
            raise BarError(
                f"{self.name}: window {off:#x}+{length:#x} outside the {self.length:#x}-byte window"
            )
        return SubWindow(self, off, length, name or self.name)


class SubWindow(RegisterWindow):
    def __init__(self, parent: RegisterWindow, base: int, length: int, name: str) -> None:
        super().__init__(length, name)
        self.parent, self.base = parent, base

    def _read(self, off: int, width: int) -> int:
        return self.parent._read(self.base + off, width)

    def _write(self, off: int, width: int, value: int) -> None:
        self.parent._write(self.base + off, width, value)


class MmioWindow(RegisterWindow):
    """Registers in an mmap of a BAR: volatile, fenced accesses through vfsdrv._native."""

    def __init__(self, pointer: Any, length: int, name: str, keepalive: Any = None) -> None:
        from .._native import ffi, lib

        super().__init__(length, name)
        self._ptr = ffi.cast("char *", pointer)
        self._keep = keepalive
        self._rd = {1: lib.vfsdrv_mmio_read8, 2: lib.vfsdrv_mmio_read16, 4: lib.vfsdrv_mmio_read32}
        self._wr = {
            1: lib.vfsdrv_mmio_write8,
            2: lib.vfsdrv_mmio_write16,
            4: lib.vfsdrv_mmio_write32,
        }

    @property
    def pointer(self) -> Any:
        """The mapping itself, for native code that stores to it (the pump's kick)."""
        self._alive()
        return self._ptr

    def _alive(self) -> None:
        # an access through a closed device's mapping would fault (SIGSEGV), not raise
        if getattr(self._keep, "unmapped", False):
            raise PciError(f"{self.name}: register access after the device was closed")

    def _read(self, off: int, width: int) -> int:
        self._alive()
        return int(self._rd[width](self._ptr + off))

    def _write(self, off: int, width: int, value: int) -> None:
        self._alive()
        self._wr[width](self._ptr + off, value)


class PreadWindow(RegisterWindow):
    """Registers reached by pread/pwrite on a VFIO region (used where mmap is not
    allowed, e.g. next to the MSI-X table). vfio-pci turns an aligned 1/2/4-byte
    pread into one access of that width."""

    def __init__(self, fd: int, file_offset: int, length: int, name: str) -> None:
        super().__init__(length, name)
        self.fd, self.file_offset = fd, file_offset

    def _read(self, off: int, width: int) -> int:
        data = os.pread(self.fd, width, self.file_offset + off)
        if len(data) != width:
            raise PciError(f"{self.name}: short read at {off:#x}")
        return int.from_bytes(data, "little")

    def _write(self, off: int, width: int, value: int) -> None:
        n = os.pwrite(self.fd, value.to_bytes(width, "little"), self.file_offset + off)
        if n != width:
            raise PciError(f"{self.name}: short write at {off:#x}")


class DmaMemoryLike(ABC):
    """Pinned memory the device can reach: host view plus device addresses."""

    view: memoryview
    pointer: Any

    @abstractmethod
    def translate(self, offset: int) -> tuple[int, int]:
        """(device address of byte `offset`, bytes device-contiguous from there)"""

    @abstractmethod
    def close(self) -> None: ...


class PciFunction(ABC):
    """One PCI function, opened for exclusive use by this process."""

    name: str = "pci"

    @abstractmethod
    def config_read(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def config_write(self, offset: int, data: bytes) -> None: ...

    @abstractmethod
    def bar_size(self, index: int) -> int:
        """Size in bytes of BAR `index` (0: not implemented)."""

    @abstractmethod
    def bar_window(self, index: int, offset: int, length: int, name: str) -> RegisterWindow:
        """Registers at [offset, offset+length) of BAR `index`; the caller has checked
        that the range lies within the BAR."""

    def msix_vectors(self) -> int:
        """How many MSI-X vectors can be routed to eventfds (0: none)."""
        return 0

    def enable_msix(self, count: int) -> list[int]:
        """Enable `count` MSI-X vectors; returns one eventfd per vector."""
        raise PciError(f"{self.name}: MSI-X is not available")

    def disable_msix(self) -> None:  # noqa: B027 - optional
        pass

    def request_fd(self) -> int | None:
        """An eventfd signalled when the host asks for the device back (unplug)."""
        return None

    @property
    def iommu_mode(self) -> str:
        """'type1', 'iommufd' or 'noiommu' (how DMA addresses are translated)."""
        return "noiommu"

    @abstractmethod
    def alloc_dma(self, size: int, iova: bool) -> DmaMemoryLike:
        """Pinned DMA memory. iova=False: device addresses are physical addresses
        (identity-mapped in the IOMMU if there is one). iova=True: one contiguous
        IOVA range (only meaningful with an IOMMU and a device that translates)."""

    @abstractmethod
    def close(self) -> None: ...
