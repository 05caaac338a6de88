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
