"""An installer's path: enroll, run before registration (rejected, kept as dead letters), register,
resend, delivered; heartbeat and LWT seen by the collector."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from pyModbusTCP.server import ModbusServer

from labmeter.collector.verify import RELOAD_EVERY_S
from tests.conftest import LABMETER, BrokerProcess, free_port
from tests.lab import CollectorThread, collector_config, wait_for
from tests.support.modbus import words


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABMETER, *args], cwd=tmp, capture_output=True, text=True, timeout=60)


def test_unregistered_agent_dead_letters_then_resend(mosquitto: BrokerProcess, tmp_path: Path) -> None:
    port = free_port()
    meter = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    meter.data_bank.set_input_registers(0x000C, words(900.0))
    meter.start()
    (tmp_path / "agent.toml").write_text(
        '[agent]\nid = "bench-01"\nkey_file = "keys/agent.key"\nstate_dir = "state"\nheartbeat_s = 1\n'
        f'[broker]\nurl = "{mosquitto.url}"\n'
        f'[[instrument]]\nid = "CZ-NMR-009"\npoll_s = 0.2\n[instrument.source]\ndriver = "modbus"\n'
        f'url = "tcp://127.0.0.1:{port}"\nprofile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
    )
    cfg = collector_config(tmp_path, mosquitto.url)
    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{cfg.collector.data_dir}"\n')
    enroll = cli(tmp_path, "agent", "enroll", "--config", "agent.toml")
    assert enroll.returncode == 0, enroll.stderr
    key_file = tmp_path / "keys" / "agent.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    add_cmd = next(
        x.strip() for x in enroll.stdout.splitlines() if x.strip().startswith("labmeter collector")
    )

    agent = None
    with CollectorThread(cfg) as ct:
        try:
            log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
            agent = subprocess.Popen(
                [*LABMETER, "agent", "run", "--config", "agent.toml"],
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ},
            )

            def dead() -> int:
                path = tmp_path / "state" / "agent.db"
                if not path.exists():
                    return 0  # the agent has not started yet
                db = sqlite3.connect(path)
                try:
                    return int(db.execute("SELECT count(*) FROM dead").fetchone()[0])
                except sqlite3.OperationalError:  # nor created its tables
                    return 0
                finally:
                    db.close()

            # the first reading (RUNNING) closes the start-up's UNKNOWN: rejected, so the agent is reading
            wait_for(lambda: dead() >= 1, 60, what="the agent's first interval rejected")
            meter.data_bank.set_input_registers(0x000C, words(0.5))  # RUNNING → OFF closes an interval
            wait_for(lambda: dead() >= 2, what="rejected intervals kept as dead letters")
            status = cli(tmp_path, "agent", "status", "--config", "agent.toml")
            assert "unknown agent 'bench-01'" in status.stdout, status.stdout
            assert "labmeter agent resend" in status.stdout

            added = cli(tmp_path, *add_cmd.split()[1:], "--config", "collector.toml")
            assert added.returncode == 0, added.stderr
            assert "registered for CZ-NMR-009" in added.stdout
            # the collector re-reads its registry when it meets a newcomer, at most every RELOAD_EVERY_S
            time.sleep(RELOAD_EVERY_S + 0.2)
            n_dead = dead()
            resent = cli(tmp_path, "agent", "resend", "--config", "agent.toml")
            assert resent.stdout.startswith(f"{n_dead} message(s) queued again")

            assert ct.collector is not None
            ledger = ct.collector.ledger

            def stored_states() -> list[str]:
                return [
                    r[0]
                    for r in sqlite3.connect(ledger.path).execute(
                        "SELECT state FROM intervals WHERE agent='bench-01' ORDER BY seq"
                    )
                ]

            wait_for(lambda: stored_states()[:2] == ["UNKNOWN", "RUNNING"], what="resent intervals stored")
            st = json.loads(cli(tmp_path, "agent", "status", "--config", "agent.toml", "--json").stdout)
            assert st["dead"] == []
            wait_for(
                lambda: (
                    ct.collector is not None and ct.collector.live.agents.get("bench-01", {}).get("online")
                ),
                what="heartbeat seen",
            )
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            wait_for(
                lambda: (
                    ct.collector is not None
                    and ct.collector.live.agents.get("bench-01", {}).get("online") is False
                ),
                what="LWT offline seen after SIGKILL",
            )
        finally:
            if agent and agent.poll() is None:
                agent.kill()
            meter.stop()
