"""Test support for the time-series path: VictoriaMetrics as Debian ships it (default flags), and a lab day
signed as agents sign it, to store in a real ledger."""

from __future__ import annotations

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

from labmeter import signing, wire
from labmeter.collector.ledger import Ledger, StoredInterval
from labmeter.config import PolicyConfig
from tests.conftest import free_port, wait_port

VM = shutil.which("victoria-metrics")
needs_vm = pytest.mark.skipif(VM is None, reason="victoria-metrics is not installed (make deps installs it)")
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
        return {_key(r["metric"]): float(r["value"][1]) for r in out["data"]["result"]}

    def query_range(self, expr: str, start_ms: int, end_ms: int, step_s: int) -> dict[str, dict[int, float]]:
        """A range query as Grafana sends it for a graph: series key -> {timestamp ms: value}."""
        self.flush()
        params = {
            "query": expr,
            "start": str(start_ms / 1000),
            "end": str(end_ms / 1000),
            "step": str(step_s),
        }
        out = json.loads(self._get("/api/v1/query_range", **params))
        assert out["status"] == "success", out
        return {
            _key(r["metric"]): {round(float(ts) * 1000): float(v) for ts, v in r["values"]}
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


def _key(metric: dict[str, str]) -> str:
    return next((metric[k] for k in ("instrument", "unit", "agent") if k in metric), "")


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Victoria]:
    """A fixture: test modules import it by name."""
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


def state_at(code: str, at_ms: int) -> str | None:
    for start, end, state in DAY[code][1]:
        if start <= at_ms < end:
            return state
    return None


def setup_ledger(tmp: Path) -> tuple[Ledger, dict[str, list[StoredInterval]]]:
    """A ledger with the day's instruments and agents registered, and the day signed (not stored)."""
    ledger = Ledger(tmp / "ledger.sqlite")
    ledger.upsert_instruments([{**INSTRUMENT, **i} for i in INSTRUMENTS])
    enrol(tmp, ledger, "pc-a", ["CZ-ICP-101"])
    enrol(tmp, ledger, "pc-b", ["CZ-XRD-001", "CZ-SEM-007"])
    return ledger, {code: signed(tmp, agent, code, spans) for code, (agent, spans) in DAY.items()}
