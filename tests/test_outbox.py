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


def body(row: object) -> dict[str, object]:
    return wire.load_body(wire.open_envelope(row.payload).body)  # type: ignore[attr-defined]


def test_conflict_begins_a_new_chain_with_the_link_and_its_successors(tmp_path: Path) -> None:
    """A restored state directory reuses seqs the ledger holds: the link taken and all after it move up."""
    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    rows = store.emit(s, "I1", [Span(n * 10, (n + 1) * 10, State.RUNNING) for n in range(4)], None)
    o = rows[0].seq
    sha = [wire.body_hash(wire.open_envelope(r.payload).body) for r in rows]
    assert store.rechain(s, "I1", o + 1, "0" * 64) == []  # not our body: nothing moves
    assert store.rechain(s, "I9", o + 1, sha[1]) == []
    time.sleep(0.01)  # the new chain begins at the clock, above the old one's links
    moved = store.rechain(s, "I1", o + 1, sha[1])
    assert [(body(m)["start"], body(m)["end"], body(m)["state"]) for m in moved] == [
        (10, 20, "RUNNING"),
        (20, 30, "RUNNING"),
        (30, 40, "RUNNING"),
    ]
    n = moved[0].seq
    assert n > o + 3 and [m.seq for m in moved] == [n, n + 1, n + 2]
    assert body(moved[0])["prev"] == wire.GENESIS
    assert body(moved[1])["prev"] == wire.body_hash(wire.open_envelope(moved[0].payload).body)
    assert [r.seq for r in store.unsent(1e18)] == [o, n, n + 1, n + 2]
    assert store.summary()["chain"] == {"I1": {"seq": n + 2, "first": n}}
    later = store.emit(s, "I1", [Span(40, 50, State.OFF)], None)[0]  # the running timeline follows on
    assert later.seq == n + 3
    assert body(later)["prev"] == wire.body_hash(wire.open_envelope(moved[-1].payload).body)
    # the old links' conflicts arrive too: they are no longer ours, so nothing moves twice
    assert store.rechain(s, "I1", o + 2, sha[2]) == []
    # a conflict for a link of the older chain still pending joins the current chain
    again = store.rechain(s, "I1", o, sha[0])
    assert [m.seq for m in again] == [n + 4] and body(again[0])["start"] == 0
    assert store.summary()["dead"] == []


def test_every_write_is_one_transaction_and_a_batch_marks_sent_with_one_commit(tmp_path: Path) -> None:
    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    rows = store.emit(s, "I1", [Span(n * 10, (n + 1) * 10, State.OFF) for n in range(500)], None)
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    store.mark_sent([r.id for r in rows], 5.0)
    assert sum(1 for x in statements if x.strip().upper() == "COMMIT") == 1
    assert store.unsent(4.0) == [] and len(store.unsent(6.0)) == 500


def test_full_disk_is_named_and_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    """SQLITE_FULL (a page limit stands in for a full file system) is 'disk full: PATH', not 'cannot rollback'."""
    from labmeter.agent.outbox import DiskFull

    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    store.emit(s, "I1", [Span(0, 10, State.OFF)], Checkpoint(10, State.OFF, 10))
    before = store.summary()
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")
    big = [Span(n * 10, (n + 1) * 10, State.RUNNING) for n in range(1, 400)]
    try:
        store.emit(s, "I1", big, Checkpoint(4000, State.RUNNING, 4000))
    except DiskFull as exc:
        assert str(exc) == f"disk full: {tmp_path / 'agent.db'}"
    else:
        raise AssertionError("a write beyond the page limit succeeded")
    assert store.summary() == before
    assert store.load_checkpoint("I1") == Checkpoint(10, State.OFF, 10)
    store.db.execute("PRAGMA max_page_count=1073741823")  # space returns: the same write goes through
    assert len(store.emit(s, "I1", big, None)) == 399


def test_checkpoint_keeps_a_clock_step_across_restart(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent.db")
    store.checkpoint({"I1": Checkpoint(5000, State.RUNNING, 6000, -3000)})
    store.close()
    assert AgentStore(tmp_path / "agent.db").load_checkpoint("I1") == Checkpoint(
        5000, State.RUNNING, 6000, -3000
    )


def test_a_restored_copys_start_up_recovery_does_not_hide_what_the_other_copy_measured(
    tmp_path: Path,
) -> None:
    """The conflict is on the recovery (old open interval + agent_down): it is dropped, the rest moves up."""
    s = signer(tmp_path)
    store = AgentStore(tmp_path / "agent.db")
    store.emit(s, "I1", [Span(0, 10, State.RUNNING)], None)
    recovery = store.emit(
        s, "I1", [Span(10, 20, State.RUNNING), Span(20, 90, State.UNKNOWN, wire.NOTE_AGENT_DOWN)], None
    )
    time.sleep(0.01)
    measured = store.emit(s, "I1", [Span(90, 95, State.OFF)], None)
    sha = wire.body_hash(wire.open_envelope(recovery[0].payload).body)
    moved = store.rechain(s, "I1", recovery[0].seq, sha)
    assert [(body(m)["start"], body(m)["prev"]) for m in moved] == [(90, wire.GENESIS)]
    assert moved[0].seq > measured[0].seq
    assert len(store.unsent(1e18)) == 2  # the first link and the measured one; the recovery is gone
