"""The driver used wrongly from Python, as a device team's test code might: a bad
argument, a call after close(), start() twice, Ctrl-C in the middle of sending a
request. Each gets a clear error, loses no request buffer, and never leaves the
object silently stuck (interrupted mid-send: it says it is broken)."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

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


def test_close_frees_the_guest_memory(virtiofsd_socket) -> None:
    """The device in another process: every memfd here is the driver's."""
    def memfds() -> int:
        return sum("vfsdrv-guest-memory" in os.readlink(f"/proc/self/fd/{fd}")
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    gc.collect()
    before = memfds()
    fs = connect_virtiofsd(virtiofsd_socket)
    fs.init()
    assert memfds() > before  # the memfd (and the dup mmap keeps)
    gc.disable()  # freed by close() itself, not by a later collection
    try:
        fs.close()
        assert memfds() == before
        assert not any("vfsdrv-guest-memory" in line for line in open("/proc/self/maps"))
        del fs
    finally:
        gc.enable()


def test_a_nul_in_an_xattr_name_or_symlink_target_is_refused(client) -> None:
    """The request carries them NUL-terminated: a NUL inside would name another
    attribute (and store the rest as its value), or cut the target short."""
    from vfsdrv.fs.client import ROOT_ID as root

    free = client.fs.free_slots
    for call in (lambda: client.setxattr(root, "user.a\0evil", b"v"),
                 lambda: client.getxattr(root, b"user.a\0x"),
                 lambda: client.getxattr_size(root, "user.a\0x"),
                 lambda: client.removexattr(root, "user.a\0x"),
                 lambda: client.setxattr(root, "", b"v"),
                 lambda: client.symlink(root, "l", "target\0junk")):
        with pytest.raises(ValueError, match="NUL"):
            call()
    assert client.fs.free_slots == free


def test_a_failed_start_leaves_nothing_open(tmp_path, monkeypatch) -> None:
    """start() that fails half-way (here: reading the config) closes what it opened
    (memory, eventfds, the connection): nothing is left for the caller to close."""
    from vfsdrv.errors import ConfigError
    from vfsdrv.fs.device import VirtioFs
    from vfsdrv.refdev import RefDevice
    from vfsdrv.virtio.device import VirtioDevice
    from vfsdrv.virtio.vhost_user import VhostUserTransport

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    def broken_config(self, offset: int, length: int) -> bytes:
        raise ConfigError("config space unreadable (test)")

    sock = str(tmp_path / "r.sock")
    with RefDevice(sock, str(tmp_path)):  # serves one connection after another
        monkeypatch.setattr(VirtioDevice, "read_config", broken_config)
        before: set[str] = set()
        for attempt in range(4):
            if attempt == 1:  # after the device's first session made what it keeps
                time.sleep(0.5)
                before = fds()
            fs = VirtioFs(VhostUserTransport(sock))
            with pytest.raises(ConfigError):
                fs.start()
            with pytest.raises(DeviceError):
                fs.start()  # closed now
        # the device runs in this process: its side of each connection winds down in
        # its own thread, a moment later (ours is closed before start() returns)
        deadline = time.monotonic() + 10
        while not fds() <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fds() <= before


def test_misuse_before_start_and_bad_settings_are_clear_errors(virtiofsd_socket) -> None:
    from vfsdrv.fs.device import VirtioFs
    from vfsdrv.virtio.vhost_user import VhostUserTransport

    for kw in ({"notify_buffers": 0}, {"queue_size": 1}, {"max_io": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            VirtioFs(object(), **kw)  # type: ignore[arg-type]
    fs = VirtioFs(VhostUserTransport(str(virtiofsd_socket)))
    try:
        for call in (lambda: fs.process(), lambda: fs.wait(0), lambda: fs.call(3, ROOT_ID)):
            with pytest.raises(DeviceError, match="not started"):
                call()
    finally:
        fs.close()


def test_waiting_for_a_free_buffer_keeps_to_the_calls_timeout(virtiofsd_socket) -> None:
    """Every buffer held by a device that stopped answering: a call with timeout=1
    raises TimeoutError after about 1 s (it used to wait 30 s, then blame the device
    with a DeviceError)."""
    import signal
    import subprocess
    import time

    fs = connect_virtiofsd(virtiofsd_socket)
    fs.init()
    pids = [int(x) for x in subprocess.run(
        ["pgrep", "-f", f"{virtiofsd_socket}"], capture_output=True, text=True).stdout.split()
        if int(x) != os.getpid()]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)

    def stopped(pid: int) -> bool:  # every thread of it (a stop reaches them one by one)
        try:
            return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT"
                       for t in Path(f"/proc/{pid}/task").iterdir())
        except OSError:  # a thread (or the process) went meanwhile: look again
            return False

    deadline = time.monotonic() + 10
    while not all(stopped(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        while fs.free_slots[0]:
            fs.call_async(3, ROOT_ID, b"\0" * 16)  # GETATTR, never answered
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # for a buffer (or, if one came back, the reply)
            fs.call(3, ROOT_ID, b"\0" * 16, timeout=1)
        assert time.monotonic() - start < 5
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        fs.close()
