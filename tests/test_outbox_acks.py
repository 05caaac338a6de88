"""What an acknowledgement or a conflict does to the agent's outbox, row by row: an ack deletes only up to
a body the agent holds (or a seq it has written), and a conflict re-signs the rest as a new chain above
everything before (tests/test_outbox.py and tests/test_control_path.py drive the same through the agent)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labmeter import signing, wire
from labmeter.agent.outbox import AgentStore, Signer
from labmeter.agent.timeline import Span
from labmeter.wire import State

T0 = 1_780_000_000_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AgentStore]:
    s = AgentStore(tmp_path / "agent.db")
    yield s
    s.close()


KEY = signing.PrivateKey.generate()
SIGNER = Signer("a1", KEY, signing.key_id(KEY.public_key()))


def emit(store: AgentStore, n: int, start: int = T0) -> list[tuple[int, str, int]]:
    """(seq, body sha, row id) of ``n`` new links."""
    spans = [Span(start + i * 60_000, start + (i + 1) * 60_000, State.RUNNING) for i in range(n)]
    rows = store.emit(SIGNER, "I1", spans, None)
    return [(r.seq, wire.body_hash(wire.open_envelope(r.payload).body), r.id) for r in rows]


def seqs(store: AgentStore) -> list[int]:
    return [p.seq for p in store.unsent(time.time() + 10)]


def test_an_ack_deletes_up_to_our_own_body_only(store: AgentStore) -> None:
    rows = emit(store, 4)
    assert store.ack_matching("I1", rows[1][0], "f" * 64) is None  # another body at that seq: a replay
    assert seqs(store) == [r[0] for r in rows]
    assert store.ack_matching("I1", rows[1][0], rows[1][1]) == 2
    assert seqs(store) == [r[0] for r in rows[2:]]


def test_an_ack_for_a_seq_already_acknowledged_is_understood_and_one_never_written_is_not(
    store: AgentStore,
) -> None:
    rows = emit(store, 3)
    assert store.ack_matching("I1", rows[2][0], rows[2][1]) == 3
    # no row left at these seqs: they count as ours because this state wrote them (seq <= head)
    assert store.ack_matching("I1", rows[1][0], "f" * 64) == 0
    assert store.ack_matching("I1", rows[2][0], "f" * 64) == 0
    assert store.ack_matching("I1", rows[2][0] + 1, "f" * 64) is None  # beyond the head: not ours
    assert store.ack_matching("I2", 1, "f" * 64) is None  # a chain this state never began


def test_a_conflict_at_the_chains_first_link_begins_a_new_chain_with_every_row_from_there(
    store: AgentStore,
) -> None:
    rows = emit(store, 3)
    first = rows[0][0]
    before = int(time.time() * 1000)
    moved = store.rechain(SIGNER, "I1", first, rows[0][1])
    after = int(time.time() * 1000)
    assert len(moved) == 3
    new_first = moved[0].seq
    # the clock (above every seq an older chain used), or just above this chain's head if that is higher
    assert new_first > rows[-1][0]
    assert new_first == rows[-1][0] + 1 or before <= new_first <= after
    assert [m.seq for m in moved] == [new_first, new_first + 1, new_first + 2]
    bodies = [wire.load_body(wire.open_envelope(m.payload).body) for m in moved]
    assert bodies[0]["prev"] == wire.GENESIS
    assert [b["start"] for b in bodies] == [T0, T0 + 60_000, T0 + 120_000]  # bodies kept, relinked
    assert seqs(store) == [m.seq for m in moved]
    assert sorted(p.id for p in store.unsent(time.time() + 10)) == sorted(m.id for m in moved)
    assert store.summary()["chain"]["I1"] == {"seq": new_first + 2, "first": new_first}  # type: ignore[index]


def test_a_new_chain_begins_above_a_head_that_is_ahead_of_the_clock(store: AgentStore) -> None:
    rows = emit(store, 2)
    ahead = int(time.time() * 1000) + 10**9
    with store._transaction() as cur:
        cur.execute("UPDATE chain SET seq=? WHERE instrument='I1'", (ahead,))
    moved = store.rechain(SIGNER, "I1", rows[0][0], rows[0][1])
    assert moved[0].seq == ahead + 1


def test_a_conflict_for_an_older_chain_appends_that_link_to_the_current_one(store: AgentStore) -> None:
    old = emit(store, 2)
    fresh = store.rechain(SIGNER, "I1", old[0][0], old[0][1])  # the current chain now begins above
    later = emit(store, 1, start=T0 + 10 * 60_000)
    head = later[0][0]
    # a conflict reported late for a link of the current chain's predecessor is appended, not a new chain
    again = store.rechain(
        SIGNER, "I1", fresh[1].seq, wire.body_hash(wire.open_envelope(fresh[1].payload).body)
    )
    assert len(again) >= 1 and again[0].seq > head
