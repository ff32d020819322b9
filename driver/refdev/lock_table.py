"""The device's file lock table, shared by every connected frontend.

Two independent kinds of lock, as on Linux:
  * POSIX byte-range locks (fcntl F_SETLK/F_SETLKW/F_GETLK). Owner = (session, lock_owner):
    a frontend's lock_owner values mean nothing to another frontend, so two mounts
    behave as two guests of one device. Ranges have an inclusive end; a lock
    replaces the owner's locks it overlaps (splitting them) and merges with the
    owner's adjacent locks of the same type.
  * flock locks (FUSE_LK_FLOCK): whole-file, one per owner, where the FUSE owner is
    the open file. Changing the type drops the old lock first (Linux does the same:
    flock conversion is not atomic).
Read locks conflict only with write locks of other owners; a lock never conflicts
with its own owner's locks.

Waiters: a blocking request that cannot be granted is queued (at most
`max_waiting` device-wide, else ENOLCK) and granted in FIFO order as locks go away;
its `on_done(error)` runs with 0 when granted or -errno when cancelled. POSIX
requests that would wait on an owner that is itself waiting for the requester get
EDEADLK (the wait-for graph is followed across sessions; flock has no detection,
as on Linux). Callbacks run under the table's mutex and must not call back into it.

Lifetime: files are keyed by (st_dev, st_ino), which the host reuses for a new file
once the old one is gone. As on Linux, no lock outlives the last open file of its
inode: the servers report every open and close (open_file/close_file), and the last
close drops whatever is left on the key. While a file is open the device holds its
inode, so the number cannot be reused under a live lock.
"""

from __future__ import annotations

import errno
import fcntl
import threading
from collections.abc import Callable
from dataclasses import dataclass

F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_UNLCK = fcntl.F_UNLCK
#: end of a lock "to the end of the file" (Linux OFFSET_MAX)
OFFSET_MAX = (1 << 63) - 1

Owner = tuple[int, int]  # (session id, lock owner or open-file id)
FileKey = tuple[int, int]  # (st_dev, st_ino) of the locked file
LockDone = Callable[[int], None]


@dataclass(frozen=True)
class Lock:
    owner: Owner
    start: int
    end: int  # inclusive
    type: int
    pid: int


@dataclass
class Waiter:
    key: FileKey
    lock: Lock
    flock: bool
    unique: int  # the FUSE_SETLKW request it completes
    on_done: LockDone


class LockResult:
    GRANTED = 0
    WAITING = 1


def _overlaps(a: Lock, start: int, end: int) -> bool:
    return a.start <= end and start <= a.end


def _conflicts(held: Lock, want: Lock) -> bool:
    return (
        held.owner != want.owner
        and _overlaps(held, want.start, want.end)
        and F_WRLCK in (held.type, want.type)
    )


class LockTable:
    def __init__(self, max_waiting: int = 64) -> None:
        self.max_waiting = max_waiting
        self._mutex = threading.Lock()
        self._posix: dict[FileKey, list[Lock]] = {}
        self._flock: dict[FileKey, dict[Owner, Lock]] = {}
        self._waiters: list[Waiter] = []
        self._open: dict[FileKey, int] = {}  # open files per key, every session

    # -- queries ------------------------------------------------------------------------
    def test(self, key: FileKey, want: Lock, flock: bool = False) -> Lock | None:
        """The first lock that would stop `want`, or None (F_GETLK)."""
        _check(want)
        with self._mutex:
            return next(iter(self._conflicting(key, want, flock)), None)

    def locks(self, key: FileKey, flock: bool = False) -> list[Lock]:
        with self._mutex:
            held = self._flock.get(key, {}).values() if flock else self._posix.get(key, [])
            return sorted(held, key=lambda lk: (lk.start, lk.owner))

    def waiting(self) -> int:
        with self._mutex:
            return len(self._waiters)

    # -- changes ------------------------------------------------------------------------
    def set(self, key: FileKey, want: Lock, flock: bool = False) -> int:
        """F_SETLK: 0, or -EAGAIN if another owner holds a conflicting lock."""
        _check(want)
        with self._mutex:
            if want.type != F_UNLCK and flock:
                self._drop_flock(key, want.owner, keep_type=want.type)
            if want.type != F_UNLCK and self._conflicting(key, want, flock):
                self._wake(key)
                return -errno.EAGAIN
            self._apply(key, want, flock)
            self._wake(key)
            return 0

    def set_wait(
        self, key: FileKey, want: Lock, flock: bool, unique: int, on_done: LockDone
    ) -> int:
        """F_SETLKW: LockResult.GRANTED, LockResult.WAITING (on_done comes later),
        or -ENOLCK (no room for another waiter) / -EDEADLK."""
        _check(want)
        with self._mutex:
            if want.type != F_UNLCK and flock:
                self._drop_flock(key, want.owner, keep_type=want.type)
            blockers = self._conflicting(key, want, flock) if want.type != F_UNLCK else []
            if not blockers:
                self._apply(key, want, flock)
                self._wake(key)
                return LockResult.GRANTED
            if len(self._waiters) >= self.max_waiting:
                return -errno.ENOLCK
            if not flock and self._would_deadlock(want.owner, {b.owner for b in blockers}):
                return -errno.EDEADLK
            self._waiters.append(Waiter(key, want, flock, unique, on_done))
            return LockResult.WAITING

    def cancel(self, session: int, unique: int, error: int = -errno.EINTR) -> bool:
        """FUSE_INTERRUPT of a waiting SETLKW: it completes with `error`."""
        with self._mutex:
            for w in self._waiters:
                if w.lock.owner[0] == session and w.unique == unique:
                    self._waiters.remove(w)
                    w.on_done(error)
                    return True
            return False

    def release_posix(self, key: FileKey, owner: Owner) -> None:
        """close() semantics (FUSE_FLUSH with lock_owner): drop the owner's POSIX locks."""
        self.set(key, Lock(owner, 0, OFFSET_MAX, F_UNLCK, 0))

    def release_flock(self, key: FileKey, owner: Owner) -> None:
        """FUSE_RELEASE with FUSE_RELEASE_FLOCK_UNLOCK."""
        self.set(key, Lock(owner, 0, OFFSET_MAX, F_UNLCK, 0), flock=True)

    def open_file(self, key: FileKey) -> None:
        with self._mutex:
            self._open[key] = self._open.get(key, 0) + 1

    def close_file(self, key: FileKey) -> None:
        """An open file of `key` went away; the last one takes every lock with it."""
        with self._mutex:
            count = self._open.get(key, 0) - 1
            if count > 0:
                self._open[key] = count
                return
            self._open.pop(key, None)
            self._posix.pop(key, None)
            self._flock.pop(key, None)
            # a waiter needs an open file too: only a broken driver leaves one here
            for w in [w for w in self._waiters if w.key == key]:
                self._waiters.remove(w)
                w.on_done(-errno.EBADF)

    def open_files(self, key: FileKey) -> int:
        with self._mutex:
            return self._open.get(key, 0)

    def shut_down(self) -> None:
        """The device is stopping: every waiter is dropped (without a callback: its
        session goes too, and its driver fails it), so that no session that stops
        before another grants that one's waiters a lock it would hold nowhere."""
        with self._mutex:
            self._waiters.clear()

    def release_session(self, session: int) -> None:
        """A frontend went away (or re-initialised): its locks go, its waiters are
        dropped without a callback, and other frontends' waiters are woken."""
        with self._mutex:
            self._waiters = [w for w in self._waiters if w.lock.owner[0] != session]
            for key in list(self._posix):
                self._posix[key] = [lk for lk in self._posix[key] if lk.owner[0] != session]
            for key in list(self._flock):
                held = self._flock[key]
                for owner in [o for o in held if o[0] == session]:
                    del held[owner]
            for key in list(set(self._posix) | set(self._flock)):
                self._wake(key)

    # -- internals (mutex held) ---------------------------------------------------------
    def _conflicting(self, key: FileKey, want: Lock, flock: bool) -> list[Lock]:
        held = self._flock.get(key, {}).values() if flock else self._posix.get(key, [])
        return [lk for lk in held if _conflicts(lk, want)]

    def _drop_flock(self, key: FileKey, owner: Owner, keep_type: int) -> None:
        held = self._flock.get(key, {})
        if owner in held and held[owner].type != keep_type:
            del held[owner]

    def _apply(self, key: FileKey, want: Lock, flock: bool) -> None:
        if flock:
            held = self._flock.setdefault(key, {})
            if want.type == F_UNLCK:
                held.pop(want.owner, None)
            else:
                held[want.owner] = want
            if not held:
                del self._flock[key]
            return
        locks = self._posix.get(key, [])
        others = [lk for lk in locks if lk.owner != want.owner]
        mine: list[Lock] = []
        for lk in (lk for lk in locks if lk.owner == want.owner):
            if not _overlaps(lk, want.start, want.end):
                mine.append(lk)
                continue
            # keep the parts of an overlapped lock outside the new range
            if lk.start < want.start:
                mine.append(Lock(lk.owner, lk.start, want.start - 1, lk.type, lk.pid))
            if lk.end > want.end:
                mine.append(Lock(lk.owner, want.end + 1, lk.end, lk.type, lk.pid))
        if want.type != F_UNLCK:
            merged = want
            rest = []
            for lk in mine:
                touching = lk.end + 1 >= merged.start and merged.end + 1 >= lk.start
                if lk.type == merged.type and touching:
                    merged = Lock(
                        merged.owner,
                        min(lk.start, merged.start),
                        max(lk.end, merged.end),
                        merged.type,
                        merged.pid,
                    )
                else:
                    rest.append(lk)
            mine = [*rest, merged]
        result = others + mine
        if result:
            self._posix[key] = result
        else:
            self._posix.pop(key, None)

    def _wake(self, key: FileKey) -> None:
        progress = True
        while progress:
            progress = False
            for w in list(self._waiters):
                if w.key == key and not self._conflicting(key, w.lock, w.flock):
                    self._waiters.remove(w)
                    self._apply(key, w.lock, w.flock)
                    w.on_done(0)
                    progress = True

    def _would_deadlock(self, owner: Owner, blockers: set[Owner]) -> bool:
        """Does a chain of waiting POSIX owners lead from `blockers` back to `owner`?"""
        seen: set[Owner] = set()
        stack = list(blockers)
        while stack:
            current = stack.pop()
            if current == owner:
                return True
            if current in seen:
                continue
            seen.add(current)
            for w in self._waiters:
                if w.lock.owner == current and not w.flock:
                    stack.extend(lk.owner for lk in self._conflicting(w.key, w.lock, False))
        return False


def _check(lock: Lock) -> None:
    if lock.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
        raise ValueError(f"lock type {lock.type}")
    if not 0 <= lock.start <= lock.end <= OFFSET_MAX:
        raise ValueError(f"lock range {lock.start}..{lock.end}")
