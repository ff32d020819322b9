"""The notification queue (virtio 1.2 5.11.6.3) and the blocking-lock waits it ends.

The device writes notifications into buffers the driver keeps posted: at least
`notify_buf_size` bytes each, available before DRIVER_OK and replenished as soon as
one is used. A blocking lock (FUSE_SETLKW) is answered at once with the "wait"
value +1 and completed later by FUSE_NOTIFY_LOCK {unique, error}; the two travel
on different queues, so the notification may come first (it is then kept until
the "wait" reply arrives). Other notifications go to the frontend (`dispatch`).
"""

from __future__ import annotations

import collections
import errno
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .._native import lib
from ..errors import ProtocolError
from ..virtio.memory import DmaBuffer, DmaPool
from ..virtio.virtqueue import Virtqueue
from . import abi
from .abi import OUT_HEADER_SIZE
from .config import check_notify_buf_size
from .slots import OnDone, synthetic

log = logging.getLogger(__name__)

OUT_HEADER = struct.Struct("<IiQ")
LOCK_NOTIFY = struct.Struct("<Qii")
#: notify codes counted one by one in the statistics (others share one counter,
#: so a device cannot grow the table without bound)
COUNTED_NOTIFY_CODES = frozenset(range(1, 10))
#: SETLKW uniques remembered at most in each of LockWaits' bounded tables (early
#: notifications, given-up waits): a device can make either grow
UNIQUES_KEPT = 1024
#: malformed notifications logged one by one before only a count is
BAD_NOTIFICATIONS_LOGGED = 20

#: (code, whole message including the header) -> None
OnNotify = Callable[[int, memoryview], None]


@dataclass
class _Waiter:
    opcode: int
    on_done: OnDone | None


def _remember(table: collections.OrderedDict, unique: int, value: object) -> None:
    """Into a bounded table, newest last: the oldest goes past UNIQUES_KEPT."""
    table[unique] = value
    while len(table) > UNIQUES_KEPT:
        table.popitem(last=False)


class LockWaits:
    """SETLKW requests the device answered "wait", by unique."""

    def __init__(self, stats: collections.Counter) -> None:
        self.stats = stats
        self._waiters: dict[int, _Waiter] = {}
        #: unique -> error: a notification before its "wait" reply, newest last, bounded
        #: (a device that notifies a SETLKW it then answers finally leaves one behind)
        self._early: collections.OrderedDict[int, int] = collections.OrderedDict()
        #: waiters answered without the device (abandon()), newest last, bounded
        self._abandoned: collections.OrderedDict[int, None] = collections.OrderedDict()

    def park(self, unique: int, opcode: int, on_done: OnDone | None) -> None:
        """`on_done` gets the final reply when its FUSE_NOTIFY_LOCK arrives (or at
        once, if it already has)."""
        early = self._early.pop(unique, None)
        if early is not None:
            self.stats["lock_notify_before_reply"] += 1
            if on_done is not None:
                on_done(synthetic(unique, opcode, early))
            return
        self._waiters[unique] = _Waiter(opcode, on_done)
        self.stats["lock_waits"] += 1

    def notified(self, unique: int, error: int, still_coming: Callable[[int], bool]) -> None:
        """FUSE_NOTIFY_LOCK {unique, error}. `still_coming(unique)`: that SETLKW's
        "wait" reply is still on its way (the notification overtook it)."""
        if not lib.vfsdrv_valid_errno(error):
            # the waiter still gets an answer the kernel accepts, or it never wakes
            self.stats["bad_notification"] += 1
            log.warning("FUSE_NOTIFY_LOCK for %d with error %d: answering EIO", unique, error)
            error = -errno.EIO
        self.stats["lock_notifications"] += 1
        waiter = self._waiters.pop(unique, None)
        if waiter is None and unique in self._abandoned:
            del self._abandoned[unique]
            self.stats["lock_notify_after_abandon"] += 1
            if error == 0:
                log.warning("the device granted the lock of SETLKW %d after it was given up "
                            "(its INTERRUPT went unanswered): the owner holds it on the "
                            "device until it unlocks or closes the file", unique)
            return
        if waiter is None and still_coming(unique):
            # still_coming may have parked it meanwhile (the relay takes in the pumps'
            # events first); if not, its "wait" reply is still on the way
            waiter = self._waiters.pop(unique, None)
            if waiter is None:
                _remember(self._early, unique, error)
                return
        if waiter is None:
            raise ProtocolError(f"FUSE_NOTIFY_LOCK for unique {unique}, which is not waiting")
        if waiter.on_done is not None:
            waiter.on_done(synthetic(unique, waiter.opcode, error))

    def abandon(self, unique: int, error: int) -> bool:
        """Answer a parked SETLKW with `error` without the device (which did not answer
        its INTERRUPT); a FUSE_NOTIFY_LOCK for it later is dropped. False: not parked."""
        waiter = self._waiters.pop(unique, None)
        if waiter is None:
            return False
        self.stats["lock_waits_abandoned"] += 1
        _remember(self._abandoned, unique, None)
        if waiter.on_done is not None:
            waiter.on_done(synthetic(unique, waiter.opcode, error))
        return True

    def __contains__(self, unique: int) -> bool:
        return unique in self._waiters

    def __len__(self) -> int:
        return len(self._waiters)

    def fail_all(self, error: int) -> None:
        waiters, self._waiters = self._waiters, {}
        for unique, waiter in waiters.items():
            if waiter.on_done is not None:
                waiter.on_done(synthetic(unique, waiter.opcode, error))


class NotificationQueue:
    """The driver's side of the notification queue: buffers posted, used ones read,
    validated and dispatched, then posted again at once."""

    def __init__(
        self, vq: Virtqueue, buf_size: int, count: int, *, locks: LockWaits,
        lock_code: int, still_coming: Callable[[int], bool],
        dispatch: Callable[[], OnNotify | None], stats: collections.Counter,
    ) -> None:
        check_notify_buf_size(buf_size)
        self.vq = vq
        self.buf_size = buf_size
        self.count = min(count, vq.size)
        self.locks = locks
        self.lock_code = lock_code
        self.still_coming = still_coming
        self.dispatch = dispatch
        self.stats = stats
        self.buffers: list[DmaBuffer] = []

    def post_all(self, pool: DmaPool) -> None:
        """Every buffer made available (before DRIVER_OK: no kick yet)."""
        for _ in range(self.count):
            buf = pool.alloc((self.buf_size + 63) & ~63, 64)
            self.buffers.append(buf)
            self._post(buf)
        self.vq.publish()

    def _post(self, buf: DmaBuffer) -> None:
        self.vq.add([], buf.segments(0, self.buf_size), buf)

    def process(self, poll: bool) -> int:
        """Handle every used buffer and post it again. Returns how many; the caller
        publishes and kicks."""
        vq = self.vq
        n = 0
        while True:
            for buf, length in vq.get_used():
                n += 1
                try:
                    self.handle(buf, length)
                except ProtocolError as exc:
                    self.stats["bad_notification"] += 1
                    # a device may send them by the thousand: the first few, then a count
                    bad = self.stats["bad_notification"]
                    if bad <= BAD_NOTIFICATIONS_LOGGED or bad % 10_000 == 0:
                        log.warning("ignoring a malformed notification: %s%s", exc,
                                    "" if bad < BAD_NOTIFICATIONS_LOGGED else
                                    f" ({bad} so far; the next are counted, logged "
                                    "every 10000th)")
                self._post(buf)  # replenish at once
            if poll or not vq.enable_interrupts():
                return n

    def handle(self, buf: DmaBuffer, length: int) -> None:
        if length < OUT_HEADER_SIZE:
            raise ProtocolError(f"notification of {length} bytes")
        out_len, code, unique = OUT_HEADER.unpack_from(buf.view, 0)
        if not OUT_HEADER_SIZE <= out_len <= length:
            raise ProtocolError(f"notification header len {out_len}, used length {length}")
        if unique != 0:
            # FUSE marks notifications with unique 0; some devices do not. Dispatch anyway.
            log.debug("notification code %d with non-zero unique %d", code, unique)
        payload_len = out_len - OUT_HEADER_SIZE
        if code == self.lock_code and payload_len == LOCK_NOTIFY.size:
            lock_unique, error, _pad = LOCK_NOTIFY.unpack_from(buf.view, OUT_HEADER_SIZE)
            self.locks.notified(lock_unique, error, self.still_coming)
            return
        if code == abi.NotifyCode.RESEND_OR_LOCK and payload_len == 0:
            self.stats["notify_resend"] += 1
            log.warning("device asked for FUSE_NOTIFY_RESEND, which this driver does not do")
            return
        if code == self.lock_code:
            # neither a lock answer nor (code 7) a RESEND: malformed, not passed on
            raise ProtocolError(f"FUSE_NOTIFY_LOCK (code {code}) with {payload_len} bytes "
                                f"of payload, not {LOCK_NOTIFY.size}")
        problem = abi.notify_problem(code, buf.view[OUT_HEADER_SIZE:out_len])
        if problem is not None:
            raise ProtocolError(f"notification code {code}: {problem}")
        self.stats[f"notify_{code}" if code in COUNTED_NOTIFY_CODES else "notify_other"] += 1
        on_notify = self.dispatch()
        if on_notify is not None:
            on_notify(code, buf.view[:out_len])
        else:
            log.debug("notification code %d (%d bytes) not handled", code, payload_len)
