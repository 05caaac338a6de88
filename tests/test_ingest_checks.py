"""Each ingest rule on its own: the reason, whether the rejection is authentic (may move a watermark), and
what the agent is told; then the acknowledgements a batch produces.

In process and without a broker (test_verification.py drives the same rules through Mosquitto and the
built-in broker): the collector's MQTT link is replaced by a list that records what it would publish, so
each rule costs milliseconds and the mutation run (benchmarks/mutate.py) can afford them all.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from labmeter import signing, wire
from labmeter.clock import Clock
from labmeter.collector import verify
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Collector
from labmeter.collector.verify import Accepted, AcceptedSignIn, OpenState, Rejected, Status, Verifier
from tests.lab import ack_body, collector_config, make_agent_key

H = 3_600_000
NOW = int(time.time() * 1000)
T0 = NOW // H * H - 5 * H
USER = "ab" * 16
Y2000 = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1000)  # the earliest time a body may name


class Agent:
    def __init__(self, tmp: Path, name: str) -> None:
        self.name = name
        self.key, self.pub, self.kid = make_agent_key(tmp, name)

    def seal(self, body: dict[str, Any] | str) -> bytes:
        return wire.seal(self.key, self.kid, body if isinstance(body, str) else wire.dump_body(body))

    def interval(
        self, instrument: str, seq: int, prev: str, start: int, end: int, state: str = "RUNNING"
    ) -> dict:
        return wire.Interval(self.name, instrument, seq, prev, start, end, state).body()


@dataclass
class Lab:
    tmp: Path
    ledger: Ledger
    a: Agent
    b: Agent
    verifier: Verifier


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    a, b = Agent(tmp_path, "a1"), Agent(tmp_path, "b1")
    ledger.add_agent("a1", a.pub, a.kid, ["I1"])
    ledger.add_agent("b1", b.pub, b.kid, ["I2"])
    yield Lab(tmp_path, ledger, a, b, Verifier(ledger, Clock(), 300))
    ledger.close()


def _rejected(lab: Lab, topic: str, payload: bytes) -> Any:
    with pytest.raises(Rejected) as e:
        lab.verifier.check(topic, payload)
    return e.value.rejection


def iv(lab: Lab, **change: Any) -> dict[str, Any]:
    body = lab.a.interval("I1", 5, "1" * 64, T0, T0 + H)
    body.update(change)
    return body


def open_body(start: int, state: str = "RUNNING") -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "open",
        "agent": "a1",
        "instrument": "I1",
        "start": start,
        "state": state,
        "at": NOW,
    }


# name -> (topic, payload maker, reason part, authentic, answered)
ITOPIC = wire.interval_topic("a1", "I1")
CASES: dict[str, tuple[str, Any, str, bool, bool]] = {
    "topic_outside_the_tree": (
        "other/a1/I1/interval",
        lambda lab: lab.a.seal(iv(lab)),
        "topic",
        False,
        False,
    ),
    "unknown_kind": (
        "labmeter/v1/a1/I1/bogus",
        lambda lab: lab.a.seal(iv(lab)),
        "unknown message kind",
        False,
        False,
    ),
    "agent_topic_of_another_kind": (
        "labmeter/v1/a1/ack",
        lambda lab: lab.a.seal(iv(lab)),
        "unknown message kind",
        False,
        False,
    ),
    "status_on_an_instrument_topic": (
        "labmeter/v1/a1/I1/status",
        lambda lab: lab.a.seal(iv(lab)),
        "unknown message kind",
        False,
        False,
    ),
    "not_json": (ITOPIC, lambda lab: b'{"kid": "x", "body": ', "JSON", False, False),
    "unknown_agent": (
        wire.interval_topic("ghost", "I1"),
        lambda lab: lab.a.seal(iv(lab, agent="ghost")),
        "unknown agent",
        False,
        True,
    ),
    "another_agents_key_id": (ITOPIC, lambda lab: lab.b.seal(iv(lab)), "key id", False, False),
    "bad_signature": (
        ITOPIC,
        lambda lab: json.dumps(
            {**json.loads(lab.a.seal(iv(lab))), "sig": json.loads(lab.b.seal(iv(lab)))["sig"]}
        ).encode(),
        "bad signature",
        False,
        False,
    ),
    "genuine_body_replayed_on_another_instruments_topic": (
        wire.interval_topic("a1", "I9"),
        lambda lab: lab.a.seal(iv(lab)),
        "do not match the topic",
        False,
        False,
    ),
    "body_names_another_agent": (
        ITOPIC,
        lambda lab: lab.a.seal(iv(lab, agent="b1")),
        "do not match",
        False,
        False,
    ),
    "body_names_another_kind": (
        ITOPIC,
        lambda lab: lab.a.seal(iv(lab, kind="signin")),
        "do not match",
        False,
        False,
    ),
    "signed_body_not_an_object": (
        ITOPIC,
        lambda lab: lab.a.seal("[1, 2]"),
        "object",
        False,
        False,
    ),
    "not_enrolled": (
        wire.interval_topic("a1", "I2"),
        lambda lab: lab.a.seal(iv(lab, instrument="I2")),
        "not enrolled",
        False,
        True,
    ),
    "bad_state": (ITOPIC, lambda lab: lab.a.seal(iv(lab, state="BOGUS")), "state", True, True),
    "wrong_version": (ITOPIC, lambda lab: lab.a.seal(iv(lab, v=2)), "version", True, True),
    "seq_zero_names_no_link": (ITOPIC, lambda lab: lab.a.seal(iv(lab, seq=0)), "seq", False, False),
    "longer_than_a_day": (
        ITOPIC,
        lambda lab: lab.a.seal(iv(lab, start=T0 - 25 * H)),
        "longer than a day",
        True,
        True,
    ),
    "end_not_after_start": (ITOPIC, lambda lab: lab.a.seal(iv(lab, end=T0)), "not after start", True, True),
    "start_before_2000": (
        ITOPIC,
        lambda lab: lab.a.seal(iv(lab, start=Y2000 - H, end=Y2000 - 1)),
        "before 2000",
        True,
        True,
    ),
    "end_in_the_future": (
        ITOPIC,
        lambda lab: lab.a.seal(iv(lab, start=NOW, end=NOW + 2 * H)),
        "future",
        True,
        True,
    ),
    "signin_in_the_future": (
        wire.signin_topic("a1", "I1"),
        lambda lab: lab.a.seal(wire.SignIn("a1", "I1", 3, "2" * 64, NOW + H, USER).body()),
        "sign-in time",
        True,
        True,
    ),
    "signin_before_2000": (
        wire.signin_topic("a1", "I1"),
        lambda lab: lab.a.seal(wire.SignIn("a1", "I1", 3, "2" * 64, Y2000 - 1, USER).body()),
        "sign-in time",
        True,
        True,
    ),
    "open_interval_from_the_future": (
        wire.open_topic("a1", "I1"),
        lambda lab: lab.a.seal(open_body(NOW + H)),
        "open interval start",
        False,
        False,
    ),
    "open_interval_before_2000": (
        wire.open_topic("a1", "I1"),
        lambda lab: lab.a.seal(open_body(Y2000 - 1)),
        "open interval start",
        False,
        False,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_rule_rejects_with_its_reason_and_authenticity(lab: Lab, case: str) -> None:
    topic, make, reason, authentic, answered = CASES[case]
    r = _rejected(lab, topic, make(lab))
    assert reason in r.reason
    assert r.authentic is authentic
    assert r.answer is answered
    assert r.counts_for() == (r.chain if authentic else None)
    if authentic:
        assert r.seq in (3, 5) and r.body_sha == wire.body_hash(wire.open_envelope(make(lab)).body)
        assert r.chain == ("I1@signin" if "/signin" in topic else "I1")
        assert r.chain_start is False
    else:
        assert r.chain is None and r.chain_start is False


def test_an_authentic_rejection_of_a_first_link_starts_its_chain(lab: Lab) -> None:
    future = {"start": NOW + H, "end": NOW + 2 * H}
    r = _rejected(lab, ITOPIC, lab.a.seal(iv(lab, seq=1, prev=wire.GENESIS, **future)))
    assert (r.authentic, r.chain_start, r.seq) == (True, True, 1)
    later = _rejected(lab, ITOPIC, lab.a.seal(iv(lab, seq=2, **future)))
    assert (later.authentic, later.chain_start) == (True, False)
    forged = _rejected(lab, ITOPIC, lab.b.seal(iv(lab, seq=1, prev=wire.GENESIS, **future)))
    assert (forged.authentic, forged.chain_start) == (False, False)


def test_the_limits_themselves_are_accepted(lab: Lab) -> None:
    """Boundaries: a day-long interval, one ending at now + max_future, a sign-in at 2000-01-01."""
    v = lab.verifier
    day = v.check(ITOPIC, lab.a.seal(iv(lab, start=T0 - 19 * H, end=T0 + 5 * H)))
    assert isinstance(day, Accepted) and day.interval.end_ms - day.interval.start_ms == wire.MAX_INTERVAL_MS
    edge = int(time.time() * 1000) + 300_000 - 5_000  # the fixture's max_future_s = 300
    late = v.check(ITOPIC, lab.a.seal(iv(lab, start=edge - H, end=edge)))
    assert isinstance(late, Accepted)
    assert "future" in _rejected(lab, ITOPIC, lab.a.seal(iv(lab, start=edge, end=edge + 20_000))).reason
    old = v.check(ITOPIC, lab.a.seal(iv(lab, start=Y2000, end=Y2000 + H)))
    assert isinstance(old, Accepted) and old.interval.start_ms == Y2000
    si = v.check(
        wire.signin_topic("a1", "I1"),
        lab.a.seal(wire.SignIn("a1", "I1", 1, wire.GENESIS, Y2000, USER).body()),
    )
    assert isinstance(si, AcceptedSignIn) and si.signin.at == Y2000
    op = v.check(
        wire.open_topic("a1", "I1"),
        lab.a.seal(open_body(Y2000, "OFF")),
    )
    assert isinstance(op, OpenState) and op.agent == "a1" and op.body["state"] == "OFF"


def test_an_accepted_interval_keeps_its_body_hash_note_and_envelope(lab: Lab) -> None:
    payload = lab.a.seal(iv(lab, note="lamp changed"))
    got = lab.verifier.check(ITOPIC, payload)
    assert isinstance(got, Accepted)
    assert got.note == "lamp changed"
    assert got.interval.sha == wire.body_hash(wire.open_envelope(payload).body)
    assert got.interval.envelope == payload
    assert (got.interval.agent, got.interval.instrument, got.interval.seq) == ("a1", "I1", 5)


def test_a_newcomer_is_found_once_the_registry_snapshot_is_old(lab: Lab) -> None:
    c = Agent(lab.tmp, "c1")
    lab.ledger.add_agent("c1", c.pub, c.kid, ["I3"])
    payload = c.seal(c.interval("I3", 1, wire.GENESIS, T0, T0 + H))
    topic = wire.interval_topic("c1", "I3")
    assert "unknown agent" in _rejected(lab, topic, payload).reason  # snapshot fresh: no query per message
    lab.verifier._loaded -= verify.RELOAD_EVERY_S + 1
    assert isinstance(lab.verifier.check(topic, payload), Accepted)
    lab.ledger.add_agent("c1", c.pub, c.kid, ["I3", "I4"])
    p4 = c.seal(c.interval("I4", 1, wire.GENESIS, T0, T0 + H))
    assert "not enrolled" in _rejected(lab, wire.interval_topic("c1", "I4"), p4).reason
    lab.verifier._loaded -= verify.RELOAD_EVERY_S + 1
    assert isinstance(lab.verifier.check(wire.interval_topic("c1", "I4"), p4), Accepted)


# ---- status and power: never stored; only a registered agent's signed message counts


def status(who: Agent, **change: Any) -> dict[str, Any]:
    body = wire.AgentStatus(who.name, "online", NOW, 1).body()
    body.update(change)
    return body


STATUS_CASES: dict[str, tuple[str, Any, str, bool]] = {
    "unknown_agent": ("ghost", lambda lab: lab.a.seal(status(lab.a, agent="ghost")), "unknown agent", False),
    "unsigned": ("a1", lambda lab: wire.dump_body(status(lab.a)).encode(), "unsigned", True),
    "another_key": ("a1", lambda lab: lab.b.seal(status(lab.a)), "not signed by", True),
    "the_agents_key_id_on_another_keys_signature": (
        "a1",
        lambda lab: wire.seal(lab.b.key, lab.a.kid, wire.dump_body(status(lab.a))),
        "not signed by",
        True,
    ),
    "bad_body": ("a1", lambda lab: lab.a.seal(status(lab.a, status="maybe")), "status body", True),
    "names_another_agent": ("a1", lambda lab: lab.a.seal(status(lab.a, agent="b1")), "another agent", True),
    "from_the_future": ("a1", lambda lab: lab.a.seal(status(lab.a, at=NOW + H)), "future", True),
}


@pytest.mark.parametrize("case", STATUS_CASES)
def test_a_status_counts_only_from_its_agents_key(lab: Lab, case: str) -> None:
    agent, make, problem, registered = STATUS_CASES[case]
    s = lab.verifier.check(wire.status_topic(agent), make(lab))
    assert isinstance(s, Status)
    assert s.report is None and not s.online
    assert problem in s.problem
    assert s.registered is registered


def test_a_signed_status_is_reported(lab: Lab) -> None:
    s = lab.verifier.check(wire.status_topic("a1"), lab.a.seal(status(lab.a)))
    assert isinstance(s, Status) and s.registered and s.problem == "" and s.online
    off = lab.verifier.check(wire.status_topic("a1"), lab.a.seal(status(lab.a, status="offline")))
    assert isinstance(off, Status) and off.report is not None and not off.online


def power(agent: str = "a1", instrument: str = "I1", **change: Any) -> dict[str, Any]:
    body = wire.Power(agent, instrument, NOW - 60_000, NOW, 10, 100.0, 90.0, 110.0).body()
    body.update(change)
    return body


POWER_CASES: dict[str, tuple[str, Any, str, bool]] = {
    "not_a_power_topic": (ITOPIC, lambda lab: lab.a.seal(power()), "unknown message kind", False),
    "not_json": (wire.power_topic("a1", "I1"), lambda lab: b"{", "JSON", False),
    "unknown_agent": (
        wire.power_topic("ghost", "I1"),
        lambda lab: lab.a.seal(power("ghost")),
        "unknown agent",
        False,
    ),
    "another_key": (wire.power_topic("a1", "I1"), lambda lab: lab.b.seal(power()), "bad signature", False),
    "the_agents_key_id_on_another_keys_signature": (
        wire.power_topic("a1", "I1"),
        lambda lab: wire.seal(lab.b.key, lab.a.kid, wire.dump_body(power())),
        "bad signature",
        False,
    ),
    "malformed_topic": (
        "labmeter/v2/a1/I1/power",
        lambda lab: lab.a.seal(power()),
        "is not labmeter/v1/",
        False,
    ),
    "bad_body": (wire.power_topic("a1", "I1"), lambda lab: lab.a.seal(power(n="x")), "", True),
    "body_names_another_instrument": (
        wire.power_topic("a1", "I1"),
        lambda lab: lab.a.seal(power(instrument="I2")),
        "do not match",
        True,
    ),
    "body_names_another_agent": (
        wire.power_topic("a1", "I1"),
        lambda lab: lab.a.seal(power(agent="b1")),
        "do not match",
        True,
    ),
    "not_enrolled": (
        wire.power_topic("a1", "I2"),
        lambda lab: lab.a.seal(power(instrument="I2")),
        "not enrolled",
        True,
    ),
    "before_2000": (
        wire.power_topic("a1", "I1"),
        lambda lab: lab.a.seal(power(start=Y2000 - 60_000, end=Y2000 - 1)),
        "implausible",
        True,
    ),
    "from_the_future": (
        wire.power_topic("a1", "I1"),
        lambda lab: lab.a.seal(power(start=NOW + H, end=NOW + H + 60_000)),
        "implausible",
        True,
    ),
}


@pytest.mark.parametrize("case", POWER_CASES)
def test_power_rules(lab: Lab, case: str) -> None:
    topic, make, reason, authentic = POWER_CASES[case]
    with pytest.raises(Rejected) as e:
        lab.verifier.check_power(topic, make(lab))
    assert reason in e.value.rejection.reason
    assert e.value.rejection.authentic is authentic


def test_a_signed_power_window_is_returned(lab: Lab) -> None:
    p = lab.verifier.check_power(wire.power_topic("a1", "I1"), lab.a.seal(power()))
    assert (p.agent, p.instrument, p.n, p.mean_w) == ("a1", "I1", 10, 100.0)


# ---- a batch through the collector: what is stored and what each agent is told


class Link:
    """Stands in for the MQTT link: records what the collector publishes."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[Collector, Agent, Agent, Link]]:
    cfg = collector_config(tmp_path, "mqtt://127.0.0.1:1")
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    a, b = Agent(tmp_path, "a1"), Agent(tmp_path, "b1")
    ledger.add_agent("a1", a.pub, a.kid, ["I1"])
    ledger.add_agent("b1", b.pub, b.kid, ["I2"])
    ledger.close()
    c = Collector(cfg)
    link = Link()
    c.link = link  # type: ignore[assignment]
    c.key = signing.generate_key_file(tmp_path / "collector.key")
    yield c, a, b, link
    c._pool.shutdown()
    c.ledger.close()


def run_batch(c: Collector, link: Link, batch: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    """Process one batch; the acks it published, by agent (signatures checked)."""
    link.sent.clear()
    asyncio.run(c.process(batch))
    assert c.key is not None
    out: dict[str, dict[str, Any]] = {}
    for topic, payload in link.sent:
        env = wire.open_envelope(payload)
        assert signing.SignatureChecker(c.key.public_key())(env.body.encode(), env.sig)
        body = ack_body(payload)
        assert topic == wire.ack_topic(body["agent"])
        prev = out.setdefault(body["agent"], {"acks": {}, "rejects": []})
        prev["acks"].update(body.get("acks", {}))
        prev["rejects"] += body.get("rejects", [])
    return out


def chain(
    a: Agent, n: int, first: int = 1, prev: str = wire.GENESIS, instrument: str = "I1"
) -> list[tuple[bytes, str]]:
    out = []
    for i, seq in enumerate(range(first, first + n)):
        body = wire.dump_body(a.interval(instrument, seq, prev, T0 + i * 600_000, T0 + (i + 1) * 600_000))
        prev = wire.body_hash(body)
        out.append((wire.seal(a.key, a.kid, body), prev))
    return out


def stored(c: Collector) -> list[int]:
    return [int(r[0]) for r in c.ledger.db.execute("SELECT seq FROM intervals ORDER BY seq")]


def test_contiguous_intervals_are_stored_and_acknowledged_up_to_the_newest_body(collector: Any) -> None:
    c, a, _b, link = collector
    links = chain(a, 3)
    acks = run_batch(c, link, [(ITOPIC, p) for p, _ in links])
    assert stored(c) == [1, 2, 3]
    assert acks["a1"]["acks"] == {"I1": {"seq": 3, "sha256": links[2][1]}}
    assert acks["a1"]["rejects"] == []
    assert c.stats["stored"] == 3 and c.stats["rejected"] == 0


def test_a_gap_holds_the_watermark_until_it_is_filled(collector: Any) -> None:
    c, a, _b, link = collector
    links = chain(a, 3)
    acks = run_batch(c, link, [(ITOPIC, links[0][0]), (ITOPIC, links[2][0])])
    assert acks["a1"]["acks"]["I1"] == {"seq": 1, "sha256": links[0][1]}
    acks = run_batch(c, link, [(ITOPIC, links[1][0])])
    assert acks["a1"]["acks"]["I1"] == {"seq": 2, "sha256": links[1][1]}  # the newest body this batch holds
    assert c.watermarks.upto[("a1", "I1")] == 3


def test_an_ack_for_a_link_beyond_this_batch_names_nothing(collector: Any) -> None:
    c, a, _b, link = collector
    links = chain(a, 3)
    run_batch(c, link, [(ITOPIC, links[0][0])])
    acks = run_batch(c, link, [(ITOPIC, links[2][0])])  # seq 3 above a gap: the watermark stays at 1
    assert acks == {}  # no body at or below 1 in this batch: acknowledging seq 1 again would name no hash


def test_an_authentic_rejection_moves_the_watermark_and_tells_the_agent(collector: Any) -> None:
    c, a, _b, link = collector
    links = chain(a, 1)
    run_batch(c, link, [(ITOPIC, links[0][0])])
    bad = a.seal(a.interval("I1", 2, links[0][1], T0 + H, T0 + H + 600_000, "BOGUS"))
    acks = run_batch(c, link, [(ITOPIC, bad)])
    sha = wire.body_hash(wire.open_envelope(bad).body)
    assert acks["a1"]["acks"] == {"I1": {"seq": 2, "sha256": sha}}
    assert [(r["instrument"], r["seq"], r["sha256"]) for r in acks["a1"]["rejects"]] == [("I1", 2, sha)]
    assert c.rejections and c.stats["rejected"] == 1


def test_a_forged_rejection_moves_no_watermark_and_is_not_answered(collector: Any) -> None:
    """docs/decisions.md: a rejection whose authenticity is unknown never advances the acknowledgement."""
    c, a, b, link = collector
    links = chain(a, 1)
    run_batch(c, link, [(ITOPIC, links[0][0])])
    forged = b.seal(a.interval("I1", 2, links[0][1], T0 + H, T0 + H + 600_000))
    replay = a.seal(a.interval("I1", 3, links[0][1], T0 + H, T0 + H + 600_000))
    acks = run_batch(c, link, [(ITOPIC, forged), (wire.interval_topic("a1", "I9"), replay)])
    assert acks == {}
    assert c.watermarks.upto[("a1", "I1")] == 1
    assert c.stats["rejected"] == 2
    kept = c.ledger.rejection_summary()
    assert kept and all(not authentic for *_x, authentic in kept)


def test_a_message_from_an_unknown_agent_is_answered_but_counts_for_no_chain(collector: Any) -> None:
    c, _a, _b, link = collector
    ghost = Agent(c.cfg.collector.data_dir, "ghost")
    payload = ghost.seal(ghost.interval("I1", 1, wire.GENESIS, T0, T0 + H))
    acks = run_batch(c, link, [(wire.interval_topic("ghost", "I1"), payload)])
    assert acks["ghost"]["acks"] == {}
    assert [r["seq"] for r in acks["ghost"]["rejects"]] == [1]
    assert ("ghost", "I1") not in c.watermarks.upto


def test_a_conflicting_body_at_a_stored_seq_is_rejected_and_the_stored_one_kept(collector: Any) -> None:
    c, a, _b, link = collector
    links = chain(a, 2)
    run_batch(c, link, [(ITOPIC, p) for p, _ in links])
    other = a.seal(a.interval("I1", 2, links[0][1], T0 + 600_000, T0 + 900_000, "OFF"))
    acks = run_batch(c, link, [(ITOPIC, other)])
    assert stored(c) == [1, 2]
    state = c.ledger.db.execute("SELECT state FROM intervals WHERE seq = 2").fetchone()[0]
    assert state == "RUNNING"
    assert [r["seq"] for r in acks["a1"]["rejects"]] == [2]
    assert c.stats["stored"] == 2


def test_a_resend_is_acknowledged_with_its_own_body(collector: Any) -> None:
    c, a, _b, link = collector
    links = chain(a, 3)
    run_batch(c, link, [(ITOPIC, p) for p, _ in links])
    acks = run_batch(c, link, [(ITOPIC, links[1][0])])
    assert acks["a1"]["acks"]["I1"] == {"seq": 2, "sha256": links[1][1]}
    assert stored(c) == [1, 2, 3]


def test_a_new_chain_after_lost_state_is_acknowledged_from_its_first_link(collector: Any) -> None:
    c, a, _b, link = collector
    run_batch(c, link, [(ITOPIC, p) for p, _ in chain(a, 2)])
    start = 1_795_000_000_000
    fresh = chain(a, 2, first=start)
    acks = run_batch(c, link, [(ITOPIC, p) for p, _ in fresh])
    assert acks["a1"]["acks"]["I1"] == {"seq": start + 1, "sha256": fresh[1][1]}


def test_signins_are_stored_and_acknowledged_on_their_own_chain(collector: Any) -> None:
    c, a, _b, link = collector
    body = wire.dump_body(wire.SignIn("a1", "I1", 1, wire.GENESIS, NOW - 1000, USER).body())
    acks = run_batch(c, link, [(wire.signin_topic("a1", "I1"), wire.seal(a.key, a.kid, body))])
    assert acks["a1"]["acks"] == {"I1@signin": {"seq": 1, "sha256": wire.body_hash(body)}}
    assert c.ledger.recent_signins("I1") and c.stats["signins"] == 1


def test_one_batch_of_every_kind_goes_each_its_own_way(collector: Any) -> None:
    """Intervals, a sign-in, a status, a power window and an open state from one agent in one batch: each
    reaches its own place (ledger, live agent, live power, live state) and only the first two are acked."""
    c, a, _b, link = collector
    links = chain(a, 2)
    signin = wire.dump_body(wire.SignIn("a1", "I1", 1, wire.GENESIS, NOW - 1000, USER).body())
    batch = [
        (ITOPIC, links[0][0]),
        (wire.status_topic("a1"), a.seal(status(a))),
        (wire.power_topic("a1", "I1"), a.seal(power())),
        (wire.open_topic("a1", "I1"), a.seal(open_body(NOW - 60_000))),
        (wire.signin_topic("a1", "I1"), wire.seal(a.key, a.kid, signin)),
        (ITOPIC, links[1][0]),
    ]
    hooked: list[str] = []
    c.live_hooks.append(lambda kind, data: hooked.append(kind))
    acks = run_batch(c, link, batch)
    assert stored(c) == [1, 2] and c.stats["signins"] == 1 and c.stats["rejected"] == 0
    assert sorted(hooked) == ["agent", "power", "state"]
    assert acks["a1"]["acks"] == {
        "I1": {"seq": 2, "sha256": links[1][1]},
        "I1@signin": {"seq": 1, "sha256": wire.body_hash(signin)},
    }
    assert c.live.agents["a1"]["online"] is True and c.live.agents["a1"]["verified"] is True
    assert c.live.power["I1"]["mean_w"] == 100.0
    assert (
        c.live.instruments["I1"]["state"] == "RUNNING" and c.live.instruments["I1"]["start"] == NOW - 60_000
    )


def test_rejection_reasons_are_counted_by_their_fixed_part_up_to_a_cap(
    collector: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status page's counter of reasons: one key per reason's fixed part, the rest as "other" once the
    cap is reached, so a flood of made-up reasons cannot grow it."""
    monkeypatch.setattr("labmeter.collector.service.MAX_REASON_KEYS", 2)
    c, a, b, link = collector
    body = a.interval("I1", 1, wire.GENESIS, T0, T0 + H)
    batch = [
        (wire.interval_topic("ghost", "I1"), a.seal(body)),
        (ITOPIC, b.seal(body)),
        (wire.interval_topic("ghost", "I1"), a.seal({**body, "seq": 2})),  # a reason already counted
        (wire.interval_topic("ghost2", "I1"), a.seal(body)),  # beyond the cap
        (ITOPIC, wire.seal(b.key, a.kid, wire.dump_body(body))),  # beyond the cap
    ]
    run_batch(c, link, batch)
    assert dict(c.rejections) == {
        "unknown agent 'ghost'": 2,
        f"key id '{b.kid}' is not the key registered for agent 'a1'": 1,
        "other": 2,
    }
    assert c.stats["rejected"] == 5


class FixedClock(Clock):
    def __init__(self, now_ms: int) -> None:
        super().__init__()
        self.now = now_ms

    def wall_ms(self) -> int:
        return self.now


def test_max_future_is_inclusive_to_the_millisecond(lab: Lab) -> None:
    """``max_future_s`` is how far ahead a body may be: exactly that far passes, one millisecond more fails."""
    now = NOW // 1000 * 1000
    v = Verifier(lab.ledger, FixedClock(now), 300)
    edge = now + 300_000
    assert isinstance(v.check(ITOPIC, lab.a.seal(iv(lab, start=edge - H, end=edge))), Accepted)
    late = lab.a.seal(iv(lab, start=edge - H, end=edge + 1))
    with pytest.raises(Rejected, match="future"):
        v.check(ITOPIC, late)
    signin = wire.signin_topic("a1", "I1")
    assert isinstance(
        v.check(signin, lab.a.seal(wire.SignIn("a1", "I1", 1, wire.GENESIS, edge, USER).body())),
        AcceptedSignIn,
    )
    with pytest.raises(Rejected, match="sign-in time"):
        v.check(signin, lab.a.seal(wire.SignIn("a1", "I1", 1, wire.GENESIS, edge + 1, USER).body()))
    opened = wire.open_topic("a1", "I1")
    assert isinstance(v.check(opened, lab.a.seal(open_body(edge))), OpenState)
    assert isinstance(v.check(opened, lab.a.seal(open_body(now - 60_000))), OpenState)  # the usual case
    with pytest.raises(Rejected, match="open interval start"):
        v.check(opened, lab.a.seal(open_body(edge + 1)))
    at_edge = v.check(wire.status_topic("a1"), lab.a.seal(status(lab.a, at=edge)))
    assert isinstance(at_edge, Status) and at_edge.report is not None
    beyond = v.check(wire.status_topic("a1"), lab.a.seal(status(lab.a, at=edge + 1)))
    assert isinstance(beyond, Status) and beyond.report is None and "future" in beyond.problem
    ptopic = wire.power_topic("a1", "I1")
    assert v.check_power(ptopic, lab.a.seal(power(start=edge - 60_000, end=edge))).end == edge
    assert v.check_power(ptopic, lab.a.seal(power(start=Y2000, end=Y2000 + 60_000))).start == Y2000
    for start, end in ((edge - 60_000, edge + 1), (Y2000 - 1, Y2000 + 60_000)):
        with pytest.raises(Rejected, match="implausible power window"):
            v.check_power(ptopic, lab.a.seal(power(start=start, end=end)))


def test_a_newcomers_status_is_recognised_once_the_snapshot_is_old(lab: Lab) -> None:
    c = Agent(lab.tmp, "c1")
    lab.ledger.add_agent("c1", c.pub, c.kid, ["I3"])
    payload = c.seal(status(c))
    s = lab.verifier.check(wire.status_topic("c1"), payload)
    assert isinstance(s, Status) and not s.registered
    lab.verifier._loaded -= verify.RELOAD_EVERY_S + 1
    s = lab.verifier.check(wire.status_topic("c1"), payload)
    assert isinstance(s, Status) and s.registered and s.online


def test_a_newcomers_power_and_new_enrolment_are_recognised_once_the_snapshot_is_old(lab: Lab) -> None:
    c = Agent(lab.tmp, "c1")
    lab.ledger.add_agent("c1", c.pub, c.kid, ["I3"])
    p3, topic3 = c.seal(power("c1", "I3")), wire.power_topic("c1", "I3")
    with pytest.raises(Rejected, match="unknown agent"):
        lab.verifier.check_power(topic3, p3)
    lab.verifier._loaded -= verify.RELOAD_EVERY_S + 1
    assert lab.verifier.check_power(topic3, p3).instrument == "I3"
    lab.ledger.add_agent("c1", c.pub, c.kid, ["I3", "I4"])
    p4, topic4 = c.seal(power("c1", "I4")), wire.power_topic("c1", "I4")
    with pytest.raises(Rejected, match="not enrolled"):
        lab.verifier.check_power(topic4, p4)
    lab.verifier._loaded -= verify.RELOAD_EVERY_S + 1
    assert lab.verifier.check_power(topic4, p4).instrument == "I4"
