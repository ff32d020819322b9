"""The virtio status state machine (vfsdrv.virtio.device) over a recording fake
transport: the order of virtio 1.2 3.1.1, feature negotiation, FAILED on every
error, config generation retries, queue set-up and teardown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from vfsdrv.errors import DeviceError, FeatureNegotiationError, TransportError
from vfsdrv.virtio import device as device_mod
from vfsdrv.virtio.constants import Feature, Status
from vfsdrv.virtio.device import VirtioDevice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakes.ring_device import RingDevice  # noqa: E402
from fakes.transport import DEFAULT_FEATURES, FakeTransport, identity_arena  # noqa: E402

ACK, DRV, FOK, DOK, FAILED = (
    Status.ACKNOWLEDGE, Status.DRIVER, Status.FEATURES_OK, Status.DRIVER_OK, Status.FAILED
)
DEV_BIT0, DEV_BIT5 = 1 << 0, 1 << 5


def index(events: list[tuple], *match: object) -> int:
    """Position of the first event starting with `match`."""
    for i, e in enumerate(events):
        if e[: len(match)] == match:
            return i
    raise AssertionError(f"no event {match} in {events}")


def assert_only_adds_bits(t: FakeTransport) -> None:
    assert t.violations == []
    writes = t.status_writes()
    for a, b in zip(writes, writes[1:], strict=False):
        assert a & b == a, f"status {b:#x} clears bits of {a:#x}"


# -- the happy path ----------------------------------------------------------------------
def test_initialization_follows_the_spec_order() -> None:
    t = FakeTransport(features=DEFAULT_FEATURES | DEV_BIT0, queue_max={0: 64, 1: 64})
    dev = VirtioDevice(t)
    accepted = dev.negotiate(DEV_BIT0)
    q0 = dev.setup_queue(0)
    q1 = dev.setup_queue(1)
    dev.driver_ok()
    ev = t.events
    assert ev[0] == ("reset",)
    assert t.status_writes() == [ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK]
    # features are read after DRIVER and written before FEATURES_OK
    assert index(ev, "status", ACK | DRV) < index(ev, "device_features")
    fok = index(ev, "status", ACK | DRV | FOK)
    assert index(ev, "device_features") < index(ev, "features") < fok
    # FEATURES_OK is re-read before anything else happens
    assert ev[fok + 1][0] == "get_status" and ev[fok + 1][1] & FOK
    # queues are set up between FEATURES_OK and DRIVER_OK, each enabled after its setup
    dok = index(ev, "status", ACK | DRV | FOK | DOK)
    assert fok < index(ev, "setup_queue", 0) < index(ev, "enable_queue", 0) < dok
    assert index(ev, "setup_queue", 1) < index(ev, "enable_queue", 1) < dok
    assert ev[dok + 1] == ("start",)  # the transport is started after DRIVER_OK
    assert_only_adds_bits(t)
    assert t.status == ACK | DRV | FOK | DOK
    assert t.driver_features == accepted == dev.features
    assert set(dev.queues) == {0, 1} and t.queues[0] == (64, q0.addresses)
    assert t.queues[1] == (64, q1.addresses) and t.enabled == {0, 1}


def test_accepts_only_offered_and_understood_features() -> None:
    offered = (Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.RING_PACKED
               | Feature.ACCESS_PLATFORM | Feature.IN_ORDER | DEV_BIT0 | DEV_BIT5 | (1 << 23))
    t = FakeTransport(features=offered)
    dev = VirtioDevice(t)
    # bit 3 is wanted but not offered; bit 30 is not a device-type bit
    accepted = dev.negotiate(DEV_BIT0 | (1 << 3) | (1 << 30))
    # RING_PACKED is preferred whenever offered, and IN_ORDER comes with it
    assert accepted == (Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.RING_PACKED
                        | Feature.IN_ORDER | DEV_BIT0)
    assert t.driver_features == accepted
    assert dev.has(Feature.INDIRECT_DESC) and not dev.has(Feature.EVENT_IDX)
    assert not dev.has(DEV_BIT5)


def test_transport_features_are_accepted_only_when_offered() -> None:
    t = FakeTransport(
        features=DEFAULT_FEATURES | Feature.ACCESS_PLATFORM,
        transport_bits=Feature.ACCESS_PLATFORM | Feature.NOTIFICATION_DATA,
    )
    accepted = VirtioDevice(t).negotiate()
    assert accepted & Feature.ACCESS_PLATFORM
    assert not accepted & Feature.NOTIFICATION_DATA
    assert accepted == DEFAULT_FEATURES | Feature.ACCESS_PLATFORM


def test_negotiating_again_starts_with_a_reset() -> None:
    t = FakeTransport()
    dev = VirtioDevice(t)
    dev.negotiate()
    dev.setup_queue(0)
    dev.driver_ok()
    n = len(t.events)
    dev.negotiate()
    assert t.events[n] == ("reset",)
    assert t.status_writes()[-3:] == [ACK, ACK | DRV, ACK | DRV | FOK]
    assert t.violations == []


# -- failures set FAILED ---------------------------------------------------------------------
def test_device_without_version_1_is_refused() -> None:
    t = FakeTransport(features=Feature.INDIRECT_DESC | Feature.EVENT_IDX | DEV_BIT0)
    dev = VirtioDevice(t)
    with pytest.raises(DeviceError, match="VERSION_1"):
        dev.negotiate(DEV_BIT0)
    assert "features" not in t.names()  # nothing was accepted
    assert t.status_writes() == [ACK, ACK | DRV, ACK | DRV | FAILED]
    assert_only_adds_bits(t)
    assert dev.features == 0


def test_device_clearing_features_ok() -> None:
    t = FakeTransport(accept_features=lambda f: not f & Feature.EVENT_IDX)
    dev = VirtioDevice(t)
    with pytest.raises(FeatureNegotiationError, match="cleared FEATURES_OK"):
        dev.negotiate()
    assert t.status_writes() == [ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | FAILED]
    assert t.status & FAILED and not t.status & FOK
    assert not any(w & DOK for w in t.status_writes())
    assert_only_adds_bits(t)
    assert dev.features == 0


@pytest.mark.parametrize("step", ["device_features", "features"])
def test_transport_error_during_negotiation_sets_failed(step: str) -> None:
    t = FakeTransport()
    t.fail_on.add(step)
    dev = VirtioDevice(t)
    with pytest.raises(TransportError):
        dev.negotiate()
    assert t.status_writes()[-1] == ACK | DRV | FAILED
    assert_only_adds_bits(t)


@pytest.mark.parametrize("step", ["queue_max_size", "setup_queue", "enable_queue"])
def test_queue_setup_error_sets_failed(step: str) -> None:
    t = FakeTransport()
    dev = VirtioDevice(t)
    dev.negotiate()
    t.fail_on.add(step)
    with pytest.raises(TransportError):
        dev.setup_queue(0)
    assert t.status_writes()[-1] == ACK | DRV | FOK | FAILED
    assert dev.queues == {}
    assert_only_adds_bits(t)


def test_failed_queue_setup_does_not_leak_ring_memory() -> None:
    t = FakeTransport()
    dev = VirtioDevice(t)
    dev.negotiate()
    free = t.arena.bytes_free
    t.fail_on.add("enable_queue")
    with pytest.raises(TransportError):
        dev.setup_queue(0)
    dev.close()
    assert t.arena.bytes_free == free


@pytest.mark.parametrize("qmax,msg", [(0, "does not exist"), (65536, "> 32768")])
def test_bad_queue_size_from_the_device(qmax: int, msg: str) -> None:
    t = FakeTransport(queue_max={0: qmax})
    dev = VirtioDevice(t)
    dev.negotiate()
    with pytest.raises(DeviceError, match=msg):
        dev.setup_queue(0)
    assert t.status_writes()[-1] & FAILED
    assert "setup_queue" not in t.names()


def test_driver_ok_failure_sets_failed() -> None:
    t = FakeTransport()
    dev = VirtioDevice(t)
    dev.negotiate()
    dev.setup_queue(0)
    t.fail_on.add("start")
    with pytest.raises(TransportError):
        dev.driver_ok()
    assert t.status_writes()[-2:] == [ACK | DRV | FOK | DOK, ACK | DRV | FOK | DOK | FAILED]
    assert_only_adds_bits(t)


def test_fail_is_best_effort() -> None:
    t = FakeTransport()
    dev = VirtioDevice(t)
    dev.negotiate()
    t.fail_on.add("status")
    dev.fail()  # the device may be gone: no exception
    assert t.events[-1] == ("status", ACK | DRV | FOK | FAILED)


def test_needs_reset() -> None:
    t = FakeTransport()
    dev = VirtioDevice(t)
    dev.negotiate()
    assert not dev.needs_reset()
    t.status |= Status.DEVICE_NEEDS_RESET
    assert dev.needs_reset()


# -- config space -------------------------------------------------------------------------------
def test_read_config_when_stable() -> None:
    t = FakeTransport(config=bytes(range(44)))
    dev = VirtioDevice(t)
    assert dev.read_config(4, 8) == bytes(range(4, 12))
    assert t.names().count("read_config") == 1


def test_read_config_retries_while_the_generation_changes() -> None:
    t = FakeTransport(config=bytes(range(44)))
    t.generation_bumps = 2  # two reads race with a config change
    dev = VirtioDevice(t)
    data = dev.read_config(0, 44)
    assert t.names().count("read_config") == 3
    assert data == bytes(t.config)  # the settled config, not a torn copy
    assert data == bytes((b + 2) & 0xFF for b in range(44))
    # each read is bracketed by generation reads
    ev = [e[0] for e in t.events if e[0] in ("read_config", "config_generation")]
    assert ev == ["config_generation", "read_config", "config_generation"] * 3


def test_read_config_gives_up_if_the_generation_never_settles() -> None:
    t = FakeTransport(config=bytes(44))
    t.generation_always_changes = True
    dev = VirtioDevice(t)
    with pytest.raises(DeviceError, match="never settled"):
        dev.read_config(0, 44)
    assert t.names().count("read_config") == device_mod.CONFIG_RETRIES


def test_short_config_read_is_an_error() -> None:
    t = FakeTransport(config=bytes(40))
    dev = VirtioDevice(t)
    with pytest.raises(DeviceError, match="returned 40"):
        dev.read_config(0, 44)


# -- queues --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device_max,wanted,size", [(256, 256, 256), (1024, 256, 256), (100, 256, 64),
                               (1000, 1000, 512), (32768, 32768, 32768), (1, 8, 1)]
)
def test_queue_size_is_the_largest_power_of_two_allowed(device_max: int, wanted: int,
                                                         size: int) -> None:
    t = FakeTransport(queue_max={0: device_max}, arena=identity_arena(2 << 20))
    dev = VirtioDevice(t)
    dev.negotiate()
    vq = dev.setup_queue(0, wanted)
    assert vq.size == size
    assert t.queues[0] == (size, vq.addresses)


def test_queues_follow_the_negotiated_ring_features() -> None:
    t = FakeTransport(features=Feature.VERSION_1 | Feature.EVENT_IDX)
    dev = VirtioDevice(t)
    dev.negotiate()
    vq = dev.setup_queue(0)
    assert vq.event_idx and not vq.indirect
    t2 = FakeTransport(features=Feature.VERSION_1 | Feature.INDIRECT_DESC)
    dev2 = VirtioDevice(t2)
    dev2.negotiate()
    vq2 = dev2.setup_queue(0)
    assert vq2.indirect and not vq2.event_idx


def test_kick_notifies_only_when_the_device_wants_it() -> None:
    t = FakeTransport(features=Feature.VERSION_1)
    dev = VirtioDevice(t)
    dev.negotiate()
    vq = dev.setup_queue(0, 8)
    dev.driver_ok()
    ring = RingDevice(t.arena.view, vq.size, vq.addresses)
    buf = t.arena.alloc(64)
    vq.add([(buf.addr, 8)], [], "a")
    dev.kick(vq)
    assert t.events[-1] == ("notify", 0)
    ring.set_no_notify(True)
    vq.add([(buf.addr, 8)], [], "b")
    n = len(t.events)
    dev.kick(vq)
    assert "notify" not in [e[0] for e in t.events[n:]]
    assert [c.head for c in ring.pop_all()] == [0, 1]  # published all the same
    dev.kick(vq)  # nothing new: no notify either
    assert "notify" not in [e[0] for e in t.events[n:]]


def test_close_resets_frees_queues_and_closes_the_transport() -> None:
    t = FakeTransport(queue_max={0: 128, 1: 128})
    free = t.arena.bytes_free
    dev = VirtioDevice(t)
    dev.negotiate()
    dev.setup_queue(0)
    dev.setup_queue(1)
    dev.driver_ok()
    assert t.arena.bytes_free < free
    n = len(t.events)
    dev.close()
    assert [e[0] for e in t.events[n:]] == ["reset", "close"]
    assert t.arena.bytes_free == free
    assert dev.queues == {} and t.closed


def test_close_goes_on_when_the_reset_fails() -> None:
    t = FakeTransport()
    free = t.arena.bytes_free
    dev = VirtioDevice(t)
    dev.negotiate()
    dev.setup_queue(0)
    t.fail_on.add("reset")
    dev.close()
    assert t.closed and t.arena.bytes_free == free
