"""The time-series sink against VictoriaMetrics with its DEFAULT flags (it keeps every sample, even an identical
one: no "same timestamp overwrites"), read back through its Prometheus query API: over a day with sink restarts,
late intervals for hours already written and a store outage, every sum equals the ledger's to the millisecond.
(No InfluxDB server is installable here; VictoriaMetrics speaks the InfluxDB v2 write API.)"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from labmeter.collector.ledger import Ledger, StoredInterval
from labmeter.collector.rollup import direct
from labmeter.collector.sink_influx import CURSOR, STATE_CODE, InfluxSink

from labmeter import signing, wire
from labmeter.config import InfluxConfig, PolicyConfig
from tests.conftest import free_port, wait_port

VM = shutil.which("victoria-metrics")
pytestmark = pytest.mark.skipif(
    VM is None, reason="victoria-metrics is not installed (make deps installs it)"
)
TZ = ZoneInfo("Asia/Shanghai")
POLICY = PolicyConfig(prep_allowance_s=900, post_allowance_s=600)
H = 3_600_000


def t(day: int, hh: int, mm: int = 0, ss: int = 0) -> int:
    return int(datetime(2026, 3, day, hh, mm, ss, tzinfo=TZ).timestamp() * 1000)


class Victoria:
    """victoria-metrics as Debian ships it, with default flags (only where it keeps data and listens)."""

    def __init__(self, data: Path) -> None:
        self.data, self.port = data, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert VM
        self.proc = subprocess.Popen(
            [
                VM,
                f"-storageDataPath={self.data}",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=100y",  # the test's day lies in the past; the default keeps one month
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def _get(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        return urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=10).read()

    def flush(self) -> None:
        self._get("/internal/force_flush")

    def query(self, expr: str, at_ms: int) -> dict[str, float]:
        """An instant query as Grafana sends it: instrument (or agent) -> value."""
        self.flush()
        out = json.loads(self._get("/api/v1/query", query=expr, time=str(at_ms / 1000)))
        assert out["status"] == "success", out
        return {
            r["metric"].get("instrument") or r["metric"].get("agent", ""): float(r["value"][1])
            for r in out["data"]["result"]
        }

    def samples(self, name: str) -> int:
        self.flush()
        lines = self._get("/api/v1/export", **{"match[]": f'{{__name__="{name}"}}'}).splitlines()
        return sum(len(json.loads(line)["values"]) for line in lines)

    def export(self, name: str) -> dict[str, list[tuple[int, float]]]:
        self.flush()
        out: dict[str, list[tuple[int, float]]] = {}
        for line in self._get("/api/v1/export", **{"match[]": f'{{__name__="{name}"}}'}).splitlines():
            s = json.loads(line)
            out.setdefault(s["metric"]["instrument"], []).extend(
                zip(s["timestamps"], s["values"], strict=True)
            )
        return out


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Victoria]:
    v = Victoria(tmp_path / "vm")
    v.start()
    yield v
    v.stop()


def signed(tmp: Path, agent: str, instrument: str, spans: list[tuple[int, int, str]]) -> list[StoredInterval]:
    """Sign ``spans`` as the agent would (cut at hour boundaries, chained), without storing them yet."""
    from labmeter.agent.outbox import AgentStore, Signer
    from labmeter.agent.timeline import split

    key_file = tmp / f"{agent}.key"
    key = signing.load_private_key(key_file) if key_file.exists() else signing.generate_key_file(key_file)
    store = AgentStore(tmp / f"{agent}.db")
    cut = [p for s, e, st in spans for p in split(s, e, wire.State(st), H)]
    rows = store.emit(Signer(agent, key, signing.key_id(key.public_key())), instrument, cut, None)
    store.close()
    out = []
    for r in rows:
        env = wire.open_envelope(r.payload)
        out.append(StoredInterval.of(wire.decode_interval(env.body), wire.body_hash(env.body), r.payload))
    return out


def enrol(tmp: Path, ledger: Ledger, agent: str, instruments: list[str]) -> None:
    key = signing.generate_key_file(tmp / f"{agent}.key")
    ledger.add_agent(
        agent, signing.public_key_text(key.public_key()), signing.key_id(key.public_key()), instruments
    )


def store(ledger: Ledger, rows: list[StoredInterval]) -> None:
    ledger.store([(r, None) for r in rows], [])


INSTRUMENT = {"department": "", "kind": "general", "share_mode": ""}
INSTRUMENTS = [
    {"code": "CZ-ICP-101", "name": "ICP-MS", "unit": "化学学院", "category": "0303"},
    {"code": "CZ-XRD-001", "name": "XRD", "unit": "材料 学院", "category": "0304"},
    {"code": "CZ-SEM-007", "name": "SEM", "unit": "材料 学院", "category": "0304"},
]
DAY = {
    # instrument: (agent, schedule of the day)
    "CZ-ICP-101": (
        "pc-a",
        [
            (t(2, 0), t(2, 8, 10), "OFF"),
            (t(2, 8, 10), t(2, 8, 50), "STANDBY"),
            (t(2, 8, 50), t(2, 12, 7, 30), "RUNNING"),
            (t(2, 12, 7, 30), t(2, 12, 40), "STANDBY"),
            (t(2, 12, 40), t(2, 14, 3), "OFF"),
            (t(2, 14, 3), t(2, 14, 20), "STANDBY"),
            (t(2, 14, 20), t(2, 17, 45, 1), "RUNNING"),
            (t(2, 17, 45, 1), t(2, 19), "UNKNOWN"),
            (t(2, 19), t(3, 0), "OFF"),
        ],
    ),
    "CZ-XRD-001": (
        "pc-b",
        [
            (t(2, 0), t(2, 5, 59), "OFF"),
            (t(2, 5, 59), t(2, 6, 0, 1), "STANDBY"),
            (t(2, 6, 0, 1), t(2, 7, 30), "RUNNING"),
            (t(2, 7, 30), t(2, 9, 45), "STANDBY"),
            (t(2, 9, 45), t(2, 10, 15), "RUNNING"),
            (t(2, 10, 15), t(2, 21, 33), "OFF"),
            (t(2, 21, 33), t(3, 0), "RUNNING"),
        ],
    ),
    "CZ-SEM-007": (
        "pc-b",
        [
            (t(2, 0), t(2, 11, 11), "OFF"),
            (t(2, 11, 11), t(2, 16, 16), "RUNNING"),
            (t(2, 16, 16), t(3, 0), "STANDBY"),
        ],
    ),
}
RANGES = [
    (t(2, 0), t(3, 0)),
    (t(2, 6), t(2, 8)),
    (t(2, 9), t(2, 13)),
    (t(2, 12), t(2, 18)),
    (t(2, 21), t(3, 0)),
]


def sums(vm: Victoria, field: str, a: int, b: int) -> dict[str, float]:
    return vm.query(f"sum_over_time(labmeter_usage_{field}[{(b - a) // 60_000}m])", b)


def assert_matches_ledger(vm: Victoria, ledger: Ledger, ranges: list[tuple[int, int]]) -> None:
    for a, b in ranges:
        truth = direct(ledger, a, b, POLICY)
        run, eff = sums(vm, "run_s", a, b), sums(vm, "effective_s", a, b)
        for code, h in truth.items():
            if h.period_ms == h.uncovered_ms:
                continue
            assert round(run.get(code, 0) * 1000) == h.run_ms, (code, a, b, "run")
            assert round(eff.get(code, 0) * 1000) == h.effective_ms, (code, a, b, "effective")


def test_a_day_on_default_victoria_metrics_sums_to_the_ledger(vm: Victoria, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.upsert_instruments([{**INSTRUMENT, **i} for i in INSTRUMENTS])
    enrol(tmp_path, ledger, "pc-a", ["CZ-ICP-101"])
    enrol(tmp_path, ledger, "pc-b", ["CZ-XRD-001", "CZ-SEM-007"])
    day = {code: signed(tmp_path, agent, code, spans) for code, (agent, spans) in DAY.items()}
    # XRD's 06:00-08:00 intervals are held back: they arrive after those hours were written
    late = [iv for iv in day["CZ-XRD-001"] if t(2, 6) <= iv.start_ms < t(2, 8)]
    now = [t(2, 0)]

    def upto(ms: int) -> None:
        """The clock moves to ``ms``; every interval that ended by then is stored (but the late ones)."""
        now[0] = ms
        store(ledger, [iv for rows in day.values() for iv in rows if iv.end_ms <= ms and iv not in late])

    def sink() -> InfluxSink:
        return InfluxSink(InfluxConfig(url=vm.url), ledger, POLICY, settle_ms=0, now_ms=lambda: now[0])

    async def main() -> None:
        s = sink()
        # the morning, round after round; the hour in progress changes every time, each hour is written once
        for hh in range(1, 11):
            for mm in (5, 20, 40):
                upto(t(2, hh, mm))
                await s.flush()
        upto(t(2, 11, 30))
        await s.flush()
        final_before = t(2, 11)  # 10:00 is final at 11:00 + 15 min allowance + 2 min grace
        assert_matches_ledger(vm, ledger, [(t(2, 0), final_before), (t(2, 8), t(2, 10)), (t(2, 3), t(2, 9))])
        # written and pending add up to the ledger's hours so far
        pending = vm.query("last_over_time(labmeter_usage_current_run_s[10m])", now[0])
        so_far = direct(ledger, t(2, 0), t(2, 12), POLICY)
        for code, h in so_far.items():
            assert (
                round((sums(vm, "run_s", t(2, 0), t(2, 12)).get(code, 0) + pending[code]) * 1000) == h.run_ms
            )

        # the sink restarts (a collector restart): nothing is written again
        count = vm.samples("labmeter_usage_run_s")
        await s.close()
        s = sink()
        await s.flush()
        assert vm.samples("labmeter_usage_run_s") == count

        # the late intervals arrive: hours 05-08 of XRD were written without them; corrections put them right
        store(ledger, late)
        await s.flush()
        assert_matches_ledger(vm, ledger, [(t(2, 0), final_before), (t(2, 5), t(2, 9)), (t(2, 6), t(2, 7))])
        assert vm.samples("labmeter_usage_run_s") > count

        # the store goes down through the afternoon; the ledger keeps taking intervals; nothing is lost
        vm.stop()
        for hh in (13, 15, 17):
            upto(t(2, hh, 30))
            cursor = ledger.sink_cursor(CURSOR)
            with pytest.raises(Exception):  # noqa: B017 - whatever the client raises for a refused connection
                await s.flush()
            assert ledger.sink_cursor(CURSOR) == cursor
        vm.start()
        await s.flush()
        await s.close()

        # another restart, then the rest of the day and a night of rounds
        s = sink()
        for hh in range(18, 24):
            upto(t(2, hh, 30))
            await s.flush()
        upto(t(3, 2))
        await s.flush()
        await s.close()

    asyncio.run(main())
    assert_matches_ledger(vm, ledger, RANGES)
    truth = direct(ledger, t(2, 0), t(3, 0), POLICY)
    # each hour's points sum to it: at most one correction, never a rewrite of the same hour
    for code, points in vm.export("labmeter_usage_run_s").items():
        hours: dict[int, float] = {}
        for ts, v in points:
            hours[ts - (ts % H)] = hours.get(ts - (ts % H), 0) + v
            assert ts % H in (1, 2), "a point's offset in its hour is its revision"
        assert round(sum(hours.values()) * 1000) == truth[code].run_ms
    states = vm.export("labmeter_state_code")
    for code, (_, spans) in DAY.items():
        at = dict(states[code])
        for start, _end, state in spans:
            assert at[start] == STATE_CODE[state]
    with urllib.request.urlopen(f"{vm.url}/api/v1/label/__name__/values", timeout=10) as r:
        names = set(json.loads(r.read())["data"])
    assert not any(n.endswith("_state_state") for n in names), "no string field reaches the store"
    ledger.close()
