"""The shipped systemd units verify with systemd-analyze, and `labmeter agent install` writes a working unit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LABMETER, ROOT

ANALYZE = shutil.which("systemd-analyze")
EXE = shutil.which("labmeter") or str(Path(sys.executable).parent / "labmeter")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["labmeter-agent.service", "labmeter-collector.service"])
def test_shipped_units_verify(unit: str, tmp_path: Path) -> None:
    text = (ROOT / "systemd" / unit).read_text()
    for need in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=",
        "Restart=on-failure",
        "User=labmeter",
    ):
        assert need in text, need
    # the shipped ExecStart points at /opt/labmeter; verify checks the executable exists, so point it at ours
    (tmp_path / unit).write_text(text.replace("/opt/labmeter/bin/labmeter", EXE))
    out = subprocess.run(
        [str(ANALYZE), "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_agent_unit_has_dialout() -> None:
    assert "SupplementaryGroups=dialout" in (ROOT / "systemd" / "labmeter-agent.service").read_text()


def test_install_dry_run_and_write(tmp_path: Path) -> None:
    case = ROOT / "tests" / "testcases" / "config" / "mistyped_states_key" / "agent.toml"
    good = tmp_path / "agent.toml"
    good.write_text(case.read_text().replace("run_abov_w", "run_above_w"))
    dry = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(good), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert f"agent run --config {good}" in dry.stdout and "/opt/labmeter/bin" not in dry.stdout
    bad = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(case), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "did you mean 'run_above_w'" in bad.stderr
    nokey = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(good), "--unit-dir", str(tmp_path), "--no-enable"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nokey.returncode == 2 and "labmeter agent enroll" in nokey.stderr
    subprocess.run(
        [*LABMETER, "agent", "enroll", "-c", str(good)], check=True, capture_output=True, timeout=60
    )
    ok = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(good), "--unit-dir", str(tmp_path), "--no-enable"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "labmeter-agent.service").read_text() == dry.stdout
