"""VIRTIO_F_ACCESS_PLATFORM over vhost-user (issue 12 item 5): the reference device
with `access_platform=True` (`vfsdrv refdev --access-platform`) offers it, and the
driver's vhost-user transport then runs in IOVA mode: device addresses are memfd
offsets + IOVA_BASE (never the guest-physical addresses of the memory table), ring
addresses in SET_VRING_ADDR are IOVAs, and one IOTLB_MSG UPDATE maps the memfd.
The device translates every ring and buffer address through its IOTLB, so an
address the driver forgot to translate, or one outside the mapping, is refused.

Part of the typed client suite (tests/test_refdev_driver.py) runs here again on
such a device, with each ring layout; the device-side tests check the IOTLB itself
and what the device does with an address it cannot translate (ACCESS_FAIL).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from driver_helpers import WAIT

# the typed client suite, re-run on a device in IOVA mode (collected in this module,
# so they take this module's `device` and `connect`)
from test_refdev_driver import (  # noqa: F401 - collected by pytest
    test_create_write_read_one_mib,
    test_directories_and_readdir,
    test_interrupt_cancels_a_waiting_lock_with_eintr,
    test_lookup_getattr_read,
    test_posix_locks_conflict_across_frontends,
    test_setattr_truncate_chmod_times,
    test_setlkw_waits_then_is_granted_by_notification,
    test_symlink_link_rename_unlink,
    test_xattrs,
    two,
)
from vfsdrv.errors import TransportError
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient
from vfsdrv.fs.device import VirtioFs
from vfsdrv.refdev import RefDevice
from vfsdrv.refdev.iotlb import (
    ACCESS_RO,
    ACCESS_RW,
    IOTLB_ACCESS_FAIL,
    IOTLB_INVALIDATE,
    IOTLB_MSG,
    IOTLB_UPDATE,
    Iotlb,
    IotlbAccessError,
    IotlbSession,
    Mapping,
)
from vfsdrv.virtio import vhost_user_proto as vu
from vfsdrv.virtio.constants import Feature
from vfsdrv.virtio.vhost_user import IOVA_BASE, VhostUserTransport


@pytest.fixture(params=["split", "packed"])
def device(device_factory, request) -> RefDevice:
    return device_factory(ring=request.param, access_platform=True)


@pytest.fixture
def connect(connect, request) -> Iterator[Callable[..., FuseClient]]:
    """The conftest's attach, checked to run in IOVA mode; at the end, the device
    never refused an address (unless the test is about that)."""
    devices: list[RefDevice] = []

    def attach(dev: RefDevice, **fs_options) -> FuseClient:
        c = connect(dev, **fs_options)
        assert_iova_mode(c, dev)
        devices.append(dev)
        return c

    yield attach
    if "refused" not in request.node.name:
        for dev in devices:
            assert all(s.access_failures == [] for s in dev.sessions)


@pytest.fixture
def client(device: RefDevice, connect) -> FuseClient:
    return connect(device)


def session_of(dev: RefDevice, c: FuseClient) -> IotlbSession:
    """The device's session of client `c` (the latest one connected)."""
    s = dev.sessions[-1]
    assert isinstance(s, IotlbSession)
    return s


def assert_iova_mode(c: FuseClient, dev: RefDevice) -> None:
    t = c.fs.transport
    assert isinstance(t, VhostUserTransport) and t.iova_mode
    assert c.fs.dev.features & Feature.ACCESS_PLATFORM
    assert t.protocol_features & vu.ProtocolFeature.BACKEND_REQ
    s = session_of(dev, c)
    assert s.access_platform and s.backend_channel is not None
    # every ring and slot the driver handed out carries an IOVA, not a memfd offset
    for vq in c.fs.dev.queues.values():
        assert all(a >= IOVA_BASE for a in (vq.addresses.desc, vq.addresses.avail,
                                             vq.addresses.used))
    (m,) = [s.iotlb._maps[k] for k in s.iotlb._starts]
    assert (m.iova, m.perm) == (IOVA_BASE, ACCESS_RW)


# -- the IOTLB itself ----------------------------------------------------------------------
def test_iotlb_translates_within_and_across_adjacent_mappings() -> None:
    t = Iotlb()
    t.update(Mapping(0x1000, 0x1000, 0x7000_0000, ACCESS_RW))
    t.update(Mapping(0x2000, 0x1000, 0x7000_1000, ACCESS_RO))  # follows in both spaces
    t.update(Mapping(0x4000, 0x1000, 0x9000_0000, ACCESS_RW))
    assert t.translate(0x1800, 0x10, ACCESS_RW) == 0x7000_0800
    assert t.translate(0x1F00, 0x200, ACCESS_RO) == 0x7000_0F00
    with pytest.raises(IotlbAccessError, match="permissions"):
        t.translate(0x1F00, 0x200, ACCESS_RW)  # the second page is read-only
    with pytest.raises(IotlbAccessError, match="not mapped"):
        t.translate(0x2F00, 0x200, ACCESS_RO)  # runs into the hole at 0x3000
    with pytest.raises(IotlbAccessError, match="not mapped"):
        t.translate(0x0FFF, 2, ACCESS_RO)
    t.update(Mapping(0x3000, 0x1000, 0x5000_0000, ACCESS_RW))  # fills the hole, elsewhere
    with pytest.raises(IotlbAccessError, match="not contiguous"):
        t.translate(0x2F00, 0x200, ACCESS_RO)
    assert t.invalidate(0x1800, 0x1000) == 2 and len(t) == 2
    with pytest.raises(IotlbAccessError):
        t.translate(0x1000, 1, ACCESS_RO)
    t.update(Mapping(0x4800, 0x100, 0x1234_0000, ACCESS_RO))  # replaces what it overlaps
    with pytest.raises(IotlbAccessError):
        t.translate(0x4000, 1, ACCESS_RO)


# -- end to end with the driver ------------------------------------------------------------
def test_large_reads_and_writes_in_iova_mode(client: FuseClient, export_dir: Path) -> None:
    data = os.urandom(4 << 20)
    (export_dir / "big").write_bytes(data)
    e = client.lookup(ROOT_ID, "big")
    h = client.open(e.nodeid, os.O_RDWR)
    MiB = 1 << 20
    reads = [client.submit(*client.read_request(e.nodeid, h.fh, (i % 4) * MiB, MiB))
             for i in range(8)]
    for i, p in enumerate(reads):
        assert p.result(WAIT) == data[(i % 4) * MiB : (i % 4 + 1) * MiB]


def test_a_device_in_gpa_mode_when_the_driver_declines(device_factory, export_dir: Path,
                                                       monkeypatch) -> None:
    """ACCESS_PLATFORM offered but not accepted: addresses are guest-physical and the
    same device serves them through the memory table."""
    (export_dir / "f").write_text("gpa")
    dev = device_factory(access_platform=True)
    monkeypatch.setattr(VhostUserTransport, "transport_features",
                        lambda self, offered: vu.VHOST_USER_F_PROTOCOL_FEATURES & offered)
    fs = VirtioFs(VhostUserTransport(dev.socket_path)).start()
    try:
        fs.init()
        c = FuseClient(fs)
        assert not fs.transport.iova_mode and not fs.dev.features & Feature.ACCESS_PLATFORM
        e = c.lookup(ROOT_ID, "f")
        assert c.read(e.nodeid, c.open(e.nodeid).fh, 0, 10) == b"gpa"
        s = dev.sessions[-1]
        assert not s.access_platform and len(s.iotlb) == 0 and s.access_failures == []
    finally:
        fs.close()


def test_without_the_option_nothing_changes(device_factory, export_dir: Path) -> None:
    dev = device_factory()
    fs = VirtioFs(VhostUserTransport(dev.socket_path)).start()
    try:
        fs.init()
        t = fs.transport
        assert not fs.dev.offered & Feature.ACCESS_PLATFORM and not t.iova_mode
        assert not t.protocol_features & vu.ProtocolFeature.BACKEND_REQ
        assert all(vq.addresses.desc < IOVA_BASE for vq in fs.dev.queues.values())
    finally:
        fs.close()


# -- what the device refuses -----------------------------------------------------------------
def test_an_address_outside_the_iotlb_is_refused(device, connect) -> None:
    """Device side: a buffer address the IOTLB does not map is refused, reported to
    the frontend as VHOST_IOTLB_ACCESS_FAIL on the backend channel."""
    c = connect(device)
    s = session_of(device, c)
    size = c.fs.transport._memory_size
    assert s.iova_memory.gpa(IOVA_BASE + 64, 64)  # inside: fine
    for addr in (0x1000, IOVA_BASE - 16, IOVA_BASE + size):  # a GPA, just below, just past
        with pytest.raises(IotlbAccessError):
            s.iova_memory.gpa(addr, 32)
    assert [a for a, _ in s.access_failures] == [0x1000, IOVA_BASE - 16, IOVA_BASE + size]
    deadline = time.monotonic() + WAIT
    t = c.fs.transport
    while len(t.iotlb_events) < 3:
        assert time.monotonic() < deadline, "no ACCESS_FAIL reached the frontend"
        t.check_alive()  # reads the backend channel
        time.sleep(0.01)
    assert [(k, a) for k, a, _ in t.iotlb_events] == [
        (IOTLB_ACCESS_FAIL, 0x1000), (IOTLB_ACCESS_FAIL, IOVA_BASE - 16),
        (IOTLB_ACCESS_FAIL, IOVA_BASE + size)]


def test_an_invalidated_mapping_is_refused_and_the_queues_stop(device, connect,
                                                                export_dir: Path) -> None:
    """The frontend takes its mapping back: the running rings are looked up again and
    stop, nothing more is served, and the frontend hears of the failure."""
    (export_dir / "f").write_text("x")
    c = connect(device)
    s = session_of(device, c)
    t = c.fs.transport
    assert c.lookup(ROOT_ID, "f").attr.size == 1
    t._send(vu.Request.IOTLB_MSG, IOTLB_MSG.pack(IOVA_BASE, t._memory_size, 0, 0,
                                                 IOTLB_INVALIDATE))
    assert len(s.iotlb) == 0
    assert all(q.broken for q in s.queues if q.size)
    assert s.access_failures and t.iotlb_events == []  # not read yet
    pending = c.fs.call_async(Opcode.LOOKUP, ROOT_ID, b"f\0")
    with pytest.raises(TimeoutError):
        pending.result(0.3)  # the request queue no longer runs
    deadline = time.monotonic() + WAIT
    while not t.iotlb_events:
        assert time.monotonic() < deadline
        t.check_alive()
        time.sleep(0.01)
    assert t.iotlb_events[0][0] == IOTLB_ACCESS_FAIL


def test_an_update_outside_the_memory_table_is_refused(device, connect) -> None:
    c = connect(device)
    s = session_of(device, c)
    t = c.fs.transport
    msg = IOTLB_MSG.pack(0x10_0000_0000, 4096, 0x1000, ACCESS_RW, IOTLB_UPDATE)
    with pytest.raises(TransportError, match="refused IOTLB_MSG"):
        t._send(vu.Request.IOTLB_MSG, msg)
    assert len(s.iotlb) == 1  # only the driver's own mapping
    # the device still serves the driver
    assert c.getattr(ROOT_ID).ino

