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
from tests.scenario import Lab, check_against_truth

# variant: what fails, SIGKILL (else SIGTERM), and the simulated seconds it goes down and comes back
FAULTS = {
    "broker_restart": ("broker", False, 200, 300),
    "broker_sigkill": ("broker", True, 250, 320),
    "agent_sigkill": ("agent", True, 250, 330),
    "agent_state_lost": ("agent", True, 262, 342),  # off a change: which one the agent had seen is sure
    "collector_restart": ("collector", False, 250, 350),
}


def run_variant(lab: Lab, broker: BrokerProcess, variant: str) -> dict[str, float]:
    """Drive the disruption; returns the simulated times it happened at, as seen from outside: ``last`` before
    the fault, ``down`` once it took effect, ``up`` before the restart, ``back`` once the restarted side
    says it is connected (and, for the agent, running) again."""
    marks: dict[str, float] = {}
    if variant.removeprefix("defaults_") not in FAULTS:
        return marks
    kind, kill, at, until = FAULTS[variant.removeprefix("defaults_")]
    lab.sleep_until(at)
    offsets = {"agent": lab.log_size("agent"), "sim": lab.log_size("sim")}
    marks["last"] = lab.now_s()
    if kind == "broker":
        broker.stop(kill=kill)
    else:
        lab.stop(kind, kill=kill)
    if variant == "agent_state_lost":
        shutil.rmtree(lab.tmp / "agent-state")  # a re-imaged SD card: config and key kept, state gone
    marks["down"] = lab.now_s()
    lab.sleep_until(until)
    marks["up"] = lab.now_s()
    if kind == "broker":
        broker.start()
        marks["back"] = lab.wait_back(offsets, restarted=False)
    else:
        lab.start(kind)
        if kind == "agent":
            marks["back"] = lab.wait_back({"agent": offsets["agent"]}, restarted=True)
    return marks


@pytest.mark.parametrize(
    "variant",
    ["steady", "broker_restart", "broker_sigkill", "agent_sigkill", "agent_state_lost", "collector_restart"],
)
def test_hours_match_ground_truth(variant: str, broker: BrokerProcess, tmp_path: Path) -> None:
    run_and_check(Lab(tmp_path, broker), broker, variant)


@pytest.mark.parametrize("variant", ["defaults_agent_sigkill", "defaults_broker_sigkill"])
def test_hours_with_the_shipped_timers(variant: str, mosquitto: BrokerProcess, tmp_path: Path) -> None:
    """``checkpoint_s`` 5 and ``resend_after_s`` 30 as shipped (the other variants use 2 and 2): a longer blind
    spell before a crash, and what a lost connection took is only resent by the broker link's own replay."""
    run_and_check(Lab(tmp_path, mosquitto, checkpoint_s=5, resend_after_s=30), mosquitto, variant)


def run_and_check(lab: Lab, broker: BrokerProcess, variant: str) -> None:
    tmp_path = lab.tmp
    try:
        lab.start_all()
        marks = run_variant(lab, broker, variant)
        lab.finish()
    finally:
        lab.cleanup()

    check_against_truth(lab, variant, marks)
    restarts = (tmp_path / "collector.log").read_text().count("began a new chain")
    assert restarts == (2 if variant == "agent_state_lost" else 0)  # one per instrument
