"""Scale-out: two collectors behind one Mosquitto with a shared subscription, one PostgreSQL ledger.

The simulated lab of the scenario tests runs against both; one collector is SIGKILLed
mid-run and not restarted. The other must take over its share (agents resend what was
not acknowledged), and the final hours must equal the ground truth with whole chains:
no loss, no double counting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.conftest import BrokerProcess
from tests.scenario import EPOCH_MS, Lab, check_against_truth


def test_two_collectors_on_postgresql_survive_losing_one(
    mosquitto: BrokerProcess, postgres: Any, tmp_path: Path
) -> None:
    lab = Lab(tmp_path, mosquitto, ledger_url=postgres.new_database(), shared_group="collectors")
    marks: dict[str, float] = {}
    try:
        lab.start_all()
        lab.sleep_until(250)
        stored_before = lab.ledger().db.execute("SELECT COUNT(*) FROM intervals").fetchone()[0]
        lab.stop("collector2", kill=True)
        marks["down"] = (lab.clock.wall_ms() - EPOCH_MS) / 1000
        lab.finish()
    finally:
        lab.cleanup()
    check_against_truth(lab, "collector_kill_shared", marks)
    total = lab.ledger().db.execute("SELECT COUNT(*) FROM intervals").fetchone()[0]
    found = re.search(r"stored (\d+) interval", lab.log("collector"))
    assert found, lab.log("collector")
    survivor = int(found.group(1))
    print(
        f"intervals: {total} in the ledger, {survivor} stored by the survivor, {stored_before} before the kill"
    )
    assert 0 < survivor < total, "the load was not shared: one collector stored everything"
    assert stored_before > 0
