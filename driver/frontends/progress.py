"""``-o request_timeout``: when has a request queue stopped making progress, or
left one request behind?

The control thread samples each pump's counters now and then (relay.py,
``PROGRESS_EVERY``). A queue is stalled while it has requests in flight and nothing
completes; the clock starts at the first sample that sees requests in flight after
one that saw none (or after a completion). Requests that went out between two
samples are timed from the later one, so a stall is reported between N and N plus
one sampling interval after it began, never before N.

A request is left behind when it stays the oldest in flight while the device
answers requests read after it (a lost request: a device that serves in order, only
slowly, never overtakes one). It is timed the same way, from the first sample that
saw it as the oldest.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Sample:
    done: int       # completions so far
    in_flight: int
    since: float    # when this queue was last seen making progress (or idle)


class ProgressClock:
    def __init__(self) -> None:
        self._last: dict[int, _Sample] = {}

    def stalled_for(self, queue: int, done: int, in_flight: int, now: float) -> float:
        """Record a sample of `queue`; how long it has had requests in flight with
        nothing completed (0.0 while it is idle or progressing)."""
        last = self._last.get(queue)
        if (last is None or in_flight == 0 or last.in_flight == 0 or done != last.done
                or in_flight < last.in_flight):
            # idle, the first requests since idle, or something completed: from now
            self._last[queue] = _Sample(done, in_flight, now)
            return 0.0
        last.in_flight = in_flight
        return now - last.since


class LeftBehindClock:
    def __init__(self) -> None:
        self._oldest: dict[int, tuple[int, float]] = {}  # queue -> (seq, first seen)

    def left_behind_for(self, queue: int, oldest: int | None, done_seq: int,
                        now: float) -> float:
        """Record a sample of `queue`: `oldest`, the seq of its oldest request in
        flight (None: none), and `done_seq`, the highest seq answered. How long that
        request has been the oldest, once a request read after it was answered (0.0
        before that)."""
        if oldest is None:
            self._oldest.pop(queue, None)
            return 0.0
        seen = self._oldest.get(queue)
        if seen is None or seen[0] != oldest:
            self._oldest[queue] = seen = (oldest, now)
        return now - seen[1] if done_seq > oldest else 0.0


class RequestDeadline:
    """-o request_timeout for one frontend, the one rule both use: per request
    queue, both clocks above and the verdict. `in_flight` counts the requests on the
    ring a sound device answers soon (SETLKW, FSYNC and FSYNCDIR aside: may_take_long
    in core.c), `queued` those waiting for a buffer it keeps; while one that may hold
    the queue is in flight (`holding`: an FSYNC a device serving in order finishes
    before the rest), nothing counts as a stall."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._stall = ProgressClock()
        self._left_behind = LeftBehindClock()

    def judge(self, queue: int, *, done: int, in_flight: int, queued: int = 0,
              holding: bool, oldest: int | None, done_seq: int, now: float,
              where: str = "") -> str | None:
        """Why the device is unresponsive on `queue` (`where` names it in the text),
        or None."""
        waiting = 0 if holding else in_flight + queued
        stalled = self._stall.stalled_for(queue, done, waiting, now)
        behind = self._left_behind.left_behind_for(queue, oldest, done_seq, now)
        if stalled >= self.timeout:
            return (f"{where + ' has ' if where else ''}{in_flight} request(s) in flight and "
                    f"nothing completed for {stalled:.1f} s")
        if behind >= self.timeout:
            return (f"{where + ': ' if where else ''}a request has waited {behind:.1f} s "
                    "while the device answered later ones")
        return None
