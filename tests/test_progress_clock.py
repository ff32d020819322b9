"""The request_timeout clock (vfsdrv.frontends.progress): a stall is timed from the
first sample that saw it, never from an earlier idle sample."""

from __future__ import annotations

from vfsdrv.frontends.progress import LeftBehindClock, ProgressClock


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


def test_a_request_overtaken_by_later_ones_is_timed_from_the_first_sample_that_saw_it() -> None:
    c = LeftBehindClock()
    assert c.left_behind_for(1, oldest=None, done_seq=0, now=0.0) == 0.0
    assert c.left_behind_for(1, oldest=7, done_seq=6, now=1.0) == 0.0  # first seen
    assert c.left_behind_for(1, oldest=7, done_seq=6, now=2.0) == 0.0  # nothing later done
    assert c.left_behind_for(1, oldest=7, done_seq=9, now=3.5) == 2.5  # overtaken
    assert c.left_behind_for(1, oldest=8, done_seq=9, now=4.0) == 0.0  # 7 answered: anew
    assert c.left_behind_for(1, oldest=8, done_seq=9, now=5.0) == 1.0
    assert c.left_behind_for(1, oldest=None, done_seq=9, now=6.0) == 0.0  # none in flight
    assert c.left_behind_for(1, oldest=8, done_seq=9, now=7.0) == 0.0  # seen anew


def test_left_behind_queues_are_timed_apart() -> None:
    c = LeftBehindClock()
    c.left_behind_for(1, oldest=3, done_seq=5, now=0.0)
    c.left_behind_for(2, oldest=3, done_seq=5, now=1.0)
    assert c.left_behind_for(1, oldest=3, done_seq=5, now=2.0) == 2.0
    assert c.left_behind_for(2, oldest=3, done_seq=5, now=2.0) == 1.0


def test_the_deadline_names_a_stall_or_a_request_left_behind_and_spares_a_held_queue(
        ) -> None:
    from vfsdrv.frontends.progress import RequestDeadline

    d = RequestDeadline(2.0)
    seen = {"done": 0, "in_flight": 1, "oldest": 7, "done_seq": 6}
    assert d.judge(2, holding=False, now=0.0, where="request queue 2", **seen) is None
    assert d.judge(2, holding=False, now=2.5, where="request queue 2", **seen) == (
        "request queue 2 has 1 request(s) in flight and nothing completed for 2.5 s")
    # an FSYNC ahead on the queue: a device serving in order answers nothing meanwhile
    held = RequestDeadline(2.0)
    assert held.judge(0, holding=True, now=0.0, **seen) is None
    assert held.judge(0, holding=True, now=9.0, **seen) is None
    # request 7 stays the oldest while 8 and 9 are answered
    behind = RequestDeadline(2.0)
    for t, done in ((0.0, 0), (1.0, 1), (2.5, 2)):
        why = behind.judge(0, done=done, in_flight=1, holding=False, oldest=7, done_seq=9,
                           now=t)
    assert why == "a request has waited 2.5 s while the device answered later ones"
