"""Contiguous intervals ``[start, end)``, closed on every state change and every bucket boundary."""

from __future__ import annotations

from dataclasses import dataclass

from labmeter.wire import State


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    state: State
    note: str | None = None


class Timeline:
    """The open interval of one instrument; ``advance`` returns the spans it closes.

    Closing at UTC-aligned bucket boundaries keeps every interval short, so a crash
    or an outage never leaves hours hanging in an open interval.
    """

    def __init__(self, bucket_ms: int, start_ms: int, state: State = State.UNKNOWN) -> None:
        self.bucket_ms = bucket_ms
        self.start = start_ms
        self.state = state

    def advance(self, now_ms: int, state: State, change_ms: int | None = None) -> list[Span]:
        if state is self.state:
            return self._split_to(now_ms)
        at = min(max(change_ms if change_ms is not None else now_ms, self.start), now_ms)
        out = self._split_to(at)
        if at > self.start:
            out.append(Span(self.start, at, self.state))
        self.start = max(self.start, at)
        self.state = state
        out.extend(self._split_to(now_ms))
        return out

    def close(self, at_ms: int) -> list[Span]:
        """Close the open interval at ``at_ms`` (shutdown or clock step); the state carries on from there."""
        out = self._split_to(at_ms)
        if at_ms > self.start:
            out.append(Span(self.start, at_ms, self.state))
            self.start = at_ms
        return out

    def _split_to(self, t: int) -> list[Span]:
        out: list[Span] = []
        while True:
            boundary = (self.start // self.bucket_ms + 1) * self.bucket_ms
            if boundary > t:
                return out
            out.append(Span(self.start, boundary, self.state))
            self.start = boundary


def split(start: int, end: int, state: State, bucket_ms: int, note: str | None = None) -> list[Span]:
    """A closed stretch cut at bucket boundaries (used for recovered and down time)."""
    if end <= start:
        return []
    return [Span(s.start, s.end, s.state, note) for s in Timeline(bucket_ms, start, state).close(end)]
