"""Hours reports: per instrument, owning unit, category or month; as a table, CSV, JSON or XLSX.

Column names come in English and Chinese (the evaluation forms' own terms). Every file explains
itself: XLSX has a 说明 (About) sheet, JSON a ``meta`` object, both with the period, time zone,
allowances, rated-hours basis, generation time, version, ledger and every column's definition.

An instrument is judged on its metered part of the period only: from when its metering began (the
registry's metering start, else its first interval) to the end of the period or now, whichever is
first. Time before metering began is "not metered" (未计量), time still to come is nothing; neither is
"no data", and rated hours are prorated to the metered part (``metered_rated_ms``, which the live view
uses too).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from labmeter import energy
from labmeter.collector.ledger import Ledger
from labmeter.collector.ledger.rollup import Rollups
from labmeter.collector.registry import stored_number
from labmeter.collector.reports.cells import append_row, to_csv
from labmeter.config import PolicyConfig
from labmeter.log import printable, text_width
from labmeter.machine_hours import HOUR_MS as H
from labmeter.machine_hours import Hours

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
    ("internal_h", "Internal service hours (h)", "对内服务机时 (h)"),
    ("external_h", "External service hours (h)", "对外服务机时 (h)"),
    ("rated_h", "Rated hours (h)", "定额机时 (h)"),
    ("utilisation_pct", "Utilisation (%)", "机时利用率 (%)"),
    ("sharing_pct", "Sharing rate (%)", "共享率 (%)"),
    ("coverage_pct", "Coverage (%)", "数据覆盖率 (%)"),
    ("energy_kwh", "Energy (kWh)", "电能(kWh)"),
    ("standby_h", "Standby (h)", "待机 (h)"),
    ("off_h", "Off (h)", "关机 (h)"),
    ("unknown_h", "Unknown (h)", "状态未知 (h)"),
    ("unverified_h", "Unverified (h)", "未验证 (h)"),
    ("uncovered_h", "No data (h)", "无数据 (h)"),
    ("metered_h", "Metered time (h)", "计量时长 (h)"),
    ("not_metered_h", "Not metered (h)", "未计量 (h)"),
]
REGISTRY_COLUMNS: list[tuple[str, str, str]] = [
    ("category", "Category", "分类编码"),
    ("category_name", "Category name", "分类名称"),
    ("kind", "General/special", "通用/专用"),
    ("department", "Department", "所在部门"),
    ("value_wan", "Value (10k yuan)", "原值（万元）"),
    ("share_mode", "Share mode", "共享模式"),
    ("metered_from", "Metered since", "计量起始时间"),
]
"""Registry facts beside an instrument's hours (instrument sheet only), after the figures."""
TOTAL = ("TOTAL", "合计")
MS_KEYS = {
    "run_h": "run_ms",
    "effective_h": "effective_ms",
    "service_h": "service_ms",
    "internal_h": "internal_ms",
    "external_h": "external_ms",
    "rated_h": "rated_ms",
    "standby_h": "standby_ms",
    "off_h": "off_ms",
    "unknown_h": "unknown_ms",
    "unverified_h": "unverified_ms",
    "uncovered_h": "uncovered_ms",
    "metered_h": "period_ms",
    "not_metered_h": "not_metered_ms",
}
"""Each hours column and the exact milliseconds behind it (seconds in JSON and CSV)."""
DEFINITIONS: dict[str, tuple[str, str]] = {
    "key": (
        "The row: instrument code, owning unit, category code or local month.",
        "本行对象：仪器编号、管理单位、分类编码或月份。",
    ),
    "name": ("Instrument name from the registry.", "仪器名称（来自仪器台账）。"),
    "unit": ("Owning unit from the registry.", "管理单位（来自仪器台账）。"),
    "instruments": ("Instruments in the row.", "本行仪器台数。"),
    "run_h": (
        "Time in RUNNING state, from signed intervals.",
        "运行状态（RUNNING）时长，来自签名的计量区间。",
    ),
    "effective_h": (
        "Running time plus standby directly before a run (up to the prep allowance) and directly after it (up to the post allowance); idle running is not excluded by the meter.",
        "有效机时 = 运行时长 + 紧邻运行前的待机（至多准备时间）+ 紧邻运行后的待机（至多后处理时间）。",
    ),
    "service_h": (
        "Effective time inside any service record (booking) of the instrument; overlapping bookings count once.",
        "服务机时：落在服务记录（预约）时段内的有效机时；重叠预约只计一次。",
    ),
    "internal_h": (
        "Service hours that are not external (service type 120).",
        "对内服务机时：服务类型 120（对内）的服务机时。",
    ),
    "external_h": (
        "Effective time inside an external service record (service type 130).",
        "对外服务机时：落在对外（130）服务记录内的有效机时。",
    ),
    "rated_h": (
        "Rated hours (定额机时): the registry's own or the policy's yearly figure (general/special), prorated to the metered part of the period (metered time over a 365-day year).",
        "定额机时：台账值或政策年定额（通用/专用），按本期计量时长折算（计量时长 / 365 天）。",
    ),
    "utilisation_pct": ("Effective hours / rated hours.", "机时利用率 = 有效机时 / 定额机时。"),
    "sharing_pct": ("External service hours / effective hours.", "共享率 = 对外服务机时 / 有效机时。"),
    "coverage_pct": (
        "Share of the metered time whose state is known (running, standby or off).",
        "数据覆盖率：计量时长中状态已知（运行、待机、关机）的比例。",
    ),
    "energy_kwh": (
        "Electrical energy the instrument used, from the energy each signed interval carries (the meter's energy counter where it has one, else its power integrated between reads); an interval crossing the period's edge counts in proportion to time. Empty where no interval in the period carries energy (no energy source, or agents before energy). JSON carries the exact Wh (energy_wh).",
        "电能：仪器所耗电能，来自各签名区间所带的电能（电表有电能计数器时取计数器差值，否则按读数间功率积分）；跨越期间边界的区间按时长比例计入。期间内无任何区间带电能时为空（无电能来源，或采集端版本较旧）。JSON 给出精确 Wh（energy_wh）。",
    ),
    "standby_h": ("Powered but not running (STANDBY).", "待机：通电未运行。"),
    "off_h": ("Switched off (OFF).", "关机：仪器断电或关闭。"),
    "unknown_h": (
        "The agent reported the state could not be read (UNKNOWN), e.g. the instrument or its meter did not answer.",
        "状态未知：采集端报告无法读取状态（如仪器或电表无响应）。",
    ),
    "unverified_h": (
        "Covered by signed intervals that do not link into their agent's chain (a gap or break before them): counted in no state.",
        "未验证：签名区间未能接入该采集端的哈希链（前有缺口或断链），不计入任何状态。",
    ),
    "uncovered_h": (
        "Metered time with no interval at all (agent or network down). Time before metering began and time still to come are not counted.",
        "无数据：计量时长内没有任何区间（采集端或网络中断）；计量开始前和尚未到来的时间不计。",
    ),
    "metered_h": (
        "The metered part of the period: from when metering began (the registry's metering start, else the instrument's first interval) to the period end or now, whichever is first.",
        "计量时长：自计量开始（台账的计量开始日期，未填则为首个区间）至期末或当前时刻（取早者）。",
    ),
    "not_metered_h": (
        "Elapsed time of the period before metering began: not measured by design, so neither no data nor covered, and it carries no rated hours.",
        "未计量：本期中计量开始前已过的时间；不属于无数据，也不计入覆盖率和定额机时。",
    ),
    "category": ("6-digit category code (分类编码) from the registry.", "分类编码（6位，来自台账）。"),
    "category_name": (
        "The category's name at every level its code has (大类 / 中类 / 小类) from the shipped classification (collector/reports/categories.tsv); a 小类 name the table lacks is left out, and a code whose 大类 or 中类 is not listed reads 未收录分类编码 and is named in the caveats.",
        "分类名称：按编码各级（大类 / 中类 / 小类）列出名称；分类表未收录的小类名称不显示；大类或中类未收录的编码显示“未收录分类编码”，并在说明中逐台列出。",
    ),
    "kind": (
        "General (通用) or special (专用) instrument: decides the policy's rated hours.",
        "通用或专用仪器，决定默认定额机时。",
    ),
    "department": ("Department (所在部门) from the registry.", "所在部门（来自台账）。"),
    "value_wan": (
        "Original value in 10,000 yuan (原值，万元) from the registry.",
        "原值（万元，来自台账）。",
    ),
    "share_mode": ("Share mode (共享模式) from the registry.", "共享模式（来自台账）。"),
    "metered_from": (
        "When metering of this instrument began (local time): the registry's metering start (计量开始日期) if imported, else the start of its first interval.",
        "计量起始时间（当地时间）：台账的计量开始日期；未填时为该仪器首个计量区间的开始时间。",
    ),
}
SHEET_NAMES = {
    "about": ("About", "说明"),
    "instrument": ("By instrument", "按仪器"),
    "unit": ("By unit", "按单位"),
    "category": ("By category", "按类别"),
    "month": ("By month", "按月份"),
}


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
    info: dict[str, object] = field(default_factory=dict)
    """The registry row (instrument rows), for the registry columns."""
    metered_from: int | None = None

    def exact_ms(self) -> dict[str, int]:
        h = self.hours
        return {
            k: (h.service_ms - h.external_ms if k == "internal_h" else getattr(h, ms))
            for k, ms in MS_KEYS.items()
        }

    def energy_wh(self) -> float | None:
        """The exact energy in Wh (whole mWh), None where no interval carried energy."""
        return energy.wh(self.hours.energy_mwh) if self.hours.energy_ms else None

    def seconds(self) -> dict[str, int | float]:
        """Exact seconds behind each hours column (a whole number, or milliseconds as decimals)."""
        return {k.removesuffix("_h") + "_s": _seconds(ms) for k, ms in self.exact_ms().items()}

    def values(self, exact: bool = False) -> dict[str, Any]:
        """Hours rounded to 0.01 h and percentages to 0.1 % (``exact``: hours unrounded)."""
        h = self.hours

        def hrs(ms: int) -> float:
            return ms / H if exact else round(ms / H, 2)

        out: dict[str, Any] = {
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "instruments": h.instruments,
        }
        out.update({k: hrs(ms) for k, ms in self.exact_ms().items()})
        out["utilisation_pct"] = utilisation_pct(h.effective_ms, h.rated_ms)
        out["sharing_pct"] = round(100 * h.external_ms / h.effective_ms, 1) if h.effective_ms else None
        out["coverage_pct"] = round(100 * h.coverage, 1) if h.period_ms else None
        out["energy_kwh"] = energy.kwh(h.energy_mwh) if h.energy_ms else None
        code = str(self.info.get("category") or "")
        out["category"] = code
        out["category_name"] = category_name(code) if code else ""
        out["kind"] = (
            {"general": "通用", "special": "专用"}.get(str(self.info.get("kind") or ""), "")
            if self.info
            else ""
        )
        out["department"] = str(self.info.get("department") or "")
        out["value_wan"] = stored_number(self.info, "value_wan") if self.info else None
        out["share_mode"] = str(self.info.get("share_mode") or "")
        out["metered_from"] = self.metered_from
        return out


def _seconds(ms: int) -> int | float:
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


UNKNOWN_CATEGORY = "未收录分类编码"


@cache
def categories() -> dict[str, str]:
    """The shipped classification (collector/reports/categories.tsv): 2-, 4- and 6-digit codes to names."""
    text = (
        resources.files("labmeter.collector.reports").joinpath("categories.tsv").read_text(encoding="utf-8")
    )
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            code, name = line.split("\t", 1)
            out[code.strip()] = name.strip()
    return out


def category_levels(code: str) -> list[tuple[str, str | None]]:
    """The levels a 6-digit code has, each with its name (None where the shipped table lacks it): 大类
    (2 digits), 中类 (4, unless they are 00) and 小类 (6, unless its last two are 00): 010203 has three,
    011300 (中类 其他) two, 120000 (其他仪器) one."""
    table = categories()
    levels = [code[:2]]
    if code[2:4] != "00":
        levels.append(code[:4])
    if code[4:6] != "00":
        levels.append(code)
    return [(c, table.get(c)) for c in levels]


def category_problem(code: str) -> str | None:
    """Why a code is not in the shipped classification (its 大类 or 中类 is not listed), else None. A
    missing 小类 name is no problem: the table does not ship the third level (see its header)."""
    for c, name in category_levels(code):
        if len(c) < 6 and name is None:
            level = "大类 (first level)" if len(c) == 2 else "中类 (second level)"
            return f"{code} is not in the shipped classification: no {level} {c}"
    return None


def category_name(code: str) -> str:
    """``分析仪器 / 电子光学仪器`` for 010101 (its 小类 name is not shipped), ``分析仪器 / 其他`` for 011300,
    ``其他仪器`` for 120000; UNKNOWN_CATEGORY for a code not in the classification."""
    if category_problem(code):
        return UNKNOWN_CATEGORY
    return " / ".join(name for _c, name in category_levels(code) if name)


def category_warnings(registry: dict[str, dict[str, object]]) -> list[str]:
    """One line per instrument whose category code is not in the shipped classification."""
    out = []
    for code, info in sorted(registry.items()):
        cat = str(info.get("category") or "")
        if cat and (why := category_problem(cat)):
            out.append(f"instrument {code}: category {why}; check the registry")
    return out


def rated_ms(info: dict[str, object], policy: PolicyConfig, period_ms: int) -> int:
    """Rated hours (定额机时) for a year, prorated to ``period_ms``."""
    override = stored_number(info, "rated_hours")
    if override is not None:
        yearly = override
    elif info.get("kind") == "special":
        yearly = policy.rated_hours_special
    else:
        yearly = policy.rated_hours_general
    return round(yearly * H * period_ms / YEAR_MS)


def utilisation_pct(effective_ms: int, rated_ms: int) -> float | None:
    """机时利用率 = 有效机时 / 定额机时, to 0.1 %: the one definition the reports and the live view share."""
    return round(100 * effective_ms / rated_ms, 1) if rated_ms else None


def metering_start(info: dict[str, object], first_ms: int | None) -> int | None:
    """When an instrument's metering began: the earlier of the registry's metering start (计量开始日期)
    and its first interval (None: never metered). A registry date before the first interval makes the
    time between no data (the agent should have reported); intervals before a later registry date are
    measurements all the same (docs/decisions.md "Metering starts at the registry's date")."""
    v = info.get("metering_start_ms")
    registry = int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
    if registry is None or first_ms is None:
        return first_ms if registry is None else registry
    return min(registry, first_ms)


def metering_starts(ledger: Ledger) -> dict[str, int]:
    """``metering_start`` of every listed instrument that has one."""
    first = ledger.first_interval_ms()
    out = {}
    for info in ledger.instruments():
        code = str(info["code"])
        start = metering_start(info, first.get(code))
        if start is not None:
            out[code] = start
    return out


def metered_span(start_ms: int | None, a: int, b: int, now_ms: int) -> tuple[int, int]:
    """The part of [a, b) an instrument was metered in: from its metering start to b or now."""
    hi = min(b, now_ms)
    lo = hi if start_ms is None else min(hi, max(a, start_ms))
    return lo, hi


def metered_rated_ms(
    info: dict[str, object],
    policy: PolicyConfig,
    a: int,
    b: int,
    now_ms: int,
    start_ms: int | None,
    covered_ms: int = 0,
) -> int:
    """Rated hours of [a, b) prorated to its metered part: the one rule for reports, findings, the national
    export and the live view. ``covered_ms``: time covered by intervals (at least that much was metered,
    even past ``now`` when an agent's clock runs ahead)."""
    lo, hi = metered_span(start_ms, a, b, now_ms)
    return rated_ms(info, policy, max(hi - lo, covered_ms))


def per_instrument(
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    now_ms: int | None = None,
    starts: dict[str, int] | None = None,
) -> dict[str, Hours]:
    """Hours and rated hours per instrument in [a, b), from rollups and the intervals at the edges, each
    judged on its metered part (``period_ms``; ``starts``: metering_starts): no data, coverage and rated
    hours count only there, and the elapsed time before it is ``not_metered_ms``."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    rollups = Rollups(ledger, policy)
    out = rollups.hours(a, b)
    registry = rollups.registry()
    if starts is None:
        starts = metering_starts(ledger)
    for code, h in out.items():
        covered = h.period_ms - h.uncovered_ms
        lo, hi = metered_span(starts.get(code), a, b, now)
        # intervals past "now" (an agent's clock ahead of ours, a simulated clock) are metered time too
        h.period_ms = max(hi - lo, covered)
        h.uncovered_ms = h.period_ms - covered
        h.not_metered_ms = max(0, min(b, now) - a - h.period_ms)
        h.rated_ms = metered_rated_ms(registry.get(code, {}), policy, a, b, now, starts.get(code), covered)
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
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    groupings: Sequence[str],
    tz: ZoneInfo | None = None,
    now_ms: int | None = None,
) -> dict[str, list[Row]]:
    """Several groupings of one period, computing the per-instrument hours once."""
    hours = per_instrument(ledger, a, b, policy, now_ms) if b > a else None
    return {by: hours_report(ledger, a, b, policy, by, tz, hours, now_ms) for by in groupings}


def hours_report(
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    by: str = "instrument",
    tz: ZoneInfo | None = None,
    hours: dict[str, Hours] | None = None,
    now_ms: int | None = None,
) -> list[Row]:
    """Rows for one grouping, and a totals row last; ``hours`` per instrument if already computed."""
    if b <= a:
        raise PeriodError("--to must be after --from")
    if by not in GROUPINGS:
        raise PeriodError(f"--by {by!r}: use one of {', '.join(GROUPINGS)}")
    rows: list[Row] = []
    first = metering_starts(ledger)
    if by == "month":
        for label, lo, hi in months(a, b, tz or ZoneInfo(policy.timezone)):
            row = Row(label, "", "", Hours())
            for h in per_instrument(ledger, lo, hi, policy, now_ms, first).values():
                row.hours.add(h)
            rows.append(row)
    else:
        if hours is None:
            hours = per_instrument(ledger, a, b, policy, now_ms, first)
        registry = ledger.instruments_by_code()
        for code, h in hours.items():
            info = registry.get(code, {"code": code})
            rows.append(
                Row(code, str(info.get("name") or ""), str(info.get("unit") or ""), h, info, first.get(code))
            )
        if by in ("unit", "category"):
            groups: dict[str, Row] = {}
            for r in rows:
                label = str(registry.get(r.key, {}).get(by) or "-")
                g = groups.setdefault(
                    label,
                    Row(
                        label,
                        "",
                        label if by == "unit" else "",
                        Hours(),
                        {"category": label} if by == "category" and label != "-" else {},
                    ),
                )
                g.hours.add(r.hours)
            rows = [groups[k] for k in sorted(groups)]
    total = Row(TOTAL[0], "", "", Hours())
    for r in rows:
        total.hours.add(r.hours)
    if by == "month":
        total.hours.instruments = max((r.hours.instruments for r in rows), default=0)
    return [*rows, total]


def columns_for(by: str, registry: bool = False) -> list[tuple[str, str, str]]:
    """The columns of a grouping; ``registry``: with the registry facts (files, not the terminal table)."""
    keep = [c for c in COLUMNS if not (by != "instrument" and c[0] in ("name", "unit"))]
    if by == "instrument":
        keep = [c for c in keep if c[0] != "instruments"]
        if registry:
            keep += REGISTRY_COLUMNS
    elif by == "category" and registry:
        keep = [REGISTRY_COLUMNS[1], *keep]
    en, zh = KEY_HEADERS[by]
    return [("key", en, zh), *keep]


def report_meta(
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    tz: ZoneInfo,
    groupings: Sequence[str],
    now_ms: int | None = None,
) -> dict[str, Any]:
    """What a report file says about itself: period, basis, provenance, caveats and column definitions."""
    from labmeter import __version__
    from labmeter.collector.ledger.rollup import allowances_ms

    now = int(time.time() * 1000) if now_ms is None else now_ms
    own = {}
    registry = ledger.instruments_by_code()
    for info in registry.values():
        prep, post = allowances_ms(info, policy)
        if (prep, post) != (policy.prep_allowance_s * 1000, policy.post_allowance_s * 1000):
            own[str(info["code"])] = {"prep_allowance_s": prep // 1000, "post_allowance_s": post // 1000}
    rollups = Rollups(ledger, policy)
    rollups.refresh()
    with_energy = {code for code, (ms,) in rollups.totals(a, b, ("energy_ms",)).items() if ms}
    without = sorted(set(rollups.registry()) - with_energy)
    caveats = [
        "Each instrument is judged on its metered part of the period: from its metering start (the registry's, else its first interval) to the period end or now. Time before metering began is 'not metered' (未计量) and time still to come is not counted; neither is 'no data', and neither carries rated hours.",
        "Hours are computed from the agents' signed intervals; service hours are effective time inside imported service records, not booking length.",
        "Tables round hours to 0.01 h; JSON and CSV carry the exact seconds (*_s), XLSX cells the exact hours.",
    ]
    if b > now:
        caveats.insert(0, f"The period is not over: it is counted up to {_local(now, tz)} (generated at).")
    caveats += category_warnings(registry)
    cols: dict[str, tuple[str, str, str]] = {}
    for n, by in enumerate(groupings):
        for c in columns_for(by, registry=True):
            cols.setdefault(c[0] if c[0] != "key" or n == 0 else f"key_{by}", c)
    return {
        "period": {
            "from": _local(a, tz),
            "to": _local(b, tz),
            "from_ms": a,
            "to_ms": b,
            "to_is_exclusive": True,
        },
        "timezone": tz.key,
        "groupings": list(groupings),
        "generated_at": _local(now, tz),
        "generated_ms": now,
        "counted_up_to": _local(min(b, now), tz),
        "labmeter_version": __version__,
        "ledger": ledger.name,
        "allowances": {
            "prep_allowance_s": policy.prep_allowance_s,
            "post_allowance_s": policy.post_allowance_s,
            "instruments_with_their_own": own,
        },
        "rated_hours_basis": {
            "general_h_per_year": policy.rated_hours_general,
            "special_h_per_year": policy.rated_hours_special,
            "year_h": YEAR_MS / H,
            "rule": "the registry's rated_hours (定额机时) if given, else the policy's figure for general (通用) or special (专用), prorated to each instrument's metered part of the period (its metering start to the period end or the generation time) over a 365-day year",
        },
        "caveats": caveats,
        "energy": {
            "unit": "kWh (JSON energy_wh: Wh)",
            "instruments_without_energy": without,
            "rule": "no interval of these instruments in the period carries energy: their source has no power or energy reading, or their agent predates energy",
        },
        "columns": _with_exact_energy(
            {
                key: {"en": en, "zh": zh, "definition": DEFINITIONS[k][0], "定义": DEFINITIONS[k][1]}
                for key, (k, en, zh) in cols.items()
            }
        ),
    }


def _with_exact_energy(columns: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """JSON rows carry ``energy_wh`` beside ``energy_kwh``: every key a file holds is defined in it."""
    kwh = columns.get("energy_kwh")
    if kwh is not None:
        columns["energy_wh"] = {
            **kwh,
            "en": "Energy (Wh, exact; JSON only)",
            "zh": "电能（Wh，精确；仅 JSON）",
        }
    return columns


def _local(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="seconds")


def _row_cells(d: dict[str, Any], cols: list[tuple[str, str, str]], tz: ZoneInfo | None) -> list[Any]:
    out = []
    for k, _, _ in cols:
        v = d[k]
        if k == "metered_from" and isinstance(v, int):
            v = _local(v, tz or UTC)  # type: ignore[arg-type]
        out.append(v)
    return out


def render(
    rows: list[Row],
    fmt: str,
    lang: str = "zh",
    by: str = "instrument",
    meta: dict[str, Any] | None = None,
    bom: bool = False,
    tz: ZoneInfo | None = None,
) -> str:
    """A table, CSV (``bom``: with a UTF-8 BOM, for Excel) or JSON (with ``meta`` and exact seconds)."""
    data = [r.values() for r in rows]
    if lang == "zh" and data:
        data[-1]["key"] = TOTAL[1]
    if fmt == "json":
        cols = columns_for(by, registry=True)

        def item(r: Row, d: dict[str, Any]) -> dict[str, Any]:
            return {**{k: d[k] for k, _, _ in cols}, "energy_wh": r.energy_wh(), "seconds": r.seconds()}

        doc: dict[str, Any] = {
            "rows": [item(r, d) for r, d in zip(rows[:-1], data[:-1], strict=True)],
            "total": item(rows[-1], data[-1]) if rows else None,
        }
        if meta is not None:
            doc = {"meta": meta, **doc}
        return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
    if fmt == "csv":
        cols = columns_for(by, registry=True)
        secs = [k for k in MS_KEYS if any(c[0] == k for c in cols)]
        header = [zh if lang == "zh" else en for _, en, zh in cols]
        header += [_seconds_header(k, lang) for k in secs]
        body = [
            ["" if v is None else v for v in _row_cells(d, cols, tz)]
            + [r.seconds()[k.removesuffix("_h") + "_s"] for k in secs]
            for r, d in zip(rows, data, strict=True)
        ]
        return ("\ufeff" if bom else "") + to_csv([header, *body])
    cols = columns_for(by)
    shown = [c for c in cols if c[0] not in ("name", "unit", "standby_h", "off_h", "internal_h", "metered_h")]
    cells = [[(zh if lang == "zh" else en) for _, en, zh in shown]]
    cells += [[_fmt(d[k]) for k, _, _ in shown] for d in data]
    widths = [max(text_width(row[i]) for row in cells) for i in range(len(shown))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(_pad(c, w, left=(i == 0)) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0 or n == len(cells) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _seconds_header(key: str, lang: str) -> str:
    col = next(c for c in COLUMNS if c[0] == key)
    return (col[2] if lang == "zh" else col[1]).replace("(h)", "(s)")


def write_xlsx(
    path: Path,
    sheets: dict[str, list[Row]],
    lang: str = "zh",
    meta: dict[str, Any] | None = None,
    tz: ZoneInfo | None = None,
) -> None:
    """An About (说明) sheet first when ``meta`` is given, then one sheet per grouping: header frozen and
    filtered, columns wide enough for CJK text, exact hours shown to 0.01 h, a totals row last."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter

    zh = lang == "zh"
    wb = Workbook()
    wb.remove(wb.active)
    if meta is not None:
        _about_sheet(wb.create_sheet(SHEET_NAMES["about"][1 if zh else 0]), meta, zh)
    for by, rows in sheets.items():
        ws = wb.create_sheet(SHEET_NAMES[by][1 if zh else 0])
        cols = columns_for(by, registry=True)
        header = [czh if zh else en for _, en, czh in cols]
        append_row(ws, header)
        for cell in ws[1]:
            cell.font = Font(bold=True)
            cell.alignment = Alignment(wrap_text=True, vertical="top")
        data = [r.values(exact=True) for r in rows]
        if zh and data:
            data[-1]["key"] = TOTAL[1]
        for d in data:
            append_row(ws, _row_cells(d, cols, tz))
        for cell in ws[ws.max_row]:
            cell.font = Font(bold=True)
        for i, (k, _, _) in enumerate(cols, start=1):
            fmt = (
                "0.00"
                if k.endswith("_h")
                else "0.0"
                if k.endswith("_pct")
                else "0.000"
                if k.endswith("_kwh")
                else None
            )
            if fmt:
                for (cell,) in ws.iter_rows(min_row=2, min_col=i, max_col=i):
                    cell.number_format = fmt
        ws.freeze_panes = "B2"
        ws.auto_filter.ref = f"A1:{get_column_letter(len(cols))}{max(1, ws.max_row - 1)}"
        for i in range(1, len(cols) + 1):
            letter = get_column_letter(i)
            widest = max(text_width(_fmt(c.value)) for (c,) in ws.iter_rows(min_col=i, max_col=i))
            ws.column_dimensions[letter].width = min(60, max(10, widest + 3))
    wb.save(path)


def _about_sheet(ws: Any, meta: dict[str, Any], zh: bool) -> None:
    """Period, basis, provenance and caveats as label/value rows, then every column's definition."""
    from openpyxl.styles import Alignment, Font

    p, allow, rated = meta["period"], meta["allowances"], meta["rated_hours_basis"]
    own = allow["instruments_with_their_own"]
    rows: list[tuple[str, Any]] = [
        ("统计期间 Period", f"{p['from']} – {p['to']}（不含终点 end exclusive）"),
        ("时区 Time zone", meta["timezone"]),
        ("统计截至 Counted up to", meta["counted_up_to"]),
        ("生成时间 Generated at", meta["generated_at"]),
        ("labmeter 版本 Version", meta["labmeter_version"]),
        ("账本 Ledger", meta["ledger"]),
        ("准备时间 Prep allowance (s)", allow["prep_allowance_s"]),
        ("后处理时间 Post allowance (s)", allow["post_allowance_s"]),
        (
            "自有准备/后处理时间 Instruments with their own allowances",
            "; ".join(
                f"{c}: {v['prep_allowance_s']} s / {v['post_allowance_s']} s" for c, v in sorted(own.items())
            )
            or "-",
        ),
        ("通用仪器年定额机时 Rated hours, general (h/year)", rated["general_h_per_year"]),
        ("专用仪器年定额机时 Rated hours, special (h/year)", rated["special_h_per_year"]),
        ("定额机时规则 Rated-hours rule", rated["rule"]),
    ]
    rows += [(f"说明 Caveat {n}", c) for n, c in enumerate(meta["caveats"], start=1)]
    if "energy" in meta:
        rows.append(
            (
                "无电能来源的仪器 Instruments without an energy source",
                "; ".join(meta["energy"]["instruments_without_energy"]) or "-",
            )
        )
    append_row(ws, ["项目 Item", "内容 Value"])
    for label, value in rows:
        append_row(ws, [label, value])
    append_row(ws, [])
    append_row(ws, ["列名 Column", "定义 Definition" if not zh else "定义", "Definition"])
    header_row = ws.max_row
    for col in meta["columns"].values():
        append_row(ws, [f"{col['zh']} / {col['en']}", col["定义"], col["definition"]])
    for r in (1, header_row):
        for cell in ws[r]:
            cell.font = Font(bold=True)
    ws.column_dimensions["A"].width = 44
    ws.column_dimensions["B"].width = 70
    ws.column_dimensions["C"].width = 70
    for row in ws.iter_rows(min_row=2):
        for cell in row:
            cell.alignment = Alignment(wrap_text=True, vertical="top")


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else printable(v)


def _pad(s: str, w: int, left: bool) -> str:
    space = " " * (w - text_width(s))
    return s + space if left else space + s
