"""The agent's durable state: chain heads, outbox, dead letters and open-interval checkpoints.

A row leaves the outbox only when the collector acknowledges it after its ledger
commit. Emitting an interval, advancing the chain and moving the checkpoint happen
in one transaction, so a crash at any point neither loses nor duplicates a link.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from labmeter.agent.timeline import Span

from labmeter import signing, statefile, wire
from labmeter.wire import State

SCHEMA = """
CREATE TABLE IF NOT EXISTS chain (
    instrument TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL, first INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, instrument TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, body_sha TEXT NOT NULL, created_at REAL NOT NULL, sent_at REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS outbox_seq ON outbox (instrument, seq);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY, instrument TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, body_sha TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint (
    instrument TEXT PRIMARY KEY, start_ms INTEGER NOT NULL, state TEXT NOT NULL, at_ms INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Pending:
    id: int
    instrument: str
    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Checkpoint:
    start_ms: int
    state: State
    at_ms: int


@dataclass(frozen=True)
class Signer:
    agent: str
    key: signing.PrivateKey
    kid: str


RESET_FIX = (
    "restore it from a backup (docs/deploy.md), or run `labmeter agent reset-state --config {config}` "
    "to move it aside and start new chains"
)


class AgentStore:
    def __init__(self, path: Path) -> None:
        """Open the state file, creating it only if it does not exist; an existing one that is empty,
        cut short or damaged (quick_check, at every start: the file is small) raises StateFileError."""
        self.path = path
        self.db = statefile.connect(path, RESET_FIX, self._setup)

    @staticmethod
    def _setup(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a row is on disk before it is sent, a chain head before it moves
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        columns = {r[1] for r in db.execute("PRAGMA table_info(chain)")}
        # a state directory from before chains started at the clock: its chains began at 1
        if "first" not in columns:
            db.execute("ALTER TABLE chain ADD COLUMN first INTEGER NOT NULL DEFAULT 1")

    def close(self) -> None:
        self.db.close()

    def check(self, full: bool = True) -> list[str]:
        """``PRAGMA integrity_check`` (or quick_check) problems; empty when the file is sound."""
        return statefile.check(self.db, full)

    def emit(
        self,
        signer: Signer,
        instrument: str,
        spans: Iterable[Span],
        checkpoint: Checkpoint | None,
        clock_step_ms: int = 0,
    ) -> list[Pending]:
        """Sign ``spans`` as the next links of the chain and queue them, in one transaction."""
        out: list[Pending] = []
        now = time.time()
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            row = cur.execute("SELECT seq, hash FROM chain WHERE instrument=?", (instrument,)).fetchone()
            seq, prev = (row[0], row[1]) if row else (wire.chain_origin(int(now * 1000)) - 1, wire.GENESIS)
            topic = wire.interval_topic(signer.agent, instrument)
            for span in spans:
                seq += 1
                iv = wire.Interval(
                    signer.agent,
                    instrument,
                    seq,
                    prev,
                    span.start,
                    span.end,
                    span.state.value,
                    span.note,
                    clock_step_ms,
                )
                clock_step_ms = 0
                body = wire.dump_body(iv.body())
                prev = wire.body_hash(body)
                payload = wire.seal(signer.key, signer.kid, body)
                cur.execute(
                    "INSERT INTO outbox (instrument, seq, topic, payload, body_sha, created_at) VALUES (?,?,?,?,?,?)",
                    (instrument, seq, topic, payload, prev, now),
                )
                out.append(Pending(cur.lastrowid or 0, instrument, seq, topic, payload))
            if out:
                self._advance(cur, instrument, out[0].seq, seq, prev)
            if checkpoint is not None:
                self._checkpoint(cur, instrument, checkpoint)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return out

    def emit_signin(self, signer: Signer, instrument: str, at_ms: int, user: str) -> Pending:
        """Queue a signed sign-in as the next link of the instrument's sign-in chain."""
        key = wire.signin_chain(instrument)
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            row = cur.execute("SELECT seq, hash FROM chain WHERE instrument=?", (key,)).fetchone()
            seq, prev = (
                (row[0] + 1, row[1]) if row else (wire.chain_origin(int(time.time() * 1000)), wire.GENESIS)
            )
            body = wire.dump_body(wire.SignIn(signer.agent, instrument, seq, prev, at_ms, user).body())
            sha = wire.body_hash(body)
            topic = wire.signin_topic(signer.agent, instrument)
            payload = wire.seal(signer.key, signer.kid, body)
            cur.execute(
                "INSERT INTO outbox (instrument, seq, topic, payload, body_sha, created_at) VALUES (?,?,?,?,?,?)",
                (key, seq, topic, payload, sha, time.time()),
            )
            self._advance(cur, key, seq, seq, sha)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return Pending(cur.lastrowid or 0, key, seq, topic, payload)

    @staticmethod
    def _advance(cur: sqlite3.Cursor, chain: str, first: int, seq: int, head: str) -> None:
        """Move a chain's head; ``first`` is kept only by a new chain's row (where it began, for status)."""
        cur.execute(
            "INSERT INTO chain (instrument, seq, hash, first) VALUES (?,?,?,?) "
            "ON CONFLICT(instrument) DO UPDATE SET seq=excluded.seq, hash=excluded.hash",
            (chain, seq, head, first),
        )

    @staticmethod
    def _checkpoint(cur: sqlite3.Cursor, instrument: str, cp: Checkpoint) -> None:
        cur.execute(
            "INSERT OR REPLACE INTO checkpoint VALUES (?,?,?,?)",
            (instrument, cp.start_ms, cp.state.value, cp.at_ms),
        )

    def checkpoint(self, items: dict[str, Checkpoint]) -> None:
        cur = self.db.cursor()
        cur.execute("BEGIN")
        for instrument, cp in items.items():
            self._checkpoint(cur, instrument, cp)
        cur.execute("COMMIT")

    def load_checkpoint(self, instrument: str) -> Checkpoint | None:
        row = self.db.execute(
            "SELECT start_ms, state, at_ms FROM checkpoint WHERE instrument=?", (instrument,)
        ).fetchone()
        return Checkpoint(row[0], State(row[1]), row[2]) if row else None

    def unsent(self, resend_before: float, limit: int = 1000) -> list[Pending]:
        """Rows never sent, or sent before ``resend_before`` and still unacknowledged, oldest first."""
        rows = self.db.execute(
            "SELECT id, instrument, seq, topic, payload FROM outbox WHERE sent_at < ? ORDER BY id LIMIT ?",
            (resend_before, limit),
        ).fetchall()
        return [Pending(*r) for r in rows]

    def mark_sent(self, ids: list[int], at: float) -> None:
        if ids:
            self.db.executemany("UPDATE outbox SET sent_at=? WHERE id=?", [(at, i) for i in ids])

    def mark_all_unsent(self) -> None:
        """After a reconnect everything unacknowledged goes out again, oldest first."""
        self.db.execute("UPDATE outbox SET sent_at=0")

    def ack(self, instrument: str, upto: int) -> int:
        cur = self.db.execute("DELETE FROM outbox WHERE instrument=? AND seq<=?", (instrument, upto))
        return cur.rowcount

    def reject(self, instrument: str, seq: int, body_sha: str, reason: str) -> bool:
        """Move a rejected row to the dead letters, if it is ours (same body hash)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        row = cur.execute(
            "SELECT id, topic, payload FROM outbox WHERE instrument=? AND seq=? AND body_sha=?",
            (instrument, seq, body_sha),
        ).fetchone()
        if row:
            cur.execute(
                "INSERT INTO dead (instrument, seq, topic, payload, body_sha, reason, at) VALUES (?,?,?,?,?,?,?)",
                (instrument, seq, row[1], row[2], body_sha, reason, time.time()),
            )
            cur.execute("DELETE FROM outbox WHERE id=?", (row[0],))
        cur.execute("COMMIT")
        return row is not None

    def resend_dead(self) -> int:
        """Put dead letters back in the outbox (after the cause, e.g. an unregistered agent, is fixed)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        cur.execute(
            "INSERT INTO outbox (instrument, seq, topic, payload, body_sha, created_at) "
            "SELECT instrument, seq, topic, payload, body_sha, at FROM dead ORDER BY instrument, seq"
        )
        n = cur.execute("DELETE FROM dead").rowcount
        cur.execute("COMMIT")
        return n

    def pending_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def summary(self) -> dict[str, object]:
        per = self.db.execute(
            "SELECT instrument, count(*), min(created_at), max(seq) FROM outbox GROUP BY instrument"
        ).fetchall()
        chain = {
            r[0]: {"seq": r[1], "first": r[2]}
            for r in self.db.execute("SELECT instrument, seq, first FROM chain")
        }
        dead = self.db.execute("SELECT instrument, seq, reason, at FROM dead ORDER BY id").fetchall()
        return {
            "chain": chain,
            "pending": {r[0]: {"count": r[1], "oldest": r[2], "max_seq": r[3]} for r in per},
            "dead": [{"instrument": r[0], "seq": r[1], "reason": r[2], "at": r[3]} for r in dead],
        }
