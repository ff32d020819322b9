"""The pyfuse3 frontend mounted for real over vhost-user to each real device (the
`mount` fixture: Debian 12's C virtiofsd, Debian 13's Rust one), exercised with
ordinary programs (cp, mv, ln, chmod, touch, truncate, find, tar, diff) and the
Python file API; every result is checked on the host side.

pyfuse3 keeps one session per process, so each mount is served by a forked child
(`serve()` in its main thread, SIGTERM handling included); the test process only
uses the mount point like any other program would.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import multiprocessing
import os
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyfuse3  # tools/setup-env.sh installs the extra: pip install -e '.[test,pyfuse3]'
import pytest
from backends import device, refdev, virtiofsd
from mounting import mount_points
from vfsdrv.frontends.pyfuse3_frontend import FRESH_INO_BASE, InodeMap
from vfsdrv.fs.config import encode_config
from vfsdrv.fs.device import VirtioFs
from vfsdrv.virtio.vhost_user import VhostUserTransport

MiB = 1 << 20


@dataclass
class Mount:
    path: Path
    export: Path
    proc: multiprocessing.process.BaseProcess
    backend_pid: int
    inject_fd: int
    ack_fd: int
    expect_exitcode: int = 0

    def notify(self, code: int, local: int, name: bytes = b"", child_local: int = 0) -> None:
        """Make the device deliver notification `code` about local inode numbers."""
        os.write(self.inject_fd, _INJECT.pack(code, local, child_local, len(name)) + name)
        ready, _, _ = select.select([self.ack_fd], [], [], 10)
        assert ready and os.read(self.ack_fd, 1) == b"A"


def connect_virtiofsd(sock: Path, *, own_config: bool = True, **fs_options) -> VirtioFs:
    """As tests/conftest.py does (not imported: tests/mount has a conftest too).
    virtiofsd 7.2 has no config space: tag and queue count come from us
    (`own_config`); the reference device has one."""
    transport = (VhostUserTransport(str(sock), config=encode_config("myfs", 1), num_queues=2)
                 if own_config else VhostUserTransport(str(sock)))
    try:
        return VirtioFs(transport, **fs_options).start()
    except BaseException:
        transport.close()
        raise


def _serve_child(sock: str, mnt: str, ready_fd: int, poll: bool, options: list[str],
                 inject_fd: int, ack_fd: int, own_config: bool) -> None:
    from vfsdrv.frontends import pyfuse3_frontend as frontend

    dev = connect_virtiofsd(Path(sock), poll=poll, own_config=own_config)
    ops: list[frontend.DeviceOperations] = []
    real_init = frontend.DeviceOperations.__init__

    def init(self, fs: VirtioFs, *args: object) -> None:
        real_init(self, fs, *args)
        ops.append(self)

    frontend.DeviceOperations.__init__ = init  # type: ignore[method-assign]
    threading.Thread(target=_injector, args=(dev, ops, inject_fd, ack_fd), daemon=True).start()
    try:
        frontend.serve(dev, mnt, options=options, ready=lambda: os.write(ready_fd, b"R"))
    finally:
        dev.close()


_INJECT = struct.Struct("<iQQH")


def _injector(dev: VirtioFs, ops: list, inject_fd: int, ack_fd: int) -> None:
    """Hands the device's on_notify a notification as the notification queue would
    (the device gets (code, local inode numbers, name) from the test)."""
    import trio

    while True:
        req = os.read(inject_fd, 4096)
        if not req:
            return
        code, local, child_local, namelen = _INJECT.unpack_from(req)
        name = req[_INJECT.size:_INJECT.size + namelen]
        nodeid = ops[0].inodes.nodeid(local)
        child = ops[0].inodes.nodeid(child_local) if child_local else 0
        if code == 2:  # INVAL_INODE: all of it
            body = struct.pack("<Qqq", nodeid, 0, 0)
        elif code == 3:  # INVAL_ENTRY
            body = struct.pack("<QII", nodeid, len(name), 0) + name + b"\0"
        elif code == 4:  # STORE: "name" is the data, at offset 0
            body = struct.pack("<QQII", nodeid, 0, len(name), 0) + name
        else:  # DELETE
            body = struct.pack("<QQII", nodeid, child, len(name), 0) + name + b"\0"
        msg = struct.pack("<IiQ", 16 + len(body), code, 0) + body
        trio.from_thread.run_sync(dev.on_notify, code, memoryview(msg),
                                  trio_token=pyfuse3.trio_token)
        os.write(ack_fd, b"A")


def _unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def served(export: Path, mnt: Path, sock: Path, *, poll: bool = False,
           vfsd_args: tuple[str, ...] = (), options: tuple[str, ...] = (),
           backend_name: str = "virtiofsd") -> Iterator[Mount]:
    """virtiofsd (C or Rust: "virtiofsd-rs"; or the reference device) on `export`,
    mounted on `mnt` by a forked child running serve()."""
    start = {
        "virtiofsd": lambda: virtiofsd(export, sock, *vfsd_args),
        "virtiofsd-rs": lambda: device("virtiofsd-rs", export, sock, *vfsd_args),
        "refdev": lambda: refdev(export, sock, "--tag", "refdev"),
    }[backend_name]
    with start() as started:
        backend = getattr(started, "proc", started)  # a Popen, or the launcher's Backend
        r, w = os.pipe()
        inject_r, inject_w = os.pipe()
        ack_r, ack_w = os.pipe()
        proc = multiprocessing.get_context("fork").Process(
            target=_serve_child,
            args=(str(sock), str(mnt), w, poll, list(options), inject_r, ack_w,
                  backend_name == "virtiofsd"))
        proc.start()
        for fd in (w, inject_r, ack_w):
            os.close(fd)
        try:
            ready, _, _ = select.select([r], [], [], 30)
            assert ready and os.read(r, 1) == b"R", "the pyfuse3 frontend did not come up"
            assert os.path.ismount(mnt)
            m = Mount(mnt, export, proc, backend.pid, inject_w, ack_r)
            yield m
        finally:
            for fd in (r, inject_w, ack_r):
                os.close(fd)
            try:
                _unmount(mnt)
            finally:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                    subprocess.run(["umount", "-l", str(mnt)], check=False)
        assert proc.exitcode == m.expect_exitcode, f"frontend exited with {proc.exitcode}"
        assert not os.path.ismount(mnt)


@pytest.fixture(params=["interrupt", "poll"])
def mount(request, tmp_path: Path, export_dir: Path, device_name: str) -> Iterator[Mount]:
    """A pyfuse3 mount of each real device (`device_name`), interrupts and polling."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served(export_dir, mnt, tmp_path / "vfsd.sock", poll=request.param == "poll",
                backend_name=device_name) as m:
        yield m


def run(*cmd: str, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd}: {done.stderr}"
    return done.stdout


# -- the mount itself ---------------------------------------------------------------------------
def test_mount_is_fuse_with_default_permissions(mount: Mount) -> None:
    line = next(x for x in Path("/proc/self/mounts").read_text().splitlines()
                if x.split()[1] == str(mount.path))
    source, _mp, fstype, opts = line.split()[:4]
    assert source == "myfs"
    assert fstype == "fuse.vfsdrv"
    assert "default_permissions" in opts.split(",")
    root = os.stat(mount.path)
    assert root.st_ino == 1 and stat.S_ISDIR(root.st_mode)


def test_statfs_matches_the_host(mount: Mount) -> None:
    ours, host = os.statvfs(mount.path), os.statvfs(mount.export)
    assert ours.f_bsize == host.f_bsize
    assert ours.f_blocks == host.f_blocks
    assert ours.f_namemax == host.f_namemax
    assert ours.f_files == host.f_files
    assert abs(ours.f_bfree - host.f_bfree) < host.f_blocks // 100 + 1024
    run("df", str(mount.path))


def test_sigterm_unmounts_and_exits_cleanly(mount: Mount) -> None:
    (mount.path / "f").write_text("before")
    os.kill(mount.proc.pid, signal.SIGTERM)
    mount.proc.join(30)
    assert mount.proc.exitcode == 0
    assert not os.path.ismount(mount.path)
    assert (mount.export / "f").read_text() == "before"


# -- programs ---------------------------------------------------------------------------------
def test_cp_in_and_out_byte_for_byte(mount: Mount, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 4321)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    run("cp", str(src), str(mount.path / "in.bin"))
    assert (mount.export / "in.bin").read_bytes() == data
    (mount.export / "host.bin").write_bytes(data[::-1])
    run("cp", str(mount.path / "host.bin"), str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == data[::-1]
    run("cmp", str(mount.path / "in.bin"), str(src))


def test_mv_within_and_across_directories(mount: Mount) -> None:
    (mount.export / "a").mkdir()
    (mount.export / "b").mkdir()
    (mount.export / "a" / "f").write_text("payload")
    run("mv", str(mount.path / "a" / "f"), str(mount.path / "a" / "g"))
    run("mv", str(mount.path / "a" / "g"), str(mount.path / "b" / "h"))
    run("mv", str(mount.path / "a"), str(mount.path / "b" / "a2"))
    assert (mount.export / "b" / "h").read_text() == "payload"
    assert (mount.export / "b" / "a2").is_dir()
    assert not (mount.export / "a").exists()


def test_rename_over_an_existing_file(mount: Mount) -> None:
    (mount.export / "old").write_text("old contents")
    (mount.export / "new").write_text("new contents")
    with open(mount.path / "old") as still_open:
        os.rename(mount.path / "new", mount.path / "old")
        assert still_open.read() == "old contents"  # the replaced inode lives on
    assert (mount.export / "old").read_text() == "new contents"
    assert not (mount.path / "new").exists()
    assert sorted(os.listdir(mount.path)) == ["old"]


def test_rename_noreplace_and_exchange(mount: Mount) -> None:
    (mount.export / "x").write_text("x")
    (mount.export / "y").write_text("y")
    run("mv", "--no-clobber", str(mount.path / "x"), str(mount.path / "y"))
    assert (mount.export / "y").read_text() == "y"
    done = subprocess.run(["mv", "--exchange", str(mount.path / "x"), str(mount.path / "y")],
                          capture_output=True, text=True)
    if done.returncode == 0:  # coreutils >= 9.5 only
        assert (mount.export / "x").read_text() == "y"
        assert (mount.export / "y").read_text() == "x"


def test_hard_and_symbolic_links(mount: Mount) -> None:
    (mount.export / "target").write_text("t")
    run("ln", str(mount.path / "target"), str(mount.path / "hard"))
    run("ln", "-s", "target", str(mount.path / "soft"))
    a, b = os.stat(mount.path / "target"), os.stat(mount.path / "hard")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert os.stat(mount.export / "hard").st_ino == os.stat(mount.export / "target").st_ino
    assert os.readlink(mount.path / "soft") == "target"
    assert os.readlink(mount.export / "soft") == "target"
    assert (mount.path / "soft").read_text() == "t"
    assert run("readlink", "-f", str(mount.path / "soft")).strip() == str(mount.path / "target")


def test_inode_numbers_are_the_hosts(mount: Mount) -> None:
    (mount.export / "f").write_text("")
    (mount.export / "d").mkdir()
    for name in ("f", "d"):
        assert os.stat(mount.path / name).st_ino == os.stat(mount.export / name).st_ino
    listed = {e.name: e.inode() for e in os.scandir(mount.path)}
    assert listed == {"f": os.stat(mount.export / "f").st_ino,
                      "d": os.stat(mount.export / "d").st_ino}


def test_chmod_touch_truncate(mount: Mount) -> None:
    f = mount.path / "f"
    run("touch", str(f))
    run("chmod", "0604", str(f))
    assert stat.S_IMODE(os.stat(mount.export / "f").st_mode) == 0o604
    run("touch", "-d", "2001-02-03 04:05:06.123456789", str(f))
    host = os.stat(mount.export / "f")
    want = int(time.mktime((2001, 2, 3, 4, 5, 6, 0, 0, -1))) * 10**9 + 123456789
    assert host.st_mtime_ns == want
    assert os.stat(f).st_mtime_ns == want
    run("truncate", "-s", "12345", str(f))
    assert os.stat(mount.export / "f").st_size == 12345
    run("truncate", "-s", "7", str(f))
    assert (mount.export / "f").read_bytes() == bytes(7)


def test_umask_applies_to_new_files(mount: Mount) -> None:
    run("sh", "-c", f"umask 027 && touch {mount.path}/f && mkdir {mount.path}/d")
    assert stat.S_IMODE(os.stat(mount.export / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mount.export / "d").st_mode) == 0o750


def test_mkdir_rmdir_unlink_mkfifo(mount: Mount) -> None:
    run("mkdir", "-p", str(mount.path / "a" / "b" / "c"))
    assert (mount.export / "a" / "b" / "c").is_dir()
    with pytest.raises(OSError) as exc:
        os.rmdir(mount.path / "a")
    assert exc.value.errno == errno.ENOTEMPTY
    run("mkfifo", str(mount.path / "a" / "fifo"))
    assert stat.S_ISFIFO(os.stat(mount.export / "a" / "fifo").st_mode)
    os.unlink(mount.path / "a" / "fifo")
    run("rm", "-r", str(mount.path / "a"))
    assert list(mount.export.iterdir()) == []


def test_find_lists_a_large_tree(mount: Mount) -> None:
    # several READDIRPLUS chunks per directory, long names, nested directories
    for d in range(3):
        sub = mount.export / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for i in range(150):
            (sub.parent / f"file-{i:04d}-{'x' * 60}").write_text(str(i))
        (sub / "leaf").write_text("leaf")
    host = sorted(run("find", ".", cwd=mount.export).splitlines())
    ours = sorted(run("find", ".", cwd=mount.path).splitlines())
    assert ours == host and len(ours) == 1 + 3 * (2 + 150 + 1)
    assert run("find", ".", "-name", "leaf", "-type", "f", cwd=mount.path).count("leaf") == 3
    assert sorted(os.listdir(mount.path / "dir1")) == sorted(os.listdir(mount.export / "dir1"))
    # ls -a shows . and .. too
    assert run("ls", "-a", str(mount.path / "dir0")).splitlines()[:2] == [".", ".."]


def test_tar_out_and_in_then_diff(mount: Mount, tmp_path: Path) -> None:
    tree = mount.export / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n" * 1000)
    (tree / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (tree / "sub" / "deeper" / "empty").write_bytes(b"")
    os.symlink("../a.txt", tree / "sub" / "link")
    os.link(tree / "a.txt", tree / "sub" / "hard")
    os.chmod(tree / "sub" / "b.bin", 0o600)
    archive = tmp_path / "out.tar"
    # out of the mount; the pax format keeps nanosecond times
    run("tar", "--format=posix", "-cf", str(archive), "-C", str(mount.path), "tree")
    listing = run("tar", "-tvf", str(archive))  # the hard link is stored as one
    assert ("tree/sub/hard link to tree/a.txt" in listing
            or "tree/a.txt link to tree/sub/hard" in listing), listing
    (mount.path / "copy").mkdir()
    run("tar", "-xpf", str(archive), "-C", str(mount.path / "copy"))  # into the mount
    run("diff", "-r", str(tree), str(mount.export / "copy" / "tree"))
    run("diff", "-r", "--no-dereference", str(mount.path / "tree"), str(mount.path / "copy/tree"))
    copied = mount.export / "copy" / "tree"
    assert os.readlink(copied / "sub" / "link") == "../a.txt"
    assert os.stat(copied / "sub" / "hard").st_ino == os.stat(copied / "a.txt").st_ino
    assert stat.S_IMODE(os.stat(copied / "sub" / "b.bin").st_mode) == 0o600
    assert os.stat(copied / "a.txt").st_mtime_ns == os.stat(tree / "a.txt").st_mtime_ns


# -- the Python file API ----------------------------------------------------------------------
def test_python_file_api_seek_append_fsync(mount: Mount) -> None:
    p = mount.path / "f"
    with open(p, "wb") as f:
        f.write(b"0123456789")
        f.seek(20)
        f.write(b"end")
        f.flush()
        os.fsync(f.fileno())
        os.fdatasync(f.fileno())
    assert (mount.export / "f").read_bytes() == b"0123456789" + bytes(10) + b"end"
    with open(p, "ab") as f:
        f.write(b"+more")
    with open(p, "r+b") as f:
        f.seek(2)
        f.write(b"XY")
        f.seek(0)
        assert f.read(5) == b"01XY4"
        os.ftruncate(f.fileno(), 4)
        os.fchmod(f.fileno(), 0o611)
    assert (mount.export / "f").read_bytes() == b"01XY"
    assert stat.S_IMODE(os.stat(mount.export / "f").st_mode) == 0o611
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(FileNotFoundError):
        open(mount.path / "missing")
    d = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(d)
    finally:
        os.close(d)


def test_mmap_shared_write_and_read(mount: Mount) -> None:
    p = mount.path / "mapped"
    size = 3 * mmap.PAGESIZE + 100
    with open(p, "wb") as f:
        f.truncate(size)
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        m[0:5] = b"hello"
        m[size - 5:size] = b"world"
        m.flush()
    data = (mount.export / "mapped").read_bytes()
    assert data[:5] == b"hello" and data[-5:] == b"world" and len(data) == size
    (mount.export / "host").write_bytes(b"from the host" + bytes(5000))
    with open(mount.path / "host", "rb") as f, mmap.mmap(f.fileno(), 0,
                                                          prot=mmap.PROT_READ) as m:
        assert m[:13] == b"from the host"


def test_xattrs(mount: Mount) -> None:
    p = mount.path / "f"
    p.write_text("x")
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(mount.export / "f", "user.color") == b"blue"
    assert os.getxattr(p, "user.color") == b"blue"
    big = os.urandom(3000)  # ext4 keeps all of a file's xattrs in one 4 KiB block
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    assert set(os.listxattr(p)) >= {"user.color", "user.big"}
    os.removexattr(p, "user.color")
    assert "user.color" not in os.listxattr(mount.export / "f")
    with pytest.raises(OSError) as exc:
        os.getxattr(p, "user.color")
    assert exc.value.errno == errno.ENODATA
    run("setfattr", "-n", "user.tool", "-v", "yes", str(p))
    assert "yes" in run("getfattr", "-n", "user.tool", str(p))


def test_parallel_readers_and_writers(mount: Mount) -> None:
    blobs = {f"f{i}": os.urandom(2 * MiB + i) for i in range(8)}
    errors: list[BaseException] = []

    def work(name: str, data: bytes) -> None:
        try:
            (mount.path / name).write_bytes(data)
            for _ in range(3):
                assert (mount.path / name).read_bytes() == data
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=item) for item in blobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for name, data in blobs.items():
        assert (mount.export / name).read_bytes() == data


# -- locks: what pyfuse3 gives ----------------------------------------------------------------
_LOCK_PROBE = """
import fcntl, sys
f = open(sys.argv[1], "r+")
try:
    fcntl.{fn}(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
sys.exit(0)
"""


def _can_lock(path: Path, fn: str) -> bool:
    code = _LOCK_PROBE.format(fn=fn)
    return subprocess.run([sys.executable, "-c", code, str(path)], timeout=30).returncode == 0


@pytest.mark.parametrize("fn", ["lockf", "flock"])
def test_locks_are_local_to_the_mount(mount: Mount, fn: str) -> None:
    """pyfuse3 has no getlk/setlk/flock handlers, so libfuse does not ask for
    POSIX_LOCKS/FLOCK_LOCKS and the kernel grants locks itself: they conflict
    between processes using the mount, but the device (and so the host) never
    sees them."""
    (mount.export / "f").write_text("lock me")
    with open(mount.path / "f", "r+") as f:
        getattr(fcntl, fn)(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not _can_lock(mount.path / "f", fn)  # another process on the mount
        assert _can_lock(mount.export / "f", fn)  # the host: not forwarded
        getattr(fcntl, fn)(f, fcntl.LOCK_UN)
    assert _can_lock(mount.path / "f", fn)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value: version 2, then (tag, perm, id) entries."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_acls_when_the_device_stores_them(tmp_path: Path, export_dir: Path) -> None:
    """With virtiofsd -o posix_acl the device grants FUSE_POSIX_ACL, so the frontend
    asks the kernel for ACL checks too: an ACL entry set through the mount opens
    a 0600 file to another user (allow_other lets that user into the mount)."""
    nobody = 65534
    any_id = 0xFFFFFFFF
    top = Path(tempfile.mkdtemp(prefix="vfsdrv-acl-"))
    try:
        top.chmod(0o755)
        mnt = top / "mnt"
        mnt.mkdir()
        with served(export_dir, mnt, tmp_path / "vfsd.sock", vfsd_args=("-o", "posix_acl"),
                    options=("allow_other",)):
            (mnt / "f").write_text("secret")
            os.chmod(mnt / "f", 0o600)

            def can_read() -> bool:
                return subprocess.run(["cat", str(mnt / "f")], user=nobody, group=nobody,
                                      capture_output=True).returncode == 0

            assert not can_read()
            acl = _acl((0x01, 6, any_id), (0x02, 4, nobody), (0x04, 0, any_id),
                       (0x10, 4, any_id), (0x20, 0, any_id))
            os.setxattr(mnt / "f", "system.posix_acl_access", acl)
            assert os.getxattr(export_dir / "f", "system.posix_acl_access") == acl
            assert stat.S_IMODE(os.stat(mnt / "f").st_mode) == 0o640  # group bits = mask
            assert can_read()
    finally:
        shutil.rmtree(top)


# -- device notifications ------------------------------------------------------------------
def _eventually(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the kernel still shows the cached state"
        time.sleep(0.02)


def test_device_notifications_reach_the_kernel(tmp_path: Path, export_dir: Path) -> None:
    """With cache=always the kernel keeps entries and attributes for a day: only a
    notification from the device makes it see changes made on the host.
    INVAL_INODE, INVAL_ENTRY, DELETE and STORE go through pyfuse3 to the kernel."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (export_dir / "f").write_text("old")
    (export_dir / "e").write_text("entry")
    (export_dir / "d").write_text("doomed")
    with served(export_dir, mnt, tmp_path / "vfsd.sock",
                vfsd_args=("-o", "cache=always")) as m:
        assert (mnt / "f").read_text() == "old"
        ino_f, ino_d = os.stat(mnt / "f").st_ino, os.stat(mnt / "d").st_ino
        assert (mnt / "e").exists() and (mnt / "d").exists()
        (export_dir / "f").write_text("much newer contents")
        os.rename(export_dir / "e", export_dir / "e2")
        os.unlink(export_dir / "d")
        time.sleep(0.3)
        assert os.stat(mnt / "f").st_size == 3  # cached: the device has not told yet
        assert (mnt / "e").exists()

        m.notify(2, ino_f)  # FUSE_NOTIFY_INVAL_INODE
        _eventually(lambda: os.stat(mnt / "f").st_size == len("much newer contents"))
        assert (mnt / "f").read_text() == "much newer contents"

        m.notify(3, 1, b"e")  # FUSE_NOTIFY_INVAL_ENTRY in the root
        _eventually(lambda: not (mnt / "e").exists())
        assert (mnt / "e2").read_text() == "entry"

        m.notify(6, 1, b"d", child_local=ino_d)  # FUSE_NOTIFY_DELETE
        # wait on the dentry itself: listdir may already come from the device
        _eventually(lambda: not (mnt / "d").exists())
        assert "d" not in os.listdir(mnt)

        # FUSE_NOTIFY_STORE: data put into the kernel's page cache, not on the host
        m.notify(4, ino_f, b"MUCH")
        with open(mnt / "f") as f:
            assert f.read() == "MUCH newer contents"
        assert (export_dir / "f").read_text() == "much newer contents"


def test_notification_mapping() -> None:
    """Device nodeids become local numbers; unknown inodes and codes are dropped."""
    import functools

    from vfsdrv.frontends.pyfuse3_frontend import DeviceOperations

    ops = DeviceOperations.__new__(DeviceOperations)
    ops.inodes = InodeMap()
    ops._dropped_codes = set()
    local = ops.inodes.add(77, 4242)
    act = ops.notification(2, struct.pack("<Qqq", 77, -1, 0))
    assert isinstance(act, functools.partial)
    assert act.func is pyfuse3.invalidate_inode and act.args == (local,)
    assert act.keywords == {"attr_only": True}
    assert ops.notification(2, struct.pack("<Qqq", 78, 0, 0)) is None  # never seen
    act = ops.notification(6, struct.pack("<QQII", 1, 77, 1, 0) + b"x\0")
    assert act.args == (1, b"x") and act.keywords == {"deleted": local}
    with pytest.raises(ValueError):
        ops.notification(3, struct.pack("<QII", 1, 50, 0) + b"short")
    act = ops.notification(4, struct.pack("<QQII", 77, 8, 3, 0) + b"abc")
    assert act.func is pyfuse3.notify_store and act.args == (local, 8, b"abc")
    assert ops.notification(5, struct.pack("<QQQII", 1, 77, 0, 10, 0)) is None  # RETRIEVE


# -- operations pyfuse3 has no handler for ----------------------------------------------------
def test_operations_without_a_pyfuse3_handler(mount: Mount) -> None:
    """fallocate, O_TMPFILE and ioctl fail as on any FUSE file system without
    them; copy_file_range, lseek(SEEK_DATA/SEEK_HOLE) and posix_fallocate work
    through the kernel's or glibc's generic fallbacks."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    p = mount.path / "f"
    p.write_bytes(b"a" * 10000)
    fd = os.open(p, os.O_RDWR)
    out = os.open(mount.path / "g", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for mode in (0, 3):  # plain, and FALLOC_FL_PUNCH_HOLE | KEEP_SIZE
            assert libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(4096)) == -1
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        os.posix_fallocate(fd, 0, 1 << 20)  # glibc writes the blocks instead
        assert os.stat(mount.export / "f").st_size == 1 << 20
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 1 << 20  # the whole file is "data"
        assert os.copy_file_range(fd, out, 5000, 0, 0) == 5000
        assert (mount.export / "g").read_bytes() == b"a" * 5000
        with pytest.raises(OSError) as exc:
            fcntl.ioctl(fd, 0x80086601, bytearray(8))  # FS_IOC_GETFLAGS
        assert exc.value.errno == errno.ENOTTY
    finally:
        os.close(fd)
        os.close(out)
    with pytest.raises(OSError) as exc:
        os.open(mount.path, os.O_TMPFILE | os.O_RDWR, 0o600)
    assert exc.value.errno == errno.EOPNOTSUPP


# -- lookup counts ------------------------------------------------------------------------
def _backend_fds(pid: int) -> int:
    """Open fds of virtiofsd and its children (it forks into its sandbox)."""
    total = len(os.listdir(f"/proc/{pid}/fd"))
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            total += _backend_fds(int(child))
    return total


def test_forgets_reach_the_device(mount: Mount) -> None:
    """virtiofsd keeps one O_PATH fd per inode it has handed out: after the kernel
    drops its inodes, the frontend's FORGETs must let virtiofsd close them."""
    for i in range(300):
        (mount.export / f"f{i}").write_text(str(i))
    before = _backend_fds(mount.backend_pid)
    for i in range(300):
        os.stat(mount.path / f"f{i}")
    run("ls", "-l", str(mount.path))
    assert _backend_fds(mount.backend_pid) >= before + 300
    deadline = time.monotonic() + 20
    while True:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("2")
        if _backend_fds(mount.backend_pid) <= before + 10:
            break
        assert time.monotonic() < deadline, (
            f"virtiofsd still holds {_backend_fds(mount.backend_pid) - before} inodes")
        time.sleep(0.2)
    for i in range(0, 300, 7):  # and the names still resolve afterwards
        assert (mount.path / f"f{i}").read_text() == str(i)


# -- the project's reference device ---------------------------------------------------------
def test_programs_over_the_reference_device(tmp_path: Path, export_dir: Path) -> None:
    """The same frontend over a second real device: vfsdrv's reference device
    (config space with its own tag, notification queue offered)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = export_dir / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n" * 500)
    (tree / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    with served(export_dir, mnt, tmp_path / "refdev.sock", backend_name="refdev"):
        line = next(x for x in Path("/proc/self/mounts").read_text().splitlines()
                    if x.split()[1] == str(mnt))
        assert line.split()[0] == "refdev"
        run("cp", "-a", str(mnt / "tree"), str(mnt / "copy"))
        run("diff", "-r", str(tree), str(export_dir / "copy"))
        run("mv", str(mnt / "copy" / "a.txt"), str(mnt / "copy" / "moved.txt"))
        run("ln", "-s", "moved.txt", str(mnt / "copy" / "link"))
        run("ln", str(mnt / "copy" / "moved.txt"), str(mnt / "copy" / "hard"))
        assert (export_dir / "copy" / "link").read_text() == "alpha\n" * 500
        assert os.stat(mnt / "copy" / "hard").st_nlink == 2
        run("truncate", "-s", "10", str(mnt / "copy" / "moved.txt"))
        assert (export_dir / "copy" / "moved.txt").read_text() == "alpha\nalph"
        host = sorted(run("find", ".", cwd=export_dir).splitlines())
        assert sorted(run("find", ".", cwd=mnt).splitlines()) == host
        archive = tmp_path / "t.tar"
        run("tar", "-cf", str(archive), "-C", str(mnt), "tree")
        run("tar", "-xf", str(archive), "-C", str(mnt / "copy"))
        run("diff", "-r", str(tree), str(export_dir / "copy" / "tree"))
        assert os.statvfs(mnt).f_blocks == os.statvfs(export_dir).f_blocks


# -- the inode map alone -------------------------------------------------------------------------
def test_inode_map_counts_and_forgets() -> None:
    m = InodeMap()
    assert m.nodeid(1) == 1
    a = m.add(10, 5000)
    assert a == 5000 and m.add(10, 5000) == 5000 and m.count(5000) == 2
    assert m.forget(5000, 1) == (10, 1) and m.count(5000) == 1
    assert m.forget(5000, 1) == (10, 1) and m.local_of(10) is None
    assert m.forget(5000, 1) is None  # already gone: nothing reaches the device
    m.add(10, 5000)
    assert m.forget(5000, 3) == (10, 1)  # never more than the device counted
    with pytest.raises(pyfuse3.FUSEError):
        m.nodeid(5000)
    assert m.forget(1, 1) is None and m.nodeid(1) == 1  # the root is never dropped


def test_inode_map_avoids_collisions() -> None:
    m = InodeMap()
    assert m.add(10, 5000) == 5000
    assert m.add(11, 5000) == FRESH_INO_BASE  # same host number, other device inode
    assert m.add(12, 1) == FRESH_INO_BASE + 1  # host inode 1 would be our root
    assert m.add(13, 0) == FRESH_INO_BASE + 2
    assert m.nodeid(FRESH_INO_BASE) == 11 and m.nodeid(5000) == 10


# -- many requests in flight -----------------------------------------------------------------
@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_requests_overlap_and_wait_for_free_buffers(tmp_path: Path, export_dir: Path,
                                                    poll: bool) -> None:
    """TrioDevice keeps many requests in flight (all are sent before the first
    reply is awaited) and, with far fewer DMA buffers than requests, waits for
    free ones instead of blocking the event loop."""
    import trio
    from vfsdrv.frontends.pyfuse3_frontend import TrioDevice
    from vfsdrv.fs import abi
    from vfsdrv.fs.abi import Opcode
    from vfsdrv.fs.client import ROOT_ID, FuseClient

    data = os.urandom(64 * 1024)
    (export_dir / "f").write_bytes(data)
    sock = tmp_path / "vfsd.sock"
    with virtiofsd(export_dir, sock):
        fs = connect_virtiofsd(sock, poll=poll, small_slots=3, large_slots=2)
        try:
            fs.init()
            client = FuseClient(fs)
            node = client.lookup(ROOT_ID, "f").nodeid
            fh = client.open(node).fh
            events: list[str] = []
            results: dict[int, bytes] = {}
            dev = TrioDevice(fs)
            real = fs.call_async

            def logged(*args, **kwargs):
                events.append("sent")
                return real(*args, **kwargs)

            fs.call_async = logged  # type: ignore[method-assign]

            async def one(i: int) -> None:
                off = (i % 16) * 4096
                body = abi.pack("fuse_read_in", fh=fh, offset=off, size=4096)
                results[i] = await dev.call(Opcode.READ, node, body)
                events.append("done")

            async def main() -> None:
                async with trio.open_nursery() as n:
                    n.start_soon(dev.pump)
                    async with trio.open_nursery() as work:
                        for i in range(40):
                            work.start_soon(one, i)
                    n.cancel_scope.cancel()

            trio.run(main)
            fs.call_async = real  # type: ignore[method-assign]
            assert len(results) == 40
            for i, got in results.items():
                off = (i % 16) * 4096
                assert got == data[off:off + 4096]
            assert events.index("done") >= 2  # two READs (large buffers) were in flight
            assert events.count("sent") == 40
            client.release(node, fh)
        finally:
            fs.close()


# -- failures -------------------------------------------------------------------------------
def test_backend_killed_while_mounted_leaves_a_disconnected_mount(mount: Mount) -> None:
    """As a dead FUSE daemon's: the mount stays and answers ENOTCONN until unmounted,
    so nothing a program writes lands in the directory underneath."""
    (mount.path / "f").write_text("x")
    os.killpg(os.getpgid(mount.backend_pid), signal.SIGKILL)
    mount.proc.join(30)
    assert mount.proc.exitcode == 1  # noticed, raised DeviceGoneError
    mount.expect_exitcode = 1
    assert str(mount.path) in mount_points()  # (a stat of it would say ENOTCONN)
    with pytest.raises(OSError) as err:
        (mount.path / "g").write_text("lost?")
    assert err.value.errno == errno.ENOTCONN
    subprocess.run(["umount", str(mount.path)], check=True, timeout=30)
    assert str(mount.path) not in mount_points() and os.listdir(mount.path) == []


def test_mounting_on_a_missing_directory_fails_cleanly(tmp_path: Path,
                                                       export_dir: Path) -> None:
    from vfsdrv.frontends.base import FrontendError

    sock = tmp_path / "vfsd.sock"
    with virtiofsd(export_dir, sock):
        r, w = os.pipe()

        def child() -> None:
            from vfsdrv.frontends.pyfuse3_frontend import serve

            dev = connect_virtiofsd(sock)
            try:
                serve(dev, str(tmp_path / "nope"), options=[])
            except FrontendError:
                os.write(w, b"F")
            finally:
                dev.close()

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(30)
        os.close(w)
        assert os.read(r, 1) == b"F"
        os.close(r)
    assert proc.exitcode == 0


# -- times before 1970 ---------------------------------------------------------------------------
#: 1960-01-01T00:00:00.25 UTC and 1969-12-31T23:59:59.5 UTC, in ns
OLD_ATIME_NS = -315619200 * 10**9 + 250_000_000
OLD_MTIME_NS = -500_000_000
#: 2300-01-01T00:00:00.75 UTC
FUTURE_NS = 10413792000 * 10**9 + 750_000_000


@pytest.mark.parametrize("backend_name", ["virtiofsd", "virtiofsd-rs", "refdev"])
def test_times_before_1970(tmp_path: Path, export_dir: Path, backend_name: str) -> None:
    """FUSE's time seconds are u64 on the wire, signed for the kernel: a file dated
    before 1970 is listed and stat'ed, and such times are set, through the mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (export_dir / "old").write_text("x")
    os.utime(export_dir / "old", ns=(OLD_ATIME_NS, OLD_MTIME_NS))
    (export_dir / "future").write_text("z")  # past 2262: more ns than an int64 holds
    os.utime(export_dir / "future", ns=(FUTURE_NS, FUTURE_NS))
    with served(export_dir, mnt, tmp_path / "dev.sock", backend_name=backend_name):
        assert sorted(os.listdir(mnt)) == ["future", "old"]
        assert os.stat(mnt / "future").st_mtime_ns == FUTURE_NS
        listing = subprocess.run(["ls", "-l", "--time-style=+%Y-%m-%d", str(mnt)],
                                 capture_output=True, text=True, timeout=30,
                                 env={**os.environ, "TZ": "UTC"})
        assert listing.returncode == 0 and " 1969-12-31 old" in listing.stdout, listing.stderr
        st = os.stat(mnt / "old")
        assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_ATIME_NS, OLD_MTIME_NS)

        (mnt / "new").write_text("y")
        os.utime(mnt / "new", ns=(OLD_ATIME_NS, OLD_MTIME_NS))
        host = os.stat(export_dir / "new")
        assert (host.st_atime_ns, host.st_mtime_ns) == (OLD_ATIME_NS, OLD_MTIME_NS)
        st = os.stat(mnt / "new")
        assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_ATIME_NS, OLD_MTIME_NS)
        run("touch", "-d", "1960-01-01 00:00:00 UTC", str(mnt / "g"))
        assert os.stat(export_dir / "g").st_mtime == -315619200
        assert os.stat(mnt / "g").st_mtime == -315619200
