"""Hours reports: per instrument, owning unit, category or month; as a table, CSV, JSON or XLSX.

Column names come in English and Chinese (the evaluation forms' own terms).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from labmeter.collector.cells import append_row, to_csv
from labmeter.collector.hours import Hours
from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import stored_number
from labmeter.collector.rollup import Rollups
from labmeter.config import PolicyConfig
from labmeter.log import printable

H = 3_600_000
YEAR_MS = 365 * 86_400_000
GROUPINGS = ("instrument", "unit", "category", "month")

# key, English, Chinese
KEY_HEADERS = {
    "instrument": ("Instrument", "仪器编号"),
    "unit": ("Unit", "管理单位"),
    "category": ("Category", "分类编码"),
    "month": ("Month", "月份"),
}
COLUMNS: list[tuple[str, str, str]] = [
    ("name", "Name", "仪器名称"),
    ("unit", "Unit", "管理单位"),
    ("instruments", "Instruments", "仪器台数"),
    ("run_h", "Run hours (h)", "运行机时 (h)"),
    ("effective_h", "Effective hours (h)", "有效机时 (h)"),
    ("service_h", "Service hours (h)", "服务机时 (h)"),
    ("external_h", "External service hours (h)", "对外服务机时 (h)"),
    ("rated_h", "Rated hours (h)", "定额机时 (h)"),
    ("utilisation_pct", "Utilisation (%)", "机时利用率 (%)"),
    ("sharing_pct", "Sharing rate (%)", "共享率 (%)"),
    ("coverage_pct", "Coverage (%)", "数据覆盖率 (%)"),
    ("standby_h", "Standby (h)", "待机 (h)"),
    ("off_h", "Off (h)", "关机 (h)"),
    ("unknown_h", "Unknown (h)", "状态未知 (h)"),
    ("unverified_h", "Unverified (h)", "未验证 (h)"),
    ("uncovered_h", "No data (h)", "无数据 (h)"),
]
TOTAL = ("TOTAL", "合计")


class PeriodError(ValueError):
    pass


def parse_time(text: str, tz: ZoneInfo, end: bool = False) -> int:
    """A date (local midnight; as --to, the end of that day) or an ISO time, to UTC ms."""
    try:
        if len(text) == 10:
            d = date.fromisoformat(text) + (timedelta(days=1) if end else timedelta())
            dt = datetime(d.year, d.month, d.day, tzinfo=tz)
        else:
            dt = datetime.fromisoformat(text)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=tz)
    except ValueError:
        raise PeriodError(f"{text!r} is not a date (2026-01-31) or time (2026-01-31T08:00)") from None
    return int(dt.timestamp() * 1000)


@dataclass
class Row:
    key: str
    name: str
    unit: str
    hours: Hours

    def values(self) -> dict[str, Any]:
        h = self.hours
        return {
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "instruments": h.instruments,
            "run_h": round(h.run_ms / H, 2),
            "effective_h": round(h.effective_ms / H, 2),
            "service_h": round(h.service_ms / H, 2),
            "external_h": round(h.external_ms / H, 2),
            "rated_h": round(h.rated_ms / H, 2),
            "utilisation_pct": round(100 * h.effective_ms / h.rated_ms, 1) if h.rated_ms else None,
            "sharing_pct": round(100 * h.external_ms / h.effective_ms, 1) if h.effective_ms else None,
            "coverage_pct": round(100 * h.coverage, 1),
            "standby_h": round(h.standby_ms / H, 2),
            "off_h": round(h.off_ms / H, 2),
            "unknown_h": round(h.unknown_ms / H, 2),
            "unverified_h": round(h.unverified_ms / H, 2),
            "uncovered_h": round(h.uncovered_ms / H, 2),
        }


def rated_ms(info: dict[str, object], policy: PolicyConfig, period_ms: int) -> int:
    """Rated hours (定额机时) for a year, prorated to the period."""
    override = stored_number(info, "rated_hours")
    if override is not None:
        yearly = override
    elif info.get("kind") == "special":
        yearly = policy.rated_hours_special
    else:
        yearly = policy.rated_hours_general
    return round(yearly * H * period_ms / YEAR_MS)


def per_instrument(ledger: Ledger, a: int, b: int, policy: PolicyConfig) -> dict[str, Hours]:
    """Hours and rated hours per instrument in [a, b), from rollups and the intervals at the edges."""
    rollups = Rollups(ledger, policy)
    out = rollups.hours(a, b)
    registry = rollups.registry()
    for code, h in out.items():
        h.rated_ms = rated_ms(registry.get(code, {}), policy, b - a)
    return dict(sorted(out.items()))


def months(a: int, b: int, tz: ZoneInfo) -> list[tuple[str, int, int]]:
    """The local calendar months that [a, b) touches, clipped to it."""
    out = []
    t = datetime.fromtimestamp(a / 1000, tz)
    first = datetime(t.year, t.month, 1, tzinfo=tz)
    while int(first.timestamp() * 1000) < b:
        nxt = datetime(first.year + first.month // 12, first.month % 12 + 1, 1, tzinfo=tz)
        lo, hi = max(a, int(first.timestamp() * 1000)), min(b, int(nxt.timestamp() * 1000))
        out.append((f"{first.year}-{first.month:02d}", lo, hi))
        first = nxt
    return out


def hours_reports(
    ledger: Ledger, a: int, b: int, policy: PolicyConfig, groupings: Sequence[str], tz: ZoneInfo | None = None
) -> dict[str, list[Row]]:
    """Several groupings of one period, computing the per-instrument hours once."""
    hours = per_instrument(ledger, a, b, policy) if b > a else None
    return {by: hours_report(ledger, a, b, policy, by, tz, hours) for by in groupings}


def hours_report(
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    by: str = "instrument",
    tz: ZoneInfo | None = None,
    hours: dict[str, Hours] | None = None,
) -> list[Row]:
    """Rows for one grouping, and a totals row last; ``hours`` per instrument if already computed."""
    if b <= a:
        raise PeriodError("--to must be after --from")
    if by not in GROUPINGS:
        raise PeriodError(f"--by {by!r}: use one of {', '.join(GROUPINGS)}")
    rows: list[Row] = []
    if by == "month":
        for label, lo, hi in months(a, b, tz or ZoneInfo(policy.timezone)):
            row = Row(label, "", "", Hours())
            for h in per_instrument(ledger, lo, hi, policy).values():
                row.hours.add(h)
            rows.append(row)
    else:
        if hours is None:
            hours = per_instrument(ledger, a, b, policy)
        registry = {str(i["code"]): i for i in ledger.instruments()}
        for code, h in hours.items():
            info = registry.get(code, {})
            rows.append(Row(code, str(info.get("name") or ""), str(info.get("unit") or ""), h))
        if by in ("unit", "category"):
            groups: dict[str, Row] = {}
            for r in rows:
                label = str(registry.get(r.key, {}).get(by) or "-")
                g = groups.setdefault(label, Row(label, "", label if by == "unit" else "", Hours()))
                g.hours.add(r.hours)
            rows = [groups[k] for k in sorted(groups)]
    total = Row(TOTAL[0], "", "", Hours())
    for r in rows:
        total.hours.add(r.hours)
    if by == "month":
        total.hours.instruments = max((r.hours.instruments for r in rows), default=0)
    return [*rows, total]


def columns_for(by: str) -> list[tuple[str, str, str]]:
    keep = [c for c in COLUMNS if not (by != "instrument" and c[0] in ("name", "unit"))]
    if by == "instrument":
        keep = [c for c in keep if c[0] != "instruments"]
    en, zh = KEY_HEADERS[by]
    return [("key", en, zh), *keep]


def render(rows: list[Row], fmt: str, lang: str = "zh", by: str = "instrument") -> str:
    cols = columns_for(by)
    header = [zh if lang == "zh" else en for _, en, zh in cols]
    data = [r.values() for r in rows]
    if lang == "zh" and data:
        data[-1]["key"] = TOTAL[1]
    if fmt == "json":
        return (
            json.dumps([{k: d[k] for k, _, _ in cols} for d in data[:-1]], ensure_ascii=False, indent=2)
            + "\n"
        )
    if fmt == "csv":
        return to_csv([header, *(["" if d[k] is None else d[k] for k, _, _ in cols] for d in data)])
    shown = [c for c in cols if c[0] not in ("name", "unit", "standby_h", "off_h")]
    cells = [[(zh if lang == "zh" else en) for _, en, zh in shown]]
    cells += [[_fmt(d[k]) for k, _, _ in shown] for d in data]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(shown))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(_pad(c, w, left=(i == 0)) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0 or n == len(cells) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def write_xlsx(path: Path, sheets: dict[str, list[Row]], lang: str = "zh") -> None:
    """One sheet per grouping: header row frozen, units in the headers, a totals row last."""
    from openpyxl import Workbook
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    names = {
        "instrument": ("By instrument", "按仪器"),
        "unit": ("By unit", "按单位"),
        "category": ("By category", "按类别"),
        "month": ("By month", "按月份"),
    }
    wb = Workbook()
    wb.remove(wb.active)
    for by, rows in sheets.items():
        ws = wb.create_sheet(names[by][1] if lang == "zh" else names[by][0])
        cols = columns_for(by)
        append_row(ws, [zh if lang == "zh" else en for _, en, zh in cols])
        for cell in ws[1]:
            cell.font = Font(bold=True)
        data = [r.values() for r in rows]
        if lang == "zh" and data:
            data[-1]["key"] = TOTAL[1]
        for d in data:
            append_row(ws, [d[k] for k, _, _ in cols])
        for cell in ws[ws.max_row]:
            cell.font = Font(bold=True)
        ws.freeze_panes = "B2"
        for i, (_, en, zh) in enumerate(cols, start=1):
            ws.column_dimensions[get_column_letter(i)].width = max(10, len(zh if lang == "zh" else en) + 4)
    wb.save(path)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else printable(v)


def _width(s: str) -> int:
    return sum(2 if ord(ch) > 0x2E7F else 1 for ch in s)


def _pad(s: str, w: int, left: bool) -> str:
    space = " " * (w - _width(s))
    return s + space if left else space + s
