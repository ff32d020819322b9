"""The driver used wrongly from Python, as a device team's test code might: a bad
argument, a call after close(), start() twice, Ctrl-C in the middle of sending a
request. Each gets a clear error, loses no request buffer, and never leaves the
object silently stuck (interrupted mid-send: it says it is broken)."""

from __future__ import annotations

import gc
import os

import pytest
from backends import connect_virtiofsd
from vfsdrv.errors import DeviceError
from vfsdrv.fs.client import ROOT_ID


@pytest.fixture
def client(device_factory, connect):
    return connect(device_factory())


def test_bad_arguments_lose_no_request_buffer(client) -> None:
    fs = client.fs
    free = fs.free_slots
    for _ in range(2 * free[0]):  # more than there are buffers
        with pytest.raises((TypeError, ValueError, OverflowError)):
            client.getattr(-1)
        with pytest.raises((TypeError, ValueError)):
            fs.call(3, ROOT_ID, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not fit a request buffer"):
        fs.call(21, ROOT_ID, b"x" * (fs.slot_size_large + 1))  # a SETXATTR too big
    assert fs.free_slots == free
    assert client.getattr(ROOT_ID).ino  # and it still works


def test_calls_after_close_say_closed(client) -> None:
    fs = client.fs
    fs.close()
    with pytest.raises(DeviceError, match="closed"):
        client.getattr(ROOT_ID)
    with pytest.raises(DeviceError, match="closed"):
        fs.init()


def test_start_twice_is_refused(client) -> None:
    with pytest.raises(DeviceError, match="once"):
        client.fs.start()
    assert client.getattr(ROOT_ID).ino


def test_ctrl_c_between_adding_and_kicking_breaks_the_device_loudly(client,
                                                                    monkeypatch) -> None:
    fs = client.fs

    def interrupted(vq) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fs.dev, "kick", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.getattr(ROOT_ID)
    monkeypatch.undo()
    with pytest.raises(DeviceError, match="interrupted while sending a request"):
        client.getattr(ROOT_ID)


def test_close_then_del_frees_the_guest_memory(virtiofsd_socket) -> None:
    """The device in another process: every memfd here is the driver's."""
    def memfds() -> int:
        return sum("vfsdrv-guest-memory" in os.readlink(f"/proc/self/fd/{fd}")
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    gc.collect()
    before = memfds()
    fs = connect_virtiofsd(virtiofsd_socket)
    fs.init()
    assert memfds() > before  # the memfd (and the dup mmap keeps)
    fs.close()
    gc.disable()  # freed by reference counting, not by a later collection
    try:
        del fs
        assert memfds() == before
    finally:
        gc.enable()
