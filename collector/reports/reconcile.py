"""Reconciliation: what each booking (service record) claimed against what the instrument's own state showed.

Every figure comes from the hour rules of ``labmeter.machine_hours`` (the ones ``report hours`` uses):
a booking's run and effective time are those of the rules over the booking, idle time is standby that is
not effective. What is new here is only who the time belongs to: running inside a booking, or in a run a
sign-in started, is attributed; the rest is unattributed use. A finding is raised against a threshold in
``[policy]`` (docs/reconcile.md); a booking the meter saw nothing of is reported as such, never as
unused.

Service records are counted in the period they start in (each record in exactly one period, measured in
full); unattributed running and idle time are counted inside the period.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from labmeter.collector.ledger import BookingRow, Ledger, SignInRow
from labmeter.collector.ledger.rollup import allowances_ms
from labmeter.collector.reports.cells import append_row, to_csv
from labmeter.collector.reports.formats import FormatError
from labmeter.collector.reports.hours import PeriodError
from labmeter.config import PolicyConfig
from labmeter.energy import energy_in
from labmeter.log import printable, text_width
from labmeter.machine_hours import HOUR_MS, Hours, Segment, compute_buckets, merge, spread, union

PARTS = ("records", "findings", "summary")
THRESHOLDS = (
    "unused_booking_run_s",
    "unattributed_min_s",
    "signin_window_s",
    "idle_min_s",
    "overlap_min_s",
)
"""The ``[policy]`` keys that decide what becomes a finding."""


class Column(NamedTuple):
    """One column of a reconciliation table: its key, headers, how its value is shown, and its meaning.

    ``kind``: ``text``, ``int``, ``time`` (UTC ms, shown as local time), ``hours`` (ms; hours in tables and
    XLSX, exact seconds beside them in CSV and JSON), ``pct`` (0.1 %), ``kwh`` (whole mWh; kWh in tables,
    CSV and XLSX, exact Wh beside them in JSON), ``yuan`` (money, 0.01 yuan)."""

    key: str
    en: str
    zh: str
    kind: str
    definition: str
    定义: str


RECORD_COLUMNS = [
    Column(
        "id",
        "Record",
        "记录编号",
        "int",
        "The service record's id in the ledger (collector services list).",
        "服务记录在账本中的编号。",
    ),
    Column("instrument", "Instrument", "仪器编号", "text", "Instrument code.", "仪器编号。"),
    Column(
        "name", "Name", "仪器名称", "text", "Instrument name from the registry.", "仪器名称（来自台账）。"
    ),
    Column("applicant", "Applicant", "申请人", "text", "Applicant, as imported.", "申请人（导入值）。"),
    Column(
        "applicant_unit",
        "Applicant unit",
        "申请单位",
        "text",
        "Applicant's unit, as imported.",
        "申请单位（导入值）。",
    ),
    Column(
        "service_type",
        "Service type",
        "服务类型",
        "int",
        "120 internal, 130 external.",
        "120 对内，130 对外。",
    ),
    Column(
        "start",
        "Booked from",
        "预约开始",
        "time",
        "Start of the booking (local time).",
        "预约开始时间（当地时间）。",
    ),
    Column(
        "end",
        "Booked to",
        "预约结束",
        "time",
        "End of the booking (local time, exclusive).",
        "预约结束时间（当地时间，不含）。",
    ),
    Column("booked", "Booked (h)", "预约时长 (h)", "hours", "Length of the booking.", "预约时长。"),
    Column(
        "run",
        "Run (h)",
        "运行机时 (h)",
        "hours",
        "RUNNING time inside the booking, from signed intervals.",
        "预约时段内的运行时长（来自签名区间）。",
    ),
    Column(
        "effective",
        "Effective (h)",
        "有效机时 (h)",
        "hours",
        "Effective time inside the booking: running plus standby directly before a run (up to the prep allowance) and after it (up to the post allowance), as in report hours.",
        "预约时段内的有效机时：运行时长加紧邻运行前后的待机（至多准备/后处理时间），与机时报表同一定义。",
    ),
    Column(
        "used_pct",
        "Used (%)",
        "预约使用率 (%)",
        "pct",
        "Effective time / booked time; empty when the meter knew no state inside the booking.",
        "预约使用率 = 有效机时 / 预约时长；预约时段内无已知状态时为空。",
    ),
    Column(
        "known",
        "Known state (h)",
        "状态已知 (h)",
        "hours",
        "Time inside the booking whose state the meter knew (running, standby or off).",
        "预约时段内状态已知（运行、待机、关机）的时长。",
    ),
    Column(
        "energy",
        "Energy (kWh)",
        "电能(kWh)",
        "kwh",
        "Energy the instrument used inside the booking, from the signed intervals' energy (as in report hours; an interval crossing the booking's edge counts in proportion to time); empty where no interval in it carries energy.",
        "预约时段内仪器所耗电能，来自签名区间所带的电能（与机时报表同一定义；跨越预约边界的区间按时长比例计入）；时段内无区间带电能时为空。",
    ),
    Column(
        "cost",
        "Electricity cost (yuan)",
        "电费（元）",
        "yuan",
        "Energy x [policy] tariff_yuan_per_kwh, to 0.01 yuan, for cost-compensation fees; empty without a tariff or without energy.",
        "电能 × [policy] tariff_yuan_per_kwh（元/kWh），精确到分，用于成本补偿收费；未设电价或无电能时为空。",
    ),
    Column(
        "first_run",
        "First run",
        "首次运行",
        "time",
        "Start of the first running inside the booking.",
        "预约时段内首次运行的开始时间。",
    ),
    Column(
        "last_run",
        "Last run ends",
        "末次运行结束",
        "time",
        "End of the last running inside the booking.",
        "预约时段内末次运行的结束时间。",
    ),
    Column(
        "findings",
        "Findings",
        "发现",
        "text",
        "The findings that name this record (see the findings table; a list of codes in JSON).",
        "涉及本记录的发现（见发现表；JSON 中为类型代码列表）。",
    ),
]
FINDING_COLUMNS = [
    Column(
        "kind",
        "Finding",
        "发现",
        "text",
        "What was found (each kind is defined below).",
        "发现类型（定义见下）。",
    ),
    Column(
        "code",
        "Code",
        "类型代码",
        "text",
        "The finding's code, the same in every language.",
        "发现类型代码（各语言相同）。",
    ),
    Column("instrument", "Instrument", "仪器编号", "text", "Instrument code.", "仪器编号。"),
    Column(
        "day",
        "Day",
        "日期",
        "text",
        "Local day (unattributed use is shown per day).",
        "当地日期（无归属运行按日列出）。",
    ),
    Column(
        "start",
        "From",
        "开始",
        "time",
        "Start of the time the finding is about (local time).",
        "发现所涉时段的开始（当地时间）。",
    ),
    Column(
        "end",
        "To",
        "结束",
        "time",
        "End of that time (local time, exclusive).",
        "该时段的结束（当地时间，不含）。",
    ),
    Column(
        "time",
        "Time (h)",
        "时长 (h)",
        "hours",
        "The finding's time, per kind (see the kinds).",
        "发现所涉时长（按类型定义）。",
    ),
    Column(
        "threshold_s",
        "Threshold (s)",
        "阈值 (s)",
        "int",
        "The [policy] threshold the finding was judged against.",
        "判定所用的 [policy] 阈值。",
    ),
    Column(
        "records",
        "Records",
        "相关记录",
        "text",
        "Ids of the service records concerned.",
        "相关服务记录编号。",
    ),
    Column(
        "who",
        "Applicant or user",
        "申请人/用户",
        "text",
        "The booking's applicant, or the sign-in's user pseudonym.",
        "预约申请人，或签到用户的匿名标识。",
    ),
]
SUMMARY_COLUMNS = [
    Column("instrument", "Instrument", "仪器编号", "text", "Instrument code.", "仪器编号。"),
    Column(
        "name", "Name", "仪器名称", "text", "Instrument name from the registry.", "仪器名称（来自台账）。"
    ),
    Column("unit", "Unit", "管理单位", "text", "Owning unit from the registry.", "管理单位（来自台账）。"),
    Column(
        "records",
        "Records",
        "预约条数",
        "int",
        "Service records starting in the period.",
        "本期开始的服务记录条数。",
    ),
    Column(
        "booked",
        "Booked (h)",
        "预约机时 (h)",
        "hours",
        "Booked time of those records; overlapping bookings count once.",
        "这些记录的预约时长；重叠预约只计一次。",
    ),
    Column(
        "used",
        "Used in bookings (h)",
        "预约内有效机时 (h)",
        "hours",
        "Effective time inside those bookings.",
        "预约时段内的有效机时。",
    ),
    Column(
        "used_pct",
        "Used (%)",
        "预约使用率 (%)",
        "pct",
        "Used in bookings / booked.",
        "预约使用率 = 预约内有效机时 / 预约机时。",
    ),
    Column("run", "Run (h)", "运行机时 (h)", "hours", "RUNNING time in the period.", "本期运行时长。"),
    Column(
        "effective",
        "Effective (h)",
        "有效机时 (h)",
        "hours",
        "Effective time in the period, as in report hours.",
        "本期有效机时（与机时报表同一定义）。",
    ),
    Column(
        "unattributed",
        "Unattributed run (h)",
        "无归属运行 (h)",
        "hours",
        "Running in the period inside no booking and in no run a sign-in started.",
        "本期既无预约也无签到的运行时长。",
    ),
    Column(
        "idle",
        "Idle (h)",
        "空载 (h)",
        "hours",
        "Standby in the period that is not effective (空载): powered, not running, not preparing.",
        "本期非有效的待机时长（空载）。",
    ),
    Column(
        "unused",
        "Unused bookings",
        "未使用预约",
        "int",
        "Records found booked but not used.",
        "预约未使用的记录数。",
    ),
    Column(
        "unchecked",
        "Unchecked bookings",
        "无法核对预约",
        "int",
        "Records outside any metered time.",
        "无计量数据、无法核对的记录数。",
    ),
]
TABLES: dict[str, tuple[list[Column], tuple[str, str]]] = {
    "records": (RECORD_COLUMNS, ("Records", "服务记录核对")),
    "findings": (FINDING_COLUMNS, ("Findings", "发现")),
    "summary": (SUMMARY_COLUMNS, ("By instrument", "按仪器汇总")),
}

# code: (English, Chinese, threshold key, definition, 定义)
KINDS: dict[str, tuple[str, str, str | None, str, str]] = {
    "booked_unused": (
        "Booked but not used",
        "预约未使用",
        "unused_booking_run_s",
        "A service record with less running inside it than unused_booking_run_s while the meter knew the state for part of it. Time: the booked time.",
        "预约时段内运行时长低于 unused_booking_run_s（且该时段有已知状态）的服务记录。时长：预约时长。",
    ),
    "unattributed": (
        "Running without booking or sign-in",
        "无预约无签到运行",
        "unattributed_min_s",
        "Per instrument and local day: running inside no booking and in no run a sign-in started, listed when the day's total reaches unattributed_min_s. Time: that total; from/to: its first and last moment.",
        "按仪器、按日：既不在预约时段内、也不属于签到后开始的运行的运行时长，当日合计达到 unattributed_min_s 时列出。时长：当日合计。",
    ),
    "signin_unused": (
        "Sign-in without running",
        "签到未运行",
        "signin_window_s",
        "A sign-in with no running under way at it or starting within signin_window_s after it, while the meter knew the state then. Time: the window.",
        "签到时未在运行、签到后 signin_window_s 内也未开始运行（且该时段有已知状态）。时长：判定窗口。",
    ),
    "idle": (
        "Long powered idle (空载)",
        "长时间空载",
        "idle_min_s",
        "A stretch of standby whose idle part (the standby not counted as effective) reaches idle_min_s. Time: the idle part; from/to: the standby stretch.",
        "一段待机中非有效部分（空载）达到 idle_min_s。时长：空载时长；开始/结束：该段待机。",
    ),
    "overlap": (
        "Overlapping bookings",
        "预约重叠",
        "overlap_min_s",
        "Two service records of one instrument that overlap by at least overlap_min_s (listed in the period the overlap begins). Time: the overlap.",
        "同一仪器的两条服务记录重叠至少 overlap_min_s（列在重叠开始的期间）。时长：重叠时长。",
    ),
    "unchecked": (
        "Outside metered time (cannot be checked)",
        "无计量数据无法核对",
        None,
        "A service record in which the meter knew the state at no moment (no interval, or only unknown or unverified ones): neither used nor unused can be said. Time: the booked time.",
        "预约时段内没有任何已知状态（无区间或仅有未知/未验证区间）的服务记录：无法判断是否使用。时长：预约时长。",
    ),
}


def label(code: str, lang: str) -> str:
    """A finding's name in the report's language."""
    en, zh = KINDS[code][:2]
    return zh if lang == "zh" else en


@dataclass
class RecordRow:
    """One service record and what the meter saw inside it (other figures per record are added here)."""

    booking: BookingRow
    name: str
    hours: Hours
    """Measured inside the booking, by ``machine_hours.compute``."""
    first_run_ms: int | None
    last_run_ms: int | None
    findings: list[str] = field(default_factory=list)
    energy_mwh: int | None = None
    """Energy inside the booking (labmeter.energy); None: no interval in it carries energy."""
    tariff: float | None = None
    """[policy] tariff_yuan_per_kwh, for the cost."""

    @property
    def booked_ms(self) -> int:
        return self.booking.end_ms - self.booking.start_ms

    def values(self, lang: str | None = None) -> dict[str, Any]:
        """Raw values by column key; ``findings`` as codes, or as labels in ``lang``."""
        b, h = self.booking, self.hours
        return {
            "id": b.id,
            "instrument": b.instrument,
            "name": self.name,
            "applicant": b.applicant,
            "applicant_unit": b.applicant_unit,
            "service_type": b.service_type,
            "start": b.start_ms,
            "end": b.end_ms,
            "booked": self.booked_ms,
            "run": h.run_ms,
            "effective": h.effective_ms,
            "used_pct": _pct(h.effective_ms, self.booked_ms) if h.known_ms else None,
            "known": h.known_ms,
            "energy": self.energy_mwh,
            "cost": (
                round(self.energy_mwh / 1e6 * self.tariff, 2)
                if self.energy_mwh is not None and self.tariff is not None
                else None
            ),
            "first_run": self.first_run_ms,
            "last_run": self.last_run_ms,
            "findings": (
                list(self.findings)
                if lang is None
                else ("、" if lang == "zh" else ", ").join(label(c, lang) for c in self.findings)
            ),
        }


@dataclass(frozen=True)
class Finding:
    code: str
    instrument: str
    start_ms: int
    end_ms: int
    time_ms: int
    threshold_s: int | None
    records: tuple[int, ...] = ()
    who: str = ""
    day: str = ""

    def values(self, lang: str = "zh") -> dict[str, Any]:
        return {
            "kind": label(self.code, lang),
            "code": self.code,
            "instrument": self.instrument,
            "day": self.day,
            "start": self.start_ms,
            "end": self.end_ms,
            "time": self.time_ms,
            "threshold_s": self.threshold_s,
            "records": ", ".join(str(r) for r in self.records),
            "who": self.who,
        }


@dataclass
class SummaryRow:
    instrument: str
    name: str
    unit: str
    records: int = 0
    booked_ms: int = 0
    used_ms: int = 0
    run_ms: int = 0
    effective_ms: int = 0
    unattributed_ms: int = 0
    idle_ms: int = 0
    unused: int = 0
    unchecked: int = 0

    def values(self) -> dict[str, Any]:
        return {
            "instrument": self.instrument,
            "name": self.name,
            "unit": self.unit,
            "records": self.records,
            "booked": self.booked_ms,
            "used": self.used_ms,
            "used_pct": _pct(self.used_ms, self.booked_ms),
            "run": self.run_ms,
            "effective": self.effective_ms,
            "unattributed": self.unattributed_ms,
            "idle": self.idle_ms,
            "unused": self.unused,
            "unchecked": self.unchecked,
        }


@dataclass
class Reconciliation:
    records: list[RecordRow]
    findings: list[Finding]
    summary: list[SummaryRow]
    meta: dict[str, Any]


def _pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 1) if whole else None


def local_days(a: int, b: int, tz: ZoneInfo) -> list[tuple[str, int, int]]:
    """The local days [a, b) touches, clipped to it (a DST day is 23 or 25 hours long)."""
    out = []
    d = datetime.fromtimestamp(a / 1000, tz).date()
    while True:
        lo = int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp() * 1000)
        if lo >= b:
            break
        nxt = d + timedelta(days=1)
        hi = int(datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp() * 1000)
        if hi > a:
            out.append((d.isoformat(), max(a, lo), min(b, hi)))
        d = nxt
    return out


def minus(xs: Iterable[tuple[int, int]], ys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The time of the sorted ranges ``xs`` outside the sorted, non-overlapping ranges ``ys``."""
    out: list[tuple[int, int]] = []
    for s, e in xs:
        at = s
        for ys_, ye in ys:
            if ye <= at:
                continue
            if ys_ >= e:
                break
            if ys_ > at:
                out.append((at, ys_))
            at = max(at, ye)
        if at < e:
            out.append((at, e))
    return out


_SUMMED = ("run_ms", "standby_ms", "off_ms", "unknown_ms", "unverified_ms", "effective_ms", "uncovered_ms")


class _Timeline:
    """One instrument's merged segments, judged once by the hour rules and split at every edge a span asked
    about will have (``machine_hours.compute_buckets``: the buckets add up to what ``compute`` gives for any
    run of them), so each booking, standby stretch or sign-in window costs a lookup, not a recount."""

    def __init__(self, segs: list[Segment], prep_ms: int, post_ms: int) -> None:
        self.segs = segs
        self.ends = [s.end for s in segs]
        self.prep_ms, self.post_ms = prep_ms, post_ms
        self.bounds: list[int] = []
        self.sums: dict[str, list[int]] = {}

    def judge(self, edges: Iterable[int]) -> None:
        """Judge the timeline once, split at ``edges`` (every start and end :meth:`hours` will be asked)."""
        self.bounds = sorted(set(edges))
        rows = [(s.start, s.end, s.kind, True) for s in self.segs]
        buckets = (
            compute_buckets(rows, self.bounds, self.prep_ms, self.post_ms) if len(self.bounds) > 1 else []
        )
        self.sums = {k: list(accumulate((getattr(h, k) for h in buckets), initial=0)) for k in _SUMMED}

    def hours(self, lo: int, hi: int) -> Hours:
        """The hours of [lo, hi); both must be among the judged edges."""
        i, j = bisect_left(self.bounds, lo), bisect_left(self.bounds, hi)
        if i >= len(self.bounds) or j >= len(self.bounds) or (self.bounds[i], self.bounds[j]) != (lo, hi):
            raise ValueError(f"[{lo}, {hi}) was not among the judged edges")
        return Hours(period_ms=hi - lo, instruments=1, **{k: v[j] - v[i] for k, v in self.sums.items()})

    def runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """RUNNING stretches overlapping [lo, hi), unclipped."""
        return self._of("RUNNING", lo, hi)

    def standby(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """STANDBY stretches clipped to [lo, hi)."""
        return [(max(lo, s), min(hi, e)) for s, e in self._of("STANDBY", lo, hi)]

    def _of(self, kind: str, lo: int, hi: int) -> list[tuple[int, int]]:
        out = []
        for s in self.segs[bisect_right(self.ends, lo) :]:
            if s.start >= hi:
                break
            if s.kind == kind:
                out.append((s.start, s.end))
        return out


def reconcile(
    ledger: Ledger,
    a: int,
    b: int,
    policy: PolicyConfig,
    tz: ZoneInfo,
    instrument: str | None = None,
    now_ms: int | None = None,
) -> Reconciliation:
    """Records, findings and the per-instrument summary of [a, b); ``instrument`` alone if given."""
    if b <= a:
        raise PeriodError("--to must be after --from")
    registry = ledger.instruments_by_code()
    if instrument is not None and instrument not in registry:
        known = ", ".join(sorted(registry)[:10]) or "none registered"
        raise PeriodError(f"--instrument {instrument!r}: no such instrument in the ledger (known: {known})")
    bookings: dict[str, list[BookingRow]] = {}
    for bk in ledger.bookings_between(a, b, instrument):
        bookings.setdefault(bk.instrument, []).append(bk)
    first = ledger.first_interval_ms()
    window = policy.signin_window_s * 1000
    signins: dict[str, list[SignInRow]] = {}
    for si in ledger.signins_between(a - window, b, instrument):  # one pass, not one per instrument
        signins.setdefault(si.instrument, []).append(si)
    signed_in = {c for c, rows in signins.items() if any(si.at_ms >= a for si in rows)}
    codes = sorted(
        c
        for c in set(registry) | set(bookings)
        if (instrument is None or c == instrument)
        and (c in bookings or c in signed_in or first.get(c, b) < b)
    )
    out = Reconciliation([], [], [], meta(ledger, a, b, policy, tz, now_ms))
    now = out.meta["generated_ms"]
    days = local_days(a, b, tz)
    for code in codes:
        _instrument(
            ledger,
            code,
            registry.get(code, {}),
            bookings.get(code, []),
            signins.get(code, []),
            a,
            b,
            now,
            policy,
            days,
            out,
        )
    out.findings.sort(key=lambda f: (f.instrument, f.start_ms, list(KINDS).index(f.code), f.records))
    return out


def _instrument(
    ledger: Ledger,
    code: str,
    info: dict[str, object],
    around: list[BookingRow],
    signins: list[SignInRow],
    a: int,
    b: int,
    now: int,
    policy: PolicyConfig,
    days: list[tuple[str, int, int]],
    out: Reconciliation,
) -> None:
    """One instrument's records, findings and summary row, appended to ``out``; ``signins`` are its own of
    [a - window, b). A booking that has not begun by ``now`` is not a record yet: the meter cannot have
    seen it."""
    prep, post = allowances_ms(info, policy)
    window = policy.signin_window_s * 1000
    mine = [bk for bk in around if a <= bk.start_ms < min(b, now)]
    lo = min([a, *(bk.start_ms for bk in around)]) - max(prep, post) - window
    hi = max([b, *(bk.end_ms for bk in around)]) + max(prep, post) + window
    found = ledger.intervals_between(lo, hi, code)
    tl = _Timeline(merge(r.span() for r in found), prep, post)
    energy_rows = [r.energy() for r in found]
    runs = tl.runs(a, b)
    if runs and runs[0][0] < a:  # a run under way at the start: a sign-in long before may have started it
        signins = ledger.signins_between(runs[0][0] - window, a - window, code) + signins
    booked = union((bk.start_ms, bk.end_ms) for bk in mine)
    standby = tl.standby(a, b)
    windows = [(si.at_ms, si.at_ms + window) for si in signins if a <= si.at_ms < b]
    tl.judge(
        [
            a,
            b,
            *(x for bk in mine for x in (bk.start_ms, bk.end_ms)),
            *(x for span in standby + windows for x in span),
        ]
    )
    name = str(info.get("name") or "")
    row = SummaryRow(code, name, str(info.get("unit") or ""), records=len(mine))
    records: dict[int, RecordRow] = {}
    for bk in mine:
        h = tl.hours(bk.start_ms, bk.end_ms)
        inside = [(max(s, bk.start_ms), min(e, bk.end_ms)) for s, e in tl.runs(bk.start_ms, bk.end_ms)]
        rec = RecordRow(bk, name, h, inside[0][0] if inside else None, inside[-1][1] if inside else None)
        mwh, with_energy = energy_in(energy_rows, bk.start_ms, bk.end_ms)
        rec.energy_mwh, rec.tariff = (mwh if with_energy else None), policy.tariff_yuan_per_kwh
        records[bk.id] = rec
        if h.known_ms == 0:
            rec.findings.append("unchecked")
            out.findings.append(
                Finding(
                    "unchecked", code, bk.start_ms, bk.end_ms, rec.booked_ms, None, (bk.id,), bk.applicant
                )
            )
            row.unchecked += 1
        elif h.run_ms < policy.unused_booking_run_s * 1000:
            rec.findings.append("booked_unused")
            out.findings.append(
                Finding(
                    "booked_unused",
                    code,
                    bk.start_ms,
                    bk.end_ms,
                    rec.booked_ms,
                    policy.unused_booking_run_s,
                    (bk.id,),
                    bk.applicant,
                )
            )
            row.unused += 1
    row.booked_ms = sum(e - s for s, e in booked)
    row.used_ms = sum(tl.hours(s, e).effective_ms for s, e in booked)
    period = tl.hours(a, b)
    row.run_ms, row.effective_ms = period.run_ms, period.effective_ms
    row.idle_ms = period.standby_ms - (period.effective_ms - period.run_ms)
    _overlaps(code, around, a, b, policy, records, out)
    _attribution(code, tl, runs, signins, around, a, b, policy, days, row, out)
    for s, e in standby:
        idle = (e - s) - tl.hours(s, e).effective_ms
        if idle >= policy.idle_min_s * 1000 and idle > 0:
            out.findings.append(Finding("idle", code, s, e, idle, policy.idle_min_s))
    out.records += records.values()
    out.summary.append(row)


def _overlaps(
    code: str,
    around: list[BookingRow],
    a: int,
    b: int,
    policy: PolicyConfig,
    records: dict[int, RecordRow],
    out: Reconciliation,
) -> None:
    """Pairs of bookings that overlap by the threshold or more, in the period where the overlap begins."""
    active: list[BookingRow] = []  # earlier bookings still open
    for later in sorted(around, key=lambda bk: (bk.start_ms, bk.end_ms, bk.id)):
        active = [bk for bk in active if bk.end_ms > later.start_ms]
        judged = a <= later.start_ms < b
        for earlier in active if judged else ():
            overlap = min(earlier.end_ms, later.end_ms) - later.start_ms
            if overlap < policy.overlap_min_s * 1000:
                continue
            ids = (earlier.id, later.id)
            out.findings.append(
                Finding(
                    "overlap",
                    code,
                    later.start_ms,
                    later.start_ms + overlap,
                    overlap,
                    policy.overlap_min_s,
                    ids,
                    " / ".join(dict.fromkeys((earlier.applicant, later.applicant))),
                )
            )
            for i in ids:
                if i in records and "overlap" not in records[i].findings:
                    records[i].findings.append("overlap")
        active.append(later)


def _attribution(
    code: str,
    tl: _Timeline,
    runs: list[tuple[int, int]],
    signins: list[SignInRow],
    around: list[BookingRow],
    a: int,
    b: int,
    policy: PolicyConfig,
    days: list[tuple[str, int, int]],
    row: SummaryRow,
    out: Reconciliation,
) -> None:
    """Unattributed running per day, and sign-ins that started no run.

    A sign-in attributes a whole run: one under way when it happened or starting within the window after."""
    window = policy.signin_window_s * 1000
    times = [s.at_ms for s in signins]

    def signed(run: tuple[int, int]) -> bool:
        i = bisect_right(times, run[0] - window - 1)
        return i < len(times) and times[i] < run[1]

    booked = union((bk.start_ms, bk.end_ms) for bk in around)
    loose = [(max(a, s), min(b, e)) for s, e in minus((r for r in runs if not signed(r)), booked)]
    loose = [(s, e) for s, e in loose if e > s]
    row.unattributed_ms = sum(e - s for s, e in loose)
    bounds = [days[0][1], *(hi for _, _, hi in days)]
    for (day, dlo, dhi), n in zip(days, spread(loose, bounds), strict=True):
        if n and n >= policy.unattributed_min_s * 1000:
            inside = [(max(s, dlo), min(e, dhi)) for s, e in loose if s < dhi and e > dlo]
            out.findings.append(
                Finding(
                    "unattributed", code, inside[0][0], inside[-1][1], n, policy.unattributed_min_s, day=day
                )
            )
    later = tl.runs(a, b + window)
    starts = [s for s, _ in later]
    for si in signins:
        if not a <= si.at_ms < b:
            continue
        # the last run starting by the window's end: if it has not ended by the sign-in, it was under way
        # or started in the window (runs are disjoint and sorted)
        k = bisect_right(starts, si.at_ms + window) - 1
        if k >= 0 and later[k][1] > si.at_ms:
            continue
        if tl.hours(si.at_ms, si.at_ms + window).known_ms == 0:
            continue  # the meter saw nothing then: not judged
        out.findings.append(
            Finding(
                "signin_unused",
                code,
                si.at_ms,
                si.at_ms + window,
                window,
                policy.signin_window_s,
                who=si.user,
            )
        )


def meta(
    ledger: Ledger, a: int, b: int, policy: PolicyConfig, tz: ZoneInfo, now_ms: int | None = None
) -> dict[str, Any]:
    """What a reconciliation file says about itself: period, zone, thresholds, provenance, definitions."""
    from labmeter import __version__

    now = int(time.time() * 1000) if now_ms is None else now_ms
    return {
        "period": {
            "from": _local(a, tz),
            "to": _local(b, tz),
            "from_ms": a,
            "to_ms": b,
            "to_is_exclusive": True,
        },
        "timezone": tz.key,
        "generated_at": _local(now, tz),
        "generated_ms": now,
        "counted_up_to": _local(min(b, now), tz),
        "labmeter_version": __version__,
        "ledger": ledger.name,
        "allowances": {
            "prep_allowance_s": policy.prep_allowance_s,
            "post_allowance_s": policy.post_allowance_s,
        },
        "thresholds": {k: getattr(policy, k) for k in THRESHOLDS},
        "tariff_yuan_per_kwh": policy.tariff_yuan_per_kwh,
        "rules": [
            "Service records are counted in the period they start in, and measured over their whole booking; one that has not begun by the generation time is left out until it has.",
            "Run, effective and idle time follow the hour rules of report hours (one definition); an instrument's own prep/post allowances from the registry apply.",
            "Running is attributed when it lies inside a booking of the instrument, or in a run that a sign-in was under way at or started (the run starts within signin_window_s after the sign-in).",
            "A booking or sign-in the meter knew no state for is not judged as unused: such bookings are listed as cannot be checked; such sign-ins are left out.",
        ],
        "findings": {
            code: {"en": en, "zh": zh, "threshold": key, "definition": d, "定义": dz}
            for code, (en, zh, key, d, dz) in KINDS.items()
        },
        "columns": {
            part: {c.key: {"en": c.en, "zh": c.zh, "definition": c.definition, "定义": c.定义} for c in cols}
            for part, (cols, _) in TABLES.items()
        },
    }


def _local(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="seconds")


def _seconds(ms: int) -> int | float:
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def table_rows(rec: Reconciliation, part: str, lang: str, codes: bool = False) -> list[dict[str, Any]]:
    """The raw values (ms, ints, text) of one table's rows; ``codes``: a record's findings as codes (JSON)."""
    if part == "records":
        return [r.values(None if codes else lang) for r in rec.records]
    if part == "findings":
        return [f.values(lang) for f in rec.findings]
    return [r.values() for r in rec.summary]


def _cell(c: Column, v: Any, tz: ZoneInfo, exact: bool) -> Any:
    """A value as a table cell or a spreadsheet cell (``exact``: hours unrounded)."""
    if v is None:
        return None
    if c.kind == "time":
        return _local(v, tz)
    if c.kind == "hours":
        return v / HOUR_MS if exact else round(v / HOUR_MS, 2)
    if c.kind == "kwh":
        return v / 1e6
    return v


def render(
    rec: Reconciliation, fmt: str, lang: str, tz: ZoneInfo, part: str = "all", bom: bool = True
) -> str:
    """A table (each part under its title), CSV (one part; ``bom`` for Excel) or JSON (exact seconds)."""
    parts = PARTS if part == "all" else (part,)
    if fmt == "json":
        doc: dict[str, Any] = {"meta": rec.meta}
        for p in parts:
            cols = TABLES[p][0]
            doc[p] = [_json_row(cols, d, tz) for d in table_rows(rec, p, lang, codes=True)]
        return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
    if fmt == "csv":
        if part == "all":
            raise FormatError("a CSV file holds one table: add --part records, findings or summary")
        cols = TABLES[part][0]
        hours = [c for c in cols if c.kind == "hours"]
        header = [c.zh if lang == "zh" else c.en for c in cols]
        header += [(c.zh if lang == "zh" else c.en).replace("(h)", "(s)") for c in hours]
        body = [
            ["" if (x := _cell(c, d[c.key], tz, False)) is None else x for c in cols]
            + [_seconds(d[c.key]) for c in hours]
            for d in table_rows(rec, part, lang)
        ]
        return ("\ufeff" if bom else "") + to_csv([header, *body])
    lines: list[str] = []
    for p in parts:
        cols = TABLES[p][0]
        if p == "records":
            cols = [c for c in cols if c.key not in ("name", "applicant_unit", "service_type", "known")]
        if p == "findings":
            cols = [c for c in cols if c.key not in ("code", "day")]
        title = TABLES[p][1][1 if lang == "zh" else 0]
        rows = table_rows(rec, p, lang)
        lines.append(f"{title} ({len(rows)})")
        if rows:
            lines += _text_table(cols, rows, lang, tz)
        lines.append("")
    return "\n".join(lines)


def _json_row(cols: list[Column], d: dict[str, Any], tz: ZoneInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in cols:
        v = d[c.key]
        if c.kind == "hours":
            out[f"{c.key}_h"] = round(v / HOUR_MS, 2)
            out[f"{c.key}_s"] = _seconds(v)
        elif c.kind == "time":
            out[c.key] = None if v is None else _local(v, tz)
            out[f"{c.key}_ms"] = v
        elif c.kind == "kwh":
            out[f"{c.key}_kwh"] = None if v is None else v / 1e6
            out[f"{c.key}_wh"] = None if v is None else v / 1000
        else:
            out[c.key] = v
    return out


def _text_table(cols: list[Column], rows: list[dict[str, Any]], lang: str, tz: ZoneInfo) -> list[str]:
    def show(c: Column, v: Any) -> str:
        x = _cell(c, v, tz, False)
        if x is None:
            return "-"
        if c.kind == "time":
            return str(x)[:16].replace("T", " ")
        return f"{x:.2f}" if isinstance(x, float) and c.kind in ("hours", "kwh", "yuan") else printable(x)

    cells = [[c.zh if lang == "zh" else c.en for c in cols]]
    cells += [[show(c, d[c.key]) for c in cols] for d in rows]
    widths = [max(text_width(r[i]) for r in cells) for i in range(len(cols))]
    out = []
    for n, r in enumerate(cells):
        out.append(
            "  ".join(
                v + " " * (w - text_width(v)) if c.kind in ("text", "time") else " " * (w - text_width(v)) + v
                for v, w, c in zip(r, widths, cols, strict=True)
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def write_xlsx(path: Path, rec: Reconciliation, lang: str, tz: ZoneInfo) -> None:
    """An About (说明) sheet (period, zone, thresholds, version, every column and finding defined), then a
    sheet per table: header frozen and filtered, exact hours shown to 0.01 h, text cells never formulas."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter

    zh = lang == "zh"
    wb = Workbook()
    wb.remove(wb.active)
    _about(wb.create_sheet("说明" if zh else "About"), rec.meta)
    for part, (cols, names) in TABLES.items():
        ws = wb.create_sheet(names[1 if zh else 0])
        append_row(ws, [c.zh if zh else c.en for c in cols])
        for cell in ws[1]:
            cell.font = Font(bold=True)
            cell.alignment = Alignment(wrap_text=True, vertical="top")
        for d in table_rows(rec, part, lang):
            append_row(ws, [_cell(c, d[c.key], tz, True) for c in cols])
        for i, c in enumerate(cols, start=1):
            fmt = {"hours": "0.00", "pct": "0.0", "kwh": "0.000", "yuan": "0.00"}.get(c.kind)
            if fmt:
                for (cell,) in ws.iter_rows(min_row=2, min_col=i, max_col=i):
                    cell.number_format = fmt
            widest = max(text_width(str(x.value or "")) for (x,) in ws.iter_rows(min_col=i, max_col=i))
            ws.column_dimensions[get_column_letter(i)].width = min(60, max(10, widest + 3))
        ws.freeze_panes = "B2"
        ws.auto_filter.ref = f"A1:{get_column_letter(len(cols))}{max(1, ws.max_row)}"
    wb.save(path)


def _about(ws: Any, m: dict[str, Any]) -> None:
    from openpyxl.styles import Alignment, Font

    p = m["period"]
    rows: list[list[Any]] = [
        ["项目 Item", "内容 Value"],
        ["统计期间 Period", f"{p['from']} – {p['to']}（不含终点 end exclusive）"],
        ["时区 Time zone", m["timezone"]],
        ["生成时间 Generated at", m["generated_at"]],
        ["labmeter 版本 Version", m["labmeter_version"]],
        ["账本 Ledger", m["ledger"]],
        ["准备时间 Prep allowance (s)", m["allowances"]["prep_allowance_s"]],
        ["后处理时间 Post allowance (s)", m["allowances"]["post_allowance_s"]],
        *([f"阈值 Threshold [policy] {k}", v] for k, v in m["thresholds"].items()),
        ["电价 Tariff [policy] tariff_yuan_per_kwh (元/kWh)", m.get("tariff_yuan_per_kwh") or "-"],
        *([f"规则 Rule {n}", r] for n, r in enumerate(m["rules"], start=1)),
        [],
        ["发现 Finding", "定义", "Definition"],
    ]
    for code, f in m["findings"].items():
        rows.append([f"{f['zh']} / {f['en']} ({code})", f["定义"], f["definition"]])
    rows += [[], ["列名 Column", "定义", "Definition"]]
    for part, cols in m["columns"].items():
        for c in cols.values():
            rows.append([f"{TABLES[part][1][1]}: {c['zh']} / {c['en']}", c["定义"], c["definition"]])
    bold = {1}
    for r in rows:
        append_row(ws, r)
        if r and r[0] in ("发现 Finding", "列名 Column"):
            bold.add(ws.max_row)
    for n in bold:
        for cell in ws[n]:
            cell.font = Font(bold=True)
    for letter, w in (("A", 46), ("B", 70), ("C", 70)):
        ws.column_dimensions[letter].width = w
    for row in ws.iter_rows(min_row=2):
        for cell in row:
            cell.alignment = Alignment(wrap_text=True, vertical="top")
