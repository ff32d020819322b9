"""An emulated PCI function: config space and BARs in memory, no VFIO.

For tests and for development without hardware: `ConfigSpace` builds a config
header with a capability list (including deliberately malformed ones);
`EmulatedBar` is plain memory in which a device model claims register ranges;
`EmulatedFunction` serves the `PciFunction` interface over them, with eventfds
for MSI-X and a DMA block whose "device addresses" can be made discontiguous to
exercise buffer splitting.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

from . import config as pcicfg
from .errors import BarError, PciError
from .function import DmaMemoryLike, PciFunction, RegisterWindow


class RegisterModel(Protocol):
    def read(self, off: int, width: int) -> int: ...
    def write(self, off: int, width: int, value: int) -> None: ...


class ConfigSpace:
    """A 256-byte type-0 header with a capability list built cap by cap."""

    def __init__(self, vendor: int, device: int, revision: int = 1, class_code: int = 0) -> None:
        self.data = bytearray(pcicfg.CONFIG_SPACE_SIZE)
        struct.pack_into("<HH", self.data, 0, vendor, device)
        self.data[pcicfg.REVISION_ID] = revision
        self.data[0x09:0x0C] = class_code.to_bytes(3, "little")
        self._next_free = pcicfg.HEADER_SIZE
        self._last_cap: int | None = None

    def add_capability(self, cap_id: int, body: bytes, at: int | None = None) -> int:
        """Append a capability (id, next, then `body`); returns its offset."""
        off = at if at is not None else self._next_free
        end = off + 2 + len(body)
        if end > len(self.data):
            raise ValueError("capability does not fit in config space")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2 : end] = body
        if self._last_cap is None:
            self.data[pcicfg.CAPABILITIES_POINTER] = off
            struct.pack_into(
                "<H",
                self.data,
                pcicfg.STATUS,
                struct.unpack_from("<H", self.data, pcicfg.STATUS)[0] | pcicfg.STATUS_CAP_LIST,
            )
        else:
            self.data[self._last_cap + 1] = off
        self._last_cap = off
        self._next_free = max(self._next_free, (end + 3) & ~3)
        return off

    def add_msix(self, table_size: int, table_bar: int, table_offset: int, pba_bar: int,
                 pba_offset: int) -> int:
        body = struct.pack(
            "<HII", (table_size - 1) & 0x7FF, table_offset | table_bar, pba_offset | pba_bar
        )
        return self.add_capability(pcicfg.CAP_ID_MSIX, body)


class EmulatedBar(RegisterWindow):
    """A BAR backed by memory; `attach` lets a model handle a register range."""

    def __init__(self, size: int, name: str = "bar") -> None:
        super().__init__(size, name)
        self.mem = bytearray(size)
        self._models: list[tuple[int, int, RegisterModel]] = []
        self.log: list[tuple[str, int, int, int]] = []  # (op, offset, width, value)

    def attach(self, start: int, length: int, model: RegisterModel) -> None:
        self._models.append((start, start + length, model))

    def _model(self, off: int) -> tuple[int, RegisterModel] | None:
        for start, end, model in self._models:
            if start <= off < end:
                return start, model
        return None

    def _read(self, off: int, width: int) -> int:
        hit = self._model(off)
        if hit:
            value = hit[1].read(off - hit[0], width)
        else:
            value = int.from_bytes(self.mem[off : off + width], "little")
        self.log.append(("r", off, width, value))
        return value

    def _write(self, off: int, width: int, value: int) -> None:
        self.log.append(("w", off, width, value))
        hit = self._model(off)
        if hit:
            hit[1].write(off - hit[0], width, value)
        else:
            self.mem[off : off + width] = value.to_bytes(width, "little")


class EmulatedDma(DmaMemoryLike):
    """Memory whose device address of offset o is `base + o`, except that with
    `scatter=True` every 4 KiB page gets its own non-adjacent address (like 4 KiB
    pages in no-IOMMU mode)."""

    PAGE = 4096

    def __init__(self, size: int, base: int = 0x4000_0000, scatter: bool = False) -> None:
        from .._native import ffi

        self.size = (size + self.PAGE - 1) // self.PAGE * self.PAGE
        self.mem = bytearray(self.size)
        self.view = memoryview(self.mem)
        self.pointer: Any = ffi.cast("char *", ffi.from_buffer(self.mem))
        self.base, self.scatter = base, scatter
        self.closed = False

    def translate(self, offset: int) -> tuple[int, int]:
        if not 0 <= offset < self.size:
            raise PciError(f"offset {offset:#x} outside the emulated DMA block")
        if not self.scatter:
            return self.base + offset, self.size - offset
        page, within = divmod(offset, self.PAGE)
        # pages in reverse order, one page apart: never adjacent
        return self.base + (self.size // self.PAGE - page) * 2 * self.PAGE + within, (
            self.PAGE - within
        )

    def to_offset(self, addr: int) -> int:
        """Inverse of translate, for device models reading rings."""
        if not self.scatter:
            off = addr - self.base
        else:
            rel = addr - self.base
            slot, within = divmod(rel, 2 * self.PAGE)
            off = (self.size // self.PAGE - slot) * self.PAGE + within
        if not 0 <= off < self.size:
            raise PciError(f"device address {addr:#x} is not in the emulated DMA block")
        return off

    def close(self) -> None:
        self.closed = True


class EmulatedFunction(PciFunction):
    def __init__(
        self,
        config: ConfigSpace | bytes | bytearray,
        bars: dict[int, EmulatedBar],
        msix_vectors: int = 0,
        iommu_mode: str = "noiommu",
        scatter_dma: bool = False,
    ) -> None:
        raw = config.data if isinstance(config, ConfigSpace) else config
        self.config = bytearray(raw)
        self.bars = bars
        self.name = "emulated"
        self._msix_vectors = msix_vectors
        self._iommu_mode = iommu_mode
        self.scatter_dma = scatter_dma
        self.msix_fds: list[int] = []
        self.dma: list[EmulatedDma] = []
        self.closed = False
        self.on_enable_msix: Callable[[list[int]], None] | None = None

    def config_read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > len(self.config):
            raise PciError(f"config read {offset:#x}+{length} out of range")
        return bytes(self.config[offset : offset + length])

    def config_write(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def bar_size(self, index: int) -> int:
        bar = self.bars.get(index)
        return bar.length if bar else 0

    def bar_window(self, index: int, offset: int, length: int, name: str) -> RegisterWindow:
        bar = self.bars.get(index)
        if bar is None:
            raise BarError(f"BAR{index} is not implemented ({name} lives there)")
        return bar.window(offset, length, name)

    def msix_vectors(self) -> int:
        return self._msix_vectors

    def enable_msix(self, count: int) -> list[int]:
        if not 0 < count <= self._msix_vectors:
            raise PciError(f"{count} MSI-X vectors asked for, {self._msix_vectors} available")
        self.disable_msix()
        self.msix_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]
        if self.on_enable_msix:
            self.on_enable_msix(self.msix_fds)
        return list(self.msix_fds)

    def disable_msix(self) -> None:
        for fd in self.msix_fds:
            os.close(fd)
        self.msix_fds = []

    def fire(self, vector: int) -> None:
        """Signal MSI-X `vector` as the device would."""
        if vector < len(self.msix_fds):
            os.eventfd_write(self.msix_fds[vector], 1)

    @property
    def iommu_mode(self) -> str:
        return self._iommu_mode

    def alloc_dma(self, size: int, iova: bool) -> EmulatedDma:
        dma = EmulatedDma(size, base=0x8_0000_0000 if iova else 0x4000_0000,
                          scatter=self.scatter_dma and not iova)
        self.dma.append(dma)
        return dma

    def close(self) -> None:
        self.disable_msix()
        self.closed = True
