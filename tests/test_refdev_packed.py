"""Packed virtqueues end to end: the reference device (driver/refdev/device_queue.py)
against the driver's native packed ring, over vhost-user. Which layout is negotiated
and how it is forced on either side, both wrap counters going round many times
under real FUSE traffic, indirect chains for large READs/WRITEs, and a blocking lock
granted through the notification queue."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from driver_helpers import pump, whole
from vfsdrv.errors import VfsdrvError
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient
from vfsdrv.fs.device import VirtioFs
from vfsdrv.refdev import RefDevice
from vfsdrv.refdev.lock_table import F_UNLCK, F_WRLCK
from vfsdrv.virtio.constants import Feature
from vfsdrv.virtio.vhost_user import VhostUserTransport

MiB = 1 << 20


def attach(dev: RefDevice, opened: list[VirtioFs], ring: str | None = None,
           **options) -> FuseClient:
    fs = VirtioFs(VhostUserTransport(dev.socket_path), **options)
    fs.dev.ring = ring
    opened.append(fs)
    fs.start()
    fs.init()
    return FuseClient(fs)


@pytest.fixture
def opened():
    fss: list[VirtioFs] = []
    yield fss
    for fs in fss:
        fs.close()


@pytest.mark.parametrize(("device_ring", "driver_ring", "packed"), [
    (None, None, True), (None, "split", False), ("split", None, False),
    ("packed", None, True), ("packed", "packed", True),
])
def test_layout_negotiated(device_factory, opened, device_ring: str | None,
                           driver_ring: str | None, packed: bool) -> None:
    dev = device_factory(ring=device_ring)
    c = attach(dev, opened, driver_ring)
    assert c.fs.dev.has(Feature.RING_PACKED) is packed
    assert c.fs.dev.has(Feature.IN_ORDER) is packed  # offered; accepted with packed only
    assert all(vq.native.in_order == packed for vq in c.fs.dev.queues.values())
    assert all(vq.packed is packed for vq in c.fs.dev.queues.values())
    assert c.getattr(ROOT_ID).mode & 0o170000 == 0o040000
    assert all(s.queues[2].packed is packed for s in dev.sessions)
    # the device counts what waits on a ring either way (a walk over packed entries)
    assert [s.queues[1].pending() for s in dev.sessions] == [c.fs.notify_buffers]


def test_split_forced_on_a_packed_only_device_fails(device_factory, opened) -> None:
    dev = device_factory(ring="packed")
    with pytest.raises(VfsdrvError):
        attach(dev, opened, "split")


def test_packed_forced_on_a_split_device_fails_clearly(device_factory, opened) -> None:
    dev = device_factory(ring="split")
    with pytest.raises(VfsdrvError, match="VIRTIO_F_RING_PACKED"):
        attach(dev, opened, "packed")


def test_both_wrap_counters_go_round_under_fuse_traffic(device_factory, opened,
                                                       export_dir: Path) -> None:
    """A 16-entry request queue (not a power of two would do as well) and a thousand
    requests of 1-3 entries: the driver's and the device's counters agree all along."""
    dev = device_factory()
    c = attach(dev, opened, queue_size=13)
    (export_dir / "f").write_bytes(b"0123456789" * 100)
    vq = c.fs.request_queues[0].vq
    assert vq.packed and vq.size == 13
    flips = 0
    last = vq.native.used_wrap
    e = c.lookup(ROOT_ID, "f")
    h = c.open(e.nodeid)
    for i in range(400):
        assert c.getattr(e.nodeid).size == 1000
        assert c.read(e.nodeid, h.fh, i % 900, 17) == (b"0123456789" * 100)[i % 900:][:17]
        flips += vq.native.used_wrap != last
        last = vq.native.used_wrap
    assert flips > 50
    # the device's view matches: position and wrap counter of the next entry
    q = dev.sessions[0].queues[vq.index]
    assert (q.last_avail, q.avail_wrap) == (vq.native.next_avail, vq.native.avail_wrap)
    assert (q.used_idx, q.used_wrap) == (vq.native.next_used, vq.native.used_wrap)
    c.release(e.nodeid, h.fh)


def test_in_order_batches_one_used_entry_for_several_requests(device_factory, opened,
                                                             export_dir: Path) -> None:
    """The device serves in order and, with IN_ORDER, writes one used entry per batch
    (the chains used between two interrupt decisions): every request completes with
    its own reply, and fewer used entries than requests were written."""
    dev = device_factory()
    c = attach(dev, opened, queue_size=32)
    assert c.fs.dev.has(Feature.IN_ORDER)
    body = abi.pack("fuse_getattr_in", getattr_flags=0, fh=0)
    (export_dir / "sized").write_bytes(bytes(1234))
    e = c.lookup(ROOT_ID, "sized")
    q = dev.sessions[0].queues[c.fs.request_queues[0].vq.index]
    before = q.used_entries
    total = 0
    for _ in range(40):
        pending = [c.submit(Opcode.GETATTR, node, body)
                   for node in (ROOT_ID, e.nodeid) * 8]
        for i, p in enumerate(pending):
            attr = abi.unpack("fuse_attr_out", p.result(5.0)).attr
            assert attr.size == (1234 if i % 2 else attr.size)
            assert bool(attr.mode & 0o040000) is (i % 2 == 0)
        total += len(pending)
    assert q.in_order and 0 < q.used_entries - before < total
    # short READ replies in a batch: the skipped ones count as used completely (len =
    # the whole buffer, zero-padded by the device); the reply header still says 10
    h = c.open(e.nodeid)
    (export_dir / "sized").write_bytes(b"0123456789")
    read_in = abi.pack("fuse_read_in", fh=h.fh, offset=0, size=4096)
    for _ in range(10):
        pending = [c.submit(Opcode.READ, e.nodeid, read_in) for _ in range(8)]
        assert [p.result(5.0) for p in pending] == [b"0123456789"] * 8
    c.release(e.nodeid, h.fh)


def test_large_io_goes_through_indirect_tables(device_factory, opened,
                                               export_dir: Path) -> None:
    dev = device_factory()
    c = attach(dev, opened)
    assert c.fs.dev.has(Feature.INDIRECT_DESC) and c.fs.dev.has(Feature.RING_PACKED)
    data = os.urandom(MiB)
    e, h = c.create(ROOT_ID, "big")
    assert c.write(e.nodeid, h.fh, 0, data) == MiB
    assert c.read(e.nodeid, h.fh, 0, MiB) == data
    assert (export_dir / "big").read_bytes() == data
    c.release(e.nodeid, h.fh)


def test_blocking_lock_granted_through_the_packed_notification_queue(
        device_factory, opened, export_dir: Path) -> None:
    dev = device_factory()
    (export_dir / "locked").write_bytes(bytes(10))
    a, b = attach(dev, opened), attach(dev, opened)
    assert a.fs.notify_vq is not None and a.fs.notify_vq.packed
    na, nb = a.lookup(ROOT_ID, "locked").nodeid, b.lookup(ROOT_ID, "locked").nodeid
    fa, fb = a.open(na, os.O_RDWR).fh, b.open(nb, os.O_RDWR).fh
    for _ in range(20):  # more grants than notification buffers: that ring wraps too
        a.setlk(na, fa, 1, whole(F_WRLCK))
        pending = b.setlkw_async(nb, fb, 1, whole(F_WRLCK))
        pump([b], lambda: b.fs.lock_waiters == 1)
        a.setlk(na, fa, 1, whole(F_UNLCK))
        pending.result(5.0)
        b.setlk(nb, fb, 1, whole(F_UNLCK))
    assert b.fs.stats["lock_notifications"] == 20
