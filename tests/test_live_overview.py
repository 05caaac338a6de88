"""/api/overview keeps each row's encoded live columns between answers (a province's page must not re-encode
5,000 rows per load): a kept row must never outlive what it shows. A new state, an agent going silent and
a hostile name each show in the very next answer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from labmeter import config
from labmeter.collector.ledger import Ledger
from labmeter.collector.live.web import LiveView
from labmeter.collector.registry import import_instruments
from labmeter.collector.service import Collector

HOSTILE = 'x"],["INJECTED",1],[" </script><b>\u2028\u202e'


@pytest.fixture
def view(tmp_path: Path) -> Any:
    cfg = config.parse(f'[collector]\ndata_dir = "{tmp_path}"\n', config.CollectorConfig)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    csv = tmp_path / "instruments.csv"
    name = HOSTILE.replace('"', '""')
    csv.write_text(f'code,name,unit\nCZ-A,"{name}",化学学院\nCZ-B,电镜,分析测试中心\n', encoding="utf-8")
    import_instruments(ledger, csv)
    ledger.close()
    collector = Collector(cfg)
    now = collector.clock.wall_ms()
    collector.live.instruments["CZ-A"] = {
        "instrument": "CZ-A",
        "agent": "pc-a",
        "state": "RUNNING",
        "start": now,
    }
    collector.live.agents["pc-a"] = {"verified": True, "online": True, "received": now}
    yield collector, LiveView(collector, "127.0.0.1:0", public=True)
    collector.ledger.close()


def rows(view: LiveView, public: bool = False) -> dict[str, dict[str, Any]]:
    body = json.loads(view.overview(public))
    return {r[0]: dict(zip(body["columns"], r, strict=True)) for r in body["rows"]}


def test_a_new_state_shows_in_the_next_answer(view: Any) -> None:
    collector, v = view
    assert rows(v)["CZ-A"]["state"] == "RUNNING"
    now = collector.clock.wall_ms()
    collector.live.instruments["CZ-A"] = {
        "instrument": "CZ-A",
        "agent": "pc-a",
        "state": "STANDBY",
        "start": now,
    }
    got = rows(v)["CZ-A"]
    assert got["state"] == "STANDBY" and got["since"] == now


def test_a_silent_agent_shows_unknown_in_the_next_answer(view: Any) -> None:
    _collector, v = view
    assert rows(v)["CZ-A"]["agent_status"] == "up"
    v.agent_down_after_s = 0.05
    time.sleep(0.1)  # the heartbeat is now older than the timeout; nothing else changed
    got = rows(v)["CZ-A"]
    assert (got["agent_status"], got["state"], got["last_state"]) == ("down", "UNKNOWN", "RUNNING")
    assert got["today.provisional_run_s"] == 0.0  # the open interval counts only while its agent is up


def test_an_instrument_without_a_registry_row_or_agent(view: Any) -> None:
    collector, v = view
    collector.live.instruments["CZ-X"] = {"instrument": "CZ-X", "agent": "pc-a", "state": "OFF", "start": 1}
    got = rows(v)
    assert got["CZ-X"]["state"] == "OFF" and got["CZ-X"]["name"] == "" and got["CZ-X"]["today.run_s"] is None
    assert got["CZ-B"]["agent_status"] == "none" and got["CZ-B"]["state"] == "UNKNOWN"
    del collector.live.instruments["CZ-X"]
    assert "CZ-X" not in rows(v)


def test_a_hostile_name_stays_one_value(view: Any) -> None:
    _collector, v = view
    for public in (False, True):
        got = rows(v, public)
        assert set(got) == {"CZ-A", "CZ-B"}
        assert got["CZ-A"]["name"] == HOSTILE and got["CZ-A"]["unit"] == "化学学院"
