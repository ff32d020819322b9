"""What a device can make the notification path keep or log is bounded: early
FUSE_NOTIFY_LOCKs for SETLKWs that never park, warnings for malformed
notifications (the first few one by one, then a count), and the relay's backlog of
notifications waiting for the kernel."""

from __future__ import annotations

import collections
import logging

import pytest
from vfsdrv.fs import notify
from vfsdrv.fs.notify import UNIQUES_KEPT, LockWaits, NotificationQueue


def test_early_notifications_that_never_find_a_waiter_are_bounded() -> None:
    waits = LockWaits(collections.Counter())
    for unique in range(2, 2 + 2 * UNIQUES_KEPT * 2, 2):
        waits.notified(unique, 0, still_coming=lambda _u: True)
    assert len(waits._early) == UNIQUES_KEPT
    # the newest are kept: one of them still reaches its waiter
    got = []
    waits.park(2 + 2 * (2 * UNIQUES_KEPT * 2 // 2 - 1), 33, got.append)
    assert len(got) == 1


class _Vq:
    def __init__(self, n: int) -> None:
        self.left = n

    def get_used(self) -> list[tuple[object, int]]:
        out, self.left = [(object(), 0)] * self.left, 0
        return out

    def enable_interrupts(self) -> bool:
        return False


def test_a_flood_of_malformed_notifications_logs_a_count(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    q = NotificationQueue.__new__(NotificationQueue)
    q.vq = _Vq(25_000)
    q.stats = collections.Counter()
    q._post = lambda buf: None
    with caplog.at_level(logging.WARNING, logger=notify.__name__):
        assert q.process(poll=False) == 25_000
    lines = [r.getMessage() for r in caplog.records]
    assert q.stats["bad_notification"] == 25_000
    assert len(lines) == notify.BAD_NOTIFICATIONS_LOGGED + 2  # and at 10000, 20000
    assert "(20000 so far" in lines[-1]


def test_the_relays_notification_backlog_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A device that floods notifications faster than the kernel takes them (or while
    the kernel holds one write back) cannot grow the relay's memory: past
    NOTIFY_BACKLOG waiting, each is dropped, counted, and said once."""
    import queue
    import types

    from vfsdrv.frontends import relay

    r = relay.Relay.__new__(relay.Relay)
    r.stats = collections.Counter()
    r.debug = False
    r._dropped_codes = set()
    r._notify_q = queue.SimpleQueue()
    r._notify_thread = types.SimpleNamespace()  # a writer that takes nothing
    inval_inode = bytes(16 + 24)  # out header + fuse_notify_inval_inode_out
    with caplog.at_level(logging.WARNING, logger=relay.__name__):
        for _ in range(relay.NOTIFY_BACKLOG + 500):
            r._on_notify(2, memoryview(inval_inode))
    assert r._notify_q.qsize() == relay.NOTIFY_BACKLOG
    assert r.stats["notify_backlog_dropped"] == 500
    assert r.stats["notifications"] == relay.NOTIFY_BACKLOG  # forwarded
    assert len([m for m in caplog.messages if "dropped" in m]) == 1


@pytest.mark.parametrize("payload", [8, 24, 48])
def test_a_lock_notification_of_the_wrong_length_is_malformed(payload: int) -> None:
    """The lock code with a payload that is neither FUSE_NOTIFY_LOCK's 16 bytes nor
    (code 7) RESEND's none: refused as malformed, never passed to the kernel or a
    waiter."""
    import mmap
    import struct
    from types import SimpleNamespace

    q = NotificationQueue.__new__(NotificationQueue)
    q.lock_code = 7
    q.stats = collections.Counter()
    passed_on = []
    q.dispatch = lambda: lambda code, data: passed_on.append(code)
    view = memoryview(mmap.mmap(-1, 4096))
    struct.pack_into("<IiQ", view, 0, 16 + payload, 7, 0)
    with pytest.raises(notify.ProtocolError, match=f"with {payload} bytes of payload"):
        q.handle(SimpleNamespace(view=view), 16 + payload)
    assert passed_on == [] and not q.stats


def test_notification_payloads_are_judged_as_the_kernel_judges_them() -> None:
    """fs/fuse/dev.c refuses these with EINVAL: the driver counts them as malformed
    (notify.queue fails a device that sends them) and never forwards them."""
    import struct

    from vfsdrv.fs.abi import NotifyCode, notify_problem

    assert notify_problem(NotifyCode.POLL, bytes(8)) is None
    assert "POLL of 16 bytes, not 8" in notify_problem(NotifyCode.POLL, bytes(16))
    assert notify_problem(NotifyCode.INVAL_INODE, bytes(24)) is None
    assert notify_problem(NotifyCode.INVAL_INODE, bytes(16)) is not None
    entry = struct.pack("<QII", 1, 3, 0)
    assert notify_problem(NotifyCode.INVAL_ENTRY, entry + b"abc\0") is None
    assert "expected 20" in notify_problem(NotifyCode.INVAL_ENTRY, entry + b"abc")
    assert notify_problem(NotifyCode.DELETE, struct.pack("<QQII", 1, 2, 1, 0) + b"x\0") is None
    assert notify_problem(NotifyCode.DELETE, bytes(8)) is not None
    store = struct.pack("<QQII", 5, 0, 3, 0)
    assert notify_problem(NotifyCode.STORE, store + b"abc") is None
    assert "STORE of 3 bytes carries 2" in notify_problem(NotifyCode.STORE, store + b"ab")
    assert notify_problem(NotifyCode.RETRIEVE, bytes(32)) is None
    assert notify_problem(NotifyCode.RETRIEVE, bytes(40)) is not None
    assert notify_problem(7, bytes(16)) is None  # RESEND or LOCK: the caller's
