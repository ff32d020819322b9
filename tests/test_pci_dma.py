"""Pinned DMA memory (vfsdrv.pci.dma) on this host: real mmap/mlock and real
physical addresses from /proc/self/pagemap (needs root, like the driver). The
IOMMU context is a recording fake (there is no VFIO container on a plain host);
the real MAP_DMA / IOAS paths run in the guest tests."""

from __future__ import annotations

import os
import struct

import pytest
from vfsdrv.errors import DmaError
from vfsdrv.pci import dma as dmamod
from vfsdrv.pci.container import IommuContext
from vfsdrv.pci.dma import PAGE_SIZE, DmaMemory, contiguous_runs
from vfsdrv.virtio.memory import Arena

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="physical addresses in /proc/self/pagemap need root (CAP_SYS_ADMIN)"
)


def pagemap_pa(vaddr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(vaddr // PAGE_SIZE * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    return (entry & ((1 << 55) - 1)) * PAGE_SIZE + vaddr % PAGE_SIZE


class RecordingIommu(IommuContext):
    kind = "type1"

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self.maps: dict[int, tuple[int, int]] = {}  # iova -> (vaddr, size)
        self.unmaps: list[tuple[int, int]] = []
        self.ranges = ranges or [(0x10000, (1 << 39) - 1)]

    def map(self, vaddr: int, size: int, iova: int | None) -> int:
        assert iova is not None and iova % PAGE_SIZE == 0 and size % PAGE_SIZE == 0
        assert vaddr % PAGE_SIZE == 0
        self.maps[iova] = (vaddr, size)
        return iova

    def unmap(self, iova: int, size: int) -> None:
        assert self.maps.pop(iova)[1] == size
        self.unmaps.append((iova, size))

    def iova_ranges(self) -> list[tuple[int, int]]:
        return self.ranges

    def close(self) -> None:
        pass


def test_contiguous_runs_merge_adjacent_pages() -> None:
    pas = [0x10000, 0x11000, 0x5000, 0x6000, 0x7000, 0x20000]
    assert contiguous_runs(pas) == [(0, 0x10000, 0x2000), (0x2000, 0x5000, 0x3000),
                                    (0x5000, 0x20000, 0x1000)]


@needs_root
def test_physical_mode_translates_like_pagemap() -> None:
    mem = DmaMemory(256 << 10, None, hugepages=False, allow_unpinned_4k=True)
    try:
        assert mem.size == 256 << 10 and not mem.hugepages
        mem.view[:] = b"\xa5" * mem.size  # writable, populated
        for off in (0, 1, 4095, 4096, 100_000, mem.size - 1):
            addr, run = mem.translate(off)
            assert addr == pagemap_pa(mem.addr + off)
            assert 1 <= run <= mem.size - off
            # every byte of the reported run is really physically contiguous
            last = off + run - 1
            assert pagemap_pa(mem.addr + last) == addr + run - 1
        assert sum(n for _, _, n in mem.runs) == mem.size
        with pytest.raises(DmaError):
            mem.translate(mem.size)
    finally:
        mem.close()


@needs_root
def test_arena_buffers_split_by_physical_contiguity() -> None:
    mem = DmaMemory(512 << 10, None, hugepages=False, allow_unpinned_4k=True)
    try:
        arena = Arena(mem.view, mem.translate, mem.pointer)
        buf = arena.alloc(64 << 10, PAGE_SIZE)
        segs = buf.segments(0, buf.size)
        assert sum(n for _, n in segs) == buf.size
        pos = 0
        for addr, n in segs:
            assert addr == pagemap_pa(mem.addr + buf.offset + pos)
            assert pagemap_pa(mem.addr + buf.offset + pos + n - 1) == addr + n - 1
            pos += n
        buf.view[:4] = b"abcd"
        assert bytes(mem.view[buf.offset : buf.offset + 4]) == b"abcd"
        arena.free(buf)
    finally:
        mem.close()


@needs_root
def test_identity_mapping_behind_an_iommu() -> None:
    ctx = RecordingIommu()
    mem = DmaMemory(128 << 10, ctx, iova=False, hugepages=False)
    try:
        # one contiguous block mapped first (the pin), then every run at IOVA == PA
        block = [(i, v) for i, v in ctx.maps.items() if v == (mem.addr, mem.size)]
        assert len(block) == 1 and block[0][0] >= 1 << 38
        for off, pa, n in mem.runs:
            assert ctx.maps[pa] == (mem.addr + off, n)
        assert mem.translate(0)[0] == mem.runs[0][1]
    finally:
        mem.close()
    assert ctx.maps == {}


@needs_root
def test_iova_mode_is_one_contiguous_range() -> None:
    ctx = RecordingIommu(ranges=[(0x10000, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)])
    mem = DmaMemory(128 << 10, ctx, iova=True, hugepages=False)
    try:
        ((iova, (vaddr, size)),) = ctx.maps.items()
        assert (vaddr, size) == (mem.addr, mem.size)
        assert iova + size - 1 <= (1 << 39) - 1 and iova % (2 << 20) == 0
        assert mem.translate(5000) == (iova + 5000, mem.size - 5000)
    finally:
        mem.close()


@needs_root
def test_physical_address_outside_iova_ranges_is_refused() -> None:
    ctx = RecordingIommu(ranges=[(1 << 38, (1 << 39) - 1)])  # RAM is far below 2^38
    with pytest.raises(DmaError, match="outside the IOMMU's usable IOVA ranges"):
        DmaMemory(64 << 10, ctx, iova=False, hugepages=False)
    assert ctx.maps == {}  # the block mapping was undone


def test_iova_mode_needs_an_iommu() -> None:
    with pytest.raises(DmaError, match="needs an IOMMU"):
        DmaMemory(4096, None, iova=True)


def test_hugepages_fall_back_to_small_pages(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("HugePages_Free:        3\nHugepagesize:       2048 kB\n")
    assert dmamod.free_hugepages(str(meminfo)) == 3 * (2 << 20)
    meminfo.write_text("HugePages_Free:        3\nHugepagesize:    1048576 kB\n")
    assert dmamod.free_hugepages(str(meminfo)) == 0
    if os.geteuid() == 0:
        mem = DmaMemory(8192, None, allow_unpinned_4k=True)  # auto: huge pages when enough free
        try:
            expect_huge = dmamod.free_hugepages() >= dmamod.HUGE_PAGE_SIZE
            assert mem.hugepages == expect_huge
        finally:
            mem.close()


@needs_root
def test_hugepage_block_is_physically_contiguous() -> None:
    if dmamod.free_hugepages() < dmamod.HUGE_PAGE_SIZE:
        pytest.skip("no free 2 MiB huge pages on this host (vm.nr_hugepages = 0); the guest "
                    "tests reserve some and cover this")
    mem = DmaMemory(1 << 20, None, hugepages=True)
    try:
        assert mem.hugepages and mem.size == 2 << 20
        assert len(mem.runs) == 1 and mem.translate(0)[1] == mem.size
    finally:
        mem.close()


def test_bad_size() -> None:
    with pytest.raises(DmaError, match="bad DMA block size"):
        DmaMemory(0, None)


def test_compaction_setting_decides_the_4k_warning(tmp_path) -> None:
    from vfsdrv.pci.dma import compaction_moves_locked_pages

    f = tmp_path / "compact_unevictable_allowed"
    f.write_text("1\n")
    assert compaction_moves_locked_pages(str(f))
    f.write_text("0\n")
    assert not compaction_moves_locked_pages(str(f))
    assert compaction_moves_locked_pages(str(tmp_path / "missing"))


# -- no-IOMMU DMA on 4 KiB pages is refused unless forced (issue 10, item 10) -------------


def locked_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmLck:"))


@needs_root
def test_noiommu_4k_pages_are_refused_and_say_how_to_get_huge_pages(monkeypatch) -> None:
    monkeypatch.setattr(dmamod, "compaction_moves_locked_pages", lambda: True)
    before = locked_kib()
    with pytest.raises(dmamod.UnpinnedDmaError) as info:
        DmaMemory(4 << 20, None, hugepages=False)
    msg = str(info.value)
    assert msg.startswith("no-IOMMU DMA on 4 KiB pages refused")
    assert "4 MiB of DMA memory needs 2 free 2 MiB huge pages" in msg
    assert "> /proc/sys/vm/nr_hugepages" in msg and "hugepages=" in msg
    assert "--force-4k-noiommu" in msg
    assert locked_kib() == before  # the refused block was unmapped at once


@needs_root
def test_noiommu_4k_pages_when_forced_warn(monkeypatch, caplog) -> None:
    monkeypatch.setattr(dmamod, "compaction_moves_locked_pages", lambda: True)
    mem = DmaMemory(64 << 10, None, hugepages=False, allow_unpinned_4k=True)
    try:
        assert not mem.hugepages
        assert "(forced)" in caplog.text and "vm.nr_hugepages" in caplog.text
    finally:
        mem.close()


@needs_root
def test_noiommu_4k_pages_are_fine_when_compaction_leaves_locked_pages(monkeypatch,
                                                                         caplog) -> None:
    monkeypatch.setattr(dmamod, "compaction_moves_locked_pages", lambda: False)
    mem = DmaMemory(64 << 10, None, hugepages=False)
    mem.close()
    assert "4 KiB" not in caplog.text


@needs_root
def test_4k_pages_behind_an_iommu_are_pinned_by_the_map(monkeypatch) -> None:
    monkeypatch.setattr(dmamod, "compaction_moves_locked_pages", lambda: True)
    DmaMemory(64 << 10, RecordingIommu(), hugepages=False).close()


def test_refusal_counts_the_huge_pages_to_reserve(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("HugePages_Free:        3\nHugepagesize:       2048 kB\n")
    nr = tmp_path / "nr_hugepages"
    nr.write_text("5\n")
    # 32 MiB: 16 pages, 3 free of the 5 reserved: 13 more, 18 in all
    msg = str(dmamod.unpinned_4k_error(32 << 20, str(meminfo), str(nr)))
    assert "needs 16 free 2 MiB huge pages (3 free)" in msg
    assert f"echo 18 > {nr}" in msg and "hugepages=18" in msg


# -- closed means closed: no fault after close (issue 10, item 9) -----------------------------

USE_AFTER_CLOSE = r"""
import sys
from vfsdrv.errors import DmaError
from vfsdrv.pci.dma import DmaMemory
from vfsdrv.virtio.memory import Arena

def mapped(addr):
    with open("/proc/self/maps") as f:
        return any(int(line.split("-")[0], 16) == addr for line in f)

mem = DmaMemory(256 << 10, None, hugepages=False, allow_unpinned_4k=True)
addr = mem.addr
arena = Arena(mem.view, mem.translate, mem.pointer)
buf = arena.alloc(8192, 4096)
reply = buf.view[100:200]  # a slice handed on, as replies are
reply[0] = 42
arena.close()
mem.close()
for what, use in (("buf.view", lambda: buf.view[0]), ("alloc", lambda: arena.alloc(64)),
                  ("translate", lambda: mem.translate(0))):
    try:
        use()
        sys.exit(f"{what} worked after close")
    except (ValueError, DmaError) as exc:
        print(what, type(exc).__name__, exc)
# the slice still reaches live memory: no fault
reply[1] = 1
assert reply[0] == 42
assert mapped(addr)
del reply, buf, arena
assert not mapped(addr), "the mapping outlived its last view"
print("OK")
"""


@needs_root
def test_use_after_close_raises_or_reads_live_memory_never_faults(tmp_path) -> None:
    import subprocess
    import sys

    # a fault would kill the interpreter: run it in its own
    r = subprocess.run([sys.executable, "-c", USE_AFTER_CLOSE], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines()[-1] == "OK"
    assert "alloc DmaError DMA memory used after its device was closed" in r.stdout
    assert "translate DmaError" in r.stdout and "buf.view ValueError" in r.stdout


def test_closed_pci_transport_gives_no_memory() -> None:
    from test_pci_transport import make_function
    from vfsdrv.errors import DeviceGoneError
    from vfsdrv.virtio import pci as vp

    fn, _, _ = make_function()
    t = vp.VirtioPciTransport(fn)
    pool = t.dma_pool()
    buf = pool.alloc(256)
    t.close()
    with pytest.raises(ValueError):
        buf.view[0] = 1
    with pytest.raises(DeviceGoneError, match="closed"):
        t.dma_pool()
    with pytest.raises(DeviceGoneError, match="closed"):
        t.check_alive()
    t.close()  # twice is fine
