"""The outbox keeps every interval until the collector acknowledges it, across restarts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from labmeter import signing, wire
from labmeter.agent.outbox import AgentStore, Checkpoint, Signer
from labmeter.agent.timeline import Span
from labmeter.wire import State


def signer(tmp_path: Path) -> Signer:
    key = signing.generate_key_file(tmp_path / "agent.key")
    return Signer("a1", key, signing.key_id(key.public_key()))


def test_chain_ack_reject_and_restart(tmp_path: Path) -> None:
    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    before = int(time.time() * 1000)
    rows = store.emit(
        s, "I1", [Span(0, 10, State.OFF), Span(10, 20, State.RUNNING)], Checkpoint(20, State.RUNNING, 25)
    )
    o = rows[0].seq  # a chain starts at the agent's clock in ms
    assert before <= o <= int(time.time() * 1000)
    assert [r.seq for r in rows] == [o, o + 1]
    b1 = wire.load_body(wire.open_envelope(rows[0].payload).body)
    b2 = wire.load_body(wire.open_envelope(rows[1].payload).body)
    assert b1["prev"] == wire.GENESIS
    assert b2["prev"] == wire.body_hash(wire.open_envelope(rows[0].payload).body)
    store.close()

    store = AgentStore(tmp_path / "agent.db")  # restart: nothing lost, chain continues
    assert store.load_checkpoint("I1") == Checkpoint(20, State.RUNNING, 25)
    assert [r.seq for r in store.unsent(1e18)] == [o, o + 1]
    more = store.emit(s, "I1", [Span(20, 30, State.OFF)], None)
    assert more[0].seq == o + 2
    assert store.ack("I1", o) == 1
    sha3 = wire.body_hash(wire.open_envelope(more[0].payload).body)
    assert not store.reject("I1", o + 2, "0" * 64, "forged")  # a reject for a body we never sent is ignored
    assert store.reject("I1", o + 2, sha3, "end is in the future")
    assert [r.seq for r in store.unsent(1e18)] == [o + 1]
    summary = store.summary()
    assert summary["dead"] == [
        {"instrument": "I1", "seq": o + 2, "reason": "end is in the future", "at": summary["dead"][0]["at"]}
    ]  # type: ignore[index]
    assert store.resend_dead() == 1
    assert [r.seq for r in store.unsent(1e18)] == [o + 1, o + 2]
    assert summary["chain"] == {"I1": {"seq": o + 2, "first": o}}


def test_state_from_before_clock_chains_continues_at_its_seq(tmp_path: Path) -> None:
    """A state directory written when chains began at 1 keeps its chain, and status counts it from 1."""
    db = sqlite3.connect(tmp_path / "agent.db")
    db.execute("CREATE TABLE chain (instrument TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL)")
    db.execute("INSERT INTO chain VALUES ('I1', 41, ?)", ("ab" * 32,))
    db.commit()
    db.close()
    store = AgentStore(tmp_path / "agent.db")
    row = store.emit(signer(tmp_path), "I1", [Span(0, 10, State.OFF)], None)[0]
    assert row.seq == 42
    assert wire.load_body(wire.open_envelope(row.payload).body)["prev"] == "ab" * 32
    assert store.summary()["chain"] == {"I1": {"seq": 42, "first": 1}}


def test_lost_state_starts_a_new_chain_above_the_old(tmp_path: Path) -> None:
    s = signer(tmp_path)
    old = AgentStore(tmp_path / "old" / "agent.db")
    spans = [Span(n * 10, (n + 1) * 10, State.OFF) for n in range(100)]
    old_rows = old.emit(s, "I1", spans, None)
    old.close()
    time.sleep(0.15)  # a new chain comes later than one ms per link of the old one
    new = AgentStore(tmp_path / "new" / "agent.db")  # the state directory is gone, the key is not
    first = new.emit(s, "I1", [Span(6000, 6010, State.RUNNING)], None)[0]
    assert first.seq > old_rows[-1].seq
    assert wire.load_body(wire.open_envelope(first.payload).body)["prev"] == wire.GENESIS


def test_sent_rows_wait_for_resend_timeout(tmp_path: Path) -> None:
    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    rows = store.emit(s, "I1", [Span(0, 10, State.OFF)], None)
    store.mark_sent([rows[0].id], at=100.0)
    assert store.unsent(resend_before=50.0) == []
    assert [r.seq for r in store.unsent(resend_before=150.0)] == [rows[0].seq]
    store.mark_all_unsent()
    assert [r.seq for r in store.unsent(resend_before=0.5)] == [rows[0].seq]
