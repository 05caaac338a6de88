"""The reconciliation of a week computed by hand (tests/support/reconcile_week.py has the schedule, the
bookings and the sign-ins): every record's figures, every finding and every summary figure is written
below as arithmetic on that schedule, with the policy's default thresholds (prep 15 min, post 10 min,
unused below 5 min of running, unattributed from 15 min a day, sign-in window 30 min, idle from 2 h,
overlap from 5 min)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from labmeter.collector.ledger import Ledger
from labmeter.collector.reports.hours import PeriodError
from labmeter.collector.reports.reconcile import KINDS, Finding, local_days, minus, reconcile
from labmeter.config import PolicyConfig
from tests.support.reconcile_week import SIGNINS, TZ, WEEK, build, t

POLICY = PolicyConfig()
MIN = 60_000
H = 60 * MIN


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ledger, dict[str, int]]:
    tmp = tmp_path_factory.mktemp("week")
    ledger = Ledger(tmp / "ledger.sqlite")
    return ledger, build(tmp, ledger)


def test_thresholds_default_to_what_a_facility_accepts() -> None:
    assert (POLICY.prep_allowance_s, POLICY.post_allowance_s) == (15 * 60, 10 * 60)
    assert POLICY.unused_booking_run_s == 5 * 60
    assert POLICY.unattributed_min_s == 15 * 60
    assert POLICY.signin_window_s == 30 * 60
    assert POLICY.idle_min_s == 2 * 3600
    assert POLICY.overlap_min_s == 5 * 60


# record: booked, run, effective, known (ms), first run, last run end, findings
RECORDS: dict[str, tuple[int, int, int, int, int | None, int | None, list[str]]] = {
    # 08:30-11:30: off 15 min, standby 08:45-09:00 (all of it prep), run 09:00-11:00, standby 11:00-11:30
    # (its first 10 min post); the two-minute hand-over with R9 is under the 5-minute overlap threshold
    "R1": (3 * H, 2 * H, (15 + 120 + 10) * MIN, 3 * H, t(2, 9), t(2, 11), []),
    # 11:28-12:00: standby 11:28-11:30 is past the post allowance (11:00-11:10), then off
    "R9": (32 * MIN, 0, 0, 32 * MIN, None, None, ["booked_unused"]),
    "R2": (2 * H, 0, 0, 2 * H, None, None, ["booked_unused"]),
    "R3": (2 * H, 2 * H, 2 * H, 2 * H, t(3, 14), t(3, 16), ["overlap"]),
    # 15:00-17:00: run to 16:30, then standby whose first 10 min are post
    "R4": (2 * H, 90 * MIN, (90 + 10) * MIN, 2 * H, t(3, 15), t(3, 16, 30), ["overlap"]),
    "R5": (H, H, H, H, t(6, 12), t(6, 13), []),
    "R7": (2 * H, 0, 0, 0, None, None, ["unchecked"]),  # only UNKNOWN inside
    "R6": (2 * H, 0, 0, 0, None, None, ["unchecked"]),  # no interval at all
    "RB": (2 * H, 2 * H, 2 * H, 2 * H, t(3, 14), t(3, 16), []),
}


def test_every_record_measured_inside_its_booking(week: tuple[Ledger, dict[str, int]]) -> None:
    ledger, ids = week
    rec = reconcile(ledger, *WEEK, POLICY, TZ)
    got = {r.booking.id: r for r in rec.records}
    assert set(got) == set(ids.values())
    for name, (booked, run, eff, known, first, last, findings) in RECORDS.items():
        r = got[ids[name]]
        v = r.values()
        assert (v["booked"], v["run"], v["effective"], v["known"]) == (booked, run, eff, known), name
        assert (v["first_run"], v["last_run"]) == (first, last), name
        # a booking the meter saw nothing of has no used share: not 0 %, which would claim it was unused
        assert v["used_pct"] == (round(100 * eff / booked, 1) if known else None), name
        assert r.findings == findings, name
    assert got[ids["R1"]].values()["used_pct"] == round(100 * 145 / 180, 1) == 80.6


def expected_findings(ids: dict[str, int]) -> list[Finding]:
    p = POLICY
    out = [
        Finding(
            "booked_unused",
            "CZ-A",
            t(2, 11, 28),
            t(2, 12),
            32 * MIN,
            p.unused_booking_run_s,
            (ids["R9"],),
            "吴十",
        ),
        Finding(
            "booked_unused", "CZ-A", t(3, 10), t(3, 12), 2 * H, p.unused_booking_run_s, (ids["R2"],), "李四"
        ),
        # R3 14:00-16:00 and R4 15:00-17:00 share 15:00-16:00
        Finding(
            "overlap", "CZ-A", t(3, 15), t(3, 16), H, p.overlap_min_s, (ids["R3"], ids["R4"]), "王五 / 赵六"
        ),
        # the run 03-04 21:00 to 03-05 01:00 has no booking and no sign-in: three hours on the 4th...
        Finding("unattributed", "CZ-A", t(4, 21), t(5, 0), 3 * H, p.unattributed_min_s, day="2026-03-04"),
        # ... one on the 5th, plus 15:00-15:30 (the 14:00 sign-in is an hour early); 10:10-12:00 was signed in
        Finding(
            "unattributed",
            "CZ-A",
            t(5, 0),
            t(5, 15, 30),
            H + 30 * MIN,
            p.unattributed_min_s,
            day="2026-03-05",
        ),
        Finding(
            "signin_unused", "CZ-A", t(5, 14), t(5, 14, 30), 30 * MIN, p.signin_window_s, who=SIGNINS["S2"][2]
        ),
        # standby 08:00-12:00 before the noon run: its last 15 min are prep
        Finding("idle", "CZ-A", t(6, 8), t(6, 12), 4 * H - 15 * MIN, p.idle_min_s),
        # standby 13:00-20:00 after it: its first 10 min are post
        Finding("idle", "CZ-A", t(6, 13), t(6, 20), 7 * H - 10 * MIN, p.idle_min_s),
        Finding("unchecked", "CZ-A", t(8, 2), t(8, 4), 2 * H, None, (ids["R7"],), "孙八"),
        Finding("unchecked", "CZ-A", t(8, 9), t(8, 11), 2 * H, None, (ids["R6"],), "孙八"),
    ]
    # not findings: R1/R9's 2 min overlap (< 5 min), the 5-minute blip on 03-06 (< 15 min a day), the idle
    # 20 min after the runs of 03-02 and 03-03 (< 2 h), S1 and S3 (a run followed or was under way), S4 (the
    # meter saw nothing then), RB beside R3 (another instrument)
    return out


def test_every_finding_and_nothing_else(week: tuple[Ledger, dict[str, int]]) -> None:
    ledger, ids = week
    got = reconcile(ledger, *WEEK, POLICY, TZ).findings
    assert got == expected_findings(ids)
    assert {f.code for f in got} == set(KINDS)  # the week covers every kind


def test_summary_per_instrument(week: tuple[Ledger, dict[str, int]]) -> None:
    ledger, _ = week
    rows = {r.instrument: r.values() for r in reconcile(ledger, *WEEK, POLICY, TZ).summary}
    booked_a = (8 * 60 + 30, 12 * 60), (14 * 60, 17 * 60)  # 03-02 R1+R9 and 03-03 R3+R4, in minutes of day
    booked = sum(e - s for s, e in booked_a) * MIN + (2 + 1 + 2 + 2) * H  # R2, R5, R7, R6
    assert booked == 13.5 * H
    used = (145 + (150 + 10) + 60) * MIN  # R1+R9 as R1; R3+R4: run 14:00-16:30 plus 10 min post; R5
    run = (120 + 150 + 240 + 110 + 30 + 5 + 60) * MIN
    effective = run + (15 + 10 + 10 + 15 + 10) * MIN  # prep/post standby of 03-02, 03-03 and 03-06
    standby = (15 + 30 + 30 + 240 + 420) * MIN
    assert rows["CZ-A"] == {
        "instrument": "CZ-A",
        "name": "X射线衍射仪",
        "unit": "材料学院",
        "records": 8,
        "booked": booked,
        "used": used,
        "used_pct": round(100 * used / booked, 1),
        "run": run,
        "effective": effective,
        "unattributed": (180 + 60 + 30 + 5) * MIN,  # the blip counts in the total, though below a finding
        "idle": standby - (effective - run),
        "unused": 2,
        "unchecked": 2,
    }
    assert rows["CZ-A"]["idle"] == (20 + 20 + 225 + 410) * MIN
    assert rows["CZ-B"] == {
        "instrument": "CZ-B",
        "name": "扫描电镜",
        "unit": "分析测试中心",
        "records": 1,
        "booked": 2 * H,
        "used": 2 * H,
        "used_pct": 100.0,
        "run": 2 * H,
        "effective": 2 * H,
        "unattributed": 0,
        "idle": 0,
        "unused": 0,
        "unchecked": 0,
    }


def test_the_same_hours_as_report_hours(week: tuple[Ledger, dict[str, int]]) -> None:
    """One definition: the summary's run and effective time are the hours report's for the same week."""
    from labmeter.collector.reports.hours import hours_report

    ledger, _ = week
    hours = {r.key: r.hours for r in hours_report(ledger, *WEEK, POLICY, "instrument", TZ)}
    for r in reconcile(ledger, *WEEK, POLICY, TZ).summary:
        assert (r.run_ms, r.effective_ms) == (hours[r.instrument].run_ms, hours[r.instrument].effective_ms)


def test_thresholds_move_findings(week: tuple[Ledger, dict[str, int]]) -> None:
    """Each threshold decides its finding: raised, the borderline cases of the week drop out or come in."""
    ledger, ids = week

    def codes(**policy: Any) -> list[tuple[str, tuple[int, ...], str]]:
        found = reconcile(ledger, *WEEK, PolicyConfig(**policy), TZ).findings
        return [(f.code, f.records, f.day) for f in found]

    # a 2-minute overlap threshold lists the R1/R9 hand-over (exactly 2 min)
    assert ("overlap", (ids["R1"], ids["R9"]), "") in codes(overlap_min_s=120)
    assert ("overlap", (ids["R1"], ids["R9"]), "") not in codes(overlap_min_s=121)
    # the 03-06 blip (5 min) is listed from a 5-minute day threshold
    assert ("unattributed", (), "2026-03-06") in codes(unattributed_min_s=300)
    assert ("unattributed", (), "2026-03-06") not in codes(unattributed_min_s=301)
    # a one-hour sign-in window lets S2 (14:00) start the 15:00 run: no finding, and 03-05 loses 30 min
    found = reconcile(ledger, *WEEK, PolicyConfig(signin_window_s=3600), TZ).findings
    assert not [f for f in found if f.code == "signin_unused"]
    assert [f.time_ms for f in found if f.day == "2026-03-05"] == [H]
    # idle from 6 h 50 min: only the afternoon stretch
    assert [
        f.time_ms
        for f in reconcile(ledger, *WEEK, PolicyConfig(idle_min_s=410 * 60), TZ).findings
        if f.code == "idle"
    ] == [410 * MIN]
    # R4 ran 90 min: unused below 91 min of running, not below 90
    assert ("booked_unused", (ids["R4"],), "") in codes(unused_booking_run_s=91 * 60)
    assert ("booked_unused", (ids["R4"],), "") not in codes(unused_booking_run_s=90 * 60)


def test_records_count_in_the_period_they_start(week: tuple[Ledger, dict[str, int]]) -> None:
    """03-04 to 03-05 only: no record starts there, yet the midnight run is unattributed on both days."""
    ledger, ids = week
    rec = reconcile(ledger, t(4, 0), t(6, 0), POLICY, TZ)
    assert rec.records == []
    assert [(f.code, f.day, f.time_ms) for f in rec.findings if f.code == "unattributed"] == [
        ("unattributed", "2026-03-04", 3 * H),
        ("unattributed", "2026-03-05", H + 30 * MIN),
    ]
    # generated on 03-06 at 00:00: the bookings from then on (R5, R7, R6) have not begun, so they are no
    # records yet and not "unchecked"; the overlap of R3 and R4, a fact of the bookings, stays
    early = reconcile(ledger, *WEEK, POLICY, TZ, now_ms=t(6, 0))
    assert [r.booking.id for r in early.records] == [ids[n] for n in ("R1", "R9", "R2", "R3", "R4", "RB")]
    assert [f.records for f in early.findings if f.code == "overlap"] == [(ids["R3"], ids["R4"])]
    assert "unchecked" not in {f.code for f in early.findings} and early.meta["counted_up_to"].startswith(
        "2026-03-06T00:00"
    )
    # a period that starts at 03-03 15:30 has R3 and R4 started before it: their overlap began before too
    late = reconcile(ledger, t(3, 15, 30), t(4, 0), POLICY, TZ)
    assert not [f for f in late.findings if f.code == "overlap"] and late.records == []


def test_one_instrument_and_bad_periods(week: tuple[Ledger, dict[str, int]]) -> None:
    ledger, ids = week
    only = reconcile(ledger, *WEEK, POLICY, TZ, instrument="CZ-B")
    assert [r.booking.id for r in only.records] == [ids["RB"]] and only.findings == []
    with pytest.raises(PeriodError, match="after --from"):
        reconcile(ledger, WEEK[1], WEEK[0], POLICY, TZ)
    with pytest.raises(PeriodError, match="'CZ-X': no such instrument"):
        reconcile(ledger, *WEEK, POLICY, TZ, instrument="CZ-X")


def test_local_days_and_interval_arithmetic() -> None:
    assert [d for d, _, _ in local_days(*WEEK, TZ)] == [f"2026-03-0{d}" for d in range(2, 9)]
    assert local_days(t(2, 12), t(3, 6), TZ) == [
        ("2026-03-02", t(2, 12), t(3, 0)),
        ("2026-03-03", t(3, 0), t(3, 6)),
    ]
    assert minus([(0, 10), (20, 30)], [(2, 4), (8, 22)]) == [(0, 2), (4, 8), (22, 30)]
    assert minus([(5, 6)], []) == [(5, 6)]


def test_the_week_on_every_ledger_backend(any_ledger: Ledger, tmp_path: Path) -> None:
    """The sign-in, booking and state queries behind the reconciliation give the same findings on PostgreSQL."""
    ids = build(tmp_path, any_ledger)
    rec = reconcile(any_ledger, *WEEK, POLICY, TZ)
    assert rec.findings == expected_findings(ids)
    assert [r.values()["effective"] for r in rec.records] == [RECORDS[n][2] for n in ids]


def test_a_run_under_way_at_the_start_keeps_its_sign_in(week: tuple[Ledger, dict[str, int]]) -> None:
    """From 03-05 11:45: the run that S1 (09:50) started at 10:10 is still attributed, though S1 and S3
    (11:00) lie more than the window before the period; the 15:00 run is not."""
    ledger, _ = week
    rec = reconcile(ledger, t(5, 11, 45), t(5, 16), POLICY, TZ)
    (row,) = [r for r in rec.summary if r.instrument == "CZ-A"]
    assert row.unattributed_ms == 30 * MIN  # 15:00-15:30 only, not 11:45-12:00
    assert [(f.code, f.time_ms) for f in rec.findings] == [
        ("signin_unused", 30 * MIN),  # S2 at 14:00
        ("unattributed", 30 * MIN),
    ]
