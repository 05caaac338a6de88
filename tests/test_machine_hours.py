"""The hour rules agree with a one-millisecond-at-a-time model of them, on any rows.

labmeter/machine_hours.py merges, clips and splits ranges for speed; the model below judges every
time unit on its own, straight from the rules in its docstring: the first row (sorted) that covers a
unit owns it, unlinked rows count as UNVERIFIED, standby counts as effective within the allowances
next to a run it touches, service time is effective time inside a service window.
"""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

from hypothesis import example, given, settings
from hypothesis import strategies as st

from labmeter import machine_hours as mh

STATES = ("RUNNING", "STANDBY", "OFF", "UNKNOWN")
FIELD = {"RUNNING": "run_ms", "STANDBY": "standby_ms", "OFF": "off_ms", "UNKNOWN": "unknown_ms"}
FIELD[mh.UNVERIFIED] = "unverified_ms"
SPAN = 40  # rows are never empty: the ledger refuses an interval whose end is not after its start


def owners(rows: list[tuple[int, int, str, bool]]) -> list[str | None]:
    """The kind of each unit of [0, SPAN): the first sorted row covering it, linked copies first."""
    order = sorted(rows, key=lambda r: (r[0], r[1], r[2], not r[3]))
    out: list[str | None] = []
    for t in range(SPAN):
        row = next((r for r in order if r[0] <= t < r[1]), None)
        out.append(None if row is None else (row[2] if row[3] else mh.UNVERIFIED))
    return out


def effective_units(kinds: list[str | None], prep: int, post: int) -> set[int]:
    runs: list[tuple[int, int, str | None]] = []
    for t, k in enumerate(kinds):
        if runs and runs[-1][2] == k and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1, k)
        else:
            runs.append((t, t + 1, k))
    out: set[int] = set()
    for i, (s, e, k) in enumerate(runs):
        if k == "RUNNING":
            out.update(range(s, e))
        elif k == "STANDBY":
            before = i > 0 and runs[i - 1][2] == "RUNNING"
            after = i + 1 < len(runs) and runs[i + 1][2] == "RUNNING"
            out.update(t for t in range(s, e) if (before and t < s + post) or (after and t >= e - prep))
    return out


def in_any(t: int, windows: list[tuple[int, int, bool]], external_only: bool = False) -> bool:
    return any(s <= t < e and (ext or not external_only) for s, e, ext in windows)


row = st.tuples(st.integers(0, SPAN - 1), st.integers(1, 12), st.sampled_from(STATES), st.booleans()).map(
    lambda r: (r[0], min(SPAN, r[0] + r[1]), r[2], r[3])
)
window = st.tuples(st.integers(0, SPAN), st.integers(0, 15), st.booleans()).map(
    lambda w: (w[0], min(SPAN + 5, w[0] + w[1]), w[2])
)
cuts = st.lists(st.integers(1, SPAN - 1), max_size=4, unique=True).map(lambda c: [0, *sorted(c), SPAN])


@settings(max_examples=200, database=None, derandomize=True, deadline=None)
# a row wholly inside the one before it leaves no empty segment that would cut the standby off the run
@example(
    rows=[(0, 10, "RUNNING", True), (5, 10, "OFF", True), (10, 20, "STANDBY", True)],
    bounds=[0, SPAN],
    prep=0,
    post=6,
    windows=[],
)
# two contiguous standby rows are one stretch: the post-run allowance reaches into the second
@example(
    rows=[(0, 10, "RUNNING", True), (10, 15, "STANDBY", True), (15, 20, "STANDBY", True)],
    bounds=[0, SPAN],
    prep=0,
    post=8,
    windows=[],
)
@given(
    rows=st.lists(row, max_size=7),
    bounds=cuts,
    prep=st.integers(0, 6),
    post=st.integers(0, 6),
    windows=st.lists(window, max_size=3),
)
def test_bucket_hours_match_the_unit_by_unit_model(
    rows: list[tuple[int, int, str, bool]],
    bounds: list[int],
    prep: int,
    post: int,
    windows: list[tuple[int, int, bool]],
) -> None:
    kinds = owners(rows)
    eff = effective_units(kinds, prep, post)
    got = mh.compute_buckets(rows, bounds, prep, post, windows)
    assert len(got) == len(bounds) - 1
    for h, (lo, hi) in zip(got, pairwise(bounds), strict=True):
        units = range(lo, hi)
        want = mh.Hours(period_ms=hi - lo, instruments=1)
        for t in units:
            if kinds[t] is not None:
                setattr(want, FIELD[kinds[t]], getattr(want, FIELD[kinds[t]]) + 1)
            else:
                want.uncovered_ms += 1
        want.effective_ms = sum(1 for t in units if t in eff)
        if windows:
            want.service_ms = sum(1 for t in units if t in eff and in_any(t, windows))
            want.external_ms = sum(1 for t in units if t in eff and in_any(t, windows, external_only=True))
        assert h == want, (rows, bounds, prep, post, windows)
    whole = mh.compute(rows, 0, SPAN, prep, post, windows)
    total = mh.Hours()
    for h in got:
        total.add(h)
    total.instruments = 1
    assert whole == total  # the buckets add up to the period judged at once


@settings(max_examples=100, database=None, derandomize=True, deadline=None)
@given(rows=st.lists(row, max_size=7), a=st.integers(0, SPAN), n=st.integers(0, SPAN))
def test_uncovered_spans_are_exactly_the_units_no_row_covers(
    rows: list[tuple[int, int, str, bool]], a: int, n: int
) -> None:
    b = min(SPAN, a + n)
    spans = mh.uncovered(rows, a, b)
    kinds = owners(rows)
    assert [t for s, e in spans for t in range(s, e)] == [t for t in range(a, b) if kinds[t] is None]
    assert all(e > s for s, e in spans)
    assert all(x[1] < y[0] for x, y in pairwise(spans))  # maximal: two spans never touch


@settings(max_examples=100, database=None, derandomize=True, deadline=None)
@given(
    xs=st.lists(st.tuples(st.integers(0, SPAN), st.integers(0, 10)), max_size=5),
    ys=st.lists(st.tuples(st.integers(0, SPAN), st.integers(0, 10)), max_size=5),
)
def test_union_and_intersect_keep_exactly_the_shared_time(
    xs: list[tuple[int, int]], ys: list[tuple[int, int]]
) -> None:
    xs = [(s, s + d) for s, d in xs]
    ys = [(s, s + d) for s, d in ys]
    ux, uy = mh.union(xs), mh.union(ys)
    units = range(2 * SPAN + 10)
    assert {t for s, e in ux for t in range(s, e)} == {t for s, e in xs for t in range(s, e)}
    assert all(e > s for s, e in ux)
    assert all(x[1] < y[0] for x, y in pairwise(ux))  # sorted, apart: overlapping bookings count once
    both = mh.intersect(ux, uy)
    assert all(e > s for s, e in both)
    assert [t for s, e in both for t in range(s, e)] == [
        t for t in units if any(s <= t < e for s, e in xs) and any(s <= t < e for s, e in ys)
    ]


def test_hour_is_sixty_minutes_of_milliseconds() -> None:
    assert timedelta(milliseconds=mh.HOUR_MS) == timedelta(hours=1)


def test_coverage_is_known_time_over_the_period_and_zero_for_no_period() -> None:
    h = mh.Hours(period_ms=400, run_ms=100, standby_ms=50, off_ms=50, unknown_ms=200)
    assert h.known_ms == 200
    assert h.coverage == 0.5
    assert mh.Hours().coverage == 0.0
    assert set(h.totals()) == {
        "run_ms",
        "effective_ms",
        "standby_ms",
        "off_ms",
        "unknown_ms",
        "unverified_ms",
        "uncovered_ms",
    }
    assert h.totals()["unknown_ms"] == 200


def test_spread_over_no_bucket_is_empty() -> None:
    assert mh.spread([(0, 10)], []) == []
    assert mh.spread([(0, 10)], [5]) == []
    assert mh.compute_buckets([(0, 10, "RUNNING", True)], [], 0, 0) == []
