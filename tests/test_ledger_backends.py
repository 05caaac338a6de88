"""The ledger keeps the same promises on SQLite and PostgreSQL: idempotent storing, conflicts kept beside
the original, duplicates of service records and sign-ins skipped, the linked flag, the sink's cursor."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from labmeter.collector.ledger import Ledger, LedgerError, Rejection, StoredInterval
from tests.lab import closed_port

H = 3_600_000
T0 = 1_772_409_600_000  # 2026-03-02T00:00:00Z


def iv(
    seq: int, start: int, end: int, state: str = "RUNNING", prev: str | None = None, body: str = ""
) -> StoredInterval:
    sha = hashlib.sha256(f"{seq}{body}".encode()).hexdigest()
    if prev is None:
        prev = "0" * 64 if seq == 1 else hashlib.sha256(f"{seq - 1}".encode()).hexdigest()
    return StoredInterval("a1", "XRD", seq, start, end, state, prev, sha, 0, f"env{seq}{body}".encode())


def test_storing_is_idempotent_and_conflicts_are_kept(any_ledger: Ledger) -> None:
    ledger = any_ledger
    ledger.add_agent("a1", "ed25519:x", "kid", ["XRD"])
    first = [(iv(1, T0, T0 + H), None), (iv(2, T0 + H, T0 + 2 * H), None)]
    assert ledger.store(first, []) == []
    assert ledger.store(first, []) == []  # the same bodies again: nothing new, no conflict
    conflicts = ledger.store([(iv(2, T0 + H, T0 + 2 * H, "OFF", body="forged"), None)], [])
    assert [c.seq for c in conflicts] == [2]
    rows = ledger.intervals_between(T0, T0 + 2 * H, "XRD")
    assert [(r[2], r[5], r[6]) for r in rows] == [(1, "RUNNING", 1), (2, "RUNNING", 1)]
    count = ledger.db.execute("SELECT COUNT(*) FROM rejections WHERE reason LIKE 'conflict%'").fetchone()[0]
    assert count == 1
    ledger.store([], [Rejection("bad signature", "t", b"p", "a1", "XRD", 7, True, "s")])
    assert ledger.handled_seqs("a1", "XRD") == [(1, True), (2, False), (7, False)]
    assert ledger.handled_seqs("a1", "XRD", above=1) == [(2, False), (7, False)]


def test_linked_flag_and_long_intervals(any_ledger: Ledger) -> None:
    ledger = any_ledger
    ledger.store(
        [
            (iv(1, T0, T0 + 5 * H, "OFF"), None),
            (iv(2, T0 + 5 * H, T0 + 6 * H, prev="f" * 64), None),  # does not link to seq 1
            (iv(3, T0 + 6 * H, T0 + 7 * H), None),  # links to seq 2
            (iv(T0, T0 + 8 * H, T0 + 9 * H, prev="0" * 64), None),  # a new chain after lost state
        ],
        [],
    )
    rows = ledger.intervals_between(T0 + 4 * H, T0 + 10 * H)  # seq 1 started 4 h before the period
    assert [(r[2], r[6]) for r in rows] == [(1, 1), (2, 0), (3, 1), (T0, 1)]
    assert ledger.handled_seqs("a1", "XRD", above=2) == [(3, False), (T0, True)]
    assert ledger.longest_interval_ms() == 5 * H


def test_service_records_signins_and_sink_cursor(any_ledger: Ledger) -> None:
    ledger = any_ledger
    rec: dict[str, Any] = {
        "instrument": "XRD",
        "start_ms": T0,
        "end_ms": T0 + H,
        "service_type": 130,
        "applicant": "li",
    }
    assert ledger.add_service_records([rec]) == 1
    assert ledger.add_service_records([rec, {**rec, "applicant": "wang"}]) == 1
    assert ledger.service_windows(T0, T0 + 2 * H) == {"XRD": [(T0, T0 + H, True), (T0, T0 + H, True)]}
    signin = ("a1", "XRD", 1, T0 + 60_000, "u:4f2a", "sha", b"env")
    ledger.store_signins([signin])
    ledger.store_signins([signin])
    assert ledger.recent_signins("XRD") == [(T0 + 60_000, "u:4f2a")]
    assert ledger.sink_cursor("influxdb") == 0
    ledger.set_sink_cursor("influxdb", 5)
    ledger.set_sink_cursor("influxdb", 9)
    assert ledger.sink_cursor("influxdb") == 9


def test_unknown_ledger_url_is_refused(tmp_path: Any) -> None:
    with pytest.raises(LedgerError, match="mysql://x"):
        Ledger.open("mysql://x", tmp_path)
    with (
        closed_port() as port,
        pytest.raises(LedgerError, match=rf"postgresql://u:\*\*\*@127.0.0.1:{port}/db") as exc,
    ):
        Ledger.open(f"postgresql://u:secret@127.0.0.1:{port}/db", tmp_path)
    assert "secret" not in str(exc.value)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")
def test_postgresql_over_tls_with_a_password_file(tmp_path: Path) -> None:
    """TLS with the server's certificate checked against our CA, the password in a libpq password file
    (not in the config), and the URL in messages without any password."""
    from tests.certs import certificates
    from tests.postgres import PASSWORD, USER, PostgresServer

    certificates(tmp_path)
    server = PostgresServer().start(tls=tmp_path)
    try:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{server.port}:*:{USER}:{PASSWORD}\n")
        passfile.chmod(0o600)
        base = f"postgresql://{USER}@127.0.0.1:{server.port}/postgres"
        good = f"{base}?sslmode=verify-full&sslrootcert={tmp_path / 'ca.pem'}&passfile={passfile}"
        ledger = Ledger.open(good, tmp_path)
        assert ledger.db.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        ledger.close()
        with pytest.raises(LedgerError, match="certificate"):  # a server our CA did not sign
            Ledger.open(
                f"{base}?sslmode=verify-full&sslrootcert={tmp_path / 'server.pem'}&passfile={passfile}",
                tmp_path,
            )
        with pytest.raises(LedgerError, match=r"rejects connection|no pg_hba.conf entry|SSL off"):
            Ledger.open(f"{base}?sslmode=disable&passfile={passfile}", tmp_path)  # plain text is refused
        wrong = f"postgresql://{USER}:not-it@127.0.0.1:{server.port}/postgres?sslmode=require"
        with pytest.raises(LedgerError, match="password authentication failed") as exc:
            Ledger.open(wrong, tmp_path)
        assert "not-it" not in str(exc.value)
    finally:
        server.stop()


def test_background_refresh_gives_way_to_another_collector(postgres: Any, tmp_path: Path) -> None:
    """On a shared PostgreSQL ledger one collector refreshes rollups at a time; the other's background
    refresh gives up at once instead of stalling its ingest, and a report waits for its turn."""
    from labmeter.collector.ledger.rollup import Rollups
    from labmeter.config import PolicyConfig

    url = postgres.new_database()
    a, b = Ledger.open(url, tmp_path), Ledger.open(url, tmp_path)
    try:
        a.store([(iv(1, T0, T0 + H), None)], [])
        with a.transaction(exclusive=True):
            assert Rollups(b, PolicyConfig()).refresh(wait=False) == 0
            assert b.db.execute("SELECT COUNT(*) FROM rollup_dirty").fetchone()[0] >= 1
        assert Rollups(b, PolicyConfig()).refresh(wait=False) >= 1
        assert Rollups(b, PolicyConfig()).hours(T0, T0 + H)["XRD"].run_ms == H
    finally:
        a.close()
        b.close()


def test_a_large_batch_keeps_the_same_promises(any_ledger: Ledger) -> None:
    """Batches the size of ingest's (PostgreSQL stores them through COPY): duplicates are no-ops, a different
    body for a stored seq is one conflict, and nothing else is lost."""
    ledger = any_ledger
    batch = [(iv(n, T0 + n * 60_000, T0 + (n + 1) * 60_000), None) for n in range(1, 301)]
    assert ledger.store(batch, []) == []
    assert ledger.store(batch, []) == []
    forged = iv(150, T0 + 150 * 60_000, T0 + 151 * 60_000, "OFF", body="forged")
    more = [(iv(n, T0 + n * 60_000, T0 + (n + 1) * 60_000), None) for n in range(301, 400)]
    conflicts = ledger.store([*batch[:100], (forged, None), *more], [])
    assert [c.seq for c in conflicts] == [150]
    assert [seq for seq, _ in ledger.handled_seqs("a1", "XRD")] == list(range(1, 400))
    assert ledger.db.execute("SELECT state FROM intervals WHERE seq = 150").fetchone()[0] == "RUNNING"


def test_unauthenticated_rejections_are_counted_under_a_cap(any_ledger: Ledger) -> None:
    """A flood of rejections nobody signed adds counts, not rows: at most REJECTION_KEYS rows per window,
    texts cut short; authentic rejections are kept whole, each body once however often it is replayed."""
    from labmeter.collector.ledger import REJECTION_KEYS, REJECTION_OTHER, REJECTION_TEXT

    ledger = any_ledger
    flood = [
        Rejection(f"unknown agent 'g{i}'" + "x" * 500, f"labmeter/v1/g{i}/I/interval", b"p" * 8000)
        for i in range(3 * REJECTION_KEYS)
    ]
    for part in (flood[:50], flood[50:], flood[:10]):
        ledger.store([], part)
    rows = ledger.db.execute("SELECT reason, topic, n FROM rejection_counts").fetchall()
    assert len(rows) == REJECTION_KEYS
    assert sum(n for _, _, n in rows) == len(flood) + 10
    assert all(len(r) <= REJECTION_TEXT and len(t) <= REJECTION_TEXT for r, t, _ in rows)
    other = [n for r, t, n in rows if (r, t) == REJECTION_OTHER]
    assert other == [len(flood) - (REJECTION_KEYS - 1)]
    assert ledger.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0

    genuine = Rejection(
        "state 'X' is not one of",
        "labmeter/v1/a1/XRD/interval",
        b"env",
        "a1",
        "XRD",
        5,
        True,
        "sha5",
        False,
        "XRD",
    )
    for _ in range(3):
        ledger.store([], [genuine])
    assert ledger.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 1
    assert ledger.handled_seqs("a1", "XRD") == [(5, False)]
    assert ledger.handled_seqs("a1", "XRD@signin") == []
    summary = ledger.rejection_summary()
    assert summary[0][2] == other[0] and summary[0][3] is False
    assert ("state 'X' is not one of", "labmeter/v1/a1/XRD/interval", 1, True) in summary


OLD_REJECTIONS = """
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, agent TEXT, instrument TEXT, seq INTEGER,
    authentic INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_ledger_from_before_is_migrated(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """An existing ledger's authentic rejections keep counting for their own chain; the rows an older
    collector took as authentic for a replay on another instrument's topic stop counting for it."""
    from labmeter import signing, wire

    key = signing.generate_key_file(tmp_path / "a1.key")
    kid = signing.key_id(key.public_key())

    def env(code: str, seq: int, prev: str = "f" * 64) -> bytes:
        return wire.seal(
            key, kid, wire.dump_body(wire.Interval("a1", code, seq, prev, T0, T0 + H, "BOGUS").body())
        )

    rows = [
        (T0, "a1", "XRD", 3, 1, "state 'BOGUS'", "labmeter/v1/a1/XRD/interval", env("XRD", 3)),
        (T0, "a1", "XRD", 3, 1, "state 'BOGUS'", "labmeter/v1/a1/XRD/interval", env("XRD", 3)),  # twice
        (
            T0,
            "a1",
            "XRD",
            10**12,
            1,
            "replayed",
            "labmeter/v1/a1/XRD/interval",
            env("HPLC", 10**12, "0" * 64),
        ),
        (T0, "ghost", "XRD", 4, 0, "unknown agent", "labmeter/v1/ghost/XRD/interval", b"junk"),
    ]
    insert = "INSERT INTO rejections (at_ms, agent, instrument, seq, authentic, reason, topic, payload) VALUES (?,?,?,?,?,?,?,?)"
    if backend == "sqlite":
        import sqlite3

        path = tmp_path / "ledger.sqlite"
        db = sqlite3.connect(path)
        db.execute(OLD_REJECTIONS)
        db.executemany(insert, rows)
        db.commit()
        db.close()
        ledger = Ledger(path)
    else:
        from labmeter.collector.ledger import pg

        url = request.getfixturevalue("postgres").new_database()
        old = pg.Database(url)
        for stmt in pg.schema(OLD_REJECTIONS):
            old.execute(stmt)
        old.executemany(insert, rows)
        old.close()
        ledger = Ledger.open(url, tmp_path)
    try:
        assert ledger.handled_seqs("a1", "XRD") == [(3, False)]
        assert ledger.handled_seqs("a1", "HPLC") == []  # nor for the chain it came from: a replay is no link
        assert ledger.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 4  # nothing deleted
        again = Ledger.open(url, tmp_path) if backend == "postgresql" else Ledger(tmp_path / "ledger.sqlite")
        again.close()  # a second start finds the ledger migrated
        ledger.store(
            [],
            [
                Rejection(
                    "state 'BOGUS'",
                    "labmeter/v1/a1/XRD/interval",
                    env("XRD", 3),
                    "a1",
                    "XRD",
                    3,
                    True,
                    wire.body_hash(wire.open_envelope(env("XRD", 3)).body),
                    False,
                    "XRD",
                )
            ],
        )
        assert (
            ledger.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 4
        )  # the same body: kept once
    finally:
        ledger.close()
