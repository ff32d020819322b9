"""The frontend's memory as the backend sees it: the regions of SET_MEM_TABLE, mmapped.

Each region is known by three addresses: its guest-physical address (GPA, what
descriptors carry), the frontend's own virtual address (what SET_VRING_ADDR
carries) and an offset into the file descriptor that backs it. Every translation
checks that the whole range lies inside one region, so a hostile frontend cannot
make the device read or write outside the memory it shared.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass

from ..errors import TransportError
from ..virtio.vhost_user_proto import MEM_REGION, MEM_TABLE_HEAD

#: regions accepted in one SET_MEM_TABLE (QEMU's VHOST_MEMORY_BASELINE_NREGIONS is 8)
MAX_REGIONS = 8


class MemoryAccessError(TransportError):
    """The frontend named memory it did not share (address, length, region)."""


@dataclass
class Region:
    gpa: int
    size: int
    user_addr: int
    mapping: mmap.mmap
    view: memoryview  # the region's bytes (mmap_offset already skipped)


def _contains(base: int, size: int, addr: int, length: int) -> bool:
    return base <= addr and length >= 0 and addr + length <= base + size


class GuestMemory:
    """An immutable memory table. SET_MEM_TABLE builds a new one and drops the old."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = regions

    @classmethod
    def empty(cls) -> GuestMemory:
        return cls([])

    @classmethod
    def from_message(cls, payload: bytes, fds: list[int]) -> GuestMemory:
        """Parse a VhostUserMemory payload and map its fds. The fds are always consumed."""
        try:
            return cls._map_regions(payload, fds)
        finally:
            for fd in fds:
                os.close(fd)

    @classmethod
    def _map_regions(cls, payload: bytes, fds: list[int]) -> GuestMemory:
        if len(payload) < MEM_TABLE_HEAD.size:
            raise MemoryAccessError("SET_MEM_TABLE payload is shorter than its header")
        nregions, _ = MEM_TABLE_HEAD.unpack_from(payload)
        if not 0 < nregions <= MAX_REGIONS:
            raise MemoryAccessError(f"SET_MEM_TABLE with {nregions} regions (1..{MAX_REGIONS})")
        if len(payload) < MEM_TABLE_HEAD.size + nregions * MEM_REGION.size:
            raise MemoryAccessError(f"SET_MEM_TABLE payload too short for {nregions} regions")
        if len(fds) != nregions:
            raise MemoryAccessError(f"SET_MEM_TABLE: {nregions} regions but {len(fds)} fds")
        regions: list[Region] = []
        for i, fd in enumerate(fds):
            gpa, size, user_addr, mmap_offset = MEM_REGION.unpack_from(
                payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size
            )
            regions.append(_map_region(fd, gpa, size, user_addr, mmap_offset))
        for a in regions:
            for b in regions:
                if a is not b and a.gpa < b.gpa + b.size and b.gpa < a.gpa + a.size:
                    raise MemoryAccessError(
                        f"memory regions overlap: GPA {a.gpa:#x}+{a.size:#x} "
                        f"and {b.gpa:#x}+{b.size:#x}"
                    )
        return cls(regions)

    def gpa(self, addr: int, length: int) -> memoryview:
        """The bytes at guest-physical [addr, addr+length): descriptor buffers."""
        for r in self.regions:
            if _contains(r.gpa, r.size, addr, length):
                return r.view[addr - r.gpa : addr - r.gpa + length]
        raise MemoryAccessError(f"GPA range {addr:#x}+{length:#x} is not inside one region")

    def user_addr(self, addr: int, length: int) -> memoryview:
        """The bytes at frontend-virtual [addr, addr+length): ring addresses."""
        for r in self.regions:
            if _contains(r.user_addr, r.size, addr, length):
                return r.view[addr - r.user_addr : addr - r.user_addr + length]
        raise MemoryAccessError(
            f"frontend address range {addr:#x}+{length:#x} is not inside one region"
        )

    def user_to_gpa(self, addr: int) -> int | None:
        """The guest-physical address of frontend address `addr`, None if unmapped."""
        for r in self.regions:
            if _contains(r.user_addr, r.size, addr, 1):
                return addr - r.user_addr + r.gpa
        return None

    def close(self) -> None:
        """Unmap what no one still uses; a mapping exported to a live view stays until GC."""
        for r in self.regions:
            r.view.release()
            try:
                r.mapping.close()
            except BufferError:
                pass
        self.regions = []


def _map_region(fd: int, gpa: int, size: int, user_addr: int, mmap_offset: int) -> Region:
    if size == 0 or gpa + size > 1 << 64 or user_addr + size > 1 << 64:
        raise MemoryAccessError(f"bad memory region GPA {gpa:#x} size {size:#x}")
    st = os.fstat(fd)
    # A region beyond the end of its file would SIGBUS on first access.
    if stat.S_ISREG(st.st_mode) and mmap_offset + size > st.st_size:
        raise MemoryAccessError(
            f"memory region {mmap_offset:#x}+{size:#x} exceeds its {st.st_size}-byte file"
        )
    try:
        # Map from file offset 0: mmap_offset need not be page aligned.
        mapping = mmap.mmap(fd, mmap_offset + size, mmap.MAP_SHARED)
    except (OSError, ValueError, OverflowError) as exc:
        raise MemoryAccessError(f"cannot map memory region of {size:#x} bytes: {exc}") from exc
    view = memoryview(mapping)[mmap_offset : mmap_offset + size]
    return Region(gpa, size, user_addr, mapping, view)
