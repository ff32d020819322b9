"""``-o request_timeout``: when has a request queue stopped making progress?

The control thread samples each pump's counters now and then (relay.py,
``PROGRESS_EVERY``). A queue is stalled while it has requests in flight and nothing
completes; the clock starts at the first sample that sees requests in flight after
one that saw none (or after a completion). Requests that went out between two
samples are timed from the later one, so a stall is reported between N and N plus
one sampling interval after it began, never before N.
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
