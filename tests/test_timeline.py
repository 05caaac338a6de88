"""Intervals close on every state change and at every bucket boundary, contiguously."""

from __future__ import annotations

import itertools

from labmeter.agent.timeline import Span, Timeline, split
from labmeter.wire import State

H = 3_600_000


def test_change_closes_interval() -> None:
    t = Timeline(H, 1000, State.OFF)
    assert t.advance(5000, State.OFF) == []
    assert t.advance(6000, State.RUNNING) == [Span(1000, 6000, State.OFF)]
    assert (t.start, t.state) == (6000, State.RUNNING)


def test_bucket_boundaries_split_long_states() -> None:
    t = Timeline(H, H - 500, State.RUNNING)
    spans = t.advance(3 * H + 10, State.RUNNING)
    assert spans == [
        Span(H - 500, H, State.RUNNING),
        Span(H, 2 * H, State.RUNNING),
        Span(2 * H, 3 * H, State.RUNNING),
    ]
    assert t.start == 3 * H


def test_backdated_change_is_clamped_to_the_open_interval() -> None:
    t = Timeline(H, H - 100_000, State.RUNNING)
    # the change began before the boundary, but the interval up to the boundary is already closed
    spans = t.advance(H + 20_000, State.STANDBY, change_ms=H - 10_000)
    assert spans == [Span(H - 100_000, H - 10_000, State.RUNNING), Span(H - 10_000, H, State.STANDBY)]
    t2 = Timeline(H, H, State.RUNNING)
    assert t2.advance(H + 50_000, State.OFF, change_ms=H - 5_000) == []
    assert t2.start == H


def test_spans_are_contiguous() -> None:
    t = Timeline(60_000, 0, State.UNKNOWN)
    spans: list[Span] = []
    states = [State.OFF, State.STANDBY, State.RUNNING, State.RUNNING, State.OFF]
    for i in range(1, 400):
        spans += t.advance(i * 997, states[(i // 37) % len(states)])
    spans += t.close(400 * 997)
    assert spans[0].start == 0 and spans[-1].end == 400 * 997
    assert all(a.end == b.start for a, b in itertools.pairwise(spans))
    assert all(s.end - s.start <= 60_000 for s in spans)


def test_split_marks_down_time() -> None:
    spans = split(H - 10, H + 10, State.UNKNOWN, H, note="agent_down")
    assert spans == [
        Span(H - 10, H, State.UNKNOWN, "agent_down"),
        Span(H, H + 10, State.UNKNOWN, "agent_down"),
    ]


def test_a_clock_step_is_kept_by_whatever_closes_the_next_interval() -> None:
    """A step is recorded on the interval that opens at the new time: by a change, the next step or a shutdown."""
    t = Timeline(H, 1000, State.RUNNING)
    assert t.step(5000, 65_000) == [Span(1000, 5000, State.RUNNING)]  # +60 s
    # the next step comes before the interval after the first one closed: that interval keeps its step
    assert t.step(70_000, 40_000) == [Span(65_000, 70_000, State.RUNNING, clock_step_ms=60_000)]  # -30 s
    assert t.close(50_000) == [Span(40_000, 50_000, State.RUNNING, clock_step_ms=-30_000)]  # shutdown


def test_two_steps_with_nothing_between_add_up() -> None:
    t = Timeline(H, 1000, State.OFF)
    assert t.step(2000, 12_000) == [Span(1000, 2000, State.OFF)]
    assert t.step(12_000, 7000) == []  # no time passed on the new clock: the first jump is not recorded yet
    assert t.advance(9000, State.RUNNING) == [Span(7000, 9000, State.OFF, clock_step_ms=5000)]
    assert t.advance(9500, State.OFF) == [Span(9000, 9500, State.RUNNING)]


def test_intervals_around_a_step_link_up() -> None:
    """Each span's start is its predecessor's end plus its step: how the collector links a chain."""
    t = Timeline(H, H - 2000, State.RUNNING)
    spans = t.step(H - 1000, H + 5000) + t.advance(H + 9000, State.OFF) + t.step(H + 9500, H + 500)
    spans += t.close(H + 3000)
    for a, b in itertools.pairwise(spans):
        assert a.end + b.clock_step_ms == b.start, (a, b)
    assert sum(s.end - s.start for s in spans) == 1000 + 4000 + 500 + 2500
