"""DMA memory: buffers that the driver reads and writes through a memoryview and
the device reaches at a known device address.

A transport owns one `Arena`: a large block of memory the device can reach (a memfd
shared with a vhost-user backend, or pinned pages mapped for a VFIO device). The
arena carves buffers out of it; each buffer knows its device address and can split
itself into device-contiguous segments (pages that are contiguous in our address
space need not be contiguous for the device in VFIO no-IOMMU mode).

Closing an arena takes every buffer back: their views are released, so a later
access raises (ValueError from the memoryview, DmaError from the arena) instead of
touching memory that is about to go; the memory itself is unmapped by its owner
only when no view of it is left (see vfsdrv.pci.dma).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol

from ..errors import DmaError

PAGE_SIZE = 4096

#: maps an offset in the arena to (device address, bytes contiguous from there)
Translate = Callable[[int], tuple[int, int]]


class DmaPool(Protocol):
    def alloc(self, size: int, align: int = 64) -> DmaBuffer: ...
    def free(self, buf: DmaBuffer) -> None: ...


class DmaBuffer:
    """A slice of an arena. `view` is host access, `addr` the device address of byte 0."""

    __slots__ = ("arena", "offset", "size", "view", "addr", "contiguous")

    def __init__(self, arena: Arena, offset: int, size: int) -> None:
        self.arena = arena
        self.offset = offset
        self.size = size
        self.view = arena.view[offset : offset + size]
        self.addr, run = arena.translate(offset)
        #: one device-contiguous range: segments() is then a single piece
        self.contiguous = run >= size

    def device_addr(self, offset: int) -> int:
        if not 0 <= offset < self.size:
            raise DmaError(f"offset {offset} outside a {self.size}-byte buffer")
        if self.contiguous:
            return self.addr + offset
        return self.arena.translate(self.offset + offset)[0]

    def segments(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Device-contiguous (address, length) pieces covering [offset, offset+length)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DmaError(f"range {offset}+{length} outside a {self.size}-byte buffer")
        if self.contiguous or length == 0:
            return [(self.addr + offset, length)]
        out: list[tuple[int, int]] = []
        pos, end = self.offset + offset, self.offset + offset + length
        while pos < end:
            addr, run = self.arena.translate(pos)
            n = min(run, end - pos)
            if out and out[-1][0] + out[-1][1] == addr:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((addr, n))
            pos += n
        return out

    def address_of(self):
        """A cffi pointer to byte 0 (for atomics on shared ring memory)."""
        return self.arena.pointer + self.offset


class Arena:
    """First-fit allocator with coalescing over one block of device-reachable memory.

    Small and predictable: the driver allocates its rings and its buffer pools once
    at start-up and reuses buffers, so fragmentation is not a concern.
    """

    def __init__(self, view: memoryview, translate: Translate, pointer=None) -> None:
        from .._native import ffi

        self.view = view
        self.size = len(view)
        self.translate = translate
        self.pointer = pointer if pointer is not None else ffi.cast("char *", ffi.from_buffer(view))
        self._free_starts: list[int] = [0]
        self._free_len: dict[int, int] = {0: self.size}
        self._used: dict[int, DmaBuffer] = {}
        self.closed = False

    def alloc(self, size: int, align: int = 64) -> DmaBuffer:
        if self.closed:
            raise DmaError("DMA memory used after its device was closed")
        if size <= 0:
            raise DmaError(f"bad allocation size {size}")
        if align <= 0 or align & (align - 1):
            raise DmaError(f"alignment {align} is not a power of two")
        for start in self._free_starts:
            length = self._free_len[start]
            aligned = (start + align - 1) & ~(align - 1)
            if aligned + size > start + length:
                continue
            buf = DmaBuffer(self, aligned, size)
            self._take(start, length, aligned, buf)
            buf.view[:] = bytes(size)  # rings must start zeroed; buffers are reused, so once
            return buf
        raise DmaError(
            f"DMA memory exhausted: no {size}-byte block (align {align}) free in a "
            f"{self.size}-byte arena"
        )

    def _take(self, start: int, length: int, aligned: int, buf: DmaBuffer) -> None:
        size = buf.size
        i = bisect.bisect_left(self._free_starts, start)
        del self._free_starts[i]
        del self._free_len[start]
        if aligned > start:
            self._insert_free(start, aligned - start)
        tail = start + length - (aligned + size)
        if tail:
            self._insert_free(aligned + size, tail)
        self._used[aligned] = buf

    def _insert_free(self, start: int, length: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free_len[start] = length

    def free(self, buf: DmaBuffer) -> None:
        if self.closed and buf.arena is self:
            return  # close() took every buffer back already
        if buf.arena is not self or self._used.get(buf.offset) is not buf:
            raise DmaError(f"freeing a buffer this arena did not hand out (offset {buf.offset})")
        del self._used[buf.offset]
        start, length = buf.offset, buf.size
        buf.view.release()
        i = bisect.bisect_left(self._free_starts, start)
        # merge with the following block
        if i < len(self._free_starts) and self._free_starts[i] == start + length:
            nxt = self._free_starts.pop(i)
            length += self._free_len.pop(nxt)
        # merge with the preceding block
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free_len[prev] == start:
                self._free_len[prev] += length
                return
        self._insert_free(start, length)

    def close(self) -> None:
        """Take every buffer back (views released); alloc raises from now on. Call it
        before the memory under the arena is closed."""
        if self.closed:
            return
        self.closed = True
        for buf in self._used.values():
            try:
                buf.view.release()
            except BufferError:
                pass  # exported (cffi from_buffer): that export keeps the memory mapped
        self._used.clear()

    @property
    def bytes_free(self) -> int:
        return sum(self._free_len.values())
