"""Rollups: per-instrument hours by local hour, day and month, kept beside the ledger for fast reports.

A report over [a, b) is cut into the largest calendar buckets it covers (months, then
days, then hours) read from rollups, and the few minutes left at its edges, computed
from intervals. Rollups are judged the same way a direct computation is (see
:func:`~labmeter.machine_hours.compute_buckets`), so both give the same hours.

Ingest notes which time went stale in the same transaction that stores intervals or
service records; :meth:`Rollups.refresh` recomputes that time. Reports refresh first,
so they never read a stale rollup. Changing an instrument's allowances, or the
calendar's time zone, rebuilds that instrument's rollups.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from labmeter.collector.ledger import ROLLUP_VALUES, Ledger
from labmeter.collector.ledger.pg import Busy
from labmeter.collector.registry import stored_number
from labmeter.config import PolicyConfig
from labmeter.energy import energy_buckets, energy_in
from labmeter.machine_hours import HOUR_MS as H
from labmeter.machine_hours import Hours, compute, compute_buckets

log = logging.getLogger("labmeter.rollups")

HOUR, DAY, MONTH = 0, 1, 2
CHUNK_DAYS = 31  # the longest stretch judged at once when rebuilding
STEP = 500  # stale marks taken per transaction, so ingest never waits long


class Calendar:
    """Local hour, day and month buckets in one time zone."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        offset = datetime(2001, 1, 1, tzinfo=tz).utcoffset()
        self.phase = -int(offset.total_seconds() * 1000) % H if offset else 0

    def hour_floor(self, t: int) -> int:
        return t - (t - self.phase) % H

    def hour_ceil(self, t: int) -> int:
        f = self.hour_floor(t)
        return f if f == t else f + H

    def _ms(self, d: date) -> int:
        return int(datetime(d.year, d.month, d.day, tzinfo=self.tz).timestamp() * 1000)

    def _date(self, t: int) -> date:
        return datetime.fromtimestamp(t / 1000, self.tz).date()

    def day_floor(self, t: int) -> int:
        return self._ms(self._date(t))

    def day_ceil(self, t: int) -> int:
        f = self.day_floor(t)
        return f if f == t else self._ms(self._date(t) + timedelta(days=1))

    def next_day(self, t: int) -> int:
        return self._ms(self._date(t) + timedelta(days=1))

    def month_floor(self, t: int) -> int:
        return self._ms(self._date(t).replace(day=1))

    def next_month(self, t: int) -> int:
        d = self._date(t)
        return self._ms(date(d.year + d.month // 12, d.month % 12 + 1, 1))

    def month_ceil(self, t: int) -> int:
        f = self.month_floor(t)
        return f if f == t else self.next_month(t)

    def plan(self, a: int, b: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """[a, b) as raw edges to compute, and (span, lo, hi) stretches of whole buckets to read."""
        ha, hb = self.hour_ceil(a), self.hour_floor(b)
        if ha >= hb:
            return [(a, b)], []
        raw = [r for r in ((a, ha), (hb, b)) if r[0] < r[1]]
        da, db = self.day_ceil(ha), self.day_floor(hb)
        if da >= db:
            return raw, [(HOUR, ha, hb)]
        pieces = [(HOUR, lo, hi) for lo, hi in ((ha, da), (db, hb)) if lo < hi]
        ma, mb = self.month_ceil(da), self.month_floor(db)
        if ma >= mb:
            return raw, [*pieces, (DAY, da, db)]
        pieces += [(DAY, lo, hi) for lo, hi in ((da, ma), (mb, db)) if lo < hi]
        return raw, [*pieces, (MONTH, ma, mb)]


def allowances_ms(info: dict[str, object], policy: PolicyConfig) -> tuple[int, int]:
    """Prep and post allowances: the instrument's own where the registry gives them, else the policy's."""
    prep, post = stored_number(info, "prep_allowance_s"), stored_number(info, "post_allowance_s")
    return (
        int(prep if prep is not None else policy.prep_allowance_s) * 1000,
        int(post if post is not None else policy.post_allowance_s) * 1000,
    )


def _values(h: Hours) -> tuple[int, ...]:
    covered = h.period_ms - h.uncovered_ms
    return (
        h.run_ms,
        h.standby_ms,
        h.off_ms,
        h.unknown_ms,
        h.unverified_ms,
        h.effective_ms,
        covered,
        h.service_ms,
        h.external_ms,
        h.energy_mwh,
        h.energy_ms,
    )


class Rollups:
    def __init__(
        self, ledger: Ledger, policy: PolicyConfig, registry: dict[str, dict[str, object]] | None = None
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.calendar = Calendar(ZoneInfo(policy.timezone))
        self._given = registry  # the caller's fresh read of the instruments table
        self._registry: dict[str, dict[str, object]] | None = None

    def registry(self) -> dict[str, dict[str, object]]:
        """The instruments table as of the last refresh (read once per report or page refresh)."""
        if self._registry is None:
            self._registry = self.ledger.instruments_by_code()
        return self._registry

    def _basis(self, info: dict[str, object]) -> str:
        prep, post = allowances_ms(info, self.policy)
        return f"{self.policy.timezone}|{prep}|{post}"

    def refresh(self, steps: int | None = None, wait: bool = True) -> int:
        """Bring stale rollups up to date (all, or ``steps`` transactions' worth); returns the marks worked off.

        With ``wait`` false, give up at once while another collector is refreshing (it does the work).
        """
        self._registry, self._given = self._given, None
        registry = self.registry()
        known = self.ledger.rollup_basis()
        stale = [code for code, info in registry.items() if known.get(code) != self._basis(info)]
        if stale:
            log.info(
                "rollups of %d instrument(s) to build: new, or allowances or time zone changed", len(stale)
            )
            try:
                with self.ledger.transaction(exclusive=True, wait=wait) as cur:
                    for code in stale:
                        known[code] = self._basis(registry[code])
                        self.ledger.rebase_rollups(cur, code, known[code])
            except Busy:
                return 0
        done = 0
        while steps is None or steps > 0:
            steps = None if steps is None else steps - 1
            try:
                with self.ledger.transaction(exclusive=True, wait=wait) as cur:
                    worked = self._step(cur, registry, known)
            except Busy:
                return done
            if not worked:
                return done
            done += worked
        return done

    def _step(self, cur: Any, registry: dict[str, dict[str, object]], known: dict[str, str]) -> int:
        """Work off up to STEP stale marks in one transaction; how many there were."""
        marks = self.ledger.dirty(cur, STEP)
        spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for _id, code, lo, hi in marks:
            spans[code].append((lo, hi))
        for code in set(spans) - set(known):  # data for an instrument the registry does not list
            self.ledger.rebase_rollups(cur, code, self._basis({}))
            known[code] = self._basis({})
        for code, ranges in spans.items():
            self._recompute(cur, code, registry.get(code, {}), ranges)
        self.ledger.clear_dirty(cur, [m[0] for m in marks])
        return len(marks)

    def _recompute(self, cur: Any, code: str, info: dict[str, object], ranges: list[tuple[int, int]]) -> None:
        prep, post = allowances_ms(info, self.policy)
        pad = max(prep, post)
        cal = self.calendar
        # Stale time reaches the allowances beyond what changed: standby next to a run is effective.
        runs: list[list[int]] = []
        for lo, hi in sorted((cal.hour_floor(lo - pad), cal.hour_ceil(hi + pad)) for lo, hi in ranges):
            if runs and lo <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], hi)
            else:
                runs.append([lo, hi])
        for run_lo, run_hi in runs:
            lo = run_lo
            while lo < run_hi:
                hi = cal.day_floor(lo)
                for _ in range(CHUNK_DAYS):
                    hi = cal.next_day(hi)
                hi = min(hi, run_hi)
                self._stretch(cur, code, lo, hi, prep, post)
                lo = hi
            # Days the run only partly covers are summed from the stored hours, and so are the months.
            for d in {cal.day_floor(run_lo), cal.day_floor(run_hi - 1)}:
                if d < run_lo or cal.next_day(d) > run_hi:
                    self.ledger.sum_rollups(cur, code, HOUR, DAY, d, cal.next_day(d))
            m = cal.month_floor(run_lo)
            while m < run_hi:
                self.ledger.sum_rollups(cur, code, DAY, MONTH, m, cal.next_month(m))
                m = cal.next_month(m)

    def _stretch(self, cur: Any, code: str, lo: int, hi: int, prep: int, post: int) -> None:
        """Recompute the hours of [lo, hi), and the days wholly inside it."""
        cal = self.calendar
        pad = max(prep, post)
        found = self.ledger.intervals_between(lo - pad, hi + pad, code)
        rows = [r.span() for r in found]
        windows = self.ledger.service_windows(lo, hi, code).get(code, [])
        bounds = list(range(lo, hi + 1, H))
        hours = compute_buckets(rows, bounds, prep, post, windows) if rows else []
        for h, (mwh, known) in zip(hours, energy_buckets([r.energy() for r in found], bounds), strict=False):
            h.energy_mwh, h.energy_ms = mwh, known
        values = [
            (s, _values(h)) for s, h in zip(bounds, hours, strict=False) if h.uncovered_ms < h.period_ms
        ]
        self.ledger.write_rollups(cur, code, HOUR, lo, hi, values)
        d0 = cal.day_ceil(lo)
        days: dict[int, list[int]] = {}
        d = d0
        while cal.next_day(d) <= hi:
            days[d] = [0] * len(ROLLUP_VALUES)
            d = cal.next_day(d)
        if not days:
            return
        starts = list(days)
        for s, v in values:
            i = bisect_right(starts, s) - 1
            if i >= 0 and s < d:
                total = days[starts[i]]
                for k, x in enumerate(v):
                    total[k] += x
        self.ledger.write_rollups(cur, code, DAY, d0, d, [(k, tuple(v)) for k, v in days.items() if any(v)])

    def hours(self, a: int, b: int) -> dict[str, Hours]:
        """Hours per instrument in [a, b): registered instruments and any with data; rated hours not set."""
        self.refresh()
        return self._as_hours(self.totals(a, b), b - a)

    def totals(self, a: int, b: int, columns: Sequence[str] = ROLLUP_VALUES) -> dict[str, list[int]]:
        """``columns`` per instrument with data in [a, b): whole buckets from rollups, the edges computed.

        Reads what the last :meth:`refresh` left; call that first.
        """
        raw, pieces = self.calendar.plan(a, b)
        out: dict[str, list[int]] = {}
        for span, lo, hi in pieces:
            _add(out, ((row[0], row[1:]) for row in self.ledger.rollup_totals(span, lo, hi, columns)))
        pick = [ROLLUP_VALUES.index(c) for c in columns]
        for lo, hi in raw:
            found = direct(self.ledger, lo, hi, self.policy, self.registry(), with_data_only=True)
            _add(out, ((code, [_values(h)[i] for i in pick]) for code, h in found.items()))
        return out

    def _as_hours(self, totals: dict[str, list[int]], period_ms: int) -> dict[str, Hours]:
        zero = [0] * len(ROLLUP_VALUES)
        return {code: _hours(totals.get(code, zero), period_ms) for code in {*self.registry(), *totals}}


def _add(into: dict[str, list[int]], rows: Iterable[tuple[str, Sequence[int]]]) -> None:
    for code, values in rows:
        have = into.get(code)
        into[code] = list(values) if have is None else [x + y for x, y in zip(have, values, strict=True)]


def _hours(v: Sequence[int], period_ms: int) -> Hours:
    run, standby, off, unknown, unverified, effective, covered, service, external, energy, energy_ms = v
    return Hours(
        period_ms=period_ms,
        run_ms=run,
        standby_ms=standby,
        off_ms=off,
        unknown_ms=unknown,
        unverified_ms=unverified,
        effective_ms=effective,
        uncovered_ms=max(0, period_ms - covered),
        service_ms=service,
        external_ms=external,
        energy_mwh=energy,
        energy_ms=energy_ms,
        instruments=1,
    )


def direct(
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    registry: dict[str, dict[str, object]] | None = None,
    with_data_only: bool = False,
) -> dict[str, Hours]:
    """Hours per instrument in [a, b) computed from the intervals themselves, without rollups.

    Every registered instrument, or (``with_data_only``) those with intervals or service records in reach.
    """
    if registry is None:
        registry = ledger.instruments_by_code()
    pad = max(
        [policy.prep_allowance_s * 1000, policy.post_allowance_s * 1000]
        + [max(allowances_ms(i, policy)) for i in registry.values()]
    )
    per: dict[str, list[tuple[int, int, str, bool]]] = defaultdict(list)
    energy: dict[str, list[tuple[int, int, int | None]]] = defaultdict(list)
    for r in ledger.intervals_between(a - pad, b + pad):
        per[r.instrument].append(r.span())
        energy[r.instrument].append(r.energy())
    windows = ledger.service_windows(a, b)
    out: dict[str, Hours] = {}
    codes = set(per) | set(windows) if with_data_only else set(registry) | set(per)
    for code in sorted(codes):
        prep, post = allowances_ms(registry.get(code, {}), policy)
        out[code] = h = compute(per.get(code, []), a, b, prep, post, windows.get(code, ()))
        h.energy_mwh, h.energy_ms = energy_in(energy.get(code, []), a, b)
    return out
