"""A ledger restored from an older backup: the agent's signed word that it holds some seqs no more lets the
watermark pass them, recorded as a hole; nothing else moves a watermark.

The collector's side runs the real ingest (``Collector.process``) on signed messages from the lab of
tests/attack.py; the agent's side is the real state file (``AgentStore.gone``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from labmeter import signing, wire
from labmeter.agent.outbox import AgentStore, Signer
from labmeter.agent.timeline import Span
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Collector, Watermarks
from labmeter.wire import State
from tests.attack import T0, H, Lab, genuine_start, hours_of, make_lab, process

I1 = ("agent-a", "I1")


def _status(
    lab: Lab, gone: dict[str, tuple[int, int]], agent: str = "agent-a", at: int = T0 + 5 * H
) -> bytes:
    key, kid = lab.keys[agent]
    return wire.seal_status(key, kid, wire.AgentStatus("agent-a", "online", at, 5, 0, "t", gone))


def _after_restore(tmp_path: Path) -> tuple[Lab, Collector]:
    """I1 seqs 1-2 are in the ledger; 3-5 were acknowledged and then lost with it; 6-7 arrive now."""
    lab = make_lab(tmp_path)
    c = Collector(lab.cfg)
    process(c, genuine_start(lab))
    prev = lab.genuine["I1:2"][1]
    for seq in range(3, 8):
        start = T0 + 2 * H + (seq - 3) * H // 2
        lab.interval("agent-a", "I1", seq, prev, start, start + H // 2, "RUNNING")
        prev = lab.genuine[f"I1:{seq}"][1]
    process(c, [(wire.interval_topic(*I1), lab.genuine[f"I1:{s}"][0]) for s in (6, 7)])
    assert c.watermarks.upto[I1] == 2  # waiting for 3-5, which nobody will send again
    return lab, c


def rebuilt_watermark(ledger: Ledger, agent: str, chain: str) -> int:
    """The watermark a fresh collector process starts from: the ledger's seqs and holes."""
    return Watermarks(ledger).add(agent, chain, 1)


def _close(c: Collector) -> None:
    c.ledger.close()
    c._pool.shutdown()


def test_the_agents_signed_word_records_a_hole_and_moves_the_watermark(tmp_path: Path) -> None:
    lab, c = _after_restore(tmp_path)
    try:
        statement = _status(lab, {"I1": (1, 5)})
        process(c, [(wire.status_topic("agent-a"), statement)])
        assert c.watermarks.upto[I1] == 7
        holes = c.ledger.holes()
        assert [(a, ch, f, last) for a, ch, f, last, _ in holes] == [("agent-a", "I1", 3, 5)]
        kept = c.ledger.db.execute("SELECT statement FROM holes").fetchone()[0]
        assert bytes(kept) == statement  # the signed statement itself: anyone can check why it moved
        assert c.stats["holes"] == 1
        assert rebuilt_watermark(c.ledger, *I1) == 7  # a restarted collector does not wait again
        # the lost hours are no data, never OFF or RUNNING; the intervals after the hole are stored
        h = hours_of(c.ledger, "I1")
        assert h.run_ms == H + H // 2  # seqs 1 and 7; 6, after the hole, is unverified (stored, not dropped)
        assert h.unverified_ms == H // 2
        assert h.uncovered_ms >= 3 * H // 2
        # the same statement again, or a replay of it: nothing more recorded
        process(c, [(wire.status_topic("agent-a"), statement)] * 2)
        assert len(c.ledger.holes()) == 1
    finally:
        _close(c)


def test_seqs_the_agent_still_holds_are_waited_for(tmp_path: Path) -> None:
    """gone ends below what the agent holds: those seqs are resent and stored, never a hole."""
    lab, c = _after_restore(tmp_path)
    try:
        process(c, [(wire.status_topic("agent-a"), _status(lab, {"I1": (1, 3)}))])
        assert c.watermarks.upto[I1] == 3
        process(c, [(wire.interval_topic(*I1), lab.genuine[f"I1:{s}"][0]) for s in (4, 5)])
        assert c.watermarks.upto[I1] == 7
        assert [(f, last) for _, _, f, last, _ in c.ledger.holes()] == [(3, 3)]
    finally:
        _close(c)


def test_seqs_stored_by_another_collector_are_not_holes(tmp_path: Path) -> None:
    """With a shared ledger the in-memory watermark may lag: the ledger itself says what is stored."""
    lab, c = _after_restore(tmp_path)
    try:
        other = Collector(lab.cfg)
        process(other, [(wire.interval_topic(*I1), lab.genuine["I1:4"][0])])
        _close(other)
        process(c, [(wire.status_topic("agent-a"), _status(lab, {"I1": (1, 5)}))])
        assert [(f, last) for _, _, f, last, _ in c.ledger.holes()] == [(3, 3), (5, 5)]
        assert c.watermarks.upto[I1] == 7
    finally:
        _close(c)


def _forged(lab: Lab) -> dict[str, bytes]:
    key, kid = lab.keys["agent-a"]
    good = wire.dump_body(wire.AgentStatus("agent-a", "online", T0 + 5 * H, 5, 0, "t", {"I1": (1, 5)}).body())
    other = signing.generate_key_file(lab.tmp / "mallory.key")
    bkey, bkid = lab.keys["agent-b"]
    return {
        "unsigned": good.encode(),
        "envelope_without_a_valid_signature": json.dumps(
            {"kid": kid, "body": good, "sig": "A" * 86 + "=="}
        ).encode(),
        "signed_by_an_unregistered_key": wire.seal(other, kid, good),
        "signed_by_another_agent": wire.seal(bkey, bkid, good),
        "agent_b_speaking_for_agent_a_on_its_own_topic": wire.seal(
            bkey, bkid, good.replace('"agent-a"', '"agent-b"')
        ),
        "gone_for_an_instrument_not_enrolled": wire.seal(key, kid, good.replace('"I1"', '"I3"')),
        "gone_with_an_out_of_range_seq": wire.seal(key, kid, good.replace("[1,5]", f"[1,{2**64}]")),
        "gone_with_a_bad_chain_name": wire.seal(key, kid, good.replace('"I1"', '"I1/../x"')),
        "too_many_gone_entries": wire.seal(
            key,
            kid,
            wire.dump_body(
                {
                    **wire.load_body(good),
                    "gone": {f"I{i}": [1, 5] for i in range(wire.MAX_GONE + 1)} | {"I1": [1, 5]},
                }
            ),
        ),
    }


FORGED = [
    "unsigned",
    "envelope_without_a_valid_signature",
    "signed_by_an_unregistered_key",
    "signed_by_another_agent",
    "agent_b_speaking_for_agent_a_on_its_own_topic",
    "gone_for_an_instrument_not_enrolled",
    "gone_with_an_out_of_range_seq",
    "gone_with_a_bad_chain_name",
    "too_many_gone_entries",
]


@pytest.mark.parametrize("case", FORGED)
def test_a_forged_or_unsigned_gone_statement_moves_nothing(case: str, tmp_path: Path) -> None:
    lab, c = _after_restore(tmp_path)
    try:
        payload = _forged(lab)[case]
        topic = wire.status_topic("agent-b" if "agent_b" in case else "agent-a")
        process(c, [(topic, payload)])
        assert c.watermarks.upto[I1] == 2
        assert c.ledger.holes() == []
        assert rebuilt_watermark(c.ledger, *I1) == 2
        # two cases are valid statuses, about nothing of agent-a's
        if "gone_for" not in case and "own_topic" not in case:
            assert c.stats["status_ignored"] == 1, case
        assert ("agent-b", "I1") not in c.watermarks.upto
    finally:
        _close(c)


def _store(tmp_path: Path) -> tuple[AgentStore, Signer]:
    key = signing.generate_key_file(tmp_path / "agent.key")
    return AgentStore(tmp_path / "agent.db"), Signer("a1", key, signing.key_id(key.public_key()))


def _spans(n: int, at: int = T0) -> list[Span]:
    return [Span(at + i * 1000, at + (i + 1) * 1000, State.OFF) for i in range(n)]


def test_the_agent_says_gone_only_for_what_it_no_longer_holds(tmp_path: Path) -> None:
    store, signer = _store(tmp_path)
    try:
        rows = store.emit(signer, "XRD", _spans(5), None)
        first = rows[0].seq
        assert store.gone() == {"XRD": (first, first - 1)}  # everything pending: nothing of this chain gone
        store.ack("XRD", first + 2)
        assert store.gone() == {"XRD": (first, first + 2)}
        dead = rows[3]
        body_sha = wire.body_hash(wire.open_envelope(dead.payload).body)
        assert store.reject("XRD", dead.seq, body_sha, "unknown agent")
        store.ack("XRD", first + 4)  # a dead letter is still held: `agent resend` may send it
        assert store.gone() == {"XRD": (first, first + 2)}
        store.resend_dead()
        store.ack("XRD", first + 4)
        assert store.gone() == {"XRD": (first, first + 4)}
        sign = store.emit_signin(signer, "XRD", T0, "ab" * 16)
        gone: dict[str, Any] = store.gone()
        assert gone[wire.signin_chain("XRD")] == (sign.seq, sign.seq - 1)
    finally:
        store.close()


def test_a_re_chained_agent_says_its_old_seqs_are_gone(tmp_path: Path) -> None:
    """After a conflict the links move to a new chain: the old seqs are gone, the new ones held."""
    store, signer = _store(tmp_path)
    try:
        rows = store.emit(signer, "XRD", _spans(3), None)
        moved = store.rechain(
            signer, "XRD", rows[1].seq, wire.body_hash(wire.open_envelope(rows[1].payload).body)
        )
        assert moved
        first, upto = store.gone()["XRD"]
        # rows[0] is still held, in the old chain
        assert first == moved[0].seq and upto == rows[0].seq - 1
        store.ack("XRD", rows[0].seq)
        assert store.gone()["XRD"] == (moved[0].seq, moved[0].seq - 1)
    finally:
        store.close()


def test_the_evidence_bundle_carries_the_hole_and_the_agents_statement(tmp_path: Path) -> None:
    from labmeter.collector.reports.evidence import write_bundle

    lab, c = _after_restore(tmp_path)
    try:
        statement = _status(lab, {"I1": (1, 5)})
        process(c, [(wire.status_topic("agent-a"), statement)])
        out = tmp_path / "bundle"
        key = signing.generate_key_file(tmp_path / "collector.key")
        bundle = write_bundle(c.ledger, "I1", T0, T0 + 5 * H, 900, 600, out, key)
    finally:
        _close(c)
    [hole] = bundle["holes"]
    assert (hole["agent"], hole["chain"], hole["first_seq"], hole["last_seq"]) == ("agent-a", "I1", 3, 5)
    env = wire.open_envelope(hole["statement"].encode())
    pub = lab.keys["agent-a"][0].public_key()
    assert signing.verify(pub, env.body.encode(), env.sig)  # checkable with the agent's key alone
    assert wire.decode_status(env.body).gone == {"I1": (1, 5)}
    assert json.loads((out / "bundle.json").read_text())["holes"] == bundle["holes"]
