"""Energy of intervals: the one rule for how an interval's energy is counted into a period or bucket.

An interval carries its energy in Wh (``energy_wh`` in the signed body; absent = unknown). The ledger,
the rollups, the evidence writer and ``labmeter verify`` all count it as whole milliwatt-hours
(:func:`to_mwh`), and split an interval that crosses a boundary with :func:`share`, whose parts always
add up to the interval's whole energy: so hourly, daily and monthly rollups, a direct computation and a
re-check of a bundle give exactly the same integer, in any order.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

Row = tuple[int, int, int | None]
"""(start_ms, end_ms, energy_mwh or None when the interval's energy is unknown)."""


def to_mwh(energy_wh: float | None) -> int | None:
    """An interval's energy as whole mWh (the unit every sum is taken in); None stays None (unknown)."""
    return None if energy_wh is None else round(energy_wh * 1000)


def share(energy_mwh: int, start: int, end: int, lo: int, hi: int) -> int:
    """The part of an interval's energy inside [lo, hi), in proportion to time; parts over adjacent
    ranges add up exactly to the whole (each is a difference of the same cumulative floor)."""
    a, b = max(lo, start), min(hi, end)
    if b <= a:
        return 0
    length = end - start
    return energy_mwh * (b - start) // length - energy_mwh * (a - start) // length


def energy_in(rows: Iterable[Row], lo: int, hi: int) -> tuple[int, int]:
    """(mWh, ms of [lo, hi) covered by intervals whose energy is known)."""
    mwh = known = 0
    for start, end, e in rows:
        if e is None or end <= lo or start >= hi:
            continue
        mwh += share(e, start, end, lo, hi)
        known += min(hi, end) - max(lo, start)
    return mwh, known


def energy_buckets(rows: Iterable[Row], bounds: Sequence[int]) -> list[tuple[int, int]]:
    """:func:`energy_in` for each bucket between consecutive ``bounds`` (sorted)."""
    out = [[0, 0] for _ in range(max(0, len(bounds) - 1))]
    for start, end, e in rows:
        if e is None:
            continue
        i = max(0, bisect_right(bounds, start) - 1)
        while i < len(out) and bounds[i] < end:
            lo, hi = bounds[i], bounds[i + 1]
            if start < hi and end > lo:
                out[i][0] += share(e, start, end, lo, hi)
                out[i][1] += min(hi, end) - max(lo, start)
            i += 1
    return [(m, k) for m, k in out]


def kwh(mwh: int) -> float:
    """mWh as kWh for tables (exact Wh stay in JSON as ``energy_wh``)."""
    return mwh / 1_000_000


def wh(mwh: int) -> float:
    return mwh / 1000
