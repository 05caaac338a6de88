"""Contiguous intervals ``[start, end)``, closed on every state change and every bucket boundary."""

from __future__ import annotations

from dataclasses import dataclass

from labmeter.wire import State


@dataclass(frozen=True)
class Span:
    """``clock_step_ms``: how far this span's start lies from its predecessor's end (a wall-clock step);
    ``energy_wh``: the energy measured in it (agent.power.IntervalEnergy), None where none was."""

    start: int
    end: int
    state: State
    note: str | None = None
    clock_step_ms: int = 0
    energy_wh: float | None = None


class Timeline:
    """The open interval of one instrument; ``advance`` returns the spans it closes.

    Closing at UTC-aligned bucket boundaries keeps every interval short, so a crash
    or an outage never leaves hours hanging in an open interval. A wall-clock step
    belongs to the open interval (``clock_step_ms``) until it is closed, by whatever
    closes it: a state change, a bucket boundary, the next step or a shutdown.
    """

    def __init__(
        self, bucket_ms: int, start_ms: int, state: State = State.UNKNOWN, clock_step_ms: int = 0
    ) -> None:
        self.bucket_ms = bucket_ms
        self.start = start_ms
        self.state = state
        self.clock_step_ms = clock_step_ms

    def advance(self, now_ms: int, state: State, change_ms: int | None = None) -> list[Span]:
        if state is self.state:
            return self._split_to(now_ms)
        at = min(max(change_ms if change_ms is not None else now_ms, self.start), now_ms)
        out = self._split_to(at)
        if at > self.start:
            out.append(self._span(at))
        self.start = max(self.start, at)
        self.state = state
        out.extend(self._split_to(now_ms))
        return out

    def close(self, at_ms: int) -> list[Span]:
        """Close the open interval at ``at_ms`` (shutdown or clock step); the state carries on from there."""
        out = self._split_to(at_ms)
        if at_ms > self.start:
            out.append(self._span(at_ms))
        return out

    def step(self, expected_ms: int, wall_ms: int) -> list[Span]:
        """The wall clock jumped from ``expected_ms`` to ``wall_ms``: close at the old time, go on at the new.

        The jump is kept on the interval that opens at ``wall_ms``; when nothing was closed
        (two steps in a row) the earlier, still unrecorded jump is added to it.
        """
        before = self.start - self.clock_step_ms  # where the last closed span ended
        out = self.close(expected_ms)
        end = out[-1].end if out else before
        self.start = wall_ms
        self.clock_step_ms = wall_ms - end
        return out

    def _span(self, end: int) -> Span:
        span = Span(self.start, end, self.state, clock_step_ms=self.clock_step_ms)
        self.start = end
        self.clock_step_ms = 0
        return span

    def _split_to(self, t: int) -> list[Span]:
        out: list[Span] = []
        while True:
            boundary = (self.start // self.bucket_ms + 1) * self.bucket_ms
            if boundary > t:
                return out
            out.append(self._span(boundary))


def split(start: int, end: int, state: State, bucket_ms: int, note: str | None = None) -> list[Span]:
    """A closed stretch cut at bucket boundaries (used for recovered and down time)."""
    if end <= start:
        return []
    return [Span(s.start, s.end, s.state, note) for s in Timeline(bucket_ms, start, state).close(end)]
