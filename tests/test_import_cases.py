"""Import cases as data: each folder of tests/testcases/imports holds the files a unit's clerk would
produce (GBK CSV from Excel, title rows, synonyms, Excel times, calendars, a corrected re-import), the
steps that import them, and the stored result (expected.json) or the error's lines (expected.err)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import ImportError_, ServiceImport, import_instruments, import_services

TZ = ZoneInfo("Asia/Shanghai")
CASES = sorted(p for p in (Path(__file__).parent / "testcases" / "imports").iterdir() if p.is_dir())


def run_steps(ledger: Ledger, case: Path) -> tuple[list[str], ServiceImport | None]:
    notes: list[str] = []
    last = None
    for step in json.loads((case / "steps.json").read_text(encoding="utf-8")):
        path = case / step["file"]
        if step["kind"] == "instruments":
            import_instruments(ledger, path, notes, TZ)
        else:
            last = import_services(
                ledger, path, TZ, step.get("instrument"), replace=step.get("replace", False), now_ms=1
            )
            notes += last.notes
    return notes, last


def local(ms: object) -> str:
    assert isinstance(ms, int)
    return datetime.fromtimestamp(ms / 1000, TZ).isoformat()


def services(ledger: Ledger) -> list[dict[str, Any]]:
    out = []
    for r in ledger.service_records(0, 2**62):
        out.append({**r, "start": local(r["start_ms"]), "end": local(r["end_ms"])})
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_import_case(case: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    base = tmp_path / "base.csv"
    base.write_text("code,name,unit\nCZ-A,XRD,材料学院\nCZ-B,SEM,分析测试中心\n", encoding="utf-8")
    import_instruments(ledger, base)
    err = case / "expected.err"
    if err.exists():
        with pytest.raises(ImportError_) as exc:
            run_steps(ledger, case)
        for line in err.read_text(encoding="utf-8").splitlines():
            assert line in str(exc.value), f"{line!r} not in:\n{exc.value}"
        assert ledger.service_records(0, 2**62) == []
        assert {i["code"] for i in ledger.instruments()} == {"CZ-A", "CZ-B"}, "a bad file imported rows"
        return
    expected = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    notes, last = run_steps(ledger, case)
    stored = {str(i["code"]): i for i in ledger.instruments()}
    for code, fields in expected.get("instruments", {}).items():
        assert code in stored, f"{code} not imported"
        # metering_start_local: the stored metering start as a local time (the cases are in Asia/Shanghai)
        local_start = fields.pop("metering_start_local", None)
        assert {k: stored[code][k] for k in fields} == fields
        if local_start is not None:
            assert local(stored[code]["metering_start_ms"]) == local_start
    if "services" in expected:
        got = services(ledger)
        assert len(got) == len(expected["services"]), got
        for want, have in zip(expected["services"], got, strict=True):
            assert {k: have[k] for k in want} == want
    for note in expected.get("notes", []):
        assert any(note in n for n in notes), f"no note {note!r} in {notes}"
    for absent in expected.get("no_notes", []):
        assert not any(absent in n for n in notes), f"note {absent!r} should not be in {notes}"
    if "result" in expected:
        assert last is not None
        assert {k: getattr(last, k) for k in expected["result"]} == expected["result"]


def test_services_list_and_delete_batch_from_the_command_line(tmp_path: Path) -> None:
    """A clerk lists the batches, deletes the wrong one, and the listing and ledger show it gone."""
    from click.testing import CliRunner

    from labmeter.cli import app

    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp_path}"\n')
    cfg = ["--config", str(tmp_path / "collector.toml")]
    run = CliRunner().invoke
    case = Path(__file__).parent / "testcases" / "imports" / "corrected_reimport_replaces_wrong_record"
    (tmp_path / "i.csv").write_text("code\nCZ-A\nCZ-B\n")
    assert run(app, ["collector", "import-instruments", str(tmp_path / "i.csv"), *cfg]).exit_code == 0
    first = run(app, ["collector", "import-services", str(case / "wrong.csv"), *cfg])
    assert first.exit_code == 0 and "batch 1: 3 service record(s) imported" in first.output
    again = run(app, ["collector", "import-services", str(case / "corrected.csv"), *cfg])
    assert again.exit_code == 0
    assert "1 of the records already present differ" in again.output and "--replace" in again.output
    listed = run(app, ["collector", "services", "list", *cfg])
    assert listed.exit_code == 0
    assert "wrong.csv" in listed.output and "corrected.csv" in listed.output
    gone = run(app, ["collector", "services", "delete", "2", *cfg])
    assert gone.exit_code == 0 and "1 service record(s) removed" in gone.output
    assert "corrected.csv" not in run(app, ["collector", "services", "list", *cfg]).output
    missing = run(app, ["collector", "services", "delete", "9", *cfg])
    assert missing.exit_code == 1 and "no batch 9" in missing.output and "Traceback" not in missing.output
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert len(ledger.service_records(0, 2**62)) == 3


def test_a_long_hostile_summary_is_parsed_in_bounded_time() -> None:
    import time

    from labmeter.collector.registry import SUMMARY_MAX, parse_summary

    start = time.perf_counter()
    who, unit, _tags = parse_summary("(a" * 200_000)
    # unbounded, the pattern backtracks quadratically here: 8,000 characters took 0.35 s, so this ~1 h
    assert time.perf_counter() - start < 5
    assert len(who) <= SUMMARY_MAX and unit == ""


def test_reports_follow_a_replaced_and_a_deleted_batch(tmp_path: Path) -> None:
    """The hours, not just the rows: a corrected import moves the service hours to external, and deleting
    the batch takes them away (the rollups of the time it touched are recomputed)."""
    from labmeter.collector.reports.hours import hours_report
    from labmeter.config import PolicyConfig
    from tests.lab import store_schedule

    ledger = Ledger(tmp_path / "ledger.sqlite")
    (tmp_path / "i.csv").write_text("code\nCZ-A\n")
    import_instruments(ledger, tmp_path / "i.csv")
    day = int(datetime(2026, 3, 2, tzinfo=TZ).timestamp() * 1000)
    h = 3_600_000
    store_schedule(tmp_path, ledger, "pc", "CZ-A", [(day, day + 8 * h, "OFF"), (day + 8 * h, day + 10 * h, "RUNNING"), (day + 10 * h, day + 24 * h, "OFF")])  # fmt: skip
    policy = PolicyConfig()

    def hours() -> tuple[int, int]:
        row = hours_report(ledger, day, day + 24 * h, policy, now_ms=day + 48 * h)[0]
        return row.hours.service_ms, row.hours.external_ms

    (tmp_path / "s.csv").write_text(
        "instrument,start,end,service_type\nCZ-A,2026-03-02 08:00,2026-03-02 10:00,120\n"
    )
    first = import_services(ledger, tmp_path / "s.csv", TZ)
    assert hours() == (2 * h, 0)
    (tmp_path / "s.csv").write_text(
        "instrument,start,end,service_type\nCZ-A,2026-03-02 08:00,2026-03-02 10:00,130\n"
    )
    fixed = import_services(ledger, tmp_path / "s.csv", TZ, replace=True)
    assert (fixed.added, fixed.replaced) == (1, 1) and hours() == (2 * h, 2 * h)
    assert ledger.delete_service_batch(first.batch or 0) == 0  # its record was replaced already
    assert ledger.delete_service_batch(fixed.batch or 0) == 1
    assert hours() == (0, 0)


def test_batches_replace_and_delete_on_every_backend(any_ledger: Ledger) -> None:
    """The batch SQL (RETURNING, the added columns) on SQLite and PostgreSQL alike."""
    ledger = any_ledger
    ledger.add_agent("a1", "ed25519:x", "kid", ["CZ-A"])
    rec = {"instrument": "CZ-A", "start_ms": 1_000, "end_ms": 5_000, "service_type": 120, "applicant": "z"}
    first = ledger.import_service_batch("a.csv", [rec, {**rec, "start_ms": 6_000, "end_ms": 9_000}], False, 1)
    assert (first.added, first.duplicates) == (2, 0) and first.batch is not None
    again = ledger.import_service_batch(
        "b.csv", [{**rec, "service_type": 130, "service_way": "委托"}], False, 2
    )
    assert (again.added, again.duplicates, again.differ) == (0, 1, 1)
    fixed = ledger.import_service_batch("c.csv", [{**rec, "service_type": 130}], True, 3)
    assert (fixed.added, fixed.replaced) == (1, 1)
    assert [(r["start_ms"], r["service_type"]) for r in ledger.service_records(0, 10_000)] == [
        (1_000, 130),
        (6_000, 120),
    ]
    listed = {b["source"]: b for b in ledger.service_batches()}
    assert (
        listed["a.csv"]["records"] == 1
        and listed["b.csv"]["records"] == 0
        and listed["c.csv"]["records"] == 1
    )
    assert ledger.delete_service_batch(int(first.batch)) == 1
    assert ledger.delete_service_batch(int(first.batch)) is None
    assert [r["source"] for r in ledger.service_batches()] == ["b.csv", "c.csv"]


def test_a_ledger_from_before_batches_is_migrated(tmp_path: Path) -> None:
    """Service records stored before batches, service way and content keep counting and list as batch '-'."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE service_records (id INTEGER PRIMARY KEY, instrument TEXT NOT NULL, start_ms INTEGER NOT NULL,"
        " end_ms INTEGER NOT NULL, applicant TEXT NOT NULL DEFAULT '', applicant_unit TEXT NOT NULL DEFAULT '',"
        " service_type INTEGER NOT NULL, direction INTEGER NOT NULL DEFAULT 138, amount REAL,"
        " source TEXT NOT NULL DEFAULT '', UNIQUE (instrument, start_ms, end_ms, applicant));"
        "INSERT INTO service_records (instrument, start_ms, end_ms, service_type) VALUES ('CZ-A', 0, 3600000, 130);"
    )
    db.commit()
    db.close()
    ledger = Ledger(path)
    (batch,) = ledger.service_batches()
    assert batch["batch"] is None and batch["records"] == 1
    (rec,) = ledger.service_records(0, 3_600_000)
    assert rec["service_way"] == "" and rec["content"] == "" and rec["service_type"] == 130
