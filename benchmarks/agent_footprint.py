"""Agent footprint: one agent polling 8 simulated Modbus meters at 1 Hz; peak RSS and average CPU.

The meters (one simulator process), Mosquitto and the collector run as separate
processes; only the agent process is measured.

    .venv/bin/python -m benchmarks.agent_footprint [--seconds 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import free_port, start_mosquitto, wait_port

N_INSTRUMENTS = 8
LABMETER = [sys.executable, "-m", "labmeter"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        broker = start_mosquitto(tmp, port)
        meter_ports = [free_port() for _ in range(N_INSTRUMENTS)]
        sim = "".join(
            f'[[meter]]\nlisten = "127.0.0.1:{p}"\nschedule = [[0, "STANDBY"], [60, "RUNNING"], [180, "OFF"]]\n'
            for p in meter_ports
        )
        (tmp / "sim.toml").write_text(sim)
        agent = '[agent]\nid = "footprint"\nkey_file = "agent.key"\nstate_dir = "state"\n'
        agent += f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n'
        for i, p in enumerate(meter_ports):
            agent += (
                f'[[instrument]]\nid = "I{i}"\npoll_s = 1\n[instrument.source]\ndriver = "modbus"\n'
                f'url = "tcp://127.0.0.1:{p}"\nprofile = "eastron-sdm120"\n'
                "[instrument.states]\noff_below_w = 5\nrun_above_w = 600\n"
            )
        (tmp / "agent.toml").write_text(agent)
        (tmp / "collector.toml").write_text(
            f'[collector]\ndata_dir = "data"\n[broker]\nurl = "mqtt://127.0.0.1:{port}"\n'
        )
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
        for p in procs:
            p.terminate()
            p.wait(20)
        broker.terminate()
        broker.wait()
    print(f"agent with {N_INSTRUMENTS} Modbus instruments at 1 Hz for {args.seconds:.0f} s")
    print(f"RSS after start-up: {rss0 / 2**20:6.1f} MB")
    print(f"peak RSS:    {peak / 2**20:6.1f} MB   (target <= 40 MB)")
    print(f"average CPU: {100 * cpu:6.2f} % of one core   (target <= 1 %)")


if __name__ == "__main__":
    main()
