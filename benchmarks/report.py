"""The annual report at province scale: `labmeter report hours` over a year of 5,000 instruments.

Builds (or reuses) the synthetic ledger of :mod:`benchmarks.province`, then runs the
real command as a user would, in a fresh process each time, and reads its wall time
and peak RSS from the kernel (wait4). Targets: under 10 s and under 1 GB, from a cold page cache.

Each command runs once "cold" (the ledger's pages dropped from the page cache first, with
posix_fadvise DONTNEED: as after a reboot, without root) and then --runs times "warm". The
CSV's bytes are checked against the previous run's, so a run that printed nothing cannot pass.

    .venv/bin/python -m benchmarks.report --db /tmp/province.sqlite [--instruments 5000 --days 365] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from benchmarks.common import Verdicts

TZ = ZoneInfo("Asia/Shanghai")


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode() if proc.stderr else status}")
    return wall, usage.ru_maxrss / 1024


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (and its WAL's), so the next read comes from disk."""
    for f in (path, path.with_name(path.name + "-wal")):
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, required=True, help="ledger to use; built first if missing")
    p.add_argument("--instruments", type=int, default=5000)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if not args.db.exists():
        # in its own process: a child's peak RSS (wait4) starts from its parent's at fork, and building
        # holds a 1 GB page cache
        print(f"building {args.instruments} instruments x {args.days} days in {args.db} ...", flush=True)
        subprocess.run(
            [
                *(sys.executable, "-m", "benchmarks.province"),
                *("--instruments", str(args.instruments), "--days", str(args.days), "--db", str(args.db)),
            ],
            check=True,
        )
    import sqlite3

    db = sqlite3.connect(args.db)
    first, last, n, instruments = db.execute(
        "SELECT MIN(start_ms), MAX(end_ms), COUNT(*), COUNT(DISTINCT instrument) FROM intervals"
    ).fetchone()
    db.close()
    start = datetime.fromtimestamp(first / 1000, TZ).date()
    end = datetime.fromtimestamp((last - 1) / 1000, TZ).date()
    if (end - start).days > 364:
        start = end - timedelta(days=364)
    print(
        f"ledger: {instruments} instruments, {n:,} intervals, {args.db.stat().st_size / 1e9:.1f} GB; report {start} .. {end}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "collector.toml"
        cfg.write_text(f'[collector]\ndata_dir = "{tmp}"\nledger = "sqlite:///{args.db}"\n')
        base = [sys.executable, "-m", "labmeter", "report", "hours", "--config", str(cfg)]
        base += ["--from", str(start), "--to", str(end)]
        cases = {
            "by instrument, CSV": [*base, "--format", "csv", "-o", f"{tmp}/r.csv"],
            "XLSX, all four groupings": [*base, "--format", "xlsx", "-o", f"{tmp}/r.xlsx"],
        }
        verdicts = Verdicts()
        for name, cmd in cases.items():
            drop_cache(args.db)
            cold, cold_rss = run(cmd)
            results = [run(cmd) for _ in range(args.runs)]
            walls = [w for w, _ in results]
            rss = max([cold_rss, *(r for _, r in results)])
            print(
                f"{name}: cold {cold:.2f} s; warm median {statistics.median(walls):.2f} s "
                f"(runs {', '.join(f'{w:.2f}' for w in walls)}); peak RSS {rss:.0f} MB"
            )
            verdicts.check(f"{name}, cold", round(cold, 2), "< 10 s", cold < 10, " s")
            verdicts.check(f"{name}, peak RSS", round(rss), "< 1 GB", rss < 1024, " MB")
        lines = Path(f"{tmp}/r.csv").read_text(encoding="utf-8").splitlines()
        verdicts.check(
            "CSV rows (instruments + header + total)",
            len(lines),
            f"= {instruments + 2}",
            len(lines) == instruments + 2,
        )
    verdicts.exit()


if __name__ == "__main__":
    main()
