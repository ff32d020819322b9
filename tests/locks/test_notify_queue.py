"""The driver's notification queue against the reference device, two frontends
in this process: a notification that arrives before the reply it completes, an
empty notification queue for a while (nothing lost), notify_buf_size edges, and a
device whose notify_buf_size is too small (a clear error, the device FAILED)."""

from __future__ import annotations

import time

import pytest
from driver_helpers import open_file, pump, wait_used
from vfsdrv.errors import ConfigError
from vfsdrv.fs.client import OFFSET_MAX, Lock
from vfsdrv.fs.device import VirtioFs
from vfsdrv.virtio.constants import Status
from vfsdrv.virtio.vhost_user import VhostUserTransport

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2


def test_notification_before_its_reply(device_factory, connect) -> None:
    dev = device_factory()
    a, b = connect(dev), connect(dev)
    na, fa = open_file(a, "f")
    nb, fb = open_file(b, "f")
    a.setlk(na, fa, 1, Lock(0, OFFSET_MAX, F_WRLCK, 0))
    pending = b.setlkw_async(nb, fb, 7, Lock(0, OFFSET_MAX, F_WRLCK, 0))
    wait_used(b, 2)  # the "wait" reply is in B's used ring, not yet seen by B
    a.setlk(na, fa, 1, Lock(0, OFFSET_MAX, F_UNLCK, 0))
    wait_used(b, 1)  # ... and so is the FUSE_NOTIFY_LOCK that completes it
    # B harvests the notification queue first: the notification precedes its reply
    pending.result(5)
    assert b.fs.stats["lock_notify_before_reply"] == 1
    assert b.fs.lock_waiters == 0
    with pytest.raises(OSError):
        a.setlk(na, fa, 1, Lock(0, 0, F_WRLCK, 0))


def test_empty_notification_queue_for_a_while_loses_nothing(device_factory, connect) -> None:
    dev = device_factory(max_waiting_locks=32)
    a = connect(dev)
    b = connect(dev, notify_buffers=1)  # one buffer: every further notification must wait
    n = 12
    files = [f"w{i}" for i in range(n)]
    held = [open_file(a, f) for f in files]
    for nodeid, fh in held:
        a.setlk(nodeid, fh, 1, Lock(0, OFFSET_MAX, F_WRLCK, 0))
    mine = [open_file(b, f) for f in files]
    pend = [b.setlkw_async(nodeid, fh, 2, Lock(0, OFFSET_MAX, F_WRLCK, 0)) for nodeid, fh in mine]
    pump([b], lambda: b.fs.lock_waiters == n)
    for nodeid, fh in held:
        a.setlk(nodeid, fh, 1, Lock(0, OFFSET_MAX, F_UNLCK, 0))
    # B does nothing for a while: its single buffer is used, the rest must be held
    time.sleep(0.5)
    assert dev.locks.waiting() == 0  # granted on the device...
    assert sum(p.done for p in pend) == 0  # ...but not one notification has been seen
    for p in pend:
        p.result(5)
    assert b.fs.stats["lock_notifications"] == n
    assert b.fs.lock_waiters == 0


@pytest.mark.parametrize("size", [32, 33, 64, 4096])
def test_notify_buf_size_edges(device_factory, connect, size: int) -> None:
    dev = device_factory(notify_buf_size=size)
    a, b = connect(dev), connect(dev)
    assert b.fs.config.notify_buf_size == size
    na, fa = open_file(a, "e")
    nb, fb = open_file(b, "e")
    a.setlk(na, fa, 1, Lock(0, OFFSET_MAX, F_WRLCK, 0))
    pending = b.setlkw_async(nb, fb, 1, Lock(0, OFFSET_MAX, F_WRLCK, 0))
    pump([b], lambda: b.fs.lock_waiters == 1)
    a.setlk(na, fa, 1, Lock(0, OFFSET_MAX, F_UNLCK, 0))
    pending.result(5)


class SmallNotifyBufTransport(VhostUserTransport):
    """The real device with one field lied about: notify_buf_size 31 (a hostile device)."""

    def read_config(self, offset: int, length: int) -> bytes:
        data = bytearray(super().read_config(offset, length))
        if offset <= 40 < offset + length:
            data[40 - offset : 44 - offset] = (31).to_bytes(4, "little")
        return bytes(data)


def test_notify_buf_size_too_small_is_a_clear_error(device_factory) -> None:
    dev = device_factory()
    t = SmallNotifyBufTransport(dev.socket_path)
    fs = VirtioFs(t)
    try:
        with pytest.raises(ConfigError, match="notify_buf_size 31 is too small"):
            fs.start()
        assert fs.dev.status & Status.FAILED
        assert not fs.dev.status & Status.DRIVER_OK
    finally:
        fs.close()
