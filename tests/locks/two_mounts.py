"""Fixtures and helpers: two mounts of one reference device: two "guests" sharing one lock table.

The device runs as its own process (`vfsdrv refdev`), and each mount is served by
its own `vfsdrv mount -f --vhost-user` process, so a test process blocked in
fcntl(F_SETLKW) never holds up a server. Lock holders and waiters are separate
processes too (`Locker`), driven line by line over pipes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from backends import refdev as refdev_process
from mounting import force_unmount, is_mounted, wait_mounted

VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]
LOCKER = Path(__file__).with_name("locker.py")
#: the virtqueue layout forced on devices and mounts (conftest's `ring_layout` sets it)
ring_layout: str | None = None


def _ring_args() -> tuple[str, ...]:
    return ("--ring", ring_layout) if ring_layout else ()


@dataclass
class Device:
    proc: subprocess.Popen
    socket: Path
    export: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Mount:
    proc: subprocess.Popen
    path: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _stop(proc: subprocess.Popen, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextmanager
def refdev(base: Path, *args: str) -> Iterator[Device]:
    """The reference device as its own process, serving base/export."""
    export = base / "export"
    export.mkdir(exist_ok=True)
    # unix socket paths are limited to 108 bytes: keep this one short
    sockdir = Path(tempfile.mkdtemp(prefix="vfl-", dir="/tmp"))
    sock = sockdir / "refdev.sock"
    try:
        with refdev_process(export, sock, *_ring_args(), *args) as proc:
            yield Device(proc, sock, export, sock.with_suffix(".log"))
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@contextmanager
def mounted(dev: Device, mnt: Path, *args: str) -> Iterator[Mount]:
    mnt.mkdir(exist_ok=True)
    log = mnt.with_suffix(".log")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [*VFSDRV, "mount", "-f", "--vhost-user", str(dev.socket), *_ring_args(), *args,
             str(mnt)],
            stdout=logf, stderr=subprocess.STDOUT,
        )
    m = Mount(proc, mnt, log)
    try:
        wait_mounted(mnt, proc, log)
        yield m
    finally:
        _stop(proc)
        force_unmount(mnt)


@dataclass
class Pair:
    dev: Device
    a: Mount
    b: Mount


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with refdev(tmp_path, "--max-waiting-locks", "8") as dev:
        with mounted(dev, tmp_path / "a") as a, mounted(dev, tmp_path / "b") as b:
            yield Pair(dev, a, b)
    assert not is_mounted(tmp_path / "a") and not is_mounted(tmp_path / "b")


class Locker:
    """A process that takes and drops locks on one file when told to (locker.py)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(LOCKER), str(path)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, timeout: float = 10) -> str:
        """The next line the locker prints (fails after `timeout` seconds)."""
        assert self.proc.stdout is not None
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"locker printed nothing within {timeout} s")
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"locker exited with {self.proc.wait()}")
        return line

    def silent_for(self, seconds: float) -> bool:
        """True if the locker printed nothing for `seconds` (it is blocked)."""
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return not r

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()


@pytest.fixture
def lockers() -> Iterator[list[Locker]]:
    made: list[Locker] = []
    yield made
    for lk in made:
        lk.close()

