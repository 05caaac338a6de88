"""Calibration finds the off/standby/running levels of a noisy trace within 10 %, and writes thresholds
into the config keeping its comments."""

from __future__ import annotations

import random
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pyModbusTCP.server import ModbusServer

from labmeter import config
from labmeter.agent.calibrate import find_levels, suggest
from labmeter.drivers.registry import agent_config
from tests.conftest import LABMETER, free_port
from tests.support.modbus import words

TRUTH = {"off": 2.0, "standby": 180.0, "running": 1450.0}


def trace(n: int, rng: random.Random) -> list[float]:
    out = []
    for i in range(n):
        level = TRUTH[["off", "standby", "running", "standby"][(i // 50) % 4]]
        out.append(max(0.0, rng.gauss(level, level * 0.05)))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_levels_within_ten_percent(seed: int) -> None:
    levels = find_levels(trace(600, random.Random(seed)))
    assert len(levels) == 3
    for found, want in zip(levels, TRUTH.values(), strict=True):
        assert abs(found.mean_w - want) <= 0.1 * want, (found, want)
    s = suggest(levels)
    assert levels[0].high_w < s.off_below_w < levels[1].low_w
    assert levels[1].high_w < s.run_above_w < levels[2].low_w
    assert 0 < s.hysteresis_w < levels[2].low_w - levels[1].high_w


def test_one_level_is_refused() -> None:
    with pytest.raises(ValueError, match="only one power level"):
        suggest(find_levels([100.0, 101.0, 99.5]))


def test_cli_records_a_meter_and_writes_the_config(tmp_path: Path) -> None:
    port = free_port()
    meter = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    meter.start()
    values = trace(400, random.Random(9))
    stop = threading.Event()

    def play() -> None:
        i = 0
        while not stop.is_set():
            meter.data_bank.set_input_registers(0x000C, words(values[i % len(values)]))
            i += 1
            time.sleep(0.005)

    player = threading.Thread(target=play, daemon=True)
    player.start()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nid = "cal"\nkey_file = "agent.key"\nstate_dir = "state"\n\n'
        '[[instrument]]\nid = "CZ-XRD-001"  # the diffractometer in room 101\npoll_s = 0.01\n'
        f'[instrument.source]\ndriver = "modbus"\nurl = "tcp://127.0.0.1:{port}"\nprofile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 1\nrun_above_w = 2  # placeholder until calibrated\n"
    )
    try:
        out = subprocess.run(
            [
                *LABMETER,
                "agent",
                "calibrate",
                "-c",
                str(cfg),
                "--instrument",
                "CZ-XRD-001",
                "--minutes",
                "0.08",
                "--write",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop.set()
        player.join(5)
        meter.stop()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "suggested: off_below_w" in out.stdout and f"written to {cfg}" in out.stdout
    # the live reading and the time left, shown from the first reading on
    live = re.search(r"now +(\d+\.\d) W +0:0(\d) left +\((\d+) reading\(s\), 0 failed\)", out.stdout)
    assert live is not None, out.stdout
    assert float(live.group(1)) in [round(v, 1) for v in values] and int(live.group(2)) >= 3
    text = cfg.read_text()
    assert "# the diffractometer in room 101" in text
    states = config.load(cfg, agent_config()).instrument[0].states
    assert 2.0 < states.off_below_w < 180.0 < states.run_above_w < 1450.0
