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


def test_a_recomputation_lets_the_loop_run_between_its_steps(view: Any) -> None:
    """At province scale the hours take most of a second; recomputed after a stale answer, they come in
    steps with the event loop free between them (ingest, acks and other pages wait for no more than one)."""
    import asyncio

    _collector, v = view
    seen: list[str] = []

    def steps(fail: bool) -> Any:
        for k in range(3):
            seen.append(f"step {k}")
            yield
        if fail:
            raise RuntimeError("the ledger went away")
        return "new"

    async def main() -> None:
        async def other() -> None:
            for _ in range(6):
                seen.append("other")
                await asyncio.sleep(0)

        v._cache["k"] = (0.0, "old")
        for fail in (True, False):
            v._refreshing.add("k")
            ticker = asyncio.create_task(other())
            v._refresh("k", lambda fail=fail: steps(fail))
            while "k" in v._refreshing:
                await asyncio.sleep(0)
            await ticker
            assert v._cache["k"][1] == ("old" if fail else "new")  # a failed one leaves the last value
        first, last = seen.index("step 0"), seen.index("step 2")
        assert "other" in seen[first:last], seen

    asyncio.run(main())
