"""The driver side of a split virtqueue against an in-process device that reads the
same memory: chains (direct and indirect), index wraparound, free-list integrity,
notification suppression in both directions, and validation of used entries."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from vfsdrv.errors import RingError
from vfsdrv.virtio import ring_layout as rl
from vfsdrv.virtio.virtqueue import INDIRECT_TABLE_ENTRIES, QueueFull, Virtqueue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakes.rig import QueueRig  # noqa: E402
from fakes.ring_device import Chain, DriverBug, RingDevice, vring_need_event  # noqa: E402
from fakes.transport import identity_arena  # noqa: E402


class Rig(QueueRig):
    """A split virtqueue, the device on the other end and a data buffer."""

    dev: RingDevice

    def __init__(self, size: int, *, event_idx: bool = False, indirect: bool = False) -> None:
        super().__init__(3, size, RingDevice, event_idx=event_idx, indirect=indirect)

    def state(self) -> tuple[int, int, int]:
        return (self.vq.num_free, self.vq.in_flight, self.vq.last_used)

    def fill_check(self) -> None:
        """Every descriptor is free again and each can be handed out exactly once."""
        vq = self.vq
        assert vq.num_free == vq.size and vq.in_flight == 0
        heads = {vq.add([self.seg(0, 8)], [], ("fill", i)) for i in range(vq.size)}
        assert heads == set(range(vq.size))
        with pytest.raises(QueueFull):
            vq.add([self.seg(0, 8)], [], "one too many")
        chains = self.roundtrip()
        for c in chains:
            self.dev.complete(c)
        assert sorted(t[1] for t, _ in vq.get_used()) == list(range(vq.size))
        assert vq.num_free == vq.size


# -- layout ------------------------------------------------------------------------------
def test_layout_sizes_and_offsets_follow_the_spec() -> None:
    for size in (1, 2, 256, 32768):
        assert rl.desc_table_size(size) == 16 * size
        assert rl.avail_ring_size(size) == 6 + 2 * size
        assert rl.used_ring_size(size) == 6 + 8 * size
        assert rl.used_event_offset(size) == 4 + 2 * size
        assert rl.avail_event_offset(size) == 4 + 8 * size
    assert rl.DESC.size == 16 and rl.USED_ELEM.size == 8


def test_valid_sizes_are_powers_of_two_up_to_32768() -> None:
    valid = [s for s in range(0, 70000) if rl.is_valid_size(s)]
    assert valid == [1 << k for k in range(16)]


def test_need_event_matches_the_reference_formula() -> None:
    rng = random.Random(7)
    cases = [(0, 1, 0), (0, 0, 0), (5, 6, 5), (5, 5, 4), (0xFFFF, 0, 0xFFFF), (2, 1, 0xFFFE)]
    cases += [tuple(rng.randrange(65536) for _ in range(3)) for _ in range(2000)]
    for event, new, old in cases:
        assert rl.need_event(event, new, old) == vring_need_event(event, new, old)
    # crossing spelled out: old < event+1 <= new, across the 16-bit wrap
    assert rl.need_event(0xFFFF, 1, 0xFFFE)
    assert not rl.need_event(2, 1, 0xFFFE)


@pytest.mark.parametrize("size", [0, 3, 6, 1000, 65536])
def test_invalid_queue_size_is_refused(size: int) -> None:
    with pytest.raises(RingError, match="power of two"):
        Virtqueue(0, size, identity_arena(1 << 16))


def test_ring_parts_are_aligned_and_zeroed() -> None:
    rig = Rig(8)
    a = rig.vq.addresses
    assert a.desc % 16 == 0 and a.avail % 2 == 0 and a.used % 4 == 0
    assert rig.dev.avail_idx == 0 and rig.dev.avail_flags == 0 and rig.dev.used_flags == 0


def test_close_returns_all_memory_including_indirect_tables() -> None:
    arena = identity_arena(1 << 20)
    before = arena.bytes_free
    vq = Virtqueue(0, 8, arena, indirect=True)
    buf = arena.alloc(4096)
    for i in range(3):
        vq.add([(buf.addr, 8), (buf.addr + 8, 8)], [(buf.addr + 64, 8)], i)
    assert arena.bytes_free < before - 4096
    vq.close()
    arena.free(buf)
    assert arena.bytes_free == before


@pytest.mark.parametrize("use", [
    lambda vq: vq.add([(0x1000, 8)], [], "t"), lambda vq: vq.publish(),
    lambda vq: vq.has_used(), lambda vq: vq.get_used(), lambda vq: vq.disable_interrupts(),
    lambda vq: vq.enable_interrupts(), lambda vq: vq.native, lambda vq: vq.in_flight,
    lambda vq: vq.used_idx(),
], ids=["add", "publish", "has_used", "get_used", "disarm", "arm", "native", "in_flight",
        "used_idx"])
def test_a_closed_queue_says_so(use) -> None:
    """Every use of a closed queue is a RingError naming it (cffi once raised a
    TypeError about an internal stand-in); none reads the freed ring."""
    vq = Virtqueue(3, 8, identity_arena(1 << 20))
    vq.close()
    with pytest.raises(RingError, match="queue 3 is closed"):
        use(vq)


# -- adding and publishing ---------------------------------------------------------------
def test_chain_is_invisible_until_published() -> None:
    rig = Rig(8)
    rig.add_simple("a")
    assert rig.dev.pending() == 0
    assert rig.vq.publish() is True
    assert rig.dev.pending() == 1
    assert rig.vq.publish() is False  # nothing new


def test_roundtrip_carries_data_both_ways() -> None:
    rig = Rig(8)
    rig.data.view[0:5] = b"hello"
    rig.vq.add([rig.seg(0, 5)], [rig.seg(100, 64)], "tok")
    (chain,) = rig.roundtrip()
    assert rig.dev.read(chain) == b"hello"
    rig.dev.complete(chain, b"world!")
    assert rig.vq.has_used()
    assert rig.vq.get_used() == [("tok", 6)]
    assert bytes(rig.data.view[100:106]) == b"world!"
    assert not rig.vq.has_used()
    assert rig.vq.num_free == 8 and rig.vq.in_flight == 0


def test_chain_with_several_readable_and_writable_segments() -> None:
    rig = Rig(8)
    readable = [rig.seg(0, 3), rig.seg(10, 4), rig.seg(20, 5)]
    writable = [rig.seg(1000, 2), rig.seg(2000, 3), rig.seg(3000, 10)]
    for i, (off, n) in enumerate([(0, 3), (10, 4), (20, 5)]):
        rig.data.view[off : off + n] = bytes([65 + i]) * n
    head = rig.vq.add(readable, writable, "multi")
    assert rig.vq.num_free == 8 - 6
    (chain,) = rig.roundtrip()
    assert chain.head == head and not chain.indirect
    assert chain.readable == readable and chain.writable == writable
    assert len(chain.ring_descs) == 6
    assert rig.dev.read(chain) == b"AAABBBBCCCCC"
    # walk the descriptors as written: readable ones first, NEXT on all but the last
    flags = [rig.dev.desc(d)[2] for d in chain.ring_descs]
    assert flags == [1, 1, 1, 3, 3, 2]
    rig.dev.complete(chain, b"0123456789")  # spans all three writable segments
    assert rig.vq.get_used() == [("multi", 10)]
    assert bytes(rig.data.view[1000:1002]) == b"01"
    assert bytes(rig.data.view[2000:2003]) == b"234"
    assert bytes(rig.data.view[3000:3005]) == b"56789"
    assert rig.vq.num_free == 8


def test_readable_only_and_writable_only_chains() -> None:
    rig = Rig(4)
    rig.vq.add([rig.seg(0, 8), rig.seg(8, 8)], [], "r")
    rig.vq.add([], [rig.seg(100, 8)], "w")
    r, w = rig.roundtrip()
    assert r.writable == [] and len(r.readable) == 2
    assert w.readable == [] and w.writable == [rig.seg(100, 8)]
    rig.dev.complete(w, b"x" * 8)
    rig.dev.complete(r)
    assert rig.vq.get_used() == [("w", 8), ("r", 0)]


def test_bad_chains_are_refused_without_touching_the_queue() -> None:
    rig = Rig(4, indirect=True)
    before = (rig.vq.num_free, rig.vq.avail_idx)
    with pytest.raises(ValueError):
        rig.vq.add([], [], "empty")
    with pytest.raises(ValueError, match="queue size"):  # 2.7.5.3.1: not longer than the queue
        rig.vq.add([rig.seg(0, 1)] * 5, [], "too long even with an indirect table")
    with pytest.raises(ValueError, match="2\\^32"):
        rig.vq.add([(0, 0xFFFFFFFF)], [(0, 1)], "too big")
    assert (rig.vq.num_free, rig.vq.avail_idx) == before
    assert rig.vq.publish() is False
    rig.fill_check()


# -- indirect descriptors --------------------------------------------------------------------
def test_indirect_chain_uses_one_ring_descriptor() -> None:
    rig = Rig(8, indirect=True)
    readable = [rig.seg(0, 4), rig.seg(64, 4)]
    writable = [rig.seg(512, 16), rig.seg(1024, 16), rig.seg(2048, 16)]
    rig.data.view[0:4] = b"abcd"
    rig.data.view[64:68] = b"efgh"
    head = rig.vq.add(readable, writable, "ind")
    assert rig.vq.num_free == 7
    addr, length, flags, _ = rig.dev.desc(head)
    assert flags == rl.VRING_DESC_F_INDIRECT and length == 5 * 16
    (chain,) = rig.roundtrip()
    assert chain.indirect and chain.ring_descs == [head]
    assert chain.table == (addr, 80)
    assert chain.readable == readable and chain.writable == writable
    assert rig.dev.read(chain) == b"abcdefgh"
    rig.dev.complete(chain, b"z" * 40)
    assert rig.vq.get_used() == [("ind", 40)]
    assert bytes(rig.data.view[2048:2056]) == b"z" * 8
    assert rig.vq.num_free == 8


def test_single_segment_chain_does_not_use_an_indirect_table() -> None:
    rig = Rig(4, indirect=True)
    rig.vq.add([], [rig.seg(0, 8)], "one")
    (chain,) = rig.roundtrip()
    assert not chain.indirect
    assert rig.dev.desc(chain.head)[2] == rl.VRING_DESC_F_WRITE


def test_indirect_lets_a_small_queue_hold_long_chains() -> None:
    rig = Rig(4, indirect=True)
    for i in range(4):
        rig.add_simple(i, n_read=2, n_write=2)  # 4 segments each: 16 > queue size direct
    assert rig.vq.num_free == 0
    with pytest.raises(QueueFull):
        rig.add_simple(9, n_read=2, n_write=2)
    chains = rig.roundtrip()
    assert all(c.indirect and len(c.readable) == 2 and len(c.writable) == 2 for c in chains)
    # each chain has its own table
    assert len({c.table for c in chains}) == 4
    for c in reversed(chains):
        rig.dev.complete(c, b"q" * 40)
    assert rig.vq.get_used() == [(3, 40), (2, 40), (1, 40), (0, 40)]


def test_chain_longer_than_an_indirect_table_falls_back_to_direct() -> None:
    n = INDIRECT_TABLE_ENTRIES + 1
    rig = Rig(128, indirect=True)
    readable = [rig.seg(i * 8, 8) for i in range(n - 1)]
    rig.vq.add(readable, [rig.seg(4096, 8)], "long")
    assert rig.vq.num_free == 128 - n
    (chain,) = rig.roundtrip()
    assert not chain.indirect and len(chain.ring_descs) == n
    rig.dev.complete(chain, b"12345678")
    assert rig.vq.get_used() == [("long", 8)]
    assert rig.vq.num_free == 128


def test_indirect_table_is_rewritten_when_its_head_is_reused() -> None:
    rig = Rig(8, indirect=True)  # a completed head goes back on top of the free list
    for i, (nr, nw) in enumerate([(3, 2), (1, 1), (4, 0), (0, 5)]):
        rig.add_simple(i, n_read=nr, n_write=nw)
        (chain,) = rig.roundtrip()
        assert chain.indirect and chain.head == 0
        assert (len(chain.readable), len(chain.writable)) == (nr, nw)
        rig.dev.complete(chain)
        assert rig.vq.get_used() == [(i, 0)]


# -- wraparound and free list ------------------------------------------------------------------
@pytest.mark.parametrize("size,indirect,event_idx", [(8, False, False), (8, True, True)])
def test_indices_wrap_around_after_65536_requests(
    size: int, indirect: bool, event_idx: bool
) -> None:
    rig = Rig(size, indirect=indirect, event_idx=event_idx)
    vq, dev = rig.vq, rig.dev
    # direct: one writable descriptor a chain; indirect: three segments behind one
    # ring descriptor. Either way each batch fills the whole queue.
    segs_r = [rig.seg(0, 8), rig.seg(8, 8)] if indirect else []
    segs_w = [rig.seg(64, 8)]
    per_batch = size
    total = 65536 + 3 * size + 1
    sent = got = 0
    while got < total:
        batch = min(per_batch, total - sent)
        for _ in range(batch):
            vq.add(segs_r, segs_w, sent)
            sent += 1
        # the device consumed everything and (EVENT_IDX) asked for the next index:
        # every batch must kick and interrupt, also across the 16-bit wrap
        assert vq.publish() is True
        chains = dev.pop_all()
        assert len(chains) == batch
        for c in reversed(chains):  # out of order
            dev.complete(c, b"\x01\x02\x03")
        assert dev.should_interrupt() is True
        used = vq.get_used()
        assert [t for t, _ in used] == list(range(got + batch - 1, got - 1, -1))
        assert all(n == 3 for _, n in used)
        got += batch
    assert vq.avail_idx == total & 0xFFFF == dev.last_avail
    assert vq.last_used == total & 0xFFFF == dev.used_idx
    assert dev.popped == total
    rig.fill_check()


def test_free_list_survives_random_out_of_order_completion() -> None:
    rng = random.Random(42)
    rig = Rig(16)
    vq, dev = rig.vq, rig.dev
    owned: list[Chain] = []
    tokens: dict[int, tuple[int, int]] = {}  # token -> (readable, writable) counts
    expected_done: list[tuple[int, int]] = []
    for step in range(4000):
        nr, nw = rng.randint(0, 3), rng.randint(0, 3)
        if nr + nw == 0:
            nw = 1
        try:
            rig.add_simple(step, n_read=nr, n_write=nw)
            tokens[step] = (nr, nw)
        except QueueFull:
            assert vq.num_free < nr + nw
        if rng.random() < 0.5:
            vq.publish()
            owned += dev.pop_all()  # raises DriverBug if a descriptor is handed out twice
        rng.shuffle(owned)
        k = rng.randint(0, len(owned))
        done, owned = owned[:k], owned[k:]
        for c in done:
            n = rng.randint(0, c.writable_len)
            dev.complete(c, bytes(n))
        for token, n in vq.get_used():
            assert tokens.pop(token)[1] * 32 >= n
            expected_done.append((token, n))
        assert vq.in_flight == len(tokens)
        assert vq.num_free == vq.size - sum(nr + nw for nr, nw in tokens.values())
    vq.publish()
    owned += dev.pop_all()
    for c in owned:
        dev.complete(c)
    for token, _ in vq.get_used():
        del tokens[token]
    assert tokens == {}
    assert len(expected_done) > 1000
    rig.fill_check()


def test_queue_full_then_success_after_completions() -> None:
    rig = Rig(4)
    vq = rig.vq
    rig.add_simple("a", 1, 1)  # 2 descriptors
    rig.add_simple("b", 1, 0)  # 1
    assert vq.num_free == 1
    before = (vq.num_free, vq.avail_idx, vq.in_flight)
    with pytest.raises(QueueFull):
        rig.add_simple("c", 1, 1)
    assert (vq.num_free, vq.avail_idx, vq.in_flight) == before
    rig.add_simple("d", 0, 1)  # the last one still fits
    with pytest.raises(QueueFull):
        rig.add_simple("e", 1, 0)
    chains = rig.roundtrip()
    assert len(chains) == 3  # the refused chains never reached the ring
    rig.dev.complete(chains[0])
    assert vq.get_used() == [("a", 0)]
    rig.add_simple("c", 1, 1)
    more = rig.roundtrip()
    assert len(more) == 1
    for c in chains[1:] + more:
        rig.dev.complete(c)
    assert [t for t, _ in vq.get_used()] == ["b", "d", "c"]
    rig.fill_check()


# -- available buffer notifications (driver -> device) ----------------------------------------
def test_no_notify_flag_suppresses_kicks_without_event_idx() -> None:
    rig = Rig(8)
    rig.add_simple(1)
    assert rig.vq.publish() is True
    rig.dev.set_no_notify(True)
    rig.add_simple(2)
    assert rig.vq.publish() is False
    rig.dev.set_no_notify(False)
    rig.add_simple(3)
    assert rig.vq.publish() is True
    assert rig.dev.pending() == 3


def test_event_idx_publish_kicks_exactly_when_need_event_says_so() -> None:
    rng = random.Random(99)
    rig = Rig(8, event_idx=True)
    rig.dev.auto_event = False
    vq, dev = rig.vq, rig.dev
    old = 0
    kicks = skips = 0
    for step in range(3000):
        n = rng.randint(1, 3)
        for i in range(n):
            rig.add_simple((step, i), 1, 0)
        new = (old + n) & 0xFFFF
        event = (old + rng.randint(-3, 5)) & 0xFFFF
        dev.set_avail_event(event)
        if rng.random() < 0.3:
            dev.set_no_notify(True)  # must be ignored with EVENT_IDX
        expected = vring_need_event(event, new, old)
        assert vq.publish() is expected, (event, new, old)
        kicks += expected
        skips += not expected
        dev.set_no_notify(False)
        for c in dev.pop_all():
            dev.complete(c)
        vq.get_used()
        old = new
    assert kicks > 300 and skips > 300


def test_event_idx_device_asking_for_the_next_buffer_gets_one_kick() -> None:
    rig = Rig(8, event_idx=True)
    rig.add_simple(0, 1, 0)
    assert rig.vq.publish() is True  # avail_event 0: wants a kick for entry 0
    rig.dev.pop_all()  # device sets avail_event = 1
    assert rig.dev.avail_event == 1
    rig.add_simple(1, 1, 0)
    rig.add_simple(2, 1, 0)
    assert rig.vq.publish() is True  # crossed 1
    # device has not consumed them: avail_event still 1, no kick for more
    rig.add_simple(3, 1, 0)
    assert rig.vq.publish() is False
    rig.dev.pop_all()
    rig.add_simple(4, 1, 0)
    assert rig.vq.publish() is True


# -- used buffer notifications (device -> driver) ------------------------------------------------
def test_no_interrupt_flag_without_event_idx() -> None:
    rig = Rig(8)
    vq, dev = rig.vq, rig.dev
    rig.add_simple(0)
    rig.add_simple(1)
    c0, c1 = rig.roundtrip()
    dev.complete(c0)
    assert dev.should_interrupt() is True
    vq.get_used()
    vq.disable_interrupts()
    assert dev.avail_flags & rl.VRING_AVAIL_F_NO_INTERRUPT
    dev.complete(c1)
    assert dev.should_interrupt() is False
    assert vq.enable_interrupts() is True  # c1 arrived meanwhile: caller must harvest
    assert dev.avail_flags == 0
    assert vq.get_used() == [(1, 0)]
    assert vq.enable_interrupts() is False


def test_event_idx_used_event_follows_get_used() -> None:
    rig = Rig(8, event_idx=True)
    vq, dev = rig.vq, rig.dev
    for i in range(4):
        rig.add_simple(i)
    chains = rig.roundtrip()
    assert dev.used_event == 0
    dev.complete(chains[0])
    dev.complete(chains[1])
    assert dev.should_interrupt() is True  # crossed used_event 0
    assert [t for t, _ in vq.get_used()] == [0, 1]
    assert dev.used_event == 2  # interrupt me for the next one
    dev.complete(chains[2])
    assert dev.should_interrupt() is True
    # the driver has not harvested: used_event still 2, so no second interrupt
    dev.complete(chains[3])
    assert dev.should_interrupt() is False
    assert [t for t, _ in vq.get_used()] == [2, 3]
    assert dev.used_event == 4
    assert dev.avail_flags == 0  # EVENT_IDX: the flag is not used


def test_event_idx_disable_and_enable_interrupts() -> None:
    rig = Rig(8, event_idx=True)
    vq, dev = rig.vq, rig.dev
    for i in range(3):
        rig.add_simple(i)
    chains = rig.roundtrip()
    dev.complete(chains[0])
    assert dev.should_interrupt() is True
    vq.disable_interrupts()
    assert vq.get_used() == [(0, 0)]
    assert dev.used_event == 0  # not advanced while disabled
    dev.complete(chains[1])
    assert dev.should_interrupt() is False  # idx 1 -> 2 does not cross used_event 0
    assert vq.enable_interrupts() is True  # one waiting
    assert dev.used_event == 1
    assert vq.get_used() == [(1, 0)]
    assert vq.enable_interrupts() is False
    assert dev.used_event == 2
    dev.complete(chains[2])
    assert dev.should_interrupt() is True


# -- malformed used entries ------------------------------------------------------------------------
def _rig_with_inflight(size: int = 8) -> tuple[Rig, list[Chain]]:
    rig = Rig(size)
    rig.add_simple("a", 1, 2)
    rig.add_simple("b", 2, 1)
    return rig, rig.roundtrip()


def _repair_and_finish(rig: Rig, chains: list[Chain], n_bad: int = 1) -> None:
    """Device takes back its bad entries, then completes properly: the driver must
    deliver every token exactly once and end with an intact free list."""
    rig.dev.retract(n_bad)
    for c in chains:
        rig.dev.complete(c, b"ok")
    assert sorted(rig.vq.get_used()) == sorted((t, 2) for t in ("a", "b"))
    rig.fill_check()


def test_used_id_out_of_range() -> None:
    rig, chains = _rig_with_inflight()
    before = rig.state()
    rig.dev.push_used(8, 0)
    with pytest.raises(RingError, match="used id 8 out of range"):
        rig.vq.get_used()
    assert rig.state() == before
    rig.dev.retract()
    rig.dev.push_used(0xFFFFFFFF, 0)
    with pytest.raises(RingError, match="out of range"):
        rig.vq.get_used()
    assert rig.state() == before
    _repair_and_finish(rig, chains)


def test_used_id_not_in_flight() -> None:
    rig, chains = _rig_with_inflight()
    a, b = chains
    # a descriptor inside chain a, but not its head
    rig.dev.push_used(a.ring_descs[1], 0)
    before = rig.state()
    with pytest.raises(RingError, match=f"used id {a.ring_descs[1]} is not in flight"):
        rig.vq.get_used()
    assert rig.state() == before
    rig.dev.retract()
    # a free descriptor
    free_id = next(i for i in range(8) if i not in a.ring_descs + b.ring_descs)
    rig.dev.push_used(free_id, 0)
    with pytest.raises(RingError, match="not in flight"):
        rig.vq.get_used()
    assert rig.state() == before
    _repair_and_finish(rig, chains)


def test_used_id_completed_twice() -> None:
    rig, (a, b) = _rig_with_inflight()
    rig.dev.complete(a, b"ok")
    assert rig.vq.get_used() == [("a", 2)]
    before = rig.state()
    rig.dev.push_used(a.head, 2)  # the same chain again
    with pytest.raises(RingError, match=f"used id {a.head} is not in flight"):
        rig.vq.get_used()
    assert rig.state() == before
    rig.dev.retract()
    rig.dev.complete(b, b"ok")
    assert rig.vq.get_used() == [("b", 2)]
    rig.fill_check()


def test_used_length_larger_than_the_writable_part() -> None:
    rig, chains = _rig_with_inflight()
    a, b = chains  # a: 2 x 32 writable bytes, b: 1 x 32
    before = rig.state()
    rig.dev.push_used(a.head, 65)
    with pytest.raises(RingError, match="used length 65 exceeds the 64 device-writable bytes"):
        rig.vq.get_used()
    assert rig.state() == before
    rig.dev.retract()
    rig.dev.push_used(b.head, 0x80000000)
    with pytest.raises(RingError, match="exceeds"):
        rig.vq.get_used()
    assert rig.state() == before
    # exactly the writable size is fine
    rig.dev.retract()
    rig.dev.complete(a, b"x" * 64)
    assert rig.vq.get_used() == [("a", 64)]
    rig.dev.complete(b, b"ok")
    assert rig.vq.get_used() == [("b", 2)]
    rig.fill_check()


def test_used_length_on_a_chain_without_writable_buffers() -> None:
    rig = Rig(4)
    rig.vq.add([rig.seg(0, 64)], [], "ro")
    (c,) = rig.roundtrip()
    rig.dev.push_used(c.head, 1)
    with pytest.raises(RingError, match="exceeds the 0 device-writable"):
        rig.vq.get_used()
    assert rig.vq.in_flight == 1
    rig.dev.retract()
    rig.dev.complete(c)
    assert rig.vq.get_used() == [("ro", 0)]


@pytest.mark.parametrize("jump", [6, 9, 0x8000, 0xFFFE])
def test_used_idx_running_ahead_of_what_is_in_flight(jump: int) -> None:
    rig, chains = _rig_with_inflight()  # 2 chains, 6 descriptors in flight
    before = rig.state()
    rig.dev.jump_used_idx(jump + 1)
    with pytest.raises(RingError, match="ahead"):
        rig.vq.get_used()
    assert rig.state() == before
    _repair_and_finish(rig, chains, n_bad=jump + 1)


def test_used_idx_ahead_of_the_chains_in_flight_completes_nothing() -> None:
    rig = Rig(8)
    rig.add_simple("a", 2, 1)  # one chain, three descriptors, head 0
    (a,) = rig.roundtrip()
    before = rig.state()
    rig.dev.jump_used_idx(2)  # two "used" entries for one chain, none written (zeroes)
    with pytest.raises(RingError):
        rig.vq.get_used()
    assert rig.state() == before  # chain a must still be in flight
    rig.dev.retract(2)
    rig.dev.complete(a, b"ok")
    assert rig.vq.get_used() == [("a", 2)]


def test_bad_entry_after_good_ones_in_one_batch_loses_no_completion() -> None:
    rig, (a, b) = _rig_with_inflight()
    rig.dev.complete(a, b"ok")
    rig.dev.push_used(b.head, 1000)  # too long
    with pytest.raises(RingError, match="exceeds"):
        rig.vq.get_used()
    assert rig.vq.in_flight == 2  # nothing consumed: the batch is refused as a whole
    rig.dev.retract()
    rig.dev.complete(b, b"ok")
    assert sorted(rig.vq.get_used()) == [("a", 2), ("b", 2)]
    rig.fill_check()


# -- the fake device's own checks (so the tests above can fail) ---------------------------------
def test_fake_device_catches_a_descriptor_handed_out_twice() -> None:
    rig = Rig(4)
    head = rig.add_simple("a", 1, 0)
    rig.roundtrip()
    # a broken driver publishing the same head again while the device owns it
    avail = rig.dev.avail_off
    slot = avail + 4 + 2 * (rig.dev.last_avail % 4)
    rig.arena.view[slot : slot + 2] = head.to_bytes(2, "little")
    rig.arena.view[avail + 2 : avail + 4] = (rig.dev.last_avail + 1).to_bytes(2, "little")
    with pytest.raises(DriverBug, match="reuses descriptors"):
        rig.dev.pop_all()


def test_fake_device_catches_readable_after_writable() -> None:
    rig = Rig(4)
    head = rig.vq.add([], [rig.seg(0, 8), rig.seg(8, 8)], "w")
    second = rig.dev.desc(head)[3]
    addr, length, flags, nxt = rig.dev.desc(second)
    rl.DESC.pack_into(rig.arena.view, rig.dev.desc_off + 16 * second, addr, length,
                      flags & ~rl.VRING_DESC_F_WRITE, nxt)
    rig.vq.publish()
    with pytest.raises(DriverBug, match="readable descriptor after a writable"):
        rig.dev.pop_all()
