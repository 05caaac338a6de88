"""Machine hours from intervals: run, effective, and what is not known.

Effective (有效机时) = RUNNING plus STANDBY directly before a run (up to the prep
allowance) and directly after it (up to the post allowance). "Directly" means
contiguous: OFF, UNKNOWN or a gap in between breaks the link.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

UNVERIFIED = "UNVERIFIED"
FIELDS = (
    "period_ms",
    "run_ms",
    "standby_ms",
    "off_ms",
    "unknown_ms",
    "unverified_ms",
    "effective_ms",
    "uncovered_ms",
    "service_ms",
    "external_ms",
    "rated_ms",
    "instruments",
)


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
    service_ms: int = 0
    external_ms: int = 0
    rated_ms: int = 0
    instruments: int = 0

    @property
    def known_ms(self) -> int:
        return self.run_ms + self.standby_ms + self.off_ms

    @property
    def coverage(self) -> float:
        return self.known_ms / self.period_ms if self.period_ms else 0.0

    def totals(self) -> dict[str, int]:
        """The state totals an evidence bundle claims and ``labmeter verify`` recomputes."""
        return {
            k: getattr(self, k)
            for k in (
                "run_ms",
                "effective_ms",
                "standby_ms",
                "off_ms",
                "unknown_ms",
                "unverified_ms",
                "uncovered_ms",
            )
        }

    def add(self, other: Hours) -> None:
        for name in FIELDS:
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


def compute(
    rows: Iterable[tuple[int, int, str, bool]],
    a: int,
    b: int,
    prep_ms: int,
    post_ms: int,
    windows: Sequence[tuple[int, int, bool]] = (),
) -> Hours:
    """Hours in [a, b). ``rows`` should reach past both ends by the allowances, so edges are judged right.

    ``windows`` are service records (start, end, external): service time is effective
    time inside any of them, external service time effective time inside an external one.
    """
    segs = merge(rows)
    h = Hours(period_ms=b - a, instruments=1)
    covered = 0
    effective: list[tuple[int, int]] = []
    for i, s in enumerate(segs):
        n = _clip(s.start, s.end, a, b)
        covered += n
        if s.kind == "RUNNING":
            h.run_ms += n
            effective.append((s.start, s.end))
        elif s.kind == "STANDBY":
            h.standby_ms += n
            before = i > 0 and segs[i - 1].end == s.start and segs[i - 1].kind == "RUNNING"
            after = i + 1 < len(segs) and segs[i + 1].start == s.end and segs[i + 1].kind == "RUNNING"
            post_end = min(s.end, s.start + post_ms) if before else s.start
            prep_start = max(s.start, s.end - prep_ms) if after else s.end
            if prep_start <= post_end:
                if before or after:
                    effective.append((s.start, s.end))
            else:
                effective += [(s.start, post_end), (prep_start, s.end)]
        elif s.kind == "OFF":
            h.off_ms += n
        elif s.kind == "UNKNOWN":
            h.unknown_ms += n
        else:
            h.unverified_ms += n
    effective = [(max(x, a), min(y, b)) for x, y in effective if min(y, b) > max(x, a)]
    h.effective_ms = sum(y - x for x, y in effective)
    h.uncovered_ms = max(0, h.period_ms - covered)
    if windows:
        h.service_ms = overlap(effective, union([(s, e) for s, e, _ in windows]))
        h.external_ms = overlap(effective, union([(s, e) for s, e, ext in windows if ext]))
    return h


def union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ranges covering the same time (overlapping bookings count once)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def overlap(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> int:
    """Total time in both of two lists of sorted, non-overlapping ranges."""
    total, i, j = 0, 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if hi > lo:
            total += hi - lo
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total
