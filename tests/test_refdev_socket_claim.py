"""`vfsdrv refdev --socket PATH` never takes what is not its own: a regular file at
PATH stays, a live device's socket is not taken over, a missing directory is a clear
error; only a stale socket from a device that died is replaced."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfsdrv.refdev import RefDevice
from vfsdrv.refdev.device import SocketError

REFDEV = [sys.executable, "-m", "vfsdrv.tools.cli", "refdev"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="rdc-", dir="/tmp")  # short: AF_UNIX paths are short
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _run(sock: Path, source: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*REFDEV, "--socket", str(sock), "--source", str(source)],
                          capture_output=True, text=True, timeout=timeout)


def _connectable(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
            return True
        except OSError:
            return False


def test_a_regular_file_at_the_socket_path_is_kept(sock_dir: Path, tmp_path: Path) -> None:
    precious = sock_dir / "data"
    precious.write_bytes(b"not a socket")
    proc = _run(precious, tmp_path)
    assert proc.returncode != 0
    assert "not a socket" in proc.stderr and "Traceback" not in proc.stderr
    assert precious.read_bytes() == b"not a socket"


def test_a_second_device_does_not_take_over_a_live_socket(sock_dir: Path,
                                                          tmp_path: Path) -> None:
    sock = sock_dir / "live.sock"
    with RefDevice(str(sock), str(tmp_path)):
        inode = os.stat(sock).st_ino
        proc = _run(sock, tmp_path)
        assert proc.returncode != 0
        assert "served by another device" in proc.stderr and str(os.getpid()) in proc.stderr
        assert "Traceback" not in proc.stderr
        assert os.stat(sock).st_ino == inode and _connectable(sock)
        with pytest.raises(SocketError):  # in one process as well
            RefDevice(str(sock), str(tmp_path)).start()
        assert _connectable(sock)
    assert not sock.exists() and not Path(f"{sock}.lock").exists()


def test_a_missing_directory_is_a_clear_error(sock_dir: Path, tmp_path: Path) -> None:
    proc = _run(sock_dir / "nowhere" / "s.sock", tmp_path)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_a_stale_socket_of_a_killed_device_is_replaced(sock_dir: Path, tmp_path: Path) -> None:
    sock = sock_dir / "stale.sock"
    first = subprocess.Popen([*REFDEV, "--socket", str(sock), "--source", str(tmp_path)],
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _connectable(sock):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up: socket and lock file stay
        first.wait()
    assert sock.exists() and not _connectable(sock)
    with RefDevice(str(sock), str(tmp_path)):
        assert _connectable(sock)


def test_a_ctrl_c_in_start_before_the_thread_runs_stops_cleanly(
        sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between the listener and its thread (audit's cleanup then stops the
    device): stop() gives the socket and its claim back, with no error of its own."""
    import threading

    def interrupted(self: threading.Thread) -> None:
        raise KeyboardInterrupt

    sock = sock_dir / "c.sock"
    dev = RefDevice(str(sock), str(tmp_path))
    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dev.start()
    monkeypatch.undo()
    dev.stop()
    assert not sock.exists() and not Path(f"{sock}.lock").exists()
