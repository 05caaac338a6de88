"""Cells of the spreadsheets labmeter writes (CSV and XLSX): what came in as text goes out as text.

Instrument names, units and applicant units come from the labs' own sheets. A cell
that starts with ``= + - @`` (or a tab or carriage return) is a formula to Excel and
LibreOffice: ``=HYPERLINK(...)`` in a name would become a live link, ``=cmd|...`` a
DDE call (OWASP "CSV injection"). In CSV such a cell gets a leading apostrophe (the
OWASP advice; the csv module quotes separators and quotes). In XLSX every text cell
is written as a string, never as a formula (openpyxl would make any ``=...`` string
a formula), with Excel's quote prefix so editing the cell keeps it text; characters
XML cannot hold are dropped instead of failing the export. Numbers stay numbers.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_XML_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def is_formula_like(text: str) -> bool:
    """A lone ``-`` (our "no unit" label) is no formula; ``-1+1`` is."""
    return len(text) > 1 and text.startswith(FORMULA_START)


def csv_cell(value: object) -> object:
    if isinstance(value, str) and is_formula_like(value):
        return "'" + value
    return value


def to_csv(rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    for row in rows:
        w.writerow([csv_cell(v) for v in row])
    return buf.getvalue()


def append_row(ws: Any, values: Sequence[object]) -> None:
    """``ws.append`` for an openpyxl worksheet, with every text value a plain string cell.

    The cells are made here and handed to ``append``: finding the row again (``ws[ws.max_row]``) scans
    every cell of the sheet, which made a 19,000-row sheet take minutes."""
    from openpyxl.cell.cell import Cell

    row: list[object] = []
    for v in values:
        if isinstance(v, str):
            cell = Cell(ws, value=_XML_ILLEGAL.sub("", v))
            cell.data_type = "s"
            if is_formula_like(cell.value):
                cell.quotePrefix = True
            row.append(cell)
        else:
            row.append(v)
    ws.append(row)
