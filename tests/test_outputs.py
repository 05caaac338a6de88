"""What labmeter writes for people to open: spreadsheet cells that came in as text stay text, whatever
they start with (testcases/outputs/<case>/), and registry numbers that would break every report are
refused on import (testcases/registry/<case>/) or, already in a ledger, do not break them."""

from __future__ import annotations

import csv
import io
import json
import logging
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from openpyxl import load_workbook

from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import ImportError_, import_instruments, import_services
from labmeter.collector.reports.cells import FORMULA_START
from labmeter.collector.reports.hours import GROUPINGS, hours_report, hours_reports, render, write_xlsx
from labmeter.collector.reports.national import national_export, write_national
from labmeter.config import PolicyConfig
from tests.lab import store_schedule

TZ = ZoneInfo("Asia/Shanghai")
POLICY = PolicyConfig()
H = 3_600_000
CASES = Path(__file__).parent / "testcases"
OUTPUT_CASES = sorted((CASES / "outputs").iterdir())
REGISTRY_CASES = sorted((CASES / "registry").iterdir())
A = int(datetime(2026, 3, 2, tzinfo=TZ).timestamp() * 1000)
B = A + 7 * 24 * H


BLANK = {"name": "", "unit": "", "department": "", "category": "", "kind": "general", "share_mode": ""}


def formula_like(text: str) -> bool:
    return len(text) > 1 and text.startswith(FORMULA_START)


def load_case(case: Path, tmp: Path) -> Ledger:
    """The case's ledger: files imported the user's way, ledger.json rows written straight in, a week of
    hours for every instrument."""
    ledger = Ledger(tmp / "ledger.sqlite")
    if (case / "instruments.csv").exists():
        import_instruments(ledger, case / "instruments.csv")
    if (case / "ledger.json").exists():
        rows = json.loads((case / "ledger.json").read_text())["instruments"]
        ledger.upsert_instruments([{**BLANK, **r} for r in rows])
    if (case / "services.csv").exists():
        import_services(ledger, case / "services.csv", TZ)
    for inst in ledger.instruments():
        store_schedule(
            tmp, ledger, "a1", str(inst["code"]), [(A, A + 5 * H, "RUNNING"), (A + 5 * H, B, "OFF")]
        )
    return ledger


def hostile(ledger: Ledger, keys: tuple[str, ...], services: bool = False) -> set[str]:
    """The formula-like texts among the instruments' ``keys`` (and the applicant units)."""
    found = {str(i[k]) for i in ledger.instruments() for k in keys if formula_like(str(i[k] or ""))}
    if services:
        found |= {
            r[0]
            for r in ledger.db.execute("SELECT applicant_unit FROM service_records")
            if formula_like(r[0])
        }
    return found


def xlsx_text_cells(book: Path) -> set[str]:
    """Every text cell of a workbook, each checked to be a plain string (never a formula or an error value);
    formula-like ones also carry Excel's quote prefix, so editing the cell keeps it text. (XML reads a
    leading CR back as LF; it is still text.)"""
    texts: set[str] = set()
    for ws in load_workbook(book).worksheets:
        for row in ws.iter_rows():
            for cell in row:
                assert cell.data_type != "f", (book.name, ws.title, cell.coordinate, cell.value)
                if isinstance(cell.value, str):
                    assert cell.data_type == "s", (book.name, ws.title, cell.coordinate, cell.value)
                    if formula_like(cell.value):
                        assert cell.quotePrefix, (book.name, ws.title, cell.coordinate, cell.value)
                    texts.add(cell.value.replace("\n", "\r") if cell.value.startswith("\n") else cell.value)
    with zipfile.ZipFile(book) as z:
        sheets = [n for n in z.namelist() if n.startswith("xl/worksheets/sheet")]
        assert sheets and not any(b"<f>" in z.read(n) or b"<f " in z.read(n) for n in sheets)
    return texts


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c.name for c in OUTPUT_CASES])
def test_formula_like_text_is_text_in_every_xlsx(case: Path, tmp_path: Path) -> None:
    ledger = load_case(case, tmp_path)
    hours = tmp_path / "hours.xlsx"
    write_xlsx(hours, hours_reports(ledger, A, B, POLICY, GROUPINGS, TZ), "zh")
    national = tmp_path / "national.xlsx"
    write_national(national_export(ledger, 2026, POLICY, TZ), national)
    want_hours = hostile(ledger, ("code", "name", "unit", "category"))
    want_national = hostile(ledger, ("code", "name", "unit"), services=True)
    assert want_hours | want_national, f"{case.name} holds no formula-like text: it tests nothing"
    assert want_hours <= (got := xlsx_text_cells(hours)), want_hours - got
    assert want_national <= (got := xlsx_text_cells(national)), want_national - got
    ledger.close()


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c.name for c in OUTPUT_CASES])
def test_formula_like_text_is_escaped_in_every_csv(case: Path, tmp_path: Path) -> None:
    ledger = load_case(case, tmp_path)
    want = hostile(ledger, ("code", "name", "unit", "category"))
    escaped: set[str] = set()
    for by in GROUPINGS:
        text = render(hours_report(ledger, A, B, POLICY, by, TZ), "csv", "en", by)
        for row in csv.reader(io.StringIO(text)):
            for cell in row:
                assert not formula_like(cell) or _number(cell), (by, cell)
                if cell.startswith("'"):
                    escaped.add(cell[1:])
    if (case / "services.csv").exists() and not want:
        pytest.skip("this case's formulas are in service records, which no CSV report shows")
    assert want and want <= escaped, want - escaped
    ledger.close()


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("case", REGISTRY_CASES, ids=[c.name for c in REGISTRY_CASES])
def test_bad_registry_number_is_refused_with_file_row_and_column(case: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(ImportError_) as err:
        import_instruments(ledger, case / "instruments.csv")
        import_services(ledger, case / "services.csv", TZ)  # when the instruments were fine
    expected = (case / "expected_error.txt").read_text().strip()
    shown = str(err.value).replace(str(case) + "/", "")
    assert expected in shown and "nothing imported" in shown, shown
    if (case / "services.csv").exists():
        assert ledger.db.execute("SELECT COUNT(*) FROM service_records").fetchone()[0] == 0
    else:
        assert ledger.instruments() == []
    ledger.close()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -5.0, 1e300])
def test_bad_number_already_in_a_ledger_breaks_no_report(bad: float, tmp_path: Path, caplog: Any) -> None:
    """A ledger written before imports were checked: the reports use the policy's rated hours and say so."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store_schedule(tmp_path, ledger, "a1", "CZ-A", [(A, A + 5 * H, "RUNNING"), (A + 5 * H, B, "OFF")])
    store_schedule(tmp_path, ledger, "a1", "CZ-B", [(A, A + 5 * H, "RUNNING"), (A + 5 * H, B, "OFF")])
    ledger.upsert_instruments(
        [{**BLANK, "code": "CZ-A", "rated_hours": bad, "prep_allowance_s": bad}, {**BLANK, "code": "CZ-B"}]
    )
    with caplog.at_level(logging.WARNING, logger="labmeter.registry"):
        rows = {r.key: r for r in hours_report(ledger, A, B, POLICY, "instrument", TZ)}
        for fmt in ("table", "csv", "json"):
            assert render(list(rows.values()), fmt)
        write_xlsx(tmp_path / "h.xlsx", hours_reports(ledger, A, B, POLICY, GROUPINGS, TZ))
        write_national(national_export(ledger, 2026, POLICY, TZ), tmp_path / "n.xlsx")
    assert rows["CZ-A"].hours.rated_ms == rows["CZ-B"].hours.rated_ms > 0
    assert rows["CZ-A"].hours.run_ms == rows["CZ-B"].hours.run_ms == 5 * H
    stored = {str(i["code"]): i for i in ledger.instruments()}["CZ-A"]
    if stored["rated_hours"] is None:  # SQLite keeps NaN as NULL: nothing bad is left to warn about
        return
    warned = [r.getMessage() for r in caplog.records if "CZ-A" in r.getMessage()]
    assert any("rated_hours" in m for m in warned) and any("prep_allowance_s" in m for m in warned), warned
    ledger.close()
