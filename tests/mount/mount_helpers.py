"""Helpers of the mount suite: real mounts of each real device (Debian 12's C
virtiofsd, Debian 13's Rust virtiofsd) and of the reference device through vfsdrv.

(Not in conftest.py: several conftest modules share that name, so `from conftest
import ...` may find another one.)

Every mount is served by a separate process (`python -m vfsdrv.tools.cli mount -f`),
never by the test process: a page fault on an mmap of the mount, taken while
holding the GIL, would otherwise wait for a server that needs the GIL.

`mnt` is one mount per test module, frontend ("relay", "pyfuse3") and real device
(`DEVICES`: "virtiofsd", "virtiofsd-rs"); `work` gives
each test a fresh directory seen from both sides (host path, mount path). Whatever
a test mounts is unmounted in a `finally`, lazily if it has to be.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from backends import DEVICES, device, refdev
from mounting import force_unmount, mount_points, wait_mounted

FRONTENDS = ["relay", "pyfuse3"]
#: the tag the mounts ask for; the Rust virtiofsd gets the same in its config space
MOUNT_TAG = "vfsdrv-test"
#: what a frontend cannot do, with the reason the skip prints
LIMITS: dict[str, dict[str, str]] = {
    "pyfuse3": {
        "locks": "pyfuse3 has no getlk/setlk/flock handlers: the kernel keeps locks local",
        "request_log": "the -d request log (opcode, unique) is the relay's: pyfuse3 decodes "
        "requests inside libfuse",
        "lseek": "pyfuse3 has no lseek handler: SEEK_DATA/SEEK_HOLE see the file as all data",
        "fallocate": "pyfuse3 has no fallocate handler (no hole punching; posix_fallocate "
        "works through glibc's fallback)",
    },
}
VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]


@dataclass
class Mounted:
    frontend: str
    export: Path
    mnt: Path
    proc: subprocess.Popen | None
    log: Path
    device: str = "virtiofsd"  #: the backend: one of DEVICES, or "refdev"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def require(frontend: str, feature: str) -> None:
    reason = LIMITS.get(frontend, {}).get(feature)
    if reason:
        pytest.skip(f"{frontend}: {reason}")


def stop_server(m: Mounted, timeout: float = 15) -> int | None:
    """SIGTERM the serving process (it unmounts); returns its exit status."""
    rc = None
    try:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
            try:
                rc = m.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        elif m.proc is not None:
            rc = m.proc.returncode
    finally:
        force_unmount(m.mnt)
    return rc


@contextmanager
def serving(
    base: Path, frontend: str, *, vfsd_args: tuple[str, ...] = (), mount_args: tuple[str, ...] = (),
    debug: bool = False, backend: str = "virtiofsd",
) -> Iterator[Mounted]:
    """`backend` (one of DEVICES, or "refdev") on base/export, mounted on base/mnt by
    `vfsdrv mount -f`."""
    export, mnt, sock, log = base / "export", base / "mnt", base / "vfsd.sock", base / "serve.log"
    export.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    start = (lambda: device(backend, export, sock, *vfsd_args, tag=MOUNT_TAG)) \
        if backend in DEVICES else (lambda: refdev(export, sock, *vfsd_args))
    with start():
        cmd = [*VFSDRV, "mount", "-f", "--vhost-user", str(sock), "--tag", MOUNT_TAG,
               "--frontend", frontend, *(["-d"] if debug else []), *mount_args, str(mnt)]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        m = Mounted(frontend, export, mnt, proc, log, backend)
        try:
            wait_mounted(mnt, proc, log)
            yield m
        finally:
            stop_server(m)


@contextmanager
def inprocess_refdev_mount(base: Path, *mount_args: str,
                           verbose: bool = False) -> Iterator[tuple[Path, Path, object]]:
    """The reference device running in this process (so a test can rewrite what it
    sends), mounted by a real `vfsdrv mount -f` on base/mnt: (mnt, server log, device).
    base/export holds a file "f" with "x"."""
    from vfsdrv.refdev.device import RefDevice

    export, mnt = base / "export", base / "mnt"
    export.mkdir()
    mnt.mkdir()
    (export / "f").write_text("x")
    dev = RefDevice(str(base / "d.sock"), str(export))
    dev.start()
    log = base / "serve.log"
    try:
        with open(log, "wb") as lf:
            proc = subprocess.Popen([*VFSDRV, *(["-v"] if verbose else []), "mount", "-f",
                                     *mount_args, "--vhost-user", str(base / "d.sock"),
                                     str(mnt)],
                                    stdout=lf, stderr=subprocess.STDOUT)
        try:
            wait_mounted(mnt, proc, log)
            yield mnt, log, dev
        finally:
            subprocess.run([*VFSDRV, "umount", str(mnt)], capture_output=True, timeout=30)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            force_unmount(mnt)
    finally:
        dev.stop()


def refused_mount(base: Path, *mount_args: str, status: int = 1) -> subprocess.CompletedProcess:
    """`vfsdrv mount <mount_args>` over Debian's virtiofsd on base/export, expected to
    be refused: it exits `status` (2: a bad command line) and leaves nothing mounted
    under base. Its output comes back for the caller to check the message."""
    export, mnt, sock = base / "export", base / "mnt", base / "vfsd.sock"
    export.mkdir()
    mnt.mkdir()
    with device("virtiofsd", export, sock):
        try:
            r = subprocess.run([*VFSDRV, "mount", "--vhost-user", str(sock), *mount_args,
                                str(mnt)], capture_output=True, text=True, timeout=30)
            assert r.returncode == status, r.stdout + r.stderr
            assert [p for p in mount_points() if p.startswith(f"{base}/")] == []
            return r
        finally:
            force_unmount(mnt)


def in_threads(worker: Callable[[int], None], n: int, timeout: float) -> None:
    """worker(0) .. worker(n - 1), each on a thread of its own, all at once; joined
    (`timeout` s each at most), then the first errors any of them raised fail the test."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            worker(k)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors[:3]
