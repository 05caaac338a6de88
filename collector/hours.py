"""Machine hours from intervals: run, effective, and what is not known.

Effective (有效机时) = RUNNING plus STANDBY directly before a run (up to the prep
allowance) and directly after it (up to the post allowance). "Directly" means
contiguous: OFF, UNKNOWN or a gap in between breaks the link.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

UNVERIFIED = "UNVERIFIED"


@dataclass
class Hours:
    period_ms: int = 0
    run_ms: int = 0
    standby_ms: int = 0
    off_ms: int = 0
    unknown_ms: int = 0
    unverified_ms: int = 0
    effective_ms: int = 0
    uncovered_ms: int = 0
    instruments: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def known_ms(self) -> int:
        return self.run_ms + self.standby_ms + self.off_ms

    @property
    def coverage(self) -> float:
        return self.known_ms / self.period_ms if self.period_ms else 0.0

    def add(self, other: Hours) -> None:
        for name in (
            "period_ms",
            "run_ms",
            "standby_ms",
            "off_ms",
            "unknown_ms",
            "unverified_ms",
            "effective_ms",
            "uncovered_ms",
            "instruments",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    kind: str


def merge(rows: Iterable[tuple[int, int, str, bool]]) -> list[Segment]:
    """Sorted (start, end, state, linked) rows to merged segments; unlinked rows count as UNVERIFIED."""
    out: list[Segment] = []
    for start, end, state, linked in sorted(rows):
        kind = state if linked else UNVERIFIED
        if out and out[-1].end > start:
            start = out[-1].end  # overlap (e.g. two agents on one instrument): count the time once
            if start >= end:
                continue
        if out and out[-1].end == start and out[-1].kind == kind:
            out[-1] = Segment(out[-1].start, end, kind)
        else:
            out.append(Segment(start, end, kind))
    return out


def _clip(start: int, end: int, a: int, b: int) -> int:
    return max(0, min(end, b) - max(start, a))


def compute(rows: Iterable[tuple[int, int, str, bool]], a: int, b: int, prep_ms: int, post_ms: int) -> Hours:
    """Hours in [a, b). ``rows`` should reach past both ends by the allowances, so edges are judged right."""
    segs = merge(rows)
    h = Hours(period_ms=b - a, instruments=1)
    covered = 0
    for i, s in enumerate(segs):
        n = _clip(s.start, s.end, a, b)
        covered += n
        if s.kind == "RUNNING":
            h.run_ms += n
        elif s.kind == "STANDBY":
            h.standby_ms += n
            before = i > 0 and segs[i - 1].end == s.start and segs[i - 1].kind == "RUNNING"
            after = i + 1 < len(segs) and segs[i + 1].start == s.end and segs[i + 1].kind == "RUNNING"
            post_end = min(s.end, s.start + post_ms) if before else s.start
            prep_start = max(s.start, s.end - prep_ms) if after else s.end
            if prep_start <= post_end:
                h.effective_ms += _clip(s.start, s.end, a, b) if (before or after) else 0
            else:
                h.effective_ms += _clip(s.start, post_end, a, b) + _clip(prep_start, s.end, a, b)
        elif s.kind == "OFF":
            h.off_ms += n
        elif s.kind == "UNKNOWN":
            h.unknown_ms += n
        else:
            h.unverified_ms += n
    h.effective_ms += h.run_ms
    h.uncovered_ms = max(0, h.period_ms - covered)
    return h
