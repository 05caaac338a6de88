"""`labmeter report reconcile` as a user types it (a subprocess), on the reconciliation week
(tests/support/reconcile_week.py) with hostile applicants: every format and language agrees with the
library's figures (which tests/test_reconcile.py checks by hand), formula-like text stays text in CSV and
XLSX, and bad input ends in one clear line naming what is wrong."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from openpyxl import load_workbook

from labmeter import config
from labmeter.cli import app
from labmeter.collector.ledger import Ledger
from labmeter.collector.reports.reconcile import KINDS, THRESHOLDS, reconcile
from tests.conftest import LABMETER
from tests.support.reconcile_week import TZ, WEEK, build, t

PERIOD = ["--from", "2026-03-02", "--to", "2026-03-08"]
HOSTILE = {
    "R2": '=HYPERLINK("http://evil.example/","click")',
    "R9": "@SUM(1+1)*cmd|' /C calc'!A0",
    "R5": "+1-1",
    "R1": "-2+3",
}
CONTROL = {"R3": "\x1b[2J王五\r\nx"}  # a terminal escape and a line break in a name


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    tmp = tmp_path_factory.mktemp("reconcile-site")
    (tmp / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp / "data"}"\n')
    cfg = config.load(tmp / "collector.toml", config.CollectorConfig)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    try:
        ids = build(tmp, ledger, HOSTILE | CONTROL)
    finally:
        ledger.close()
    return tmp, ids


def run(cwd: Path, *args: str, cfg: str = "collector.toml") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*LABMETER, "report", "reconcile", *args, "-c", str(cwd / cfg)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ok(cwd: Path, *args: str) -> str:
    proc = run(cwd, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def library(cwd: Path, **kw: object) -> object:
    cfg = config.load(cwd / "collector.toml", config.CollectorConfig)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    try:
        return reconcile(ledger, *WEEK, cfg.policy, TZ, **kw)  # type: ignore[arg-type]
    finally:
        ledger.close()


def test_json_carries_exact_seconds_meta_and_every_part(site: tuple[Path, dict[str, int]]) -> None:
    cwd, ids = site
    data = json.loads(ok(cwd, *PERIOD, "--format", "json"))
    assert list(data) == ["meta", "records", "findings", "summary"]
    rec = library(cwd)
    meta = data["meta"]
    assert (meta["period"]["from_ms"], meta["period"]["to_ms"], meta["timezone"]) == (*WEEK, "Asia/Shanghai")
    assert meta["thresholds"] == {k: getattr(config.PolicyConfig(), k) for k in THRESHOLDS}
    assert set(meta["findings"]) == set(KINDS) and all(
        f["definition"] and f["定义"] for f in meta["findings"].values()
    )
    records = {r["id"]: r for r in data["records"]}
    for r in rec.records:  # type: ignore[attr-defined]
        got, want = records[r.booking.id], r.values()
        for key in ("booked", "run", "effective", "known"):
            assert got[f"{key}_s"] * 1000 == want[key], key
            assert got[f"{key}_h"] == round(want[key] / 3_600_000, 2)
        assert got["used_pct"] == want["used_pct"] and got["findings"] == want["findings"]
    r4 = records[ids["R4"]]
    assert (r4["run_s"], r4["effective_s"], r4["used_pct"]) == (90 * 60, 100 * 60, round(100 * 100 / 120, 1))
    assert r4["first_run"] == "2026-03-03T15:00:00+08:00" and r4["last_run_ms"] == t(3, 16, 30)
    assert records[ids["R3"]]["findings"] == ["overlap"] and records[ids["R6"]]["used_pct"] is None
    assert records[ids["R2"]]["applicant"] == HOSTILE["R2"]  # JSON keeps the text as it is
    assert [(f["code"], f["time_s"]) for f in data["findings"]] == [
        (f.code, f.time_ms // 1000)
        for f in rec.findings  # type: ignore[attr-defined]
    ]
    assert {f["kind"] for f in data["findings"]} == {zh for _, zh, *_ in KINDS.values()}
    summary = {s["instrument"]: s for s in data["summary"]}
    assert summary["CZ-A"]["booked_s"] == 13.5 * 3600 and summary["CZ-A"]["unused"] == 2
    only = json.loads(ok(cwd, *PERIOD, "--format", "json", "--part", "summary", "--instrument", "CZ-B"))
    assert list(only) == ["meta", "summary"] and [s["instrument"] for s in only["summary"]] == ["CZ-B"]


def test_csv_each_part_with_bom_and_formula_safe(site: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    cwd, ids = site
    text = ok(cwd, *PERIOD, "--format", "csv", "--part", "records")
    assert text.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(text[1:])))
    header = rows[0]
    assert header[:3] == ["记录编号", "仪器编号", "仪器名称"] and "运行机时 (s)" in header
    by_id = {int(r[0]): dict(zip(header, r, strict=True)) for r in rows[1:]}
    for name, hostile in HOSTILE.items():
        assert by_id[ids[name]]["申请人"] == "'" + hostile  # a formula to no spreadsheet
    assert by_id[ids["R2"]]["发现"] == "预约未使用" and by_id[ids["R7"]]["预约使用率 (%)"] == ""
    assert float(by_id[ids["R1"]]["有效机时 (h)"]) == round(145 / 60, 2)
    assert float(by_id[ids["R1"]]["有效机时 (s)"]) == 145 * 60
    out = tmp_path / "findings.csv"
    said = ok(
        cwd, *PERIOD, "--format", "csv", "--part", "findings", "--lang", "en", "--no-bom", "-o", str(out)
    )
    assert said.strip() == f"written {out}"
    body = out.read_text(encoding="utf-8")
    assert not body.startswith("\ufeff")
    found = list(csv.DictReader(io.StringIO(body)))
    assert [r["Code"] for r in found] == [f.code for f in library(cwd).findings]  # type: ignore[attr-defined]
    days = [(r["Day"], float(r["Time (s)"])) for r in found if r["Code"] == "unattributed"]
    assert days == [("2026-03-04", 3 * 3600), ("2026-03-05", 1.5 * 3600)]
    assert {r["Finding"] for r in found} == {en for en, *_ in KINDS.values()}
    summary = list(
        csv.DictReader(io.StringIO(ok(cwd, *PERIOD, "--format", "csv", "--part", "summary", "--no-bom")))
    )
    assert [s["仪器编号"] for s in summary] == ["CZ-A", "CZ-B"]
    assert float(summary[0]["无归属运行 (s)"]) == (180 + 60 + 30 + 5) * 60


def test_tz_moves_the_days(site: tuple[Path, dict[str, int]]) -> None:
    """In UTC the run 03-04 21:00 to 03-05 01:00 (Shanghai) is 13:00-17:00 on one day, 03-04."""
    cwd, _ = site
    data = json.loads(ok(cwd, *PERIOD, "--format", "json", "--part", "findings", "--tz", "UTC"))
    assert data["meta"]["timezone"] == "UTC"
    days = [(f["day"], f["time_s"]) for f in data["findings"] if f["code"] == "unattributed"]
    assert days[0] == ("2026-03-04", 4 * 3600)


def test_table_in_both_languages(site: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    cwd, _ = site
    zh = ok(cwd, *PERIOD)
    assert "服务记录核对 (9)" in zh and "发现 (10)" in zh and "按仪器汇总 (2)" in zh
    assert "预约未使用" in zh and "无计量数据无法核对" in zh and "长时间空载" in zh
    # control characters from the lab's sheet neither reach the terminal nor break a row
    assert "\x1b" not in zh and "\r" not in zh and "[2J王五x" in zh
    assert all("[2J王五x" in line for line in zh.splitlines() if "王五" in line)
    out = tmp_path / "r.txt"
    ok(cwd, *PERIOD, "--lang", "en", "-o", str(out))
    en = out.read_text(encoding="utf-8")
    assert "Records (9)" in en and "Findings (10)" in en and "By instrument (2)" in en
    assert "Running without booking or sign-in" in en and "Overlapping bookings" in en


def test_xlsx_about_sheet_and_text_cells(site: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    cwd, ids = site
    out = tmp_path / "reconcile.xlsx"
    assert ok(cwd, *PERIOD, "--format", "xlsx", "-o", str(out)).strip() == f"written {out}"
    wb = load_workbook(out)
    assert wb.sheetnames == ["说明", "服务记录核对", "发现", "按仪器汇总"]
    about = {r[0]: r[1:] for r in wb["说明"].iter_rows(values_only=True) if r and r[0]}
    assert about["时区 Time zone"][0] == "Asia/Shanghai"
    assert "2026-03-02T00:00:00+08:00" in about["统计期间 Period"][0]
    assert about["labmeter 版本 Version"][0]
    for key in THRESHOLDS:
        assert about[f"阈值 Threshold [policy] {key}"][0] == getattr(config.PolicyConfig(), key)
    defined = " ".join(str(k) for k in about)
    assert all(f"({code})" in defined for code in KINDS)  # every finding defined
    ws = wb["服务记录核对"]
    header = [c.value for c in ws[1]]
    rows = {r[0].value: {h: c for h, c in zip(header, r, strict=True)} for r in ws.iter_rows(min_row=2)}
    for name, hostile in HOSTILE.items():
        cell = rows[ids[name]]["申请人"]
        assert cell.value == hostile and cell.data_type == "s" and cell.quotePrefix
    assert rows[ids["R4"]]["有效机时 (h)"].value == pytest.approx(100 / 60, abs=1e-12)  # exact hours
    assert rows[ids["R4"]]["首次运行"].value == "2026-03-03T15:00:00+08:00"
    en = tmp_path / "en.xlsx"
    ok(cwd, *PERIOD, "--lang", "en", "-o", str(en))  # the suffix picks the format
    assert load_workbook(en).sheetnames == ["About", "Records", "Findings", "By instrument"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "2026-03-08", "--to", "2026-03-02"], "--to must be after --from"),
        ([*PERIOD, "--instrument", "CZ-X"], "--instrument 'CZ-X': no such instrument"),
        ([*PERIOD, "--format", "csv"], "a CSV file holds one table: add --part"),
        ([*PERIOD, "--format", "xlsx"], "--format xlsx needs --output"),
        ([*PERIOD, "--format", "csv", "-o", "r.json"], "the file name says json, but --format is csv"),
        ([*PERIOD, "--tz", "Mars/Base"], "--tz 'Mars/Base': unknown time zone"),
        (["--from", "2026-13-01", "--to", "2026-03-02"], "'2026-13-01' is not a date"),
    ],
    ids=[
        "from_after_to",
        "unknown_instrument",
        "csv_without_part",
        "xlsx_without_output",
        "suffix_contradicts_format",
        "bad_tz",
        "bad_date",
    ],
)
def test_bad_input_is_one_line(site: tuple[Path, dict[str, int]], args: list[str], message: str) -> None:
    """In-process (click's runner) for speed; the subprocess path is the one below and those above."""
    cwd = site[0]
    res = CliRunner().invoke(app, ["report", "reconcile", *args, "-c", str(cwd / "collector.toml")])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1


def test_bad_threshold_names_the_key(site: tuple[Path, dict[str, int]]) -> None:
    cwd, _ = site
    (cwd / "bad.toml").write_text(f'[collector]\ndata_dir = "{cwd / "data"}"\n\n[policy]\nidle_min_s = -1\n')
    proc = run(cwd, *PERIOD, cfg="bad.toml")
    assert proc.returncode == 2 and "bad.toml:5: policy.idle_min_s: expected `int` >= 0" in proc.stderr, (
        proc.stderr
    )
