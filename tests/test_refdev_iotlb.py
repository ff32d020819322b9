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

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backends import refdev
from driver_helpers import WAIT, open_file, pump, whole
from fakes.bridge_mount import BridgeMount
from fakes.vhost_pci_bridge import IOVA_BASE as BRIDGE_IOVA
from fakes.vhost_pci_bridge import VhostPciFunction

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
from test_refdev_vhost import (
    F_NOTIFICATION,
    F_VERSION_1,
    MEM_SIZE,
    USER_BASE,
    Frontend,
    Ring,
)
from vfsdrv.errors import TransportError
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient
from vfsdrv.fs.device import VirtioFs
from vfsdrv.refdev import RefDevice, iotlb
from vfsdrv.refdev.iotlb import (
    ACCESS_RO,
    ACCESS_RW,
    BACKEND_IOTLB_MSG,
    IOTLB_ACCESS_FAIL,
    IOTLB_INVALIDATE,
    IOTLB_MISS,
    IOTLB_MSG,
    IOTLB_UPDATE,
    Iotlb,
    IotlbAccessError,
    IotlbSession,
    Mapping,
)
from vfsdrv.refdev.lock_table import F_UNLCK, F_WRLCK
from vfsdrv.virtio import pci as vp
from vfsdrv.virtio import ring_layout as rl
from vfsdrv.virtio import vhost_user_proto as vu
from vfsdrv.virtio.constants import Feature
from vfsdrv.virtio.vhost_user import IOVA_BASE, VhostUserTransport
from vfsdrv.virtio.vhost_user_proto import ProtocolFeature, Request


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



# -- behind the emulated PCI function (QEMU with a vIOMMU's role) ----------------------------
@pytest.fixture
def pci_iova(pci_connect) -> Callable[..., FuseClient]:
    """The driver's PCI transport on the bridge with iommu=True, the device offering
    ACCESS_PLATFORM: the driver allocates IOVA DMA memory, the bridge maps each
    block in the device's IOTLB."""
    return lambda dev, **bridge: pci_connect(dev, bridge={"iommu": True, **bridge})


@pytest.mark.parametrize("regions", [1, 8])
def test_iova_mode_behind_the_emulated_pci_function(device_factory, pci_iova, connect,
                                                    export_dir: Path, regions: int) -> None:
    """regions=8: guest memory in scattered regions, each IOTLB entry inside one."""
    dev = device_factory(access_platform=True)
    c = pci_iova(dev, regions=regions)
    t = c.fs.transport
    fn = t.fn
    assert isinstance(fn, VhostPciFunction)
    assert t.iova_mode and c.fs.dev.features & Feature.ACCESS_PLATFORM
    assert fn.common.driver_features & Feature.ACCESS_PLATFORM  # passed on to the device
    (s,) = dev.sessions
    assert isinstance(s, IotlbSession) and s.access_platform
    # the rings went to the device as IOVAs of the bridge's vIOMMU, mapped beforehand
    assert all(vq.addresses.desc >= BRIDGE_IOVA for vq in c.fs.dev.queues.values())
    assert len(s.iotlb) >= len([d for d in fn.dma if not d.closed]) >= 1
    if regions > 1:
        assert len(s.iotlb) > 1
    assert fn.messages.index("IOTLB_MSG") < fn.messages.index("SET_VRING_KICK")
    # FUSE traffic, 1 MiB both ways through every large slot (some cross regions)
    data = os.urandom(1 << 20)
    e, h = c.create(ROOT_ID, "big", 0o644)
    assert c.write(e.nodeid, h.fh, 0, data) == len(data)
    n = c.fs.free_slots[1]
    reads = [c.submit(*c.read_request(e.nodeid, h.fh, 0, len(data))) for _ in range(n)]
    assert all(p.result(WAIT) == data for p in reads)
    assert (export_dir / "big").read_bytes() == data
    # a blocking lock completed by a notification in an IOVA buffer
    other = connect(dev)
    na, fa = open_file(other, "big")
    nb, fb = open_file(c, "big")
    other.setlk(na, fa, 1, whole(F_WRLCK))
    pending = c.setlkw_async(nb, fb, 1, whole(F_WRLCK))
    pump([c], lambda: c.fs.lock_waiters == 1)
    other.setlk(na, fa, 1, whole(F_UNLCK))
    pending.result(WAIT)
    assert s.access_failures == [] and fn.errors == []
    c.fs.close()  # the DMA blocks go: their IOTLB entries are invalidated
    assert fn.messages.count("IOTLB_MSG") >= 2


def test_without_an_iommu_the_bridge_does_not_offer_access_platform(device_factory,
                                                                    export_dir: Path) -> None:
    dev = device_factory(access_platform=True)
    fn = VhostPciFunction(dev.socket_path)
    fs = VirtioFs(vp.VirtioPciTransport(fn, device_id=vp.VIRTIO_ID_FS))
    try:
        fs.start()
        fs.init()
        assert not fs.dev.offered & Feature.ACCESS_PLATFORM and not fs.transport.iova_mode
        assert FuseClient(fs).getattr(ROOT_ID).ino
        (s,) = dev.sessions
        assert not s.access_platform and s.access_failures == []
    finally:
        fs.close()


def test_a_relay_mount_behind_the_function_in_iova_mode(tmp_path: Path) -> None:
    """tests/fakes/bridge_mount.py --iommu: the relay's native pumps post IOVAs."""
    export, mnt, sock = tmp_path / "export", tmp_path / "mnt", tmp_path / "ref.sock"
    export.mkdir()
    mnt.mkdir()
    with refdev(export, sock, "--access-platform"):
        m = BridgeMount(sock, mnt, tmp_path / "bridge.log", "--iommu")
        try:
            data = os.urandom(3 << 20)
            (mnt / "f").write_bytes(data)
            assert (export / "f").read_bytes() == data
            assert (mnt / "f").read_bytes() == data
            assert sorted(os.listdir(mnt)) == ["f"]
        finally:
            m.close()
    assert "IOTLB refused" not in sock.with_suffix(".log").read_text()
    log = m.log_text()
    assert "ACCESS_PLATFORM" in log and "IOVA" in log, log[-3000:]


def test_vfsdrv_check_passes_in_iova_mode(tmp_path: Path) -> None:
    """`vfsdrv check` runs its conformance checks through the IOTLB and names
    ACCESS_PLATFORM among the negotiated features."""
    export, sock = tmp_path / "export", tmp_path / "ref.sock"
    export.mkdir()
    with refdev(export, sock, "--access-platform"):
        r = subprocess.run([sys.executable, "-m", "vfsdrv.tools.cli", "check", "--vhost-user",
                            str(sock), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["ok"] and "ACCESS_PLATFORM" in report["negotiated"]
    assert "IOTLB refused" not in sock.with_suffix(".log").read_text()


# -- a frontend that maps lazily: IOTLB misses ------------------------------------------------
IOVA0 = 0x40_0000_0000  # the raw frontend's IOVA of its memory offset 0


class LazyFrontend(Frontend):
    """QEMU with a vIOMMU, reduced to the bone (tests/test_refdev_vhost.py's
    frontend in IOVA mode): ring addresses and descriptors carry IOVA0 + offset,
    the device's IOTLB holds only what `map` put there, and misses arrive on the
    backend channel for the test to answer."""

    ring_base = IOVA0

    def handshake(self, features: int) -> None:
        assert self.get_u64(Request.GET_FEATURES) & Feature.ACCESS_PLATFORM
        self.get_u64(Request.GET_PROTOCOL_FEATURES)
        vu.send_message(self.sock, Request.SET_PROTOCOL_FEATURES, vu.U64.pack(
            ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.BACKEND_REQ))
        self.reply_ack = True
        self.backend, theirs = socket.socketpair()
        self.backend.settimeout(WAIT)
        assert self.send(Request.SET_BACKEND_REQ_FD, b"", (theirs.fileno(),))
        theirs.close()
        assert self.send(Request.SET_OWNER)
        acked = features | vu.VHOST_USER_F_PROTOCOL_FEATURES | Feature.ACCESS_PLATFORM
        assert self.send(Request.SET_FEATURES, vu.U64.pack(acked))
        table = vu.MEM_TABLE_HEAD.pack(1, 0) + vu.MEM_REGION.pack(0, MEM_SIZE, USER_BASE, 0)
        assert self.send(Request.SET_MEM_TABLE, table, (self.fd,))

    def map(self, off: int, size: int) -> bool:
        return self.send(Request.IOTLB_MSG, IOTLB_MSG.pack(
            IOVA0 + off, size, USER_BASE + off, ACCESS_RW, IOTLB_UPDATE))

    def setup_ring(self, index: int) -> Ring:
        assert self.map(self.ring_offset(index), 0x1000)  # the ring itself is mapped up front
        return super().setup_ring(index)

    def post_init(self, ring: Ring) -> tuple[int, int]:
        """FUSE_INIT in two descriptors at IOVAs; (request offset, reply offset)."""
        body = abi.pack("fuse_init_in", major=7, minor=38, flags=0)
        req = abi.pack("fuse_in_header", len=abi.IN_HEADER_SIZE + len(body),
                       opcode=Opcode.INIT, unique=2, nodeid=0) + body
        a, b = self.alloc(len(req)), self.alloc(4096)
        self.mem[a : a + len(req)] = req
        ring.set_desc(0, IOVA0 + a, len(req), rl.VRING_DESC_F_NEXT, 1)
        ring.set_desc(1, IOVA0 + b, 4096, rl.VRING_DESC_F_WRITE)
        ring.publish(0)
        return a, b

    def next_backend_message(self) -> tuple[int, int, int, int, int]:
        """(request, flags, iova, perm, type) of the device's next IOTLB message."""
        request, flags, payload, _ = vu.recv_message(self.backend)
        iova, _, _, perm, kind = IOTLB_MSG.unpack_from(payload)
        return request, flags, iova, perm, kind

    def ack_miss(self, ok: bool = True) -> None:
        vu.send_message(self.backend, BACKEND_IOTLB_MSG, vu.U64.pack(0 if ok else 1),
                        flags=vu.VERSION | vu.FLAG_REPLY)


@pytest.fixture
def lazy(device_factory) -> Iterator[tuple[LazyFrontend, Ring, IotlbSession]]:
    dev = device_factory(access_platform=True)
    fe = LazyFrontend(dev.socket_path)
    try:
        fe.handshake(F_VERSION_1 | F_NOTIFICATION)
        fe.setup_ring(0)
        req = fe.setup_ring(2)
        (s,) = dev.sessions
        assert isinstance(s, IotlbSession) and s.access_platform
        yield fe, req, s
    finally:
        fe.backend.close()
        fe.close()


def test_a_miss_is_asked_for_and_served_once_the_frontend_maps_it(lazy) -> None:
    fe, req, s = lazy
    a, b = fe.post_init(req)
    request, flags, iova, perm, kind = fe.next_backend_message()
    assert (request, kind, iova, perm) == (BACKEND_IOTLB_MSG, IOTLB_MISS, IOVA0 + a, ACCESS_RO)
    assert flags & vu.FLAG_NEED_REPLY
    assert fe.map(0x10000, MEM_SIZE - 0x10000)  # UPDATE on the main socket, acked meanwhile
    fe.ack_miss()
    _head, length = req.wait_used()
    out_len, error, unique = fe.out_header(b)
    assert (error, unique, out_len) == (0, 2, length) and length > 16
    assert s.misses == [(IOVA0 + a, ACCESS_RO)] and s.access_failures == []


def test_an_unanswered_miss_becomes_an_access_failure(lazy, monkeypatch) -> None:
    monkeypatch.setattr(iotlb, "MISS_TIMEOUT", 0.3)
    fe, req, s = lazy
    a, _ = fe.post_init(req)
    assert fe.next_backend_message()[4] == IOTLB_MISS  # never answered
    request, flags, iova, perm, kind = fe.next_backend_message()
    assert (request, kind, iova, perm) == (BACKEND_IOTLB_MSG, IOTLB_ACCESS_FAIL, IOVA0 + a,
                                           ACCESS_RO)
    assert not flags & vu.FLAG_NEED_REPLY
    deadline = time.monotonic() + WAIT  # the queue breaks just after the message goes
    while not s.queues[2].broken:
        assert time.monotonic() < deadline, "the queue kept running"
        time.sleep(0.01)
    assert req.nothing_used()
    assert s.access_failures == [(IOVA0 + a, ACCESS_RO)]


def test_a_miss_the_frontend_refuses_is_an_access_failure_at_once(lazy) -> None:
    fe, req, s = lazy
    fe.post_init(req)
    assert fe.next_backend_message()[4] == IOTLB_MISS
    t0 = time.monotonic()
    fe.ack_miss(ok=False)  # "invalid IOVA": nothing mapped
    assert fe.next_backend_message()[4] == IOTLB_ACCESS_FAIL
    assert time.monotonic() - t0 < 1.0 and len(s.misses) == 1
    assert req.nothing_used()
