"""A synthetic province-scale ledger: N instruments x D days, about 40 intervals per instrument per day.

Intervals form proper chains (seq, prev, sha), so they count as verified; envelopes are
16-byte placeholders instead of ~350-byte signed ones (reports never read them), which
keeps the file to about a third of a real one. Bookings: two a week per instrument,
a third of them external. Rollups are then built by the collector's own code
(:meth:`Rollups.refresh`), exactly as after an upgrade of an existing ledger.

    .venv/bin/python -m benchmarks.province --instruments 5000 --days 365 --db /tmp/province.sqlite
"""

from __future__ import annotations

import argparse
import itertools
import random
import sqlite3
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from labmeter.collector.ledger import Ledger
from labmeter.collector.ledger.rollup import Calendar, Rollups
from labmeter.config import PolicyConfig
from labmeter.signing import PrivateKey, key_id, public_key_text

M = 60_000
H = 60 * M
DAY = 24 * H
UNITS = 60
CATEGORIES = ["03040100", "03040200", "03050100", "02030400", "02010300", "03150100", "04010100", "05020000"]
POLICY = PolicyConfig()


def day_templates(rng: random.Random, n: int = 64, changes: int = 16) -> list[list[tuple[int, int, str]]]:
    """Days as an agent reports them: off at night, standby and runs by day, cut at every state change
    and every hour boundary (``changes`` changes + 24 hour cuts: about 40 intervals a day)."""
    out = []
    for _ in range(n):
        cuts = sorted(set(rng.sample(range(7 * 60, 22 * 60), changes)) | {h * 60 for h in range(1, 24)})
        bounds = [0, *cuts, 24 * 60]
        day = []
        state = "OFF"
        for a, b in itertools.pairwise(bounds):
            if a in (7 * 60, 22 * 60) or (a % 60 and 7 * 60 < a < 22 * 60):
                state = rng.choice(["RUNNING", "RUNNING", "STANDBY", "STANDBY", "OFF", "UNKNOWN"])
            if a >= 22 * 60 or a < 7 * 60:
                state = "OFF"
            day.append((a * M, b * M, state))
        out.append(day)
    return out


def build(path: Path, instruments: int, days: int, end_ms: int, seed: int = 1) -> dict[str, float]:
    """Write the ledger at ``path`` (days ending at ``end_ms``); returns the seconds each stage took."""
    rng = random.Random(seed)
    cal = Calendar(ZoneInfo(POLICY.timezone))
    first_day = cal.day_floor(end_ms) - (days - 1) * DAY
    Ledger(path).close()  # the schema
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    templates = day_templates(rng)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO instruments (code, name, unit, category, kind, value_wan) VALUES (?,?,?,?,?,?)",
        [
            (
                f"I{i:05d}",
                f"Instrument {i}",
                f"Unit {i % UNITS:02d}",
                CATEGORIES[i % len(CATEGORIES)],
                "special" if i % 7 == 0 else "general",
                round(rng.uniform(10, 2000), 1),
            )
            for i in range(instruments)
        ],
    )
    pub = PrivateKey.generate().public_key()  # one key for all agents: these intervals are never verified
    db.executemany(
        "INSERT INTO agents VALUES (?,?,?,?)",
        [(f"agent-{a:04d}", public_key_text(pub), key_id(pub), 0) for a in range((instruments + 7) // 8)],
    )
    db.executemany(
        "INSERT INTO enrolments VALUES (?,?)",
        [(f"agent-{i // 8:04d}", f"I{i:05d}") for i in range(instruments)],
    )
    env = b"\0" * 16
    built = int(time.time() * 1000)
    for i in range(instruments):
        code, agent = f"I{i:05d}", f"agent-{i // 8:04d}"
        rows = []
        prev, seq = "0" * 64, 0
        for d in range(days):
            day0 = first_day + d * DAY
            for a, b, state in templates[rng.randrange(len(templates))]:
                seq += 1
                sha = f"{i:08x}{seq:056x}"
                # stored about a second after it ended, as from a live agent (a sink reads in that order)
                received = min(built, day0 + b + 1_000 + i % 1_000)
                rows.append(
                    (agent, code, seq, day0 + a, day0 + b, state, prev, sha, 0, None, env, received, None)
                )
                prev = sha
        db.executemany("INSERT INTO intervals VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        bookings = []
        for week in range(days // 7):
            for _ in range(2):
                start = first_day + week * 7 * DAY + rng.randrange(7) * DAY + rng.randrange(8, 18) * H
                bookings.append(
                    (
                        code,
                        start,
                        start + rng.randrange(1, 6) * H,
                        f"user{rng.randrange(999)}",
                        "",
                        rng.choice([120, 120, 130]),
                    )
                )
        db.executemany(
            "INSERT OR IGNORE INTO service_records (instrument, start_ms, end_ms, applicant, applicant_unit, service_type) "
            "VALUES (?,?,?,?,?,?)",
            bookings,
        )
        if i % 50 == 49:
            db.execute("COMMIT")
            db.execute("BEGIN")
    db.execute("COMMIT")
    db.close()
    timings["intervals_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ledger = Ledger(path)
    Rollups(ledger, POLICY).refresh()
    ledger.close()
    timings["rollups_s"] = time.perf_counter() - t
    return timings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instruments", type=int, default=5000)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--db", type=Path, required=True)
    args = p.parse_args()
    if args.db.exists():
        raise SystemExit(f"{args.db} exists; remove it first")
    timings = build(args.db, args.instruments, args.days, int(time.time() * 1000))
    print(timings, f"{args.db.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
