"""Metered hours equal the ground-truth schedule, also across broker, agent and collector restarts.

Each variant runs ten simulated minutes through real processes (broker, collector,
simulated Modbus meter and Tasmota plug, agent) on a shared scaled clock, against
Mosquitto (persistence off) and the built-in broker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from labmeter.collector.hours import compute
from labmeter.collector.ledger import Ledger

from tests.conftest import BrokerProcess
from tests.scenario import (
    EPOCH_MS,
    METER_SCHEDULE,
    PLUG_EVERY_S,
    PLUG_SCHEDULE,
    POLL_S,
    POST_S,
    PREP_S,
    WINDOW,
    Lab,
    transitions,
    truth_hours,
)

INSTRUMENTS = {"CZ-XRD-001": (METER_SCHEDULE, 0.0), "CZ-HPLC-002": (PLUG_SCHEDULE, PLUG_EVERY_S)}


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
    elif variant == "collector_restart":
        lab.sleep_until(250)
        lab.stop("collector")
        marks["down"] = now_s()
        lab.sleep_until(350)
        lab.start("collector")
        marks["up"] = now_s()
    return marks


@pytest.mark.parametrize(
    "variant", ["steady", "broker_restart", "broker_sigkill", "agent_sigkill", "collector_restart"]
)
def test_hours_match_ground_truth(variant: str, broker: BrokerProcess, tmp_path: Path) -> None:
    lab = Lab(tmp_path, broker)
    try:
        lab.start_all()
        marks = run_variant(lab, broker, variant)
        lab.finish()
    finally:
        lab.cleanup()

    assert lab.outbox_left() == 0, "the outbox did not drain: " + lab.log("agent")
    a, b = EPOCH_MS + WINDOW[0] * 1000, EPOCH_MS + WINDOW[1] * 1000
    ledger = Ledger(tmp_path / "collector-data" / "ledger.sqlite")
    try:
        for code, (schedule, period_s) in INSTRUMENTS.items():
            seqs = [
                r[0]
                for r in ledger.db.execute(
                    "SELECT seq FROM intervals WHERE instrument=? ORDER BY seq", (code,)
                )
            ]
            assert seqs == list(range(1, len(seqs) + 1)), f"{code}: chain has gaps"
            rows = [
                (r[3], r[4], r[5], bool(r[6]))
                for r in ledger.intervals_between(a - PREP_S * 1000, b + PREP_S * 1000, code)
            ]
            h = compute(rows, a, b, PREP_S * 1000, POST_S * 1000)
            assert h.unverified_ms == 0, f"{code}: unverified time"
            assert h.uncovered_ms == 0, f"{code}: time with no interval"
            unknown = [
                ((s - EPOCH_MS) / 1000, (e - EPOCH_MS) / 1000) for s, e, st, _ in rows if st == "UNKNOWN"
            ]
            run_s, eff_s = truth_hours(schedule, unknown)
            tol = transitions(schedule) * (POLL_S + period_s + 0.5)
            got_run, got_eff, unknown_s = h.run_ms / 1000, h.effective_ms / 1000, h.unknown_ms / 1000
            msg = f"{variant} {code}: run {got_run:.1f}/{run_s:.1f} eff {got_eff:.1f}/{eff_s:.1f} unknown {unknown_s:.1f} tol {tol}"
            print(msg)
            assert abs(got_run - run_s) <= tol, msg
            assert abs(got_eff - eff_s) <= tol, msg
            assert run_s > 100, msg  # the known time still holds most of the schedule's running

            down = marks.get("up", 0) - marks.get("down", 0)
            if variant in ("steady", "collector_restart"):
                assert unknown_s <= 2 * POLL_S + 1, msg
            elif variant == "agent_sigkill":
                # the agent's down time is UNKNOWN: at least the real gap less one checkpoint period, plus the
                # restarted agent's start-up (a process start; for the plug also a broker connection and a
                # first message), a few real seconds at this time scale on a loaded machine
                slack = 80 if code == "CZ-XRD-001" else 240
                assert down - 3 <= unknown_s <= down + slack, msg
            elif code == "CZ-XRD-001":
                assert unknown_s <= 2 * POLL_S + 1, msg  # a broker outage does not blind a Modbus meter
            else:
                assert unknown_s <= down + 400, msg  # the plug's feed goes through the broker
    finally:
        ledger.close()
