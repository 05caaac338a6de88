"""The time-series sink over a synthetic ledger, writing to VictoriaMetrics (default flags): how long the
collector's event loop is held (the longest stretch between two of its turns, what ingest would wait), and
the time and points of the first catch-up, an idle round and a full comparison.

The baseline, in the same run, is reading the same hourly rollups with one query per instrument (what the
comparison cannot avoid); the sink's cost is given as a ratio of it.

Targets (docs/performance.md): in every round, the one-time catch-up included, the sink holds the loop
under 100 ms: it is an optional export, and ingest, acknowledgements and the live API should not wait
on it for longer than a pause nobody notices. The catch-up must write points, and the idle round and
the full comparison after it none (the catch-up left nothing to correct).

    .venv/bin/python -m benchmarks.sink [--instruments 200 --days 60] [--db /tmp/sink-bench.sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import Verdicts
from benchmarks.province import POLICY, build
from labmeter.collector.ledger import SINK_VALUES, Ledger
from labmeter.collector.ledger.rollup import HOUR
from labmeter.collector.sink_influx import InfluxSink
from labmeter.config import InfluxConfig
from labmeter.netutil import free_port

HOLD_TARGET_S = 0.1


async def timed(sink: InfluxSink, *, full: bool) -> tuple[float, float, int]:
    """Seconds of one flush, the longest hold of the event loop in it (seconds), and the points written."""
    if full:
        sink._reconciled = -1e18
    longest, last, done = 0.0, time.perf_counter(), False

    async def ticker() -> None:
        nonlocal longest, last
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    tick = asyncio.create_task(ticker())
    t = time.perf_counter()
    sent = await sink.flush()
    wall = time.perf_counter() - t
    done = True
    await tick
    return wall, longest, sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instruments", type=int, default=200)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--db", type=Path, default=None, help="ledger to use; built first if missing")
    args = p.parse_args()
    verdicts = Verdicts()
    vm = shutil.which("victoria-metrics")
    if vm is None:
        raise SystemExit("victoria-metrics is not installed (apt-get install victoria-metrics)")
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "ledger.sqlite"
        if not db.exists():
            print(f"building {args.instruments} instruments x {args.days} days ...", flush=True)
            build(db, args.instruments, args.days, int(time.time() * 1000))
        port = free_port()
        proc = subprocess.Popen(
            [vm, f"-storageDataPath={tmp}/vm", f"-httpListenAddr=127.0.0.1:{port}", "-retentionPeriod=100y"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.5)
            ledger = Ledger(db)
            codes = sorted(ledger.rollup_basis())
            t = time.perf_counter()
            rows = sum(len(ledger.rollup_rows(c, HOUR, 0, 2**62, SINK_VALUES)) for c in codes)
            base = time.perf_counter() - t
            print(f"ledger: {len(codes)} instruments, {rows:,} hourly rollups; baseline read {base:.2f} s")

            async def run() -> None:
                sink = InfluxSink(InfluxConfig(url=f"http://127.0.0.1:{port}"), ledger, POLICY)
                for name, full in (
                    ("first catch-up", True),
                    ("idle round", False),
                    ("full comparison", True),
                ):
                    if name != "first catch-up":
                        sink._agents_at = time.monotonic()  # not the minute's refresh of the live points
                    wall, hold, sent = await timed(sink, full=full)
                    print(
                        f"{name}: {wall:.2f} s ({wall / base:.1f}x baseline), {sent:,} points, "
                        f"longest hold of the event loop {hold * 1000:.0f} ms"
                    )
                    verdicts.check(
                        f"{name}, longest hold of the loop",
                        round(hold * 1000),
                        f"< {HOLD_TARGET_S * 1000:g} ms",
                        hold < HOLD_TARGET_S,
                        " ms",
                    )
                    if name == "first catch-up":
                        verdicts.check(f"{name}, points written", sent, "> 0", sent > 0)
                    else:
                        verdicts.check(f"{name}, points written", sent, "= 0", sent == 0)
                await sink.close()

            asyncio.run(run())
            ledger.close()
        finally:
            proc.terminate()
            proc.wait(20)
    verdicts.exit()


if __name__ == "__main__":
    main()
