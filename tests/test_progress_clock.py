"""The request_timeout clock (vfsdrv.frontends.progress): a stall is timed from the
first sample that saw it, never from an earlier idle sample."""

from __future__ import annotations

from vfsdrv.frontends.progress import ProgressClock


def test_requests_that_start_after_an_idle_sample_are_timed_from_the_next_one() -> None:
    c = ProgressClock()
    assert c.stalled_for(1, done=5, in_flight=0, now=10.0) == 0.0  # idle
    # a request went out at 10.99; the sample at 11.0 starts its clock
    assert c.stalled_for(1, done=5, in_flight=1, now=11.0) == 0.0
    assert c.stalled_for(1, done=5, in_flight=1, now=12.0) == 1.0
    assert c.stalled_for(1, done=5, in_flight=1, now=13.5) == 2.5


def test_a_completion_restarts_the_clock_and_more_requests_do_not() -> None:
    c = ProgressClock()
    c.stalled_for(1, done=0, in_flight=2, now=0.0)
    assert c.stalled_for(1, done=0, in_flight=3, now=1.0) == 1.0  # one more, none done
    assert c.stalled_for(1, done=1, in_flight=3, now=2.0) == 0.0  # one done (one more in)
    assert c.stalled_for(1, done=1, in_flight=3, now=3.0) == 1.0
    assert c.stalled_for(1, done=1, in_flight=2, now=4.0) == 0.0  # fewer in flight


def test_queues_are_timed_apart() -> None:
    c = ProgressClock()
    c.stalled_for(1, done=0, in_flight=1, now=0.0)
    c.stalled_for(2, done=0, in_flight=0, now=0.0)
    assert c.stalled_for(2, done=0, in_flight=1, now=1.0) == 0.0
    assert c.stalled_for(1, done=0, in_flight=1, now=1.0) == 1.0
    assert c.stalled_for(2, done=0, in_flight=1, now=2.0) == 1.0
