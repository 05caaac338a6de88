"""SQLite state files (the agent's outbox, the collector's ledger) opened without ever replacing one.

SQLite treats an empty file as a new database and reads a damaged one until it trips
over the bad page, so a lost outbox or ledger could go unnoticed. Here a file that does
not exist is new; one that exists must be a whole, readable SQLite database, or opening
it stops with the file, what is wrong and what to do. Only an explicit command
(:func:`move_aside`, behind ``agent reset-state`` / ``collector reset-ledger``) lets a
fresh file take a damaged one's place, and it keeps the old one beside it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

MAGIC = b"SQLite format 3\x00"
HEADER_BYTES = 100
SIDE_FILES = ("-wal", "-shm", "-journal")  # belong to the database beside them: they move with it


class StateFileError(Exception):
    """A state file that exists but cannot be used as it is; the message names the file and the fix."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}; {fix.format(config='CONFIG')}")
        self.path = path
        self.problem = problem
        self.fix = fix

    def message(self, config: Path | str) -> str:
        """The one-line error with the fix's ``{config}`` filled in (the CLI knows the config file)."""
        return f"{self.path}: {self.problem}; {self.fix.format(config=config)}"


def header_problem(path: Path) -> str | None:
    """What is wrong with the file's shape (empty, not SQLite, shorter than its header says), or None.

    Only what can be told from the first 100 bytes and the size; pages are SQLite's to check.
    """
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        return f"not an SQLite database ({size} bytes, no SQLite header)"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"damaged SQLite header (page size {page_size})"
    pages = int.from_bytes(head[28:32], "big")
    counter_ok = head[24:28] == head[92:96]
    wal = path.with_name(path.name + "-wal")
    wal_pending = wal.exists() and wal.stat().st_size > 0  # pages may still live only in the WAL
    if pages and counter_ok and not wal_pending and size < pages * page_size:
        return f"truncated: {size} bytes where its header says {pages} pages of {page_size} bytes"
    return None


def check(db: sqlite3.Connection, full: bool = True, limit: int = 5) -> list[str]:
    """Problems found by ``PRAGMA integrity_check`` (``full``) or ``quick_check``; empty when sound.

    quick_check reads every page and checks its structure and the records in it (O(N)); the full
    check also compares each index with its table and checks UNIQUE constraints (O(N log N)).
    Neither sees bytes changed inside a value: SQLite keeps no page checksums (envelopes are signed,
    so ``labmeter verify`` does see those).
    """
    pragma = "integrity_check" if full else "quick_check"
    rows = [str(r[0]) for r in db.execute(f"PRAGMA {pragma}({int(limit)})")]
    # one row may hold several lines ("*** in database main ***\nPage 185: ..."): one problem each,
    # so the error stays the one line a user reads
    return [] if rows == ["ok"] else [line.strip() for r in rows for line in r.splitlines() if line.strip()]


def connect(
    path: Path,
    fix: str,
    setup: Callable[[sqlite3.Connection], None],
    quick_check: bool = True,
    timeout: float = 5.0,
) -> sqlite3.Connection:
    """Open ``path`` (created if it does not exist), run ``setup`` on it, and check it unless told not to.

    Raises StateFileError, with ``fix`` as the advice, for a file that is there but empty, cut short,
    not SQLite, structurally damaged or unreadable.
    """
    new = not path.exists()
    if not new:
        try:
            problem = header_problem(path)
        except OSError as exc:
            raise StateFileError(
                path, f"cannot be read ({exc.strerror or exc})", "check its owner and mode"
            ) from None
        if problem:
            raise StateFileError(path, problem, fix)
    path.parent.mkdir(parents=True, exist_ok=True)
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
        if quick_check and not new:  # before setup writes anything into it
            found = check(db, full=False)
            if found:
                raise StateFileError(path, f"damaged ({'; '.join(found)[:300]})", fix)
        setup(db)
    except sqlite3.DatabaseError as exc:
        if db is not None:
            db.close()
        if isinstance(exc, sqlite3.OperationalError) and (
            getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)
        ):
            raise  # a full disk is not a damaged file: the caller waits for space (agent.outbox.DiskFull)
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            raise StateFileError(
                path, "locked by another process", "stop it, or wait and try again"
            ) from None
        if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
            raise StateFileError(
                path, f"cannot be opened ({exc})", "check the folder, owner and mode"
            ) from None
        raise StateFileError(path, f"damaged ({exc})", fix) from None
    except StateFileError:
        if db is not None:
            db.close()
        raise
    return db


def in_use(path: Path) -> bool:
    """Whether another process has the database open: every SQLite connection to a WAL database
    holds a shared lock on the "DMS" byte (offset 128) of its -shm file while it is open."""
    import fcntl

    shm = path.with_name(path.name + "-shm")
    try:
        fd = os.open(shm, os.O_RDWR)
    except OSError:  # none (nobody has it open), or not ours to open: moving the file then fails, clearly
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 128)
        return False
    finally:
        os.close(fd)


def move_aside(path: Path, now: float | None = None) -> Path:
    """Rename ``path`` and its WAL/SHM/journal to ``<name>.damaged-<UTC time>``; returns the new name.

    The side files go too: a WAL left behind would be replayed into the new database.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    path.rename(target)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target
