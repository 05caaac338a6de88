"""Metered hours equal the ground-truth schedule, also across broker, agent and collector restarts.

Each variant runs ten simulated minutes through real processes (broker, collector,
simulated Modbus meter and Tasmota plug, agent) on a shared scaled clock, against
Mosquitto (persistence off) and the built-in broker.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess
from tests.scenario import EPOCH_MS, Lab, check_against_truth


def run_variant(lab: Lab, broker: BrokerProcess, variant: str) -> dict[str, float]:
    """Drive the disruption; returns the simulated times it happened at."""
    marks: dict[str, float] = {}

    def now_s() -> float:
        return (lab.clock.wall_ms() - EPOCH_MS) / 1000

    if variant == "broker_restart":
        lab.sleep_until(200)
        broker.stop()
        marks["down"] = now_s()
        lab.sleep_until(300)
        broker.start()
        marks["up"] = now_s()
    elif variant == "broker_sigkill":
        lab.sleep_until(250)
        broker.stop(kill=True)
        marks["down"] = now_s()
        lab.sleep_until(320)
        broker.start()
        marks["up"] = now_s()
    elif variant == "agent_sigkill":
        lab.sleep_until(250)
        lab.stop("agent", kill=True)
        marks["down"] = now_s()
        lab.sleep_until(330)
        lab.start("agent")
        marks["up"] = now_s()
    elif variant == "agent_state_lost":
        lab.sleep_until(250)
        lab.stop("agent", kill=True)
        shutil.rmtree(lab.tmp / "agent-state")  # a re-imaged SD card: config and key kept, state gone
        marks["down"] = now_s()
        lab.sleep_until(330)
        lab.start("agent")
        marks["up"] = now_s()
    elif variant == "collector_restart":
        lab.sleep_until(250)
        lab.stop("collector")
        marks["down"] = now_s()
        lab.sleep_until(350)
        lab.start("collector")
        marks["up"] = now_s()
    return marks


@pytest.mark.parametrize(
    "variant",
    ["steady", "broker_restart", "broker_sigkill", "agent_sigkill", "agent_state_lost", "collector_restart"],
)
def test_hours_match_ground_truth(variant: str, broker: BrokerProcess, tmp_path: Path) -> None:
    lab = Lab(tmp_path, broker)
    try:
        lab.start_all()
        marks = run_variant(lab, broker, variant)
        lab.finish()
    finally:
        lab.cleanup()

    check_against_truth(lab, variant, marks)
    restarts = (tmp_path / "collector.log").read_text().count("began a new chain")
    assert restarts == (2 if variant == "agent_state_lost" else 0)  # one per instrument
