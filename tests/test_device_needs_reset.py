"""DEVICE_NEEDS_RESET (issue 12 item 4; the behaviour is described in
docs/device-reset.rst): a device that sets it, and signals the configuration
change, fails every request in flight and ends the session; nothing is retried and
the device is not re-initialised behind the user's back. A new bring-up (a new
mount) resets the function and works again.

The device is the emulated virtio-pci function (tests/fakes/vhost_pci_bridge.py)
with the reference device behind it; `VhostPciFunction.device_error()` breaks it
as QEMU's virtio_error() does: the rings stop (GET_VRING_BASE), DEVICE_NEEDS_RESET
is set and the configuration vector fires. Two drivers meet it: the typed client
(VirtioFs + FuseClient, in this process) and a real relay mount with native pumps
served by tests/fakes/bridge_mount.py in its own process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from backends import refdev
from driver_helpers import WAIT, open_file, pump, whole
from fakes.bridge_mount import BridgeMount
from fakes.vhost_pci_bridge import VhostPciFunction
from mounting import is_mounted
from vfsdrv.errors import DeviceNeedsResetError
from vfsdrv.fs.abi import Opcode
from vfsdrv.fs.client import ROOT_ID, FuseClient
from vfsdrv.fs.device import VirtioFs
from vfsdrv.refdev.lock_table import F_WRLCK
from vfsdrv.virtio import pci as vp
from vfsdrv.virtio.constants import Status

#: how long a waiter may take to hear of the failure (it is told at once; this
#: only bounds a loaded machine)
PROMPT = 2.0
VFSDRV = [sys.executable, "-m", "vfsdrv.tools.cli"]


def bring_up(fn: VhostPciFunction, *, poll: bool = False) -> FuseClient:
    t = vp.VirtioPciTransport(fn, poll=poll, close_function=False, device_id=vp.VIRTIO_ID_FS)
    fs = VirtioFs(t, poll=poll).start()
    fs.init()
    return FuseClient(fs)


@pytest.fixture
def function(device_factory) -> Iterator[VhostPciFunction]:
    fn = VhostPciFunction(device_factory().socket_path)
    try:
        yield fn
    finally:
        fn.close()


def stall_request_queue(fn: VhostPciFunction, c: FuseClient) -> None:
    """Stop the backend's request ring (as a device that has taken requests and
    will never answer them), so what is posted next stays in flight."""
    (q,) = c.fs.request_queues
    fn.backend.stop_ring(q.vq.index)


# -- the typed client ---------------------------------------------------------------------
def test_a_request_in_flight_fails_at_once_with_device_needs_reset(function,
                                                                   export_dir: Path) -> None:
    (export_dir / "f").write_text("data")
    fn = function
    c = bring_up(fn)
    assert c.lookup(ROOT_ID, "f").attr.size == 4
    stall_request_queue(fn, c)
    pending = c.fs.call_async(Opcode.LOOKUP, ROOT_ID, b"f\0")
    with pytest.raises(TimeoutError):
        pending.result(0.2)  # really in flight: the device does not answer
    fn.device_error()
    assert select.select([c.fs.transport.config_fd()], [], [], 0)[0]  # vector fired
    t0 = time.monotonic()
    with pytest.raises(DeviceNeedsResetError, match="DEVICE_NEEDS_RESET"):
        pending.result(WAIT)
    assert time.monotonic() - t0 < PROMPT
    assert isinstance(c.fs.broken, DeviceNeedsResetError)
    assert fn.common.status & Status.DEVICE_NEEDS_RESET
    # nothing is sent to a device that needs a reset: later calls fail at once
    kicks = sum(fn.kicks.values())
    t0 = time.monotonic()
    with pytest.raises(DeviceNeedsResetError):
        c.getattr(ROOT_ID)
    assert time.monotonic() - t0 < 0.5 and sum(fn.kicks.values()) == kicks
    # ending the session resets the function (status 0 clears NEEDS_RESET) and a new
    # bring-up, as a new mount does, works
    c.fs.close()
    assert fn.common.status == 0 and not fn.closed
    c2 = bring_up(fn)
    try:
        assert c2.lookup(ROOT_ID, "f").attr.size == 4
        assert not c2.fs.dev.needs_reset()
    finally:
        c2.fs.close()
    assert fn.errors == []


def test_every_waiter_fails_together(function, connect, export_dir: Path) -> None:
    """Ordinary requests on a stalled queue and a blocking lock parked on the
    notification queue: one configuration interrupt ends them all."""
    fn = function
    (export_dir / "l").write_text("")
    c = bring_up(fn)
    other = connect(SimpleNamespace(socket_path=fn.backend.socket_path))  # over vhost-user
    na, fa = open_file(other, "l")
    nb, fb = open_file(c, "l")
    other.setlk(na, fa, 1, whole(F_WRLCK))
    lock = c.setlkw_async(nb, fb, 1, whole(F_WRLCK))
    pump([c], lambda: c.fs.lock_waiters == 1)
    stall_request_queue(fn, c)
    lookups = [c.fs.call_async(Opcode.GETATTR, ROOT_ID, bytes(16)) for _ in range(5)]
    fn.device_error()
    t0 = time.monotonic()
    for p in [lock, *lookups]:
        with pytest.raises(DeviceNeedsResetError):
            p.result(WAIT)
    assert time.monotonic() - t0 < PROMPT
    assert c.fs.lock_waiters == 0
    c.fs.close()


def test_in_poll_mode_a_waiter_also_fails(function, export_dir: Path) -> None:
    fn = function
    c = bring_up(fn, poll=True)
    try:
        assert c.fs.transport.config_fd() is None
        stall_request_queue(fn, c)
        pending = c.fs.call_async(Opcode.GETATTR, ROOT_ID, bytes(16))
        fn.device_error()
        with pytest.raises(DeviceNeedsResetError):
            pending.result(PROMPT)
    finally:
        c.fs.close()


# -- a relay mount --------------------------------------------------------------------------
@pytest.fixture
def bridge_mount(tmp_path: Path) -> Iterator[tuple[BridgeMount, Path]]:
    export, mnt, sock = tmp_path / "export", tmp_path / "mnt", tmp_path / "ref.sock"
    export.mkdir()
    mnt.mkdir()
    with refdev(export, sock):
        m = BridgeMount(sock, mnt, tmp_path / "bridge.log")
        try:
            yield m, export
        finally:
            m.close()


def assert_disconnected(m: BridgeMount, export: Path) -> None:
    """The dead server's mount: still there, ENOTCONN everywhere, `vfsdrv umount`
    removes it, nothing written reached the directory underneath."""
    assert is_mounted(m.mnt)
    for attempt in (lambda: os.listdir(m.mnt), lambda: (m.mnt / "late").write_text("x")):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.ENOTCONN
    r = subprocess.run([*VFSDRV, "umount", str(m.mnt)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.mnt) and os.listdir(m.mnt) == []
    assert not (export / "late").exists()


def test_relay_mount_ends_cleanly_when_the_idle_device_needs_reset(bridge_mount) -> None:
    m, export = bridge_mount
    (m.mnt / "before").write_text("written before")
    assert (export / "before").read_text() == "written before"
    t0 = time.monotonic()
    m.device_error()
    assert m.proc.wait(10) == 3, m.log_text()  # the relay ended: the device failed
    assert time.monotonic() - t0 < 5, "the relay noticed DEVICE_NEEDS_RESET late"
    log = m.log_text()
    assert "the device set DEVICE_NEEDS_RESET" in log, log
    assert f"vfsdrv umount {m.mnt}" in log, log
    assert_disconnected(m, export)


LOCKER = """
import errno, fcntl, sys, time
f = open(sys.argv[1], "r+")
print("waiting", flush=True)
try:
    fcntl.lockf(f, fcntl.LOCK_EX)
    print("granted", flush=True)
except OSError as e:
    print(errno.errorcode[e.errno], flush=True)
"""

READER = """
import errno, sys
n = 0
while True:
    try:
        with open(sys.argv[1], "rb") as f:
            f.read()
        n += 1
        if n == 20:
            print("reading", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], n, flush=True)
        break
"""


def test_relay_mount_programs_get_errors_when_the_device_needs_reset(bridge_mount) -> None:
    """A program waiting for a blocking lock (parked in the relay, completed only by
    the device's notification queue) and a program reading in a loop both get an
    error promptly; the mount then answers ENOTCONN until unmounted."""
    m, export = bridge_mount
    (m.mnt / "locked").write_text("")
    (m.mnt / "data").write_bytes(os.urandom(256 << 10))
    holder = open(m.mnt / "locked", "r+")
    fcntl.lockf(holder, fcntl.LOCK_EX)
    programs = [subprocess.Popen([sys.executable, "-c", code, str(m.mnt / name)],
                                 stdout=subprocess.PIPE, text=True)
                for code, name in ((LOCKER, "locked"), (READER, "data"))]
    try:
        for p, first in zip(programs, ("waiting", "reading"), strict=True):
            assert p.stdout is not None and p.stdout.readline().strip() == first
        time.sleep(0.3)  # the locker is inside F_SETLKW
        assert programs[0].poll() is None, "the lock was granted while held"
        t0 = time.monotonic()
        m.device_error()
        outs = [p.communicate(timeout=10)[0].split() for p in programs]
        assert time.monotonic() - t0 < 5
        # an aborted connection: requests in flight end with ECONNABORTED, new ones ENOTCONN
        assert outs[0][0] in ("ECONNABORTED", "ENOTCONN"), outs
        assert outs[1][0] in ("ECONNABORTED", "ENOTCONN"), outs
    finally:
        for p in programs:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            holder.close()
        except OSError:
            pass  # the connection is gone: the unlock on close fails
    assert m.proc.wait(10) == 3, m.log_text()
    assert_disconnected(m, export)
