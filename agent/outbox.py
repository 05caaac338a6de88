"""The agent's durable state: chain heads, outbox, dead letters and open-interval checkpoints.

A row leaves the outbox only when the collector acknowledges it after its ledger
commit. Emitting an interval, advancing the chain and moving the checkpoint happen
in one transaction, so a crash at any point neither loses nor duplicates a link.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from labmeter import signing, statefile, wire
from labmeter.agent.timeline import Span
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
    instrument TEXT PRIMARY KEY, start_ms INTEGER NOT NULL, state TEXT NOT NULL, at_ms INTEGER NOT NULL,
    clock_step_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
SQLITE_FULL = 13


class DiskFull(OSError):
    """The state directory's file system is full: nothing was written, the caller keeps what it had."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"disk full: {path}")
        self.path = path


def _is_disk_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(exc)


@dataclass(frozen=True)
class Pending:
    id: int
    instrument: str
    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Checkpoint:
    """The open interval as last saved; ``clock_step_ms``: a wall-clock step it carries (see Timeline)."""

    start_ms: int
    state: State
    at_ms: int
    clock_step_ms: int = 0


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
        try:
            self.db = statefile.connect(path, RESET_FIX, self._setup)
        except sqlite3.OperationalError as exc:
            if _is_disk_full(exc):
                raise DiskFull(path) from None
            raise

    @staticmethod
    def _setup(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a row is on disk before it is sent, a chain head before it moves
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)

        def columns(table: str) -> set[str]:
            return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}

        # a state directory from before chains started at the clock: its chains began at 1
        if "first" not in columns("chain"):
            db.execute("ALTER TABLE chain ADD COLUMN first INTEGER NOT NULL DEFAULT 1")
        if "clock_step_ms" not in columns("checkpoint"):
            db.execute("ALTER TABLE checkpoint ADD COLUMN clock_step_ms INTEGER NOT NULL DEFAULT 0")

    @contextlib.contextmanager
    def _transaction(self, immediate: bool = True) -> Iterator[sqlite3.Cursor]:
        """One write transaction: committed whole or rolled back whole; a full disk is :class:`DiskFull`.

        SQLite may already have rolled back by itself (it does on SQLITE_FULL), so the
        rollback is only asked for while a transaction is still open.
        """
        cur = self.db.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield cur
            cur.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _is_disk_full(exc):
                raise DiskFull(self.path) from None
            raise

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
    ) -> list[Pending]:
        """Sign ``spans`` as the next links of the chain and queue them, in one transaction."""
        out: list[Pending] = []
        now = time.time()
        with self._transaction() as cur:
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
                    span.clock_step_ms,
                    span.energy_wh,
                )
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
        return out

    def emit_signin(self, signer: Signer, instrument: str, at_ms: int, user: str) -> Pending:
        """Queue a signed sign-in as the next link of the instrument's sign-in chain."""
        key = wire.signin_chain(instrument)
        with self._transaction() as cur:
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
            "INSERT OR REPLACE INTO checkpoint (instrument, start_ms, state, at_ms, clock_step_ms) VALUES (?,?,?,?,?)",
            (instrument, cp.start_ms, cp.state.value, cp.at_ms, cp.clock_step_ms),
        )

    def checkpoint(self, items: dict[str, Checkpoint]) -> None:
        with self._transaction(immediate=False) as cur:
            for instrument, cp in items.items():
                self._checkpoint(cur, instrument, cp)

    def load_checkpoint(self, instrument: str) -> Checkpoint | None:
        row = self.db.execute(
            "SELECT start_ms, state, at_ms, clock_step_ms FROM checkpoint WHERE instrument=?", (instrument,)
        ).fetchone()
        return Checkpoint(row[0], State(row[1]), row[2], row[3]) if row else None

    def unsent(self, resend_before: float, limit: int = 1000) -> list[Pending]:
        """Rows never sent, or sent before ``resend_before`` and still unacknowledged, oldest first."""
        rows = self.db.execute(
            "SELECT id, instrument, seq, topic, payload FROM outbox WHERE sent_at < ? ORDER BY id LIMIT ?",
            (resend_before, limit),
        ).fetchall()
        return [Pending(*r) for r in rows]

    def mark_sent(self, ids: list[int], at: float) -> None:
        """One transaction for the whole batch: one fsync, not one per row."""
        if ids:
            with self._transaction(immediate=False) as cur:
                cur.executemany("UPDATE outbox SET sent_at=? WHERE id=?", [(at, i) for i in ids])

    def outstanding(self, resend_before: float) -> int:
        """Rows sent since ``resend_before`` and not acknowledged yet: what is on its way to the collector."""
        return int(
            self.db.execute("SELECT count(*) FROM outbox WHERE sent_at >= ?", (resend_before,)).fetchone()[0]
        )

    def mark_all_unsent(self) -> None:
        """After a reconnect everything unacknowledged goes out again, oldest first."""
        with self._transaction(immediate=False) as cur:
            cur.execute("UPDATE outbox SET sent_at=0")

    def ack(self, instrument: str, upto: int) -> int:
        with self._transaction(immediate=False) as cur:
            return cur.execute(
                "DELETE FROM outbox WHERE instrument=? AND seq<=?", (instrument, upto)
            ).rowcount

    def reject(self, instrument: str, seq: int, body_sha: str, reason: str) -> bool:
        """Move a rejected row to the dead letters, if it is ours (same body hash)."""
        with self._transaction() as cur:
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
        return row is not None

    def rechain(self, signer: Signer, chain: str, seq: int, body_sha: str) -> list[Pending]:
        """Our link ``seq`` is taken in the ledger by another body: sign it and what follows again as a new chain.

        Another body at our seq means this state directory is not the only one that wrote the
        chain: it was restored from a backup, cloned to a second agent, or (with an old
        chain origin) lost. A new chain above the ledger's head (``wire.chain_origin``, prev =
        GENESIS) takes the conflicting link and every later pending link of the same chain,
        bodies unchanged but seq and prev, so no measured interval is lost. Leading "agent_down"
        intervals are left out: the other copy was running then. A conflict for a link of an
        older chain (the chain was begun again already) appends it to the current one.
        Returns the new rows; nothing when the reject is not for a row of ours.
        """
        with self._transaction() as cur:
            hit = cur.execute(
                "SELECT id FROM outbox WHERE instrument=? AND seq=? AND body_sha=?", (chain, seq, body_sha)
            ).fetchone()
            head = cur.execute("SELECT seq, hash, first FROM chain WHERE instrument=?", (chain,)).fetchone()
            if hit is None or head is None:
                return []
            head_seq, prev, first = head
            if seq >= first:  # a link of the current chain: begin a new one
                moved = cur.execute(
                    "SELECT id, topic, payload, created_at FROM outbox WHERE instrument=? AND seq>=? ORDER BY seq",
                    (chain, seq),
                ).fetchall()
                new_first = max(wire.chain_origin(int(time.time() * 1000)), head_seq + 1)
                next_seq, prev = new_first, wire.GENESIS
                moved = self._without_recovery(cur, moved)
            else:
                moved = cur.execute(
                    "SELECT id, topic, payload, created_at FROM outbox WHERE id=?", (hit[0],)
                ).fetchall()
                new_first, next_seq = first, head_seq + 1
            out: list[Pending] = []
            for row_id, topic, payload, created_at in moved:
                text = wire.open_envelope(payload).body
                body = wire.relink(text, next_seq, prev)
                prev = wire.body_hash(body)
                sealed = wire.seal(signer.key, signer.kid, body)
                cur.execute("DELETE FROM outbox WHERE id=?", (row_id,))
                cur.execute(
                    "INSERT INTO outbox (instrument, seq, topic, payload, body_sha, created_at) VALUES (?,?,?,?,?,?)",
                    (chain, next_seq, topic, sealed, prev, created_at),  # created_at marks an emit's rows
                )
                out.append(Pending(cur.lastrowid or 0, chain, next_seq, topic, sealed))
                next_seq += 1
            # with every moved link left out, the chain's next link begins the new chain (prev = GENESIS)
            cur.execute(
                "UPDATE chain SET seq=?, hash=?, first=? WHERE instrument=?",
                (next_seq - 1, prev, new_first, chain),
            )
        return out

    @staticmethod
    def _without_recovery(
        cur: sqlite3.Cursor, moved: list[tuple[int, str, bytes, float]]
    ) -> list[tuple[int, str, bytes, float]]:
        """Drop the start-up recovery at the head of ``moved`` (deleting its rows), when that is where the conflict is.

        A restored or cloned copy closes the open interval of its old checkpoint and calls the
        time since then UNKNOWN ("agent_down"), in one emit. The other copy was running then
        and its intervals for that time are in the ledger: an UNKNOWN claim over them would
        hide measured hours, so this copy's chain begins with what it measured itself.
        """
        if not moved:
            return moved
        batch = [r for r in moved if r[3] == moved[0][3]]
        notes = [wire.load_body(wire.open_envelope(r[2]).body).get("note") for r in batch]
        if wire.NOTE_AGENT_DOWN not in notes:
            return moved
        for r in batch:
            cur.execute("DELETE FROM outbox WHERE id=?", (r[0],))
        return moved[len(batch) :]

    def resend_dead(self) -> int:
        """Put dead letters back in the outbox (after the cause, e.g. an unregistered agent, is fixed)."""
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO outbox (instrument, seq, topic, payload, body_sha, created_at) "
                "SELECT instrument, seq, topic, payload, body_sha, at FROM dead ORDER BY instrument, seq"
            )
            return cur.execute("DELETE FROM dead").rowcount

    def gone(self) -> dict[str, tuple[int, int]]:
        """Per chain, (where the current chain began, the seq at and below which this state holds nothing).

        What lies at or below that seq was acknowledged and deleted, or re-sent under new seqs: this
        agent will never send it again. The signed status says so (``wire.AgentStatus.gone``), so a
        collector whose ledger lost those links (restored from an older backup) can stop waiting.
        Dead letters count as held: ``agent resend`` may still send them.
        """
        rows = self.db.execute(
            "SELECT c.instrument, c.first, c.seq, (SELECT MIN(seq) FROM (SELECT seq FROM outbox "
            "WHERE instrument=c.instrument UNION ALL SELECT seq FROM dead WHERE instrument=c.instrument)) "
            "FROM chain c ORDER BY c.instrument"
        ).fetchall()
        return {chain: (first, head if held is None else held - 1) for chain, first, head, held in rows}

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

    def ack_matching(self, chain: str, seq: int, body_sha: str) -> int | None:
        """Delete a chain's rows up to ``seq`` if the collector's ack is about our own body there.

        Our row at ``seq`` (pending or dead) must hash to ``body_sha``; with no row there, ``seq`` must be
        one this state has already written (its row was acknowledged before). Anything else, such as an
        ack recorded earlier and replayed after the state was restored from a backup, deletes nothing
        and gives None.
        """
        with self._transaction() as cur:
            shas = {
                r[0]
                for r in cur.execute(
                    "SELECT body_sha FROM outbox WHERE instrument=? AND seq=? "
                    "UNION SELECT body_sha FROM dead WHERE instrument=? AND seq=?",
                    (chain, seq, chain, seq),
                )
            }
            head = cur.execute("SELECT seq FROM chain WHERE instrument=?", (chain,)).fetchone()
            ours = body_sha in shas if shas else head is not None and seq <= head[0]
            n = None
            if ours:
                n = cur.execute("DELETE FROM outbox WHERE instrument=? AND seq<=?", (chain, seq)).rowcount
        return n

    def next_connection(self, now_ms: int) -> int:
        """A number for the next broker connection, above every earlier one even if the clock went back."""
        with self._transaction() as cur:
            row = cur.execute("SELECT value FROM meta WHERE name='conn'").fetchone()
            conn = max(now_ms, (row[0] if row else 0) + 1)
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('conn', ?)", (conn,))
        return conn
