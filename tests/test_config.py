"""Config errors stop start-up with the file, the line, the key and a hint (testcases/config/<case>/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from labmeter import config
from labmeter.drivers.registry import agent_config

CASES = sorted((Path(__file__).parent / "testcases" / "config").iterdir())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_config(case: Path) -> None:
    expected = (case / "expected_error.txt").read_text().strip()
    collector = case / "collector.toml"
    with pytest.raises(config.ConfigError) as err:
        if collector.exists():
            config.load(collector, config.CollectorConfig)
        else:
            config.load(case / "agent.toml", agent_config())
    shown = str(err.value).replace(str(case) + "/", "")
    assert expected in shown, shown


def test_cli_stops_with_line_number_and_exit_code(tmp_path: Path) -> None:
    case = Path(__file__).parent / "testcases" / "config" / "mistyped_states_key"
    proc = subprocess.run(
        [sys.executable, "-m", "labmeter", "agent", "run", "--config", str(case / "agent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        "agent.toml:14: unknown key 'instrument[0].states.run_abov_w'; did you mean 'run_above_w'?"
        in proc.stderr
    )


def test_example_configs_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent / "config"
    agent = config.load(root / "agent.example.toml", agent_config())
    assert [i.id for i in agent.instrument] == ["CZ-XRD-001", "CZ-HPLC-002"]
    collector = config.load(root / "collector.example.toml", config.CollectorConfig)
    assert collector.broker.listen.startswith("127.0.0.1:")


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(
        (Path(__file__).parent / "testcases" / "config" / "mistyped_states_key" / "agent.toml")
        .read_text()
        .replace("run_abov_w", "run_above_w")
    )
    cfg = config.load(tmp_path / "agent.toml", agent_config())
    assert cfg.agent.key_file == tmp_path / "agent.key"
    assert cfg.agent.state_dir == tmp_path / "state"
