"""Hours from rollups against hours computed directly from the intervals, on the same ledger in the same
run: the synthetic ledger of :mod:`benchmarks.province` (50 instruments by default), ten months whose
edges fall inside hours (so the rollup path also reads the raw intervals at both edges). The two results
must be identical; the rollups must be at least ten times faster.

    .venv/bin/python -m benchmarks.rollups [--instruments 50 --days 310] [--db /tmp/rollups.sqlite] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import Verdicts
from benchmarks.province import DAY, POLICY, H, build
from labmeter.collector.ledger import Ledger
from labmeter.collector.ledger.rollup import Rollups, direct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instruments", type=int, default=50)
    p.add_argument("--days", type=int, default=310)
    p.add_argument("--db", type=Path, help="ledger to use (built first if missing); default: a temporary one")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "rollups.sqlite"
        if not db.exists():
            print(f"building {args.instruments} instruments x {args.days} days in {db} ...", flush=True)
            print(build(db, args.instruments, args.days, int(time.time() * 1000)), flush=True)
        ledger = Ledger(db)
        try:
            first, last, n = ledger.db.execute(
                "SELECT MIN(start_ms), MAX(end_ms), COUNT(*) FROM intervals"
            ).fetchone()
            a = first + 5 * DAY + 7 * H + 30 * 60_000  # edges inside hours
            b = min(last - DAY, a + 300 * DAY) - 3 * H - 20 * 60_000
            registry = {str(i["code"]): i for i in ledger.instruments()}
            print(f"ledger: {len(registry)} instruments, {n:,} intervals; period {(b - a) / DAY:.1f} days")
            rollups = Rollups(ledger, POLICY, registry)
            rollups.refresh()
            times: dict[str, list[float]] = {"direct": [], "rollups": []}
            results = {}
            for _ in range(args.runs):
                for name, fn in (
                    ("direct", lambda: direct(ledger, a, b, POLICY, registry)),
                    ("rollups", lambda: rollups.hours(a, b)),
                ):
                    t = time.perf_counter()
                    results[name] = fn()
                    times[name].append(time.perf_counter() - t)
        finally:
            ledger.close()
    d, r = min(times["direct"]), min(times["rollups"])
    print(f"direct from intervals: {d:.3f} s (runs {', '.join(f'{x:.3f}' for x in times['direct'])})")
    print(
        f"from rollups:          {r * 1000:.1f} ms (runs {', '.join(f'{x * 1000:.1f}' for x in times['rollups'])})"
    )
    same = results["direct"] == results["rollups"]
    verdicts = Verdicts()
    verdicts.check(
        "rollups equal the direct computation", int(same), "1 (identical for every instrument)", same
    )
    verdicts.check("direct / rollups time", round(d / r, 1), ">= 10", d / r >= 10, "x")
    verdicts.exit()


if __name__ == "__main__":
    main()
