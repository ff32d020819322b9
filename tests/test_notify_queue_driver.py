"""The driver's notification queue (vfsdrv.fs.notify.NotificationQueue) fed by hand:
a flood of distinct notify codes leaves the statistics bounded (issue 10 item 6),
and malformed notifications are counted and dropped, never dispatched."""

from __future__ import annotations

import collections
import struct

import pytest
from fakes.transport import identity_arena
from vfsdrv.errors import ProtocolError
from vfsdrv.fs.notify import LockWaits, NotificationQueue
from vfsdrv.virtio.virtqueue import Virtqueue


def queue(dispatched: list) -> tuple[NotificationQueue, collections.Counter]:
    arena = identity_arena(1 << 20)
    stats: collections.Counter[str] = collections.Counter()
    nq = NotificationQueue(Virtqueue(1, 16, arena), 64, 4, locks=LockWaits(stats),
                           lock_code=7, still_coming=lambda u: False,
                           dispatch=lambda: lambda code, msg: dispatched.append(code),
                           stats=stats)
    nq.post_all(arena)
    return nq, stats


def message(code: int, payload: bytes = b"\0" * 8) -> bytes:
    return struct.pack("<IiQ", 16 + len(payload), code, 0) + payload


def test_a_flood_of_distinct_codes_keeps_the_statistics_bounded() -> None:
    dispatched: list[int] = []
    nq, stats = queue(dispatched)
    buf = nq.buffers[0]
    for code in range(1, 500_000, 7):
        buf.view[:24] = message(code)
        nq.handle(buf, 24)
    assert len(stats) <= 11  # notify_1..notify_9, notify_other, and nothing per code
    assert stats["notify_other"] > 70_000
    assert len(dispatched) == len(range(1, 500_000, 7))  # every one still dispatched


def test_malformed_notifications_are_not_dispatched() -> None:
    dispatched: list[int] = []
    nq, stats = queue(dispatched)
    buf = nq.buffers[0]
    for raw, used in ((message(2)[:10], 10),                      # shorter than a header
                      (struct.pack("<IiQ", 64, 2, 0), 24)):        # header longer than used
        buf.view[: len(raw)] = raw
        with pytest.raises(ProtocolError):
            nq.handle(buf, used)
    assert dispatched == []
