"""Interval energy through the collector: stored as signed (NULL when an old agent sent none, never 0), kept
by a ledger migration, summed by the rollups into ``report hours`` (table, CSV, JSON with exact Wh, XLSX
with its About sheet), carried by evidence bundles and recomputed by ``labmeter verify``, so an edited
energy fails. The reports run as a user types them (`python -m labmeter ...`).

The schedule (local Asia/Shanghai): CZ-E has a meter: OFF at 2 W, RUNNING at 1500 W 03-31 10:00-13:00 and
04-01 06:00-08:00, and 3.5 W of OFF around them; CZ-P is metered by status only (no energy in its bodies);
CZ-N is registered without an agent.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from openpyxl import load_workbook

from labmeter import evidence, signing, wire
from labmeter.collector.ledger import SCHEMA, Ledger
from labmeter.collector.reports.evidence import write_bundle
from labmeter.collector.service import Collector
from labmeter.verify import verify_bundle
from tests.attack import T0, H, make_lab, process
from tests.conftest import LABMETER
from tests.lab import store_schedule

TZ = ZoneInfo("Asia/Shanghai")
PERIOD = ["--from", "2026-03-31", "--to", "2026-04-01"]
WATTS = {"OFF": 3.5, "RUNNING": 1500.0}


def t(day: tuple[int, int], hh: int) -> int:
    return int(datetime(2026, *day, hh, tzinfo=TZ).timestamp() * 1000)


MAR31, APR1, APR2 = (3, 31), (4, 1), (4, 2)
A, B = t(MAR31, 0), t(APR2, 0)
RUNS = {
    "CZ-E": [(t(MAR31, 10), t(MAR31, 13)), (t(APR1, 6), t(APR1, 8))],
    "CZ-P": [(t(APR1, 14), t(APR1, 18))],
}
INSTRUMENTS_CSV = (
    "仪器编号,仪器名称,管理单位,分类编码,仪器类型,原值（万元）,定额机时\n"
    "CZ-E,X射线衍射仪,材料学院,020101,通用,350,\n"
    "CZ-P,透射电镜,分析测试中心,030201,专用,900,\n"
    "CZ-N,无人测量的仪器,化学学院,020301,通用,10,\n"
)


def spans(code: str) -> list[tuple[int, int, str]]:
    out, at = [], A
    for s, e in RUNS[code]:
        out += [(at, s, "OFF"), (s, e, "RUNNING")]
        at = e
    return [*out, (at, B, "OFF")]


def state_at(code: str, ms: int) -> str:
    return "RUNNING" if any(s <= ms < e for s, e in RUNS[code]) else "OFF"


def energy_of(start: int, end: int) -> float:
    """An interval's energy as the agent would sign it (an interval has one state)."""
    return round(WATTS[state_at("CZ-E", start)] * (end - start) / H, 3)


def wh(code: str, a: int, b: int) -> float:
    """Energy of ``code`` in [a, b) by hand: 1500 W while running, 3.5 W otherwise (whole hours here)."""
    if code != "CZ-E":
        return 0.0
    run = sum(max(0, min(e, b) - max(s, a)) for s, e in RUNS[code])
    return (run * 1500.0 + (b - a - run) * 3.5) / H


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    (tmp / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp / "data"}"\n')
    (tmp / "instruments.csv").write_text(INSTRUMENTS_CSV, encoding="utf-8")
    cli(tmp, "collector", "import-instruments", "instruments.csv")
    ledger = Ledger.open("sqlite", tmp / "data")
    try:
        store_schedule(tmp, ledger, "pc-e", "CZ-E", spans("CZ-E"), energy=energy_of)
        store_schedule(tmp, ledger, "pc-p", "CZ-P", spans("CZ-P"))
    finally:
        ledger.close()
    return tmp


def cli(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [*LABMETER, *args, "-c", str(cwd / "collector.toml")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{args}: {proc.stderr}"
    return proc.stdout


def test_report_hours_json_has_exact_wh_and_null_without_an_energy_source(site: Path) -> None:
    data = json.loads(cli(site, "report", "hours", *PERIOD, "--format", "json"))
    rows = {r["key"]: r for r in data["rows"]}
    want = wh("CZ-E", A, B)
    assert want == pytest.approx(3 * 1500 + 2 * 1500 + 43 * 3.5)
    assert rows["CZ-E"]["energy_wh"] == want and rows["CZ-E"]["energy_kwh"] == want / 1000
    for code in ("CZ-P", "CZ-N"):  # no energy source: unknown, not 0
        assert rows[code]["energy_wh"] is None and rows[code]["energy_kwh"] is None
    assert data["total"]["energy_wh"] == want
    assert data["meta"]["energy"]["instruments_without_energy"] == ["CZ-N", "CZ-P"]
    assert (
        "energy_kwh" in data["meta"]["columns"] and data["meta"]["columns"]["energy_kwh"]["zh"] == "电能(kWh)"
    )
    months = json.loads(cli(site, "report", "hours", *PERIOD, "--format", "json", "--by", "month"))
    by_month = {r["key"]: r["energy_wh"] for r in months["rows"]}
    assert by_month == {"2026-03": wh("CZ-E", A, t(APR1, 0)), "2026-04": wh("CZ-E", t(APR1, 0), B)}
    # a period that cuts intervals (UTC days: 8 h off the local hours) splits them in proportion, exactly
    utc = json.loads(cli(site, "report", "hours", *PERIOD, "--format", "json", "--tz", "UTC"))
    utc_a = int(datetime(2026, 3, 31, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    assert {r["key"]: r for r in utc["rows"]}["CZ-E"]["energy_wh"] == wh("CZ-E", utc_a, B)


@pytest.mark.parametrize(("by", "lang"), [("unit", "zh"), ("category", "en"), ("instrument", "zh")])
def test_report_hours_csv_and_table_have_the_energy_column(site: Path, by: str, lang: str) -> None:
    text = cli(site, "report", "hours", *PERIOD, "--format", "csv", "--by", by, "--lang", lang)
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    col = rows[0].index("电能(kWh)" if lang == "zh" else "Energy (kWh)")
    keyed = {r[0]: r[col] for r in rows[1:]}
    key = {"unit": "材料学院", "category": "020101", "instrument": "CZ-E"}[by]
    assert float(keyed[key]) == wh("CZ-E", A, B) / 1000
    other = {"unit": "分析测试中心", "category": "030201", "instrument": "CZ-P"}[by]
    assert keyed[other] == ""
    table = cli(site, "report", "hours", *PERIOD, "--by", by, "--lang", lang)
    assert ("电能(kWh)" if lang == "zh" else "Energy (kWh)") in table.splitlines()[0]
    assert f"{wh('CZ-E', A, B) / 1000:.2f}" in table


def test_report_hours_xlsx_about_sheet_defines_energy_and_names_instruments_without(
    site: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hours.xlsx"
    cli(site, "report", "hours", *PERIOD, "--format", "xlsx", "-o", str(out))
    wb = load_workbook(out)
    about = {r[0]: r[1] for r in wb["说明"].iter_rows(values_only=True) if r[0]}
    assert about["无电能来源的仪器 Instruments without an energy source"] == "CZ-N; CZ-P"
    assert "电能" in about["电能(kWh) / Energy (kWh)"]
    ws = wb["按仪器"]
    header = [c.value for c in ws[1]]
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)}
    assert rows["CZ-E"]["电能(kWh)"] == wh("CZ-E", A, B) / 1000 and rows["CZ-P"]["电能(kWh)"] is None


def bundle(site: Path, out: Path, key: signing.PrivateKey) -> None:
    ledger = Ledger.open("sqlite", site / "data")
    try:
        write_bundle(ledger, "CZ-E", t(MAR31, 6), t(APR1, 12), 900, 600, out, key)
    finally:
        ledger.close()


def test_evidence_carries_energy_and_verify_recomputes_it(site: Path, tmp_path: Path) -> None:
    key = signing.PrivateKey.generate()
    out = tmp_path / "ev"
    bundle(site, out, key)
    res = verify_bundle(out)
    assert res.ok, [str(f) for f in res.findings]
    assert (
        res.claimed["energy_mwh"]
        == res.recomputed["energy_mwh"]
        == round(wh("CZ-E", t(MAR31, 6), t(APR1, 12)) * 1000)
    )
    assert res.recomputed["energy_ms"] == t(APR1, 12) - t(MAR31, 6)
    said = subprocess.run([*LABMETER, "verify", str(out)], capture_output=True, text=True, timeout=60)
    kwh = wh("CZ-E", t(MAR31, 6), t(APR1, 12)) / 1000
    assert f"     energy: claimed {kwh:10.3f} kWh, recomputed {kwh:10.3f} kWh" in said.stdout, said.stdout


def test_an_edited_energy_in_an_interval_fails_verify(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    bundle(site, out, signing.PrivateKey.generate())
    envs = [json.loads(x) for x in (out / "intervals.jsonl").read_text().splitlines()]
    running = next(e for e in envs if '"RUNNING"' in e["body"])
    body = json.loads(running["body"])
    body["energy_wh"] = body["energy_wh"] * 2  # a doubled bill, signature left as it was
    running["body"] = wire.dump_body(body)
    (out / "intervals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in envs))
    res = verify_bundle(out)
    assert not res.ok
    assert any("signature does not match" in f.problem for f in res.findings), [str(f) for f in res.findings]
    proc = subprocess.run([*LABMETER, "verify", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "FAILED" in proc.stdout


def test_a_collector_claiming_other_energy_fails_verify_even_countersigned(
    site: Path, tmp_path: Path
) -> None:
    """The collector's own key re-signs a bundle whose energy claim it inflated: the recomputation names it."""
    key = signing.PrivateKey.generate()
    out = tmp_path / "ev"
    bundle(site, out, key)
    doc = json.loads((out / evidence.BUNDLE).read_text())
    doc["claimed"]["energy_mwh"] += 1_000_000
    files = {name: (out / name).read_bytes() for name in (evidence.INTERVALS, evidence.SERVICES)}
    files[evidence.BUNDLE] = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
    manifest = evidence.countersign(key, evidence.manifest_body(doc, files))
    (out / evidence.BUNDLE).write_bytes(files[evidence.BUNDLE])
    (out / evidence.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    res = verify_bundle(out)
    energy = [f for f in res.findings if f.where == "energy"]
    assert len(energy) == 1 and "kWh" in energy[0].problem and len(res.findings) == 1, [
        str(f) for f in res.findings
    ]


def test_a_bundle_from_before_energy_claims_none_and_still_verifies(site: Path, tmp_path: Path) -> None:
    key = signing.PrivateKey.generate()
    out = tmp_path / "ev"
    ledger = Ledger.open("sqlite", site / "data")
    try:
        write_bundle(ledger, "CZ-P", t(APR1, 6), t(APR1, 20), 900, 600, out, key)
    finally:
        ledger.close()
    doc = json.loads((out / evidence.BUNDLE).read_text())
    assert doc["claimed"]["energy_mwh"] == 0 and doc["claimed"]["energy_ms"] == 0
    for k in ("energy_mwh", "energy_ms"):
        del doc["claimed"][k]
    files = {name: (out / name).read_bytes() for name in (evidence.INTERVALS, evidence.SERVICES)}
    files[evidence.BUNDLE] = (json.dumps(doc, indent=2) + "\n").encode()
    (out / evidence.BUNDLE).write_bytes(files[evidence.BUNDLE])
    (out / evidence.MANIFEST).write_text(
        json.dumps(evidence.countersign(key, evidence.manifest_body(doc, files)))
    )
    res = verify_bundle(out)
    assert res.ok, [str(f) for f in res.findings]


def test_an_old_agent_body_is_stored_with_unknown_energy_and_a_new_one_with_its_own(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    c = Collector(lab.cfg)
    try:
        old = lab.interval("agent-a", "I1", 1, wire.GENESIS, T0, T0 + H, "RUNNING")  # no energy_wh at all
        body = wire.Interval(
            "agent-a", "I1", 2, lab.genuine["I1:1"][1], T0 + H, T0 + 2 * H, "RUNNING", energy_wh=1234.5678
        )
        new = lab.sign("agent-a", wire.dump_body(body.body()))
        zero = wire.Interval("agent-a", "I2", 5, wire.GENESIS, T0, T0 + H, "OFF", energy_wh=0.0)
        process(
            c,
            [
                (wire.interval_topic("agent-a", code), m)
                for code, m in (
                    ("I1", old),
                    ("I1", new),
                    ("I2", lab.sign("agent-a", wire.dump_body(zero.body()))),
                )
            ],
        )
        assert c.stats["stored"] == 3 and c.stats["rejected"] == 0
        got = dict(
            ((r[0], r[1]), r[2])
            for r in c.ledger.db.execute("SELECT instrument, seq, energy_mwh FROM intervals")
        )
        assert got == {("I1", 1): None, ("I1", 2): 1234568, ("I2", 5): 0}  # measured 0 stays 0, unknown NULL
    finally:
        c.ledger.close()
        c._pool.shutdown()


OLD_SCHEMA = SCHEMA.replace(", energy_mwh INTEGER,\n", ",\n").replace(
    "    energy_mwh INTEGER NOT NULL DEFAULT 0, energy_ms INTEGER NOT NULL DEFAULT 0,\n", ""
)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_ledger_from_before_energy_is_migrated_and_keeps_what_newer_agents_sent(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    assert OLD_SCHEMA != SCHEMA and "energy" not in OLD_SCHEMA
    if backend == "sqlite":
        path = tmp_path / "ledger.sqlite"
        db: Any = sqlite3.connect(path)
        db.executescript(OLD_SCHEMA)

        def reopen() -> Ledger:
            return Ledger(path)
    else:
        from labmeter.collector.ledger.pg import Database

        url = request.getfixturevalue("postgres").new_database()
        db = Database(url)
        db.executescript(OLD_SCHEMA)

        def reopen() -> Ledger:
            return Ledger.open(url, tmp_path)

    key = signing.PrivateKey.generate()
    bodies = [
        wire.Interval("a", "X", 1, wire.GENESIS, T0, T0 + H, "RUNNING"),  # an old agent
        wire.Interval("a", "X", 2, "1" * 64, T0 + H, T0 + 2 * H, "RUNNING", energy_wh=750.25),  # a newer one
    ]
    for iv in bodies:
        text = wire.dump_body(iv.body())
        row = (
            iv.start,
            iv.end,
            iv.state,
            iv.prev,
            wire.body_hash(text),
            0,
            None,
            wire.seal(key, "k", text),
            0,
        )
        db.execute("INSERT INTO intervals VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", ("a", "X", iv.seq, *row))
    db.execute("INSERT INTO rollups VALUES ('X', 0, ?, 1, 0, 0, 0, 0, 1, 1, 0, 0)", (T0,))
    if backend == "sqlite":
        db.commit()
    db.close()
    ledger = reopen()
    try:
        got = dict(ledger.db.execute("SELECT seq, energy_mwh FROM intervals").fetchall())
        assert got == {1: None, 2: 750250}
        assert tuple(ledger.db.execute("SELECT energy_mwh, energy_ms FROM rollups").fetchone()) == (0, 0)
        assert ledger.db.execute("SELECT COUNT(*) FROM rollup_dirty WHERE instrument='X'").fetchone()[0] >= 1
        assert [r[7] for r in ledger.intervals_between(T0, T0 + 2 * H, "X")] == [None, 750250]
        # whole mWh of a 10 MW day fit: no 32-bit column on either backend
        ledger.db.execute("UPDATE intervals SET energy_mwh = ? WHERE seq = 1", (240_000_000_000,))
    finally:
        ledger.close()
    reopen().close()  # a second open finds nothing to migrate


SERVICES_CSV = (
    "仪器编号,开始时间,结束时间,申请人,申请单位,服务类型,服务方向,金额\n"
    "CZ-E,2026-03-31 10:00,2026-03-31 12:00,张三,材料学院,120,135,0\n"
    "CZ-E,2026-04-01 05:00,2026-04-01 07:00,王五,某某公司,130,136,500\n"
    "CZ-P,2026-04-01 14:00,2026-04-01 15:00,李四,分析测试中心,120,135,0\n"
)


def test_reconcile_gives_each_record_its_energy_and_its_electricity_cost(site: Path, tmp_path: Path) -> None:
    (site / "services.csv").write_text(SERVICES_CSV, encoding="utf-8")
    cli(site, "collector", "import-services", "services.csv")
    priced = site / "priced.toml"
    priced.write_text(f'[collector]\ndata_dir = "{site / "data"}"\n[policy]\ntariff_yuan_per_kwh = 0.65\n')
    proc = subprocess.run(
        [*LABMETER, "report", "reconcile", *PERIOD, "--format", "json", "-c", str(priced)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    got = {(r["instrument"], r["start"][:16]): r for r in doc["records"]}
    first, second = got[("CZ-E", "2026-03-31T10:00")], got[("CZ-E", "2026-04-01T05:00")]
    # by hand: 2 h running at 1500 W; then 1 h off at 3.5 W and 1 h running
    assert first["energy_wh"] == 3000.0 and first["energy_kwh"] == 3.0 and first["cost"] == 1.95
    assert second["energy_wh"] == 1503.5 and second["cost"] == round(1.5035 * 0.65, 2) == 0.98
    status_only = got[("CZ-P", "2026-04-01T14:00")]
    assert status_only["energy_wh"] is None and status_only["cost"] is None  # no source: unknown, no bill
    assert doc["meta"]["tariff_yuan_per_kwh"] == 0.65
    unpriced = json.loads(cli(site, "report", "reconcile", *PERIOD, "--format", "json"))
    assert {r["cost"] for r in unpriced["records"]} == {None}
    assert {r["energy_wh"] for r in unpriced["records"]} == {3000.0, 1503.5, None}
    out = tmp_path / "reconcile.xlsx"
    subprocess.run(
        [*LABMETER, "report", "reconcile", *PERIOD, "-o", str(out), "-c", str(priced)],
        check=True,
        timeout=120,
    )
    ws = load_workbook(out)["服务记录核对"]
    header = [c.value for c in ws[1]]
    rows = [dict(zip(header, r, strict=True)) for r in ws.iter_rows(min_row=2, values_only=True)]
    assert sorted((r["电能(kWh)"] or 0, r["电费（元）"] or 0) for r in rows) == [
        (0, 0),
        (1.5035, 0.98),
        (3.0, 1.95),
    ]
