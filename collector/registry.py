"""Imports from the sheets labs already keep: instruments and service records (CSV, XLSX, iCalendar).

Every row is checked before anything is written; a bad file is rejected with
every problem named by row and column, and nothing is half-imported.
Headers may be in English or Chinese.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from labmeter.collector.ledger import Ledger

log = logging.getLogger("labmeter.registry")


class ImportError_(Exception):
    """A file that cannot be imported; the message lists every problem."""


# Each key's accepted headers, compared after _norm (case, spaces, full-width brackets and a leading
# "*" required-marker ignored). The first Chinese name is the one error messages suggest.
INSTRUMENT_HEADERS = {
    "code": (
        "code",
        "仪器编号",
        "编号",
        "设备编号",
        "仪器设备编号",
        "仪器代码",
        "资产编号",
        "所在单位仪器编号",
    ),
    "name": ("name", "仪器名称", "名称", "设备名称", "仪器设备名称", "中文名称"),
    "unit": ("unit", "管理单位", "所属单位", "所在单位", "单位"),
    "department": ("department", "所在部门", "部门", "使用部门", "所属部门", "院系"),
    "category": ("category", "分类编码", "分类代码", "分类号", "仪器分类", "仪器分类编码", "分类"),
    "kind": ("kind", "仪器类型", "通用/专用", "类型", "仪器属性"),
    "value_wan": ("value_wan", "value", "原值(万元)", "原值", "仪器原值(万元)", "设备原值(万元)"),
    "rated_hours": ("rated_hours", "定额机时", "额定机时", "定额机时(h)"),
    "share_mode": ("share_mode", "共享模式", "共享方式"),
    "prep_allowance_s": ("prep_allowance_s", "准备时间(秒)"),
    "post_allowance_s": ("post_allowance_s", "后处理时间(秒)"),
    "metering_start": (
        "metering_start",
        "计量开始日期",
        "计量开始时间",
        "计量起始日期",
        "开始计量日期",
        "机时计量开始日期",
    ),
}
SERVICE_HEADERS = {
    "instrument": ("instrument", "仪器编号", "设备编号", "仪器设备编号", "仪器代码", "编号"),
    "start": ("start", "开始时间", "起始时间", "预约开始时间", "使用开始时间", "上机时间"),
    "end": ("end", "结束时间", "终止时间", "预约结束时间", "使用结束时间", "下机时间"),
    "applicant": ("applicant", "申请人", "用户", "使用人", "预约人", "姓名", "用户姓名"),
    "applicant_unit": ("applicant_unit", "申请单位", "用户单位", "使用单位", "申请人单位"),
    "service_type": ("service_type", "服务类型", "服务对象", "对内/对外"),
    "direction": ("direction", "服务方向"),
    "amount": ("amount", "金额", "收费金额", "金额(元)", "收费(元)", "费用", "费用(元)"),
    "service_way": ("service_way", "服务方式"),
    "content": ("content", "服务内容", "测试内容", "实验内容"),
}
SERVICE_WAYS = ("占用", "技术", "委托", "远程共享", "其他")
"""The national platform's serviceWay values (as vendors' integration code sends them; unverified)."""
HEADER_SEARCH_ROWS = 10
"""How many rows a header may sit below (units' templates put a title and notes above it)."""
ENCODINGS = ("utf-8-sig", "gb18030")
"""CSV text encodings tried in turn: UTF-8 with or without BOM, then GB18030 (a superset of GBK and
GB2312, what Excel on Chinese Windows writes for "CSV (逗号分隔)")."""
METERING_START_FROM_MS = 946_684_800_000
"""2000-01-01 UTC: a metering start before it is a typo (no agent ran then)."""
YEAR_AHEAD_MS = 366 * 86_400_000
EXCEL_EPOCH = datetime(1899, 12, 30)
SERIAL_RANGE = (20_000.0, 80_000.0)
"""Excel serial date-times read as such (1954 to 2119); outside it a number is no time."""
TIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%Y.%m.%d %H:%M:%S",
    "%Y.%m.%d %H:%M",
    "%Y年%m月%d日 %H:%M:%S",
    "%Y年%m月%d日 %H:%M",
    "%Y年%m月%d日%H:%M",
    "%Y/%m/%d",
    "%Y-%m-%d",
)
"""Local time formats accepted besides ISO 8601; ``2026/12/2 4:07`` is Excel's default on Chinese Windows."""


def _norm(header: str) -> str:
    return (
        header.strip()
        .lstrip("*＊")
        .replace("（", "(")
        .replace("）", ")")
        .replace(" ", "")
        .replace("\u3000", "")
        .lower()
    )


# Upper bounds: past them a number is a typing mistake, and would overflow the ledger's integers.
LIMITS = {
    "value_wan": 1e9,
    "rated_hours": 8784.0,
    "prep_allowance_s": 86_400.0,
    "post_allowance_s": 86_400.0,
    "amount": 1e10,
}
LIMIT_WHY = {
    "value_wan": "10 trillion yuan",
    "rated_hours": "the hours of a leap year",
    "prep_allowance_s": "a day",
    "post_allowance_s": "a day",
    "amount": "ten billion yuan for one booking",
}
KINDS = {"general": "general", "通用": "general", "special": "special", "专用": "special"}
SERVICE_TYPES = {
    "120": 120,
    "internal": 120,
    "对内": 120,
    "校内": 120,
    "130": 130,
    "external": 130,
    "对外": 130,
    "校外": 130,
}
DIRECTIONS = {
    "135": 135,
    "research": 135,
    "科研": 135,
    "136": 136,
    "development": 136,
    "技术开发": 136,
    "137": 137,
    "teaching": 137,
    "教学": 137,
    "138": 138,
    "other": 138,
    "其他": 138,
}


@dataclass
class Table:
    name: str
    rows: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    header_row: int = 1


def read_grid(path: Path) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """Every non-empty row of a CSV or XLSX file (first sheet) as text cells, with the row numbers a user
    sees, and notes on how the file was read (its encoding, when not UTF-8)."""
    suffix = path.suffix.lower()
    notes: list[str] = []
    grid: list[tuple[int, list[str]]] = []
    if suffix == ".xlsx":
        from openpyxl import load_workbook

        try:
            wb = load_workbook(path, read_only=True, data_only=True)
        except Exception as exc:  # openpyxl raises many kinds for a damaged or mislabelled file
            raise ImportError_(
                f"{path}: not a readable .xlsx workbook ({type(exc).__name__}: {exc})"
            ) from None
        ws = wb.worksheets[0]
        for n, values in enumerate(ws.iter_rows(values_only=True), start=1):
            cells = [_cell(v) for v in values]
            if any(cells):
                grid.append((n, cells))
        wb.close()
        return grid, notes
    if suffix in (".csv", ".txt"):
        data = path.read_bytes()
        for enc in ENCODINGS:
            try:
                text = data.decode(enc)
            except UnicodeDecodeError:
                continue
            if enc != "utf-8-sig":
                notes.append(f"{path.name}: read as {enc.upper()} text (not UTF-8)")
            break
        else:
            raise ImportError_(
                f"{path}: neither UTF-8 nor GB18030/GBK text; in Excel save it as 'CSV UTF-8' or as .xlsx"
            )
        for n, values in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            cells = [v.strip() for v in values]
            if any(cells):
                grid.append((n, cells))
        return grid, notes
    raise ImportError_(f"{path}: use a .csv or .xlsx file (or .ics for service records)")


def read_table(path: Path, spec: dict[str, tuple[str, ...]] | None = None) -> Table:
    """Rows keyed by header. The header is the first row (of the first HEADER_SEARCH_ROWS) naming one of
    ``spec``'s columns, so title rows above it are skipped; without ``spec``, the first row."""
    grid, notes = read_grid(path)
    at = 0
    if spec is not None:
        wanted = {_norm(n) for names in spec.values() for n in names}
        at = next(
            (
                i
                for i, (_n, cells) in enumerate(grid[:HEADER_SEARCH_ROWS])
                if any(_norm(c) in wanted for c in cells)
            ),
            0,
        )
    if not grid:
        return Table(str(path), notes=notes)
    header_row, header = grid[at]
    table = Table(str(path), header=header, notes=notes, header_row=header_row)
    if at:
        notes.append(f"{path.name}: header found in row {header_row}; the rows above it were skipped")
    for n, values in grid[at + 1 :]:
        table.rows.append((n, {h: v for h, v in zip(header, values, strict=False) if h}))
    return table


def _cell(v: Any) -> str:
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "" if v is None else str(v).strip()


def _columns(
    table: Table,
    spec: dict[str, tuple[str, ...]],
    required: tuple[str, ...],
    hint: dict[str, str] | None = None,
) -> dict[str, str]:
    """Our key → the file's header for it; every missing required column is an error, with its fix."""
    found: dict[str, str] = {}
    for key, names in spec.items():
        accepted = {_norm(n) for n in names}
        for h in table.header:
            if _norm(h) in accepted and h not in found.values():
                found[key] = h
                break
    missing = [k for k in required if k not in found]
    if missing:
        wanted = "; ".join(
            f"{k} (e.g. {' / '.join(dict.fromkeys(spec[k][:2] + spec[k][2:4]))})" + (hint or {}).get(k, "")
            for k in missing
        )
        seen = ", ".join(repr(h) for h in table.header if h) or "nothing"
        raise ImportError_(
            f"{table.name}: missing column(s): {wanted}\n  (header taken from row {table.header_row}: {seen})"
        )
    return found


def _validate(
    table: Table, cols: dict[str, str], check: Callable[[dict[str, str], list[str]], dict[str, object] | None]
) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    errors: list[str] = []
    for n, raw in table.rows:
        row = {k: raw.get(h, "") for k, h in cols.items()}
        problems: list[str] = []
        rec = check(row, problems)
        errors += [
            f"{table.name}: row {n}: {_header_names(p, cols)}" for p in problems if not p.startswith("note:")
        ]
        table.notes += [
            f"{table.name}: row {n}: {_header_names(p.removeprefix('note: '), cols)}"
            for p in problems
            if p.startswith("note:")
        ]
        problems = [p for p in problems if not p.startswith("note:")]
        if rec is not None and not problems:
            out.append(rec)
    if errors:
        raise ImportError_("\n".join(errors) + f"\nnothing imported ({len(errors)} problem(s))")
    return out


def _header_names(problem: str, cols: dict[str, str]) -> str:
    """A problem about ``column 'key'`` names the file's own header for it."""
    for key, header in cols.items():
        if header != key:
            problem = problem.replace(f"column '{key}':", f"column '{header}' ({key}):")
    return problem


def import_instruments(
    ledger: Ledger, path: Path, notes: list[str] | None = None, tz: ZoneInfo | None = None
) -> int:
    """Add or update the instruments of a sheet; ``notes`` collects how it was read (encoding, header row,
    restored leading zeros, category codes the shipped classification does not list). ``tz``: the zone
    a metering start date is local to (the policy's)."""
    from labmeter.collector.reports.hours import category_problem

    zone = tz or ZoneInfo("UTC")
    now_ms = int(time.time() * 1000)
    table = read_table(path, INSTRUMENT_HEADERS)
    cols = _columns(table, INSTRUMENT_HEADERS, ("code",))
    seen: set[str] = set()

    def check(row: dict[str, str], problems: list[str]) -> dict[str, object] | None:
        code = row["code"]
        if not code:
            problems.append("column 'code': empty")
            return None
        if code in seen:
            problems.append(f"column 'code': {code!r} appears twice in the file")
        seen.add(code)
        kind = KINDS.get(row.get("kind", "").lower() or "general")
        if kind is None:
            problems.append(f"column 'kind': {row['kind']!r} is not general/通用 or special/专用")
        category = row.get("category", "")
        if category.isascii() and category.isdigit() and len(category) == 5:
            problems.append(
                f"note: column 'category': {category} read as 0{category} (Excel drops a leading zero; "
                "format the column as text to keep it)"
            )
            category = "0" + category
        if category and not (category.isascii() and category.isdigit() and len(category) == 6):
            problems.append(
                f"column 'category': {category!r} is not a 6-digit category code of ASCII "
                "digits (e.g. 030101)"
            )
        elif category and (unknown := category_problem(category)):
            problems.append(f"note: column 'category': {unknown}")
        rec: dict[str, object] = {
            "code": code,
            "name": row.get("name", ""),
            "unit": row.get("unit", ""),
            "department": row.get("department", ""),
            "category": category,
            "kind": kind or "general",
            "share_mode": row.get("share_mode", ""),
        }
        for key in ("value_wan", "rated_hours"):
            rec[key] = _bounded(row.get(key, ""), key, problems)
        for key in ("prep_allowance_s", "post_allowance_s"):
            value = _bounded(row.get(key, ""), key, problems)
            rec[key] = None if value is None else int(value)
        start = row.get("metering_start", "")
        start_ms = _time(start, "metering_start", zone, problems) if start else None
        if start_ms is not None and not METERING_START_FROM_MS <= start_ms <= now_ms + YEAR_AHEAD_MS:
            problems.append(
                f"column 'metering_start': {start!r} is before 2000 or more than a year ahead: a typo? "
                "(use the date metering of this instrument began, e.g. 2026-03-02)"
            )
            start_ms = None
        rec["metering_start_ms"] = start_ms
        return rec

    rows = _validate(table, cols, check)
    ledger.upsert_instruments(rows)
    if notes is not None:
        notes += table.notes
    return len(rows)


@dataclass
class ServiceImport:
    added: int
    duplicates: int
    batch: int | None = None
    differ: int = 0
    """Duplicates whose unit, type, direction or amount differ from the stored record (--replace fixes them)."""
    replaced: int = 0
    notes: list[str] = field(default_factory=list)


def import_services(
    ledger: Ledger,
    path: Path,
    tz: ZoneInfo,
    instrument: str | None = None,
    replace: bool = False,
    now_ms: int | None = None,
) -> ServiceImport:
    """Import one file as one batch. ``replace``: each instrument's stored records starting within the
    file's span for it are removed first (a corrected file replaces the wrong one)."""
    notes: list[str] = []
    if path.suffix.lower() == ".ics":
        rows = _ics_rows(path, tz, instrument, notes)
        known = {str(i["code"]) for i in ledger.instruments()}
        unknown = sorted({str(r["instrument"]) for r in rows} - known)
        if unknown:
            raise ImportError_(
                f"{path}: unknown instrument(s) {', '.join(map(repr, unknown))} (import them first, "
                "or name the instrument with --instrument)\nnothing imported"
            )
    else:
        table = read_table(path, SERVICE_HEADERS)
        required = ("start", "end") if instrument else ("instrument", "start", "end")
        cols = _columns(
            table,
            SERVICE_HEADERS,
            (*required, "service_type"),
            {"instrument": "; or name the file's one instrument with --instrument CODE"},
        )
        rows = _validate(table, cols, _service_checker(ledger, tz, instrument, path.name))
        notes += table.notes
    res = ledger.import_service_batch(
        path.name, rows, replace, int(time.time() * 1000) if now_ms is None else now_ms
    )
    return ServiceImport(res.added, res.duplicates, res.batch, res.differ, res.replaced, notes)


def _service_checker(
    ledger: Ledger, tz: ZoneInfo, instrument: str | None, source: str
) -> Callable[[dict[str, str], list[str]], dict[str, object] | None]:
    known = {str(i["code"]) for i in ledger.instruments()}

    def check(row: dict[str, str], problems: list[str]) -> dict[str, object] | None:
        code = row.get("instrument") or instrument or ""
        if code not in known:
            problems.append(
                f"column 'instrument': unknown instrument {code!r} (import it first with import-instruments)"
                if code
                else "column 'instrument': empty (fill it in, or name the instrument with --instrument)"
            )
        start = _time(row["start"], "start", tz, problems)
        end = _time(row["end"], "end", tz, problems)
        if start is not None and end is not None and end <= start:
            problems.append(f"column 'end': {row['end']!r} is not after start {row['start']!r}")
        st = SERVICE_TYPES.get(row.get("service_type", "").strip().lower())
        if st is None:
            problems.append(
                f"column 'service_type': {row.get('service_type', '')!r} is not 120/internal or 130/external"
                " (or 对内/校内, 对外/校外)"
            )
        direction = DIRECTIONS.get((row.get("direction") or "138").strip().lower())
        if direction is None:
            problems.append(f"column 'direction': {row.get('direction')!r} is not 135-138")
        way = row.get("service_way", "").strip()
        if way and way not in SERVICE_WAYS:
            problems.append(f"column 'service_way': {way!r} is not one of {'/'.join(SERVICE_WAYS)}")
        return {
            "instrument": code,
            "start_ms": start,
            "end_ms": end,
            "applicant": row.get("applicant", ""),
            "applicant_unit": row.get("applicant_unit", ""),
            "service_type": st,
            "direction": direction,
            "amount": _bounded(row.get("amount", ""), "amount", problems),
            "source": source,
            "service_way": way,
            "content": row.get("content", "")[:500],
        }

    return check


def _bounded(text: str, key: str, problems: list[str]) -> float | None:
    """A registry number: finite, not negative, at most ``LIMITS[key]``; else a problem naming the column."""
    value = _number(text, key, problems)
    if value is not None and (reason := number_problem(key, value)):
        problems.append(f"column '{key}': {text!r} {reason}")
        return None
    return value


def number_problem(key: str, value: object) -> str | None:
    """Why a registry value cannot be used (None if it can); for an import, and for rows already stored."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "is not a number"
    if not math.isfinite(value):
        return "is not a finite number"
    if value < 0:
        return "is negative"
    if value > LIMITS[key]:
        return f"is more than {LIMITS[key]:g} ({LIMIT_WHY[key]})"
    return None


_warned: set[tuple[str, str, str]] = set()


def stored_number(info: dict[str, object], key: str) -> float | None:
    """A number from a stored instrument row, or None (the policy's default applies) when it is missing or
    unusable: a ledger written before imports were checked may hold inf, nan or negative numbers, and one
    such row must not make every report fail. Each bad value is logged once, with how to fix it."""
    value = info.get(key)
    if value is None or value == "":
        return None
    reason = number_problem(key, value)
    if reason is None:
        return float(value)  # type: ignore[arg-type]
    mark = (str(info.get("code")), key, repr(value))
    if mark not in _warned:
        _warned.add(mark)
        log.warning(
            "instrument %r: %s = %r %s; using the policy's default (fix it with collector import-instruments)",
            info.get("code"),
            key,
            value,
            reason,
        )
    return None


def _number(text: str, key: str, problems: list[str]) -> float | None:
    if not text:
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        problems.append(f"column '{key}': {text!r} is not a number")
        return None


def _time(text: str, key: str, tz: ZoneInfo, problems: list[str]) -> int | None:
    """A local time as the sheets write it: ISO 8601, Excel's ``2026/12/2 4:07``, 2026年12月2日 4:07, or
    an Excel serial number (a cell whose date format was lost)."""
    t = text.strip()
    dt: datetime | None = None
    try:
        serial = float(t)
    except ValueError:
        serial = None
    if serial is not None:
        if SERIAL_RANGE[0] <= serial <= SERIAL_RANGE[1]:
            dt = EXCEL_EPOCH + timedelta(seconds=round(serial * 86_400))
    else:
        try:
            dt = datetime.fromisoformat(t)
        except ValueError:
            for fmt in TIME_FORMATS:
                try:
                    dt = datetime.strptime(t, fmt)
                    break
                except ValueError:
                    continue
    if dt is None:
        problems.append(
            f"column '{key}': cannot read {text!r} as a time (use 2026-03-02 08:30 or 2026/3/2 8:30, "
            "or a date-time cell)"
        )
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return int(dt.timestamp() * 1000)


ICS_DEFAULT_TYPE = 120
"""An event whose CATEGORIES (and SUMMARY tag) say neither internal nor external counts as internal: a
unit's booking calendar is mostly its own users, and an external service must be claimed explicitly."""
_SUMMARY_TAG = re.compile(r"^\s*[\[【(（]([^\]】)）]{1,20})[\]】)）]\s*")
_SUMMARY_UNIT = re.compile(
    r"^(?P<who>.+?)\s*(?:[(（](?P<unit>[^)）]+)[)）]|\s[/|｜\-–—]\s*(?P<unit2>.+)|[/|｜](?P<unit3>.+))\s*$"
)


SUMMARY_MAX = 300
"""Characters of a SUMMARY parsed (a calendar is hostile input: the pattern backtracks on long text)."""


def parse_summary(summary: str) -> tuple[str, str, list[str]]:
    """SUMMARY as (applicant, applicant unit, tags): ``【对外】张三 (化学学院)``, ``张三 / 化学学院``,
    ``张三｜化学学院``; leading bracketed tags are read like CATEGORIES words."""
    text = summary.strip()[:SUMMARY_MAX]
    tags: list[str] = []
    while m := _SUMMARY_TAG.match(text):
        tags.append(m.group(1).strip().lower())
        text = text[m.end() :]
    m = _SUMMARY_UNIT.match(text)
    if m is None:
        return text, "", tags
    unit = m.group("unit") or m.group("unit2") or m.group("unit3") or ""
    return m.group("who").strip(), unit.strip(), tags


def _ics_rows(path: Path, tz: ZoneInfo, instrument: str | None, notes: list[str]) -> list[dict[str, object]]:
    """VEVENTs as service records (the mapping is in docs/imports.md): --instrument (or else LOCATION) is
    the instrument; SUMMARY gives applicant and unit (X-APPLICANT and X-APPLICANT-UNIT win); CATEGORIES
    or a SUMMARY tag says internal/external (120/130, default 120) and the direction (135-138, default 138)."""
    from icalendar import Calendar

    try:
        cal = Calendar.from_ical(path.read_bytes())
    except ValueError as exc:
        raise ImportError_(f"{path}: not an iCalendar file ({exc})") from None
    rows: list[dict[str, object]] = []
    errors: list[str] = []
    defaulted = 0
    for n, ev in enumerate(cal.walk("VEVENT"), start=1):
        where = f"{path}: event {n} ({ev.get('UID', '')})"
        code = str(instrument or ev.get("LOCATION") or "")
        if not code:
            errors.append(f"{where}: no LOCATION naming the instrument; give --instrument CODE")
            continue
        try:
            start, end = ev.decoded("DTSTART"), ev.decoded("DTEND")
        except KeyError:
            errors.append(f"{where}: needs DTSTART and DTEND")
            continue
        if not isinstance(start, datetime) or not isinstance(end, datetime):
            errors.append(f"{where}: all-day events have no hours; give start and end times")
            continue
        start = start if start.tzinfo else start.replace(tzinfo=tz)
        end = end if end.tzinfo else end.replace(tzinfo=tz)
        cats = ev.get("CATEGORIES")
        words = [
            str(w).strip().lower()
            for c in (cats if isinstance(cats, list) else [cats] if cats else [])
            for w in c.cats
        ]
        applicant, unit, tags = parse_summary(str(ev.get("SUMMARY", "")))
        words += tags
        st = next((SERVICE_TYPES[w] for w in words if w in SERVICE_TYPES), None)
        if st is None:
            st = ICS_DEFAULT_TYPE
            defaulted += 1
        direction = next((DIRECTIONS[w] for w in words if w in DIRECTIONS and w not in SERVICE_TYPES), 138)
        if end <= start:
            errors.append(f"{where}: DTEND is not after DTSTART")
            continue
        rows.append(
            {
                "instrument": code,
                "start_ms": int(start.timestamp() * 1000),
                "end_ms": int(end.timestamp() * 1000),
                "applicant": str(ev.get("X-APPLICANT") or applicant),
                "applicant_unit": str(ev.get("X-APPLICANT-UNIT") or unit),
                "service_type": st,
                "direction": direction,
                "amount": None,
                "source": path.name,
            }
        )
    if errors:
        raise ImportError_("\n".join(errors) + f"\nnothing imported ({len(errors)} problem(s))")
    if defaulted:
        notes.append(
            f"{path.name}: {defaulted} event(s) without internal/external in CATEGORIES or SUMMARY "
            f"counted as internal ({ICS_DEFAULT_TYPE})"
        )
    return rows
