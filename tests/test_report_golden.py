"""A week computed by hand: two instruments, bookings across midnight and hour boundaries, an agent outage,
external bookings, a duplicate and an overlapping booking. Every column is checked, in every grouping,
and in the XLSX read back cell by cell."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from openpyxl import load_workbook

from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import import_instruments, import_services
from labmeter.collector.reports.hours import hours_report, hours_reports, parse_time, render, write_xlsx
from labmeter.config import PolicyConfig
from tests.lab import store_schedule

TZ = ZoneInfo("Asia/Shanghai")
POLICY = PolicyConfig(prep_allowance_s=900, post_allowance_s=600)
H = 3_600_000


def t(day: int, hh: int, mm: int = 0) -> int:
    """Local time on 2026-03-<day>."""
    return int(datetime(2026, 3, day, hh, mm, tzinfo=TZ).timestamp() * 1000)


WEEK = (t(2, 0), t(9, 0))


def timeline(events: list[tuple[int, str]], end: int) -> list[tuple[int, int, str]]:
    return [(s, e, st) for (s, st), (e, _) in zip(events, [*events[1:], (end, "")], strict=True)]


A = timeline(
    [
        (t(2, 0), "OFF"),
        (t(2, 8), "STANDBY"),
        (t(2, 9), "RUNNING"),
        (t(2, 12), "STANDBY"),
        (t(2, 13), "OFF"),
        (t(4, 22), "RUNNING"),
        (t(5, 2), "STANDBY"),
        (t(5, 2, 30), "OFF"),
        (t(6, 10), "UNKNOWN"),
        (t(6, 14), "OFF"),  # the agent was down for four hours
    ],
    WEEK[1],
)
B_EVENTS: list[tuple[int, str]] = []
for d in range(2, 7):
    B_EVENTS += [
        (t(d, 0) if d == 2 else t(d, 0, 0), "OFF"),
        (t(d, 13, 30), "STANDBY"),
        (t(d, 14), "RUNNING"),
        (t(d, 16), "STANDBY"),
        (t(d, 17), "OFF"),
    ]
B = timeline([e for i, e in enumerate(B_EVENTS) if i == 0 or e[1] != B_EVENTS[i - 1][1]], WEEK[1])

INSTRUMENTS_CSV = (
    "仪器编号,仪器名称,管理单位,分类编码,仪器类型,原值（万元）,定额机时\n"
    "CZ-A,X射线衍射仪,材料学院,020101,通用,350,\n"
    "CZ-B,扫描电镜,分析测试中心,030201,专用,680,1000\n"
)
SERVICES_CSV = (
    "仪器编号,开始时间,结束时间,申请人,申请单位,服务类型,服务方向,金额\n"
    "CZ-A,2026-03-02 08:30,2026-03-02 10:30,张三,材料学院,120,135,0\n"
    "CZ-A,2026-03-02 10:00,2026-03-02 11:00,李四,材料学院,120,137,0\n"  # overlaps the first: counted once
    "CZ-A,2026-03-04 21:30,2026-03-05 01:30,王五,某某公司,130,136,1200\n"  # external, across midnight
    "CZ-A,2026-03-04 21:30,2026-03-05 01:30,王五,某某公司,130,136,1200\n"  # duplicate: skipped
    "CZ-B,2026-03-03 13:45,2026-03-03 15:15,赵六,外校,对外,科研,800\n"  # external, across the hour
    "CZ-B,2026-03-05 15:30,2026-03-05 16:30,钱七,化学学院,对内,教学,0\n"
)

RATED_A = 1400 * 7 / 365
RATED_B = 1000 * 7 / 365
EFF_A = 7 + 15 / 60 + 10 / 60 + 10 / 60
EFF_B = 5 * (2 + 15 / 60 + 10 / 60)
EXPECTED = {
    "CZ-A": {
        "run_h": 7.0,
        "effective_h": EFF_A,
        "service_h": 1.75 + 0.5 + 3.5,
        "external_h": 3.5,
        "rated_h": RATED_A,
        "utilisation_pct": 100 * EFF_A / RATED_A,
        "sharing_pct": 100 * 3.5 / EFF_A,
        "coverage_pct": 100 * 164 / 168,
        "standby_h": 2.5,
        "off_h": 154.5,
        "unknown_h": 4.0,
        "unverified_h": 0.0,
        "uncovered_h": 0.0,
    },
    "CZ-B": {
        "run_h": 10.0,
        "effective_h": EFF_B,
        "service_h": 1.5 + 0.5 + 10 / 60,
        "external_h": 1.5,
        "rated_h": RATED_B,
        "utilisation_pct": 100 * EFF_B / RATED_B,
        "sharing_pct": 100 * 1.5 / EFF_B,
        "coverage_pct": 100.0,
        "standby_h": 7.5,
        "off_h": 150.5,
        "unknown_h": 0.0,
        "unverified_h": 0.0,
        "uncovered_h": 0.0,
    },
}


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path / "ledger.sqlite")
    (tmp_path / "instruments.csv").write_text(INSTRUMENTS_CSV, encoding="utf-8")
    (tmp_path / "services.csv").write_text(SERVICES_CSV, encoding="utf-8")
    assert import_instruments(led, tmp_path / "instruments.csv") == 2
    store_schedule(tmp_path, led, "pc-a", "CZ-A", A)
    store_schedule(tmp_path, led, "pc-b", "CZ-B", B)
    res = import_services(led, tmp_path / "services.csv", TZ)
    assert (res.added, res.duplicates) == (5, 1)
    return led


def check(values: dict[str, object], expected: dict[str, float]) -> None:
    for key, want in expected.items():
        digits = 1 if key.endswith("_pct") else 2
        assert values[key] == round(want, digits), (
            f"{values['key']} {key}: {values[key]} != {round(want, digits)}"
        )


def test_every_column_by_instrument(ledger: Ledger) -> None:
    rows = hours_report(ledger, *WEEK, POLICY, "instrument", TZ)
    got = {r.key: r.values() for r in rows}
    check(got["CZ-A"], EXPECTED["CZ-A"])
    check(got["CZ-B"], EXPECTED["CZ-B"])
    assert got["CZ-A"]["name"] == "X射线衍射仪" and got["CZ-B"]["unit"] == "分析测试中心"
    total = got["TOTAL"]
    eff = EFF_A + EFF_B
    check(
        total,
        {
            "run_h": 17.0,
            "effective_h": eff,
            "service_h": 5.75 + 2 + 10 / 60,
            "external_h": 5.0,
            "rated_h": RATED_A + RATED_B,
            "utilisation_pct": 100 * eff / (RATED_A + RATED_B),
            "sharing_pct": 100 * 5 / eff,
            "unknown_h": 4.0,
        },
    )


def test_groupings(ledger: Ledger) -> None:
    by_unit = {r.key: r.values() for r in hours_report(ledger, *WEEK, POLICY, "unit", TZ)}
    assert set(by_unit) == {"材料学院", "分析测试中心", "TOTAL"}
    check(by_unit["材料学院"], EXPECTED["CZ-A"])
    by_cat = {r.key: r.values() for r in hours_report(ledger, *WEEK, POLICY, "category", TZ)}
    check(by_cat["030201"], EXPECTED["CZ-B"])
    by_month = hours_report(ledger, *WEEK, POLICY, "month", TZ)
    assert [r.key for r in by_month] == ["2026-03", "TOTAL"]
    assert by_month[0].values()["run_h"] == 17.0 and by_month[0].values()["instruments"] == 2


def test_days_are_local(ledger: Ledger) -> None:
    # 2026-03-05 local holds 02:00 of running (00:00-02:00) and the 10-min post allowance
    a, b = parse_time("2026-03-05", TZ), parse_time("2026-03-05", TZ, end=True)
    got = {r.key: r.values() for r in hours_report(ledger, a, b, POLICY, "instrument", TZ)}
    assert got["CZ-A"]["run_h"] == 2.0
    assert got["CZ-A"]["external_h"] == 1.5  # the external booking ends at 01:30


def test_xlsx_cell_by_cell(ledger: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "report.xlsx"
    sheets = hours_reports(ledger, *WEEK, POLICY, ("instrument", "unit", "category", "month"), TZ)
    write_xlsx(out, sheets, "zh")
    wb = load_workbook(out)
    assert wb.sheetnames == ["按仪器", "按单位", "按类别", "按月份"]
    ws = wb["按仪器"]
    header = [c.value for c in ws[1]]
    assert header[:9] == [
        "仪器编号",
        "仪器名称",
        "管理单位",
        "运行机时 (h)",
        "有效机时 (h)",
        "服务机时 (h)",
        "对内服务机时 (h)",
        "对外服务机时 (h)",
        "定额机时 (h)",
    ]
    assert "机时利用率 (%)" in header and "共享率 (%)" in header
    assert ws.freeze_panes == "B2"
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)}
    assert list(rows) == ["CZ-A", "CZ-B", "合计"]
    a = rows["CZ-A"]
    assert a["运行机时 (h)"] == 7.0
    assert a["有效机时 (h)"] == pytest.approx(EFF_A, abs=1e-9)  # exact hours, shown to 0.01 h
    assert a["服务机时 (h)"] == 5.75
    assert a["对内服务机时 (h)"] == 5.75 - 3.5
    assert a["对外服务机时 (h)"] == 3.5
    assert a["定额机时 (h)"] == pytest.approx(RATED_A, abs=1e-6)
    assert a["机时利用率 (%)"] == round(100 * EFF_A / RATED_A, 1)
    assert a["共享率 (%)"] == round(100 * 3.5 / EFF_A, 1)
    assert a["状态未知 (h)"] == 4.0
    assert rows["合计"]["运行机时 (h)"] == 17.0
    assert ws.cell(ws.max_row, 1).font.bold
    assert ws.cell(2, header.index("有效机时 (h)") + 1).number_format == "0.00"
    en = tmp_path / "en.xlsx"
    write_xlsx(en, {"instrument": sheets["instrument"]}, "en")
    ws_en = load_workbook(en)["By instrument"]
    assert ws_en.cell(1, 4).value == "Run hours (h)" and ws_en.cell(ws_en.max_row, 1).value == "TOTAL"


def test_csv_has_chinese_headers_by_default(ledger: Ledger) -> None:
    text = render(hours_report(ledger, *WEEK, POLICY, "instrument", TZ), "csv", "zh", "instrument")
    lines = text.splitlines()
    assert lines[0].startswith("仪器编号,仪器名称,管理单位,运行机时 (h),有效机时 (h)")
    assert lines[1].startswith("CZ-A,X射线衍射仪,材料学院,7.0,")
    assert lines[-1].startswith("合计,")


def test_national_export_and_findings(ledger: Ledger, tmp_path: Path) -> None:
    from labmeter.collector.reports.national import findings, national_export, write_national

    (tmp_path / "more.csv").write_text("code,name\nCZ-C,无人测量的仪器\n")
    import_instruments(ledger, tmp_path / "more.csv")
    data = national_export(ledger, 2026, POLICY, TZ, "10001", now_ms=WEEK[1])
    inst = {i["innerId"]: i for i in data["instruments"]["instruList"]}
    assert inst["CZ-A"]["runMachine"] == 7.0 and inst["CZ-A"]["serviceMachine"] == 5.8  # 5.75 h to 0.1 h
    assert inst["CZ-A"]["labmeter"]["service_s"] == 5.75 * 3600  # beside it, exact
    assert inst["CZ-B"]["serviceMachine"] == round(2 + 10 / 60, 1)
    assert (
        inst["CZ-B"]["type"] == "专用" and inst["CZ-B"]["worth"] == 680 and inst["CZ-B"]["insCode"] == "10001"
    )
    ext = [r for r in data["serviceRecords"]["instruList"] if r["serviceType"] == 130]
    assert {k: v for k, v in ext[0].items() if k not in ("recordInnerId", "labmeter")} == {
        "innerId": "CZ-A",
        "startTime": "2026-03-04 21",
        "endTime": "2026-03-05 02",
        "serviceType": 130,
        "serviceDirection": 136,
        "serviceWay": "",
        "applicant": "王五",
        "applicantUnit": "某某公司",
        "amounts": 1200.0,
        "serviceContent": "",
    }
    exact = ext[0]["labmeter"]
    assert exact["start"] == "2026-03-04T21:30:00+08:00" and exact["end"] == "2026-03-05T01:30:00+08:00"
    assert exact["booked_s"] == 4 * 3600 and exact["service_s"] == 3.5 * 3600  # metered: it ran from 22:00
    write_national(data, tmp_path / "n.xlsx")
    from openpyxl import load_workbook

    wb = load_workbook(tmp_path / "n.xlsx")
    assert wb.sheetnames == ["说明", "仪器机时", "服务记录"]
    header = [c.value for c in wb["仪器机时"][1]]
    assert wb["仪器机时"].cell(2, header.index("年总运行机时 runMachine (h, 0.1)") + 1).value == 7.0
    assert wb["服务记录"].max_row == 6

    res = findings(ledger, *WEEK, POLICY, low_use_pct=50, min_coverage_pct=99, now_ms=WEEK[1])
    assert [x["instrument"] for x in res["low_use"]] == ["CZ-A"]  # 28% of rated; CZ-B is at 63%
    assert [x["instrument"] for x in res["poor_coverage"]] == ["CZ-A"]  # four hours unknown
    assert res["no_data"] == [
        {"instrument": "CZ-C", "name": "无人测量的仪器", "unit": "", "reason": "no agent enrolled"}
    ]


def test_allowances_per_instrument(ledger: Ledger, tmp_path: Path) -> None:
    """CZ-B gets its own allowances (prep 30 min, post 0): each day's 30 min of standby before the run
    counts whole and none after it; CZ-A keeps the policy's."""
    (tmp_path / "allow.csv").write_text(
        "仪器编号,仪器名称,管理单位,分类编码,仪器类型,原值（万元）,定额机时,准备时间（秒）,后处理时间（秒）\n"
        "CZ-B,扫描电镜,分析测试中心,030201,专用,680,1000,1800,0\n"
    )
    import_instruments(ledger, tmp_path / "allow.csv")
    got = {r.key: r.values() for r in hours_report(ledger, *WEEK, POLICY, "instrument", TZ)}
    assert got["CZ-B"]["effective_h"] == round(5 * (2 + 0.5), 2)
    check(got["CZ-A"], {"effective_h": EFF_A})


def shown_width(value: object) -> int:
    """Columns a cell's text takes as shown (hours to 0.01 h; CJK characters are two wide)."""
    text = f"{value:.2f}" if isinstance(value, float) else "" if value is None else str(value)
    return sum(2 if ord(ch) > 0x2E7F else 1 for ch in text)


def test_about_sheet_and_every_column_read_back(ledger: Ledger, tmp_path: Path) -> None:
    """The XLSX explains itself: an About (说明) sheet with period, zone, allowances, rated-hours basis,
    generation time, version and ledger, a definition for every column of every sheet, and every column
    of the instrument sheet holds what the report computed."""
    from labmeter import __version__
    from labmeter.collector.reports.hours import DEFINITIONS, columns_for, report_meta

    groupings = ("instrument", "unit", "category", "month")
    meta = report_meta(ledger, *WEEK, POLICY, TZ, groupings, now_ms=WEEK[1] + H)
    sheets = hours_reports(ledger, *WEEK, POLICY, groupings, TZ, now_ms=WEEK[1] + H)
    out = tmp_path / "report.xlsx"
    write_xlsx(out, sheets, "zh", meta, TZ)
    wb = load_workbook(out)
    assert wb.sheetnames == ["说明", "按仪器", "按单位", "按类别", "按月份"]
    about = {r[0]: r[1:] for r in wb["说明"].iter_rows(values_only=True) if r[0]}
    assert about["统计期间 Period"][0].startswith("2026-03-02T00:00:00+08:00 – 2026-03-09T00:00:00+08:00")
    assert about["时区 Time zone"][0] == "Asia/Shanghai"
    assert about["准备时间 Prep allowance (s)"][0] == 900 and about["后处理时间 Post allowance (s)"][0] == 600
    assert about["通用仪器年定额机时 Rated hours, general (h/year)"][0] == 1400
    assert about["专用仪器年定额机时 Rated hours, special (h/year)"][0] == 800
    assert about["生成时间 Generated at"][0] == "2026-03-09T01:00:00+08:00"
    assert about["labmeter 版本 Version"][0] == __version__
    assert about["账本 Ledger"][0] == ledger.name
    caveats = " ".join(str(v[0]) for k, v in about.items() if str(k).startswith("说明 Caveat"))
    assert "metered part" in caveats and "still to come" in caveats
    defined = {str(k).split(" / ")[0]: v for k, v in about.items()}
    for by in groupings:
        ws = wb[{"instrument": "按仪器", "unit": "按单位", "category": "按类别", "month": "按月份"}[by]]
        header = [c.value for c in ws[1]]
        assert header == [zh for _, _, zh in columns_for(by, registry=True)]
        for name in header:
            assert name in defined, f"column {name!r} of {ws.title} is not defined on the About sheet"
        assert ws.auto_filter.ref is not None and ws.auto_filter.ref.startswith("A1:")
        for i, name in enumerate(header, start=1):
            widest = max(shown_width(c.value) for (c,) in ws.iter_rows(min_col=i, max_col=i))
            assert ws.column_dimensions[ws.cell(1, i).column_letter].width >= min(60, widest), name
    ws = wb["按仪器"]
    header = [c.value for c in ws[1]]
    keys = [k for k, _, _ in columns_for("instrument", registry=True)]
    assert set(keys) <= set(DEFINITIONS)
    cells = {r[0]: dict(zip(keys, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)}
    for row in sheets["instrument"][:-1]:
        want = row.values(exact=True)
        got = cells[row.key]
        for k in keys:
            if k == "metered_from":
                assert got[k] == datetime.fromtimestamp(want[k] / 1000, TZ).isoformat(timespec="seconds")
            elif isinstance(want[k], float):
                assert got[k] == pytest.approx(want[k], abs=1e-9), (row.key, k)
            else:
                assert got[k] == (want[k] if want[k] not in ("",) else None), (row.key, k)
    assert cells["CZ-A"]["category_name"] == "物理性能测试仪器 / 力学性能测试仪器"  # 020101
    assert cells["CZ-B"]["kind"] == "专用" and cells["CZ-B"]["value_wan"] == 680
    assert cells["CZ-A"]["metered_from"] == "2026-03-02T00:00:00+08:00"
    by_cat = {r[0]: r[1] for r in wb["按类别"].iter_rows(min_row=2, values_only=True)}
    assert by_cat["030201"] == "计量仪器 / 热学计量仪器"


def test_json_seconds_equal_the_evidence_bundles_recomputed_totals(ledger: Ledger, tmp_path: Path) -> None:
    """What a report claims to the second is what `labmeter verify` recomputes from the signed intervals."""
    import json

    from labmeter import signing
    from labmeter.collector.reports.evidence import write_bundle
    from labmeter.collector.reports.hours import report_meta
    from labmeter.verify import verify_bundle

    meta = report_meta(ledger, *WEEK, POLICY, TZ, ["instrument"], now_ms=WEEK[1])
    rows = hours_report(ledger, *WEEK, POLICY, "instrument", TZ, now_ms=WEEK[1])
    doc = json.loads(render(rows, "json", "zh", "instrument", meta))
    assert doc["meta"]["period"]["from_ms"] == WEEK[0] and doc["meta"]["timezone"] == "Asia/Shanghai"
    assert set(doc["meta"]["columns"]) >= {k for k in doc["rows"][0] if k != "seconds"}
    key = signing.PrivateKey.generate()
    for item in doc["rows"]:
        out = tmp_path / f"bundle-{item['key']}"
        write_bundle(ledger, item["key"], *WEEK, 900, 600, out, key)
        res = verify_bundle(out)
        assert res.ok, res.findings
        s = item["seconds"]
        for name in (
            "run",
            "effective",
            "service",
            "external",
            "standby",
            "off",
            "unknown",
            "unverified",
            "uncovered",
        ):
            assert round(s[f"{name}_s"] * 1000) == res.recomputed[f"{name}_ms"], (item["key"], name)


def test_instrument_installed_mid_period_is_fully_covered_in_its_metered_part(
    ledger: Ledger, tmp_path: Path
) -> None:
    (tmp_path / "new.csv").write_text("code,name,kind\nCZ-M,新装仪器,general\n")
    import_instruments(ledger, tmp_path / "new.csv")
    installed = t(5, 12)
    store_schedule(
        tmp_path,
        ledger,
        "pc-m",
        "CZ-M",
        [(installed, t(6, 9), "OFF"), (t(6, 9), t(6, 11), "RUNNING"), (t(6, 11), WEEK[1], "OFF")],
    )
    got = {r.key: r for r in hours_report(ledger, *WEEK, POLICY, "instrument", TZ, now_ms=WEEK[1])}
    m = got["CZ-M"].values()
    assert m["coverage_pct"] == 100.0 and m["uncovered_h"] == 0.0
    assert got["CZ-M"].hours.period_ms == WEEK[1] - installed
    assert m["metered_h"] == round((WEEK[1] - installed) / H, 2) and m["metered_from"] == installed
    # rated for the metered part only: 5 March 12:00 to 9 March 00:00 is 3.5 days of a 365-day year
    assert m["rated_h"] == round(1400 * 3.5 / 365, 2) == 13.42
    assert m["not_metered_h"] == 3.5 * 24 and m["uncovered_h"] == 0.0
    res = __import__("labmeter.collector.reports.national", fromlist=["findings"]).findings(
        ledger, *WEEK, POLICY, low_use_pct=0, min_coverage_pct=99, now_ms=WEEK[1]
    )
    assert "CZ-M" not in [x["instrument"] for x in res["poor_coverage"]]


def test_time_still_to_come_counts_as_nothing(ledger: Ledger) -> None:
    """A month's report a week in: no data only where an agent was down, coverage of the elapsed part."""
    month = (t(2, 0), t(30, 0))
    week = {r.key: r.values() for r in hours_report(ledger, *WEEK, POLICY, "instrument", TZ, now_ms=WEEK[1])}
    part = {r.key: r.values() for r in hours_report(ledger, *month, POLICY, "instrument", TZ, now_ms=WEEK[1])}
    for code in ("CZ-A", "CZ-B"):
        assert part[code]["uncovered_h"] == 0.0
        assert part[code]["coverage_pct"] == week[code]["coverage_pct"]
        assert part[code]["rated_h"] == week[code]["rated_h"]
        assert part[code]["metered_h"] == 168.0
    from labmeter.collector.reports.national import findings

    res = findings(ledger, *month, POLICY, low_use_pct=0, min_coverage_pct=90, now_ms=WEEK[1])
    assert res["poor_coverage"] == []  # CZ-A's 4 h unknown of 168 h elapsed is 97.6 % known


def test_intervals_past_now_still_count_as_metered(ledger: Ledger) -> None:
    """An agent whose clock runs ahead (or a simulated clock): coverage stays at most 100 %."""
    rows = {r.key: r.values() for r in hours_report(ledger, *WEEK, POLICY, "instrument", TZ, now_ms=t(4, 0))}
    assert rows["CZ-B"]["coverage_pct"] == 100.0 and rows["CZ-B"]["uncovered_h"] == 0.0
    assert rows["CZ-B"]["metered_h"] == 168.0
