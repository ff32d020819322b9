"""DMA arena: first-fit allocation, alignment, coalescing, errors, and the split of a
buffer into device-contiguous segments."""

from __future__ import annotations

import mmap
import random

import pytest
from vfsdrv.errors import DmaError
from vfsdrv.virtio.memory import PAGE_SIZE, Arena, DmaBuffer

SIZE = 64 * 1024


def make_arena(size: int = SIZE) -> Arena:
    """Device address == offset: the whole arena is one contiguous run."""
    return Arena(memoryview(mmap.mmap(-1, size)), lambda off: (off, size - off))


# page -> device address of the page. Pages 0-1 and 2-3 are contiguous pairs, 4 sits
# below them, 5 directly follows 4, 6 and 7 are each on their own.
PAGE_MAP = [0x10000, 0x11000, 0x50000, 0x51000, 0x8000, 0x9000, 0x70000, 0x30000]


def make_paged_arena() -> Arena:
    size = len(PAGE_MAP) * PAGE_SIZE

    def translate(off: int) -> tuple[int, int]:
        page, inner = divmod(off, PAGE_SIZE)
        return PAGE_MAP[page] + inner, PAGE_SIZE - inner

    return Arena(memoryview(mmap.mmap(-1, size)), translate)


# -- first fit -------------------------------------------------------------------------
def test_allocations_are_laid_out_in_order_from_the_start() -> None:
    arena = make_arena()
    a = arena.alloc(100, 64)
    b = arena.alloc(100, 64)
    c = arena.alloc(64, 64)
    assert (a.offset, b.offset, c.offset) == (0, 128, 256)
    assert (a.size, len(a.view), a.addr) == (100, 100, 0)
    assert b.addr == 128
    assert arena.bytes_free == SIZE - 264


def test_first_fit_takes_the_lowest_hole_that_fits() -> None:
    arena = make_arena()
    blocks = [arena.alloc(256, 64) for _ in range(6)]  # 0, 256, ..., 1280
    arena.free(blocks[1])  # hole of 256 at 256
    arena.free(blocks[4])  # hole of 256 at 1024
    # too big for either hole: goes after the last block
    big = arena.alloc(300, 64)
    assert big.offset == 1536
    # fits the first hole: first fit, not best fit or last freed
    small = arena.alloc(64, 64)
    assert small.offset == 256
    # the rest of the first hole is used next
    nxt = arena.alloc(192, 64)
    assert nxt.offset == 320
    # the first hole is now full: the second one is used
    assert arena.alloc(256, 64).offset == 1024


def test_allocation_is_zeroed_even_when_memory_is_reused() -> None:
    arena = make_arena()
    a = arena.alloc(512)
    a.view[:] = b"\xaa" * 512
    off = a.offset
    arena.free(a)
    b = arena.alloc(512)
    assert b.offset == off
    assert bytes(b.view) == bytes(512)


def test_buffer_view_is_the_arena_memory() -> None:
    arena = make_arena()
    arena.alloc(64)
    b = arena.alloc(16)
    b.view[:] = b"0123456789abcdef"
    assert bytes(arena.view[b.offset : b.offset + 16]) == b"0123456789abcdef"


# -- alignment ---------------------------------------------------------------------------
@pytest.mark.parametrize("align", [1, 2, 8, 16, 64, 256, 4096])
def test_alignment_is_honoured(align: int) -> None:
    arena = make_arena()
    arena.alloc(1, 1)  # offset 0, so the next block must skip ahead
    b = arena.alloc(24, align)
    assert b.offset % align == 0
    assert b.addr % align == 0
    assert b.offset == align  # the lowest aligned offset after the 1-byte block


def test_alignment_padding_stays_free() -> None:
    arena = make_arena()
    arena.alloc(8, 8)  # [0, 8)
    page = arena.alloc(100, 4096)  # [4096, 4196): the gap [8, 4096) must remain usable
    assert page.offset == 4096
    assert arena.bytes_free == SIZE - 8 - 100
    gap = arena.alloc(4000, 8)
    assert gap.offset == 8


@pytest.mark.parametrize("align", [3, 6, 100, -4])
def test_alignment_must_be_a_power_of_two(align: int) -> None:
    arena = make_arena()
    with pytest.raises(DmaError, match="power of two"):
        arena.alloc(16, align)
    assert arena.bytes_free == SIZE


def test_alignment_zero_is_refused() -> None:
    arena = make_arena()
    first = arena.alloc(64)
    try:
        second = arena.alloc(64, 0)
    except DmaError:
        return
    # if it did not raise, it must at least not overlap the first block
    assert second.offset >= first.offset + first.size


@pytest.mark.parametrize("size", [0, -1])
def test_size_must_be_positive(size: int) -> None:
    arena = make_arena()
    with pytest.raises(DmaError, match="size"):
        arena.alloc(size)


# -- free and coalescing -------------------------------------------------------------------
@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (0, 2, 1), (1, 0, 2), (2, 0, 1)])
def test_free_coalesces_back_into_one_block(order: tuple[int, int, int]) -> None:
    arena = make_arena()
    blocks = [arena.alloc(SIZE // 4, 64) for _ in range(3)]
    for i in order:
        arena.free(blocks[i])
    assert arena.bytes_free == SIZE
    # only possible if the three blocks and the tail merged into one
    whole = arena.alloc(SIZE, 1)
    assert whole.offset == 0


def test_free_merges_with_the_preceding_and_following_holes() -> None:
    arena = make_arena()
    a, b, c, d = (arena.alloc(1024, 1024) for _ in range(4))
    arena.free(a)
    arena.free(c)
    # two separate 1 KiB holes: 2 KiB only fits the tail after d
    probe = arena.alloc(2048, 1)
    assert probe.offset == 4096
    arena.free(probe)
    arena.free(b)  # joins a's hole before it and c's hole after it
    merged = arena.alloc(3 * 1024, 1024)
    assert merged.offset == 0
    assert d.offset == 3072


def test_exhaustion_raises_and_recovers_after_free() -> None:
    arena = make_arena()
    with pytest.raises(DmaError, match="exhausted"):
        arena.alloc(SIZE + 1, 1)
    blocks = [arena.alloc(4096, 4096) for _ in range(SIZE // 4096)]
    assert arena.bytes_free == 0
    with pytest.raises(DmaError, match="exhausted"):
        arena.alloc(1, 1)
    arena.free(blocks[5])
    again = arena.alloc(4096, 1)
    assert again.offset == 5 * 4096


def test_fragmented_space_is_not_enough_for_a_large_block() -> None:
    arena = make_arena()
    blocks = [arena.alloc(4096, 4096) for _ in range(SIZE // 4096)]
    for b in blocks[::2]:
        arena.free(b)
    assert arena.bytes_free == SIZE // 2
    with pytest.raises(DmaError, match="exhausted"):
        arena.alloc(4097, 1)
    assert arena.alloc(4096, 1).offset == 0


def test_double_free_is_an_error_and_changes_nothing() -> None:
    arena = make_arena()
    a = arena.alloc(128)
    b = arena.alloc(128)
    arena.free(a)
    free_before = arena.bytes_free
    with pytest.raises(DmaError, match="did not hand out"):
        arena.free(a)
    assert arena.bytes_free == free_before
    # a still-used neighbour is untouched: the hole is exactly a's old block
    c = arena.alloc(128)
    assert c.offset == a.offset
    assert arena.alloc(64).offset == b.offset + 128


def test_freeing_a_buffer_of_another_arena_is_an_error() -> None:
    one, two = make_arena(), make_arena()
    one.alloc(64)
    alien = two.alloc(64)
    with pytest.raises(DmaError):
        one.free(alien)
    assert one.bytes_free == SIZE - 64


def test_freeing_a_forged_sub_buffer_is_an_error() -> None:
    arena = make_arena()
    a = arena.alloc(256)
    forged = DmaBuffer(arena, a.offset, 128)  # same start, wrong size
    with pytest.raises(DmaError):
        arena.free(forged)
    arena.free(a)
    assert arena.bytes_free == SIZE


def test_random_alloc_free_never_overlaps_and_returns_everything() -> None:
    rng = random.Random(1234)
    arena = make_arena()
    live: list[DmaBuffer] = []
    for _ in range(3000):
        if live and (rng.random() < 0.45 or arena.bytes_free < 4096):
            arena.free(live.pop(rng.randrange(len(live))))
        else:
            size = rng.randint(1, 2048)
            align = 1 << rng.randint(0, 12)
            try:
                live.append(arena.alloc(size, align))
            except DmaError:
                continue
            b = live[-1]
            assert b.offset % align == 0 and b.offset + size <= SIZE
        spans = sorted((b.offset, b.offset + b.size) for b in live)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, "two live buffers overlap"
        assert arena.bytes_free == SIZE - sum(b.size for b in live)
    for b in live:
        arena.free(b)
    assert arena.alloc(SIZE, 1).offset == 0


# -- device addresses and segments ----------------------------------------------------------
def test_contiguous_buffer_is_one_segment() -> None:
    arena = make_arena()
    arena.alloc(100)
    b = arena.alloc(10000, 16)
    assert b.segments(0, 10000) == [(b.addr, 10000)]
    assert b.segments(300, 5000) == [(b.addr + 300, 5000)]
    assert b.device_addr(9999) == b.addr + 9999


def test_segments_split_where_device_addresses_jump() -> None:
    arena = make_paged_arena()
    buf = arena.alloc(len(PAGE_MAP) * PAGE_SIZE, PAGE_SIZE)
    assert buf.addr == PAGE_MAP[0]
    assert buf.segments(0, buf.size) == [
        (0x10000, 2 * PAGE_SIZE),  # pages 0-1 merged
        (0x50000, 2 * PAGE_SIZE),  # pages 2-3 merged
        (0x8000, 2 * PAGE_SIZE),  # pages 4-5 merged
        (0x70000, PAGE_SIZE),
        (0x30000, PAGE_SIZE),
    ]
    # an unaligned range starts and ends mid-page
    assert buf.segments(PAGE_SIZE + 100, 2 * PAGE_SIZE) == [
        (0x11000 + 100, PAGE_SIZE - 100),
        (0x50000, PAGE_SIZE + 100),
    ]
    # inside one page: one segment
    assert buf.segments(6 * PAGE_SIZE + 8, 16) == [(0x70000 + 8, 16)]
    total = sum(n for _, n in buf.segments(10, buf.size - 20))
    assert total == buf.size - 20


def test_device_addr_follows_the_page_map() -> None:
    arena = make_paged_arena()
    first = arena.alloc(PAGE_SIZE + 512, 1)  # pages 0 and 1 (contiguous)
    assert first.device_addr(PAGE_SIZE + 4) == 0x11004
    buf = arena.alloc(3 * PAGE_SIZE, PAGE_SIZE)  # pages 2, 3, 4
    assert buf.offset == 2 * PAGE_SIZE
    assert buf.device_addr(0) == 0x50000
    assert buf.device_addr(PAGE_SIZE + 1) == 0x51001
    assert buf.device_addr(2 * PAGE_SIZE + 7) == 0x8007
    assert buf.segments(0, buf.size) == [(0x50000, 2 * PAGE_SIZE), (0x8000, PAGE_SIZE)]


def test_buffer_crossing_a_page_inside_a_contiguous_pair_is_one_segment() -> None:
    arena = make_paged_arena()
    arena.alloc(PAGE_SIZE - 256, 1)
    b = arena.alloc(512, 1)  # straddles pages 0 and 1, which are device-contiguous
    assert b.segments(0, 512) == [(0x10000 + PAGE_SIZE - 256, 512)]


@pytest.mark.parametrize("offset,length", [(-1, 4), (0, 129), (128, 1), (100, 29)])
def test_segments_outside_the_buffer_are_refused(offset: int, length: int) -> None:
    arena = make_paged_arena()
    b = arena.alloc(128)
    with pytest.raises(DmaError, match="outside"):
        b.segments(offset, length)


@pytest.mark.parametrize("offset", [-1, 128, 1000])
def test_device_addr_outside_the_buffer_is_refused(offset: int) -> None:
    arena = make_arena()
    b = arena.alloc(128)
    with pytest.raises(DmaError, match="outside"):
        b.device_addr(offset)


# -- close ----------------------------------------------------------------------------------


def test_close_takes_every_buffer_back_and_refuses_more() -> None:
    arena = make_arena()
    a, b = arena.alloc(128), arena.alloc(4096)
    arena.free(a)
    arena.close()
    # views handed out are released: using one raises instead of reaching the memory
    with pytest.raises(ValueError):
        b.view[0] = 1
    with pytest.raises(DmaError, match="after its device was closed"):
        arena.alloc(64)
    arena.free(b)  # freeing after close has nothing left to do
    arena.close()  # twice is fine
    with pytest.raises(DmaError):
        arena.free(make_arena().alloc(64))  # another arena's buffer is still an error


def test_close_survives_a_buffer_exported_elsewhere() -> None:
    from vfsdrv._native import ffi

    arena = make_arena()
    buf = arena.alloc(256)
    held = ffi.from_buffer(buf.view)  # an export: that view cannot be released
    arena.close()
    assert arena.closed
    ffi.release(held)
