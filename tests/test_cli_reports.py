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


def expected(code: str, a: int, b: int) -> dict[str, float]:
    run = run_h(code, a, b)
    rated = RATED[code] * ((b - a) / 3_600_000) / YEAR_H
    external = {"CZ-G": run_h("CZ-G", max(a, t(APR1, 6)), min(b, t(APR1, 8)))}.get(code, 0.0)
    internal = {"CZ-G": run_h("CZ-G", max(a, t(MAR31, 10)), min(b, t(MAR31, 12)))}.get(code, 0.0)
    return {
        "run_h": round(run, 2),
        "effective_h": round(run, 2),
        "service_h": round(internal + external, 2),
        "external_h": round(external, 2),
        "rated_h": round(rated, 2),
        "utilisation_pct": round(100 * run / rated, 1),
    }


def check_row(got: dict[str, object], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == value, f"{got.get('key')} {key}: {got[key]} != {value}"


A, B = t(MAR31, 0), t(APR2, 0)


def test_hours_json_by_instrument_checks_every_figure_and_the_800_h_default(site: Path) -> None:
    rows = {r["key"]: r for r in json.loads(cli(site, "report", "hours", *PERIOD, "--format", "json"))}
    assert set(rows) == {"CZ-G", "CZ-S", "CZ-N"}
    for code in ("CZ-G", "CZ-S"):
        check_row(rows[code], expected(code, A, B))
    # the special instrument without rated hours of its own gets 800 h a year, prorated to two days
    assert rows["CZ-S"]["rated_h"] == round(800 * PERIOD_H / YEAR_H, 2) != rows["CZ-G"]["rated_h"]
    assert rows["CZ-G"]["sharing_pct"] == round(100 * 2 / 5, 1)
    assert rows["CZ-N"]["run_h"] == 0 and rows["CZ-N"]["coverage_pct"] == 0
    assert rows["CZ-G"]["name"] == "X射线衍射仪" and rows["CZ-S"]["unit"] == "分析测试中心"


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
        table = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
        header, body = table[0], table[1:]
        assert header[0] == first[by], header
        run_col = header.index("运行机时 (h)" if lang == "zh" else "Run hours (h)")
        got = {r[0]: float(r[run_col]) for r in body}
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
    local = {r["key"]: r for r in json.loads(cli(site, "report", "hours", *day, "--format", "json"))}
    utc = {
        r["key"]: r for r in json.loads(cli(site, "report", "hours", *day, "--format", "json", "--tz", "UTC"))
    }
    utc_a = int(datetime(2026, 3, 31, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    assert local["CZ-G"]["run_h"] == run_h("CZ-G", A, t(APR1, 0)) == 3.0
    assert utc["CZ-G"]["run_h"] == run_h("CZ-G", utc_a, utc_a + 24 * 3_600_000) == 5.0
    check_row(utc["CZ-G"], expected("CZ-G", utc_a, utc_a + 24 * 3_600_000))


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
    assert wb.sheetnames == ["按仪器", "按单位", "按类别", "按月份"]
    ws = wb["按仪器"]
    header = [c.value for c in ws[1]]
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)}
    want = expected("CZ-S", A, B)
    assert rows["CZ-S"]["运行机时 (h)"] == want["run_h"] and rows["CZ-S"]["定额机时 (h)"] == want["rated_h"]
    by_month = list(wb["按月份"].iter_rows(values_only=True))
    run_col = by_month[0].index("运行机时 (h)")
    months = {r[0]: r[run_col] for r in by_month[1:]}
    assert months["2026-03"] == run_h("CZ-G", A, t(APR1, 0))
    assert months["2026-04"] == run_h("CZ-G", t(APR1, 0), B) + run_h("CZ-S", A, B)
    en = tmp_path / "en.xlsx"
    cli(site, "report", "hours", *PERIOD, "--format", "xlsx", "--lang", "en", "-o", str(en))
    assert load_workbook(en).sheetnames == ["By instrument", "By unit", "By category", "By month"]
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
    inst = {i["instrumentCode"]: i for i in data["instruments"]}
    assert inst["CZ-G"]["runMachine"] == run_h("CZ-G", A, B)
    assert inst["CZ-S"]["runMachine"] == run_h("CZ-S", A, B)
    assert inst["CZ-G"]["serviceMachine"] == 4.0 and inst["CZ-S"]["serviceMachine"] == 0
    ext = [r for r in data["serviceRecords"] if r["serviceType"] == 130]
    assert [(r["instrumentCode"], r["startTime"], r["endTime"], r["amount"]) for r in ext] == [
        ("CZ-G", "2026-04-01 06:00", "2026-04-01 08:00", 500.0)
    ]
    # a year in UTC: the same runs, all inside 2026 in either zone
    utc = tmp_path / "national-utc.xlsx"
    cli(site, "report", "national", "--year", "2026", "--tz", "UTC", "-o", str(utc))
    wb = load_workbook(utc)
    codes = {r[0]: r for r in wb["仪器机时"].iter_rows(min_row=2, values_only=True)}
    assert codes["CZ-G"][3] == run_h("CZ-G", A, B) and wb["服务记录"].max_row == 3
    empty = tmp_path / "national-2025.json"
    cli(site, "report", "national", "--year", "2025", "-o", str(empty))
    assert all(i["runMachine"] == 0 for i in json.loads(empty.read_text())["instruments"])


def test_findings_text_and_json(site: Path) -> None:
    # CZ-G is at 5 / 7.67 h = 65% of its rated hours, CZ-S at 4 / 4.38 h = 91%
    res = json.loads(cli(site, "report", "findings", *PERIOD, "--low-use", "70", "--json"))
    assert [x["instrument"] for x in res["low_use"]] == ["CZ-G"]
    assert res["poor_coverage"] == []  # an instrument without an agent is listed under no data instead
    assert [x["instrument"] for x in res["no_data"]] == ["CZ-N"]
    text = cli(site, "report", "findings", *PERIOD, "--low-use", "95", "--tz", "UTC")
    assert "Low use (< 95% of rated hours) 低使用率: 2" in text
    assert "No data 无数据: 1" in text and "  CZ-N  无人测量的仪器  化学学院" in text


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
    utc = next(
        r
        for r in json.loads(cli(site, "report", "hours", *PERIOD, "--format", "json", "--tz", "UTC"))
        if r["key"] == "CZ-G"
    )
    for key in ("run", "effective"):
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
