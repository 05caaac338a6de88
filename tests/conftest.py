"""Real peers for the tests: Mosquitto and the built-in broker as separate processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from labmeter.netutil import free_port, wait_port

__all__ = ["LABMETER", "ROOT", "BrokerProcess", "free_port", "wait_port"]

ROOT = Path(__file__).resolve().parent.parent
LABMETER = [sys.executable, "-m", "labmeter"]


# Real processes on the scaled clock (one real second is 40 simulated ones), or the demo's 14 hours in 20 s:
# what they measure bends when other tests share the CPU, so `make test` runs them after the parallel part,
# one at a time (pytest -m serial). So do the tests whose real-time timeouts three workers on two cores
# broke in clean runs: the agent under Wine (its stop), the serial driver's 0.3 s reply timeout, and the
# agent under the unit's sandbox.
SERIAL_MODULES = {
    "test_scenario",
    "test_chaos",
    "test_scaleout",
    "test_power",
    "test_demo",
    "test_windows_wine",
    "test_driver_serial",
    "test_systemd",
}


# minutes each: started first, so no worker is still on one of them after the others ran out of tests
LONG_MODULES = ("test_windows_wine", "test_ingest_fuzz")


def module_name(item: pytest.Item) -> str:
    module = getattr(item, "module", None)  # a pytest.Function has one; other items may not
    return str(module.__name__).rpartition(".")[2] if module is not None else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if module_name(item) in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
    items.sort(key=lambda item: module_name(item) not in LONG_MODULES)  # stable: the rest keep their order


def mosquitto_bin() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(path):
        pytest.fail("mosquitto is not installed; run `make deps` (apt-get install mosquitto)")
    return path


class BrokerProcess:
    """A broker we can stop, kill and start again on the same port."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._started = False

    def command(self) -> list[str]:
        if self.kind == "mosquitto":
            conf = self.workdir / f"mosquitto-{self.port}.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\nmax_inflight_messages 0\n"
            )
            return [mosquitto_bin(), "-c", str(conf)]
        return [*LABMETER, "broker", "--listen", f"127.0.0.1:{self.port}"]

    def start(self) -> None:
        """Start on ``self.port`` and return once this process (not whoever else) listens there. The first
        start moves to another port if the chosen one was taken between free_port() and the bind; a restart
        must keep its port, so it fails instead."""
        first = not self._started
        for _attempt in range(5 if first else 1):
            log = open(self.workdir / f"broker-{self.kind}.log", "ab")  # noqa: SIM115
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, cwd=self.workdir)
            if self._listening(self.proc):
                self._started = True
                return
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            if first:
                self.port = free_port()
                self.url = f"mqtt://127.0.0.1:{self.port}"
        raise RuntimeError(
            f"{self.kind} broker did not listen on 127.0.0.1:{self.port}: see broker-{self.kind}.log"
        )

    def _listening(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
        """True once ``proc`` itself has a listening socket on our port; False if it exits or times out."""
        ps = psutil.Process(proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conns = ps.net_connections(kind="tcp")
            except psutil.Error:
                return False
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == self.port for c in conns):
                return True
            time.sleep(0.05)
        return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(10)
        self.proc = None


@pytest.fixture(params=["mosquitto", "builtin"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(request.param, tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess("mosquitto", tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One PostgreSQL server for the session (Debian's package); each test takes a fresh database."""
    from tests.postgres import PostgresServer, binaries

    if binaries() is None:
        pytest.fail("PostgreSQL is not installed; run `make deps` (apt-get install postgresql)")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The ledger on each backend it supports: SQLite (embedded default) and PostgreSQL (scale-out)."""
    from labmeter.collector.ledger import Ledger

    if request.param == "sqlite":
        ledger = Ledger(tmp_path / "ledger.sqlite")
    else:
        ledger = Ledger.open(request.getfixturevalue("postgres").new_database(), tmp_path)
    yield ledger
    ledger.close()
