"""The shipped systemd units verify with systemd-analyze, the agent runs under their sandbox, the docs
state their stop timeout, and `labmeter agent install` writes a working unit.

There is no systemd manager here (PID 1 is not systemd, so `systemd-run` cannot start a unit). The
sandbox is approximated with util-linux: a mount namespace whose root is remounted read-only except the
state directory (ProtectSystem=strict + StateDirectory), an unprivileged uid with no supplementary groups
and no_new_privs (User=, NoNewPrivileges=yes), and the unit's UMask. Not reproduced: the seccomp and
address-family filters, ProtectKernel*, PrivateTmp and ProtectHome.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LABMETER, ROOT, BrokerProcess, free_port
from tests.lab import wait_for

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


# The unit's own executable, as installed for it: wherever this checkout (and its venv) happens to live, CI may
# clone it under /tmp, which the unit's PrivateTmp hides; the check would rightly refuse that.
UNIT_EXE = "/opt/labmeter/venv/bin/labmeter"


@pytest.mark.parametrize("case", SANDBOX, ids=[c.name for c in SANDBOX])
def test_install_checks_every_path_against_the_sandbox(case: Path, tmp_path: Path, etc_dir: Path) -> None:
    """testcases/sandbox/<case>/: a config the unit could run with, or the path it could not use. The config
    is copied to a folder the unit can read, so only the paths inside it are under test."""
    config = etc_dir / "agent.toml"
    config.write_text((case / "agent.toml").read_text())
    out = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(config), "--dry-run", "--exe", UNIT_EXE],
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
            [
                *LABMETER,
                "agent",
                "install",
                "-c",
                str(config),
                "--unit-dir",
                str(tmp_path),
                "--exe",
                UNIT_EXE,
            ],
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
        [*LABMETER, "agent", "install", "-c", str(good), "--dry-run", "--exe", UNIT_EXE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert (
        f"ExecStart={UNIT_EXE} agent run --config {good}" in dry.stdout
        and "/opt/labmeter/bin" not in dry.stdout
    )
    bad = subprocess.run(
        [*LABMETER, "agent", "install", "-c", str(case), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "did you mean 'run_above_w'" in bad.stderr
    nokey = subprocess.run(
        [
            *LABMETER,
            "agent",
            "install",
            "-c",
            str(good),
            "--unit-dir",
            str(tmp_path),
            "--no-enable",
            "--exe",
            UNIT_EXE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nokey.returncode == 2 and "labmeter agent enroll" in nokey.stderr
    subprocess.run(
        [*LABMETER, "agent", "enroll", "-c", str(good)], check=True, capture_output=True, timeout=60
    )
    ok = subprocess.run(
        [
            *LABMETER,
            "agent",
            "install",
            "-c",
            str(good),
            "--unit-dir",
            str(tmp_path),
            "--no-enable",
            "--exe",
            UNIT_EXE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "labmeter-agent.service").read_text() == dry.stdout


def unit_settings(unit: str) -> dict[str, str]:
    text = (ROOT / "systemd" / unit).read_text()
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", text, re.M))


@pytest.mark.parametrize("unit", ["labmeter-agent.service", "labmeter-collector.service"])
def test_docs_state_the_units_stop_timeout(unit: str) -> None:
    timeout = unit_settings(unit)["TimeoutStopSec"]
    assert f"`TimeoutStopSec={timeout}`" in (ROOT / "docs" / "deploy.md").read_text()


NOBODY = 65534
SANDBOX = shutil.which("unshare") and shutil.which("setpriv") and os.geteuid() == 0


@pytest.fixture
def meter() -> Iterator[int]:
    from pyModbusTCP.server import ModbusServer

    port = free_port()
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    server.data_bank.set_input_registers(0x000C, list(struct.unpack(">HH", struct.pack(">f", 900.0))))
    server.start()
    yield port
    server.stop()


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    """A folder the service user can reach (pytest's own tmp folders are root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="labmeter-sandbox-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not SANDBOX, reason="needs root, unshare and setpriv (util-linux) to build the sandbox")
def test_agent_runs_under_the_units_sandbox(mosquitto: BrokerProcess, meter: int, sandbox_dir: Path) -> None:
    tmp_path = sandbox_dir
    reach = (
        subprocess.run(  # the unit's user must reach the interpreter and the package (not so in a 0700 dir)
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                sys.executable,
                "-c",
                "import labmeter",
            ],
            capture_output=True,
            timeout=60,
        )
    )
    if reach.returncode != 0:
        pytest.skip(f"nobody cannot run {sys.executable} with labmeter (a private parent directory?)")
    settings = unit_settings("labmeter-agent.service")
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    state.mkdir(mode=0o700)
    (etc / "agent.toml").write_text(
        f'[agent]\nid = "sandboxed"\nkey_file = "{etc / "agent.key"}"\nstate_dir = "{state}"\ncheckpoint_s = 1\n'
        f'[broker]\nurl = "{mosquitto.url}"\n'
        f'[[instrument]]\nid = "CZ-ICP-002"\npoll_s = 0.2\n[instrument.source]\ndriver = "modbus"\n'
        f'url = "tcp://127.0.0.1:{meter}"\nprofile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
    )
    enroll = subprocess.run(
        [*LABMETER, "agent", "enroll", "-c", str(etc / "agent.toml")], capture_output=True, timeout=60
    )
    assert enroll.returncode == 0, enroll.stderr
    for path in (tmp_path, etc, state, *etc.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    # as the unit's service user sees the system: everything read-only except its state directory
    script = (
        f'mount --bind "{state}" "{state}" && mount -o remount,bind,ro / && umask {settings["UMask"]} && '
        f"exec setpriv --no-new-privs --reuid={NOBODY} --regid={NOBODY} --clear-groups "
        f'"{sys.executable}" -m labmeter agent run -c "{etc / "agent.toml"}"'
    )
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: (state / "agent.db").exists(), timeout=30, what="the agent's outbox in its state dir"
        )

        def emitted() -> int:
            db = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
            try:
                return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
            except sqlite3.OperationalError:
                return 0
            finally:
                db.close()

        wait_for(lambda: agent.poll() is not None or emitted() > 0, timeout=30, what="a signed interval")
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        assert emitted() > 0
        # a write anywhere else fails inside the same sandbox (the read-only root is really in place)
        probe = subprocess.run(
            ["unshare", "--mount", "sh", "-c", f'mount -o remount,bind,ro / && touch "{etc}/x"'],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr
        began = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(int(settings["TimeoutStopSec"]))
        stopped_s = time.monotonic() - began
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        log.close()
    text = (tmp_path / "agent.log").read_text(errors="replace")
    assert rc == 0, text
    assert "Traceback" not in text and "Permission denied" not in text and "Read-only" not in text, text
    assert stopped_s < int(settings["TimeoutStopSec"])
    made = [p for p in state.iterdir() if p.is_file()]
    assert made and all(p.stat().st_uid == NOBODY and p.stat().st_mode & 0o077 == 0 for p in made), [
        (p.name, oct(p.stat().st_mode), p.stat().st_uid) for p in made
    ]


def test_install_refuses_an_executable_the_unit_cannot_see(etc_dir: Path) -> None:
    """A labmeter from a venv under /tmp (PrivateTmp) or /home (ProtectHome) is not there for the unit."""
    config = etc_dir / "agent.toml"
    config.write_text(
        (ROOT / "tests" / "testcases" / "sandbox" / "ok_etc_and_var_lib" / "agent.toml").read_text()
    )
    for exe in ("/tmp/venv/bin/labmeter", "/home/lab/venv/bin/labmeter"):
        out = subprocess.run(
            [*LABMETER, "agent", "install", "-c", str(config), "--dry-run", "--exe", exe],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and exe in out.stderr and "Traceback" not in out.stderr, out.stderr
