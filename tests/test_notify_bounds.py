"""What a device can make the notification path keep or log is bounded: early
FUSE_NOTIFY_LOCKs for SETLKWs that never park, and warnings for malformed
notifications (the first few one by one, then a count)."""

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
