"""The lock waits of the notification queue (vfsdrv.fs.notify.LockWaits): a
FUSE_NOTIFY_LOCK can overtake its SETLKW's "wait" reply on another queue, or reach
the control thread while the pump's LOCK_WAIT event is still queued; neither may
lose the wake-up (a lost one leaves the program blocked for good)."""

from __future__ import annotations

import collections
import errno

import pytest
from vfsdrv.errors import ProtocolError
from vfsdrv.fs.notify import LockWaits
from vfsdrv.fs.slots import Completion

SETLKW = 33


def waits() -> tuple[LockWaits, list[Completion]]:
    return LockWaits(collections.Counter()), []


def test_parked_then_notified() -> None:
    locks, done = waits()
    locks.park(8, SETLKW, done.append)
    assert 8 in locks and len(locks) == 1
    locks.notified(8, 0, lambda u: False)
    assert [(c.unique, c.error) for c in done] == [(8, 0)] and len(locks) == 0


def test_notification_before_the_wait_reply() -> None:
    locks, done = waits()
    locks.notified(8, -errno.EDEADLK, lambda u: u == 8)  # the reply is still on its way
    assert done == []
    locks.park(8, SETLKW, done.append)
    assert [(c.unique, c.error) for c in done] == [(8, -errno.EDEADLK)]


def test_wait_event_taken_in_while_looking() -> None:
    """The relay's still_coming takes in the pumps' events, which parks the waiter:
    the notification must then complete it, not be kept as early."""
    locks, done = waits()

    def still_coming(unique: int) -> bool:
        locks.park(unique, SETLKW, done.append)  # the queued LOCK_WAIT event
        return True

    locks.notified(8, 0, still_coming)
    assert [(c.unique, c.error) for c in done] == [(8, 0)] and len(locks) == 0


def test_notification_for_nobody_is_an_error() -> None:
    locks, _done = waits()
    with pytest.raises(ProtocolError, match="not waiting"):
        locks.notified(8, 0, lambda u: False)


@pytest.mark.parametrize("error", [-512, -4095, 1, 7])
def test_impossible_error_still_wakes_the_waiter_with_eio(error: int) -> None:
    locks, done = waits()
    locks.park(8, SETLKW, done.append)
    locks.notified(8, error, lambda u: False)
    assert [(c.unique, c.error) for c in done] == [(8, -errno.EIO)]
    assert locks.stats["bad_notification"] == 1


def test_fail_all() -> None:
    locks, done = waits()
    for u in (2, 4, 6):
        locks.park(u, SETLKW, done.append)
    locks.fail_all(-errno.ENOTCONN)
    assert sorted(c.unique for c in done) == [2, 4, 6] and len(locks) == 0
    assert {c.error for c in done} == {-errno.ENOTCONN}
