"""The notification path through the PCI transport: the driver's real
`VirtioPciTransport` + `VirtioFs` on an emulated virtio-pci function whose device
model forwards to the reference device over vhost-user (tests/fakes/vhost_pci_bridge.py,
what QEMU's vhost-user-fs-pci does). No public device offers VIRTIO_FS_F_NOTIFICATION
on PCI, so this is where the driver's PCI side meets a notification queue.

Mirrors tests/test_refdev_driver.py and tests/locks/test_notify_queue.py: bring-up
with the notification queue (config read through the PCI device-config region), FUSE
operations against the host directory, blocking locks between a PCI-attached and a
vhost-user-attached frontend of one device completed by FUSE_NOTIFY_LOCK on the PCI
side (MSI-X and polling), INTERRUPT, two request queues, the classic layout, reset.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from pathlib import Path

import pytest
from driver_helpers import WAIT, count_under_lock, open_file, pump, wait_used, whole
from fakes.vhost_pci_bridge import DEVICE_CFG_OFFSET, VhostPciFunction
from vfsdrv.fs import abi
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient, Lock
from vfsdrv.fs.config import VIRTIO_FS_F_NOTIFICATION
from vfsdrv.fs.device import Pending, VirtioFs
from vfsdrv.refdev.lock_table import F_RDLCK, F_UNLCK, F_WRLCK
from vfsdrv.tools import pci_functions as pf
from vfsdrv.virtio import pci as vp
from vfsdrv.virtio.constants import Status


def bridge_of(c: FuseClient) -> VhostPciFunction:
    t = c.fs.transport
    assert isinstance(t, vp.VirtioPciTransport) and isinstance(t.fn, VhostPciFunction)
    return t.fn


def b_waits_on_a(a: FuseClient, b: FuseClient, name: str,
                 want: Lock | None = None) -> tuple[int, int, Pending]:
    """A write-locks all of `name`; B's SETLKW for `want` (default: the same) waits,
    its FUSE_LOCK_WAIT seen. A's (nodeid, fh) and B's request in flight."""
    na, fa = open_file(a, name)
    nb, fb = open_file(b, name)
    a.setlk(na, fa, 1, whole(F_WRLCK))
    pending = b.setlkw_async(nb, fb, 1, want or whole(F_WRLCK))
    pump([b], lambda: b.fs.lock_waiters == 1)
    return na, fa, pending


def assert_clean(fn: VhostPciFunction) -> None:
    """The driver kept every register-level rule the bridge checks."""
    assert fn.errors == [] and fn.common.width_errors == []


# -- bring-up ------------------------------------------------------------------------------
def test_bring_up_with_the_notification_queue(device_factory, pci_connect) -> None:
    dev = device_factory(tag="pcifs", request_queues=1, notify_buf_size=128)
    c = pci_connect(dev)
    fs, fn = c.fs, bridge_of(c)
    # the config came through the PCI device-config region, forwarded as GET_CONFIG
    # (the builder's own tag bytes behind the region are never seen)
    assert (fs.config.tag, fs.config.num_request_queues, fs.config.notify_buf_size) == (
        "pcifs", 1, 128)
    cfg_reads = [(o, w) for op, o, w, _ in fn.bar4.log
                 if op == "r" and DEVICE_CFG_OFFSET <= o < DEVICE_CFG_OFFSET + 44]
    assert {w for _, w in cfg_reads} == {4} and len(cfg_reads) >= 11
    assert fn.config_reads == len(cfg_reads) and "GET_CONFIG" in fn.messages
    assert pf.read_virtiofs_tag(fn) == "pcifs"  # the list/bind helper on the same function
    # VIRTIO_FS_F_NOTIFICATION offered on PCI, negotiated, and passed on to the device
    assert fn.common.features & VIRTIO_FS_F_NOTIFICATION
    assert fs.notification and fn.common.driver_features & VIRTIO_FS_F_NOTIFICATION
    (session,) = dev.sessions
    assert session.notification and session.role(1).value == "notification"
    # queue layout: 0 hiprio, 1 notifications, requests from 2
    assert fn.common.num_queues == 3 and fs.transport.num_queues() == 3
    assert fs.notify_vq is not None and fs.notify_vq.index == 1
    assert [q.vq.index for q in fs.request_queues] == [2]
    assert fn.common.status == (Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
                                | Status.DRIVER_OK)
    # one MSI-X vector for config + one per queue; each queue's call fd is its vector
    assert len(fn.msix_fds) == 4 and fn.running == [0, 1, 2]
    assert [fn.route(i) for i in range(3)] == ["msix 1", "msix 2", "msix 3"]
    assert [fs.transport.interrupt_fd(i) for i in range(3)] == fn.msix_fds[1:]
    # the rings went to the device at DRIVER_OK, then were enabled (vhost_dev_start)
    start = fn.messages.index("SET_MEM_TABLE")
    assert fn.messages[start:].count("SET_VRING_KICK") == 3
    assert fn.messages[start:].count("SET_VRING_ENABLE") == 3
    # notification buffers posted, and the queue kicked once after DRIVER_OK
    assert fn.kicks[1] == 1 and session.queues[1].pending() == fs.notify_buffers
    assert_clean(fn)


def test_fuse_operations_against_the_host_directory(device_factory, pci_connect,
                                                    export_dir: Path) -> None:
    (export_dir / "hello.txt").write_bytes(b"hello over PCI\n")
    c = pci_connect(device_factory())
    assert c.getattr(ROOT_ID).ino == export_dir.stat().st_ino
    e = c.lookup(ROOT_ID, "hello.txt")
    assert e.attr.ino == (export_dir / "hello.txt").stat().st_ino and e.attr.size == 15
    h = c.open(e.nodeid)
    assert c.read(e.nodeid, h.fh, 6, 100) == b"over PCI\n"
    c.release(e.nodeid, h.fh)
    data = os.urandom(300_000)
    e2, h2 = c.create(ROOT_ID, "written", 0o640)
    assert c.write(e2.nodeid, h2.fh, 0, data) == len(data)
    assert c.read(e2.nodeid, h2.fh, 0, len(data)) == data
    c.release(e2.nodeid, h2.fh)
    assert (export_dir / "written").read_bytes() == data
    assert stat.S_IMODE((export_dir / "written").stat().st_mode) == 0o640
    d = c.mkdir(ROOT_ID, "dir")
    (export_dir / "dir" / "inside").write_text("x")
    assert sorted(x.name for x in c.readdir_all(d.nodeid)) == [b".", b"..", b"inside"]
    c.rename(ROOT_ID, "written", d.nodeid, "moved")
    assert (export_dir / "dir" / "moved").read_bytes() == data
    c.unlink(d.nodeid, "moved")
    assert not (export_dir / "dir" / "moved").exists()
    with pytest.raises(FileNotFoundError):
        c.lookup(ROOT_ID, "written")
    assert c.statfs().namelen == os.statvfs(export_dir).f_namemax
    fn = bridge_of(c)
    assert fn.kicks[2] > 10 and fn.kicks[0] == 0  # requests went to queue 2 only
    assert_clean(fn)


# -- blocking locks, PCI frontend and vhost-user frontend of one device ---------------------
@pytest.mark.parametrize("mode", ["msix", "poll"])
def test_blocking_lock_completed_by_notify_lock_over_pci(
    device_factory, connect, pci_connect, export_dir: Path, mode: str
) -> None:
    (export_dir / "locked").write_bytes(bytes(100))
    dev = device_factory()
    a = connect(dev)  # vhost-user
    b = pci_connect(dev, poll=mode == "poll")  # PCI, through the bridge
    fn = bridge_of(b)
    na, fa, pending = b_waits_on_a(a, b, "locked")  # FUSE_LOCK_WAIT came back on queue 2
    assert not pending.done and dev.locks.waiting() == 1
    if mode == "msix":
        vector_fd = fn.msix_fds[2]  # the notification queue's vector
        assert b.fs.transport.interrupt_fd(1) == vector_fd and fn.route(1) == "msix 2"
        while select.select([vector_fd], [], [], 0)[0]:  # nothing pending on it now
            os.eventfd_read(vector_fd)
    else:
        assert fn.msix_fds == [] and b.fs.transport.interrupt_fd(1) is None
        assert fn.route(1) == "isr"
    a.setlk(na, fa, 1, whole(F_UNLCK))
    if mode == "msix":
        # the device signalled MSI-X vector 2 itself (irqfd): readable before B looks
        assert select.select([vector_fd], [], [], WAIT)[0] == [vector_fd]
    pending.result(WAIT)
    assert b.fs.stats["lock_notifications"] == 1 and b.fs.lock_waiters == 0
    with pytest.raises(OSError) as exc:  # B holds it now
        a.setlk(na, fa, 2, Lock(0, 0, F_RDLCK, 0))
    assert exc.value.errno == errno.EAGAIN
    # the used notification buffer went back at once: every session has all 16 again
    pump([b], lambda: all(s.queues[1].pending() == b.fs.notify_buffers for s in dev.sessions))
    assert_clean(fn)


def test_notification_before_its_reply_over_pci(device_factory, connect, pci_connect,
                                                export_dir: Path) -> None:
    (export_dir / "f").write_text("")
    dev = device_factory()
    a, b = connect(dev), pci_connect(dev)
    na, fa = open_file(a, "f")
    nb, fb = open_file(b, "f")
    a.setlk(na, fa, 1, whole(F_WRLCK))
    pending = b.setlkw_async(nb, fb, 7, whole(F_WRLCK))
    wait_used(b, 2)  # the "wait" reply is in B's used ring, not yet seen by B
    a.setlk(na, fa, 1, whole(F_UNLCK))
    wait_used(b, 1)  # ... and so is the FUSE_NOTIFY_LOCK that completes it
    pending.result(WAIT)  # B harvests the notification queue first
    assert b.fs.stats["lock_notify_before_reply"] == 1 and b.fs.lock_waiters == 0
    with pytest.raises(OSError):
        a.setlk(na, fa, 1, Lock(0, 0, F_WRLCK, 0))
    assert_clean(bridge_of(b))


def test_one_notification_buffer_loses_nothing_over_pci(device_factory, connect, pci_connect,
                                                        export_dir: Path) -> None:
    """Every further notification waits in the device until the driver gives the
    buffer back and kicks queue 1 through the PCI notify region."""
    dev = device_factory(max_waiting_locks=32)
    a = connect(dev)
    b = pci_connect(dev, notify_buffers=1)
    n = 12
    for i in range(n):
        (export_dir / f"w{i}").write_text("")
    held = [open_file(a, f"w{i}") for i in range(n)]
    for nodeid, fh in held:
        a.setlk(nodeid, fh, 1, whole(F_WRLCK))
    mine = [open_file(b, f"w{i}") for i in range(n)]
    pend = [b.setlkw_async(nodeid, fh, 2, whole(F_WRLCK)) for nodeid, fh in mine]
    pump([b], lambda: b.fs.lock_waiters == n)
    kicks_before = bridge_of(b).kicks[1]
    for nodeid, fh in held:
        a.setlk(nodeid, fh, 1, whole(F_UNLCK))
    time.sleep(0.3)  # B does nothing: its single buffer is used, the rest are held
    assert dev.locks.waiting() == 0 and sum(p.done for p in pend) == 0
    for p in pend:
        p.result(WAIT)
    assert b.fs.stats["lock_notifications"] == n and b.fs.lock_waiters == 0
    # the device asked for a kick after each buffer (EVENT_IDX), and got it over PCI
    assert bridge_of(b).kicks[1] - kicks_before >= n - 1
    assert_clean(bridge_of(b))


@pytest.mark.parametrize("size", [32, 33, 4096])
def test_notify_buf_size_edges_over_pci(device_factory, connect, pci_connect,
                                        export_dir: Path, size: int) -> None:
    (export_dir / "e").write_text("")
    dev = device_factory(notify_buf_size=size)
    a, b = connect(dev), pci_connect(dev)
    assert b.fs.config.notify_buf_size == size  # read through the device-config region
    na, fa, pending = b_waits_on_a(a, b, "e")
    a.setlk(na, fa, 1, whole(F_UNLCK))
    pending.result(WAIT)


def test_blocking_locks_exclude_across_pci_and_vhost_user_threads(
    device_factory, connect, pci_connect, export_dir: Path
) -> None:
    """Two PCI frontends and one vhost-user frontend, one thread each, increment a
    counter under a whole-file SETLKW lock: no increment is lost."""
    import threading

    (export_dir / "counter").write_text("0")
    dev = device_factory()
    rounds = 20
    clients = [pci_connect(dev), pci_connect(dev), connect(dev)]
    errors: list[BaseException] = []

    def work(c: FuseClient) -> None:
        try:
            count_under_lock(c, "counter", rounds, WAIT * 4)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert (export_dir / "counter").read_text() == str(3 * rounds)
    assert sum(c.fs.stats["lock_notifications"] for c in clients[:2]) > 0  # PCI ones waited
    for c in clients[:2]:
        assert_clean(bridge_of(c))


def test_pci_holder_wakes_a_vhost_user_waiter(device_factory, connect, pci_connect,
                                              export_dir: Path) -> None:
    (export_dir / "locked").write_text("")
    dev = device_factory()
    p = pci_connect(dev)
    v = connect(dev)
    np_, fp = open_file(p, "locked")
    nv, fv = open_file(v, "locked")
    p.setlk(np_, fp, 1, whole(F_WRLCK))
    p.setlk(np_, fp, 9, whole(F_WRLCK), flock=True)
    pending = v.setlkw_async(nv, fv, 1, whole(F_RDLCK))
    pump([v], lambda: v.fs.lock_waiters == 1)
    p.flush(np_, fp, lock_owner=1)  # close() by the holder, over PCI
    pending.result(WAIT)
    flock = v.setlkw_async(nv, fv, 7, whole(F_WRLCK), flock=True)
    pump([v], lambda: v.fs.lock_waiters == 1)
    p.fs.close()  # reset through the bridge: the PCI frontend's session and flock end
    flock.result(WAIT)
    assert v.fs.stats["lock_notifications"] == 2


def test_interrupt_cancels_a_waiting_lock_over_pci(device_factory, connect, pci_connect,
                                                   export_dir: Path) -> None:
    (export_dir / "locked").write_text("")
    dev = device_factory()
    a, b = connect(dev), pci_connect(dev)
    na, fa, pending = b_waits_on_a(a, b, "locked", Lock(0, 10, F_RDLCK, 0))
    fn = bridge_of(b)
    assert fn.kicks[0] == 0
    b.interrupt(pending.unique)  # FUSE_INTERRUPT on the hiprio queue
    with pytest.raises(OSError) as exc:
        pending.result(WAIT)
    assert exc.value.errno == errno.EINTR
    assert fn.kicks[0] == 1 and dev.locks.waiting() == 0
    a.setlk(na, fa, 1, whole(F_UNLCK))
    a.setlk(na, fa, 3, whole(F_WRLCK))  # nothing was granted to the cancelled request
    assert b.fs.lock_waiters == 0
    assert_clean(fn)


def test_two_request_queues_over_pci(device_factory, connect, pci_connect,
                                     export_dir: Path) -> None:
    dev = device_factory(request_queues=2)
    b = pci_connect(dev)
    fs, fn = b.fs, bridge_of(b)
    assert fs.config.num_request_queues == 2 and fn.common.num_queues == 4
    assert [q.vq.index for q in fs.request_queues] == [2, 3]
    assert [fn.route(i) for i in range(4)] == ["msix 1", "msix 2", "msix 3", "msix 4"]
    for i in range(8):
        (export_dir / f"f{i}").write_text(str(i))
    pend = [b.submit(Opcode.LOOKUP, ROOT_ID, f"f{i}".encode() + b"\0") for i in range(8)]
    for p in pend:
        p.result(WAIT)
    assert fn.kicks[2] > 0 and fn.kicks[3] > 0
    # a blocking lock completes the same way with requests spread over two queues
    (export_dir / "locked").write_text("")
    a = connect(dev)
    na, fa, pending = b_waits_on_a(a, b, "locked")
    a.setlk(na, fa, 1, whole(F_UNLCK))
    pending.result(WAIT)
    assert_clean(fn)


def test_without_notification_the_classic_layout_over_pci(device_factory, connect,
                                                          pci_connect,
                                                          export_dir: Path) -> None:
    dev = device_factory(notification=False)
    b = pci_connect(dev)
    fs, fn = b.fs, bridge_of(b)
    assert not fn.common.features & VIRTIO_FS_F_NOTIFICATION and not fs.notification
    assert fn.common.num_queues == 2 and fs.notify_vq is None
    assert [q.vq.index for q in fs.request_queues] == [1]
    assert fs.config.num_request_queues == 1
    assert stat.S_ISDIR(b.getattr(ROOT_ID).mode)
    assert fn.kicks[1] > 0 and 2 not in fn.kicks
    # no notification queue: a SETLKW that would block fails at once
    (export_dir / "f").write_text("")
    a = connect(dev)
    na, fa = open_file(a, "f")
    nb, fb = open_file(b, "f")
    a.setlk(na, fa, 1, whole(F_WRLCK))
    with pytest.raises(OSError) as exc:
        b.setlkw(nb, fb, 1, whole(F_WRLCK), timeout=WAIT)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert_clean(fn)


def test_driver_refusing_notification_gets_requests_from_1(device_factory,
                                                          pci_connect) -> None:
    b = pci_connect(device_factory(), notification=False)
    fn = bridge_of(b)
    assert fn.common.features & VIRTIO_FS_F_NOTIFICATION  # offered...
    assert not fn.common.driver_features & VIRTIO_FS_F_NOTIFICATION  # ...not taken
    assert [q.vq.index for q in b.fs.request_queues] == [1] and fn.running == [0, 1]
    assert stat.S_ISDIR(b.getattr(ROOT_ID).mode)
    assert_clean(fn)


# -- reset through the bridge ------------------------------------------------------------------
def test_reset_stops_the_rings_and_the_function_comes_up_again(device_factory,
                                                               export_dir: Path) -> None:
    (export_dir / "f").write_text("data")
    dev = device_factory()
    fn = VhostPciFunction(dev.socket_path)
    try:
        fs = VirtioFs(vp.VirtioPciTransport(fn, close_function=False)).start()
        fs.init()
        c = FuseClient(fs)
        for _ in range(3):
            c.lookup(ROOT_ID, "f")
        served = fn.kicks[2]
        fs.close()  # status 0: vhost_dev_stop
        assert not fn.closed and fn.running == [] and fn.common.status == 0
        stop = len(fn.messages) - fn.messages[::-1].index("SET_VRING_ENABLE")
        assert fn.messages[stop:].count("GET_VRING_BASE") == 3
        assert served == 4 and fn.vring_bases[2] == 4  # INIT + 3 LOOKUPs
        assert fn.vring_bases[1] == 0  # no notification was ever taken
        # the same function, the same device connection: a second bring-up
        fs = VirtioFs(vp.VirtioPciTransport(fn)).start()
        fs.init()
        assert FuseClient(fs).lookup(ROOT_ID, "f").attr.size == 4
        assert fn.messages.count("SET_MEM_TABLE") == 1 and fn.running == [0, 1, 2]
        fs.close()
        assert fn.closed
        assert_clean(fn)
    finally:
        fn.close()
    assert dev.wait_sessions_closed()


def test_the_refdev_auditor_finds_no_violation_over_pci(device_factory, connect,
                                                        pci_connect,
                                                        export_dir: Path) -> None:
    """Auditing mode offers STATUS, so the bridge forwards every status write; the
    driver's rings and buffers reach the device unchanged through the shared memfd."""
    (export_dir / "locked").write_text("")
    dev = device_factory(audit=True)
    a, b = connect(dev), pci_connect(dev)
    fn = bridge_of(b)
    assert fn.backend.has_status and "SET_STATUS" in fn.messages
    na, fa, pending = b_waits_on_a(a, b, "locked")
    a.setlk(na, fa, 1, whole(F_UNLCK))
    pending.result(WAIT)
    b.fs.close()
    report = dev.audit_report()
    assert report.ok, report.format_table()
    assert report.result("16") == report.result("21") == "held"  # status reads forwarded
    assert_clean(fn)


# -- queues left without an MSI-X vector --------------------------------------------------
# VirtioPciTransport runs a queue whose vector the device refuses, or that finds no
# vector left, "by polling" (interrupt_fd None). VirtioFs in interrupt mode waits only
# on the interrupt fds it has (wait(), fds() for the frontends' event loops), so such a
# queue is looked at only when some other fd fires or the wait times out.
# A queue left without an MSI-X vector is looked at every millisecond (VirtioFs.max_wait).


def test_notification_queue_without_a_vector_is_still_served(
    device_factory, connect, pci_connect, export_dir: Path
) -> None:
    (export_dir / "f").write_text("")
    dev = device_factory()
    a = connect(dev)
    b = pci_connect(dev, bridge={"refuse_vectors": frozenset({2})})  # queue 1's vector
    fn = bridge_of(b)
    assert b.fs.transport.interrupt_fd(1) is None and fn.route(1) == "isr"
    assert b.fs.transport.interrupt_fd(2) is not None
    na, fa, pending = b_waits_on_a(a, b, "f")
    a.setlk(na, fa, 1, whole(F_UNLCK))
    wait_used(b, 1)  # the FUSE_NOTIFY_LOCK is in the used ring
    t0 = time.monotonic()
    b.fs.wait(1.0)
    elapsed = time.monotonic() - t0
    assert pending.done, "the notification was not harvested"
    assert elapsed < 0.5, f"wait() slept {elapsed:.1f} s with a notification in the used ring"


def test_qemu_vector_count_leaves_the_request_queue_polled_and_slow(
    device_factory, pci_connect
) -> None:
    """QEMU's vhost-user-fs-pci sizes its MSI-X table num_request_queues + 2 (config,
    hiprio, requests); with the notification queue that is one short, and the request
    queue is the one left without a vector."""
    b = pci_connect(device_factory(), bridge={"msix_vectors": 3})
    fs = b.fs
    assert fs.transport.interrupt_fd(1) is not None and fs.transport.interrupt_fd(2) is None
    t0 = time.monotonic()
    for _ in range(2):
        b.getattr(ROOT_ID)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.4, f"2 GETATTRs took {elapsed:.1f} s (each waits out a 0.5 s slice)"



# -- a device that breaks while a lock waits -------------------------------------------------
# DEVICE_NEEDS_RESET, signalled on the configuration vector, fails every waiter at once.


def test_device_error_ends_a_waiting_lock(device_factory, connect, pci_connect,
                                          export_dir: Path) -> None:
    (export_dir / "f").write_text("")
    dev = device_factory()
    a, b = connect(dev), pci_connect(dev)
    fn = bridge_of(b)
    na, fa, pending = b_waits_on_a(a, b, "f")
    fn.device_error()
    config_fd = b.fs.transport.config_fd()
    assert config_fd == fn.msix_fds[0]
    assert select.select([config_fd], [], [], 0)[0] == [config_fd]  # the device did its part
    assert b.fs.dev.needs_reset()
    with pytest.raises(OSError) as exc:
        pending.result(1.0)
    assert not isinstance(exc.value, TimeoutError), "the waiter was never told"
    assert b.fs.broken is not None


def test_scattered_guest_memory_splits_buffers_over_pci(device_factory, pci_connect,
                                                        export_dir: Path) -> None:
    """Eight memory regions whose GPAs run backwards and apart: DMA memory is not
    device-contiguous, so buffers crossing a region boundary go out as several
    descriptors, and the device finds each piece in its region."""
    data = os.urandom(4 << 20)
    (export_dir / "big").write_bytes(data)
    c = pci_connect(device_factory(), bridge={"regions": 8})
    fs, fn = c.fs, bridge_of(c)
    assert fn.messages.count("SET_MEM_TABLE") == 1 and len(fn.backend.layout) == 8
    split = [s for s in fs.slots.large if len(s.buf.segments(0, s.buf.size)) > 1]
    assert split, "no large slot crosses a region boundary"
    e = c.lookup(ROOT_ID, "big")
    h = c.open(e.nodeid, os.O_RDWR)
    MiB = 1 << 20
    # every large slot at once, so the split ones carry data both ways
    n = len(fs.slots.large)
    reads = [c.submit(*c.read_request(e.nodeid, h.fh, (i % 4) * MiB, MiB)) for i in range(n)]
    for i, p in enumerate(reads):
        assert p.result(WAIT) == data[(i % 4) * MiB : (i % 4 + 1) * MiB]
    new = [os.urandom(MiB) for _ in range(4)]
    writes = [c.submit(Opcode.WRITE, e.nodeid, abi.pack(
        "fuse_write_in", fh=h.fh, offset=(i % 4) * MiB, size=MiB), new[i % 4]) for i in range(n)]
    for p in writes:
        p.result(WAIT)
    assert (export_dir / "big").read_bytes() == b"".join(new)
    assert_clean(fn)
