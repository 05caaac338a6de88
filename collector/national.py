"""The national instrument-sharing platform export and the evaluation findings.

Per instrument ``runMachine`` (run hours) and ``serviceMachine`` (service hours) for a
year, and the service records with hour-precision start and end, ``serviceType``
(120 internal, 130 external), ``serviceDirection`` (135-138), applicant unit and amount.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from labmeter.collector.cells import append_row
from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import stored_number
from labmeter.collector.report import per_instrument
from labmeter.config import PolicyConfig

H = 3_600_000


def _hour(ms: int, tz: ZoneInfo, up: bool) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz)
    floor = dt.replace(minute=0, second=0, microsecond=0)
    if up and floor != dt:
        floor += timedelta(hours=1)
    return floor.strftime("%Y-%m-%d %H:00")


def national_export(ledger: Ledger, year: int, policy: PolicyConfig, tz: ZoneInfo) -> dict[str, Any]:
    a = int(datetime(year, 1, 1, tzinfo=tz).timestamp() * 1000)
    b = int(datetime(year + 1, 1, 1, tzinfo=tz).timestamp() * 1000)
    hours = per_instrument(ledger, a, b, policy)
    registry = {str(i["code"]): i for i in ledger.instruments()}
    instruments = [
        {
            "instrumentCode": code,
            "instrumentName": registry.get(code, {}).get("name") or "",
            "unit": registry.get(code, {}).get("unit") or "",
            "runMachine": round(h.run_ms / H, 1),
            "serviceMachine": round(h.service_ms / H, 1),
        }
        for code, h in hours.items()
    ]
    records = [
        {
            "instrumentCode": inst,
            "startTime": _hour(s, tz, up=False),
            "endTime": _hour(e, tz, up=True),
            "serviceType": st,
            "serviceDirection": direction,
            "applicantUnit": unit,
            "amount": stored_number({"code": inst, "amount": amount}, "amount"),
        }
        for inst, s, e, st, direction, unit, amount in ledger.db.execute(
            "SELECT instrument, start_ms, end_ms, service_type, direction, applicant_unit, amount "
            "FROM service_records WHERE start_ms < ? AND end_ms > ? ORDER BY instrument, start_ms",
            (b, a),
        )
    ]
    return {"year": year, "instruments": instruments, "serviceRecords": records}


def write_national(data: dict[str, Any], path: Path) -> None:
    if path.suffix.lower() == ".xlsx":
        from openpyxl import Workbook

        wb = Workbook()
        ws = wb.active
        ws.title = "仪器机时"
        append_row(
            ws,
            [
                "仪器编号 instrumentCode",
                "仪器名称",
                "管理单位",
                "运行机时 runMachine (h)",
                "服务机时 serviceMachine (h)",
            ],
        )
        for i in data["instruments"]:
            append_row(
                ws,
                [i["instrumentCode"], i["instrumentName"], i["unit"], i["runMachine"], i["serviceMachine"]],
            )
        ws.freeze_panes = "A2"
        ws2 = wb.create_sheet("服务记录")
        append_row(
            ws2,
            [
                "仪器编号 instrumentCode",
                "开始时间 startTime",
                "结束时间 endTime",
                "服务类型 serviceType",
                "服务方向 serviceDirection",
                "申请单位 applicantUnit",
                "金额 amount",
            ],
        )
        for r in data["serviceRecords"]:
            append_row(
                ws2,
                [
                    r["instrumentCode"],
                    r["startTime"],
                    r["endTime"],
                    r["serviceType"],
                    r["serviceDirection"],
                    r["applicantUnit"],
                    r["amount"],
                ],
            )
        ws2.freeze_panes = "A2"
        wb.save(path)
    else:
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


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
    registry = {str(i["code"]): i for i in ledger.instruments()}
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
