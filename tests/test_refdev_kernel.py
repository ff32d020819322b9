"""The reference device's FUSE server checked against the Linux FUSE client itself:
the server is mounted straight on /dev/fuse (no virtqueues in between) and real
tools run on the mount: tar, diff, cp -a, mmap, fcntl and flock locks. What the
kernel sends is what the driver's relay will forward to the device."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


#: runs in its own process: a page fault on the mount taken while holding the GIL
#: (mmap) would otherwise wait for a server thread that needs that same GIL
SERVER = """
import ctypes, errno, os, sys
from vfsdrv.refdev.fuse_server import MAX_WRITE, FuseServer
from vfsdrv.refdev.lock_table import LockTable

source, mnt = sys.argv[1], sys.argv[2]
fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
libc = ctypes.CDLL(None, use_errno=True)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
if libc.mount(b"refdev", mnt.encode(), b"fuse.refdevtest", 0, opts):
    sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
server = FuseServer(source, 1, LockTable())
print("mounted", flush=True)
while True:
    try:
        request = os.read(fd, MAX_WRITE + 8192)
    except OSError as exc:
        if exc.errno == errno.ENODEV:  # unmounted
            break
        if exc.errno in (errno.EINTR, errno.ENOENT):
            continue
        raise
    reply = server.handle(request, MAX_WRITE + 4096)
    if reply is not None:
        try:
            os.write(fd, reply)
        except FileNotFoundError:
            pass  # the request was interrupted meanwhile
server.close()
"""


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse to mount")
    source, mnt = tmp_path / "source", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(source), str(mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "mounted\n", proc.stderr.read() if proc.stderr else line
        yield source, mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_tar_extract_diff_and_cp(mounted: tuple[Path, Path]) -> None:
    source, mnt = mounted
    tar = subprocess.run(
        f"tar -C {REPO} -cf - driver docs | tar -C {mnt} -xf -",
        shell=True, capture_output=True, timeout=120,
    )
    assert tar.returncode == 0, tar.stderr
    for tree in (mnt / "driver", source / "driver"):
        assert subprocess.run(["diff", "-r", REPO / "driver", tree], timeout=120).returncode == 0
    cp = subprocess.run(["cp", "-a", mnt / "driver", mnt / "copy"], capture_output=True)
    assert cp.returncode == 0, cp.stderr
    assert subprocess.run(["diff", "-r", source / "driver", source / "copy"]).returncode == 0
    assert subprocess.run(["rm", "-rf", mnt / "copy"]).returncode == 0
    assert not (source / "copy").exists()


def test_file_api_mmap_links_and_attributes(mounted: tuple[Path, Path]) -> None:
    source, mnt = mounted
    p = mnt / "data.bin"
    p.write_bytes(b"a" * 10000)
    with open(p, "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            m[0:5] = b"hello"
            m.flush()
    assert (source / "data.bin").read_bytes()[:6] == b"helloa"
    os.symlink("data.bin", mnt / "sym")
    assert os.readlink(mnt / "sym") == "data.bin" and (mnt / "sym").read_bytes()[:5] == b"hello"
    os.link(p, mnt / "hard")
    assert os.stat(p).st_nlink == 2
    os.chmod(p, 0o600)
    os.utime(p, (1000, 2000))
    st = os.stat(source / "data.bin")
    assert (st.st_mode & 0o777, st.st_mtime) == (0o600, 2000)
    os.truncate(p, 3)
    assert p.read_bytes() == b"hel"
    os.setxattr(p, "user.k", b"v")
    assert os.getxattr(source / "data.bin", "user.k") == b"v"
    os.rename(mnt / "hard", mnt / "renamed")
    os.unlink(mnt / "renamed")
    os.mkdir(mnt / "d")
    os.rmdir(mnt / "d")
    assert sorted(os.listdir(mnt)) == ["data.bin", "sym"]


def test_kernel_locks_conflict_between_processes(mounted: tuple[Path, Path]) -> None:
    _, mnt = mounted
    p = mnt / "locked"
    p.write_bytes(b"x")
    with open(p, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        probe = (
            "import fcntl, sys\n"
            f"f = open({str(p)!r}, 'r+b')\n"
            "for lock in (fcntl.lockf, fcntl.flock):\n"
            "    try:\n"
            "        lock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('granted')\n"
            "    except OSError as e: print(e.errno)\n"
        )
        out = subprocess.run(["python3", "-c", probe], capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == [str(errno.EAGAIN), str(errno.EAGAIN)]
    # closed: both locks are gone (FLUSH drops POSIX locks, RELEASE the flock)
    out = subprocess.run(["python3", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["granted", "granted"]


def test_o_direct_reads_and_writes(mounted: tuple[Path, Path]) -> None:
    """The kernel sends an O_DIRECT file's I/O as it comes (any offset, any size):
    the device must not hand O_DIRECT on to the host file (EINVAL there)."""
    source, mnt = mounted
    fd = os.open(mnt / "direct", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        buf = mmap.mmap(-1, 8192)  # page aligned, as O_DIRECT programs use
        buf[:] = b"d" * 8192
        assert os.pwritev(fd, [buf], 0) == 8192
        assert os.pwrite(fd, b"unaligned", 3) == 9
        assert os.pread(fd, 12, 0) == b"dddunaligned"
        out = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [out], 4096) == 4096 and out[:] == b"d" * 4096
    finally:
        os.close(fd)
    assert (source / "direct").read_bytes()[:12] == b"dddunaligned"


def test_names_over_255_bytes_are_enametoolong(mounted: tuple[Path, Path]) -> None:
    _, mnt = mounted
    (mnt / "f").write_text("x")
    long = "n" * 256
    for call in (lambda: os.mkdir(mnt / long), lambda: os.open(mnt / long, os.O_CREAT),
                 lambda: os.stat(mnt / long), lambda: os.symlink("f", mnt / long),
                 lambda: os.link(mnt / "f", mnt / long), lambda: os.rename(mnt / "f", mnt / long),
                 lambda: os.mknod(mnt / long)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENAMETOOLONG
    os.mkdir(mnt / long[1:])  # 255 bytes is a name


#: 1960-01-01T00:00:00.25 UTC and 1969-12-31T23:59:59.5 UTC, in ns: before the epoch
OLD_ATIME_NS = -315619200 * 10**9 + 250_000_000
OLD_MTIME_NS = -500_000_000


def test_times_before_1970_read_and_set(mounted: tuple[Path, Path]) -> None:
    """FUSE's time seconds are u64 on the wire but signed for the kernel: a file
    dated before 1970 is listed and stat'ed with its own times, and such times
    can be set through the mount (touch -d 1960-01-01)."""
    source, mnt = mounted
    (source / "old").write_text("x")
    os.utime(source / "old", ns=(OLD_ATIME_NS, OLD_MTIME_NS))
    assert sorted(os.listdir(mnt)) == ["old"]
    st = os.stat(mnt / "old")
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_ATIME_NS, OLD_MTIME_NS)
    ls = subprocess.run(["ls", "-l", "--time-style=+%Y-%m-%d", str(mnt)],
                        capture_output=True, text=True, timeout=30,
                        env={**os.environ, "TZ": "UTC"})
    assert ls.returncode == 0 and " 1969-12-31 old" in ls.stdout, ls.stderr

    (mnt / "new").write_text("y")
    os.utime(mnt / "new", ns=(OLD_ATIME_NS, OLD_MTIME_NS))
    host = os.stat(source / "new")
    assert (host.st_atime_ns, host.st_mtime_ns) == (OLD_ATIME_NS, OLD_MTIME_NS)
    touch = subprocess.run(["touch", "-d", "1960-01-01 00:00:00 UTC", str(mnt / "g")],
                           capture_output=True, text=True, timeout=30)
    assert touch.returncode == 0, touch.stderr
    assert os.stat(source / "g").st_mtime == -315619200
    assert os.stat(mnt / "g").st_mtime == -315619200


def test_lseek_data_and_hole_at_negative_offsets_as_the_host(mounted: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """The kernel hands SEEK_DATA/SEEK_HOLE's offset on as it is (an loff_t): the
    device must ask the host with the same signed offset and give its answer."""
    _, mnt = mounted
    plain = tmp_path / "plain"
    plain.mkdir()

    def results(path: Path) -> list[object]:
        path.write_bytes(b"data" * 1000)
        fd = os.open(path, os.O_RDONLY)
        out: list[object] = []
        try:
            for offset in (-1, -4096, -(1 << 63), 0, 10, 4000, 1 << 40):
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    try:
                        out.append(os.lseek(fd, offset, whence))
                    except OSError as exc:
                        out.append(errno.errorcode[exc.errno])
        finally:
            os.close(fd)
        return out

    expected = results(plain / "f")
    assert expected[:2] == ["ENXIO", "ENXIO"]  # ext4 (and tmpfs) answer ENXIO before 0
    assert results(mnt / "f") == expected


def test_append_follows_the_current_file_flags(mounted: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """O_APPEND cleared (and set again) with fcntl(F_SETFL) takes effect at once, as
    on a local file system; so does pwritev2(RWF_APPEND) on a file without it."""
    source, mnt = mounted
    plain = tmp_path / "plain"
    plain.mkdir()

    def run(path: Path) -> bytes:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"abcdef")
            fcntl.fcntl(fd, fcntl.F_SETFL, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"Z")
            assert os.pwrite(fd, b"W", 1) == 1
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
            os.write(fd, b"XY")
            fcntl.fcntl(fd, fcntl.F_SETFL, 0)
            assert os.pwritev(fd, [b"Q"], 0, os.RWF_APPEND) == 1
            assert os.pwrite(fd, b"V", 2) == 1
        finally:
            os.close(fd)
        return path.read_bytes()

    expected = run(plain / "f")
    assert expected == b"ZWVdefXYQ"
    assert run(mnt / "f") == expected
    assert (source / "f").read_bytes() == expected


def test_mmap_writes_through_an_o_append_file_stay_in_place(mounted: tuple[Path, Path]) -> None:
    """The kernel writes a shared mapping's dirty pages back through any writable
    open file of the inode, here an O_APPEND one: the pages must land where they
    belong, not at the end of the file."""
    source, mnt = mounted
    p = mnt / "mapped"
    p.write_bytes(b"." * 8192)
    fd = os.open(p, os.O_RDWR | os.O_APPEND)
    try:
        with mmap.mmap(fd, 8192) as m:
            m[4096:4101] = b"hello"
            m.flush()
    finally:
        os.close(fd)
    assert (source / "mapped").read_bytes() == b"." * 4096 + b"hello" + b"." * 4091
