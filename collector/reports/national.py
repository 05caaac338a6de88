"""The national instrument-sharing platform export and the evaluation findings.

Field names and codes are the platform's as vendors' integration code sends them (docs/national.md
lists each field, where it comes from and what is unverified): instrument records (``instruType``
4) with ``runMachine`` and ``serviceMachine`` for a year, service records (``instruType`` 6) with
``serviceType`` (120 internal, 130 external), ``serviceDirection`` (135-138), ``serviceWay`` and an
hour-precision ``endTime``. Where the platform's precision loses something (whole hours for times,
0.1 h for hours) our exact figures go beside it, under ``labmeter`` (JSON) or in columns marked
"labmeter" (XLSX), so nothing is rounded without a word. Hours come from metered time: service
hours are effective time inside the bookings, not booking length.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from labmeter.collector.ledger import Ledger
from labmeter.collector.ledger.rollup import allowances_ms
from labmeter.collector.registry import stored_number
from labmeter.collector.reports.cells import append_row
from labmeter.collector.reports.formats import FormatError, choose
from labmeter.collector.reports.hours import category_name, category_warnings, metering_starts, per_instrument
from labmeter.config import PolicyConfig
from labmeter.machine_hours import HOUR_MS as H
from labmeter.machine_hours import compute

FORMAT = "labmeter-national/1"
INSTRUMENT_TYPE, SERVICE_TYPE = 4, 6
"""``instruType`` of instrument and service records."""
KINDS = {"general": "通用", "special": "专用"}
SERVICE_TYPE_LABELS = {120: "内部", 130: "外部"}
DIRECTION_LABELS = {135: "科学研究", 136: "科技开发", 137: "教学", 138: "其他"}
LOW_COVERAGE = 0.5
"""Below this share of the year's elapsed time with a known state, an instrument's hours are flagged."""
OFFERED = ("json", "xlsx")


class ExportError(ValueError):
    """An export that cannot be written as asked (e.g. an output format the export has no form for)."""


def format_for(path: Path) -> str:
    """The output format from the file's extension; anything else is refused, never silently JSON."""
    try:
        return choose(None, path, OFFERED, "the national export")
    except FormatError:
        raise ExportError(
            f"{path}: the national export is written as .json (what the platform takes) or .xlsx "
            f"(for people); {path.suffix or 'no extension'} is neither (CSV cannot hold its two tables)"
        ) from None


def _hour(ms: int, tz: ZoneInfo, up: bool) -> str:
    """``YYYY-MM-DD HH``, the platform's precision: a start rounds down, an end up."""
    dt = datetime.fromtimestamp(ms / 1000, tz)
    floor = dt.replace(minute=0, second=0, microsecond=0)
    if up and floor != dt:
        floor += timedelta(hours=1)
    return floor.strftime("%Y-%m-%d %H")


def _exact(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="seconds")


def _seconds(ms: int) -> int | float:
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def national_export(
    ledger: Ledger,
    year: int,
    policy: PolicyConfig,
    tz: ZoneInfo,
    ins_code: str = "",
    now_ms: int | None = None,
) -> dict[str, Any]:
    """The year's instrument and service records in the platform's fields, our exact figures beside them,
    and warnings where the year is not over or its coverage is too thin to stand for the year."""
    from labmeter import __version__

    now = int(time.time() * 1000) if now_ms is None else now_ms
    a = int(datetime(year, 1, 1, tzinfo=tz).timestamp() * 1000)
    b = int(datetime(year + 1, 1, 1, tzinfo=tz).timestamp() * 1000)
    starts = metering_starts(ledger)
    hours = per_instrument(ledger, a, b, policy, now, starts)
    registry = ledger.instruments_by_code()
    elapsed = max(0, min(b, now) - a)
    warnings: list[str] = []
    if now < b:
        warnings.append(
            f"{year} is not over: hours are counted up to {_exact(now, tz)}; runMachine and "
            "serviceMachine are not the year's totals yet"
        )
    if not any(h.known_ms for h in hours.values()):
        warnings.append(
            f"no metered data at all in {year}: every runMachine and serviceMachine is 0 because "
            "nothing was measured, not because the instruments were idle; do not submit these as measured"
        )
    warnings += category_warnings(registry)
    instruments = []
    for code, h in hours.items():
        info = registry.get(code, {"code": code})
        share = h.known_ms / elapsed if elapsed else 0.0
        if not h.known_ms and any(x.known_ms for x in hours.values()):
            warnings.append(f"{code}: no metered data in {year}; its runMachine 0 is not a measurement")
        elif h.known_ms and share < LOW_COVERAGE:
            warnings.append(
                f"{code}: its state is known for only {100 * share:.0f}% of {year} so far "
                f"({h.known_ms / H:.1f} h of {elapsed / H:.0f} h); its hours under-count the year"
            )
        instruments.append(
            {
                "innerId": code,
                "cname": str(info.get("name") or ""),
                "insCode": ins_code,
                "instrCategory": str(info.get("category") or ""),
                "worth": stored_number(info, "value_wan"),
                "type": KINDS.get(str(info.get("kind") or "general"), "通用"),
                "shareMode": str(info.get("share_mode") or ""),
                "runMachine": round(h.run_ms / H, 1),
                "serviceMachine": round(h.service_ms / H, 1),
                "labmeter": {
                    "unit": str(info.get("unit") or ""),
                    "categoryName": category_name(str(info.get("category") or ""))
                    if info.get("category")
                    else "",
                    "run_s": _seconds(h.run_ms),
                    "effective_s": _seconds(h.effective_ms),
                    "service_s": _seconds(h.service_ms),
                    "external_s": _seconds(h.external_ms),
                    "meteredFrom": _exact(starts[code], tz) if code in starts else None,
                    "metered_s": _seconds(h.period_ms),
                    "notMetered_s": _seconds(h.not_metered_ms),
                    "known_s": _seconds(h.known_ms),
                    "coverageOfYearPct": round(100 * share, 1),
                    "coverageOfMeteredPct": round(100 * h.coverage, 1) if h.period_ms else None,
                },
            }
        )
    records = [_service_record(ledger, r, policy, registry, tz) for r in ledger.service_records(a, b)]
    return {
        "format": FORMAT,
        "meta": {
            "year": year,
            "timezone": tz.key,
            "insCode": ins_code,
            "generated_at": _exact(now, tz),
            "counted_up_to": _exact(min(b, now), tz),
            "labmeter_version": __version__,
            "ledger": ledger.name,
            "fields": "docs/national.md: the platform's field names and codes, where each comes from, what is unverified",
            "precision": "endTime/startTime at whole hours (start down, end up) and hours at 0.1 h are the platform's; exact values are under 'labmeter'",
        },
        "warnings": warnings,
        "instruments": {"instruType": INSTRUMENT_TYPE, "insCode": ins_code, "instruList": instruments},
        "serviceRecords": {"instruType": SERVICE_TYPE, "insCode": ins_code, "instruList": records},
    }


def _service_record(
    ledger: Ledger,
    r: dict[str, Any],
    policy: PolicyConfig,
    registry: dict[str, dict[str, object]],
    tz: ZoneInfo,
) -> dict[str, Any]:
    """One service record: the platform's fields, and the metered hours inside the booking beside them."""
    code, s, e, st = str(r["instrument"]), int(r["start_ms"]), int(r["end_ms"]), int(r["service_type"])
    prep, post = allowances_ms(registry.get(code, {}), policy)
    pad = max(prep, post)
    rows = [x.span() for x in ledger.intervals_between(s - pad, e + pad, code)]
    h = compute(rows, s, e, prep, post, [(s, e, st == 130)])
    return {
        "recordInnerId": str(r["id"]),
        "innerId": code,
        "serviceType": st,
        "serviceDirection": int(r["direction"]),
        "serviceWay": str(r.get("service_way") or ""),
        "amounts": stored_number({"code": code, "amount": r["amount"]}, "amount"),
        "startTime": _hour(s, tz, up=False),
        "endTime": _hour(e, tz, up=True),
        "applicant": str(r["applicant"] or ""),
        "applicantUnit": str(r["applicant_unit"] or ""),
        "serviceContent": str(r.get("content") or ""),
        "labmeter": {
            "start": _exact(s, tz),
            "end": _exact(e, tz),
            "booked_s": _seconds(e - s),
            "service_s": _seconds(h.service_ms),
            "run_s": _seconds(h.run_ms),
            "serviceTypeLabel": SERVICE_TYPE_LABELS.get(st, ""),
            "serviceDirectionLabel": DIRECTION_LABELS.get(int(r["direction"]), ""),
            "batch": r.get("batch"),
        },
    }


INSTRUMENT_SHEET = [
    ("innerId", "仪器编号 innerId"),
    ("cname", "仪器名称 cname"),
    ("insCode", "单位代码 insCode"),
    ("instrCategory", "分类编码 instrCategory"),
    ("labmeter.categoryName", "分类名称 (labmeter)"),
    ("worth", "原值（万元） worth"),
    ("type", "仪器类型 type"),
    ("shareMode", "共享模式 shareMode"),
    ("runMachine", "年总运行机时 runMachine (h, 0.1)"),
    ("serviceMachine", "年服务机时 serviceMachine (h, 0.1)"),
    ("labmeter.run_s", "运行机时 exact (s, labmeter)"),
    ("labmeter.effective_s", "有效机时 exact (s, labmeter)"),
    ("labmeter.service_s", "服务机时 exact (s, labmeter)"),
    ("labmeter.external_s", "对外服务机时 exact (s, labmeter)"),
    ("labmeter.coverageOfYearPct", "全年数据覆盖率 (%, labmeter)"),
    ("labmeter.coverageOfMeteredPct", "计量时长内覆盖率 (%, labmeter)"),
    ("labmeter.meteredFrom", "计量起始时间 (labmeter)"),
    ("labmeter.notMetered_s", "未计量 (s, labmeter)"),
    ("labmeter.unit", "管理单位 (labmeter)"),
]
SERVICE_SHEET = [
    ("recordInnerId", "记录编号 recordInnerId"),
    ("innerId", "仪器编号 innerId"),
    ("serviceType", "服务类型 serviceType"),
    ("labmeter.serviceTypeLabel", "服务类型名称 (labmeter)"),
    ("serviceDirection", "服务方向 serviceDirection"),
    ("labmeter.serviceDirectionLabel", "服务方向名称 (labmeter)"),
    ("serviceWay", "服务方式 serviceWay"),
    ("amounts", "金额（元） amounts"),
    ("startTime", "开始时间 startTime (hour)"),
    ("endTime", "结束时间 endTime (hour)"),
    ("labmeter.start", "开始时间 exact (labmeter)"),
    ("labmeter.end", "结束时间 exact (labmeter)"),
    ("labmeter.service_s", "服务机时 metered (s, labmeter)"),
    ("labmeter.booked_s", "预约时长 (s, labmeter)"),
    ("applicant", "申请人 applicant"),
    ("applicantUnit", "申请单位 applicantUnit"),
    ("serviceContent", "服务内容 serviceContent"),
]


def _get(item: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        item = item.get(part) if isinstance(item, dict) else None  # type: ignore[assignment]
    return item


def write_national(data: dict[str, Any], path: Path) -> None:
    """JSON (the platform's shape, our figures under ``labmeter``) or XLSX (说明, 仪器机时, 服务记录)."""
    fmt = format_for(path)
    if fmt == "json":
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter

    wb = Workbook()
    about = wb.active
    about.title = "说明"
    append_row(about, ["项目 Item", "内容 Value"])
    for key, value in data["meta"].items():
        append_row(about, [key, str(value)])
    for n, w in enumerate(data["warnings"], start=1):
        append_row(about, [f"警告 Warning {n}", w])
    about.column_dimensions["A"].width = 24
    about.column_dimensions["B"].width = 100
    for row in about.iter_rows():
        for cell in row:
            cell.alignment = Alignment(wrap_text=True, vertical="top")
    for title, cols, items in (
        ("仪器机时", INSTRUMENT_SHEET, data["instruments"]["instruList"]),
        ("服务记录", SERVICE_SHEET, data["serviceRecords"]["instruList"]),
    ):
        ws = wb.create_sheet(title)
        append_row(ws, [h for _, h in cols])
        for cell in ws[1]:
            cell.font = Font(bold=True)
        for item in items:
            append_row(ws, [_get(item, k) for k, _ in cols])
        ws.freeze_panes = "B2"
        ws.auto_filter.ref = f"A1:{get_column_letter(len(cols))}{ws.max_row}"
        for i, (_, h) in enumerate(cols, start=1):
            ws.column_dimensions[get_column_letter(i)].width = min(40, max(12, len(h) + 2))
    wb.save(path)


def findings(
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    low_use_pct: float,
    min_coverage_pct: float,
    now_ms: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """What a bureau should act on: idle instruments, poorly covered ones, and ones nobody measures. Each
    is judged on its metered part of the period, so an unfinished period counts up to now."""
    hours = per_instrument(ledger, a, b, policy, now_ms)
    registry = ledger.instruments_by_code()
    enrolled = {inst for _agent, inst in ledger.enrolments()}
    low, poor, none = [], [], []
    for code, h in hours.items():
        base = {
            "instrument": code,
            "name": registry.get(code, {}).get("name") or "",
            "unit": registry.get(code, {}).get("unit") or "",
        }
        if code not in enrolled or h.known_ms == 0:
            none.append(
                {**base, "reason": "no agent enrolled" if code not in enrolled else "no data in the period"}
            )
            continue
        util = 100 * h.effective_ms / h.rated_ms if h.rated_ms else 0.0
        if util < low_use_pct:
            low.append(
                {
                    **base,
                    "utilisation_pct": round(util, 1),
                    "effective_h": round(h.effective_ms / H, 2),
                    "rated_h": round(h.rated_ms / H, 2),
                }
            )
        cov = 100 * h.coverage
        if cov < min_coverage_pct:
            poor.append(
                {
                    **base,
                    "coverage_pct": round(cov, 1),
                    "unknown_h": round(h.unknown_ms / H, 2),
                    "no_data_h": round((h.uncovered_ms + h.unverified_ms) / H, 2),
                }
            )
    return {"low_use": low, "poor_coverage": poor, "no_data": none}
