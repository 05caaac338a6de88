"""Agent footprint: one agent polling 8 simulated Modbus meters at 1 Hz; peak RSS and average CPU.

The meters (one simulator process), Mosquitto and the collector run as separate
processes; only the agent process is measured.

    .venv/bin/python -m benchmarks.agent_footprint [--seconds 300] [--tls]

With --tls the broker listens with TLS only (a private CA's certificate, checked by the agent and the
collector), as in production (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import Verdicts, free_port, start_mosquitto, wait_port

N_INSTRUMENTS = 8
LABMETER = [sys.executable, "-m", "labmeter"]


def count_stored(ledger: Path) -> int:
    """Intervals in the collector's ledger: the agent really talked to it (over TLS, with --tls)."""
    import sqlite3

    if not ledger.exists():
        return 0
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM intervals").fetchone()[0])
    finally:
        db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--tls", action="store_true", help="MQTT over TLS, as deployed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        broker = start_mosquitto(tmp, port, tls=args.tls)
        url = f"mqtts://127.0.0.1:{port}" if args.tls else f"mqtt://127.0.0.1:{port}"
        ca = f'ca_file = "{tmp / "ca.pem"}"\n' if args.tls else ""
        meter_ports = [free_port() for _ in range(N_INSTRUMENTS)]
        sim = "".join(
            f'[[meter]]\nlisten = "127.0.0.1:{p}"\nschedule = [[0, "STANDBY"], [60, "RUNNING"], [180, "OFF"]]\n'
            for p in meter_ports
        )
        (tmp / "sim.toml").write_text(sim)
        agent = '[agent]\nid = "footprint"\nkey_file = "agent.key"\nstate_dir = "state"\n'
        agent += f'[broker]\nurl = "{url}"\n{ca}'
        for i, p in enumerate(meter_ports):
            agent += (
                f'[[instrument]]\nid = "I{i}"\npoll_s = 1\n[instrument.source]\ndriver = "modbus"\n'
                f'url = "tcp://127.0.0.1:{p}"\nprofile = "eastron-sdm120"\n'
                "[instrument.states]\noff_below_w = 5\nrun_above_w = 600\n"
            )
        (tmp / "agent.toml").write_text(agent)
        (tmp / "collector.toml").write_text(f'[collector]\ndata_dir = "data"\n[broker]\nurl = "{url}"\n{ca}')
        out = subprocess.run(
            [*LABMETER, "agent", "enroll", "-c", "agent.toml"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        add = next(x.strip() for x in out.splitlines() if x.strip().startswith("labmeter collector"))
        subprocess.run(
            [*LABMETER, *add.split()[1:], "-c", "collector.toml"], cwd=tmp, check=True, capture_output=True
        )
        procs = [
            subprocess.Popen([*LABMETER, "sim", "sim.toml"], cwd=tmp, stderr=subprocess.DEVNULL),
            subprocess.Popen(
                [*LABMETER, "collector", "run", "-c", "collector.toml"], cwd=tmp, stderr=subprocess.DEVNULL
            ),
        ]
        for p in meter_ports:
            wait_port(p)
        agent_proc = subprocess.Popen(
            [*LABMETER, "agent", "run", "-c", "agent.toml"], cwd=tmp, stderr=subprocess.DEVNULL
        )
        ps = psutil.Process(agent_proc.pid)
        time.sleep(5)  # start-up (imports, connections) is not the steady state
        cpu0 = ps.cpu_times()
        rss0 = ps.memory_info().rss
        t0 = time.monotonic()
        peak = 0
        while time.monotonic() - t0 < args.seconds:
            peak = max(peak, ps.memory_info().rss)
            time.sleep(1)
        cpu1 = ps.cpu_times()
        elapsed = time.monotonic() - t0
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
        agent_proc.terminate()
        agent_proc.wait(20)
        stored = count_stored(tmp / "data" / "ledger.sqlite")
        for p in procs:
            p.terminate()
            p.wait(20)
        broker.terminate()
        broker.wait()
    print(
        f"agent with {N_INSTRUMENTS} Modbus instruments at 1 Hz for {args.seconds:.0f} s, "
        f"MQTT {'over TLS' if args.tls else 'without TLS'}; {stored} interval(s) stored by the collector"
    )
    print(f"RSS after start-up: {rss0 / 2**20:6.1f} MB")
    verdicts = Verdicts()
    verdicts.check("peak RSS", round(peak / 2**20, 1), "<= 40 MB", peak <= 40 * 2**20, " MB")
    verdicts.check("average CPU", round(100 * cpu, 2), "<= 1 % of one core", cpu <= 0.01, " %")
    verdicts.check("the agent's intervals reached the ledger", stored, "> 0", stored > 0)
    verdicts.exit()


if __name__ == "__main__":
    main()
