"""The ledger on PostgreSQL: the few things SQLite and PostgreSQL spell differently, in one place.

The ledger's SQL is written once, in the common subset of both (``ON CONFLICT``,
``CAST``, no ``INSERT OR``); this adapter turns ``?`` parameters into ``%s``, the
schema's types into PostgreSQL's, and SQLite's ``BEGIN IMMEDIATE`` into a transaction
holding an advisory lock, so that several collectors sharing one database take turns
where they must (schema creation, rollup refresh) and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

BULK_INSERT = re.compile(r"INSERT INTO (\w+) VALUES \([?,]+\) ON CONFLICT DO NOTHING")
BULK_ROWS = 50  # from this many rows, COPY pays for its extra statements
EXCLUSIVE_LOCK = 0x6C61626D  # "labm": the advisory lock for schema creation and rollup refresh


class MissingDriver(Exception):
    pass


class Busy(Exception):
    """Another collector holds the exclusive transaction."""


@lru_cache(maxsize=256)
def translate(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s").replace(" AS INTEGER)", " AS BIGINT)")


def schema(script: str) -> list[str]:
    """SQLite's schema statements as PostgreSQL statements."""
    out = []
    for stmt in script.split(";"):
        if not stmt.strip():
            continue
        stmt = stmt.replace(") WITHOUT ROWID", ")")
        stmt = stmt.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
        stmt = re.sub(r"\bINTEGER\b", "BIGINT", stmt)
        stmt = re.sub(r"\bREAL\b", "DOUBLE PRECISION", stmt)
        stmt = stmt.replace("BLOB", "BYTEA")
        out.append(stmt)
    return out


class Cursor:
    def __init__(self, cur: Any) -> None:
        self._cur = cur
        self._rowcount: int | None = None

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        self._rowcount = None
        if sql == "BEGIN IMMEDIATE":
            self._cur.execute("BEGIN")
        elif sql == "BEGIN EXCLUSIVE":
            self._cur.execute("BEGIN")
            self._cur.execute("SELECT pg_advisory_xact_lock(%s)", (EXCLUSIVE_LOCK,))
        elif sql == "BEGIN EXCLUSIVE NOWAIT":
            self._cur.execute("BEGIN")
            if not self._cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (EXCLUSIVE_LOCK,)).fetchone()[0]:
                self._cur.execute("ROLLBACK")
                raise Busy("another collector is refreshing rollups")
        else:
            self._cur.execute(translate(sql), args)
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        self._rowcount = None
        rows = list(rows)
        bulk = BULK_INSERT.fullmatch(sql)
        if bulk and len(rows) >= BULK_ROWS:
            self._copy_insert(bulk.group(1), rows)
        elif rows:
            self._cur.executemany(translate(sql), rows)
        return self

    def _copy_insert(self, table: str, rows: list[Sequence[Any]]) -> None:
        """A batch of ingest through COPY into a scratch table and one INSERT ... ON CONFLICT DO NOTHING:
        far less work for the server than a statement per row."""
        scratch = f"incoming_{table}"
        self._cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {scratch} (LIKE {table} INCLUDING DEFAULTS)")
        with self._cur.copy(f"COPY {scratch} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        self._cur.execute(f"INSERT INTO {table} SELECT * FROM {scratch} ON CONFLICT DO NOTHING")
        inserted = self._cur.rowcount
        self._cur.execute(f"TRUNCATE {scratch}")
        self._rowcount = inserted

    @property
    def description(self) -> Any:
        return self._cur.description

    @property
    def rowcount(self) -> int:
        if self._rowcount is not None:
            return self._rowcount
        return int(self._cur.rowcount)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())

    def __iter__(self) -> Any:
        return iter(self._cur)


class Database:
    """The part of sqlite3's connection the ledger uses, on a psycopg connection in autocommit mode."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise MissingDriver(
                "a postgresql:// ledger needs psycopg: pip install 'labmeter[postgresql]'"
            ) from None
        self._connect = lambda: psycopg.connect(url, autocommit=True, connect_timeout=10)
        self.conn = self._connect()

    def cursor(self) -> Cursor:
        """A cursor; after the connection broke (server restarted, database down), a new connection first,
        so a collector's ingest resumes by itself once the database is back."""
        if self.conn.broken or self.conn.closed:
            self.conn = self._connect()
        return Cursor(self.conn.cursor())

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self.cursor().execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        return self.cursor().executemany(sql, rows)

    def executescript(self, script: str) -> None:
        """Create the schema once, even when several collectors start together."""
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (EXCLUSIVE_LOCK,))
            for stmt in schema(script):
                self.conn.execute(stmt)

    def close(self) -> None:
        self.conn.close()
