"""The driver side of a packed virtqueue (native/packed.c through Virtqueue) against an
in-process device that reads and writes the same memory: chains (direct, crossing
the end of the ring, indirect), wraparound of both wrap counters, notification
suppression in both directions (with and without EVENT_IDX), and validation of used
entries (ids, lengths, flags flipped wrongly, entries when nothing is in flight)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from vfsdrv.errors import DeviceError, RingError
from vfsdrv.virtio.constants import Feature
from vfsdrv.virtio.device import VirtioDevice
from vfsdrv.virtio.virtqueue import QueueFull, Virtqueue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakes.packed_device import (  # noqa: E402
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    F_AVAIL,
    F_INDIRECT,
    F_NEXT,
    F_USED,
    F_WRITE,
    Chain,
    DriverBug,
    PackedDevice,
    vring_need_event,
)
from fakes.rig import QueueRig  # noqa: E402
from fakes.transport import DEFAULT_FEATURES, FakeTransport, identity_arena  # noqa: E402


class Rig(QueueRig):
    """A packed virtqueue, the device on the other end and a data buffer."""

    dev: PackedDevice

    def __init__(self, size: int, *, event_idx: bool = False, indirect: bool = False) -> None:
        super().__init__(5, size, PackedDevice, packed=True, event_idx=event_idx,
                         indirect=indirect)

    def state(self) -> tuple[int, int, int, int]:
        c = self.vq.native
        return (self.vq.num_free, self.vq.in_flight, c.next_used, c.used_wrap)


# -- chains ----------------------------------------------------------------------------------
def test_ring_parts_have_the_packed_sizes() -> None:
    arena = identity_arena(1 << 20)
    vq = Virtqueue(0, 100, arena, packed=True)  # any size, not only powers of two
    a = vq.addresses
    assert a.desc % 16 == 0 and a.avail % 4 == 0 and a.used % 4 == 0
    assert vq.desc.size >= 1600 and vq.avail.size >= 4 and vq.used.size >= 4
    assert vq.native.avail_wrap == 1 and vq.native.used_wrap == 1
    vq.close()
    with pytest.raises(RingError):
        Virtqueue(0, 0, arena, packed=True)
    with pytest.raises(RingError):
        Virtqueue(0, 32769, arena, packed=True)


def test_roundtrip_carries_data_both_ways() -> None:
    rig = Rig(8)
    rig.data.view[0:5] = b"hello"
    buf_id = rig.vq.add([rig.seg(0, 5)], [rig.seg(512, 64)], "tok")
    # the head's flags are the publish point: set at add(), in this lap's colours
    assert rig.dev.entry(0)[3] == F_AVAIL | F_NEXT and rig.dev.entry(0)[2] == buf_id
    assert rig.vq.publish() is True  # the device's area is zero: ENABLE
    [chain] = rig.dev.pop_all()
    assert rig.dev.read(chain) == b"hello" and chain.writable_len == 64
    rig.dev.complete(chain, b"world!")
    assert rig.vq.has_used()
    assert rig.vq.get_used() == [("tok", 6)]
    assert bytes(rig.data.view[512:518]) == b"world!"
    assert rig.state() == (8, 0, 2, 1)  # the chain took entries 0 and 1


def test_chain_takes_consecutive_entries_with_the_id_in_each() -> None:
    rig = Rig(8)
    buf_id = rig.add_simple("t", n_read=2, n_write=3)
    rig.vq.publish()
    flags = [rig.dev.entry(i)[3] for i in range(5)]
    assert [f & F_NEXT for f in flags] == [F_NEXT] * 4 + [0]
    assert [bool(f & F_WRITE) for f in flags] == [False, False, True, True, True]
    assert all(f & (F_AVAIL | F_USED) == F_AVAIL for f in flags)
    assert {rig.dev.entry(i)[2] for i in range(5)} == {buf_id}
    [chain] = rig.dev.pop_all()
    assert chain.entries == 5 and len(chain.readable) == 2 and len(chain.writable) == 3
    assert rig.vq.num_free == 3
    rig.dev.complete(chain, b"x" * 40)
    assert rig.vq.get_used() == [("t", 40)]
    assert rig.vq.num_free == 8 and rig.vq.native.next_used == 5


def test_indirect_chain_takes_one_entry_with_write_the_only_table_flag() -> None:
    rig = Rig(8, indirect=True)
    rig.add_simple("ind", n_read=3, n_write=4)
    rig.vq.publish()
    addr, length, _id, flags = rig.dev.entry(0)
    assert flags & F_INDIRECT and not flags & F_NEXT and length == 7 * 16
    [chain] = rig.dev.pop_all()  # the device refuses NEXT/INDIRECT inside the table
    assert chain.indirect and chain.entries == 1
    assert len(chain.readable) == 3 and len(chain.writable) == 4
    assert rig.vq.num_free == 7
    # an 8-entry ring holds eight 7-segment chains
    for i in range(7):
        rig.add_simple(i, n_read=3, n_write=4)
    with pytest.raises(QueueFull):
        rig.add_simple("full")
    chains = [chain, *rig.roundtrip()]
    for c in reversed(chains):
        rig.dev.complete(c, b"z")
    assert sorted(str(t) for t, _ in rig.vq.get_used()) == [*"0123456", "ind"]


def test_single_segment_chain_is_direct_even_with_indirect() -> None:
    rig = Rig(4, indirect=True)
    rig.vq.add([rig.seg(0, 8)], [], "one")
    rig.vq.publish()
    assert not rig.dev.entry(0)[3] & F_INDIRECT


def test_chain_crossing_the_end_of_the_ring_flips_the_counter_midway() -> None:
    rig = Rig(4)
    for _ in range(3):  # move both positions to 3
        rig.add_simple("pad", n_read=1, n_write=0)
        [c] = rig.roundtrip()
        rig.dev.complete(c)
        rig.vq.get_used()
    rig.add_simple("cross", n_read=1, n_write=2)  # entries 3, 0, 1
    rig.vq.publish()
    flags = [rig.dev.entry(p)[3] for p in (3, 0, 1)]
    assert [f & (F_AVAIL | F_USED) for f in flags] == [F_AVAIL, F_USED, F_USED]
    assert rig.vq.native.avail_wrap == 0
    [c] = rig.dev.pop_all()
    assert c.entries == 3
    rig.dev.complete(c, b"ab")
    assert rig.vq.get_used() == [("cross", 2)]
    assert rig.state() == (4, 0, 2, 0)


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_both_wrap_counters_survive_many_laps_out_of_order(event_idx: bool,
                                                           indirect: bool) -> None:
    """Random chain lengths and completion order over a 7-entry ring (not a power of
    two), for thousands of buffers: every completion arrives once, with its length."""
    rng = random.Random(12)
    rig = Rig(7, event_idx=event_idx, indirect=indirect)
    live: list[Chain] = []
    added: set[int] = set()
    lengths: dict[int, int] = {}  # token -> length the device wrote
    flips = {"avail": 0, "used": 0}
    last = (1, 1)
    done = 0
    for n in range(4000):
        if rng.random() < 0.6:
            try:
                rig.add_simple(n, n_read=rng.randint(0, 2), n_write=rng.randint(1, 2))
            except QueueFull:
                pass
            else:
                added.add(n)
        if rng.random() < 0.3:
            live += rig.roundtrip()
        if live and rng.random() < 0.5:
            c = live.pop(rng.randrange(len(live)))
            length = rng.randint(0, c.writable_len)
            lengths[rig.vq._tokens[c.id]] = length
            rig.dev.complete(c, bytes(length))
        for token, got in rig.vq.get_used():
            assert got == lengths.pop(token)
            added.remove(token)
            done += 1
        cur = (rig.vq.native.avail_wrap, rig.vq.native.used_wrap)
        flips["avail"] += cur[0] != last[0]
        flips["used"] += cur[1] != last[1]
        last = cur
    assert done > 1000 and flips["avail"] > 100 and flips["used"] > 100
    live += rig.roundtrip()
    for c in live:
        lengths[rig.vq._tokens[c.id]] = 0
        rig.dev.complete(c)
    for token, got in rig.vq.get_used():
        assert got == lengths.pop(token)
        added.remove(token)
    assert not added and not lengths
    assert rig.vq.in_flight == 0 and rig.vq.num_free == 7


def test_queue_full_then_every_id_again() -> None:
    rig = Rig(5)
    ids = {rig.vq.add([rig.seg(0, 8)], [], i) for i in range(5)}
    assert ids == set(range(5))
    with pytest.raises(QueueFull):
        rig.vq.add([rig.seg(0, 8)], [], "x")
    with pytest.raises(ValueError):
        rig.vq.add([], [rig.seg(0, 8), rig.seg(8, 8)] * 3, "too long")
    chains = rig.roundtrip()
    for c in chains[::-1]:
        rig.dev.complete(c)
    assert sorted(t for t, _ in rig.vq.get_used()) == list(range(5))
    assert {rig.vq.add([rig.seg(0, 8)], [], i) for i in range(5)} == set(range(5))


def test_bad_chains_are_refused_without_touching_the_queue() -> None:
    rig = Rig(4)
    before = rig.state()
    with pytest.raises(ValueError):
        rig.vq.add([], [], "empty")
    with pytest.raises(ValueError):
        rig.vq.add([rig.seg(0, 8)] * 5, [], "longer than the ring")
    assert rig.state() == before and rig.dev.entry(0)[3] == 0


# -- notification suppression -----------------------------------------------------------------
def test_device_event_flags_without_event_idx() -> None:
    rig = Rig(8)
    rig.dev.set_device_event(EVENT_DISABLE)
    rig.add_simple(1)
    assert rig.vq.publish() is False
    assert rig.vq.publish() is False  # nothing new
    rig.dev.set_device_event(EVENT_ENABLE)
    rig.add_simple(2)
    assert rig.vq.publish() is True
    # DESC is only meaningful with EVENT_IDX: without it the driver notifies
    rig.dev.set_device_event(EVENT_DESC, 0x7FFF)
    rig.add_simple(3)
    assert rig.vq.publish() is True


def test_event_idx_kick_exactly_when_the_offset_is_crossed() -> None:
    """Random batches over many laps: publish() says kick iff the device's event
    offset (with its wrap counter) lies in the entries just made available."""
    rng = random.Random(5)
    rig = Rig(8, event_idx=True)
    rig.dev.auto_event = False
    for _ in range(600):
        old_pos = rig.vq.native.next_avail
        batch = rng.randint(1, 3)
        wrap_before = rig.vq.native.avail_wrap
        for i in range(batch):
            rig.add_simple(i, n_read=1, n_write=0)
        new_pos = rig.vq.native.next_avail
        # an offset anywhere in this or the previous lap
        target = rng.randrange(8)
        wrap = rng.choice([wrap_before, wrap_before ^ 1, rig.vq.native.avail_wrap])
        rig.dev.set_device_event(EVENT_DESC, target | wrap << 15)
        event = target if wrap == rig.vq.native.avail_wrap else target - 8
        want = vring_need_event(event & 0xFFFF, new_pos, (new_pos - batch) & 0xFFFF)
        assert rig.vq.publish() is want, (old_pos, new_pos, target, wrap)
        for c in rig.dev.pop_all():
            rig.dev.complete(c)
        rig.vq.get_used()


def test_event_idx_device_asking_for_the_next_entry_gets_one_kick() -> None:
    rig = Rig(8, event_idx=True)
    rig.dev.set_device_event(EVENT_DESC, 0 | 1 << 15)  # the first entry, please
    kicks = 0
    for n in range(50):
        rig.add_simple(n)
        kicks += rig.vq.publish()
        rig.add_simple(n)
        kicks += rig.vq.publish()  # the device has not looked yet: no second kick
        for c in rig.dev.pop_all():  # sets off_wrap to its next position
            rig.dev.complete(c)
        rig.vq.get_used()
    assert kicks == 50


def test_driver_event_area_without_event_idx() -> None:
    rig = Rig(8)
    assert rig.dev.driver_event[1] == EVENT_ENABLE
    rig.vq.disable_interrupts()
    assert rig.dev.driver_event[1] == EVENT_DISABLE and not rig.vq.interrupts_enabled
    rig.add_simple("a")
    [c] = rig.roundtrip()
    rig.dev.complete(c)
    assert rig.dev.should_interrupt() is False
    assert rig.vq.enable_interrupts() is True  # used while disabled: harvest now
    assert rig.dev.driver_event[1] == EVENT_ENABLE
    assert rig.vq.get_used() == [("a", 0)]
    assert rig.vq.enable_interrupts() is False
    rig.add_simple("b")
    [c] = rig.roundtrip()
    rig.dev.complete(c)
    assert rig.dev.should_interrupt() is True


def test_event_idx_off_wrap_follows_harvest_and_rearm() -> None:
    rig = Rig(4, event_idx=True)
    assert rig.vq.enable_interrupts() is False
    assert rig.dev.driver_event == (0 | 1 << 15, EVENT_DESC)
    fired = 0
    for n in range(10):  # 2.5 laps of 2-entry chains
        rig.add_simple(n, n_read=1, n_write=1)
        [c] = rig.roundtrip()
        rig.dev.complete(c, b"q")
        fired += rig.dev.should_interrupt()
        assert rig.vq.get_used() == [(n, 1)]
        pos, wrap = rig.vq.native.next_used, rig.vq.native.used_wrap
        assert rig.dev.driver_event == (pos | wrap << 15, EVENT_DESC)
    assert fired == 10
    rig.vq.disable_interrupts()
    assert rig.dev.driver_event[1] == EVENT_DISABLE
    for n in range(2):
        rig.add_simple(n)
    for c in rig.roundtrip():
        rig.dev.complete(c)
    assert rig.dev.should_interrupt() is False
    # harvest while disabled leaves off_wrap alone; re-arm points it at next_used
    assert rig.vq.enable_interrupts() is True
    assert len(rig.vq.get_used()) == 2
    pos, wrap = rig.vq.native.next_used, rig.vq.native.used_wrap
    assert rig.dev.driver_event == (pos | wrap << 15, EVENT_DESC)


def test_event_idx_device_skips_interrupts_before_the_offset() -> None:
    rig = Rig(8, event_idx=True)
    rig.vq.enable_interrupts()
    for n in range(3):
        rig.add_simple(n)
    chains = rig.roundtrip()
    rig.dev.complete(chains[0])
    assert rig.dev.should_interrupt() is True  # off_wrap was 0: crossed
    # no harvest yet: off_wrap stays 0, further completions do not interrupt
    rig.dev.complete(chains[1])
    assert rig.dev.should_interrupt() is False
    assert len(rig.vq.get_used()) == 2  # off_wrap now 2
    rig.dev.complete(chains[2])
    assert rig.dev.should_interrupt() is True


# -- what the device hands back is validated ----------------------------------------------------
def _inflight(size: int = 16, n: int = 3) -> tuple[Rig, list[Chain]]:
    rig = Rig(size)
    for i in range(n):
        rig.add_simple(i, n_read=1, n_write=2)
    return rig, rig.roundtrip()


def _finish(rig: Rig, chains: list[Chain]) -> None:
    """The device behaves again: everything completes exactly once."""
    for c in chains:
        rig.dev.complete(c, b"ok")
    got = rig.vq.get_used()
    assert sorted(t for t, _ in got) == sorted(range(len(chains)))
    assert rig.vq.num_free == rig.vq.size and rig.vq.in_flight == 0


def _refused(rig: Rig, match: str) -> None:
    before = rig.state()
    with pytest.raises(RingError, match=match):
        rig.vq.get_used()
    assert rig.state() == before
    assert "(packed)" in str(pytest.raises(RingError, rig.vq.get_used).value)


def test_used_id_out_of_range() -> None:
    rig, chains = _inflight()
    rig.dev.push_used(16, 0, skip=3)
    _refused(rig, "used id 16 out of range")
    rig.dev.rewind(3, rig.dev.entry(0)[3] & ~F_USED)
    _finish(rig, chains)


def test_used_id_not_in_flight() -> None:
    rig, chains = _inflight()
    rig.dev.push_used(5, 0, skip=3)
    _refused(rig, "used id 5 at entry 0 is not in flight")
    rig.dev.rewind(3, F_AVAIL | F_NEXT)
    _finish(rig, chains)


def test_used_id_twice_in_one_batch() -> None:
    rig, chains = _inflight()
    c0 = chains[0]
    rig.dev.push_used(c0.id, 0, skip=3)
    rig.dev.push_used(c0.id, 0, skip=3)
    _refused(rig, f"used id {c0.id} at entry 3 is not in flight")
    rig.dev.rewind(3, F_AVAIL | F_NEXT)
    rig.dev.rewind(3, F_AVAIL | F_NEXT)
    _finish(rig, chains)


def test_used_length_beyond_the_writable_part() -> None:
    rig, chains = _inflight()
    c0 = rig.dev.outstanding.pop(chains[0].id)
    rig.dev.push_used(c0.id, 65, skip=3)
    _refused(rig, "used length 65 exceeds the 64 device-writable bytes")
    rig.dev.rewind(3, F_AVAIL | F_NEXT)
    rig.dev.outstanding[c0.id] = c0
    _finish(rig, chains)


def test_flags_flipped_the_wrong_way() -> None:
    rig, chains = _inflight()
    # AVAIL = !wrap, USED = wrap: neither available nor used in this lap
    rig.dev.push_used(chains[0].id, 0, skip=3, flags=F_USED)
    _refused(rig, "flipped them wrongly")
    rig.dev.rewind(3, F_AVAIL | F_NEXT)
    _finish(rig, chains)


def test_used_with_the_wrong_wrap_counter() -> None:
    rig, chains = _inflight()
    rig.dev.push_used(chains[0].id, 0, skip=3, flags=0)  # both clear: last lap's colours
    _refused(rig, "neither available nor used in wrap 1")
    rig.dev.rewind(3, F_AVAIL | F_NEXT)
    _finish(rig, chains)


def test_used_entry_with_nothing_in_flight() -> None:
    rig = Rig(8)
    rig.dev.write_entry(0, 0, 0, 0, F_AVAIL | F_USED)
    assert rig.vq.has_used()  # for get_used() to report
    _refused(rig, "nothing is in flight")
    rig.dev.write_entry(0, 0, 0, 0, 0)
    assert rig.vq.get_used() == [] and not rig.vq.has_used()
    rig.add_simple(0, n_read=1, n_write=2)
    _finish(rig, rig.roundtrip())


def test_device_that_never_sets_the_used_flag_completes_nothing() -> None:
    """id and len written, flags left as the driver wrote them: not used. The queue
    stays as it was (the request's deadline is the caller's) and works on."""
    rig, chains = _inflight()
    addr = rig.dev.entry(0)[0]
    rig.dev.write_entry(0, addr, 2, chains[0].id, rig.dev.entry(0)[3])
    before = rig.state()
    assert not rig.vq.has_used() and rig.vq.get_used() == []
    assert rig.vq.enable_interrupts() is False
    assert rig.state() == before
    _finish(rig, chains)


def test_bad_entry_after_good_ones_loses_no_completion() -> None:
    rig, chains = _inflight()
    rig.dev.complete(chains[0], b"ok")
    rig.dev.push_used(99, 0, skip=3)
    _refused(rig, "used id 99")
    rig.dev.rewind(3, F_AVAIL | F_NEXT)
    rig.dev.complete(chains[1], b"ok")
    rig.dev.complete(chains[2], b"ok")
    assert sorted(t for t, _ in rig.vq.get_used()) == [0, 1, 2]


def test_fake_device_catches_an_id_handed_out_twice() -> None:
    rig = Rig(4)
    rig.add_simple(0)
    rig.roundtrip()
    # forge a second available entry carrying the same id
    _a, _l, id_, _f = rig.dev.entry(0)
    rig.dev.write_entry(rig.dev.avail_pos, rig.data.addr, 8, id_, F_AVAIL)
    with pytest.raises(DriverBug, match="reused"):
        rig.dev.pop_all()


# -- negotiation -----------------------------------------------------------------------------
@pytest.mark.parametrize(("offered", "ring", "packed"), [
    (True, None, True), (True, "split", False), (True, "packed", True), (False, None, False),
])
def test_packed_is_preferred_when_offered(offered: bool, ring: str | None, packed: bool) -> None:
    feats = DEFAULT_FEATURES | (Feature.RING_PACKED if offered else 0)
    t = FakeTransport(features=feats, queue_max={0: 100})
    dev = VirtioDevice(t, ring=ring)
    accepted = dev.negotiate()
    assert bool(accepted & Feature.RING_PACKED) is packed
    assert not accepted & Feature.IN_ORDER
    vq = dev.setup_queue(0, 256)
    assert vq.packed is packed
    assert vq.size == (100 if packed else 64)  # packed sizes need not be powers of two
    dev.close()


def test_packed_forced_on_a_device_without_it_fails_clearly() -> None:
    t = FakeTransport(features=DEFAULT_FEATURES)
    with pytest.raises(DeviceError, match="does not offer VIRTIO_F_RING_PACKED"):
        VirtioDevice(t, ring="packed").negotiate()
    with pytest.raises(ValueError):
        VirtioDevice(t, ring="spiral")


def test_used_idx_follows_the_device_not_the_harvest() -> None:
    """used_idx() (what check's reset.live watches) moves when the device writes used
    entries, before anything is harvested, and names position and wrap counter."""
    rig = Rig(4)
    assert rig.vq.used_idx() == 0 | 1 << 15
    for n in range(2):
        rig.add_simple(n, n_read=1, n_write=1)
    chains = rig.roundtrip()
    before = rig.vq.used_idx()
    rig.dev.complete(chains[0])
    assert rig.vq.used_idx() == 2 | 1 << 15 != before
    rig.dev.complete(chains[1])
    assert rig.vq.used_idx() == 0 | 0 << 15  # past the end: wrap counter flipped
    rig.vq.get_used()
    assert rig.vq.used_idx() == 0 and rig.vq.native.used_wrap == 0


def test_init_zeroes_a_ring_that_held_an_earlier_queue() -> None:
    """Last lap's flags of an earlier queue on the same memory must not look used."""
    from vfsdrv._native import ffi, lib

    ring = ffi.new("uint8_t[]", 16 * 8)
    ffi.memmove(ring, b"\xff" * 16 * 8, 16 * 8)
    driver_area, device_area = ffi.new("uint8_t[]", 4), ffi.new("uint8_t[]", 4)
    vq = ffi.new("struct vfsdrv_vq *")
    assert lib.vfsdrv_vq_init_packed(vq, 0, 8, ring, driver_area, device_area, ffi.NULL, 0, 0,
                                     0) == 0
    try:
        assert bytes(ffi.buffer(ring)) == bytes(16 * 8)
        out = ffi.new("struct vfsdrv_used[]", 8)
        assert lib.vfsdrv_vq_harvest(vq, out, 8) == 0
        assert lib.vfsdrv_vq_used_pending(vq) == 0
    finally:
        lib.vfsdrv_vq_destroy(vq)


# -- VIRTIO_F_IN_ORDER: one used entry for a batch ------------------------------------------------
def _in_order_rig(size: int = 16, **kw: bool) -> Rig:
    rig = Rig(size, **kw)
    rig.vq.close()
    rig.vq = Virtqueue(5, size, rig.arena, packed=True, in_order=True, **kw)
    rig.dev = PackedDevice(rig.arena.view, size, rig.vq.addresses, **kw)
    assert rig.vq.native.in_order == 1
    return rig


def test_in_order_batch_completes_every_older_buffer() -> None:
    rig = _in_order_rig()
    for n, (r, w) in enumerate([(1, 1), (2, 2), (0, 1), (1, 0), (1, 2)]):
        rig.add_simple(n, n_read=r, n_write=w)
    chains = rig.roundtrip()
    rig.dev.complete_batch(chains[:3], b"last")
    # the first two count as used completely; the entry's len is the third's
    assert rig.vq.get_used() == [(0, 32), (1, 64), (2, 4)]
    assert rig.vq.native.next_used == 2 + 4 + 1
    assert rig.vq.in_flight == 2
    rig.dev.complete(chains[3])  # a batch of one
    rig.dev.complete_batch([chains[4]], b"x")
    assert rig.vq.get_used() == [(3, 0), (4, 1)]
    assert rig.state() == (16, 0, 11, 1)  # 2 + 4 + 1 + 1 + 3 entries


@pytest.mark.parametrize("indirect", [False, True])
def test_in_order_batches_over_many_laps(indirect: bool) -> None:
    rng = random.Random(3)
    rig = _in_order_rig(11, indirect=indirect)
    live: list[Chain] = []
    expect: list[tuple[int, int]] = []
    got: list[tuple[int, int]] = []
    for n in range(3000):
        try:
            rig.add_simple(n, n_read=rng.randint(0, 2), n_write=rng.randint(1, 2))
        except QueueFull:
            pass
        live += rig.roundtrip()
        if live and rng.random() < 0.4:
            k = rng.randint(1, len(live))
            batch, live = live[:k], live[k:]
            tokens = [rig.vq._tokens[c.id] for c in batch]
            last = rng.randint(0, batch[-1].writable_len)
            expect += [(t, c.writable_len) for t, c in zip(tokens[:-1], batch[:-1], strict=True)]
            expect.append((tokens[-1], last))
            rig.dev.complete_batch(batch, bytes(last))
        got += rig.vq.get_used()
    assert got == expect and len(got) > 1000
    assert rig.vq.native.order_head == (len(got) % 11)


def test_in_order_used_id_not_in_flight_is_refused() -> None:
    rig = _in_order_rig()
    for n in range(3):
        rig.add_simple(n)
    chains = rig.roundtrip()
    rig.dev.push_used(9, 0, skip=2)
    _refused(rig, "used id 9 at entry 0 is not in flight")
    rig.dev.rewind(2, F_AVAIL | F_NEXT)
    rig.dev.complete_batch(chains)
    assert [t for t, _ in rig.vq.get_used()] == [0, 1, 2]


def test_in_order_entry_for_a_later_buffer_completes_the_earlier_ones() -> None:
    """Under IN_ORDER a used entry for the second buffer completes the first as well
    (used completely); the device's own entry for the first then lands behind the
    driver's position and is never taken, and the ring goes on."""
    rig = _in_order_rig()
    for n in range(2):
        rig.add_simple(n)
    first, second = rig.roundtrip()
    rig.dev.complete(second, b"2")
    assert rig.vq.get_used() == [(0, 32), (1, 1)]
    rig.dev.complete(first, b"1")
    assert rig.vq.get_used() == [] and rig.state() == (16, 0, 4, 1)
    rig.add_simple("next")
    [c] = rig.roundtrip()
    rig.dev.complete(c, b"ok")
    assert rig.vq.get_used() == [("next", 2)]


def test_in_order_batch_larger_than_the_room_given_is_refused() -> None:
    from vfsdrv._native import ffi, lib

    rig = _in_order_rig()
    for n in range(3):
        rig.add_simple(n)
    rig.dev.complete_batch(rig.roundtrip())
    out = ffi.new("struct vfsdrv_used[]", 2)
    assert lib.vfsdrv_vq_harvest(rig.vq.native, out, 2) < 0
    assert "in-order batch of 3" in ffi.string(rig.vq.native.error).decode()
    assert [t for t, _ in rig.vq.get_used()] == [0, 1, 2]


def test_in_order_is_accepted_with_packed_only() -> None:
    feats = DEFAULT_FEATURES | Feature.RING_PACKED | Feature.IN_ORDER
    for ring, in_order in ((None, True), ("split", False)):
        dev = VirtioDevice(FakeTransport(features=feats), ring=ring)
        assert bool(dev.negotiate() & Feature.IN_ORDER) is in_order
        assert dev.setup_queue(0).native.in_order == in_order
        dev.close()
    with pytest.raises(RingError):
        Virtqueue(0, 8, identity_arena(), in_order=True)  # split
