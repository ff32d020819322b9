"""The reference device's lock table: POSIX and flock rules, waiters, limits."""

from __future__ import annotations

import errno

import pytest
from vfsdrv.refdev.lock_table import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    OFFSET_MAX,
    Lock,
    LockResult,
    LockTable,
)

FILE = (1, 100)
OTHER_FILE = (1, 200)
A = (1, 0xA)  # session 1, lock owner 0xA
B = (2, 0xB)  # another frontend
A2 = (1, 0xA2)  # same frontend, another owner


def lk(owner, start, end, type_=F_WRLCK, pid=0) -> Lock:
    return Lock(owner, start, end, type_, pid)


def ranges(table: LockTable, key=FILE, flock=False) -> list[tuple]:
    return [(x.owner, x.start, x.end, x.type) for x in table.locks(key, flock)]


class Recorder:
    def __init__(self) -> None:
        self.results: list[int] = []

    def __call__(self, error: int) -> None:
        self.results.append(error)


def test_write_locks_of_two_owners_conflict_on_overlap_only() -> None:
    t = LockTable()
    assert t.set(FILE, lk(A, 0, 99)) == 0
    assert t.set(FILE, lk(B, 50, 60)) == -errno.EAGAIN
    assert t.set(FILE, lk(B, 100, 200)) == 0  # inclusive end: 99 and 100 do not overlap
    assert t.set(OTHER_FILE, lk(B, 0, 99)) == 0  # other file, no conflict


def test_read_locks_share_and_block_writers() -> None:
    t = LockTable()
    assert t.set(FILE, lk(A, 0, 9, F_RDLCK)) == 0
    assert t.set(FILE, lk(B, 5, 15, F_RDLCK)) == 0
    assert t.set(FILE, lk(A2, 0, 0, F_WRLCK)) == -errno.EAGAIN
    conflict = t.test(FILE, lk(A2, 12, 20, F_WRLCK))
    assert conflict is not None and conflict.owner == B and conflict.type == F_RDLCK
    assert t.test(FILE, lk(A2, 16, 20, F_WRLCK)) is None


def test_own_locks_never_conflict_and_are_replaced() -> None:
    t = LockTable()
    assert t.set(FILE, lk(A, 0, 99, F_RDLCK)) == 0
    assert t.set(FILE, lk(A, 10, 19, F_WRLCK)) == 0  # upgrade a middle part: split in 3
    assert ranges(t) == [(A, 0, 9, F_RDLCK), (A, 10, 19, F_WRLCK), (A, 20, 99, F_RDLCK)]


def test_unlock_in_the_middle_splits_a_lock() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 0, OFFSET_MAX))
    assert t.set(FILE, lk(A, 100, 199, F_UNLCK)) == 0
    assert ranges(t) == [(A, 0, 99, F_WRLCK), (A, 200, OFFSET_MAX, F_WRLCK)]
    assert t.set(FILE, lk(B, 150, 150)) == 0  # the hole is free for others


def test_adjacent_and_overlapping_locks_of_one_type_merge() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 0, 9))
    t.set(FILE, lk(A, 10, 19))  # adjacent
    t.set(FILE, lk(A, 15, 40))  # overlapping
    t.set(FILE, lk(A, 50, 60))  # separate
    assert ranges(t) == [(A, 0, 40, F_WRLCK), (A, 50, 60, F_WRLCK)]
    t.set(FILE, lk(A, 41, 49))  # fills the gap: one lock
    assert ranges(t) == [(A, 0, 60, F_WRLCK)]
    t.set(FILE, lk(A, 61, 70, F_RDLCK))  # other type: no merge
    assert ranges(t) == [(A, 0, 60, F_WRLCK), (A, 61, 70, F_RDLCK)]


def test_invalid_ranges_and_types_are_rejected() -> None:
    t = LockTable()
    with pytest.raises(ValueError):
        t.set(FILE, lk(A, 10, 9))
    with pytest.raises(ValueError):
        t.set(FILE, lk(A, 0, 9, 7))


def test_flock_and_posix_locks_are_independent() -> None:
    t = LockTable()
    assert t.set(FILE, lk(A, 0, OFFSET_MAX)) == 0
    assert t.set(FILE, lk(B, 0, OFFSET_MAX), flock=True) == 0  # POSIX lock does not block flock
    assert t.set(FILE, lk(A, 0, OFFSET_MAX), flock=True) == -errno.EAGAIN
    assert t.set(FILE, lk(B, 0, 0)) == -errno.EAGAIN  # flock does not grant POSIX


def test_flock_conversion_drops_the_old_lock_first() -> None:
    t = LockTable()
    assert t.set(FILE, lk(A, 0, OFFSET_MAX, F_RDLCK), flock=True) == 0
    assert t.set(FILE, lk(B, 0, OFFSET_MAX, F_RDLCK), flock=True) == 0
    # A's upgrade fails against B's shared lock, and (as on Linux) A's lock is gone
    assert t.set(FILE, lk(A, 0, OFFSET_MAX, F_WRLCK), flock=True) == -errno.EAGAIN
    assert ranges(t, flock=True) == [(B, 0, OFFSET_MAX, F_RDLCK)]
    t.release_flock(FILE, B)
    assert t.set(FILE, lk(A, 0, OFFSET_MAX, F_WRLCK), flock=True) == 0


def test_waiter_is_granted_when_the_lock_goes() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 0, 99))
    done = Recorder()
    assert t.set_wait(FILE, lk(B, 50, 50), False, 42, done) == LockResult.WAITING
    assert t.waiting() == 1 and done.results == []
    t.set(FILE, lk(A, 0, 49, F_UNLCK))  # still covers 50
    assert done.results == []
    t.set(FILE, lk(A, 50, 99, F_UNLCK))
    assert done.results == [0]
    assert ranges(t) == [(B, 50, 50, F_WRLCK)]
    assert t.waiting() == 0


def test_grantable_blocking_request_is_granted_at_once() -> None:
    t = LockTable()
    done = Recorder()
    assert t.set_wait(FILE, lk(A, 0, 9), False, 1, done) == LockResult.GRANTED
    assert done.results == []


def test_waiters_are_granted_in_order_and_keep_conflicting() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 0, 9))
    first, second = Recorder(), Recorder()
    t.set_wait(FILE, lk(B, 0, 9), False, 1, first)
    t.set_wait(FILE, lk(A2, 0, 9), False, 2, second)
    t.release_posix(FILE, A)
    assert first.results == [0] and second.results == []
    t.release_posix(FILE, B)
    assert second.results == [0]


def test_waiter_limit_gives_enolck() -> None:
    t = LockTable(max_waiting=2)
    t.set(FILE, lk(A, 0, 9))
    assert t.set_wait(FILE, lk(B, 0, 0), False, 1, Recorder()) == LockResult.WAITING
    assert t.set_wait(FILE, lk((3, 1), 0, 0), False, 2, Recorder()) == LockResult.WAITING
    assert t.set_wait(FILE, lk((4, 1), 0, 0), False, 3, Recorder()) == -errno.ENOLCK
    # a request that needs no wait does not need a waiter slot
    assert t.set_wait(FILE, lk((4, 1), 20, 29), False, 4, Recorder()) == LockResult.GRANTED


def test_cancel_completes_the_waiter_with_eintr() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 0, 9))
    done = Recorder()
    t.set_wait(FILE, lk(B, 0, 9), False, 77, done)
    assert not t.cancel(B[0], 78)  # another unique
    assert not t.cancel(A[0], 77)  # another session's request with the same unique
    assert t.cancel(B[0], 77)
    assert done.results == [-errno.EINTR]
    t.release_posix(FILE, A)
    assert done.results == [-errno.EINTR]  # cancelled: never granted
    assert ranges(t) == []


def test_session_release_drops_locks_and_waiters_and_wakes_others() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 0, 9))
    t.set(OTHER_FILE, lk(A2, 0, 9), flock=True)
    mine, theirs = Recorder(), Recorder()
    t.set(FILE, lk(B, 20, 29))
    t.set_wait(FILE, lk(A2, 20, 29), False, 5, mine)  # session 1 waits for session 2
    t.set_wait(FILE, lk(B, 0, 9), False, 6, theirs)  # session 2 waits for session 1
    t.release_session(1)
    assert theirs.results == [0]
    assert mine.results == []  # dropped silently: nobody is left to tell
    assert t.waiting() == 0
    assert ranges(t) == [(B, 0, 9, F_WRLCK), (B, 20, 29, F_WRLCK)]
    assert ranges(t, OTHER_FILE, flock=True) == []


def test_a_device_shutting_down_grants_no_waiter() -> None:
    """The device stops its sessions one by one: the first one's locks going must
    not grant the second one's waiters (it would be told it holds a lock that is gone
    a moment later)."""
    t = LockTable()
    t.set(FILE, lk(A, 0, 9))
    theirs = Recorder()
    t.set_wait(FILE, lk(B, 0, 9), False, 6, theirs)
    t.shut_down()
    t.release_session(1)
    t.release_session(2)
    assert theirs.results == [] and t.waiting() == 0


def test_deadlock_between_two_frontends_is_detected() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 0, 0))
    t.set(FILE, lk(B, 10, 10))
    assert t.set_wait(FILE, lk(A, 10, 10), False, 1, Recorder()) == LockResult.WAITING
    assert t.set_wait(FILE, lk(B, 0, 0), False, 2, Recorder()) == -errno.EDEADLK


def test_getlk_reports_the_conflicting_lock() -> None:
    t = LockTable()
    t.set(FILE, lk(A, 100, 199, F_RDLCK, pid=1234))
    held = t.test(FILE, lk(B, 150, 300, F_WRLCK))
    assert held == Lock(A, 100, 199, F_RDLCK, 1234)
    assert t.test(FILE, lk(B, 150, 300, F_RDLCK)) is None
