"""Machine hours from intervals: run, effective, and what is not known.

Effective (有效机时) = RUNNING plus STANDBY directly before a run (up to the prep
allowance) and directly after it (up to the post allowance). "Directly" means
contiguous: OFF, UNKNOWN or a gap in between breaks the link.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

HOUR_MS = 3_600_000
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
    "not_metered_ms",
    "instruments",
    "energy_mwh",
    "energy_ms",
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
    not_metered_ms: int = 0
    """Elapsed time of the period before metering began (reports: 未计量), outside ``period_ms``."""
    instruments: int = 0
    energy_mwh: int = 0
    """Energy of the intervals in the period (labmeter.energy); ``energy_ms``: the time they cover."""
    energy_ms: int = 0

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
    """Sorted (start, end, state, linked) rows to merged segments; unlinked rows count as UNVERIFIED.

    Of two copies of one interval, the linked one counts: an agent that began a new chain after
    a conflict sends its pending intervals again, and a copy sent before may be stored in the old
    chain above the ledger's head, where it does not link.
    """
    out: list[Segment] = []
    for start, end, state, linked in sorted(rows, key=lambda r: (r[0], r[1], r[2], not r[3])):
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
    return compute_buckets(rows, [a, b], prep_ms, post_ms, windows)[0]


def compute_buckets(
    rows: Iterable[tuple[int, int, str, bool]],
    bounds: Sequence[int],
    prep_ms: int,
    post_ms: int,
    windows: Sequence[tuple[int, int, bool]] = (),
) -> list[Hours]:
    """Hours for each of the consecutive buckets ``[bounds[i], bounds[i+1])``, judged once for all of them.

    Judging the whole stretch once and splitting afterwards is what makes rollups add up:
    the buckets' hours sum to exactly what :func:`compute` gives for their union.
    """
    segs = merge(rows)
    out = [Hours(period_ms=hi - lo, instruments=1) for lo, hi in pairwise(bounds)]
    covered = [0] * len(out)
    by_kind: dict[str, list[tuple[int, int]]] = {}
    for s in segs:
        by_kind.setdefault(s.kind, []).append((s.start, s.end))
    for kind, name in KIND_FIELDS.items():
        if kind in by_kind:
            for i, n in enumerate(spread(by_kind[kind], bounds)):
                if n:
                    setattr(out[i], name, getattr(out[i], name) + n)
                    covered[i] += n
    effective = _effective(segs, prep_ms, post_ms)
    for i, n in enumerate(spread(effective, bounds)):
        out[i].effective_ms = n
    for i, h in enumerate(out):
        h.uncovered_ms = max(0, h.period_ms - covered[i])
    if windows:
        service = intersect(effective, union([(s, e) for s, e, _ in windows]))
        external = intersect(effective, union([(s, e) for s, e, ext in windows if ext]))
        for i, n in enumerate(spread(service, bounds)):
            out[i].service_ms = n
        for i, n in enumerate(spread(external, bounds)):
            out[i].external_ms = n
    return out


KIND_FIELDS = {
    "RUNNING": "run_ms",
    "STANDBY": "standby_ms",
    "OFF": "off_ms",
    "UNKNOWN": "unknown_ms",
    UNVERIFIED: "unverified_ms",
}


def _effective(segs: list[Segment], prep_ms: int, post_ms: int) -> list[tuple[int, int]]:
    """Sorted effective ranges: runs, and the standby that directly precedes or follows them."""
    out: list[tuple[int, int]] = []
    for i, s in enumerate(segs):
        if s.kind == "RUNNING":
            out.append((s.start, s.end))
        elif s.kind == "STANDBY":
            before = i > 0 and segs[i - 1].end == s.start and segs[i - 1].kind == "RUNNING"
            after = i + 1 < len(segs) and segs[i + 1].start == s.end and segs[i + 1].kind == "RUNNING"
            post_end = min(s.end, s.start + post_ms) if before else s.start
            prep_start = max(s.start, s.end - prep_ms) if after else s.end
            if prep_start <= post_end:
                if before or after:
                    out.append((s.start, s.end))
            else:
                out += [(s.start, post_end), (prep_start, s.end)]
    return [(x, y) for x, y in out if y > x]


def spread(ranges: Iterable[tuple[int, int]], bounds: Sequence[int]) -> list[int]:
    """How much of the (sorted) ranges falls in each bucket between consecutive bounds."""
    out = [0] * (len(bounds) - 1)
    if not out:
        return out
    lo, hi = bounds[0], bounds[-1]
    for s, e in ranges:
        s, e = max(s, lo), min(e, hi)
        if e <= s:
            continue
        i = bisect_right(bounds, s) - 1
        while i < len(out) and bounds[i] < e:
            out[i] += min(e, bounds[i + 1]) - max(s, bounds[i])
            i += 1
    return out


def uncovered(rows: Iterable[tuple[int, int, str, bool]], a: int, b: int) -> list[tuple[int, int]]:
    """The spans of [a, b) no interval covers: what ``uncovered_ms`` adds up, where it lies."""
    out: list[tuple[int, int]] = []
    at = a
    for s in merge(rows):
        if s.end <= at:
            continue
        if s.start >= b:
            break
        if s.start > at:
            out.append((at, s.start))
        at = max(at, s.end)
    if at < b:
        out.append((at, b))
    return out


def union(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ranges covering the same time (overlapping bookings count once)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def intersect(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The time in both of two lists of sorted, non-overlapping ranges."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if hi > lo:
            out.append((lo, hi))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out
