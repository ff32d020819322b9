"""Where the two real devices differ, seen through a real mount (README, "Device
notes"): locking, O_DIRECT on created files, the end of the session, and the
command line's --tag/--request-queues next to the Rust virtiofsd's config space."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backends import DEVICES
from mount_helpers import FRONTENDS, VFSDRV, Mounted, in_threads, serving, stop_server
from mounting import is_mounted

HOLDER = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
fd2 = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd2, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
print("locked", flush=True)
sys.stdin.readline()
"""


def try_locks(path: Path) -> tuple[int, int]:
    """(flock errno, POSIX lock errno) of a non-blocking attempt from another process
    (0: granted)."""
    probe = (
        "import fcntl, os, struct, sys\n"
        "res = []\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); res.append(0)\n"
        "except OSError as e:\n    res.append(e.errno)\n"
        "try:\n    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0))"
        "; res.append(0)\n"
        "except OSError as e:\n    res.append(e.errno)\n"
        "print(*res)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                         text=True, check=True, timeout=30).stdout.split()
    return int(out[0]), int(out[1])


def test_locks_stay_local_to_the_mount(work: tuple[Path, Path]) -> None:
    """Neither device takes over locking (neither grants FUSE_POSIX_LOCKS nor
    FUSE_FLOCK_LOCKS with its default options), so the kernel keeps flock and POSIX
    locks local to the mount: they conflict between programs using the mount and
    are invisible on the host's side of the export."""
    host, m = work
    (host / "lk").write_text("0123456789")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(m / "lk")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert try_locks(m / "lk") == (errno.EWOULDBLOCK, errno.EAGAIN)  # through the mount
        assert try_locks(host / "lk") == (0, 0)  # the host does not see them
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(10)
    assert try_locks(m / "lk") == (0, 0)  # released with the holder


def test_o_direct_write_to_a_new_file(work: tuple[Path, Path], mnt: Mounted, request) -> None:
    """A program that creates a file with O_DIRECT and writes an aligned block. The
    Rust virtiofsd keeps O_DIRECT on the files it creates (even without
    --allow-direct-io), so the payload must be page-aligned in DMA memory too."""
    host, m = work
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    buf.write(bytes(range(256)) * 16)
    fd = os.open(m / "direct", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    try:
        assert os.write(fd, buf) == 4096
    finally:
        os.close(fd)
    assert (host / "direct").read_bytes() == bytes(range(256)) * 16


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_unmount_warns_about_nothing(tmp_path: Path, frontend: str, device: str,
                                     request) -> None:
    """An ordinary mount and unmount logs no warning. The Rust virtiofsd sends no
    reply to FUSE_DESTROY (it hands the buffer back empty), which is not a fault."""
    with serving(tmp_path, frontend, backend=device) as m:
        (m.mnt / "f").write_text("x")
        assert stop_server(m) == 0
    assert not is_mounted(m.mnt)
    assert "WARNING" not in m.log_text(), m.log_text()


def test_tag_and_queues_from_the_command_line_vs_config_space(tmp_path: Path,
                                                               request) -> None:
    """The Rust virtiofsd started with --tag has config space, and the driver takes
    tag and queue count from it: a different --tag or --request-queues on vfsdrv's
    command line cannot apply, and the user must be told so."""
    with serving(tmp_path, "relay", backend="virtiofsd-rs",
                 mount_args=("--tag", "not-the-device-tag", "--request-queues", "2")) as m:
        assert (m.mnt / "f").exists() is False
        stop_server(m)
    log = m.log_text()
    assert "not-the-device-tag" in log and "vfsdrv-test" in log, log
    assert "--request-queues" in log or "request queue" in log, log


def test_daemonized_mount_of_the_rust_device(tmp_path: Path) -> None:
    """`vfsdrv mount` without -f daemonizes and `vfsdrv umount` ends it on the Rust
    device too (it exits when the session closes, like the C one)."""
    from backends import device

    export, mnt, sock = tmp_path / "export", tmp_path / "mnt", tmp_path / "vfsd.sock"
    export.mkdir()
    mnt.mkdir()
    (export / "hello").write_text("hello\n")
    with device("virtiofsd-rs", export, sock, tag="rs") as backend:
        try:
            r = subprocess.run([*VFSDRV, "mount", "--vhost-user", str(sock), str(mnt)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert (mnt / "hello").read_text() == "hello\n"
            line = [ln for ln in open("/proc/self/mounts") if f" {mnt} " in ln][0]
            assert line.startswith(f"vhost-user:{sock} ")  # the spec, as mount(8) wants
            r = subprocess.run([*VFSDRV, "umount", str(mnt)], capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0, r.stderr
            assert not is_mounted(mnt)
            t0 = time.monotonic()
            assert backend.proc.wait(10) == 0
            assert time.monotonic() - t0 < 10
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)



def test_c_virtiofsd_with_a_thread_pool_survives_many_requests_at_once(tmp_path: Path) -> None:
    """Debian 12's C virtiofsd with a thread pool under 16 concurrent requests: its
    seccomp filter kills it when glibc's malloc counts CPUs (sched_getaffinity) for a
    ninth arena, unless it is started with a fixed arena limit, as vfsdrv's launcher
    does (vfsdrv.tools.backend.virtiofsd_env). Without it this load killed it within
    seconds here; through the mount that is ENOTCONN."""
    # cache=none: virtiofsd answers FOPEN_DIRECT_IO, so each read and write is a request
    with serving(tmp_path, "relay", vfsd_args=("--thread-pool-size=16", "-o", "cache=none")) as m:
        deadline = time.monotonic() + 8

        def worker(k: int) -> None:
            data = os.urandom(4096)
            path = m.mnt / f"w{k}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                n = 0
                while time.monotonic() < deadline:
                    off = (n % 64) * 4096
                    os.pwrite(fd, data, off)
                    assert os.pread(fd, 4096, off) == data
                    os.stat(path)
                    n += 1
            finally:
                os.close(fd)

        in_threads(worker, 16, 60)
        assert sorted(p.name for p in m.mnt.iterdir()) == sorted(f"w{k}" for k in range(16))
