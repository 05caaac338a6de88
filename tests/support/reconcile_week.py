"""The reconciliation week (2026-03-02 to 03-08, Asia/Shanghai): a known schedule, bookings and sign-ins that
raise every kind of finding once or more. The expected figures are worked out by hand in
tests/test_reconcile.py; this module only builds the ledger (signed by the real agent code, bookings through
the real import path).

CZ-A (timeline, local):
    03-02 08:45 STANDBY, 09:00 RUNNING, 11:00 STANDBY, 11:30 OFF
    03-03 14:00 RUNNING, 16:30 STANDBY, 17:00 OFF
    03-04 21:00 RUNNING until 03-05 01:00 (no booking, no sign-in: across midnight)
    03-05 10:10-12:00 RUNNING (a sign-in at 09:50 started it), 15:00-15:30 RUNNING (the sign-in at 14:00 is
          too early for it)
    03-06 07:00-07:05 RUNNING (a five-minute blip), 08:00 STANDBY, 12:00 RUNNING, 13:00 STANDBY, 20:00 OFF
    03-08 00:00-06:00 UNKNOWN, then no interval at all (the agent died)
    OFF at all other times from 03-02 00:00.
CZ-B: OFF from 03-02 00:00 to 03-09 00:00 except RUNNING 03-03 14:00-16:00.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from labmeter import signing, wire
from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import import_instruments, import_services
from tests.lab import store_schedule

TZ = ZoneInfo("Asia/Shanghai")


def t(day: int, hh: int, mm: int = 0) -> int:
    """Local time on 2026-03-<day> (day 9 at 00:00 ends the week)."""
    return int(datetime(2026, 3, day, hh, mm, tzinfo=TZ).timestamp() * 1000)


WEEK = (t(2, 0), t(9, 0))


def timeline(events: list[tuple[int, str]], end: int) -> list[tuple[int, int, str]]:
    return [(s, e, st) for (s, st), (e, _) in zip(events, [*events[1:], (end, "")], strict=True)]


A_EVENTS = [
    (t(2, 0), "OFF"),
    (t(2, 8, 45), "STANDBY"),
    (t(2, 9), "RUNNING"),
    (t(2, 11), "STANDBY"),
    (t(2, 11, 30), "OFF"),
    (t(3, 14), "RUNNING"),
    (t(3, 16, 30), "STANDBY"),
    (t(3, 17), "OFF"),
    (t(4, 21), "RUNNING"),
    (t(5, 1), "OFF"),
    (t(5, 10, 10), "RUNNING"),
    (t(5, 12), "OFF"),
    (t(5, 15), "RUNNING"),
    (t(5, 15, 30), "OFF"),
    (t(6, 7), "RUNNING"),
    (t(6, 7, 5), "OFF"),
    (t(6, 8), "STANDBY"),
    (t(6, 12), "RUNNING"),
    (t(6, 13), "STANDBY"),
    (t(6, 20), "OFF"),
    (t(8, 0), "UNKNOWN"),
]
A = timeline(A_EVENTS, t(8, 6))
B = timeline([(t(2, 0), "OFF"), (t(3, 14), "RUNNING"), (t(3, 16), "OFF")], WEEK[1])

INSTRUMENTS_CSV = (
    "仪器编号,仪器名称,管理单位,分类编码,仪器类型,原值（万元）,定额机时\n"
    "CZ-A,X射线衍射仪,材料学院,020101,通用,350,\n"
    "CZ-B,扫描电镜,分析测试中心,030201,专用,680,\n"
)
BOOKINGS = {
    # name: (instrument, start, end, applicant)
    "R1": ("CZ-A", "2026-03-02 08:30", "2026-03-02 11:30", "张三"),
    "R9": ("CZ-A", "2026-03-02 11:28", "2026-03-02 12:00", "吴十"),  # a two-minute hand-over with R1
    "R2": ("CZ-A", "2026-03-03 10:00", "2026-03-03 12:00", "李四"),  # the instrument stayed off
    "R3": ("CZ-A", "2026-03-03 14:00", "2026-03-03 16:00", "王五"),
    "R4": ("CZ-A", "2026-03-03 15:00", "2026-03-03 17:00", "赵六"),  # overlaps R3 by an hour
    "R5": ("CZ-A", "2026-03-06 12:00", "2026-03-06 13:00", "钱七"),
    "R7": ("CZ-A", "2026-03-08 02:00", "2026-03-08 04:00", "孙八"),  # only UNKNOWN inside
    "R6": ("CZ-A", "2026-03-08 09:00", "2026-03-08 11:00", "孙八"),  # no interval inside
    "RB": ("CZ-B", "2026-03-03 14:00", "2026-03-03 16:00", "周九"),  # same time as R3, other instrument
}
SIGNINS = {
    # name: (instrument, at, user pseudonym)
    "S1": ("CZ-A", t(5, 9, 50), "a1" * 8),  # starts the 10:10 run (20 min later)
    "S3": ("CZ-A", t(5, 11), "a3" * 8),  # during that run
    "S2": ("CZ-A", t(5, 14), "a2" * 8),  # no run until 15:00: an hour later
    "S4": ("CZ-A", t(8, 10), "a4" * 8),  # the agent was down: not judged
}


def services_csv(applicant: dict[str, str] | None = None) -> str:
    """The bookings as a facility's export; ``applicant`` replaces the applicant of named bookings."""
    lines = ["仪器编号,开始时间,结束时间,申请人,申请单位,服务类型,服务方向,金额"]
    for name, (code, s, e, who) in BOOKINGS.items():
        who = (applicant or {}).get(name, who)
        quoted = '"' + who.replace('"', '""') + '"'
        lines.append(f"{code},{s},{e},{quoted},材料学院,120,135,0")
    return "\n".join(lines) + "\n"


def build(tmp: Path, ledger: Ledger, applicant: dict[str, str] | None = None) -> dict[str, int]:
    """Registry, signed timelines and sign-ins, and the bookings; returns each booking's record id."""
    from labmeter.agent.outbox import AgentStore, Signer

    (tmp / "instruments.csv").write_text(INSTRUMENTS_CSV, encoding="utf-8")
    (tmp / "services.csv").write_text(services_csv(applicant), encoding="utf-8")
    assert import_instruments(ledger, tmp / "instruments.csv") == 2
    store_schedule(tmp, ledger, "pc-a", "CZ-A", A)
    store_schedule(tmp, ledger, "pc-b", "CZ-B", B)
    key = signing.load_private_key(tmp / "pc-a.key")
    signer = Signer("pc-a", key, signing.key_id(key.public_key()))
    store = AgentStore(tmp / "pc-a.db")
    rows = []
    for code, at, user in SIGNINS.values():
        payload = store.emit_signin(signer, code, at, user).payload
        env = wire.open_envelope(payload)
        si = wire.decode_signin(env.body)
        rows.append(("pc-a", code, si.seq, si.at, si.user, wire.body_hash(env.body), payload))
    store.close()
    ledger.store_signins(rows)
    res = import_services(ledger, tmp / "services.csv", TZ)
    assert res.added == len(BOOKINGS), res
    by_key = {(str(r["instrument"]), int(r["start_ms"])): int(r["id"]) for r in ledger.service_records(*WEEK)}  # type: ignore[call-overload]
    out = {}
    for name, (code, s, _e, _who) in BOOKINGS.items():
        day, hm = s.split(" ")
        hh, mm = (int(x) for x in hm.split(":"))
        out[name] = by_key[(code, t(int(day[-2:]), hh, mm))]
    return out
