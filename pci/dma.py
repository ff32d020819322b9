"""Pinned DMA memory for a VFIO device, with a `translate(offset)` for the Arena.

Two address modes:
  * physical ("IOVA as PA", DPDK's term): the device is handed physical addresses
    from /proc/self/pagemap. Needed in no-IOMMU mode, and behind an IOMMU for a
    device that bypasses it (virtio without VIRTIO_F_ACCESS_PLATFORM, e.g. QEMU's
    vhost-user-fs-pci). Behind an IOMMU every physically contiguous run is also
    mapped at IOVA == PA, so the same addresses work whether the device
    translates or not.
  * IOVA: the whole block is mapped at one contiguous IOVA range (MAP_DMA /
    IOAS_MAP); addresses never split. Only for devices that translate.

Memory is hugetlb (2 MiB, physically contiguous) when enough huge pages are free,
4 KiB pages otherwise, always populated and locked. Without an IOMMU, 4 KiB pages are
refused unless the caller forces them (`allow_unpinned_4k`): locked is not pinned,
and memory compaction may migrate such a page while the device writes to its old
physical address, corrupting whatever lives there next. Huge pages never move.
Behind an IOMMU the block is mapped (and so pinned, possibly migrating pages once)
before pagemap is read.

Closing ends the device's access at once (IOMMU mappings removed) but unmaps the
memory only when nothing in this process can still reach it: the mapping belongs to
a cffi owner that every view (and every slice of one) keeps alive, so an access
after close reads dead memory or raises, and never faults.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
from typing import Any

from . import vfio
from .container import IommuContext
from .errors import DmaError, UnpinnedDmaError
from .function import DmaMemoryLike
from .vfio import ffi, libc

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
PFN_MASK = (1 << 55) - 1
PAGEMAP = "/proc/self/pagemap"


COMPACT_UNEVICTABLE = "/proc/sys/vm/compact_unevictable_allowed"
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def compaction_moves_locked_pages(path: str = COMPACT_UNEVICTABLE) -> bool:
    """Whether memory compaction may migrate mlocked pages (the kernel default)."""
    try:
        with open(path) as f:
            return f.read().strip() != "0"
    except OSError:
        return True  # cannot tell: assume the default


def free_hugepages(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of free 2 MiB huge pages."""
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        if int(fields.get("Hugepagesize", "0 kB").split()[0]) * 1024 != HUGE_PAGE_SIZE:
            return 0
        return int(fields.get("HugePages_Free", "0").strip()) * HUGE_PAGE_SIZE
    except (OSError, ValueError):
        return 0


def unpinned_4k_error(size: int, meminfo: str = "/proc/meminfo",
                      nr_hugepages: str = NR_HUGEPAGES) -> UnpinnedDmaError:
    """The refusal of no-IOMMU DMA on 4 KiB pages, with the huge page count to reserve."""
    need = _round(size, HUGE_PAGE_SIZE) // HUGE_PAGE_SIZE
    free = free_hugepages(meminfo) // HUGE_PAGE_SIZE
    try:
        with open(nr_hugepages) as f:
            total = int(f.read().strip()) + max(1, need - free)
    except (OSError, ValueError):
        total = need
    return UnpinnedDmaError(
        f"no-IOMMU DMA on 4 KiB pages refused: {size >> 20} MiB of DMA memory needs {need} "
        f"free 2 MiB huge pages ({free} free). Without an IOMMU the device writes to physical "
        "addresses, and memory compaction may move a 4 KiB page under it: memory corruption. "
        f"Reserve huge pages: `echo {total} > {nr_hugepages}` (at boot: hugepages={total} on "
        f"the kernel command line, or vm.nr_hugepages = {total} in /etc/sysctl.d/), or keep "
        f"locked pages in place: `echo 0 > {COMPACT_UNEVICTABLE}`. To take the risk anyway, "
        "force 4 KiB pages (--force-4k-noiommu)"
    )


def physical_addresses(vaddr: int, size: int, pagemap: str = PAGEMAP) -> list[int]:
    """Physical address of each 4 KiB page of [vaddr, vaddr+size) (all must be present)."""
    first, count = vaddr // PAGE_SIZE, (size + PAGE_SIZE - 1) // PAGE_SIZE
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DmaError(f"cannot open {pagemap}: {e.strerror}") from e
    try:
        raw = os.pread(fd, count * 8, first * 8)
    finally:
        os.close(fd)
    if len(raw) != count * 8:
        raise DmaError(f"short read from {pagemap}")
    out = []
    for i, entry in enumerate(struct.unpack(f"<{count}Q", raw)):
        if not entry >> 63:
            raise DmaError(f"page {i} of the DMA block is not present (not populated/locked)")
        pfn = entry & PFN_MASK
        if pfn == 0:
            raise DmaError(
                f"{pagemap} hides physical addresses (PFN 0): reading them needs CAP_SYS_ADMIN; "
                "run as root"
            )
        out.append(pfn * PAGE_SIZE)
    return out


def contiguous_runs(phys: list[int]) -> list[tuple[int, int, int]]:
    """[(offset, physical address, length)] merging physically adjacent pages."""
    runs: list[tuple[int, int, int]] = []
    for i, pa in enumerate(phys):
        off = i * PAGE_SIZE
        if runs and runs[-1][1] + runs[-1][2] == pa:
            o, p, n = runs[-1]
            runs[-1] = (o, p, n + PAGE_SIZE)
        else:
            runs.append((off, pa, PAGE_SIZE))
    return runs


class DmaMemory(DmaMemoryLike):
    """`size` bytes of pinned memory reachable by the device behind `ctx`
    (None: no IOMMU, physical addresses)."""

    def __init__(
        self,
        size: int,
        ctx: IommuContext | None,
        iova: bool = False,
        hugepages: bool | None = None,
        allow_unpinned_4k: bool = False,
    ) -> None:
        """`hugepages`: None = huge pages when enough are free, True/False = ask for
        them or not; `allow_unpinned_4k`: accept 4 KiB pages without an IOMMU (see the
        module doc: a migrating page is memory corruption)."""
        if size <= 0:
            raise DmaError(f"bad DMA block size {size}")
        translating = ctx is not None and ctx.translates
        if iova and not translating:
            raise DmaError("IOVA addressing needs an IOMMU (this device has none: no-IOMMU mode)")
        self.ctx = ctx if translating else None
        self.iova_mode = iova
        if hugepages is None:
            hugepages = free_hugepages() >= _round(size, HUGE_PAGE_SIZE)
        self.addr, self.size, self.hugepages = self._mmap(size, hugepages)
        self.closed = False
        self.allow_unpinned_4k = allow_unpinned_4k
        # munmap when the last reference goes: views hold the ffi.buffer, which holds this
        self.pointer: Any = ffi.gc(ffi.cast("char *", self.addr), _unmapper(self.size))
        self.view = memoryview(ffi.buffer(self.pointer, self.size)).cast("B")
        self._iova_base: int | None = None
        self._runs: list[tuple[int, int, int]] = []
        self._identity: list[tuple[int, int]] = []
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _mmap(size: int, hugepages: bool) -> tuple[int, int, bool]:
        base = vfio.MAP_SHARED | vfio.MAP_ANONYMOUS | vfio.MAP_POPULATE | vfio.MAP_LOCKED
        prot = vfio.PROT_READ | vfio.PROT_WRITE
        if hugepages:
            length = _round(size, HUGE_PAGE_SIZE)
            p = libc.mmap(ffi.NULL, length, prot, base | vfio.MAP_HUGETLB, -1, 0)
            if int(ffi.cast("uintptr_t", p)) != vfio.MAP_FAILED:
                return int(ffi.cast("uintptr_t", p)), length, True
        length = _round(size, PAGE_SIZE)
        p = libc.mmap(ffi.NULL, length, prot, base, -1, 0)
        if int(ffi.cast("uintptr_t", p)) == vfio.MAP_FAILED:
            err = ffi.errno
            raise DmaError(
                f"cannot allocate {length} bytes of locked DMA memory: {os.strerror(err)}"
                + (" (raise the locked-memory limit: ulimit -l)" if err in (11, 12) else "")
            )
        return int(ffi.cast("uintptr_t", p)), length, False

    def _setup(self) -> None:
        libc.madvise(self.pointer, self.size, vfio.MADV_DONTFORK)
        if libc.mlock(self.pointer, self.size) != 0:
            raise DmaError(f"mlock of the DMA block failed: {os.strerror(ffi.errno)}")
        if self._unpinned() and not self.allow_unpinned_4k:
            raise unpinned_4k_error(self.size)
        if self.ctx is not None:
            # map (and so pin) first: a long-term pin may migrate pages, so physical
            # addresses are only read afterwards
            self._iova_base = self.ctx.map(self.addr, self.size, self._pick_iova_base())
        if self.iova_mode:
            return
        self._runs = contiguous_runs(physical_addresses(self.addr, self.size))
        if self.ctx is not None:
            self._map_identity()
        elif self._unpinned():
            log.warning(
                "DMA memory on 4 KiB pages without an IOMMU (forced): locked pages can still "
                "be migrated by memory compaction, changing their physical addresses under "
                "the device; reserve huge pages (sysctl vm.nr_hugepages) or set "
                "vm.compact_unevictable_allowed=0"
            )

    def _unpinned(self) -> bool:
        """Physical addresses of pages that may move: no IOMMU pins them (a VFIO map
        does), they are not huge, and compaction may migrate locked pages."""
        return self.ctx is None and not self.hugepages and compaction_moves_locked_pages()

    def _pick_iova_base(self) -> int | None:
        """The top of the highest IOVA range that fits (far above RAM, so it cannot collide
        with the identity mappings)."""
        if self.ctx is None:
            return None
        align = HUGE_PAGE_SIZE
        for first, last in sorted(self.ctx.iova_ranges(), reverse=True):
            base = ((last + 1 - self.size) // align) * align
            if base >= first and base + self.size - 1 <= last:
                return base
        raise DmaError(f"no IOVA range can hold a {self.size:#x}-byte DMA block")

    def _map_identity(self) -> None:
        assert self.ctx is not None
        ranges = self.ctx.iova_ranges()
        base = self._iova_base or 0
        for off, pa, length in self._runs:
            if not any(first <= pa and pa + length - 1 <= last for first, last in ranges):
                raise DmaError(
                    f"physical address {pa:#x} lies outside the IOMMU's usable IOVA ranges, so it "
                    "cannot be identity-mapped for a device that bypasses the IOMMU"
                )
            if pa < base + self.size and base < pa + length:
                raise DmaError(f"identity mapping at {pa:#x} collides with the IOVA block")
            self.ctx.map(self.addr + off, length, pa)
            self._identity.append((pa, length))

    def translate(self, offset: int) -> tuple[int, int]:
        if self.closed:
            raise DmaError("DMA memory used after it was closed")
        if not 0 <= offset < self.size:
            raise DmaError(f"offset {offset:#x} outside the {self.size:#x}-byte DMA block")
        if self.iova_mode:
            assert self._iova_base is not None
            return self._iova_base + offset, self.size - offset
        i = bisect.bisect_right(self._runs, (offset, 1 << 64)) - 1
        start, pa, length = self._runs[i]
        return pa + (offset - start), length - (offset - start)

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        return list(self._runs)

    def close(self) -> None:
        """End the device's access now; unmap once no view is left (see the module doc)."""
        if self.closed:
            return
        self.closed = True
        if self.ctx is not None:
            for pa, length in self._identity:
                try:
                    self.ctx.unmap(pa, length)
                except OSError:
                    pass
            self._identity.clear()
            if self._iova_base is not None:
                try:
                    self.ctx.unmap(self._iova_base, self.size)
                except OSError:
                    pass
                self._iova_base = None
        if self.addr:
            try:
                self.view.release()
            except BufferError:
                pass  # exported (a cffi from_buffer): the exporter keeps the mapping
            # dropping our owner unmaps now unless a slice of the view is still alive
            self.pointer = ffi.NULL
            self.addr = 0


def _unmapper(length: int):
    # bound now: at interpreter exit the module's globals may be gone before the owner
    munmap, cast = libc.munmap, ffi.cast

    def unmap(pointer: Any) -> None:
        munmap(cast("void *", pointer), length)

    return unmap


def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to
