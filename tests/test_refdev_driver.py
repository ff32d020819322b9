"""The reference device through the project's real driver (VhostUserTransport +
VirtioFs + FuseClient): FUSE operations checked against the host directory, and
locks shared by two frontends (two "guests" of one device), including blocking
locks completed by FUSE_NOTIFY_LOCK on the notification queue."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from driver_helpers import count_under_lock, pump, whole
from vfsdrv.fs import abi
from vfsdrv.fs.abi import InitFlag, Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient, Lock
from vfsdrv.refdev import RefDevice
from vfsdrv.refdev.lock_table import F_RDLCK, F_UNLCK, F_WRLCK

MiB = 1 << 20
WAIT_TIMEOUT = 5.0


@pytest.fixture(params=["split", "packed"])
def device(device_factory, request) -> RefDevice:
    return device_factory(ring=request.param)  # each virtqueue layout


@pytest.fixture
def client(device: RefDevice, connect) -> FuseClient:
    return connect(device)


# -- device discovery and session ---------------------------------------------------------
def test_config_space_features_and_queues(device_factory, connect) -> None:
    dev = device_factory(tag="exports", request_queues=2, notify_buf_size=128)
    c = connect(dev)
    fs = c.fs
    assert fs.notification
    assert fs.config.tag == "exports"
    assert fs.config.num_request_queues == 2
    assert fs.config.notify_buf_size == 128
    assert len(fs.request_queues) == 2
    granted = fs.init_flags
    assert granted & InitFlag.POSIX_LOCKS and granted & InitFlag.FLOCK_LOCKS
    assert fs.max_write == MiB
    # both request queues (indices 2 and 3) serve the one FUSE session
    for _ in range(4):
        assert c.getattr(ROOT_ID).ino


def test_without_notification_requests_start_at_queue_1(device_factory, connect) -> None:
    dev = device_factory(notification=False)
    c = connect(dev)
    assert not c.fs.notification
    assert c.fs.config.num_request_queues == 1
    assert stat.S_ISDIR(c.getattr(ROOT_ID).mode)


def test_driver_refusing_notification_gets_the_de_facto_layout(device, connect) -> None:
    c = connect(device, notification=False)
    assert not c.fs.notification
    assert stat.S_ISDIR(c.getattr(ROOT_ID).mode)


def test_unknown_opcode_is_enosys(client: FuseClient) -> None:
    with pytest.raises(OSError) as exc:
        client.fs.call(Opcode.BMAP, ROOT_ID, bytes(16))
    assert exc.value.errno == errno.ENOSYS


# -- FUSE operations against the host directory -------------------------------------------
def test_lookup_getattr_read(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "hello.txt").write_bytes(b"hello, reference device\n")
    root = client.getattr(ROOT_ID)
    assert root.ino == export_dir.stat().st_ino and stat.S_ISDIR(root.mode)
    e = client.lookup(ROOT_ID, "hello.txt")
    assert e.attr.size == 24 and e.attr.ino == (export_dir / "hello.txt").stat().st_ino
    h = client.open(e.nodeid)
    assert client.read(e.nodeid, h.fh, 7, 100) == b"reference device\n"
    client.release(e.nodeid, h.fh)
    with pytest.raises(FileNotFoundError):
        client.lookup(ROOT_ID, "missing")


def test_dotdot_of_the_root_stays_inside(client: FuseClient, export_dir: Path) -> None:
    e = client.lookup(ROOT_ID, "..")
    assert e.attr.ino == export_dir.stat().st_ino


def test_create_write_read_one_mib(client: FuseClient, export_dir: Path) -> None:
    data = os.urandom(MiB)
    e, h = client.create(ROOT_ID, "big", 0o640)
    assert client.write(e.nodeid, h.fh, 0, data) == MiB
    assert client.write(e.nodeid, h.fh, MiB, data[:1000]) == 1000
    assert client.read(e.nodeid, h.fh, 0, MiB) == data
    client.flush(e.nodeid, h.fh)
    client.fsync(e.nodeid, h.fh, datasync=True)
    client.release(e.nodeid, h.fh)
    assert (export_dir / "big").read_bytes() == data + data[:1000]
    assert stat.S_IMODE((export_dir / "big").stat().st_mode) == 0o640


def test_setattr_truncate_chmod_times(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "f").write_bytes(b"x" * 100)
    e = client.lookup(ROOT_ID, "f")
    a = client.setattr(e.nodeid, size=10, mode=0o600, atime=1_000_000.5, mtime=2_000_000.25)
    st = (export_dir / "f").stat()
    assert a.size == st.st_size == 10
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime == pytest.approx(2_000_000.25)
    assert st.st_atime == pytest.approx(1_000_000.5)


def test_directories_and_readdir(client: FuseClient, export_dir: Path) -> None:
    d = client.mkdir(ROOT_ID, "dir", 0o750)
    assert stat.S_IMODE((export_dir / "dir").stat().st_mode) == 0o750
    for i in range(50):
        (export_dir / "dir" / f"file-{i:02}").write_text(str(i))
    listing = client.readdir_all(d.nodeid)
    names = sorted(x.name for x in listing)
    inos = {x.name: x.ino for x in listing}
    assert inos[b".."] == export_dir.stat().st_ino
    assert inos[b"."] == (export_dir / "dir").stat().st_ino
    assert names == sorted([b".", b".."] + [f"file-{i:02}".encode() for i in range(50)])
    plus = client.readdir_all(d.nodeid, plus=True)
    by_name = {x.name: x for x in plus}
    entry = by_name[b"file-07"].entry
    assert entry is not None and entry.attr.size == 1
    assert entry.attr.ino == (export_dir / "dir" / "file-07").stat().st_ino
    # small buffers: offsets continue where the last batch stopped
    h = client.opendir(d.nodeid)
    got, off = [], 0
    while batch := client.readdir(d.nodeid, h.fh, off, size=200):
        got += [x.name for x in batch]
        off = batch[-1].off
    client.releasedir(d.nodeid, h.fh)
    assert sorted(got) == names
    with pytest.raises(OSError) as exc:
        client.rmdir(ROOT_ID, "dir")
    assert exc.value.errno == errno.ENOTEMPTY
    shutil.rmtree(export_dir / "dir")
    client.mkdir(ROOT_ID, "empty")
    client.rmdir(ROOT_ID, "empty")
    assert not (export_dir / "empty").exists()


def test_symlink_link_rename_unlink(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "target").write_text("t")
    s = client.symlink(ROOT_ID, "sym", "target")
    assert stat.S_ISLNK(s.attr.mode)
    assert client.readlink(s.nodeid) == b"target"
    assert os.readlink(export_dir / "sym") == "target"
    t = client.lookup(ROOT_ID, "target")
    linked = client.link(t.nodeid, ROOT_ID, "hard")
    assert linked.nodeid == t.nodeid and linked.attr.nlink == 2
    client.rename(ROOT_ID, "hard", ROOT_ID, "moved")
    assert (export_dir / "moved").read_text() == "t"
    RENAME_NOREPLACE = 1
    with pytest.raises(FileExistsError):
        client.rename(ROOT_ID, "moved", ROOT_ID, "target", flags=RENAME_NOREPLACE)
    RENAME_EXCHANGE = 2
    client.rename(ROOT_ID, "sym", ROOT_ID, "moved", flags=RENAME_EXCHANGE)
    assert (export_dir / "sym").read_text() == "t" and os.path.islink(export_dir / "moved")
    client.unlink(ROOT_ID, "moved")
    assert not os.path.lexists(export_dir / "moved")


def test_a_symlink_node_cannot_be_opened(client: FuseClient, export_dir: Path) -> None:
    os.symlink("/etc/hostname", export_dir / "escape")
    e = client.lookup(ROOT_ID, "escape")
    with pytest.raises(OSError) as exc:
        client.open(e.nodeid)
    assert exc.value.errno == errno.ELOOP


def test_mknod_fifo_statfs_access(client: FuseClient, export_dir: Path) -> None:
    e = client.mknod(ROOT_ID, "fifo", stat.S_IFIFO | 0o644)
    assert stat.S_ISFIFO((export_dir / "fifo").stat().st_mode) and stat.S_ISFIFO(e.attr.mode)
    sf = client.statfs()
    host = os.statvfs(export_dir)
    assert sf.bsize == host.f_bsize and sf.namelen == host.f_namemax
    client.access(ROOT_ID, os.R_OK | os.X_OK)


def test_xattrs(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "x").write_text("")
    e = client.lookup(ROOT_ID, "x")
    client.setxattr(e.nodeid, "user.color", b"blue")
    assert os.getxattr(export_dir / "x", "user.color") == b"blue"
    assert client.getxattr(e.nodeid, "user.color") == b"blue"
    assert client.getxattr_size(e.nodeid, "user.color") == 4
    assert b"user.color" in client.listxattr(e.nodeid)
    with pytest.raises(OSError) as exc:
        client.getxattr(e.nodeid, "user.color", size=2)
    assert exc.value.errno == errno.ERANGE
    client.removexattr(e.nodeid, "user.color")
    with pytest.raises(OSError) as exc:
        client.getxattr(e.nodeid, "user.color")
    assert exc.value.errno == errno.ENODATA


def test_fallocate_lseek_copy_file_range(client: FuseClient, export_dir: Path) -> None:
    e, h = client.create(ROOT_ID, "sparse", 0o644)
    client.fallocate(e.nodeid, h.fh, 0, 8192)
    assert (export_dir / "sparse").stat().st_size == 8192
    client.write(e.nodeid, h.fh, 0, b"head")
    client.write(e.nodeid, h.fh, 1 << 20, b"data")
    SEEK_DATA, SEEK_HOLE = 3, 4
    fd = os.open(export_dir / "sparse", os.O_RDONLY)
    try:
        for offset, whence in ((0, SEEK_DATA), (0, SEEK_HOLE), (8192, SEEK_DATA)):
            assert client.lseek(e.nodeid, h.fh, offset, whence) == os.lseek(fd, offset, whence)
    finally:
        os.close(fd)
    e2, h2 = client.create(ROOT_ID, "copy", 0o644)
    n = client.copy_file_range(e.nodeid, h.fh, 1 << 20, e2.nodeid, h2.fh, 0, 4)
    assert n == 4
    client.release(e.nodeid, h.fh)
    client.release(e2.nodeid, h2.fh)
    assert (export_dir / "copy").read_bytes() == b"data"


def test_forget_drops_the_node(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "f").write_text("")
    e = client.lookup(ROOT_ID, "f")
    client.lookup(ROOT_ID, "f")
    client.forget(e.nodeid, 1)
    assert client.getattr(e.nodeid).ino == e.attr.ino  # one lookup left
    client.batch_forget([(e.nodeid, 1)])
    pump([client], lambda: _stale(client, e.nodeid))


def _stale(client: FuseClient, nodeid: int) -> bool:
    try:
        client.getattr(nodeid)
    except OSError as exc:
        return exc.errno == errno.ESTALE
    return False


# -- locks shared by two frontends --------------------------------------------------------
@pytest.fixture
def two(device: RefDevice, connect, export_dir: Path):
    """Two frontends of one device with the same file open."""
    (export_dir / "locked").write_bytes(bytes(1000))
    a, b = connect(device), connect(device)
    ea, eb = a.lookup(ROOT_ID, "locked"), b.lookup(ROOT_ID, "locked")
    ha, hb = a.open(ea.nodeid, os.O_RDWR), b.open(eb.nodeid, os.O_RDWR)
    return (a, ea.nodeid, ha.fh), (b, eb.nodeid, hb.fh)


def test_posix_locks_conflict_across_frontends(two) -> None:
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 1, Lock(0, 99, F_WRLCK, 111))
    with pytest.raises(OSError) as exc:
        b.setlk(nb, fb, 1, Lock(50, 50, F_RDLCK, 222))  # same owner number, other frontend
    assert exc.value.errno == errno.EAGAIN
    b.setlk(nb, fb, 1, Lock(100, 199, F_WRLCK, 222))
    seen_by_b = b.getlk(nb, fb, 2, Lock(0, 10, F_RDLCK, 0))
    assert (seen_by_b.start, seen_by_b.end, seen_by_b.type) == (0, 99, F_WRLCK)
    assert seen_by_b.pid == 0  # another frontend's pid means nothing here
    seen_by_a = a.getlk(na, fa, 2, Lock(150, 150, F_RDLCK, 0))
    assert seen_by_a.type == F_WRLCK and seen_by_a.pid == 0
    own = a.getlk(na, fa, 2, Lock(0, 0, F_WRLCK, 0))  # another owner of the same frontend
    assert own.type == F_WRLCK and own.pid == 111
    assert a.getlk(na, fa, 2, Lock(500, 600, F_WRLCK, 0)).type == F_UNLCK


def test_setlkw_waits_then_is_granted_by_notification(two, device: RefDevice) -> None:
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 1, whole(F_WRLCK))
    pending = b.setlkw_async(nb, fb, 1, whole(F_WRLCK))
    pump([b], lambda: b.fs.lock_waiters == 1)  # the FUSE_LOCK_WAIT reply came
    assert not pending.done and device.locks.waiting() == 1
    a.setlk(na, fa, 1, whole(F_UNLCK))
    pending.result(WAIT_TIMEOUT)
    assert b.fs.stats["lock_notifications"] == 1
    with pytest.raises(OSError) as exc:
        a.setlk(na, fa, 1, Lock(0, 0, F_RDLCK, 0))
    assert exc.value.errno == errno.EAGAIN


def test_setlkw_that_can_be_granted_needs_no_wait(two) -> None:
    (a, na, fa), _ = two
    a.setlkw(na, fa, 1, whole(F_WRLCK), timeout=WAIT_TIMEOUT)
    assert a.fs.stats["lock_waits"] == 0


def test_interrupt_cancels_a_waiting_lock_with_eintr(two, device: RefDevice) -> None:
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 1, whole(F_WRLCK))
    pending = b.setlkw_async(nb, fb, 1, Lock(0, 10, F_RDLCK, 0))
    pump([b], lambda: b.fs.lock_waiters == 1)
    b.interrupt(pending.unique)
    with pytest.raises(OSError) as exc:
        pending.result(WAIT_TIMEOUT)
    assert exc.value.errno == errno.EINTR
    assert device.locks.waiting() == 0
    a.setlk(na, fa, 1, whole(F_UNLCK))  # nothing is granted to the cancelled request
    a.setlk(na, fa, 3, whole(F_WRLCK))


def test_setlkw_that_times_out_is_withdrawn(two, device: RefDevice) -> None:
    """setlkw(timeout=...) that runs out withdraws its request: the device does not
    grant the lock later to nobody (it used to, and then held it for good)."""
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 1, whole(F_WRLCK))
    with pytest.raises(TimeoutError, match="withdrawn"):
        b.setlkw(nb, fb, 1, whole(F_WRLCK), timeout=0.5)
    assert device.locks.waiting() == 0 and b.fs.lock_waiters == 0
    a.setlk(na, fa, 1, whole(F_UNLCK))
    a.setlk(na, fa, 3, whole(F_WRLCK))  # free: nothing went to b's withdrawn request


def test_a_lock_granted_after_its_file_was_flushed_ends_with_the_file(two,
                                                                       device: RefDevice) -> None:
    """A thread closes the fd another thread waits on in F_SETLKW: the kernel sends
    FLUSH while the wait is parked and, after the grant, nothing (its own lock list
    is empty). RELEASE of that open file must end the lock, as on a local file
    system, or it stays held for good."""
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 1, whole(F_WRLCK))
    pending = b.setlkw_async(nb, fb, 5, whole(F_WRLCK))
    pump([b], lambda: b.fs.lock_waiters == 1)
    b.flush(nb, fb, lock_owner=5)  # the other thread's close()
    a.setlk(na, fa, 1, whole(F_UNLCK))
    pending.result(WAIT_TIMEOUT)  # granted (the kernel then answers EBADF itself)
    b.release(nb, fb)  # the last reference to the open file goes
    a.setlk(na, fa, 3, whole(F_WRLCK))  # free again


def test_disconnect_releases_locks_and_wakes_the_other_frontend(two, device: RefDevice) -> None:
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 1, whole(F_WRLCK))
    a.setlk(na, fa, 7, whole(F_WRLCK), flock=True)
    pending = b.setlkw_async(nb, fb, 1, whole(F_WRLCK))
    pump([b], lambda: b.fs.lock_waiters == 1)
    a.fs.close()
    pending.result(WAIT_TIMEOUT)
    b.setlk(nb, fb, 9, whole(F_WRLCK), flock=True)  # a's flock went too


def test_waiting_lock_limit_gives_enolck(device_factory, connect, export_dir: Path) -> None:
    (export_dir / "f").write_text("")
    dev = device_factory(max_waiting_locks=1)
    a, b = connect(dev), connect(dev)
    ea, eb = a.lookup(ROOT_ID, "f"), b.lookup(ROOT_ID, "f")
    ha, hb = a.open(ea.nodeid, os.O_RDWR), b.open(eb.nodeid, os.O_RDWR)
    a.setlk(ea.nodeid, ha.fh, 1, whole(F_WRLCK))
    first = b.setlkw_async(eb.nodeid, hb.fh, 1, whole(F_WRLCK))
    pump([b], lambda: b.fs.lock_waiters == 1)
    with pytest.raises(OSError) as exc:
        b.setlkw(eb.nodeid, hb.fh, 2, whole(F_RDLCK), timeout=WAIT_TIMEOUT)
    assert exc.value.errno == errno.ENOLCK
    a.setlk(ea.nodeid, ha.fh, 1, whole(F_UNLCK))
    first.result(WAIT_TIMEOUT)


def test_flock_is_per_open_file_and_released_on_release(two) -> None:
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 0xF1, whole(F_WRLCK), flock=True)
    with pytest.raises(OSError) as exc:
        b.setlk(nb, fb, 0xF2, whole(F_RDLCK), flock=True)
    assert exc.value.errno == errno.EAGAIN
    b.setlk(nb, fb, 1, whole(F_WRLCK))  # POSIX locks are independent of flock
    pending = b.setlkw_async(nb, fb, 0xF2, whole(F_RDLCK), flock=True)
    pump([b], lambda: b.fs.lock_waiters == 1)
    a.release(na, fa, release_flags=abi.FUSE_RELEASE_FLOCK_UNLOCK, lock_owner=0xF1)
    pending.result(WAIT_TIMEOUT)


def test_flush_releases_the_owners_posix_locks(two) -> None:
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 5, Lock(0, 9, F_WRLCK, 0))
    a.setlk(na, fa, 6, Lock(20, 29, F_WRLCK, 0))
    a.flush(na, fa, lock_owner=5)  # close() by owner 5
    b.setlk(nb, fb, 1, Lock(0, 9, F_WRLCK, 0))
    with pytest.raises(OSError):
        b.setlk(nb, fb, 1, Lock(20, 29, F_WRLCK, 0))


def test_deadlock_between_frontends_is_edeadlk(two) -> None:
    (a, na, fa), (b, nb, fb) = two
    a.setlk(na, fa, 1, Lock(0, 0, F_WRLCK, 0))
    b.setlk(nb, fb, 1, Lock(10, 10, F_WRLCK, 0))
    pending = a.setlkw_async(na, fa, 1, Lock(10, 10, F_WRLCK, 0))
    pump([a], lambda: a.fs.lock_waiters == 1)
    with pytest.raises(OSError) as exc:
        b.setlkw(nb, fb, 1, Lock(0, 0, F_WRLCK, 0), timeout=WAIT_TIMEOUT)
    assert exc.value.errno == errno.EDEADLK
    b.setlk(nb, fb, 1, Lock(10, 10, F_UNLCK, 0))
    pending.result(WAIT_TIMEOUT)


def test_without_notification_a_blocking_lock_is_eopnotsupp(
    device_factory, connect, export_dir: Path
) -> None:
    (export_dir / "f").write_text("")
    dev = device_factory(notification=False)
    a, b = connect(dev), connect(dev)
    ea, eb = a.lookup(ROOT_ID, "f"), b.lookup(ROOT_ID, "f")
    ha, hb = a.open(ea.nodeid, os.O_RDWR), b.open(eb.nodeid, os.O_RDWR)
    a.setlkw(ea.nodeid, ha.fh, 1, whole(F_WRLCK), timeout=WAIT_TIMEOUT)  # grantable: granted
    with pytest.raises(OSError) as exc:
        b.setlkw(eb.nodeid, hb.fh, 1, whole(F_WRLCK), timeout=WAIT_TIMEOUT)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_blocking_locks_give_mutual_exclusion_across_concurrent_frontends(
    device: RefDevice, connect, export_dir: Path
) -> None:
    """Three frontends, each driven by its own thread, increment a counter in a file
    under a whole-file write lock taken with SETLKW: no increment is lost."""
    import threading

    (export_dir / "counter").write_text("0")
    rounds, clients = 25, [connect(device) for _ in range(3)]
    errors: list[BaseException] = []

    def work(c: FuseClient) -> None:
        try:
            count_under_lock(c, "counter", rounds, WAIT_TIMEOUT * 4)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    # a fourth frontend holds the lock until all three wait: contention is certain
    holder = connect(device)
    he = holder.lookup(ROOT_ID, "counter")
    hh = holder.open(he.nodeid, os.O_RDWR)
    holder.setlk(he.nodeid, hh.fh, 9, whole(F_WRLCK))
    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    deadline = time.monotonic() + WAIT_TIMEOUT
    while device.locks.waiting() < len(clients):
        assert time.monotonic() < deadline, "the three frontends never all waited"
        time.sleep(0.01)
    holder.setlk(he.nodeid, hh.fh, 9, whole(F_UNLCK))
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert (export_dir / "counter").read_text() == str(3 * rounds)
    assert sum(c.fs.stats["lock_notifications"] for c in clients) >= len(clients)


def test_notify_lock_code_is_configurable(device_factory, connect, export_dir: Path) -> None:
    (export_dir / "f").write_text("")
    dev = device_factory(notify_lock_code=42)
    a, b = connect(dev, notify_lock_code=42), connect(dev, notify_lock_code=42)
    ea, eb = a.lookup(ROOT_ID, "f"), b.lookup(ROOT_ID, "f")
    ha, hb = a.open(ea.nodeid, os.O_RDWR), b.open(eb.nodeid, os.O_RDWR)
    a.setlk(ea.nodeid, ha.fh, 1, whole(F_WRLCK))
    pending = b.setlkw_async(eb.nodeid, hb.fh, 1, whole(F_RDLCK))
    pump([b], lambda: b.fs.lock_waiters == 1)
    a.flush(ea.nodeid, ha.fh, lock_owner=1)  # close() by the holder
    pending.result(WAIT_TIMEOUT)
    assert b.fs.stats["lock_notifications"] == 1
