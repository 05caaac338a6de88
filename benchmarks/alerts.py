"""How long one alert check holds the collector's event loop at province scale.

A ledger of ``--agents`` agents with ``--per-agent`` instruments each (names and units in Chinese), live
state for every instrument, a tenth of the agents silent and a twentieth of the instruments UNKNOWN:
the first check fires all of those (one transaction, grouped messages), the next ones find nothing new
(the steady state, every ``check_every_s``), and one where they all recover. Times are of
``Alerter.evaluate`` alone, which runs on the event loop; delivery runs on its own tasks.

Targets (docs/performance.md): the steady check, which runs every 30 s for as long as the collector
does, holds the loop under 50 ms at 5,000 instruments (a pause nobody on the live page notices, and
under 0.2 % of the loop's time); the first check and the recovery check, once per mass outage, under
1 s (well inside the 5 s after which the built-in broker, on the same loop, drops a delivery still
waiting for its PUBACK). The first check must fire one alert per silent agent and per UNKNOWN
instrument, so a run that judged nothing cannot pass on speed.

    .venv/bin/python -m benchmarks.alerts --agents 1000 --per-agent 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import Verdicts
from labmeter import config
from labmeter.collector.alerts import Alerter
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import LiveState

MIN = 60_000
T0 = 1_780_000_000_000


class Clock:
    now = T0

    def wall_ms(self) -> int:
        return self.now


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--per-agent", type=int, default=5)
    ap.add_argument("--steady-runs", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger.open("sqlite", Path(d))
        rows = []
        for a in range(args.agents):
            codes = [f"CZ-{a:04d}-{i}" for i in range(args.per_agent)]
            ledger.add_agent(f"pc-{a:04d}", "ed25519:AAAA", "kid", codes)
            rows += [
                {
                    "code": c,
                    "name": "电感耦合等离子体质谱仪",
                    "unit": f"化学学院{a % 60}",
                    "department": "",
                    "category": "",
                    "kind": "general",
                    "share_mode": "",
                }
                for c in codes
            ]
        ledger.upsert_instruments(rows)
        live = LiveState()
        clock = Clock()
        for a in range(args.agents):
            if a % 10:
                live.agents[f"pc-{a:04d}"] = {"verified": True, "online": True, "received": T0}
            for i in range(args.per_agent):
                code = f"CZ-{a:04d}-{i}"
                state = "UNKNOWN" if (a * args.per_agent + i) % 20 == 0 else "RUNNING"
                live.instruments[code] = {
                    "instrument": code,
                    "state": state,
                    "start": T0,
                    "agent": f"pc-{a:04d}",
                }
        cfg = config.AlertsConfig(
            webhook=[config.WebhookChannel(url="http://127.0.0.1:9/hook")], no_intervals_min=0
        )
        al = Alerter(cfg, ledger, live, config.PolicyConfig(), clock, lambda: 0)

        def timed(now: int) -> tuple[float, int]:
            clock.now = now
            for a in live.agents.values():
                a["received"] = now  # the online agents keep reporting
            t = time.perf_counter()
            queued = al.evaluate(now)
            return time.perf_counter() - t, queued

        first, fired = timed(T0 + 30 * MIN)
        alerts_fired = al.counts["fired"]
        steady = [timed(T0 + (31 + k) * MIN)[0] for k in range(args.steady_runs)]
        for a in range(args.agents):
            live.agents[f"pc-{a:04d}"] = {"verified": True, "online": True, "received": 0}
        for v in live.instruments.values():
            v["state"] = "RUNNING"
        recover, resolved = timed(T0 + 60 * MIN)
        n = args.agents * args.per_agent
        print(f"{args.agents} agents, {n} instruments; {alerts_fired} alerts fired by the first check")
        print(f"first check (fires, {fired} message(s) queued): {first * 1000:.1f} ms")
        print(f"steady check, median of {len(steady)}: {statistics.median(steady) * 1000:.1f} ms")
        print(f"recovery check ({resolved} message(s) queued): {recover * 1000:.1f} ms")
        expected = len(range(0, args.agents, 10)) + len(range(0, n, 20))
        verdicts = Verdicts()
        verdicts.check(
            "alerts fired by the first check", alerts_fired, f"= {expected}", alerts_fired == expected
        )
        for what, seconds, target in (
            (f"steady check, median of {len(steady)}", statistics.median(steady), 0.05),
            ("first check", first, 1.0),
            ("recovery check", recover, 1.0),
        ):
            verdicts.check(what, round(seconds * 1000, 1), f"< {target * 1000:g} ms", seconds < target, " ms")
        ledger.close()
    verdicts.exit()


if __name__ == "__main__":
    main()
