"""Helpers of the mount suite: real mounts of Debian's virtiofsd through vfsdrv.

(Not in conftest.py: several conftest modules share that name, so `from conftest
import ...` may find another one.)

Every mount is served by a separate process (`python -m vfsdrv.tools.cli mount -f`),
never by the test process: a page fault on an mmap of the mount, taken while
holding the GIL, would otherwise wait for a server that needs the GIL.

`mnt` is one mount per test module and frontend ("relay", "pyfuse3"); `work` gives
each test a fresh directory seen from both sides (host path, mount path). Whatever
a test mounts is unmounted in a `finally`, lazily if it has to be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from backends import virtiofsd

FRONTENDS = ["relay", "pyfuse3"]
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

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def require(frontend: str, feature: str) -> None:
    reason = LIMITS.get(frontend, {}).get(feature)
    if reason:
        pytest.skip(f"{frontend}: {reason}")


def mount_points() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            out.append(line.split()[4].replace("\\040", " "))
    return out


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def force_unmount(path: Path) -> None:
    """Last resort: nothing may stay mounted, whatever happened."""
    for _ in range(5):
        if not is_mounted(path):
            return
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        time.sleep(0.05)


def wait_mounted(mnt: Path, proc: subprocess.Popen | None, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vfsdrv mount exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        if is_mounted(mnt):
            os.stat(mnt)  # waits for FUSE_INIT to be answered
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} not mounted within {timeout} s:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.01)


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
def refdev(source: Path, sock: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """The project's reference device (notification queue, blocking locks) on `sock`."""
    cmd = [sys.executable, "-m", "vfsdrv.refdev", "--socket", str(sock), "--source", str(source),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"refdev exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("refdev did not create its socket within 15 s")
            time.sleep(0.01)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


@contextmanager
def serving(
    base: Path, frontend: str, *, vfsd_args: tuple[str, ...] = (), mount_args: tuple[str, ...] = (),
    debug: bool = False, backend: str = "virtiofsd",
) -> Iterator[Mounted]:
    """virtiofsd (or refdev) on base/export, mounted on base/mnt by `vfsdrv mount -f`."""
    export, mnt, sock, log = base / "export", base / "mnt", base / "vfsd.sock", base / "serve.log"
    export.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    start = virtiofsd if backend == "virtiofsd" else refdev
    with start(export, sock, *vfsd_args):
        cmd = [*VFSDRV, "mount", "-f", "--vhost-user", str(sock), "--tag", "vfsdrv-test",
               "--frontend", frontend, *(["-d"] if debug else []), *mount_args, str(mnt)]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        m = Mounted(frontend, export, mnt, proc, log)
        try:
            wait_mounted(mnt, proc, log)
            yield m
        finally:
            stop_server(m)
