"""Every vhost-user message has a deadline (issue 10, item 3): a backend that accepts
the connection and never answers, or answers the handshake but never FUSE_INIT (and
then never lets its ring stop), fails the transport, `vfsdrv mount` and `vfsdrv check`
within their timeouts, with an error naming the socket, and leaves nothing mounted.

The backends are real Unix sockets served by tests/fakes/stalling_backend.py; the
commands run as separate processes, as a user runs them.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.stalling_backend import StallingBackend
from mounting import force_unmount, is_mounted
from vfsdrv.errors import DeviceGoneError, DeviceTimeoutError, TransportError
from vfsdrv.fs.config import encode_config
from vfsdrv.fs.device import VirtioFs
from vfsdrv.virtio import vhost_user_proto as vu
from vfsdrv.virtio.vhost_user import DEFAULT_TIMEOUT, VhostUserTransport

VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]
#: the documented bound: a mount against a silent backend fails within 30 s
COMMAND_BOUND = 30.0


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "backend.sock")


@pytest.fixture
def silent(sock_path: str) -> Iterator[StallingBackend]:
    with StallingBackend(sock_path, "silent") as b:
        yield b


@pytest.fixture
def no_init(sock_path: str) -> Iterator[StallingBackend]:
    with StallingBackend(sock_path, "no-init") as b:
        yield b


# -- the transport ------------------------------------------------------------------------


def test_silent_backend_fails_the_handshake_in_time(silent: StallingBackend) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeoutError) as info:
        VhostUserTransport(silent.path, timeout=0.5)
    took = time.monotonic() - t0
    assert 0.4 < took < 3, took
    assert str(info.value) == f"vhost-user:{silent.path}: no reply to GET_FEATURES within 0.5 s"
    assert isinstance(info.value, TimeoutError)


def test_a_backend_answering_just_in_time_cannot_stretch_the_bring_up(sock_path: str) -> None:
    """Each answer 0.3 s late is within the 1 s per message, but the handshake
    (four answers) would take 1.2 s: the bring-up gets 1 s of backend time in all."""
    with StallingBackend(sock_path, "slow", delay=0.3):
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeoutError) as info:
            VhostUserTransport(sock_path, timeout=1.0)
        took = time.monotonic() - t0
    assert took < 1.5, took
    assert str(info.value).startswith(f"vhost-user:{sock_path}: ")
    assert "bring-up" in str(info.value)


def test_after_start_each_message_has_the_whole_timeout(sock_path: str) -> None:
    with StallingBackend(sock_path, "slow", delay=0.0) as backend:
        t = VhostUserTransport(sock_path, config=encode_config("x", 1), num_queues=2,
                               timeout=1.0)
        try:
            t.start()
            backend.delay = 0.3
            for _ in range(5):  # 1.5 s in all, 0.3 s each
                t.set_driver_features(1 << 32)
        finally:
            t.close()


def test_a_listener_that_never_accepts_fails_the_connect_in_time(sock_path: str) -> None:
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(0)
    queued = []
    try:
        while True:  # fill the backlog: the next connect() would block
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(sock_path)
            except BlockingIOError:
                c.close()
                break
            queued.append(c)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeoutError, match="did not accept the connection within 0.5 s"):
            VhostUserTransport(sock_path, connect_timeout=0.5)
        assert time.monotonic() - t0 < 2
    finally:
        for c in queued:
            c.close()
        listener.close()


def test_a_backend_that_hangs_up_is_named(sock_path: str) -> None:
    with StallingBackend(sock_path, "hangup"), pytest.raises(DeviceGoneError) as info:
        VhostUserTransport(sock_path, timeout=2)
    assert str(info.value).startswith(f"vhost-user:{sock_path}: ")
    assert "GET_FEATURES" in str(info.value)


def test_a_reply_to_the_wrong_message_retires_the_connection(sock_path: str) -> None:
    with StallingBackend(sock_path, "wrong-reply"), pytest.raises(TransportError) as info:
        VhostUserTransport(sock_path, timeout=2)
    assert str(info.value) == (f"vhost-user:{sock_path}: expected the reply to GET_FEATURES, "
                               "got GET_PROTOCOL_FEATURES with flags 0x5")


def test_default_deadline_fits_the_mount_bound() -> None:
    # one message times out, then teardown (bounded separately) must still fit in 30 s
    assert DEFAULT_TIMEOUT <= 15


def test_after_a_timeout_the_connection_is_not_reused(no_init: StallingBackend) -> None:
    """A late reply would be taken for the next message's: once one message timed
    out, every later one fails at once, naming the first; reset(t) is bounded by t."""
    t = VhostUserTransport(no_init.path, config=encode_config("x", 1), num_queues=2,
                           timeout=20)
    fs = VirtioFs(t)
    try:
        fs.start()
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeoutError) as info:
            t.reset(0.3)
        assert time.monotonic() - t0 < 1.0
        assert str(info.value).startswith(f"vhost-user:{no_init.path}: no reply to "
                                          "GET_VRING_BASE within 0.3 s")
        t0 = time.monotonic()
        with pytest.raises(DeviceGoneError, match="no reply to GET_VRING_BASE"):
            t.set_driver_features(0)  # REPLY_ACK: would wait for an ack
        assert time.monotonic() - t0 < 0.1
        with pytest.raises(DeviceGoneError, match="no longer usable"):
            t.check_alive()
    finally:
        t0 = time.monotonic()
        fs.close()
        assert time.monotonic() - t0 < 0.5


def test_an_unrequested_message_is_a_gone_device_not_a_spinning_loop(
        no_init: StallingBackend) -> None:
    """error_fd() readable with data nobody asked for (or a reply that came too late):
    check_alive says gone, so an event loop polling the socket does not spin on it."""
    t = VhostUserTransport(no_init.path, config=encode_config("x", 1), num_queues=2)
    try:
        t.check_alive()
        no_init.push(vu.Request.GET_FEATURES)
        r, _, _ = select.select([t.error_fd()], [], [], 5)
        assert r
        with pytest.raises(DeviceGoneError, match="nobody asked for"):
            t.check_alive()
        with pytest.raises(DeviceGoneError, match="nobody asked for"):
            t.set_driver_features(0)
    finally:
        t.close()


def test_teardown_is_bounded_when_the_ring_never_stops(no_init: StallingBackend) -> None:
    """FUSE_INIT unanswered, then GET_VRING_BASE unanswered: close still returns,
    within the teardown deadline, not the (longer) message timeout."""
    t = VhostUserTransport(no_init.path, config=encode_config("x", 1), num_queues=2,
                           timeout=20, teardown_timeout=0.5)
    fs = VirtioFs(t)
    try:
        fs.start()
        with pytest.raises(TimeoutError):
            fs.init(timeout=0.5)
    finally:
        t0 = time.monotonic()
        fs.close()
        took = time.monotonic() - t0
    assert took < 1.5, took
    assert vu.Request.GET_VRING_BASE in no_init.received


# -- the commands, as a user runs them -----------------------------------------------------


def _run(argv: list[str], bound: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    try:
        r = subprocess.run([*VFSDRV, *argv], capture_output=True, text=True,
                           timeout=bound + 30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"vfsdrv {' '.join(argv)} still running after {bound + 30:.0f} s: "
                    f"{exc.stderr!r}")
    return r, time.monotonic() - t0


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        yield mnt
    finally:
        stuck = is_mounted(mnt)
        force_unmount(mnt)
        assert not stuck, f"{mnt} left mounted"


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="mounting needs root and /dev/fuse")


@needs_root
@pytest.mark.parametrize("mode", ["silent", "no-init"])
def test_mount_fails_in_time(mode: str, sock_path: str, mountpoint: Path) -> None:
    with StallingBackend(sock_path, mode) as backend:
        r, took = _run(["mount", "--vhost-user", sock_path, str(mountpoint)], COMMAND_BOUND)
        assert r.returncode != 0, r
        assert took < COMMAND_BOUND, (took, r.stderr)
        assert not is_mounted(mountpoint)
        if mode == "silent":
            assert f"vhost-user:{sock_path}: no reply to GET_FEATURES within" in r.stderr, \
                r.stderr
        else:
            assert "FUSE_INIT" in r.stderr, r.stderr
            # teardown asked the ring to stop, got no answer, and still returned
            assert vu.Request.GET_VRING_BASE in backend.received


@needs_root
def test_mount_init_timeout_names_the_backend(no_init: StallingBackend,
                                              mountpoint: Path) -> None:
    r, took = _run(["mount", "--vhost-user", no_init.path, str(mountpoint)], COMMAND_BOUND)
    assert r.returncode != 0 and took < COMMAND_BOUND, (took, r)
    assert no_init.path in r.stderr, r.stderr


@needs_root
def test_foreground_mount_fails_in_time(silent: StallingBackend, mountpoint: Path) -> None:
    r, took = _run(["mount", "-f", "--vhost-user", silent.path, str(mountpoint)], COMMAND_BOUND)
    assert r.returncode != 0 and took < COMMAND_BOUND, (took, r)
    assert f"{silent.path}: no reply to GET_FEATURES" in r.stderr, r.stderr


@pytest.mark.parametrize("mode", ["silent", "no-init"])
def test_check_fails_in_time(mode: str, sock_path: str) -> None:
    with StallingBackend(sock_path, mode):
        r, took = _run(["check", "--vhost-user", sock_path], COMMAND_BOUND)
    assert r.returncode != 0, r
    assert took < COMMAND_BOUND, (took, r.stdout, r.stderr)
    assert sock_path in r.stdout + r.stderr, (r.stdout, r.stderr)
