"""State files are never silently replaced: an empty, cut-short or damaged agent.db or ledger stops
start-up with the file and the fix (testcases/statefiles/<case>/: how to damage it, the error), and
only `agent reset-state` / `collector reset-ledger` move one aside. Also: the integrity check in
`collector check` and `agent status`, and the ledger's durable commit before an acknowledgement."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from labmeter import signing, wire
from labmeter.agent.outbox import AgentStore, Signer
from labmeter.agent.timeline import Span
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Collector, LedgerUnavailable
from labmeter.wire import State
from tests.conftest import LABMETER
from tests.lab import ack_body, collector_config, make_agent_key, register, store_schedule, wait_for

CASES = sorted((Path(__file__).parent / "testcases" / "statefiles").iterdir())
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
ROWS = 2_000  # as in the report: an agent.db with 2,000 pending intervals


def write_configs(tmp: Path) -> None:
    (tmp / "agent.toml").write_text(
        f'[agent]\nid = "lab-pc-07"\nkey_file = "{tmp / "agent.key"}"\nstate_dir = "{tmp / "state"}"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:9"\n'
        '[[instrument]]\nid = "CZ-XRD-001"\n[instrument.source]\ndriver = "modbus"\n'
        'url = "tcp://127.0.0.1:9"\nprofile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
    )
    (tmp / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{tmp / "data"}"\n[broker]\nurl = "mqtt://127.0.0.1:9"\n'
    )
    signing.generate_key_file(tmp / "agent.key")


def real_agent_db(tmp: Path) -> Path:
    """An agent.db as the agent leaves it: ROWS signed intervals waiting for acknowledgement."""
    path = tmp / "state" / "agent.db"
    key = signing.load_private_key(tmp / "agent.key")
    store = AgentStore(path)
    spans = [Span(T0 + i * 60_000, T0 + (i + 1) * 60_000, State.RUNNING) for i in range(ROWS)]
    store.emit(Signer("lab-pc-07", key, signing.key_id(key.public_key())), "CZ-XRD-001", spans, None)
    store.close()
    return path


def real_ledger(tmp: Path) -> Path:
    path = tmp / "data" / "ledger.sqlite"
    ledger = Ledger(path)
    spans = [(T0 + i * 60_000, T0 + (i + 1) * 60_000, "RUNNING") for i in range(ROWS)]
    store_schedule(tmp / "keys", ledger, "lab-pc-07", "CZ-XRD-001", spans)
    ledger.close()
    return path


def damage(path: Path, how: str, keep_bytes: int = 1024) -> None:
    data = path.read_bytes()
    assert not path.with_name(path.name + "-wal").exists()  # closed cleanly: everything is in the file
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        path.write_bytes(data[:keep_bytes])
    elif how == "text":
        path.write_text("this is not a database\n" * 50)
    elif how == "garble":  # one page in the middle overwritten with noise
        page_size = int.from_bytes(data[16:18], "big")
        page = len(data) // page_size // 2
        noise = random.Random(7).randbytes(page_size)
        path.write_bytes(data[: page * page_size] + noise + data[(page + 1) * page_size :])
    else:
        raise ValueError(how)


def cli(tmp: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABMETER, *args], cwd=tmp, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_damaged_state_file_stops_start_up_until_reset(case: Path, tmp_path: Path) -> None:
    spec = tomllib.loads((case / "case.toml").read_text())
    write_configs(tmp_path)
    agent = spec["file"] == "agent"
    path = real_agent_db(tmp_path) if agent else real_ledger(tmp_path)
    damage(path, spec["damage"], spec.get("keep_bytes", 1024))
    damaged = path.read_bytes()
    cfg = "agent.toml" if agent else "collector.toml"
    pubkey = signing.public_key_text(signing.load_private_key(tmp_path / "agent.key").public_key())
    expected = (case / "expected_error.txt").read_text().strip().format(file=path, config=cfg)

    for command in spec["commands"]:
        args = [a.format(pubkey=pubkey) for a in command]
        proc = cli(tmp_path, *args, "--config", cfg)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        # report progress, and the first start's notice that the collector key was created
        lines = [
            ln
            for ln in proc.stderr.splitlines()
            if "labmeter.rollups" not in ln and "created the collector key" not in ln
        ]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expected in lines[0], lines[0]
        assert path.read_bytes() == damaged, f"{args} changed the damaged file"
        assert not path.with_name(path.name + "-wal").exists() or spec["damage"] == "garble"

    reset = ["agent", "reset-state"] if agent else ["collector", "reset-ledger"]
    proc = cli(tmp_path, *reset, "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    moved = sorted(path.parent.glob(path.name + ".damaged-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == damaged
    assert f"moved {path} to {moved[0]}" in proc.stdout
    assert not path.exists()

    starts_and_stops(tmp_path, ["agent" if agent else "collector", "run", "--config", cfg])
    assert path.exists()
    if agent:  # a fresh state file, sound
        proc = cli(tmp_path, "agent", "status", "--config", cfg)
        assert proc.returncode == 0, proc.stderr
        assert f"state file {path}: OK (integrity_check)" in proc.stdout
    else:  # a fresh ledger, where agents can be registered again
        proc = cli(
            tmp_path, "collector", "add-agent", "lab-pc-07", "--key", pubkey, "--instrument", "I1", "-c", cfg
        )
        assert proc.returncode == 0, proc.stderr
        proc = cli(tmp_path, "collector", "check", "--config", cfg)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"ledger  {path}: OK (integrity_check" in proc.stdout
    assert moved[0].read_bytes() == damaged  # the old file is kept as it was


def starts_and_stops(tmp: Path, args: list[str]) -> None:
    """The service starts (says it is running), then stops cleanly on SIGTERM."""
    log = tmp / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*LABMETER, *args], cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: " running" in log.read_text(), timeout=30, what=f"{args[0]} running")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_a_file_that_does_not_exist_is_new(tmp_path: Path) -> None:
    write_configs(tmp_path)
    proc = cli(tmp_path, "agent", "status", "--config", "agent.toml")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "state" / "agent.db").stat().st_size > 0


@pytest.mark.parametrize("kind", ["agent", "ledger"])
def test_reset_refuses_a_sound_file_unless_forced(kind: str, tmp_path: Path) -> None:
    write_configs(tmp_path)
    path = real_agent_db(tmp_path) if kind == "agent" else real_ledger(tmp_path)
    before = path.read_bytes()
    cmd, cfg = (
        (["agent", "reset-state"], "agent.toml")
        if kind == "agent"
        else (["collector", "reset-ledger"], "collector.toml")
    )
    proc = cli(tmp_path, *cmd, "--config", cfg)
    assert proc.returncode == 1
    assert f"{path} is sound ({ROWS} interval(s)" in proc.stderr and "--force" in proc.stderr
    assert path.read_bytes() == before and not list(path.parent.glob("*.damaged-*"))
    proc = cli(tmp_path, *cmd, "--config", cfg, "--force")
    assert proc.returncode == 0, proc.stderr
    assert f"it held {ROWS} interval(s)" in proc.stdout
    assert not path.exists() and len(list(path.parent.glob(path.name + ".damaged-*"))) == 1


def test_reset_refuses_a_file_another_process_has_open(tmp_path: Path) -> None:
    write_configs(tmp_path)
    path = real_agent_db(tmp_path)
    damage(path, "garble")
    holder = sqlite3.connect(path)  # as a running agent would hold it
    holder.execute("PRAGMA journal_mode=WAL").fetchall()
    try:
        proc = cli(tmp_path, "agent", "reset-state", "--config", "agent.toml")
        assert proc.returncode == 1
        assert f"{path} is open in another process: stop the service first" in proc.stderr
        assert path.exists()
    finally:
        holder.close()


def test_reset_moves_the_wal_with_the_file(tmp_path: Path) -> None:
    """A WAL left beside a new database would be replayed into it."""
    write_configs(tmp_path)
    path = tmp_path / "state" / "agent.db"
    path.parent.mkdir()
    path.write_bytes(b"")
    wal = path.with_name("agent.db-wal")
    wal.write_bytes(b"old frames")
    proc = cli(tmp_path, "agent", "reset-state", "--config", "agent.toml")
    assert proc.returncode == 0, proc.stderr
    (moved,) = path.parent.glob("agent.db.damaged-*[0-9Z]")
    assert not wal.exists() and moved.with_name(moved.name + "-wal").read_bytes() == b"old frames"


def unindexed(path: Path, table: str, index: str, columns: str) -> None:
    """Make an index disagree with its table, which only the full integrity_check sees."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql=? WHERE name=?", (f"CREATE INDEX {index} ON {table} ({columns})", index)
    )
    db.commit()
    db.close()


def test_agent_status_shows_the_integrity_check(tmp_path: Path) -> None:
    write_configs(tmp_path)
    path = real_agent_db(tmp_path)
    proc = cli(tmp_path, "agent", "status", "--config", "agent.toml")
    assert proc.returncode == 0 and f"state file {path}: OK (integrity_check)" in proc.stdout
    unindexed(path, "outbox", "outbox_seq", "seq, instrument")
    proc = cli(tmp_path, "agent", "status", "--config", "agent.toml")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"state file {path}: DAMAGED (integrity_check:" in proc.stdout
    assert "outbox_seq" in proc.stdout and "labmeter agent reset-state --config agent.toml" in proc.stdout
    assert '"integrity": [' in cli(tmp_path, "agent", "status", "--config", "agent.toml", "--json").stdout


def test_collector_check_shows_config_ledger_and_key(tmp_path: Path) -> None:
    write_configs(tmp_path)
    path = real_ledger(tmp_path)
    signing.generate_key_file(tmp_path / "data" / "collector.key")
    proc = cli(tmp_path, "collector", "check", "--config", "collector.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "config  collector.toml: OK" in proc.stdout
    assert f"ledger  {path}: OK (integrity_check" in proc.stdout and f"{ROWS} interval(s)" in proc.stdout
    assert f"key     {tmp_path / 'data' / 'collector.key'}: OK (agents pin ed25519:" in proc.stdout
    quick = cli(tmp_path, "collector", "check", "--config", "collector.toml", "--quick")
    assert quick.returncode == 0 and "OK (quick_check" in quick.stdout

    unindexed(path, "intervals", "intervals_time", "start_ms, instrument")
    proc = cli(tmp_path, "collector", "check", "--config", "collector.toml")
    assert proc.returncode == 1
    assert f"ledger  {path}: DAMAGED (integrity_check)" in proc.stdout and "intervals_time" in proc.stdout
    assert "labmeter collector reset-ledger --config collector.toml" in proc.stdout
    assert "Traceback" not in proc.stderr

    (tmp_path / "data" / "collector.key").chmod(0o644)
    damage(path, "garble")
    proc = cli(tmp_path, "collector", "check", "--config", "collector.toml", "--quick")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"ledger  {path}: DAMAGED" in proc.stdout
    assert "private key is readable by others" in proc.stdout


def test_collector_check_on_postgresql(postgres: Any, tmp_path: Path) -> None:
    """Connection, schema and the server's durability settings; what it cannot see (pages) it says."""
    from tests.postgres import PostgresServer

    durable = PostgresServer(fsync=True).start()
    try:
        url = durable.new_database()
        (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp_path}"\nledger = "{url}"\n')
        Ledger.open(url, tmp_path).close()
        proc = cli(tmp_path, "collector", "check", "--config", "collector.toml")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK (connection and schema" in proc.stdout and "pg_amcheck" in proc.stdout
        assert "fsync on, synchronous_commit on" in proc.stdout
        assert "test-only-secret" not in proc.stdout
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER TABLE intervals DROP COLUMN clock_step_ms")
        proc = cli(tmp_path, "collector", "check", "--config", "collector.toml")
        assert proc.returncode == 1
        assert "PROBLEM (connection and schema) table intervals lacks column(s) clock_step_ms" in proc.stdout
    finally:
        durable.stop()
    # the test server runs with fsync off: fine for throwaway data, never for a ledger
    url = postgres.new_database()
    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp_path}"\nledger = "{url}"\n')
    Ledger.open(url, tmp_path).close()
    proc = cli(tmp_path, "collector", "check", "--config", "collector.toml")
    assert proc.returncode == 1
    assert (
        "the server runs with fsync off: a crash of its machine can lose acknowledged intervals"
        in proc.stdout
    )


# durable acknowledgements --------------------------------------------------------
def test_the_ledger_and_the_outbox_commit_with_synchronous_full(tmp_path: Path) -> None:
    """Read back from the live connections: FULL (2) syncs the WAL at every commit, so what the collector
    acknowledges survives a power cut (NORMAL, 1, may lose the last commits)."""
    cfg = collector_config(tmp_path, "mqtt://127.0.0.1:9")
    collector = Collector(cfg)
    try:
        assert collector.ledger.db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert collector.ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        collector.ledger.close()
    store = AgentStore(tmp_path / "agent.db")
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    store.close()


class RecordingLink:
    """Stands in for the broker link, to see what the ledger holds at the moment an ack goes out."""

    def __init__(self, ledger_path: Path) -> None:
        self.ledger_path = ledger_path
        self.acks: list[tuple[dict[str, Any], int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        other = sqlite3.connect(self.ledger_path)  # another connection sees only committed rows
        stored = other.execute("SELECT count(*) FROM intervals").fetchone()[0]
        other.close()
        self.acks.append((ack_body(payload), stored))
        return True


def test_an_ack_goes_out_only_after_the_commit(tmp_path: Path) -> None:
    cfg = collector_config(tmp_path, "mqtt://127.0.0.1:9")
    key, pub, kid = make_agent_key(tmp_path, "a1")
    register(cfg, "a1", pub, kid, ["I1"])
    collector = Collector(cfg)
    collector.key = signing.PrivateKey.generate()
    link = RecordingLink(cfg.collector.data_dir / "ledger.sqlite")
    collector.link = link  # type: ignore[assignment]
    store = AgentStore(tmp_path / "a1.db")
    rows = store.emit(Signer("a1", key, kid), "I1", [Span(T0, T0 + 60_000, State.RUNNING)], None)
    batch = [(r.topic, r.payload) for r in rows]

    real_store, real_writable = collector.ledger.store, collector.ledger.writable

    def full_disk(*args: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    # the ledger takes no write at all (a full disk): the batch waits whole, nothing is acknowledged
    collector.ledger.store = full_disk  # type: ignore[method-assign]
    collector.ledger.writable = lambda: False  # type: ignore[method-assign]
    with pytest.raises(LedgerUnavailable):
        asyncio.run(collector.process(batch))
    assert link.acks == []

    collector.ledger.store, collector.ledger.writable = real_store, real_writable  # type: ignore[method-assign]
    asyncio.run(collector.process(batch))
    ((ack, stored_then),) = link.acks
    sha = wire.body_hash(wire.open_envelope(rows[0].payload).body)
    assert ack["acks"] == {"I1": {"seq": rows[0].seq, "sha256": sha}} and stored_then == 1
    collector.ledger.close()
    store.close()
