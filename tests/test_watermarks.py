"""The acknowledgement watermark: contiguous seqs pass, a gap holds, a new chain's first link moves it up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Watermarks
from tests.lab import store_schedule

S = 1_795_000_000_000  # where a chain begun after lost state starts: the agent's clock in ms

CASES = {
    "in_order": ([(1, True), (2, False), (3, False)], 3),
    "gap_holds": ([(1, True), (3, False)], 1),
    "gap_filled": ([(1, True), (3, False), (2, False)], 3),
    "new_chain_after_old": ([(1, True), (2, False), (S, True), (S + 1, False)], S + 1),
    "old_tail_arrives_late": ([(1, True), (S, True), (2, False), (S + 1, False)], S + 1),
    "new_chain_second_link_first": ([(1, True), (2, False), (S + 1, False)], 2),
    "then_its_first": ([(1, True), (2, False), (S + 1, False), (S, True)], S + 1),
    "old_chain_gap_abandoned": ([(1, True), (3, False), (S, True)], S),
    "older_chain_start_late": ([(S, True), (S + 1, False), (1, True)], S + 1),
    "first_link_missing": ([(2, False)], 0),
}


@pytest.mark.parametrize("case", CASES)
def test_watermark(case: str, tmp_path: Path) -> None:
    pushes, expected = CASES[case]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    marks = Watermarks(ledger)
    for seq, starts in pushes:
        upto = marks.add("a1", "XRD", seq, starts)
    assert upto == expected
    ledger.close()


def test_rebuilt_from_the_ledger_across_a_new_chain(tmp_path: Path) -> None:
    t0 = 1_772_409_600_000
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store_schedule(tmp_path, ledger, "a1", "XRD", [(t0, t0 + 7_200_000, "OFF")])
    for f in tmp_path.glob("a1.db*"):
        f.unlink()
    time.sleep(0.01)  # later than one ms per link of the old chain
    store_schedule(tmp_path, ledger, "a1", "XRD", [(t0 + 9_000_000, t0 + 10_000_000, "RUNNING")])
    seqs = [r[0] for r in ledger.db.execute("SELECT seq FROM intervals ORDER BY seq")]
    assert len(seqs) == 3 and seqs[2] > seqs[1] + 1
    # a fresh collector process: the watermark comes from the ledger and passes the new chain's first link
    assert Watermarks(ledger).add("a1", "XRD", seqs[2] + 1) == seqs[2] + 1
    ledger.close()


def test_signin_chain_rebuilt_across_a_new_chain(tmp_path: Path) -> None:
    from labmeter import signing, wire
    from labmeter.agent.outbox import AgentStore, Signer

    key = signing.generate_key_file(tmp_path / "a1.key")
    signer = Signer("a1", key, signing.key_id(key.public_key()))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    seqs = []
    for life in ("old", "new"):  # the second life lost the first one's state directory
        store = AgentStore(tmp_path / life / "agent.db")
        for n in range(2):
            row = store.emit_signin(signer, "XRD", 1_772_409_600_000 + n, "ab" * 16)
            env = wire.open_envelope(row.payload)
            si = wire.decode_signin(env.body)
            ledger.store_signins(
                [("a1", "XRD", si.seq, si.at, si.user, wire.body_hash(env.body), row.payload)]
            )
            seqs.append(si.seq)
        store.close()
        time.sleep(0.01)
    assert seqs[2] > seqs[1] + 1
    chain = wire.signin_chain("XRD")
    assert [start for _, start in ledger.handled_seqs("a1", chain)] == [True, False, True, False]
    assert Watermarks(ledger).add("a1", chain, seqs[3]) == seqs[3]
    ledger.close()


def test_a_chain_begun_above_an_older_one_is_reported_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    marks = Watermarks(ledger)
    for seq, starts in [(1, True), (2, False)]:
        marks.add("a1", "XRD", seq, starts)
    marks.add("a1", "HPLC", S, True)  # a new instrument's first chain is no restart
    assert marks.restarts == []
    marks.add("a1", "XRD", S, True)
    marks.add("a1", "XRD", S, True)  # resent: reported once
    assert marks.restarts == [("a1", "XRD", S)]
    ledger.close()


def test_only_seqs_beyond_a_gap_are_held_in_memory(tmp_path: Path) -> None:
    """The watermark's memory is bounded by its gaps: passed seqs, repeats and an abandoned chain's tail go."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    marks = Watermarks(ledger)
    key = ("a1", "XRD")
    for seq in (1, 2, 3, 3, 2, 1):
        marks.add(*key, seq, seq == 1)
    assert marks.upto[key] == 3 and marks.above[key] == set()
    marks.add(*key, 5)
    marks.add(*key, 7)
    assert marks.above[key] == {5, 7}
    assert marks.add(*key, 8, True) == 8  # a new chain: the old chain's gap and tail are abandoned
    assert marks.above[key] == set()
    assert marks.add(*key, 10, True) == 10  # a chain begun two above the watermark jumps too
    ledger.close()


# the agent's signed word that it holds seqs no more: ``gone`` records holes and moves the watermark over them
def _store(ledger: Ledger, *seqs: int) -> None:
    """Links of a1's XRD chain with these seqs in the ledger (their bodies do not matter here)."""
    from labmeter import signing, wire
    from labmeter.collector.ledger import StoredInterval

    key = signing.PrivateKey.generate()
    out = []
    for seq in seqs:
        iv = wire.Interval("a1", "XRD", seq, "1" * 64, seq * 60_000, (seq + 1) * 60_000, "OFF")
        body = wire.dump_body(iv.body())
        out.append((StoredInterval.of(iv, wire.body_hash(body), wire.seal(key, "k", body)), None))
    ledger.store(out, [])


GONE = {
    # (seqs in the ledger, then each gone(first, upto) with the holes it must return, then seqs added with the
    # watermark each must give)
    "a gap passed, the seqs above it joined": ([1, 2, 5, 6], [((1, 4), [(3, 4)])], [(7, 7)]),
    "one seq above the gap, not two": ([1, 2, 5, 7], [((1, 4), [(3, 4)])], [(6, 7)]),
    "held seqs below the word are dropped": ([1, 3], [((1, 4), [(2, 2), (4, 4)])], [(5, 5)]),
    "a held seq at the word's last one": ([1, 4], [((1, 4), [(2, 3)])], [(5, 5)]),
    "nothing new below the watermark": (
        [1, 2, 3],
        [((1, 4), [(4, 4)]), ((1, 3), []), ((1, 4), [])],
        [(5, 5)],
    ),
    "a second word records only what is new": ([1, 2], [((1, 4), [(3, 4)]), ((1, 6), [(5, 6)])], [(7, 7)]),
    "below the current chain's first link nothing is a hole": ([1, 2], [((10, 8), [])], [(9, 9)]),
}


@pytest.mark.parametrize(("seqs", "words", "then"), GONE.values(), ids=GONE)
def test_a_gone_statement_records_holes_and_moves_the_watermark(
    seqs: list[int],
    words: list[tuple[tuple[int, int], list[tuple[int, int]]]],
    then: list[tuple[int, int]],
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    _store(ledger, *seqs)
    marks = Watermarks(ledger)  # a fresh collector: what it knows comes from the ledger
    for (first, upto), holes in words:
        assert marks.gone("a1", "XRD", first, upto, b"signed status") == holes
    for seq, upto in then:
        assert marks.add("a1", "XRD", seq) == upto
    assert not marks.above[("a1", "XRD")]  # nothing at or below the watermark is still held
    ledger.close()


def test_a_hole_whose_links_arrived_later_does_not_lower_the_watermark(tmp_path: Path) -> None:
    """Links the agent sent before its word arrive after it was recorded (another collector, a slow
    broker): rebuilding the watermark from the ledger must not fall back to the hole's end."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    _store(ledger, 1, 2)
    assert Watermarks(ledger).gone("a1", "XRD", 1, 4, b"signed status") == [(3, 4)]
    _store(ledger, 3, 4, 5, 6)
    assert Watermarks(ledger).add("a1", "XRD", 7) == 7
    ledger.close()
