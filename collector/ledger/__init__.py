"""The ledger: agents and their keys, instruments, enrolments, intervals, rejections.

Everything the collector knows can be rebuilt from here; several collectors can
share one ledger. Storing is idempotent: the same body twice is one row; a
different body for the same (agent, instrument, seq) is a conflict that is kept
beside the original, never over it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from labmeter import statefile
from labmeter.energy import to_mwh
from labmeter.netutil import redact_text, redact_url
from labmeter.wire import (
    GENESIS,
    MAX_INTERVAL_MS,
    Interval,
    WireError,
    body_hash,
    conflict_reason,
    envelope_starts_chain,
    load_body,
    open_envelope,
    parse_interval,
    raw_body,
    signin_chain,
    starts_chain,
)

MAX_ALERTS = 20_000  # active alerts read back at start (each is an agent, an instrument or the collector)
SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, pubkey TEXT NOT NULL, kid TEXT NOT NULL, added_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS instruments (
    code TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', unit TEXT NOT NULL DEFAULT '',
    department TEXT NOT NULL DEFAULT '', category TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT 'general',
    value_wan REAL, rated_hours REAL, share_mode TEXT NOT NULL DEFAULT '',
    prep_allowance_s INTEGER, post_allowance_s INTEGER, metering_start_ms INTEGER);
CREATE TABLE IF NOT EXISTS service_records (
    id INTEGER PRIMARY KEY, instrument TEXT NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
    applicant TEXT NOT NULL DEFAULT '', applicant_unit TEXT NOT NULL DEFAULT '',
    service_type INTEGER NOT NULL, direction INTEGER NOT NULL DEFAULT 138, amount REAL, source TEXT NOT NULL DEFAULT '',
    UNIQUE (instrument, start_ms, end_ms, applicant));
CREATE TABLE IF NOT EXISTS service_batches (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, imported_ms INTEGER NOT NULL, records INTEGER NOT NULL,
    replaced INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS service_time ON service_records (instrument, start_ms);
CREATE INDEX IF NOT EXISTS service_end ON service_records (end_ms);
CREATE TABLE IF NOT EXISTS enrolments (
    agent TEXT NOT NULL, instrument TEXT NOT NULL, PRIMARY KEY (agent, instrument));
CREATE TABLE IF NOT EXISTS intervals (
    agent TEXT NOT NULL, instrument TEXT NOT NULL, seq INTEGER NOT NULL,
    start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL, state TEXT NOT NULL,
    prev TEXT NOT NULL, sha TEXT NOT NULL, clock_step_ms INTEGER NOT NULL DEFAULT 0, note TEXT,
    envelope BLOB NOT NULL, received_ms INTEGER NOT NULL, energy_mwh INTEGER,
    PRIMARY KEY (agent, instrument, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS intervals_time ON intervals (instrument, start_ms);
CREATE INDEX IF NOT EXISTS intervals_received ON intervals (received_ms);
CREATE TABLE IF NOT EXISTS sink_cursor (name TEXT PRIMARY KEY, received_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS signins (
    agent TEXT NOT NULL, instrument TEXT NOT NULL, seq INTEGER NOT NULL, at_ms INTEGER NOT NULL, "user" TEXT NOT NULL,
    sha TEXT NOT NULL, envelope BLOB NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, instrument, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, agent TEXT, instrument TEXT, seq INTEGER,
    authentic INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    chain TEXT, sha TEXT);
CREATE INDEX IF NOT EXISTS rejections_seq ON rejections (agent, instrument, seq);
CREATE TABLE IF NOT EXISTS rejection_counts (
    window_ms INTEGER NOT NULL, reason TEXT NOT NULL, topic TEXT NOT NULL, n INTEGER NOT NULL,
    first_ms INTEGER NOT NULL, last_ms INTEGER NOT NULL, PRIMARY KEY (window_ms, reason, topic)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollups (
    instrument TEXT NOT NULL, span INTEGER NOT NULL, start_ms INTEGER NOT NULL,
    run_ms INTEGER NOT NULL, standby_ms INTEGER NOT NULL, off_ms INTEGER NOT NULL, unknown_ms INTEGER NOT NULL,
    unverified_ms INTEGER NOT NULL, effective_ms INTEGER NOT NULL, covered_ms INTEGER NOT NULL,
    service_ms INTEGER NOT NULL, external_ms INTEGER NOT NULL,
    energy_mwh INTEGER NOT NULL DEFAULT 0, energy_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instrument, span, start_ms)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_dirty (
    id INTEGER PRIMARY KEY, instrument TEXT NOT NULL, from_ms INTEGER NOT NULL, to_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollup_basis (instrument TEXT PRIMARY KEY, basis TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS holes (
    agent TEXT NOT NULL, chain TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL, statement BLOB NOT NULL, PRIMARY KEY (agent, chain, first_seq)) WITHOUT ROWID;
"""
ROLLUP_VALUES = (
    "run_ms",
    "standby_ms",
    "off_ms",
    "unknown_ms",
    "unverified_ms",
    "effective_ms",
    "covered_ms",
    "service_ms",
    "external_ms",
    "energy_mwh",
    "energy_ms",
)
"""``energy_mwh``: the energy of the intervals in a bucket (labmeter.energy.share); ``energy_ms``: how much
of the bucket those intervals cover (0: no energy source)."""
SUMS = ", ".join(f"CAST(SUM({c}) AS INTEGER)" for c in ROLLUP_VALUES)


INSTRUMENT_COLUMNS = (
    "code",
    "name",
    "unit",
    "department",
    "category",
    "kind",
    "value_wan",
    "rated_hours",
    "share_mode",
    "prep_allowance_s",
    "post_allowance_s",
    "metering_start_ms",
)
SERVICE_COLUMNS = (
    "instrument",
    "start_ms",
    "end_ms",
    "applicant",
    "applicant_unit",
    "service_type",
    "direction",
    "amount",
    "source",
    "service_way",
    "content",
)


class SignInRow(NamedTuple):
    instrument: str
    agent: str
    at_ms: int
    user: str


class BookingRow(NamedTuple):
    """A service record as the reconciliation reads it."""

    id: int
    instrument: str
    start_ms: int
    end_ms: int
    applicant: str
    applicant_unit: str
    service_type: int


@dataclass(frozen=True)
class BatchResult:
    batch: int | None
    added: int
    duplicates: int
    differ: int
    """Of the duplicates, how many differ from the stored record in unit, type, direction or amount."""
    replaced: int


SERVICE_DEFAULTS: dict[str, object] = {
    "applicant": "",
    "applicant_unit": "",
    "direction": 138,
    "source": "",
    "service_way": "",
    "content": "",
}

# Unauthenticated rejections are counted, not kept: per window, at most REJECTION_KEYS distinct
# (reason, topic) rows, each cut to REJECTION_TEXT characters, the rest folded into one OTHER row, and
# windows older than REJECTION_RETAIN_MS deleted. Whatever a flood sends, this table stays under
# REJECTION_KEYS * (REJECTION_RETAIN_MS / REJECTION_WINDOW_MS) rows (about 50 MB).
REJECTION_WINDOW_MS = 3_600_000
REJECTION_KEYS = 100
REJECTION_TEXT = 120
REJECTION_RETAIN_MS = 90 * 86_400_000
REJECTION_OTHER = ("(other reasons)", "(other topics)")


def expected_columns() -> dict[str, set[str]]:
    """Each table of SCHEMA and its columns (read from SCHEMA itself, in a scratch in-memory database)."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SCHEMA)
        tables = [r[0] for r in mem.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: {r[1] for r in mem.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        mem.close()


@dataclass(frozen=True)
class StoredInterval:
    agent: str
    instrument: str
    seq: int
    start_ms: int
    end_ms: int
    state: str
    prev: str
    sha: str
    clock_step_ms: int
    envelope: bytes
    energy_mwh: int | None = None
    """The body's ``energy_wh`` in whole mWh; None: unknown (no energy source, or an agent before energy)."""

    @classmethod
    def of(cls, iv: Interval, sha: str, envelope: bytes) -> StoredInterval:
        return cls(
            iv.agent,
            iv.instrument,
            iv.seq,
            iv.start,
            iv.end,
            iv.state,
            iv.prev,
            sha,
            iv.clock_step_ms,
            envelope,
            to_mwh(iv.energy_wh),
        )


@dataclass(frozen=True)
class Rejection:
    reason: str
    topic: str
    payload: bytes
    agent: str | None = None
    instrument: str | None = None
    seq: int | None = None
    authentic: bool = False
    body_sha: str | None = None
    chain_start: bool = False
    chain: str | None = None
    """The chain an authentic rejection counts for (its body's instrument, or ``<code>@signin``)."""
    answer: bool = False
    """The sender's own message as it signed it (it may be told, by its body's hash), authentic or not."""

    def counts_for(self) -> str | None:
        return (self.chain or self.instrument) if self.authentic else None


class LedgerError(Exception):
    pass


RESET_FIX = (
    "restore it from a backup (docs/deploy.md), or run `labmeter collector reset-ledger --config {config}` "
    "to move it aside and start an empty ledger"
)


class IntervalRow(NamedTuple):
    """A stored interval as the hour rules read it; ``linked``: its prev matches the stored predecessor
    (the machine-hour rules count only linked time as verified)."""

    instrument: str
    agent: str
    seq: int
    start_ms: int
    end_ms: int
    state: str
    linked: bool
    energy_mwh: int | None = None
    """The interval's energy in whole mWh; None: unknown (no energy source, or an agent before energy)."""

    def span(self) -> tuple[int, int, str, bool]:
        """(start, end, state, linked): the segment the hour rules take."""
        return self.start_ms, self.end_ms, self.state, self.linked

    def energy(self) -> tuple[int, int, int | None]:
        """(start, end, mWh or None): what labmeter.energy counts."""
        return self.start_ms, self.end_ms, self.energy_mwh


@dataclass(frozen=True)
class Backend:
    """What a ledger's database can do, named, so that code asks for a capability instead of guessing
    the backend from a missing file path."""

    name: str
    pages_checked_here: bool  # integrity_check reads every page; PostgreSQL leaves pages to the server
    server_durability: bool  # fsync and synchronous_commit are the server's settings, to be reported
    lock_nowait: bool  # an exclusive lock can be tried without waiting (PostgreSQL's NOWAIT)


SQLITE = Backend("sqlite", pages_checked_here=True, server_durability=False, lock_nowait=False)
POSTGRESQL = Backend("postgresql", pages_checked_here=False, server_durability=True, lock_nowait=True)


class Ledger:
    # FULL: a commit is on disk before the collector acknowledges it, and the agent deletes its copy on
    # that acknowledgement. WAL with NORMAL may lose the last commits on a power cut (docs/decisions.md).
    synchronous = "FULL"

    def __init__(self, path: Path, quick_check: bool = False) -> None:
        """Open (or create, if the file does not exist) an SQLite ledger; an existing file that is empty,
        cut short or not SQLite raises StateFileError, and so does damage ``quick_check`` finds."""
        self.path: Path | None = path
        self.backend = SQLITE

        def setup(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            self._setup(db, str(path))

        statefile.connect(path, RESET_FIX, setup, quick_check=quick_check, timeout=30)

    def _setup(self, db: Any, name: str) -> None:
        self.db = db
        self.name = name
        self._codes: set[str] = set()  # instruments known to be listed
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE key='longest_interval_ms'").fetchone()
        if row is None:  # once, for a ledger written before this was kept
            self.db.execute(
                "INSERT INTO meta SELECT 'longest_interval_ms', MAX(end_ms - start_ms) FROM intervals "
                "HAVING COUNT(*) > 0 ON CONFLICT DO NOTHING"
            )
            row = self.db.execute("SELECT value FROM meta WHERE key='longest_interval_ms'").fetchone()
        self._longest = int(row[0]) if row else 0
        self._migrate_rejections()
        self._migrate_service_batches()
        self._migrate_energy()
        self._migrate_metering_start()
        self._pruned_window = -1

    def _columns(self, table: str) -> set[str]:
        return {d[0] for d in self.db.execute(f"SELECT * FROM {table} LIMIT 0").description}

    def _migrate_rejections(self) -> None:
        """A ledger from before rejections named their chain: add ``chain`` and ``sha`` and fill them in
        for its authentic rejections, from each one's own body. A stored rejection whose body names
        another agent or instrument than its row (a replay the old collector took as authentic) gets no
        chain, so it no longer counts for the watermark the replay moved."""
        probe = (
            "SELECT 1 FROM sqlite_master WHERE name='rejections_once'"
            if self.backend is SQLITE
            else "SELECT 1 FROM pg_indexes WHERE indexname='rejections_once'"
        )
        if self.db.execute(probe).fetchone():
            return
        with self.transaction(exclusive=True) as cur:
            have = self._columns("rejections")
            if not {"chain", "sha"} <= have:
                for col in ("chain", "sha"):
                    if col not in have:
                        cur.execute(f"ALTER TABLE rejections ADD COLUMN {col} TEXT")
                rows = cur.execute(
                    "SELECT id, agent, instrument, seq, topic, payload FROM rejections WHERE authentic=1 ORDER BY id"
                ).fetchall()
                seen: set[tuple[object, ...]] = set()
                updates = []
                for rid, agent, instrument, seq, topic, payload in rows:
                    chain, sha = _chain_of(agent, instrument, str(topic), bytes(payload))
                    if (agent, chain, seq, sha) in seen:
                        sha = None  # the same body rejected twice before: both rows stay, one keyed
                    seen.add((agent, chain, seq, sha))
                    updates.append((chain, sha, rid))
                cur.executemany("UPDATE rejections SET chain=?, sha=? WHERE id=?", updates)
            cur.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS rejections_once ON rejections (agent, chain, seq, sha)"
            )

    def _migrate_service_batches(self) -> None:
        """Service records name the import batch they came in (NULL: imported before batches were kept),
        and carry the national platform's service way and content (empty in older ledgers)."""
        added = {
            "batch": "batch INTEGER",
            "service_way": "service_way TEXT NOT NULL DEFAULT ''",
            "content": "content TEXT NOT NULL DEFAULT ''",
        }
        if not set(added) <= self._columns("service_records"):
            with self.transaction(exclusive=True) as cur:
                for col, ddl in added.items():
                    if col not in self._columns("service_records"):
                        cur.execute(f"ALTER TABLE service_records ADD COLUMN {ddl}")
        self.db.execute("CREATE INDEX IF NOT EXISTS service_batch ON service_records (batch)")

    def _migrate_energy(self) -> None:
        """A ledger from before energy: intervals get ``energy_mwh`` (NULL: unknown, never 0) and rollups
        their energy sums. A collector before energy stored what newer agents sent whole, so the energy
        of those bodies is read back from the stored envelopes and their time marked for the rollups."""
        if "energy_mwh" in self._columns("intervals") and "energy_ms" in self._columns("rollups"):
            return
        big = "INTEGER" if self.backend is SQLITE else "BIGINT"  # as pg.schema() maps a fresh one
        with self.transaction(exclusive=True) as cur:
            if "energy_mwh" not in self._columns("intervals"):
                cur.execute(f"ALTER TABLE intervals ADD COLUMN energy_mwh {big}")
            for col in ("energy_mwh", "energy_ms"):
                if col not in self._columns("rollups"):
                    cur.execute(f"ALTER TABLE rollups ADD COLUMN {col} {big} NOT NULL DEFAULT 0")
            has_energy = (
                "CAST(envelope AS TEXT) LIKE '%energy_wh%'"
                if self.backend is SQLITE
                else "position('energy_wh'::bytea in envelope) > 0"
            )
            rows = cur.execute(
                f"SELECT agent, instrument, seq, start_ms, end_ms, envelope FROM intervals WHERE {has_energy}"
            ).fetchall()
            updates, marks = [], []
            for agent, instrument, seq, start, end, envelope in rows:
                try:
                    iv = parse_interval(load_body(open_envelope(bytes(envelope)).body))
                except WireError:
                    continue
                if iv.energy_wh is not None:
                    updates.append((to_mwh(iv.energy_wh), agent, instrument, seq))
                    marks.append((instrument, start, end))
            cur.executemany(
                "UPDATE intervals SET energy_mwh=? WHERE agent=? AND instrument=? AND seq=?", updates
            )
            self._mark(cur, marks)

    def _migrate_metering_start(self) -> None:
        """Instruments carry the registry's metering start (NULL: metering began at the first interval)."""
        if "metering_start_ms" not in self._columns("instruments"):
            with self.transaction(exclusive=True) as cur:
                if "metering_start_ms" not in self._columns("instruments"):
                    cur.execute("ALTER TABLE instruments ADD COLUMN metering_start_ms BIGINT")

    @staticmethod
    def sqlite_path(url: str, data_dir: Path) -> Path | None:
        """The file of an SQLite ledger URL; None for any other kind."""
        if url == "sqlite":
            return data_dir / "ledger.sqlite"
        if url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///"))
        return None

    @classmethod
    def open(cls, url: str, data_dir: Path, quick_check: bool = False) -> Ledger:
        """``quick_check``: read every page of an SQLite ledger before use (the collector does, at start-up)."""
        path = cls.sqlite_path(url, data_dir)
        if path is not None:
            return cls(path, quick_check)
        if url.startswith(("postgresql://", "postgres://")):
            from labmeter.collector.ledger import pg

            try:
                db = pg.Database(url)
            except pg.MissingDriver as exc:
                raise LedgerError(str(exc)) from None
            except Exception as exc:
                raise LedgerError(f"ledger {redact_url(url)}: {redact_text(str(exc).strip(), url)}") from None
            ledger = cls.__new__(cls)
            ledger.path = None
            ledger.backend = POSTGRESQL
            ledger._setup(db, redact_url(url))
            return ledger
        raise LedgerError(
            f"ledger {redact_url(url)!r}: use 'sqlite', sqlite:///PATH or postgresql://USER@HOST/DB"
        )

    def close(self) -> None:
        self.db.close()

    def check(self, full: bool = True) -> list[str]:
        """Problems with the ledger, empty when none. SQLite: ``PRAGMA integrity_check`` (``full``) or
        ``quick_check`` over every page. PostgreSQL: every table and column of the schema is there and
        readable, and fsync and synchronous_commit are not off (an acknowledgement follows the commit);
        pages are the server's to check (data checksums, pg_amcheck)."""
        if self.backend.pages_checked_here:
            return statefile.check(self.db, full)
        expected = expected_columns()
        found: dict[str, set[str]] = {}
        for table, column in self.db.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        ):
            found.setdefault(table, set()).add(column)
        problems = []
        for table, columns in expected.items():
            if table not in found:
                problems.append(f"table {table} is missing")
            elif columns - found[table]:
                problems.append(f"table {table} lacks column(s) {', '.join(sorted(columns - found[table]))}")
            else:
                self.db.execute(f"SELECT * FROM {table} LIMIT 1").fetchall()
        settings = self.server_settings()
        if settings.get("fsync") != "on":
            problems.append(
                "the server runs with fsync off: a crash of its machine can lose acknowledged intervals"
            )
        if settings.get("synchronous_commit") == "off":
            problems.append(
                "synchronous_commit is off: a crash of the server can lose acknowledged intervals"
            )
        return problems

    def server_settings(self) -> dict[str, str]:
        """PostgreSQL's durability settings as the collector's connection sees them (empty on SQLite)."""
        if not self.backend.server_durability:
            return {}
        names = ("fsync", "synchronous_commit", "data_checksums", "server_version")
        return {n: str(self.db.execute(f"SHOW {n}").fetchone()[0]) for n in names}

    def counts(self) -> dict[str, int]:
        """Rows in the tables a person recognises, for check and status output."""
        return {
            t: int(self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
            for t in ("agents", "instruments", "intervals", "rejections")
        }

    # registry -------------------------------------------------------------
    def add_agent(self, agent: str, pubkey: str, kid: str, instruments: Iterable[str]) -> None:
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO agents VALUES (?,?,?,?) ON CONFLICT(id) DO UPDATE SET pubkey=excluded.pubkey, "
                "kid=excluded.kid",
                (agent, pubkey, kid, int(time.time() * 1000)),
            )
            for code in instruments:
                cur.execute("INSERT INTO instruments (code) VALUES (?) ON CONFLICT DO NOTHING", (code,))
                cur.execute("INSERT INTO enrolments VALUES (?,?) ON CONFLICT DO NOTHING", (agent, code))

    def agent_keys(self) -> dict[str, tuple[str, str]]:
        return {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT id, pubkey, kid FROM agents")}

    def enrolments(self) -> set[tuple[str, str]]:
        return {(r[0], r[1]) for r in self.db.execute("SELECT agent, instrument FROM enrolments")}

    def upsert_instruments(self, rows: Sequence[dict[str, object]]) -> None:
        cols = INSTRUMENT_COLUMNS
        with self.transaction() as cur:
            cur.executemany(
                f"INSERT INTO instruments ({','.join(cols)}) VALUES ({','.join('?' * len(cols))}) ON CONFLICT(code) DO "
                f"UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in cols[1:])}",
                [tuple(r.get(c) for c in cols) for r in rows],
            )

    def add_service_records(self, rows: Sequence[dict[str, object]]) -> int:
        """Insert records; an identical record (instrument, start, end, applicant) already present is skipped."""
        return self.import_service_batch("", rows, replace=False, now_ms=0, keep_batch=False).added

    def import_service_batch(
        self,
        source: str,
        rows: Sequence[dict[str, object]],
        replace: bool,
        now_ms: int,
        keep_batch: bool = True,
    ) -> BatchResult:
        """One import as one batch, in one transaction. With ``replace``, each instrument's stored records
        that start within the span the file covers for it (its first start to its last end) go first, so
        a corrected file takes the place of the wrong one. Without it, a record with the same instrument,
        start, end and applicant is kept as stored; those whose other fields differ are counted."""
        cols = (*SERVICE_COLUMNS, "batch")
        spans: dict[str, tuple[int, int]] = {}
        for r in rows:
            code, s, e = str(r["instrument"]), int(r["start_ms"]), int(r["end_ms"])  # type: ignore[call-overload]
            have = spans.get(code)
            spans[code] = (s, e) if have is None else (min(s, have[0]), max(e, have[1]))
        with self.transaction() as cur:
            batch = None
            if keep_batch:
                batch = int(
                    cur.execute(
                        "INSERT INTO service_batches (source, imported_ms, records) VALUES (?,?,0) RETURNING id",
                        (source, now_ms),
                    ).fetchone()[0]
                )
            removed: list[tuple[str, int, int]] = []
            if replace:
                for code, (lo, hi) in spans.items():
                    removed += cur.execute(
                        "DELETE FROM service_records WHERE instrument=? AND start_ms>=? AND start_ms<? "
                        "RETURNING instrument, start_ms, end_ms",
                        (code, lo, hi),
                    ).fetchall()
            differ = 0
            if not replace and rows:
                for r in rows:
                    old = cur.execute(
                        "SELECT applicant_unit, service_type, direction, amount, service_way, content "
                        "FROM service_records "
                        "WHERE instrument=? AND start_ms=? AND end_ms=? AND applicant=?",
                        (r["instrument"], r["start_ms"], r["end_ms"], r.get("applicant", "")),
                    ).fetchone()
                    new = tuple(
                        r.get(c, SERVICE_DEFAULTS.get(c))
                        for c in (
                            "applicant_unit",
                            "service_type",
                            "direction",
                            "amount",
                            "service_way",
                            "content",
                        )
                    )
                    if old is not None and tuple(old) != new:
                        differ += 1
            cur.executemany(
                f"INSERT INTO service_records ({','.join(cols)}) VALUES ({','.join('?' * len(cols))}) "
                "ON CONFLICT DO NOTHING",
                [(*(r.get(c, SERVICE_DEFAULTS.get(c)) for c in SERVICE_COLUMNS), batch) for r in rows],
            )
            added = cur.rowcount
            if batch is not None:
                cur.execute(
                    "UPDATE service_batches SET records=?, replaced=? WHERE id=?",
                    (added, len(removed), batch),
                )
            self._mark(
                cur,
                [
                    *((code, lo, hi) for code, (lo, hi) in spans.items()),
                    *((str(c), int(a), int(b)) for c, a, b in removed),
                ],
            )
        return BatchResult(batch, added, len(rows) - added, differ, len(removed))

    def service_batches(self) -> list[dict[str, object]]:
        """Every import batch with the records it still holds, their instruments and time span."""
        out = []
        for bid, source, imported, records, replaced in self.db.execute(
            "SELECT id, source, imported_ms, records, replaced FROM service_batches ORDER BY id"
        ).fetchall():
            n, lo, hi = self.db.execute(
                "SELECT COUNT(*), MIN(start_ms), MAX(end_ms) FROM service_records WHERE batch=?", (bid,)
            ).fetchone()
            codes = [
                r[0]
                for r in self.db.execute(
                    "SELECT DISTINCT instrument FROM service_records WHERE batch=? ORDER BY instrument",
                    (bid,),
                )
            ]
            out.append(
                {
                    "batch": int(bid),
                    "source": source,
                    "imported_ms": int(imported),
                    "imported": int(records),
                    "replaced": int(replaced),
                    "records": int(n),
                    "instruments": codes,
                    "from_ms": lo,
                    "to_ms": hi,
                }
            )
        n, lo, hi = self.db.execute(
            "SELECT COUNT(*), MIN(start_ms), MAX(end_ms) FROM service_records WHERE batch IS NULL"
        ).fetchone()
        if n:
            out.insert(
                0,
                {
                    "batch": None,
                    "source": "(imported before batches were kept)",
                    "imported_ms": None,
                    "imported": int(n),
                    "replaced": 0,
                    "records": int(n),
                    "instruments": [
                        r[0]
                        for r in self.db.execute(
                            "SELECT DISTINCT instrument FROM service_records WHERE batch IS NULL ORDER BY instrument"
                        )
                    ],
                    "from_ms": lo,
                    "to_ms": hi,
                },
            )
        return out

    def delete_service_batch(self, batch: int) -> int | None:
        """Remove a batch and its records; None if there is no such batch."""
        with self.transaction() as cur:
            if cur.execute("SELECT 1 FROM service_batches WHERE id=?", (batch,)).fetchone() is None:
                return None
            removed = cur.execute(
                "DELETE FROM service_records WHERE batch=? RETURNING instrument, start_ms, end_ms", (batch,)
            ).fetchall()
            cur.execute("DELETE FROM service_batches WHERE id=?", (batch,))
            self._mark(cur, [(str(c), int(a), int(b)) for c, a, b in removed])
        return len(removed)

    def service_records(self, a: int, b: int, instrument: str | None = None) -> list[dict[str, object]]:
        """Records overlapping [a, b), oldest first: what exports and evidence bundles carry."""
        cols = ("id", *SERVICE_COLUMNS, "batch")
        sql = f"SELECT {','.join(cols)} FROM service_records WHERE start_ms < ? AND end_ms > ?"
        args: tuple[object, ...] = (b, a)
        if instrument is not None:
            sql += " AND instrument = ?"
            args += (instrument,)
        sql += " ORDER BY instrument, start_ms, end_ms, applicant"
        return [dict(zip(cols, r, strict=True)) for r in self.db.execute(sql, args)]

    def first_interval_ms(self) -> dict[str, int]:
        """Per instrument, when its first stored interval starts: where its metering began. One index
        lookup per listed instrument (a GROUP BY would scan every interval of every year)."""
        out = {}
        for (code,) in self.db.execute("SELECT code FROM instruments").fetchall():
            row = self.db.execute(
                "SELECT MIN(start_ms) FROM intervals WHERE instrument=?", (code,)
            ).fetchone()
            if row is not None and row[0] is not None:
                out[str(code)] = int(row[0])
        return out

    @staticmethod
    def _mark(cur: Any, spans: Iterable[tuple[str, int, int]]) -> None:
        """Note the time whose rollups are stale, in the transaction that makes them so: one stretch per
        instrument, from its earliest start to its latest end (time between is recomputed too, harmlessly)."""
        stretch: dict[str, tuple[int, int]] = {}
        for code, start, end in spans:
            have = stretch.get(code)
            if have is None:
                stretch[code] = (start, end)
            elif start < have[0] or end > have[1]:
                stretch[code] = (min(start, have[0]), max(end, have[1]))
        cur.executemany(
            "INSERT INTO rollup_dirty (instrument, from_ms, to_ms) VALUES (?,?,?)",
            [(code, a, b) for code, (a, b) in stretch.items()],
        )

    def service_windows(
        self, start_ms: int, end_ms: int, instrument: str | None = None
    ) -> dict[str, list[tuple[int, int, bool]]]:
        out: dict[str, list[tuple[int, int, bool]]] = {}
        sql = "SELECT instrument, start_ms, end_ms, service_type FROM service_records WHERE start_ms < ? AND end_ms > ?"
        args: tuple[object, ...] = (end_ms, start_ms)
        if instrument is not None:
            sql += " AND instrument = ?"
            args += (instrument,)
        for inst, s, e, t in self.db.execute(sql, args):
            out.setdefault(inst, []).append((s, e, t == 130))
        return out

    def instruments(self) -> list[dict[str, object]]:
        cols = INSTRUMENT_COLUMNS
        return [
            dict(zip(cols, r, strict=True))
            for r in self.db.execute(f"SELECT {','.join(cols)} FROM instruments")
        ]

    def instrument(self, code: str) -> dict[str, object] | None:
        """One instrument's registry row: what a per-instrument request looks up, without the whole registry."""
        cols = INSTRUMENT_COLUMNS
        row = self.db.execute(f"SELECT {','.join(cols)} FROM instruments WHERE code=?", (code,)).fetchone()
        return None if row is None else dict(zip(cols, row, strict=True))

    def instruments_by_code(self) -> dict[str, dict[str, object]]:
        """The registry keyed by instrument code, as every report and view looks it up."""
        return {str(i["code"]): i for i in self.instruments()}

    # ingest ---------------------------------------------------------------
    def store(
        self,
        intervals: Sequence[tuple[StoredInterval, str | None]],
        rejections: Sequence[Rejection],
        signins: Sequence[tuple[str, str, int, int, str, str, bytes]] = (),
    ) -> list[Rejection]:
        """Store a batch in one transaction; returns the conflicts found (also stored as rejections).

        Authentic rejections are kept whole (once per body); the others only counted (see
        REJECTION_KEYS)."""
        now = int(time.time() * 1000)
        conflicts: list[Rejection] = []
        with self.transaction() as cur:
            if signins:
                cur.executemany(
                    "INSERT INTO signins VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    [(*r, now) for r in signins],
                )
            cur.executemany(
                "INSERT INTO intervals VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [
                    (
                        iv.agent,
                        iv.instrument,
                        iv.seq,
                        iv.start_ms,
                        iv.end_ms,
                        iv.state,
                        iv.prev,
                        iv.sha,
                        iv.clock_step_ms,
                        note,
                        iv.envelope,
                        now,
                        iv.energy_mwh,
                    )
                    for iv, note in intervals
                ],
            )
            if cur.rowcount < len(intervals):
                conflicts = self._conflicts(cur, [iv for iv, _ in intervals])
            self._mark(cur, [(iv.instrument, iv.start_ms, iv.end_ms) for iv, _ in intervals])
            new_codes = {iv.instrument for iv, _ in intervals} - self._codes
            cur.executemany(
                "INSERT INTO instruments (code) VALUES (?) ON CONFLICT DO NOTHING", [(c,) for c in new_codes]
            )
            longest = max((iv.end_ms - iv.start_ms for iv, _ in intervals), default=0)
            if longest > self._longest:
                cur.execute(
                    "INSERT INTO meta VALUES ('longest_interval_ms', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = CASE WHEN excluded.value > meta.value "
                    "THEN excluded.value ELSE meta.value END",
                    (longest,),
                )
            # A successor stored before its predecessor turns from unverified to verified now; successors
            # in this batch are marked already, so only the ends of its runs of seqs need a look.
            seqs = {(iv.agent, iv.instrument, iv.seq) for iv, _ in intervals}
            cur.executemany(
                "INSERT INTO rollup_dirty (instrument, from_ms, to_ms) SELECT instrument, start_ms, end_ms "
                "FROM intervals WHERE agent=? AND instrument=? AND seq=?",
                [(a, i, n + 1) for a, i, n in seqs if (a, i, n + 1) not in seqs],
            )
            kept = [r for r in [*rejections, *conflicts] if r.authentic]
            cur.executemany(
                "INSERT INTO rejections (at_ms, agent, instrument, seq, authentic, reason, topic, payload, "
                "chain, sha) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [
                    (
                        now,
                        r.agent,
                        r.instrument,
                        r.seq,
                        1,
                        r.reason[:1000],
                        r.topic[:1000],
                        r.payload,
                        r.counts_for(),
                        r.body_sha,
                    )
                    for r in kept
                ],
            )
            self._count(cur, [r for r in rejections if not r.authentic], now)
        self._codes |= new_codes
        self._longest = max(self._longest, longest)
        return conflicts

    def _count(self, cur: Any, rejections: Sequence[Rejection], now: int) -> None:
        """Add unauthenticated rejections to their window's counts, within the window's cap of rows."""
        if not rejections:
            return
        window = now - now % REJECTION_WINDOW_MS
        if window != self._pruned_window:
            cur.execute("DELETE FROM rejection_counts WHERE window_ms < ?", (window - REJECTION_RETAIN_MS,))
            self._pruned_window = window
        batch: dict[tuple[str, str], int] = {}
        for r in rejections:
            key = (r.reason[:REJECTION_TEXT], r.topic[:REJECTION_TEXT])
            batch[key] = batch.get(key, 0) + 1
        have = {
            (reason, topic)
            for reason, topic in cur.execute(
                "SELECT reason, topic FROM rejection_counts WHERE window_ms=?", (window,)
            ).fetchall()
        }
        room = REJECTION_KEYS - 1 - len(have - {REJECTION_OTHER})
        rows: dict[tuple[str, str], int] = {}
        for key, n in batch.items():
            if key not in have and key != REJECTION_OTHER:
                if room > 0:
                    room -= 1
                else:
                    key = REJECTION_OTHER
            rows[key] = rows.get(key, 0) + n
        cur.executemany(
            "INSERT INTO rejection_counts VALUES (?,?,?,?,?,?) ON CONFLICT(window_ms, reason, topic) "
            "DO UPDATE SET n = rejection_counts.n + excluded.n, last_ms = excluded.last_ms",
            [(window, reason, topic, n, now, now) for (reason, topic), n in rows.items()],
        )

    def rejection_summary(self, since_ms: int = 0) -> list[tuple[str, str, int, bool]]:
        """(reason, topic, count, authentic) of rejections since ``since_ms``, most frequent first."""
        kept = self.db.execute(
            "SELECT reason, topic, COUNT(*) FROM rejections WHERE at_ms >= ? AND authentic = 1 GROUP BY reason, topic",
            (since_ms,),
        ).fetchall()
        old = self.db.execute(
            "SELECT reason, topic, COUNT(*) FROM rejections WHERE at_ms >= ? AND authentic = 0 GROUP BY reason, topic",
            (since_ms,),
        ).fetchall()
        counted = self.db.execute(
            "SELECT reason, topic, CAST(SUM(n) AS INTEGER) FROM rejection_counts WHERE last_ms >= ? "
            "GROUP BY reason, topic",
            (since_ms - REJECTION_WINDOW_MS,),
        ).fetchall()
        out = [(r, t, int(n), True) for r, t, n in kept]
        out += [(r, t, int(n), False) for r, t, n in [*old, *counted]]
        return sorted(out, key=lambda x: (-x[2], x[0], x[1]))

    def writable(self) -> bool:
        """Whether the ledger takes a write at all: tells a message it cannot store from an outage."""
        try:
            with self.transaction() as cur:
                cur.execute(
                    "INSERT INTO meta VALUES ('write_probe_ms', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (int(time.time() * 1000),),
                )
        except Exception:
            return False
        return True

    @staticmethod
    def _conflicts(cur: Any, intervals: list[StoredInterval]) -> list[Rejection]:
        """Rows that were not inserted because a different body holds their seq (same body: a harmless duplicate)."""
        out = []
        for iv in intervals:
            row = cur.execute(
                "SELECT sha FROM intervals WHERE agent=? AND instrument=? AND seq=?",
                (iv.agent, iv.instrument, iv.seq),
            ).fetchone()
            if row and row[0] != iv.sha:
                out.append(
                    Rejection(
                        conflict_reason(iv.seq),
                        f"labmeter/v1/{iv.agent}/{iv.instrument}/interval",
                        iv.envelope,
                        iv.agent,
                        iv.instrument,
                        iv.seq,
                        True,
                        iv.sha,
                        False,
                        iv.instrument,
                    )
                )
        return out

    def store_signins(self, rows: Sequence[tuple[str, str, int, int, str, str, bytes]]) -> None:
        """(agent, instrument, seq, at_ms, user, sha, envelope); the same seq twice is one row."""
        now = int(time.time() * 1000)
        with self.transaction() as cur:
            cur.executemany(
                "INSERT INTO signins VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [(*r, now) for r in rows],
            )

    def recent_signins(self, instrument: str, limit: int = 20) -> list[tuple[int, str]]:
        return self.db.execute(
            'SELECT at_ms, "user" FROM signins WHERE instrument=? ORDER BY at_ms DESC LIMIT ?',
            (instrument, limit),
        ).fetchall()

    def handled_seqs(self, agent: str, instrument: str, above: int = 0) -> list[tuple[int, bool]]:
        """(seq, starts a chain) stored or authentically rejected: what the acknowledgement watermark may pass."""
        if instrument.endswith("@signin"):
            code = instrument.removesuffix("@signin")
            own = self.db.execute(
                "SELECT seq, envelope FROM signins WHERE agent=? AND instrument=? AND seq>?",
                (agent, code, above),
            )
            rows = [(seq, envelope_starts_chain(bytes(env))) for seq, env in own]
        else:
            rows = [
                (seq, starts_chain(prev))
                for seq, prev in self.db.execute(
                    "SELECT seq, prev FROM intervals WHERE agent=? AND instrument=? AND seq>?",
                    (agent, instrument, above),
                )
            ]
        rows += [
            (seq, envelope_starts_chain(bytes(payload)))
            for seq, payload in self.db.execute(
                "SELECT seq, payload FROM rejections WHERE agent=? AND chain=? AND authentic=1 AND seq>?",
                (agent, instrument, above),
            )
        ]
        return sorted(set(rows))

    def _handled_in(self, cur: Any, agent: str, chain: str, lo: int, hi: int) -> set[int]:
        """The seqs in [lo, hi] of a chain that are stored or authentically rejected."""
        if chain.endswith("@signin"):
            sql = "SELECT seq FROM signins WHERE agent=? AND instrument=? AND seq BETWEEN ? AND ?"
            code = chain.removesuffix("@signin")
        else:
            sql = "SELECT seq FROM intervals WHERE agent=? AND instrument=? AND seq BETWEEN ? AND ?"
            code = chain
        seqs = {int(r[0]) for r in cur.execute(sql, (agent, code, lo, hi)).fetchall()}
        seqs |= {
            int(r[0])
            for r in cur.execute(
                "SELECT seq FROM rejections WHERE agent=? AND chain=? AND authentic=1 AND seq BETWEEN ? AND ?",
                (agent, chain, lo, hi),
            ).fetchall()
        }
        return seqs

    def record_holes(
        self, agent: str, chain: str, lo: int, hi: int, statement: bytes
    ) -> list[tuple[int, int]]:
        """Record the seqs in [lo, hi] the ledger does not hold as holes, on the agent's signed word.

        ``statement`` is the agent's signed status saying it holds none of them any more (see
        ``wire.AgentStatus.gone``): with it kept, anyone can check why the acknowledgement
        watermark passed them. Returns the (first, last) runs recorded; seqs stored meanwhile (by
        another collector on this ledger) are not holes.
        """
        now = int(time.time() * 1000)
        with self.transaction() as cur:
            have = sorted(self._handled_in(cur, agent, chain, lo, hi))
            runs: list[tuple[int, int]] = []
            start = lo
            for s in [*have, hi + 1]:
                if s > start:
                    runs.append((start, s - 1))
                start = s + 1
            cur.executemany(
                "INSERT INTO holes VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [(agent, chain, a, b, now, statement) for a, b in runs],
            )
        return runs

    def holes(
        self, agent: str | None = None, chain: str | None = None
    ) -> list[tuple[str, str, int, int, int]]:
        """(agent, chain, first seq, last seq, recorded at) of the recorded holes, in order."""
        sql = "SELECT agent, chain, first_seq, last_seq, at_ms FROM holes"
        args: list[object] = []
        if agent is not None and chain is not None:
            sql += " WHERE agent=? AND chain=?"
            args = [agent, chain]
        return [
            (str(a), str(c), int(f), int(last), int(t))
            for a, c, f, last, t in self.db.execute(sql + " ORDER BY agent, chain, first_seq", args)
        ]

    def hole_statements(self, agent: str, chain: str, lo: int, hi: int) -> list[tuple[int, int, bytes]]:
        """(first seq, last seq, the agent's signed statement) of the holes of a chain touching [lo, hi]."""
        return [
            (int(f), int(last), bytes(st))
            for f, last, st in self.db.execute(
                "SELECT first_seq, last_seq, statement FROM holes WHERE agent=? AND chain=? AND last_seq>=? "
                "AND first_seq<=? ORDER BY first_seq",
                (agent, chain, lo, hi),
            )
        ]

    def body_sha(self, agent: str, chain: str, seq: int) -> str | None:
        """The hash of the body stored (or authentically rejected) at a chain's seq, for an acknowledgement."""
        if chain.endswith("@signin"):
            sql = "SELECT sha FROM signins WHERE agent=? AND instrument=? AND seq=?"
            code = chain.removesuffix("@signin")
        else:
            sql = "SELECT sha FROM intervals WHERE agent=? AND instrument=? AND seq=?"
            code = chain
        row = self.db.execute(sql, (agent, code, seq)).fetchone()
        if row is None:
            row = self.db.execute(
                "SELECT sha FROM rejections WHERE agent=? AND chain=? AND authentic=1 AND seq=? AND sha IS NOT NULL",
                (agent, chain, seq),
            ).fetchone()
        return str(row[0]) if row else None

    def received_between(
        self, after_ms: int, upto_ms: int, limit: int | None = None
    ) -> tuple[list[tuple[str, str, int, int, str]], int]:
        """(instrument, agent, start, end, state) of intervals stored in (after, upto], what a sink has not sent,
        and how far they reach: ``upto``, or with ``limit`` (a catch-up over a long history, read a page at a
        time) the last whole millisecond of stores the page holds. A millisecond is never split (a batch
        stores thousands of rows in one), so a page may hold more than ``limit`` rows."""
        sql = (
            "SELECT instrument, agent, start_ms, end_ms, state, received_ms FROM intervals "
            "WHERE received_ms > ? AND received_ms <= ? ORDER BY received_ms"
        )
        if limit is None:
            rows = self.db.execute(sql, (after_ms, upto_ms)).fetchall()
            return [tuple(r[:5]) for r in rows], upto_ms
        rows = self.db.execute(sql + " LIMIT ?", (after_ms, upto_ms, limit + 1)).fetchall()
        if len(rows) <= limit:
            return [tuple(r[:5]) for r in rows], upto_ms
        last = int(rows[-1][5])
        whole = [r for r in rows if int(r[5]) < last]
        if whole:
            return [tuple(r[:5]) for r in whole], int(whole[-1][5])
        rows = self.db.execute(sql, (last - 1, last)).fetchall()  # one millisecond holds more than a page
        return [tuple(r[:5]) for r in rows], last

    def sink_cursor(self, name: str) -> int:
        row = self.db.execute("SELECT received_ms FROM sink_cursor WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_sink_cursor(self, name: str, received_ms: int) -> None:
        self.db.execute(
            "INSERT INTO sink_cursor VALUES (?,?) ON CONFLICT(name) DO UPDATE SET received_ms=excluded.received_ms",
            (name, received_ms),
        )

    # reports --------------------------------------------------------------
    def intervals_between(
        self, start_ms: int, end_ms: int, instrument: str | None = None
    ) -> list[IntervalRow]:
        """Intervals overlapping [start, end) with a ``linked`` flag: prev matches the stored predecessor."""
        sql = (
            "SELECT i.instrument, i.agent, i.seq, i.start_ms, i.end_ms, i.state, "
            "CASE WHEN i.prev = ? OR (p.sha = i.prev AND p.end_ms + i.clock_step_ms = i.start_ms) "
            "THEN 1 ELSE 0 END, i.energy_mwh "
            "FROM intervals i LEFT JOIN intervals p ON p.agent = i.agent AND p.instrument = i.instrument "
            "AND p.seq = i.seq - 1 WHERE i.start_ms < ? AND i.start_ms >= ? AND i.end_ms > ?"
        )
        args: list[object] = [GENESIS, end_ms, start_ms - self.longest_interval_ms(), start_ms]
        if instrument is not None:
            sql += " AND i.instrument = ?"
            args.append(instrument)
        else:  # instrument by instrument along the time index, never a scan of the whole table
            sql = sql.replace("FROM intervals i", "FROM instruments c CROSS JOIN intervals i", 1)
            sql += " AND i.instrument = c.code"
        rows = self.db.execute(sql + " ORDER BY i.instrument, i.start_ms", args).fetchall()
        return [IntervalRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows]

    def signins_between(self, start_ms: int, end_ms: int, instrument: str | None = None) -> list[SignInRow]:
        """Sign-ins at [start, end), oldest first."""
        sql = 'SELECT instrument, agent, at_ms, "user" FROM signins WHERE at_ms >= ? AND at_ms < ?'
        args: tuple[object, ...] = (start_ms, end_ms)
        if instrument is not None:
            sql += " AND instrument = ?"
            args += (instrument,)
        return [
            SignInRow(str(i), str(g), int(t), str(u))
            for i, g, t, u in self.db.execute(sql + " ORDER BY instrument, at_ms", args)
        ]

    def bookings_between(self, start_ms: int, end_ms: int, instrument: str | None = None) -> list[BookingRow]:
        """Service records overlapping [start, end), by instrument and start."""
        sql = (
            "SELECT id, instrument, start_ms, end_ms, applicant, applicant_unit, service_type "
            "FROM service_records WHERE start_ms < ? AND end_ms > ?"
        )
        args: tuple[object, ...] = (end_ms, start_ms)
        if instrument is not None:
            sql += " AND instrument = ?"
            args += (instrument,)
        return [
            BookingRow(
                int(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4] or ""), str(r[5] or ""), int(r[6])
            )
            for r in self.db.execute(sql + " ORDER BY instrument, start_ms, end_ms, id", args)
        ]

    def envelopes(self, agent: str, instrument: str, first: int, last: int) -> list[bytes]:
        """The stored envelopes of seqs first..last of one chain, in order, exactly as the agent sent them."""
        return [
            bytes(r[0])
            for r in self.db.execute(
                "SELECT envelope FROM intervals WHERE agent=? AND instrument=? AND seq BETWEEN ? AND ? "
                "ORDER BY seq",
                (agent, instrument, first, last),
            )
        ]

    def longest_interval_ms(self) -> int:
        """How far before a period an interval reaching into it can start."""
        row = self.db.execute("SELECT value FROM meta WHERE key='longest_interval_ms'").fetchone()
        return int(row[0]) if row else MAX_INTERVAL_MS

    # rollups -------------------------------------------------------------
    @contextmanager
    def transaction(self, exclusive: bool = False, wait: bool = True) -> Iterator[Any]:
        """A write transaction; ``exclusive``: one such at a time across collectors sharing the ledger
        (rollups are refreshed under it). Without ``wait``, raises Busy if another holds it (PostgreSQL;
        on SQLite the only other writers are this host's report commands, and it waits)."""
        cur = self.db.cursor()
        nowait = not wait and self.backend.lock_nowait
        cur.execute(
            ("BEGIN EXCLUSIVE NOWAIT" if nowait else "BEGIN EXCLUSIVE") if exclusive else "BEGIN IMMEDIATE"
        )
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def rollup_basis(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.db.execute("SELECT instrument, basis FROM rollup_basis")}

    def rebase_rollups(self, cur: Any, instrument: str, basis: str) -> None:
        """Forget an instrument's rollups (its allowances or the calendar changed) and mark its whole history stale."""
        cur.execute("DELETE FROM rollups WHERE instrument=?", (instrument,))
        cur.execute(
            "INSERT INTO rollup_basis VALUES (?,?) ON CONFLICT(instrument) DO UPDATE SET basis=excluded.basis",
            (instrument, basis),
        )
        cur.execute(
            "INSERT INTO rollup_dirty (instrument, from_ms, to_ms) SELECT CAST(? AS TEXT), MIN(a), MAX(b) FROM ("
            "SELECT MIN(start_ms) AS a, MAX(end_ms) AS b FROM intervals WHERE instrument=? UNION ALL "
            "SELECT MIN(start_ms), MAX(end_ms) FROM service_records WHERE instrument=?) AS x HAVING MIN(a) IS NOT NULL",
            (instrument, instrument, instrument),
        )

    def dirty(self, cur: Any, limit: int) -> list[tuple[int, str, int, int]]:
        return cur.execute(
            "SELECT id, instrument, from_ms, to_ms FROM rollup_dirty ORDER BY id LIMIT ?", (limit,)
        ).fetchall()

    def clear_dirty(self, cur: Any, ids: Sequence[int]) -> None:
        cur.executemany("DELETE FROM rollup_dirty WHERE id=?", [(i,) for i in ids])

    def write_rollups(
        self,
        cur: Any,
        instrument: str,
        span: int,
        lo: int,
        hi: int,
        rows: Sequence[tuple[int, Sequence[int]]],
    ) -> None:
        """Replace an instrument's rollups of one span in [lo, hi) by ``rows`` of (start, ROLLUP_VALUES)."""
        cur.execute(
            "DELETE FROM rollups WHERE instrument=? AND span=? AND start_ms>=? AND start_ms<?",
            (instrument, span, lo, hi),
        )
        cur.executemany(
            f"INSERT INTO rollups VALUES (?,?,?,{','.join('?' * len(ROLLUP_VALUES))})",
            [(instrument, span, start, *values) for start, values in rows],
        )

    def sum_rollups(self, cur: Any, instrument: str, span: int, into: int, lo: int, hi: int) -> None:
        """Make the ``into``-span rollup at ``lo`` the sum of the ``span`` rollups in [lo, hi)."""
        cur.execute(
            "DELETE FROM rollups WHERE instrument=? AND span=? AND start_ms=?", (instrument, into, lo)
        )
        cur.execute(
            f"INSERT INTO rollups SELECT instrument, CAST(? AS INTEGER), CAST(? AS INTEGER), {SUMS} "
            "FROM rollups WHERE instrument=? AND span=? AND start_ms>=? AND start_ms<? GROUP BY instrument",
            (into, lo, instrument, span, lo, hi),
        )

    def rollup_rows(
        self, instrument: str, span: int, lo: int, hi: int, columns: Sequence[str] = ROLLUP_VALUES
    ) -> list[tuple[Any, ...]]:
        """(start, ``columns``) of one instrument's ``span`` rollups starting in [lo, hi)."""
        cols = ", ".join(c for c in columns if c in ROLLUP_VALUES)
        return self.db.execute(
            f"SELECT start_ms, {cols} FROM rollups WHERE instrument=? AND span=? AND start_ms>=? AND start_ms<? "
            "ORDER BY start_ms",
            (instrument, span, lo, hi),
        ).fetchall()

    def rollup_totals(
        self, span: int, lo: int, hi: int, columns: Sequence[str] = ROLLUP_VALUES
    ) -> list[tuple[Any, ...]]:
        """(instrument, ``columns`` summed) over the ``span`` rollups starting in [lo, hi)."""
        sums = ", ".join(f"CAST(SUM({c}) AS INTEGER)" for c in columns if c in ROLLUP_VALUES)
        return self.db.execute(
            f"SELECT b.instrument, {sums} FROM rollup_basis b "
            "JOIN rollups r ON r.instrument = b.instrument AND r.span = ? AND r.start_ms >= ? AND r.start_ms < ? "
            "GROUP BY b.instrument",
            (span, lo, hi),
        ).fetchall()

    # time-series sink: what it has written of each hour --------------------
    def _sink_schema(self) -> None:
        if not getattr(self, "_sink_ready", False):
            self.db.executescript(SINK_SCHEMA)
            self._sink_ready = True

    def sink_hours(self, name: str, instrument: str, lo: int, hi: int) -> dict[int, tuple[int, ...]]:
        """start -> (rev, SINK_VALUES) the sink ``name`` has written for one instrument's hours in [lo, hi)."""
        self._sink_schema()
        rows = self.db.execute(
            f"SELECT start_ms, rev, {', '.join(SINK_VALUES)} FROM sink_hours "
            "WHERE name=? AND instrument=? AND start_ms>=? AND start_ms<?",
            (name, instrument, lo, hi),
        ).fetchall()
        return {int(r[0]): tuple(int(x) for x in r[1:]) for r in rows}

    def record_sink_hours(self, name: str, rows: Sequence[tuple[str, int, int, Sequence[int]]]) -> None:
        """Note (instrument, start, rev, SINK_VALUES) as written, after the store took them."""
        self._sink_schema()
        cols = ", ".join(SINK_VALUES)
        sets = ", ".join(f"{c}=excluded.{c}" for c in ("rev", *SINK_VALUES))
        with self.transaction() as cur:
            cur.executemany(
                f"INSERT INTO sink_hours (name, instrument, start_ms, rev, {cols}) "
                f"VALUES (?,?,?,?,{','.join('?' * len(SINK_VALUES))}) "
                f"ON CONFLICT(name, instrument, start_ms) DO UPDATE SET {sets}",
                [(name, code, start, rev, *values) for code, start, rev, values in rows],
            )

    def take_sink_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        """Take or renew the lease that lets one of the collectors sharing this ledger write ``name``'s points."""
        self._sink_schema()
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO sink_lease VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, "
                "until_ms=excluded.until_ms WHERE sink_lease.holder=excluded.holder OR sink_lease.until_ms<?",
                (name, holder, now_ms + ttl_ms, now_ms),
            )
            row = cur.execute("SELECT holder FROM sink_lease WHERE name=?", (name,)).fetchone()
        return bool(row and row[0] == holder)

    def dirty_floors(self) -> dict[str, int]:
        """Per instrument, the earliest time whose rollups wait for a refresh."""
        return {
            str(r[0]): int(r[1])
            for r in self.db.execute("SELECT instrument, MIN(from_ms) FROM rollup_dirty GROUP BY instrument")
        }

    def rollup_backlog(self) -> int:
        """How many marked ranges wait for a rollup refresh (the /metrics rollup lag)."""
        row = self.db.execute("SELECT COUNT(*) FROM rollup_dirty").fetchone()
        return int(row[0]) if row else 0

    def last_received_ms(self) -> int | None:
        """When the newest stored interval arrived (host clock), along the received index."""
        row = self.db.execute("SELECT MAX(received_ms) FROM intervals").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    # alerts: which are active, and the messages not yet delivered ----------
    def _alert_schema(self) -> None:
        if not getattr(self, "_alerts_ready", False):
            self.db.executescript(ALERT_SCHEMA)
            self._alerts_ready = True

    def active_alerts(self, limit: int = MAX_ALERTS) -> list[ActiveAlert]:
        self._alert_schema()
        return [
            ActiveAlert(str(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]))
            for r in self.db.execute(
                "SELECT key, rule, since_ms, fired_ms, subject FROM alerts ORDER BY key LIMIT ?", (limit,)
            )
        ]

    def record_alerts(
        self,
        opened: Sequence[ActiveAlert],
        closed: Sequence[str],
        messages: Sequence[tuple[str, str]],
        now_ms: int,
        keep: int,
    ) -> None:
        """One check's outcome in one transaction: alerts that fired (or were reminded of), alerts that
        cleared, and their (channel, body) messages. After a crash either all of it happened or none (and
        the next check decides again)."""
        self._alert_schema()
        with self.transaction() as cur:
            cur.executemany(
                "INSERT INTO alerts VALUES (?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET fired_ms=excluded.fired_ms",
                [tuple(a) for a in opened],
            )
            cur.executemany("DELETE FROM alerts WHERE key=?", [(k,) for k in closed])
            self._queue_alert_messages(cur, messages, now_ms, keep)

    def _queue_alert_messages(
        self, cur: Any, messages: Sequence[tuple[str, str]], now_ms: int, keep: int
    ) -> None:
        """Queue (channel, body) rows; each channel keeps at most ``keep``, the oldest go first."""
        cur.executemany(
            "INSERT INTO alert_outbox (channel, body, created_ms, attempts) VALUES (?,?,?,0)",
            [(channel, body, now_ms) for channel, body in messages],
        )
        for channel in {c for c, _ in messages}:
            cur.execute(
                "DELETE FROM alert_outbox WHERE channel=? AND id NOT IN "
                "(SELECT id FROM alert_outbox WHERE channel=? ORDER BY id DESC LIMIT ?)",
                (channel, channel, keep),
            )

    def next_alert_message(self, channel: str) -> QueuedAlert | None:
        """The oldest undelivered message of a channel: a channel delivers in order (firing before recovery)."""
        self._alert_schema()
        row = self.db.execute(
            "SELECT id, channel, body, attempts FROM alert_outbox WHERE channel=? ORDER BY id LIMIT 1",
            (channel,),
        ).fetchone()
        return QueuedAlert(int(row[0]), str(row[1]), str(row[2]), int(row[3])) if row else None

    def alert_queue(self) -> dict[str, int]:
        """Undelivered messages per channel."""
        self._alert_schema()
        return {
            str(r[0]): int(r[1])
            for r in self.db.execute("SELECT channel, COUNT(*) FROM alert_outbox GROUP BY channel")
        }

    def alert_attempted(self, id_: int) -> None:
        self.db.execute("UPDATE alert_outbox SET attempts = attempts + 1 WHERE id=?", (id_,))

    def alert_done(self, id_: int) -> None:
        """Delivered, or given up: either way never sent again."""
        self.db.execute("DELETE FROM alert_outbox WHERE id=?", (id_,))

    def drop_alert_channels(self, keep: Iterable[str]) -> int:
        """Forget the queue of channels no longer configured; returns how many messages went."""
        self._alert_schema()
        names = sorted(set(keep))
        marks = ",".join("?" * len(names)) or "''"
        cur = self.db.execute(f"DELETE FROM alert_outbox WHERE channel NOT IN ({marks})", names)
        return max(0, int(cur.rowcount or 0))


def _chain_of(agent: object, instrument: object, topic: str, payload: bytes) -> tuple[str | None, str | None]:
    """(chain, body sha) of a stored rejection, from its own body; no chain unless the body names the row's
    agent and instrument and the topic's kind."""
    try:
        env = open_envelope(payload)
    except WireError:
        return None, None
    raw = raw_body(env.body)
    kind = topic.rsplit("/", 1)[-1]
    if raw is None or raw.get("agent") != agent or raw.get("instrument") != instrument:
        return None, body_hash(env.body)
    if kind == "interval" and raw.get("kind", "interval") == "interval":
        return str(instrument), body_hash(env.body)
    if kind == "signin" and raw.get("kind") == "signin":
        return signin_chain(str(instrument)), body_hash(env.body)
    return None, body_hash(env.body)


SINK_VALUES = ("run_ms", "standby_ms", "off_ms", "unknown_ms", "unverified_ms", "effective_ms")
SINK_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sink_hours (
    name TEXT NOT NULL, instrument TEXT NOT NULL, start_ms INTEGER NOT NULL, rev INTEGER NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL" for c in SINK_VALUES)},
    PRIMARY KEY (name, instrument, start_ms)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until_ms INTEGER NOT NULL);
"""

ALERT_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    key TEXT PRIMARY KEY, rule TEXT NOT NULL, since_ms INTEGER NOT NULL, fired_ms INTEGER NOT NULL,
    subject TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alert_outbox (
    id INTEGER PRIMARY KEY, channel TEXT NOT NULL, body TEXT NOT NULL, created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS alert_outbox_channel ON alert_outbox (channel, id);
"""


class ActiveAlert(NamedTuple):
    """An alert that fired and has not recovered; ``subject`` is its JSON (what the recovery names)."""

    key: str
    rule: str
    since_ms: int
    fired_ms: int
    subject: str


class QueuedAlert(NamedTuple):
    id: int
    channel: str
    body: str
    attempts: int
