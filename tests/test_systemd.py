"""The shipped systemd units verify with systemd-analyze, and `labmeter agent install` writes a working unit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


@pytest.fixture
def etc_dir() -> Iterator[Path]:
    """A config folder the unit's sandbox can read (not /tmp: PrivateTmp; not /root: ProtectHome)."""
    if not os.access("/var/lib", os.W_OK):
        pytest.skip("needs a folder outside /tmp and /home (root writes one under /var/lib)")
    d = Path(tempfile.mkdtemp(prefix="labmeter-test-", dir="/var/lib"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


SANDBOX = sorted((ROOT / "tests" / "testcases" / "sandbox").iterdir())


@pytest.mark.parametrize("case", SANDBOX, ids=[c.name for c in SANDBOX])
def test_install_checks_every_path_against_the_sandbox(case: Path, tmp_path: Path) -> None:
    """testcases/sandbox/<case>/: a config the unit could run with, or the path it could not use."""
    out = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(case / "agent.toml"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in out.stderr
    if (case / "expected_error.txt").exists():
        assert out.returncode == 2 and out.stdout == "", out.stdout
        assert (case / "expected_error.txt").read_text().strip() in out.stderr, out.stderr
        assert len([ln for ln in out.stderr.splitlines() if "the service cannot" in ln]) == 1, out.stderr
        # the real install refuses the same, before writing anything
        real = subprocess.run(
            [*LABMETER, "agent", "install", "-c", str(case / "agent.toml"), "--unit-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert real.returncode == 2 and (case / "expected_error.txt").read_text().strip() in real.stderr
        assert not (tmp_path / "labmeter-agent.service").exists()
    else:
        assert out.returncode == 0, out.stderr
        assert "ProtectSystem=strict" in out.stdout


def test_install_names_a_config_in_tmp(tmp_path: Path) -> None:
    case = ROOT / "tests" / "testcases" / "sandbox" / "ok_etc_and_var_lib" / "agent.toml"
    (tmp_path / "agent.toml").write_text(case.read_text())
    out = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(tmp_path / "agent.toml"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"--config = {tmp_path / 'agent.toml'}: the service cannot read it (PrivateTmp=yes" in out.stderr


def test_install_dry_run_and_write(etc_dir: Path) -> None:
    tmp_path = etc_dir
    case = ROOT / "tests" / "testcases" / "config" / "mistyped_states_key" / "agent.toml"
    good = tmp_path / "agent.toml"
    good.write_text(
        case.read_text()
        .replace("run_abov_w", "run_above_w")
        .replace('state_dir = "state"', 'state_dir = "/var/lib/labmeter"')
    )
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
