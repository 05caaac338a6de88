"""One message the ledger cannot store never fails its batch; a ledger that takes no writes at all keeps
the batch for a retry and acknowledges nothing. The ledger's refusals are real: SQLite triggers that
abort an insert, as a bound the checks missed or a full disk would."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from labmeter import wire
from labmeter.collector.service import Collector, LedgerUnavailable
from tests.attack import T0, Lab, genuine_start, make_lab, process


def _chain(lab: Lab, n: int) -> list[tuple[str, bytes]]:
    out, prev = [], wire.GENESIS
    for seq in range(1, n + 1):
        payload = lab.interval(
            "agent-b", "I3", seq, prev, T0 + seq * 60_000, T0 + (seq + 1) * 60_000, "RUNNING"
        )
        out.append((wire.interval_topic("agent-b", "I3"), payload))
        prev = lab.genuine[f"I3:{seq}"][1]
    return out


def _collector(tmp_path: Path) -> tuple[Lab, Collector]:
    lab = make_lab(tmp_path)
    c = Collector(lab.cfg)
    process(c, genuine_start(lab))
    return lab, c


def test_one_message_the_ledger_refuses_is_split_off(tmp_path: Path) -> None:
    lab, c = _collector(tmp_path)
    try:
        c.ledger.db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON intervals WHEN NEW.seq = 13 "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        process(c, _chain(lab, 40))
        stored = [
            s for (s,) in c.ledger.db.execute("SELECT seq FROM intervals WHERE agent='agent-b' ORDER BY seq")
        ]
        assert stored == [s for s in range(1, 41) if s != 13]
        assert c.watermarks.upto[("agent-b", "I3")] == 12  # the refused one is not acknowledged: it is resent
        reasons = [r for r, _, _, _ in c.ledger.rejection_summary()]
        assert any("the ledger cannot store this message (IntegrityError)" in r for r in reasons), reasons
        assert c.stats["dropped"] == 0
        c.ledger.db.execute("DROP TRIGGER refuse")
        process(c, _chain(lab, 40)[12:13])  # the agent's resend
        assert c.watermarks.upto[("agent-b", "I3")] == 40
    finally:
        c.ledger.close()
        c._pool.shutdown()


def test_a_message_that_cannot_even_be_recorded_is_counted_and_dropped(tmp_path: Path) -> None:
    lab, c = _collector(tmp_path)
    try:
        c.ledger.db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON intervals WHEN NEW.seq = 2 BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        c.ledger.db.execute(
            "CREATE TRIGGER refuse_count BEFORE INSERT ON rejection_counts BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        process(c, _chain(lab, 3))
        assert c.stats["dropped"] == 1
        stored = [
            s for (s,) in c.ledger.db.execute("SELECT seq FROM intervals WHERE agent='agent-b' ORDER BY seq")
        ]
        assert stored == [1, 3]
        assert c.watermarks.upto[("agent-b", "I3")] == 1
    finally:
        c.ledger.close()
        c._pool.shutdown()


def test_a_ledger_that_takes_no_writes_keeps_the_batch(tmp_path: Path) -> None:
    """An outage (here: every write aborted) is not one bad message: nothing is rejected, dropped or
    acknowledged, and the batch is stored whole once the ledger is back."""
    lab, c = _collector(tmp_path)
    try:
        for table in ("intervals", "meta", "rejection_counts", "rejections"):
            c.ledger.db.execute(
                f"CREATE TRIGGER down_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        batch = _chain(lab, 10)
        with pytest.raises(LedgerUnavailable):
            process(c, batch)
        assert ("agent-b", "I3") not in c.watermarks.upto
        assert c.stats["dropped"] == 0 and c.stats["rejected"] == 0

        async def ingest_briefly() -> None:  # the real loop: keeps the batch and retries it every second
            c.inbox.extend(batch)
            c._inbox_bytes = sum(len(p) for _, p in batch)
            task = asyncio.create_task(c._ingest())
            await asyncio.sleep(0.3)
            assert len(c.inbox) == 10
            for table in ("intervals", "meta", "rejection_counts", "rejections"):
                c.ledger.db.execute(f"DROP TRIGGER down_{table}")
            for _ in range(50):
                await asyncio.sleep(0.1)
                if not c.inbox and c.watermarks.upto.get(("agent-b", "I3")) == 10:
                    break
            task.cancel()

        asyncio.run(ingest_briefly())
        assert c.watermarks.upto[("agent-b", "I3")] == 10
        assert c.ledger.db.execute("SELECT COUNT(*) FROM intervals WHERE agent='agent-b'").fetchone()[0] == 10
        assert c.stats["dropped"] == 0 and c._inbox_bytes == 0
    finally:
        c.ledger.close()
        c._pool.shutdown()


def test_the_inbox_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound what arrives is dropped and counted: agents resend whatever is not acknowledged."""
    from labmeter.collector import service

    lab, c = _collector(tmp_path)
    monkeypatch.setattr(service, "MAX_INBOX", 5)
    try:
        for topic, payload in _chain(lab, 8):
            c._on_message(topic, payload)
        assert len(c.inbox) == 5 and c.stats["dropped_inbox"] == 3
        c._on_message(wire.interval_topic("agent-b", "I3"), b"")  # a cleared retained message: not queued
        c._on_message(wire.interval_topic("agent-b", "I3"), b"x", retain=True)
        assert len(c.inbox) == 5 and c.stats["empty"] == 1 and c.stats["retained"] == 1
    finally:
        c.ledger.close()
        c._pool.shutdown()


def test_the_rejections_command_lists_kept_and_counted(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import LABMETER

    lab, c = _collector(tmp_path)
    try:
        ghost = [
            (f"labmeter/v1/ghost-{i}/I1/interval", b'{"kid":"k","body":"{}","sig":"s"}') for i in range(300)
        ]
        bogus = wire.Interval("agent-b", "I3", 1, wire.GENESIS, T0, T0 + 60_000, "BOGUS").body()
        process(
            c, [*ghost, (wire.interval_topic("agent-b", "I3"), lab.sign("agent-b", wire.dump_body(bogus)))]
        )
    finally:
        c.ledger.close()
        c._pool.shutdown()
    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{lab.cfg.collector.data_dir}"\n')
    out = subprocess.run(
        [*LABMETER, "collector", "rejections", "-c", "collector.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 100 + 1  # REJECTION_KEYS counted rows and the one kept whole
    assert lines[0].split()[:2] == ["201", "counted"]  # the rows past the cap, folded into one
    assert any("kept" in x and "state 'BOGUS'" in x for x in lines)


REFUSE_PG = """
CREATE FUNCTION refuse() RETURNS trigger AS $$
BEGIN IF NEW.seq = 13 THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER refuse BEFORE INSERT ON intervals FOR EACH ROW EXECUTE FUNCTION refuse();
"""


def test_one_message_postgresql_refuses_is_split_off(postgres: Any, tmp_path: Path) -> None:
    """The same on PostgreSQL, where a batch of 50 rows or more goes through COPY."""
    lab = make_lab(tmp_path, ledger_url=postgres.new_database())
    c = Collector(lab.cfg)
    try:
        process(c, genuine_start(lab))
        c.ledger.db.conn.execute(REFUSE_PG)
        process(c, _chain(lab, 60))
        stored = [
            s for (s,) in c.ledger.db.execute("SELECT seq FROM intervals WHERE agent='agent-b' ORDER BY seq")
        ]
        assert stored == [s for s in range(1, 61) if s != 13]
        assert c.watermarks.upto[("agent-b", "I3")] == 12
        assert c.stats["dropped"] == 0
    finally:
        c.ledger.close()
        c._pool.shutdown()


def test_a_postgresql_outage_is_waited_out(postgres: Any, tmp_path: Path) -> None:
    """The database goes away (its connections cut, new ones refused): the batch is kept, nothing is
    acknowledged; once it is back the collector reconnects and stores it whole."""
    import psycopg

    url = postgres.new_database()
    name = url.rsplit("/", 1)[1]
    lab = make_lab(tmp_path, ledger_url=url)
    c = Collector(lab.cfg)
    admin = psycopg.connect(postgres.url(), autocommit=True)
    try:
        process(c, genuine_start(lab))
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        batch = _chain(lab, 10)
        with pytest.raises(LedgerUnavailable):
            process(c, batch)
        assert ("agent-b", "I3") not in c.watermarks.upto and c.stats["dropped"] == 0
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        process(c, batch)
        assert c.watermarks.upto[("agent-b", "I3")] == 10
        assert c.ledger.db.execute("SELECT COUNT(*) FROM intervals WHERE agent='agent-b'").fetchone()[0] == 10
    finally:
        admin.close()
        c.ledger.close()
        c._pool.shutdown()


def test_an_authentic_rejection_the_ledger_refuses_moves_no_watermark(tmp_path: Path) -> None:
    """Acknowledging past a rejection the ledger does not hold would let a restarted collector disagree."""
    lab, c = _collector(tmp_path)
    try:
        c.ledger.db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON rejections BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        body = wire.Interval("agent-a", "I1", 3, lab.genuine["I1:2"][1], T0, T0 + 60_000, "BOGUS").body()
        process(c, [(wire.interval_topic("agent-a", "I1"), lab.sign("agent-a", wire.dump_body(body)))])
        assert c.watermarks.upto[("agent-a", "I1")] == 2
        reasons = [r for r, _, _, _ in c.ledger.rejection_summary()]
        assert any("cannot store this message" in r and "BOGUS" in r for r in reasons), reasons
    finally:
        c.ledger.close()
        c._pool.shutdown()
