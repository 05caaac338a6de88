"""The hours report: per instrument or per owning unit, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from labmeter.collector.hours import Hours, compute
from labmeter.collector.ledger import Ledger

from labmeter.config import PolicyConfig

H = 3_600_000

COLUMNS: list[tuple[str, str, str]] = [
    # key, English, Chinese
    ("key", "Instrument", "仪器编号"),
    ("name", "Name", "仪器名称"),
    ("unit", "Unit", "管理单位"),
    ("run_h", "Run hours (h)", "运行机时 (h)"),
    ("effective_h", "Effective hours (h)", "有效机时 (h)"),
    ("standby_h", "Standby (h)", "待机 (h)"),
    ("off_h", "Off (h)", "关机 (h)"),
    ("unknown_h", "Unknown (h)", "状态未知 (h)"),
    ("unverified_h", "Unverified (h)", "未验证 (h)"),
    ("uncovered_h", "Uncovered (h)", "无数据 (h)"),
    ("coverage_pct", "Coverage (%)", "覆盖率 (%)"),
]


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

    def values(self) -> dict[str, object]:
        h = self.hours
        return {
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "run_h": round(h.run_ms / H, 3),
            "effective_h": round(h.effective_ms / H, 3),
            "standby_h": round(h.standby_ms / H, 3),
            "off_h": round(h.off_ms / H, 3),
            "unknown_h": round(h.unknown_ms / H, 3),
            "unverified_h": round(h.unverified_ms / H, 3),
            "uncovered_h": round(h.uncovered_ms / H, 3),
            "coverage_pct": round(100 * h.coverage, 1),
        }


def hours_report(ledger: Ledger, a: int, b: int, policy: PolicyConfig, by: str = "instrument") -> list[Row]:
    if b <= a:
        raise PeriodError("--to must be after --from")
    prep, post = policy.prep_allowance_s * 1000, policy.post_allowance_s * 1000
    pad = max(prep, post)
    per: dict[str, list[tuple[int, int, str, bool]]] = defaultdict(list)
    for instrument, _agent, _seq, start, end, state, linked in ledger.intervals_between(a - pad, b + pad):
        per[instrument].append((start, end, state, bool(linked)))
    registry = {str(i["code"]): i for i in ledger.instruments()}
    rows: list[Row] = []
    for code in sorted(set(registry) | set(per)):
        info = registry.get(code, {})
        rows.append(
            Row(
                code,
                str(info.get("name") or ""),
                str(info.get("unit") or ""),
                compute(per[code], a, b, prep, post),
            )
        )
    if by == "unit":
        units: dict[str, Row] = {}
        for r in rows:
            u = units.setdefault(r.unit, Row(r.unit or "-", "", r.unit, Hours()))
            u.hours.add(r.hours)
        rows = [units[k] for k in sorted(units)]
    total = Row("TOTAL", "", "", Hours())
    for r in rows:
        total.hours.add(r.hours)
    return [*rows, total]


def render(rows: list[Row], fmt: str, lang: str = "en") -> str:
    header = {k: (zh if lang == "zh" else en) for k, en, zh in COLUMNS}
    data = [r.values() for r in rows]
    if fmt == "json":
        return json.dumps([d for d in data if d["key"] != "TOTAL"], ensure_ascii=False, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([header[k] for k, _, _ in COLUMNS])
        for d in data:
            w.writerow([d[k] for k, _, _ in COLUMNS])
        return buf.getvalue()
    cols = [k for k, _, _ in COLUMNS if k not in ("name", "unit")]
    cells = [[header[k] for k in cols]] + [[_fmt(d[k]) for k in cols] for d in data]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(_pad(c, w, left=(i == 0)) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0 or n == len(cells) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _width(s: str) -> int:
    return sum(2 if ord(ch) > 0x2E7F else 1 for ch in s)


def _pad(s: str, w: int, left: bool) -> str:
    space = " " * (w - _width(s))
    return s + space if left else space + s
