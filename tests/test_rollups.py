"""Rollups give the same hours as computing from the intervals directly, for any period and time zone.

Random timelines (two agents overlapping on one instrument, gaps in the chain, a clock step,
intervals arriving out of order and in several batches with reports in between, service
records imported late, an instrument's allowances changed) are reported both ways over
hundreds of random and calendar-aligned periods; every field must agree to the millisecond.
"""

from __future__ import annotations

import hashlib
import random
from datetime import datetime
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from labmeter.collector.ledger import Ledger, StoredInterval
from labmeter.collector.ledger.rollup import Calendar, Rollups, direct
from labmeter.config import PolicyConfig
from labmeter.machine_hours import FIELDS

M = 60_000
H = 60 * M
STATES = ["OFF", "STANDBY", "RUNNING", "RUNNING", "STANDBY", "UNKNOWN"]


def chain(
    rng: random.Random, agent: str, code: str, start: int, end: int
) -> list[tuple[StoredInterval, None]]:
    """A signed-looking chain cut at 15-minute boundaries, with a missing seq and one clock step."""
    out = []
    prev, seq, t, prev_end = "0" * 64, 0, start, start
    while t < end:
        state = rng.choice(STATES)
        span_end = min(end, t + rng.randint(1, 180) * M)
        while t < span_end:
            cut = min(span_end, (t // (15 * M) + 1) * 15 * M)
            seq += 1
            step = t - prev_end
            sha = hashlib.sha256(f"{agent}{code}{seq}".encode()).hexdigest()
            iv = StoredInterval(agent, code, seq, t, cut, state, prev, sha, step, b"")
            prev, prev_end, t = sha, cut, cut
            if rng.random() < 0.01:
                continue  # lost: its successor is unverified
            out.append((iv, None))
        if rng.random() < 0.02:
            t += rng.randint(1, 90) * M  # a jump in the agent's clock, recorded as a step
    return out


def same(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), where
    for code in want:
        for f in FIELDS:
            assert getattr(got[code], f) == getattr(want[code], f), f"{where} {code} {f}"


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Asia/Kolkata", "America/New_York"])
def test_rollups_equal_direct_computation(any_ledger: Ledger, zone: str) -> None:
    rng = random.Random(zone)
    tz = ZoneInfo(zone)
    policy = PolicyConfig(prep_allowance_s=900, post_allowance_s=600, timezone=zone)
    ledger = any_ledger
    t0 = int(
        datetime(2026, 2, 20, 5, 17, tzinfo=tz).timestamp() * 1000
    )  # crosses a month and DST in New York
    t1 = t0 + 24 * 24 * H
    rows = chain(rng, "a1", "XRD", t0, t1) + chain(rng, "a1", "NMR", t0 + 3 * H, t1 - 5 * H)
    rows += chain(rng, "a2", "NMR", t0 + 50 * H, t0 + 60 * H)  # a second agent on the same instrument
    for agent, code in (("a1", "XRD"), ("a1", "NMR"), ("a2", "NMR")):
        ledger.add_agent(agent, "k", "kid", [code])
    rng.shuffle(rows)
    rollups = Rollups(ledger, policy)

    def check(n: int) -> None:
        cal = Calendar(tz)
        spans = [(t0 - 2 * H, t1 + 2 * H), (cal.month_floor(t1), cal.next_month(t1))]
        spans += [(cal.day_floor(t0 + d * 24 * H), cal.next_day(t0 + d * 24 * H)) for d in (1, 9, 17)]
        for _ in range(n):
            a = rng.randrange(t0 - 5 * H, t1)
            b = a + rng.choice([rng.randrange(1, 3 * H), rng.randrange(H, 20 * 24 * H)])
            if rng.random() < 0.5:
                a, b = cal.hour_floor(a), cal.hour_ceil(b)
            spans.append((a, b))
        for a, b in spans:
            same(rollups.hours(a, b), direct(ledger, a, b, policy), f"[{a}, {b})")

    for i in range(0, len(rows), len(rows) // 4 + 1):
        ledger.store(rows[i : i + len(rows) // 4 + 1], [])
        check(25)
    ledger.add_service_records(
        [
            {"instrument": "XRD", "start_ms": t0 + 30 * H, "end_ms": t0 + 80 * H, "service_type": 130},
            {"instrument": "XRD", "start_ms": t0 + 70 * H, "end_ms": t0 + 99 * H, "service_type": 120},
            {
                "instrument": "NMR",
                "start_ms": t0 + 200 * H + 7 * M,
                "end_ms": t0 + 203 * H,
                "service_type": 130,
            },
        ]
    )
    check(40)
    info = {"name": "NMR", "unit": "", "department": "", "category": "", "kind": "general", "share_mode": ""}
    ledger.upsert_instruments([{"code": "NMR", **info, "prep_allowance_s": 3600, "post_allowance_s": 60}])
    check(40)
    assert ledger.db.execute("SELECT COUNT(*) FROM rollup_dirty").fetchone()[0] == 0


def test_plan_covers_the_period_exactly_once() -> None:
    cal = Calendar(ZoneInfo("Asia/Shanghai"))
    a = int(datetime(2026, 1, 30, 7, 45, tzinfo=cal.tz).timestamp() * 1000)
    b = int(datetime(2026, 5, 2, 3, 10, tzinfo=cal.tz).timestamp() * 1000)
    raw, pieces = cal.plan(a, b)
    parts = sorted([*raw, *((lo, hi) for _, lo, hi in pieces)])
    assert parts[0][0] == a and parts[-1][1] == b
    assert all(x[1] == y[0] for x, y in pairwise(parts))
    assert sorted(span for span, _, _ in pieces) == [0, 0, 1, 1, 2]  # hours, days, months, days, hours
    assert raw == [(a, a + 15 * M), (b - 10 * M, b)]


def test_bad_timezone_is_refused() -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        PolicyConfig(timezone="Mars/Olympus")
