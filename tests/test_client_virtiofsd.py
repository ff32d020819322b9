"""Every FUSE client operation against each real device over vhost-user (Debian 12's
C virtiofsd, Debian 13's Rust virtiofsd: the `device_name` fixture), with interrupts
(eventfd) and with polling. Results are checked against the exported directory on
the host side; where the two devices differ (README, device notes), each test
asserts what that device answers."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

import pytest
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import OFFSET_MAX, ROOT_ID, FuseClient, Lock

MiB = 1 << 20


def test_init_negotiates_a_session(client: FuseClient, device_name: str) -> None:
    fs = client.fs
    assert fs.init_out.major == 7
    # FUSE 7.36 from the C virtiofsd, 7.38 from the Rust one (both below our 7.38+)
    assert fs.minor == {"virtiofsd": 36, "virtiofsd-rs": 38}[device_name]
    assert fs.max_write == MiB  # both offer 1 MiB, our slots carry it


def test_config_space_only_on_the_rust_device(client: FuseClient, device_name: str) -> None:
    """The Rust virtiofsd started with --tag has config space (VHOST_USER_PROTOCOL_F_CONFIG):
    the tag and queue count are the device's; the C one has none: they are ours."""
    from backends import DEVICE_TAG

    fs = client.fs
    assert fs.transport.has_config_space == (device_name == "virtiofsd-rs")
    assert fs.config.tag == DEVICE_TAG
    assert fs.config.num_request_queues == 1
    assert fs.config.notify_buf_size is None  # neither has a notification queue


def test_getattr_root_matches_host(client: FuseClient, export_dir: Path) -> None:
    attr = client.getattr(ROOT_ID)
    st = export_dir.stat()
    assert stat.S_ISDIR(attr.mode)
    assert attr.ino == st.st_ino
    assert attr.nlink == st.st_nlink
    assert attr.blksize == st.st_blksize
    assert attr.mtime == pytest.approx(st.st_mtime, abs=1e-6)


def test_lookup_missing_gives_enoent(client: FuseClient) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        client.lookup(ROOT_ID, "nope")
    assert exc.value.errno == errno.ENOENT


def test_create_write_read_release(client: FuseClient, export_dir: Path) -> None:
    entry, fh = client.create(ROOT_ID, "f.txt", 0o640)
    assert client.write(entry.nodeid, fh.fh, 0, b"hello, device") == 13
    assert client.read(entry.nodeid, fh.fh, 7, 100) == b"device"
    client.flush(entry.nodeid, fh.fh)
    client.fsync(entry.nodeid, fh.fh)
    client.fsync(entry.nodeid, fh.fh, datasync=True)
    client.release(entry.nodeid, fh.fh)
    assert (export_dir / "f.txt").read_bytes() == b"hello, device"
    assert stat.S_IMODE((export_dir / "f.txt").stat().st_mode) == 0o640
    client.forget(entry.nodeid)


def test_one_mib_read_and_write_byte_for_byte(client: FuseClient, export_dir: Path) -> None:
    pattern = os.urandom(3 * MiB + 123)
    (export_dir / "big").write_bytes(pattern)
    e = client.lookup(ROOT_ID, "big")
    assert e.attr.size == len(pattern)
    h = client.open(e.nodeid)
    got = bytearray()
    off = 0
    while True:
        chunk = client.read(e.nodeid, h.fh, off, MiB)
        if not chunk:
            break
        got += chunk
        off += len(chunk)
    client.release(e.nodeid, h.fh)
    assert bytes(got) == pattern

    data = os.urandom(MiB)
    e2, h2 = client.create(ROOT_ID, "written", 0o644)
    assert client.write(e2.nodeid, h2.fh, 0, data) == MiB
    assert client.write(e2.nodeid, h2.fh, MiB, data[: MiB // 2]) == MiB // 2
    client.release(e2.nodeid, h2.fh)
    assert (export_dir / "written").read_bytes() == data + data[: MiB // 2]


def test_setattr_truncate_chmod_times(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "a").write_bytes(b"x" * 100)
    e = client.lookup(ROOT_ID, "a")
    attr = client.setattr(e.nodeid, size=10, mode=0o600, atime=1_000_000_000.5,
                          mtime=1_200_000_000.25)
    assert attr.size == 10
    st = (export_dir / "a").stat()
    assert st.st_size == 10
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime == pytest.approx(1_200_000_000.25, abs=1e-6)
    assert st.st_atime == pytest.approx(1_000_000_000.5, abs=1e-6)


def test_symlink_readlink(client: FuseClient, export_dir: Path) -> None:
    e = client.symlink(ROOT_ID, "ln", "target/of/link")
    assert stat.S_ISLNK(e.attr.mode)
    assert client.readlink(e.nodeid) == b"target/of/link"
    assert os.readlink(export_dir / "ln") == "target/of/link"


def test_mknod_fifo_mkdir_rmdir_unlink(client: FuseClient, export_dir: Path) -> None:
    e = client.mknod(ROOT_ID, "fifo", stat.S_IFIFO | 0o644)
    assert stat.S_ISFIFO(e.attr.mode)
    assert stat.S_ISFIFO((export_dir / "fifo").lstat().st_mode)
    d = client.mkdir(ROOT_ID, "dir", 0o755)
    assert stat.S_ISDIR(d.attr.mode)
    assert (export_dir / "dir").is_dir()
    with pytest.raises(OSError) as exc:
        client.rmdir(ROOT_ID, "fifo")
    assert exc.value.errno == errno.ENOTDIR
    client.rmdir(ROOT_ID, "dir")
    client.unlink(ROOT_ID, "fifo")
    assert sorted(os.listdir(export_dir)) == []


def test_rename_of_names_never_looked_up(client: FuseClient, export_dir: Path,
                                         device_name: str) -> None:
    """The C virtiofsd wants the kernel's order (names looked up before a RENAME) and
    gives EIO otherwise; the Rust one renames by name."""
    (export_dir / "a").write_text("A")
    if device_name == "virtiofsd":
        with pytest.raises(OSError) as exc:
            client.rename(ROOT_ID, "a", ROOT_ID, "b")
        assert exc.value.errno == errno.EIO
        assert (export_dir / "a").exists() and not (export_dir / "b").exists()
    else:
        client.rename(ROOT_ID, "a", ROOT_ID, "b")
        assert (export_dir / "b").read_text() == "A" and not (export_dir / "a").exists()


def test_rename_and_rename2_noreplace(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "a").write_text("A")
    (export_dir / "b").write_text("B")
    d = client.mkdir(ROOT_ID, "sub")
    # virtiofsd wants the kernel's order: names are looked up before a rename (else EIO)
    client.lookup(ROOT_ID, "a")
    client.lookup(ROOT_ID, "b")
    client.rename(ROOT_ID, "a", d.nodeid, "moved")
    assert (export_dir / "sub" / "moved").read_text() == "A"
    with pytest.raises(FileExistsError):
        client.rename(d.nodeid, "moved", ROOT_ID, "b", flags=1)  # RENAME_NOREPLACE
    client.rename(d.nodeid, "moved", ROOT_ID, "b")  # replaces
    assert (export_dir / "b").read_text() == "A"


def test_link_counts(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "orig").write_text("data")
    e = client.lookup(ROOT_ID, "orig")
    e2 = client.link(e.nodeid, ROOT_ID, "hard")
    assert e2.attr.nlink == 2
    assert (export_dir / "hard").stat().st_ino == (export_dir / "orig").stat().st_ino


def test_statfs_matches_host(client: FuseClient, export_dir: Path) -> None:
    st = client.statfs()
    host = os.statvfs(export_dir)
    assert st.bsize == host.f_bsize
    assert st.blocks == host.f_blocks
    assert st.namelen == host.f_namemax


def test_access_reports_what_the_device_answers(client: FuseClient, export_dir: Path,
                                                device_name: str) -> None:
    (export_dir / "r").write_text("r")
    os.chmod(export_dir / "r", 0o644)
    e = client.lookup(ROOT_ID, "r")
    if device_name == "virtiofsd":
        # virtiofsd 7.2 has no ACCESS handler (the kernel then checks permissions itself)
        with pytest.raises(OSError) as exc:
            client.access(e.nodeid, os.R_OK)
        assert exc.value.errno == errno.ENOSYS
        return
    # the Rust one answers with its own check (as root: all but X on a 0644 file)
    client.access(e.nodeid, os.R_OK | os.W_OK)
    with pytest.raises(PermissionError) as exc:
        client.access(e.nodeid, os.X_OK)
    assert exc.value.errno == errno.EACCES


def test_xattrs(client: FuseClient, export_dir: Path) -> None:
    (export_dir / "x").write_text("x")
    e = client.lookup(ROOT_ID, "x")
    try:
        client.setxattr(e.nodeid, "user.color", b"blue")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOSYS):
            pytest.fail(f"virtiofsd refused xattrs ({exc}); run it with -o xattr")
        raise
    assert client.getxattr(e.nodeid, "user.color") == b"blue"
    assert client.getxattr_size(e.nodeid, "user.color") == 4
    assert b"user.color" in client.listxattr(e.nodeid)
    assert os.getxattr(export_dir / "x", "user.color") == b"blue"
    client.removexattr(e.nodeid, "user.color")
    with pytest.raises(OSError) as exc:
        client.getxattr(e.nodeid, "user.color")
    assert exc.value.errno == errno.ENODATA


def test_readdir_and_readdirplus(client: FuseClient, export_dir: Path) -> None:
    names = {f"file{i:03d}" for i in range(300)}
    for n in names:
        (export_dir / n).write_text(n)
    plain = client.readdir_all(ROOT_ID)
    assert {d.name.decode() for d in plain} - {".", ".."} == names
    plus = client.readdir_all(ROOT_ID, plus=True)
    by_name = {d.name.decode(): d for d in plus}
    assert set(by_name) - {".", ".."} == names
    e = by_name["file007"].entry
    assert e is not None and e.attr.size == len("file007")
    d = client.opendir(ROOT_ID)
    client.fsyncdir(ROOT_ID, d.fh)
    client.releasedir(ROOT_ID, d.fh)


def test_fallocate_lseek_copy_file_range(client: FuseClient, export_dir: Path) -> None:
    src, hs = client.create(ROOT_ID, "src")
    client.write(src.nodeid, hs.fh, 0, b"0123456789")
    client.fallocate(src.nodeid, hs.fh, 0, 1 << 16)
    assert (export_dir / "src").stat().st_size == 1 << 16
    # sparse: data at 0, hole after, data at 1 MiB
    client.write(src.nodeid, hs.fh, MiB, b"tail")
    try:
        assert client.lseek(src.nodeid, hs.fh, 0, os.SEEK_DATA) == 0
        hole = client.lseek(src.nodeid, hs.fh, 0, os.SEEK_HOLE)
        assert 10 <= hole <= MiB
    except OSError as exc:
        assert exc.errno == errno.ENOSYS, exc  # 7.2 answers ENOSYS when it lacks lseek
    dst, hd = client.create(ROOT_ID, "dst")
    n = client.copy_file_range(src.nodeid, hs.fh, 0, dst.nodeid, hd.fh, 0, 10)
    assert n == 10
    client.release(dst.nodeid, hd.fh)
    assert (export_dir / "dst").read_bytes() == b"0123456789"


def test_posix_locks_as_virtiofsd_answers(client: FuseClient, device_name: str) -> None:
    """Neither device takes over locking with its default options: neither grants
    FUSE_POSIX_LOCKS nor FUSE_FLOCK_LOCKS, so the kernel keeps locks local to the mount
    and sends none of these. Asked anyway, POSIX locks give ENOSYS on both; the C one
    serves flock-style SETLK and refuses flock SETLKW (EOPNOTSUPP), the Rust one gives
    ENOSYS for everything."""
    e, h = client.create(ROOT_ID, "locked")
    assert not client.fs.init_out.flags & ((1 << 1) | (1 << 10))  # POSIX_LOCKS, FLOCK_LOCKS
    whole = Lock(0, OFFSET_MAX, fcntl.F_WRLCK, os.getpid())
    calls = {
        "getlk": lambda: client.getlk(e.nodeid, h.fh, 1, whole),
        "setlk": lambda: client.setlk(e.nodeid, h.fh, 1, whole),
        "setlkw": lambda: client.setlkw(e.nodeid, h.fh, 2, whole, timeout=5),
        "setlk flock": lambda: client.setlk(e.nodeid, h.fh, 1, whole, flock=True),
        "setlkw flock": lambda: client.setlkw(e.nodeid, h.fh, 2, whole, flock=True, timeout=5),
    }
    expected = {name: errno.ENOSYS for name in calls}
    if device_name == "virtiofsd":
        expected.update({"setlk flock": 0, "setlkw flock": errno.EOPNOTSUPP})
    got = {}
    for name, call in calls.items():
        try:
            call()
            got[name] = 0
        except OSError as exc:
            got[name] = exc.errno
    assert got == expected


def test_o_direct_kept_on_created_files_by_the_rust_device(client: FuseClient,
                                                          export_dir: Path,
                                                          device_name: str) -> None:
    """Without --allow-direct-io both devices drop O_DIRECT from OPEN, but the Rust one
    keeps it on CREATE: there a write that is not block-aligned fails with EINVAL."""
    (export_dir / "old").write_bytes(b"")
    old = client.lookup(ROOT_ID, "old")
    h = client.open(old.nodeid, os.O_RDWR | os.O_DIRECT)
    assert client.write(old.nodeid, h.fh, 0, b"hello") == 5
    client.release(old.nodeid, h.fh)
    e, h = client.create(ROOT_ID, "new", 0o644, flags=os.O_RDWR | os.O_DIRECT)
    if device_name == "virtiofsd":
        assert client.write(e.nodeid, h.fh, 0, b"hello") == 5
    else:
        with pytest.raises(OSError) as exc:
            client.write(e.nodeid, h.fh, 0, b"hello")
        assert exc.value.errno == errno.EINVAL
    client.release(e.nodeid, h.fh)


def test_destroy_ends_the_session(client: FuseClient, device_name: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    """The C virtiofsd answers FUSE_DESTROY; the Rust one hands the buffer back with
    nothing written (used length 0), which the driver must take as the end of the
    session, not as a bad reply."""
    client.destroy()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_many_requests_in_flight(client: FuseClient, export_dir: Path) -> None:
    for i in range(8):
        (export_dir / f"p{i}").write_bytes(bytes([i]) * 4096)
    entries = [client.lookup(ROOT_ID, f"p{i}") for i in range(8)]
    pend = [client.submit(Opcode.GETATTR, e.nodeid, b"\0" * 16) for e in entries * 25]
    assert len(pend) == 200  # more than the 64 small slots: submission waits, never fails
    for p in pend:
        p.result(10)
    assert all(p.done for p in pend)
    # reads in flight on every large slot, checked byte for byte
    handles = [client.open(e.nodeid) for e in entries]
    reads = [client.submit(*client.read_request(e.nodeid, h.fh, 0, 4096))
             for e, h in zip(entries, handles, strict=True)]
    for i, r in enumerate(reads):
        assert r.result(10) == bytes([i]) * 4096


def test_backend_killed_mid_request_gives_clear_error(virtiofsd_socket: Path,
                                                     export_dir: Path) -> None:
    import subprocess

    from backends import connect_virtiofsd
    from vfsdrv.errors import DeviceGoneError

    fs = connect_virtiofsd(virtiofsd_socket)
    try:
        client = FuseClient(fs)
        client.init()
        (export_dir / "f").write_bytes(b"x" * MiB)
        e = client.lookup(ROOT_ID, "f")
        h = client.open(e.nodeid)
        pids = subprocess.run(["pgrep", "-f", str(virtiofsd_socket)], capture_output=True,
                              text=True).stdout.split()
        pend = [client.submit(*client.read_request(e.nodeid, h.fh, 0, MiB)) for _ in range(4)]
        for pid in pids:
            os.kill(int(pid), 9)
        t0 = time.monotonic()
        with pytest.raises(DeviceGoneError):
            for p in pend:
                p.result(5)
            client.getattr(ROOT_ID)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(DeviceGoneError):
            client.getattr(ROOT_ID)
    finally:
        fs.close()

