"""A month's reconciliation at facility scale: `labmeter report reconcile` beside `report hours` on one ledger.

Builds (or reuses) the synthetic ledger of :mod:`benchmarks.province` (about 40 intervals per instrument
per day, two bookings a week per instrument), then runs both commands for the last 31 days as a user would,
each in a fresh process, and reads wall time and peak RSS from the kernel (wait4). The hours report reads
rollups; the reconciliation reads every interval of the period (it needs where time lies), so its time is
reported as a ratio to the hours report's in the same run. Targets: under 30 s and 1 GB for a month of 500
instruments. The JSON's summary must hold a row per instrument, so a run that printed nothing cannot pass.

    .venv/bin/python -m benchmarks.reconcile --db /tmp/reconcile-500x31.sqlite [--instruments 500 --days 31]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from benchmarks.common import Verdicts
from benchmarks.report import TZ, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, required=True, help="ledger to use; built first if missing")
    p.add_argument("--instruments", type=int, default=500)
    p.add_argument("--days", type=int, default=31)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if not args.db.exists():  # in its own process, so its memory is not counted in ours (wait4 after fork)
        print(f"building {args.instruments} instruments x {args.days} days in {args.db} ...", flush=True)
        subprocess.run(
            [
                *(sys.executable, "-m", "benchmarks.province"),
                *("--instruments", str(args.instruments), "--days", str(args.days), "--db", str(args.db)),
            ],
            check=True,
        )
    db = sqlite3.connect(args.db)
    last, n, instruments = db.execute(
        "SELECT MAX(end_ms), COUNT(*), COUNT(DISTINCT instrument) FROM intervals"
    ).fetchone()
    bookings = db.execute("SELECT COUNT(*) FROM service_records").fetchone()[0]
    db.close()
    end = datetime.fromtimestamp((last - 1) / 1000, TZ).date()
    start = end - timedelta(days=30)
    print(
        f"ledger: {instruments} instruments, {n:,} intervals, {bookings:,} bookings; period {start} .. {end}"
    )
    verdicts = Verdicts()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "collector.toml"
        cfg.write_text(f'[collector]\ndata_dir = "{tmp}"\nledger = "sqlite:///{args.db}"\n')
        base = ["--config", str(cfg), "--from", str(start), "--to", str(end)]
        cmds = {
            "report hours, CSV": [
                *(sys.executable, "-m", "labmeter", "report", "hours"),
                *base,
                "--format",
                "csv",
            ],
            "report reconcile, JSON": [
                *(sys.executable, "-m", "labmeter", "report", "reconcile"),
                *base,
                *("--format", "json", "-o", f"{tmp}/r.json"),
            ],
            "report reconcile, XLSX": [
                *(sys.executable, "-m", "labmeter", "report", "reconcile"),
                *base,
                *("--format", "xlsx", "-o", f"{tmp}/r.xlsx"),
            ],
        }
        medians: dict[str, float] = {}
        for name, cmd in cmds.items():
            results = [run(cmd) for _ in range(args.runs)]
            walls = [w for w, _ in results]
            rss = max(r for _, r in results)
            medians[name] = statistics.median(walls)
            print(
                f"{name}: median {medians[name]:.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}); "
                f"peak RSS {rss:.0f} MB",
                flush=True,
            )
            if name != "report hours, CSV":
                verdicts.check(f"{name}, median", round(medians[name], 2), "< 30 s", medians[name] < 30, " s")
                verdicts.check(f"{name}, peak RSS", round(rss), "< 1 GB", rss < 1024, " MB")
        ratio = medians["report reconcile, JSON"] / medians["report hours, CSV"]
        print(f"reconcile JSON / hours CSV: {ratio:.1f}x")
        doc = json.loads(Path(f"{tmp}/r.json").read_text(encoding="utf-8"))
        verdicts.check(
            "summary rows", len(doc["summary"]), f"= {instruments}", len(doc["summary"]) == instruments
        )
        print(f"records {len(doc['records']):,}, findings {len(doc['findings']):,}")
    verdicts.exit()


if __name__ == "__main__":
    main()
