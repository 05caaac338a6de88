"""Every report command as a user types it (`python -m labmeter report ...` in a subprocess), on a small ledger
whose schedule is known: signed by the real agent code, imported through the real CLI, each figure checked
against the schedule for every --by, --lang, --format, --tz and -o.

The schedule (local Asia/Shanghai, the policy's default zone; no standby, so effective = run):
- CZ-G, general, 材料学院/020101: RUNNING 03-31 10:00-13:00 and 04-01 06:00-08:00 (04-01 06:00 local is
  03-31 22:00 UTC, so the UTC day 03-31 holds both runs and the local day only the first).
- CZ-S, special, no rated hours of its own (the 800 h policy default), 分析测试中心/030201: RUNNING 04-01
  14:00-18:00.
- CZ-N: registered, no agent.
Bookings: CZ-G 03-31 10:00-12:00 internal, 04-01 06:00-08:00 external.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from openpyxl import load_workbook

from labmeter import config, signing
from labmeter.collector.ledger import Ledger
from tests.conftest import LABMETER
from tests.lab import store_schedule

TZ = ZoneInfo("Asia/Shanghai")
YEAR_H = 365 * 24
PERIOD = ["--from", "2026-03-31", "--to", "2026-04-01"]
PERIOD_H = 48


def t(day: tuple[int, int], hh: int) -> int:
    return int(datetime(2026, *day, hh, tzinfo=TZ).timestamp() * 1000)


MAR31, APR1, APR2 = (3, 31), (4, 1), (4, 2)
RUNS = {
    "CZ-G": [(t(MAR31, 10), t(MAR31, 13)), (t(APR1, 6), t(APR1, 8))],
    "CZ-S": [(t(APR1, 14), t(APR1, 18))],
}
INSTRUMENTS_CSV = (
    "仪器编号,仪器名称,管理单位,分类编码,仪器类型,原值（万元）,定额机时\n"
    "CZ-G,X射线衍射仪,材料学院,020101,通用,350,\n"
    "CZ-S,透射电镜,分析测试中心,030201,专用,900,\n"
    "CZ-N,无人测量的仪器,化学学院,020301,通用,10,\n"
)
SERVICES_CSV = (
    "仪器编号,开始时间,结束时间,申请人,申请单位,服务类型,服务方向,金额\n"
    "CZ-G,2026-03-31 10:00,2026-03-31 12:00,张三,材料学院,120,135,0\n"
    "CZ-G,2026-04-01 06:00,2026-04-01 08:00,王五,某某公司,130,136,500\n"
)


def run_h(code: str, a: int, b: int) -> float:
    """Running hours of ``code`` inside [a, b), from the schedule above."""
    return sum(max(0, min(e, b) - max(s, a)) for s, e in RUNS.get(code, [])) / 3_600_000


def spans(code: str) -> list[tuple[int, int, str]]:
    """The schedule as an agent's timeline: OFF around each run, from 03-31 00:00 to 04-02 00:00."""
    out, at = [], t(MAR31, 0)
    for s, e in RUNS[code]:
        out += [(at, s, "OFF"), (s, e, "RUNNING")]
        at = e
    return [*out, (at, t(APR2, 0), "OFF")]


RATED = {"CZ-G": 1400.0, "CZ-S": 800.0, "CZ-N": 1400.0}  # the policy's defaults: general, special


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    (tmp / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp / "data"}"\n')
    (tmp / "instruments.csv").write_text(INSTRUMENTS_CSV, encoding="utf-8")
    (tmp / "services.csv").write_text(SERVICES_CSV, encoding="utf-8")
    assert "3" in cli(tmp, "collector", "import-instruments", "instruments.csv")
    cfg = config.load(tmp / "collector.toml", config.CollectorConfig)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    try:
        for code in RUNS:
            store_schedule(tmp, ledger, f"pc-{code.lower()}", code, spans(code))
    finally:
        ledger.close()
    assert "2 service record(s) imported" in cli(tmp, "collector", "import-services", "services.csv")
    return tmp


def cli(cwd: Path, *args: str, ok: bool = True) -> str:
    proc = subprocess.run(
        [*LABMETER, *args, "-c", str(cwd / "collector.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def seconds(code: str, a: int, b: int) -> dict[str, float]:
    """The exact figures (seconds) of ``code`` in [a, b) from the schedule, the period being over."""
    run = run_h(code, a, b) * 3600
    external = {"CZ-G": run_h("CZ-G", max(a, t(APR1, 6)), min(b, t(APR1, 8)))}.get(code, 0.0) * 3600
    internal = {"CZ-G": run_h("CZ-G", max(a, t(MAR31, 10)), min(b, t(MAR31, 12)))}.get(code, 0.0) * 3600
    # docs/decisions.md "Reports count each instrument's metered part only": metered time runs from the
    # instrument's first interval (the schedule's first span) to the period end; what the schedule does
    # not cover of it is no data
    metered = known = 0.0
    if code in RUNS:
        first, last = spans(code)[0][0], spans(code)[-1][1]
        metered = max(0, b - max(a, first)) / 1000
        known = max(0, min(b, last) - max(a, first)) / 1000
    # rated hours are prorated to the metered part (docs/decisions.md "Rated hours follow the metered
    # part"); the period's time before it is not metered
    rated = RATED[code] * (metered / 3600) / YEAR_H * 3600
    return {
        "run_s": run,
        "effective_s": run,
        "service_s": internal + external,
        "internal_s": internal,
        "external_s": external,
        "rated_s": round(rated, 3),
        "standby_s": 0,
        "off_s": known - run,
        "unknown_s": 0,
        "unverified_s": 0,
        "uncovered_s": metered - known,
        "metered_s": metered,
        "not_metered_s": (b - a) / 1000 - metered,
    }


def expected(code: str, a: int, b: int) -> dict[str, float | None]:
    sec = seconds(code, a, b)
    hours = {f"{k[:-2]}_h": round(v / 3600, 2) for k, v in sec.items()}
    return {
        **hours,
        "utilisation_pct": round(100 * sec["effective_s"] / sec["rated_s"], 1) if sec["rated_s"] else None,
        "sharing_pct": round(100 * sec["external_s"] / sec["effective_s"], 1) if sec["effective_s"] else None,
        # coverage is known time over metered time (docs/decisions.md, as above): none without metering
        "coverage_pct": (
            round(100 * (1 - sec["uncovered_s"] / sec["metered_s"]), 1) if sec["metered_s"] else None
        ),
    }


def check_row(got: dict[str, object], want: dict[str, float | None]) -> None:
    for key, value in want.items():
        assert got[key] == value, f"{got.get('key')} {key}: {got[key]} != {value}"


def check_seconds(got: dict[str, object], want: dict[str, float]) -> None:
    """The exact seconds beside the hours: each the schedule's, and each hour figure its seconds / 3600."""
    sec = got["seconds"]
    assert isinstance(sec, dict)
    assert sec == want, f"{got.get('key')}: {sec} != {want}"
    for key, value in sec.items():
        assert got[f"{key[:-2]}_h"] == round(value / 3600, 2), (got.get("key"), key)


def hours_json(
    site: Path, *args: str
) -> tuple[dict[str, dict[str, object]], dict[str, object], dict[str, object]]:
    """``report hours --format json``: its rows by key, its total row and its meta."""
    data = json.loads(cli(site, "report", "hours", *args, "--format", "json"))
    assert set(data) == {"meta", "rows", "total"}, list(data)
    return {r["key"]: r for r in data["rows"]}, data["total"], data["meta"]


A, B = t(MAR31, 0), t(APR2, 0)


def test_hours_json_by_instrument_checks_every_figure_and_the_800_h_default(site: Path) -> None:
    rows, total, meta = hours_json(site, *PERIOD)
    assert set(rows) == {"CZ-G", "CZ-S", "CZ-N"}
    for code in ("CZ-G", "CZ-S", "CZ-N"):
        check_row(rows[code], expected(code, A, B))
        check_seconds(rows[code], seconds(code, A, B))
    # the special instrument without rated hours of its own gets 800 h a year, prorated to two days
    assert rows["CZ-S"]["rated_h"] == round(800 * PERIOD_H / YEAR_H, 2) != rows["CZ-G"]["rated_h"]
    assert rows["CZ-G"]["sharing_pct"] == round(100 * 2 / 5, 1)
    # CZ-N has no interval: nothing metered, so neither covered nor no data (docs/decisions.md, "Reports
    # count each instrument's metered part only"); it still owes its rated hours
    assert rows["CZ-N"]["run_h"] == 0 and rows["CZ-N"]["coverage_pct"] is None
    assert rows["CZ-N"]["metered_from"] is None and rows["CZ-N"]["uncovered_h"] == 0
    assert rows["CZ-G"]["metered_from"] == rows["CZ-S"]["metered_from"] == A
    assert rows["CZ-G"]["name"] == "X射线衍射仪" and rows["CZ-S"]["unit"] == "分析测试中心"
    # the total row: every exact figure the sum of the instruments'
    sums = {k: sum(seconds(c, A, B)[k] for c in RATED) for k in seconds("CZ-G", A, B)}
    assert total["key"] == "合计"
    assert total["seconds"] == pytest.approx(sums, abs=0.001), total["seconds"]
    assert total["run_h"] == round(sums["run_s"] / 3600, 2) and total["internal_h"] == 2.0
    # meta says which period and zone it is about, and that the whole period was counted (it is over)
    assert (meta["period"]["from_ms"], meta["period"]["to_ms"], meta["timezone"]) == (A, B, "Asia/Shanghai")
    assert meta["counted_up_to"] == "2026-04-02T00:00:00+08:00"
    assert {"run_h", "internal_h", "metered_h"} <= set(meta["columns"])


@pytest.mark.parametrize("by", ["unit", "category", "month"])
def test_hours_csv_in_every_grouping_and_language(site: Path, by: str) -> None:
    groups = {
        "unit": {"材料学院": ["CZ-G"], "分析测试中心": ["CZ-S"], "化学学院": ["CZ-N"]},
        "category": {"020101": ["CZ-G"], "030201": ["CZ-S"], "020301": ["CZ-N"]},
    }
    for lang, total, first in (
        ("zh", "合计", {"unit": "管理单位", "category": "分类编码", "month": "月份"}),
        ("en", "TOTAL", {"unit": "Unit", "category": "Category", "month": "Month"}),
    ):
        text = cli(site, "report", "hours", *PERIOD, "--by", by, "--format", "csv", "--lang", lang)
        assert text.startswith("\ufeff"), text[:20]  # for Excel on Chinese Windows (docs/decisions.md)
        bare = cli(
            site, "report", "hours", *PERIOD, "--by", by, "--format", "csv", "--lang", lang, "--no-bom"
        )
        assert bare == text[1:]
        table = list(csv.reader(io.StringIO(bare)))
        header, body = table[0], table[1:]
        assert header[0] == first[by], header
        run_col = header.index("运行机时 (h)" if lang == "zh" else "Run hours (h)")
        run_s_col = header.index("运行机时 (s)" if lang == "zh" else "Run hours (s)")
        got = {r[0]: float(r[run_col]) for r in body}
        assert {r[0]: float(r[run_s_col]) for r in body} == {k: v * 3600 for k, v in got.items()}
        service = (
            ["服务机时", "对内服务机时", "对外服务机时"]
            if lang == "zh"
            else ["Service", "Internal service", "External service"]
        )
        cols = [header.index(f"{c} (h)" if lang == "zh" else f"{c} hours (h)") for c in service]
        assert cols == sorted(cols) and cols[1] == cols[0] + 1 == cols[2] - 1, header
        assert list(got)[-1] == total
        assert got[total] == round(run_h("CZ-G", A, B) + run_h("CZ-S", A, B), 2)
        if by == "month":
            march, april = (A, t(APR1, 0)), (t(APR1, 0), B)
            assert got == {
                "2026-03": round(sum(run_h(c, *march) for c in RUNS), 2),
                "2026-04": round(sum(run_h(c, *april) for c in RUNS), 2),
                total: got[total],
            }
        else:
            assert {k: v for k, v in got.items() if k != total} == {
                key: round(sum(run_h(c, A, B) for c in codes if c in RUNS), 2)
                for key, codes in groups[by].items()
            }


def test_hours_tz_moves_the_day(site: Path) -> None:
    """The same calendar day in UTC and in Shanghai holds different running: 04-01 06:00 local is 03-31 UTC."""
    day = ["--from", "2026-03-31", "--to", "2026-03-31"]
    local, _, _ = hours_json(site, *day)
    utc, _, meta = hours_json(site, *day, "--tz", "UTC")
    assert meta["timezone"] == "UTC"
    utc_a = int(datetime(2026, 3, 31, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    utc_b = utc_a + 24 * 3_600_000
    assert local["CZ-G"]["run_h"] == run_h("CZ-G", A, t(APR1, 0)) == 3.0
    assert utc["CZ-G"]["run_h"] == run_h("CZ-G", utc_a, utc_b) == 5.0
    for code in RATED:
        check_row(local[code], expected(code, A, t(APR1, 0)))
        check_seconds(local[code], seconds(code, A, t(APR1, 0)))
        check_row(utc[code], expected(code, utc_a, utc_b))
        check_seconds(utc[code], seconds(code, utc_a, utc_b))


def test_hours_table_and_output_file(site: Path, tmp_path: Path) -> None:
    for lang, head, total in (("zh", "运行机时 (h)", "合计"), ("en", "Run hours (h)", "TOTAL")):
        out = tmp_path / f"hours-{lang}.txt"
        said = cli(site, "report", "hours", *PERIOD, "--lang", lang, "-o", str(out))
        assert said.strip() == f"written {out}"
        lines = out.read_text(encoding="utf-8").splitlines()
        assert lines[0].split("  ")[0] == ("仪器编号" if lang == "zh" else "Instrument") and head in lines[0]
        rows = {ln.split()[0]: ln.split() for ln in lines if ln and not ln.startswith("-")}
        assert float(rows["CZ-G"][1]) == run_h("CZ-G", A, B)
        assert float(rows["CZ-S"][1]) == run_h("CZ-S", A, B)
        assert float(rows[total][1]) == run_h("CZ-G", A, B) + run_h("CZ-S", A, B)
        assert rows["CZ-N"][1] == "0.00"
    stdout = cli(site, "report", "hours", *PERIOD)
    assert stdout == (tmp_path / "hours-zh.txt").read_text(encoding="utf-8")


def test_hours_xlsx_has_every_grouping(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "hours.xlsx"
    assert (
        cli(site, "report", "hours", *PERIOD, "--format", "xlsx", "-o", str(out)).strip() == f"written {out}"
    )
    wb = load_workbook(out)
    assert wb.sheetnames == ["说明", "按仪器", "按单位", "按类别", "按月份"]
    about = {r[0]: r[1] for r in wb["说明"].iter_rows(values_only=True) if r[0]}
    assert (
        about["时区 Time zone"] == "Asia/Shanghai" and "2026-03-31T00:00:00+08:00" in about["统计期间 Period"]
    )
    ws = wb["按仪器"]
    header = [c.value for c in ws[1]]
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)}
    # XLSX cells hold exact hours (docs/decisions.md): the schedule's seconds / 3600, rated hours to the ms
    for code in ("CZ-G", "CZ-S"):
        want = seconds(code, A, B)
        assert rows[code]["运行机时 (h)"] == want["run_s"] / 3600
        assert rows[code]["对内服务机时 (h)"] == want["internal_s"] / 3600
        assert rows[code]["计量时长 (h)"] == want["metered_s"] / 3600
        assert rows[code]["定额机时 (h)"] == pytest.approx(want["rated_s"] / 3600, abs=1e-9)
    by_month = list(wb["按月份"].iter_rows(values_only=True))
    run_col = by_month[0].index("运行机时 (h)")
    months = {r[0]: r[run_col] for r in by_month[1:]}
    assert months["2026-03"] == run_h("CZ-G", A, t(APR1, 0))
    assert months["2026-04"] == run_h("CZ-G", t(APR1, 0), B) + run_h("CZ-S", A, B)
    en = tmp_path / "en.xlsx"
    cli(site, "report", "hours", *PERIOD, "--format", "xlsx", "--lang", "en", "-o", str(en))
    assert load_workbook(en).sheetnames == ["About", "By instrument", "By unit", "By category", "By month"]
    proc = subprocess.run(
        [*LABMETER, "report", "hours", *PERIOD, "--format", "xlsx", "-c", str(site / "collector.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--format xlsx needs --output" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_national_json_and_xlsx(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "national.json"
    said = cli(site, "report", "national", "--year", "2026", "-o", str(out))
    assert said.strip() == f"3 instrument(s), 2 service record(s) -> {out}"
    data = json.loads(out.read_text(encoding="utf-8"))
    assert list(data) == ["format", "meta", "warnings", "instruments", "serviceRecords"], list(data)
    assert (data["instruments"]["instruType"], data["serviceRecords"]["instruType"]) == (4, 6)
    inst = {i["innerId"]: i for i in data["instruments"]["instruList"]}
    assert set(inst) == set(RATED)
    # the platform's figures to 0.1 h; the exact ones under each record's `labmeter` (docs/national.md)
    year_a = t((1, 1), 0)
    for code in RATED:
        want = seconds(code, year_a, t((12, 31), 0) + 86_400_000)
        got = inst[code]["labmeter"]
        assert (got["run_s"], got["effective_s"], got["service_s"], got["external_s"]) == (
            want["run_s"],
            want["effective_s"],
            want["service_s"],
            want["external_s"],
        ), code
        assert got["known_s"] == ((B - A) / 1000 if code in RUNS else 0), code
        assert inst[code]["runMachine"] == round(run_h(code, A, B), 1)
        assert inst[code]["serviceMachine"] == round(want["service_s"] / 3600, 1)
    assert inst["CZ-G"]["serviceMachine"] == 4.0 and inst["CZ-S"]["serviceMachine"] == 0
    records = data["serviceRecords"]["instruList"]
    ext = [r for r in records if r["serviceType"] == 130]
    assert [(r["innerId"], r["startTime"], r["endTime"], r["amounts"]) for r in ext] == [
        ("CZ-G", "2026-04-01 06", "2026-04-01 08", 500.0)
    ]
    # each record's metered service time: the run inside its booking
    for r in records:
        a, b = (int(datetime.fromisoformat(r["labmeter"][k]).timestamp() * 1000) for k in ("start", "end"))
        assert r["labmeter"]["service_s"] == run_h(r["innerId"], a, b) * 3600 == r["labmeter"]["booked_s"]
    # CZ-N's zeros are not a measurement, and the file says so
    assert any("CZ-N" in w and "no metered data" in w for w in data["warnings"]), data["warnings"]
    # a year in UTC: the same runs, all inside 2026 in either zone
    utc = tmp_path / "national-utc.xlsx"
    cli(site, "report", "national", "--year", "2026", "--tz", "UTC", "-o", str(utc))
    wb = load_workbook(utc)
    assert wb.sheetnames == ["说明", "仪器机时", "服务记录"]
    sheet = list(wb["仪器机时"].iter_rows(values_only=True))
    run_col = sheet[0].index("年总运行机时 runMachine (h, 0.1)")
    exact_col = sheet[0].index("运行机时 exact (s, labmeter)")
    codes = {r[0]: r for r in sheet[1:]}
    for code in RATED:
        assert codes[code][run_col] == round(run_h(code, A, B), 1)
        assert codes[code][exact_col] == run_h(code, A, B) * 3600
    assert wb["服务记录"].max_row == 3
    empty = tmp_path / "national-2025.json"
    cli(site, "report", "national", "--year", "2025", "-o", str(empty))
    past = json.loads(empty.read_text())
    assert all(i["runMachine"] == 0 for i in past["instruments"]["instruList"])
    assert past["serviceRecords"]["instruList"] == []


def test_findings_text_and_json(site: Path) -> None:
    # CZ-G is at 5 / 7.67 h = 65% of its rated hours, CZ-S at 4 / 4.38 h = 91%
    res = json.loads(cli(site, "report", "findings", *PERIOD, "--low-use", "70", "--json"))
    assert [x["instrument"] for x in res["low_use"]] == ["CZ-G"]
    assert res["poor_coverage"] == []  # an instrument without an agent is listed under no data instead
    assert [x["instrument"] for x in res["no_data"]] == ["CZ-N"]
    text = cli(site, "report", "findings", *PERIOD, "--low-use", "95", "--tz", "UTC")
    assert "Low use (< 95% of rated hours) 低使用率: 2" in text
    assert "No data 无数据: 1" in text and "  CZ-N  无人测量的仪器  化学学院" in text
    # in UTC the period runs 8 h past the last interval (04-02 00:00 local), inside the metered part
    utc_a, utc_b = (int(datetime(2026, *d, tzinfo=ZoneInfo("UTC")).timestamp() * 1000) for d in (MAR31, APR2))
    for code in RUNS:
        want = expected(code, utc_a, utc_b)
        line = f"coverage_pct {want['coverage_pct']}, unknown_h 0.0, no_data_h {want['uncovered_h']}"
        assert f"  {code}  " in text and line in text, text
    assert "Poor coverage (< 90% known) 数据覆盖不足: 2" in text


def test_evidence_bundle_verifies_and_claims_the_report_hours(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    said = cli(site, "report", "evidence", "--instrument", "CZ-G", *PERIOD, "--tz", "UTC", "-o", str(out))
    fp = signing.key_id(signing.load_private_key(site / "data" / "collector.key").public_key())
    assert f"countersigned by collector key {fp}" in said
    keys = tmp_path / "keys.json"
    cli(site, "collector", "export-keys", "-o", str(keys))
    ok = subprocess.run(
        [*LABMETER, "verify", str(out), "--trust", str(keys)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and "OK:" in ok.stdout, ok.stdout + ok.stderr
    utc = hours_json(site, *PERIOD, "--tz", "UTC")[0]["CZ-G"]
    assert "(format 3)" in ok.stdout and "services    2 service record(s)" in ok.stdout, ok.stdout
    services = [json.loads(x) for x in (out / "services.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["service_type"], r["amount"]) for r in services] == [(120, 0.0), (130, 500.0)]
    assert "张三" not in (out / "services.jsonl").read_text(encoding="utf-8")  # the applicant stays out
    # the UTC period runs 8 h past the last interval (04-02 00:00 local): that part is no data, in both
    utc_a, utc_b = (int(datetime(2026, *d, tzinfo=ZoneInfo("UTC")).timestamp() * 1000) for d in (MAR31, APR2))
    check_row(utc, expected("CZ-G", utc_a, utc_b))
    assert utc["uncovered_h"] == 8.0
    for key in ("run", "effective", "service", "external", "uncovered"):
        hours = utc[f"{key}_h"]
        assert f"{key:>11}: claimed {hours:10.3f} h, recomputed {hours:10.3f} h" in ok.stdout, ok.stdout
    none = subprocess.run(
        [
            *LABMETER,
            "report",
            "evidence",
            "--instrument",
            "CZ-N",
            *PERIOD,
            "-o",
            str(tmp_path / "n"),
            "-c",
            str(site / "collector.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert none.returncode == 1 and "no intervals for instrument 'CZ-N'" in none.stderr


def test_output_suffix_picks_the_format_and_a_contradiction_is_refused(site: Path, tmp_path: Path) -> None:
    """`-o hours.csv` writes CSV (with the BOM Excel needs), never a terminal table in a .csv file; a
    --format that the file name contradicts, or a suffix that names no format, is refused and writes nothing."""
    out = tmp_path / "hours.csv"
    cli(site, "report", "hours", *PERIOD, "-o", str(out))
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    header, *body = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    run = header.index("运行机时 (h)")
    assert {r[0]: float(r[run]) for r in body}["CZ-G"] == run_h("CZ-G", A, B)
    for args, said in (
        (["--format", "json", "-o", str(tmp_path / "x.csv")], "the file name says csv, but --format is json"),
        (["-o", str(tmp_path / "x.dat")], ".dat names no format of report hours"),
        (["--format", "xlsx"], "--format xlsx needs --output FILE.xlsx"),
    ):
        res = subprocess.run(
            [*LABMETER, "report", "hours", *PERIOD, *args, "-c", str(site / "collector.toml")],
            cwd=site,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2 and said in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.dat").exists()
