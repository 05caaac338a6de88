"""Metering start and rated-hours proration, with every figure worked out by hand.

A week (2026-03-02 to 03-09, Asia/Shanghai), the report generated at its end:
- CZ-R, special (800 h/year), registry metering start 03-04, intervals only from 03-05: metered 120 h,
  of which 24 h no data; 48 h not metered; rated 800 x 120 / 8760.
- CZ-F, general (1400 h), no registry date, first interval 03-06 12:00: metered 60 h, all covered.
- CZ-O, its own 500 h, registry 03-06 12:00, intervals from 03-07: metered 60 h, 12 h no data.
- CZ-L, registry 03-07 but intervals from 03-05: metering began at the first interval.
- CZ-U, registry 03-08, no agent ever: metered 24 h, all no data; category 990101 is not classified.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from openpyxl import load_workbook

from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import import_instruments
from labmeter.collector.reports.hours import (
    UNKNOWN_CATEGORY,
    category_name,
    hours_report,
    metered_rated_ms,
    render,
    report_meta,
    write_xlsx,
)
from labmeter.collector.reports.national import findings, national_export
from labmeter.config import PolicyConfig
from tests.lab import store_schedule

TZ = ZoneInfo("Asia/Shanghai")
POLICY = PolicyConfig()
H = 3_600_000
YEAR_H = 8760


def t(day: int, hh: int = 0, mm: int = 0, month: int = 3) -> int:
    return int(datetime(2026, month, day, hh, mm, tzinfo=TZ).timestamp() * 1000)


WEEK = (t(2), t(9))
REGISTRY = (
    "仪器编号,仪器名称,仪器类型,定额机时,分类编码,计量开始日期\n"
    "CZ-R,专用电镜,专用,,010102,2026-03-04\n"
    "CZ-F,通用谱仪,通用,,011300,\n"
    "CZ-O,自定定额,通用,500,120000,2026/3/6 12:00\n"
    "CZ-L,先装后登记,通用,,010301,2026-03-07\n"
    "CZ-U,无人计量,通用,,990101,2026-03-08\n"
)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    tmp = tmp_path_factory.mktemp("metering")
    led = Ledger(tmp / "ledger.sqlite")
    (tmp / "i.csv").write_text(REGISTRY, encoding="gbk")
    notes: list[str] = []
    import_instruments(led, tmp / "i.csv", notes, TZ)
    assert any("990101" in n and "row 6" in n for n in notes), notes
    end = WEEK[1]
    store_schedule(
        tmp,
        led,
        "a-r",
        "CZ-R",
        [(t(5), t(5, 9), "OFF"), (t(5, 9), t(5, 12), "RUNNING"), (t(5, 12), end, "OFF")],
    )
    store_schedule(
        tmp,
        led,
        "a-f",
        "CZ-F",
        [(t(6, 12), t(7, 10), "OFF"), (t(7, 10), t(7, 16), "RUNNING"), (t(7, 16), end, "OFF")],
    )
    store_schedule(tmp, led, "a-o", "CZ-O", [(t(7), end, "OFF")])
    store_schedule(
        tmp,
        led,
        "a-l",
        "CZ-L",
        [(t(5), t(5, 10), "OFF"), (t(5, 10), t(5, 12), "RUNNING"), (t(5, 12), end, "OFF")],
    )
    return led


def rows(
    ledger: Ledger, a: int = WEEK[0], b: int = WEEK[1], now: int = WEEK[1]
) -> dict[str, dict[str, object]]:
    return {r.key: r.values() for r in hours_report(ledger, a, b, POLICY, "instrument", TZ, now_ms=now)[:-1]}


def test_time_before_metering_is_not_metered_and_rated_hours_follow_the_metered_part(ledger: Ledger) -> None:
    got = rows(ledger)
    want = {
        # metered, not metered, no data, run, rated (h/year x metered / 8760)
        "CZ-R": (120, 48, 24, 3, 800 * 120 / YEAR_H),
        "CZ-F": (60, 108, 0, 6, 1400 * 60 / YEAR_H),
        "CZ-O": (60, 108, 12, 0, 500 * 60 / YEAR_H),
        "CZ-L": (96, 72, 0, 2, 1400 * 96 / YEAR_H),
        "CZ-U": (24, 144, 24, 0, 1400 * 24 / YEAR_H),
    }
    for code, (metered, not_metered, no_data, run, rated) in want.items():
        r = got[code]
        assert (r["metered_h"], r["not_metered_h"], r["uncovered_h"]) == (metered, not_metered, no_data), code
        assert r["run_h"] == run and r["rated_h"] == round(rated, 2), code
        assert r["coverage_pct"] == round(100 * (metered - no_data) / metered, 1), code
        assert r["utilisation_pct"] == round(100 * run / rated, 1), code
    assert got["CZ-R"]["rated_h"] == 10.96 and got["CZ-R"]["coverage_pct"] == 80.0
    assert got["CZ-R"]["metered_from"] == t(4) and got["CZ-O"]["metered_from"] == t(6, 12)
    assert got["CZ-F"]["metered_from"] == t(6, 12) and got["CZ-L"]["metered_from"] == t(5)


def test_unfinished_month_counts_not_metered_time_and_nothing_still_to_come(ledger: Ledger) -> None:
    """March, a week in: 1 to 4 March is not metered for CZ-R, 9 to 31 March is not counted at all."""
    r = rows(ledger, t(1), t(1, month=4), now=WEEK[1])["CZ-R"]
    assert (r["metered_h"], r["not_metered_h"], r["uncovered_h"]) == (120, 72, 24)
    assert r["rated_h"] == round(800 * 120 / YEAR_H, 2)


def test_findings_judge_only_the_metered_part(ledger: Ledger) -> None:
    res = findings(ledger, *WEEK, POLICY, low_use_pct=50, min_coverage_pct=90, now_ms=WEEK[1])
    assert sorted(x["instrument"] for x in res["poor_coverage"]) == ["CZ-O", "CZ-R"]  # 80 % each
    assert sorted(x["instrument"] for x in res["low_use"]) == ["CZ-L", "CZ-O", "CZ-R"]
    low = {x["instrument"]: x for x in res["low_use"]}
    assert low["CZ-R"]["rated_h"] == 10.96 and low["CZ-R"]["utilisation_pct"] == round(
        100 * 3 / (800 * 120 / YEAR_H), 1
    )
    assert [x["instrument"] for x in res["no_data"]] == ["CZ-U"]
    assert not findings(ledger, *WEEK, POLICY, low_use_pct=0, min_coverage_pct=79, now_ms=WEEK[1])[
        "poor_coverage"
    ]


def test_national_export_carries_metering_start_and_unknown_categories(ledger: Ledger) -> None:
    doc = national_export(ledger, 2026, POLICY, TZ, now_ms=WEEK[1])
    inst = {i["innerId"]: i for i in doc["instruments"]["instruList"]}
    r = inst["CZ-R"]["labmeter"]
    # 1 January to 9 March is 67 days; 120 h of them metered
    assert r["notMetered_s"] == (67 * 24 - 120) * 3600 and r["metered_s"] == 120 * 3600
    assert r["coverageOfMeteredPct"] == 80.0 and r["meteredFrom"].startswith("2026-03-04T00:00:00")
    assert inst["CZ-R"]["runMachine"] == 3.0
    assert r["categoryName"] == "分析仪器 / 电子光学仪器"
    assert inst["CZ-U"]["labmeter"]["categoryName"] == UNKNOWN_CATEGORY
    assert any(
        w.startswith("instrument CZ-U: category 990101 is not in the shipped classification")
        for w in doc["warnings"]
    )
    assert not any("CZ-R: category" in w or "instrument CZ-F" in w for w in doc["warnings"])


def test_category_names_at_every_level_and_unknown_codes_named(ledger: Ledger, tmp_path: Path) -> None:
    assert category_name("010102") == "分析仪器 / 电子光学仪器"
    assert category_name("011300") == "分析仪器 / 其他"
    assert category_name("120000") == "其他仪器"
    assert category_name("990101") == category_name("019901") == category_name("000000") == UNKNOWN_CATEGORY
    got = rows(ledger)
    assert (
        got["CZ-F"]["category_name"] == "分析仪器 / 其他" and got["CZ-U"]["category_name"] == UNKNOWN_CATEGORY
    )
    meta = report_meta(ledger, *WEEK, POLICY, TZ, ["instrument"], now_ms=WEEK[1])
    assert [c for c in meta["caveats"] if "shipped classification" in c] == [
        "instrument CZ-U: category 990101 is not in the shipped classification: no 大类 (first level) 99; check the registry"
    ]
    report = hours_report(ledger, *WEEK, POLICY, "instrument", TZ, now_ms=WEEK[1])
    doc = json.loads(render(report, "json", by="instrument", meta=meta, tz=TZ))
    assert {r["key"]: r["seconds"]["not_metered_s"] for r in doc["rows"]}["CZ-R"] == 48 * 3600
    book = tmp_path / "r.xlsx"
    write_xlsx(book, {"instrument": report}, "zh", meta, TZ)
    wb = load_workbook(book)
    sheet = wb["按仪器"]
    header = [c.value for c in sheet[1]]
    cells = {r[0]: dict(zip(header, r, strict=True)) for r in sheet.iter_rows(min_row=2, values_only=True)}
    assert cells["CZ-R"]["未计量 (h)"] == 48 and cells["CZ-U"]["分类名称"] == UNKNOWN_CATEGORY
    about = [str(c.value) for row in wb["说明"].iter_rows() for c in row if c.value]
    assert any("CZ-U: category 990101" in v for v in about)


def test_live_view_proration_is_the_reports_rule() -> None:
    """The live page's utilisation calls metered_rated_ms: a special instrument whose metering began at
    06:00 has, at 18:00 the same day, 12 h of its 800 h year rated."""
    info: dict[str, object] = {"kind": "special"}
    day, now = t(5), t(5, 18)
    assert metered_rated_ms(info, POLICY, day, now, now, t(5, 6)) == round(800 * H * 12 / YEAR_H)
    assert metered_rated_ms(info, POLICY, day, now, now, t(4)) == round(800 * H * 18 / YEAR_H)
    assert metered_rated_ms(info, POLICY, day, now, now, None) == 0  # never metered: nothing rated
    assert metered_rated_ms(info, POLICY, day, now, now, t(6)) == 0  # metering starts tomorrow
    assert metered_rated_ms({"rated_hours": 100.0}, POLICY, day, now, now, t(5, 6)) == round(
        100 * H * 12 / YEAR_H
    )


def test_metering_start_is_stored_and_old_ledgers_gain_the_column(any_ledger: Ledger, tmp_path: Path) -> None:
    """The column on SQLite and PostgreSQL; a registry re-imported without a date clears it."""
    (tmp_path / "a.csv").write_text("code,metering_start\nCZ-A,2026-03-04\n", encoding="utf-8")
    import_instruments(any_ledger, tmp_path / "a.csv", tz=TZ)
    (got,) = any_ledger.instruments()
    assert got["metering_start_ms"] == t(4)
    (tmp_path / "b.csv").write_text("code\nCZ-A\n", encoding="utf-8")
    import_instruments(any_ledger, tmp_path / "b.csv", tz=TZ)
    assert any_ledger.instruments()[0]["metering_start_ms"] is None


def test_a_ledger_from_before_metering_starts_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE instruments (code TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', unit TEXT NOT NULL DEFAULT '',"
        " department TEXT NOT NULL DEFAULT '', category TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT 'general',"
        " value_wan REAL, rated_hours REAL, share_mode TEXT NOT NULL DEFAULT '',"
        " prep_allowance_s INTEGER, post_allowance_s INTEGER);"
        "INSERT INTO instruments (code, name) VALUES ('CZ-OLD', '旧仪器');"
    )
    db.commit()
    db.close()
    ledger = Ledger(path)
    assert ledger.instruments() == [{**ledger.instruments()[0], "code": "CZ-OLD", "metering_start_ms": None}]
    assert ledger.check() == []
    ledger.close()


def test_hostile_category_and_code_in_the_ledger_reach_no_terminal_or_formula(tmp_path: Path) -> None:
    """A category and a code written straight into the ledger (an older writer, a hand edit) with escape
    sequences and a formula: the national export's warnings name them without the escapes, and the XLSX
    keeps the formula as text."""
    import subprocess
    import sys

    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp_path / "data"}"\n')
    led = Ledger(tmp_path / "data" / "ledger.sqlite")
    bad = {"code": "CZ-\x1b]0;owned\x07X", "category": '=HYPERLINK("http://x")\x1b[2J', "kind": "general"}
    led.upsert_instruments([{"name": "x", "unit": "", "department": "", "share_mode": "", **bad}])
    led.close()
    assert category_name(str(bad["category"])) == UNKNOWN_CATEGORY
    out = tmp_path / "n.xlsx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "labmeter",
            "report",
            "national",
            "--year",
            "2026",
            "-o",
            str(out),
            "-c",
            str(tmp_path / "collector.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "is not in the shipped classification" in proc.stderr and "CZ-]0;ownedX" in proc.stderr
    cells = [
        c for ws in load_workbook(out) for row in ws.iter_rows() for c in row if isinstance(c.value, str)
    ]
    assert any(c.value.startswith("=HYPERLINK") for c in cells)
    assert all(c.data_type == "s" for c in cells)
