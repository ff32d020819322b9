"""Issue 10 item 1: a device's reply error the kernel would refuse (-4095..-512, or
positive) must not leave a program blocked. /dev/fuse answers such a reply with
EINVAL and keeps the request pending, so the program would sit in D state until
the server stops; the driver turns it into EIO (logged and counted), on the
request path and for a blocking lock completed by FUSE_NOTIFY_LOCK.

The reference device runs in this process so that its replies can be rewritten;
the mount is a real `vfsdrv mount` used by real system calls."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from mount_helpers import inprocess_refdev_mount
from vfsdrv.fs.abi import Opcode
from vfsdrv.refdev import fuse_server
from vfsdrv.refdev.fuse_server import FuseServer


@pytest.fixture
def mounted_refdev(tmp_path: Path, monkeypatch):
    """(mnt, rules, log): rules[opcode] = error puts that error in the device's reply."""
    rules: dict[int, int] = {}
    real = FuseServer.handle

    def handle(self: FuseServer, request: bytes, reply_room: int):
        opcode = struct.unpack_from("<I", request, 4)[0]
        unique = struct.unpack_from("<Q", request, 8)[0]
        if opcode == Opcode.SETLKW and opcode in rules:
            # park it ("wait"), then complete it with the rule's error
            notify = self.notify_lock
            assert notify is not None, "the relay negotiated no notification queue"
            threading.Timer(0.2, lambda: notify(unique, rules[opcode])).start()
            return struct.pack("<IiQ", 16, 1, unique)
        out = real(self, request, reply_room)
        if out is not None and opcode in rules:
            return struct.pack("<IiQ", 16, rules[opcode], unique)
        return out

    monkeypatch.setattr(fuse_server.FuseServer, "handle", handle)
    with inprocess_refdev_mount(tmp_path) as (mnt, log, _dev):
        yield mnt, rules, log


def in_thread(fn, timeout: float = 10.0) -> BaseException | None:
    """Run fn in a thread; what it raised (None if nothing). Fails on a hang."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box[0] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the program is still blocked: the kernel refused the reply"
    return box[0]


@pytest.mark.parametrize("bad", [-512, -600, -4095, 7])
def test_out_of_range_reply_error_is_eio(mounted_refdev, bad: int) -> None:
    mnt, rules, log = mounted_refdev
    rules[Opcode.LOOKUP] = bad
    exc = in_thread(lambda: os.stat(mnt / "f"))
    assert isinstance(exc, OSError) and exc.errno == errno.EIO, exc
    rules.clear()
    assert (mnt / "f").read_text() == "x"  # the mount still serves
    deadline = time.monotonic() + 5
    while "bad reply" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "out of range" in log.read_text() or "positive error" in log.read_text()


def test_lock_notification_with_an_impossible_error_is_eio(mounted_refdev) -> None:
    """A SETLKW the device parks on "wait" and completes with FUSE_NOTIFY_LOCK error
    -600 ends with EIO, not with a program blocked for good."""
    mnt, rules, log = mounted_refdev
    rules[Opcode.SETLKW] = -600
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        exc = in_thread(lambda: fcntl.lockf(fd, fcntl.LOCK_EX))
    finally:
        os.close(fd)
    assert isinstance(exc, OSError) and exc.errno == errno.EIO, exc
    assert "FUSE_NOTIFY_LOCK" in log.read_text()
