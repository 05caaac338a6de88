"""The outbox keeps every interval until the collector acknowledges it, across restarts."""

from __future__ import annotations

from pathlib import Path

from labmeter.agent.outbox import AgentStore, Checkpoint, Signer
from labmeter.agent.timeline import Span

from labmeter import signing, wire
from labmeter.wire import State


def signer(tmp_path: Path) -> Signer:
    key = signing.generate_key_file(tmp_path / "agent.key")
    return Signer("a1", key, signing.key_id(key.public_key()))


def test_chain_ack_reject_and_restart(tmp_path: Path) -> None:
    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    rows = store.emit(
        s, "I1", [Span(0, 10, State.OFF), Span(10, 20, State.RUNNING)], Checkpoint(20, State.RUNNING, 25)
    )
    assert [r.seq for r in rows] == [1, 2]
    b1 = wire.load_body(wire.open_envelope(rows[0].payload).body)
    b2 = wire.load_body(wire.open_envelope(rows[1].payload).body)
    assert b1["prev"] == wire.GENESIS
    assert b2["prev"] == wire.body_hash(wire.open_envelope(rows[0].payload).body)
    store.close()

    store = AgentStore(tmp_path / "agent.db")  # restart: nothing lost, chain continues
    assert store.load_checkpoint("I1") == Checkpoint(20, State.RUNNING, 25)
    assert [r.seq for r in store.unsent(1e18)] == [1, 2]
    more = store.emit(s, "I1", [Span(20, 30, State.OFF)], None)
    assert more[0].seq == 3
    assert store.ack("I1", 1) == 1
    sha3 = wire.body_hash(wire.open_envelope(more[0].payload).body)
    assert not store.reject("I1", 3, "0" * 64, "forged")  # a reject for a body we never sent is ignored
    assert store.reject("I1", 3, sha3, "end is in the future")
    assert [r.seq for r in store.unsent(1e18)] == [2]
    summary = store.summary()
    assert summary["dead"] == [
        {"instrument": "I1", "seq": 3, "reason": "end is in the future", "at": summary["dead"][0]["at"]}
    ]  # type: ignore[index]
    assert store.resend_dead() == 1
    assert [r.seq for r in store.unsent(1e18)] == [2, 3]


def test_sent_rows_wait_for_resend_timeout(tmp_path: Path) -> None:
    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    rows = store.emit(s, "I1", [Span(0, 10, State.OFF)], None)
    store.mark_sent([rows[0].id], at=100.0)
    assert store.unsent(resend_before=50.0) == []
    assert [r.seq for r in store.unsent(resend_before=150.0)] == [1]
    store.mark_all_unsent()
    assert [r.seq for r in store.unsent(resend_before=0.5)] == [1]
