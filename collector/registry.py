"""Imports from the sheets labs already keep: instruments and service records (CSV, XLSX, iCalendar).

Every row is checked before anything is written; a bad file is rejected with
every problem named by row and column, and nothing is half-imported.
Headers may be in English or Chinese.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from labmeter.collector.ledger import Ledger

log = logging.getLogger("labmeter.registry")


class ImportError_(Exception):
    """A file that cannot be imported; the message lists every problem."""


INSTRUMENT_HEADERS = {
    "code": ("code", "仪器编号", "编号"),
    "name": ("name", "仪器名称", "名称"),
    "unit": ("unit", "管理单位", "所属单位"),
    "department": ("department", "所在部门", "部门"),
    "category": ("category", "分类编码", "分类代码"),
    "kind": ("kind", "仪器类型", "通用/专用"),
    "value_wan": ("value_wan", "value", "原值（万元）", "原值(万元)", "原值"),
    "rated_hours": ("rated_hours", "定额机时"),
    "share_mode": ("share_mode", "共享模式"),
    "prep_allowance_s": ("prep_allowance_s", "准备时间（秒）", "准备时间(秒)"),
    "post_allowance_s": ("post_allowance_s", "后处理时间（秒）", "后处理时间(秒)"),
}
SERVICE_HEADERS = {
    "instrument": ("instrument", "仪器编号"),
    "start": ("start", "开始时间"),
    "end": ("end", "结束时间"),
    "applicant": ("applicant", "申请人", "用户"),
    "applicant_unit": ("applicant_unit", "申请单位", "用户单位"),
    "service_type": ("service_type", "服务类型"),
    "direction": ("direction", "服务方向"),
    "amount": ("amount", "金额", "收费金额"),
}
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


def read_table(path: Path) -> Table:
    """Rows of a CSV or XLSX file (first sheet), keyed by header, with the row numbers a user sees."""
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        from openpyxl import load_workbook

        wb = load_workbook(path, read_only=True, data_only=True)
        ws = wb.worksheets[0]
        it = ws.iter_rows(values_only=True)
        header = [str(c).strip() if c is not None else "" for c in next(it, [])]
        table = Table(str(path), header=header)
        for n, values in enumerate(it, start=2):
            if all(v is None or str(v).strip() == "" for v in values):
                continue
            table.rows.append((n, {h: _cell(v) for h, v in zip(header, values, strict=False) if h}))
        wb.close()
        return table
    if suffix in (".csv", ".txt"):
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            table = Table(str(path), header=header)
            for n, values in enumerate(reader, start=2):
                if not any(v.strip() for v in values):
                    continue
                table.rows.append((n, {h: v.strip() for h, v in zip(header, values, strict=False) if h}))
        return table
    raise ImportError_(f"{path}: use a .csv or .xlsx file")


def _cell(v: Any) -> str:
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "" if v is None else str(v).strip()


def _columns(table: Table, spec: dict[str, tuple[str, ...]], required: tuple[str, ...]) -> dict[str, str]:
    """Our key → the file's header for it; every missing required column is an error."""
    found: dict[str, str] = {}
    for key, names in spec.items():
        for h in table.header:
            if h.lower() in names or h in names:
                found[key] = h
                break
    missing = [k for k in required if k not in found]
    if missing:
        wanted = "; ".join(f"{k} ({' / '.join(spec[k][1:2] or spec[k][:1])})" for k in missing)
        raise ImportError_(f"{table.name}: missing column(s): {wanted}")
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
        errors += [f"{table.name}: row {n}: {p}" for p in problems]
        if rec is not None and not problems:
            out.append(rec)
    if errors:
        raise ImportError_("\n".join(errors) + f"\nnothing imported ({len(errors)} problem(s))")
    return out


def import_instruments(ledger: Ledger, path: Path) -> int:
    table = read_table(path)
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
        if category and not (category.isdigit() and len(category) == 6):
            problems.append(f"column 'category': {category!r} is not a 6-digit category code")
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
        return rec

    rows = _validate(table, cols, check)
    ledger.upsert_instruments(rows)
    return len(rows)


@dataclass
class ServiceImport:
    added: int
    duplicates: int


def import_services(ledger: Ledger, path: Path, tz: ZoneInfo, instrument: str | None = None) -> ServiceImport:
    if path.suffix.lower() == ".ics":
        rows = _ics_rows(path, tz, instrument)
        known = {str(i["code"]) for i in ledger.instruments()}
        unknown = sorted({str(r["instrument"]) for r in rows} - known)
        if unknown:
            raise ImportError_(
                f"{path}: unknown instrument(s) {', '.join(map(repr, unknown))} (import them first, "
                "or name the instrument with --instrument)\nnothing imported"
            )
    else:
        table = read_table(path)
        required = ("start", "end") if instrument else ("instrument", "start", "end")
        cols = _columns(table, SERVICE_HEADERS, (*required, "service_type"))
        rows = _validate(table, cols, _service_checker(ledger, tz, instrument, path.name))
    added = ledger.add_service_records(rows)
    return ServiceImport(added, len(rows) - added)


def _service_checker(
    ledger: Ledger, tz: ZoneInfo, instrument: str | None, source: str
) -> Callable[[dict[str, str], list[str]], dict[str, object] | None]:
    known = {str(i["code"]) for i in ledger.instruments()}

    def check(row: dict[str, str], problems: list[str]) -> dict[str, object] | None:
        code = row.get("instrument") or instrument or ""
        if code not in known:
            problems.append(f"column 'instrument': unknown instrument {code!r} (import it first)")
        start = _time(row["start"], "start", tz, problems)
        end = _time(row["end"], "end", tz, problems)
        if start is not None and end is not None and end <= start:
            problems.append(f"column 'end': {row['end']!r} is not after start {row['start']!r}")
        st = SERVICE_TYPES.get(row.get("service_type", "").strip().lower())
        if st is None:
            problems.append(
                f"column 'service_type': {row.get('service_type', '')!r} is not 120/internal or 130/external"
            )
        direction = DIRECTIONS.get((row.get("direction") or "138").strip().lower())
        if direction is None:
            problems.append(f"column 'direction': {row.get('direction')!r} is not 135-138")
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
    try:
        dt = datetime.fromisoformat(text.strip().replace("/", "-"))
    except ValueError:
        problems.append(f"column '{key}': cannot read {text!r} as a time (use 2026-03-02 08:30)")
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return int(dt.timestamp() * 1000)


def _ics_rows(path: Path, tz: ZoneInfo, instrument: str | None) -> list[dict[str, object]]:
    """VEVENTs as service records: LOCATION (or --instrument) is the instrument, SUMMARY the applicant,
    CATEGORIES says internal/external (120/130) and optionally the direction (135-138)."""
    from icalendar import Calendar

    try:
        cal = Calendar.from_ical(path.read_bytes())
    except ValueError as exc:
        raise ImportError_(f"{path}: not an iCalendar file ({exc})") from None
    rows: list[dict[str, object]] = []
    errors: list[str] = []
    for n, ev in enumerate(cal.walk("VEVENT"), start=1):
        where = f"{path}: event {n} ({ev.get('UID', '')})"
        code = str(ev.get("LOCATION") or instrument or "")
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
        words = (
            [
                str(w).strip().lower()
                for c in (cats if isinstance(cats, list) else [cats] if cats else [])
                for w in c.cats
            ]
            if cats
            else []
        )
        st = next((SERVICE_TYPES[w] for w in words if w in SERVICE_TYPES), None)
        if st is None:
            errors.append(f"{where}: CATEGORIES must say internal/120 or external/130")
            continue
        direction = next((DIRECTIONS[w] for w in words if w in DIRECTIONS and w not in SERVICE_TYPES), 138)
        if end <= start:
            errors.append(f"{where}: DTEND is not after DTSTART")
            continue
        rows.append(
            {
                "instrument": code,
                "start_ms": int(start.timestamp() * 1000),
                "end_ms": int(end.timestamp() * 1000),
                "applicant": str(ev.get("SUMMARY", "")),
                "applicant_unit": str(ev.get("X-APPLICANT-UNIT", "")),
                "service_type": st,
                "direction": direction,
                "amount": None,
                "source": path.name,
            }
        )
    if errors:
        raise ImportError_("\n".join(errors) + f"\nnothing imported ({len(errors)} problem(s))")
    return rows
