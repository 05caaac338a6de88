"""Property: whatever arrives, ``Collector.process`` raises nothing, and a genuine agent's intervals sent in
the same batches are all stored, acknowledged and counted exactly as they would be alone.

Hostile messages (hypothesis): any topic, raw bytes, envelopes of the wrong shape, bodies with fields
replaced by huge or negative integers, floats, strings, nulls, lists; bodies signed with a registered
agent's valid key (agent-a's) over all of that; and replays of the genuine agent's own envelopes on
other topics. The genuine agent (agent-b) never signs anything hostile, so its chain is the invariant.
Runs on a real SQLite ledger in tmp_path, no broker.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labmeter import wire
from labmeter.collector.service import Collector
from labmeter.machine_hours import compute
from tests.attack import T0, H, base_body, genuine_start, hours_of, make_lab, process

M = 60_000
TOPICS = [
    "labmeter/v1/agent-a/I1/interval",
    "labmeter/v1/agent-a/I1/open",
    "labmeter/v1/agent-a/I1/signin",
    "labmeter/v1/agent-a/I3/interval",
    "labmeter/v1/agent-b/I3/interval",
    "labmeter/v1/agent-b/I3/open",
    "labmeter/v1/agent-b/I3/signin",
    "labmeter/v1/ghost/I1/interval",
    "labmeter/v1/agent-a/status",
]
FIELDS = [
    "v",
    "kind",
    "agent",
    "instrument",
    "seq",
    "prev",
    "start",
    "end",
    "state",
    "note",
    "clock_step_ms",
    "at",
    "user",
]

INTEGERS = ["seq", "start", "end", "at", "clock_step_ms"]
EDGES = [0, -1, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, -(2**64)]
values = st.one_of(
    st.sampled_from([0, 1, -1, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, T0, T0 + 10**15]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.sampled_from(["RUNNING", "OFF", "agent-a", "agent-b", "I1", "I3", wire.GENESIS, "<script>"]),
)


@st.composite
def hostile(draw: st.DrawFn, lab: Any, sent: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """Mostly a body on its own topic with one to three fields broken, so it gets past the cheap checks."""
    other_topic = draw(st.one_of(st.sampled_from(TOPICS), st.text(max_size=80)))
    how = draw(st.sampled_from(["signed", "signed", "unsigned", "raw", "envelope", "replay", "edge", "edge"]))
    if how == "raw":
        return other_topic, draw(st.binary(max_size=200))
    if how == "envelope":
        env = {"kid": draw(values), "body": draw(values), "sig": draw(values)}
        return other_topic, json.dumps(env).encode()
    if how == "replay":
        return other_topic, sent[draw(st.integers(0, len(sent) - 1))][1]
    kind = draw(st.sampled_from(["interval", "open", "signin"]))
    code = draw(st.sampled_from(["I1", "I2", "I3"]))
    body = base_body(lab, kind, "agent-a", code)
    if how == "edge":  # a valid signature over one integer at the edge of what a ledger column holds
        body[draw(st.sampled_from(INTEGERS))] = draw(st.sampled_from(EDGES))
        return f"labmeter/v1/agent-a/{code}/{kind}", lab.sign("agent-a", wire.dump_body(body))
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
        if draw(st.integers(0, 4)):
            body[field] = draw(values)
        else:
            body.pop(field, None)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    topic = f"labmeter/v1/agent-a/{code}/{kind}" if draw(st.integers(0, 3)) else other_topic
    if how == "signed":
        return topic, lab.sign("agent-a", text)
    forged = json.loads(lab.sign("agent-a", text + " "))
    return topic, json.dumps({"kid": forged["kid"], "body": text, "sig": forged["sig"]}).encode()


GENUINE = 3


def genuine_chain(lab: Any) -> list[tuple[str, bytes]]:
    out, prev = [], wire.GENESIS
    for seq in range(1, GENUINE + 1):
        start = T0 + seq * M
        out.append(
            (
                wire.interval_topic("agent-b", "I3"),
                lab.interval("agent-b", "I3", seq, prev, start, start + M, "RUNNING"),
            )
        )
        prev = lab.genuine[f"I3:{seq}"][1]
    return out


EXPECTED = compute(
    [(T0 + s * M, T0 + (s + 1) * M, "RUNNING", True) for s in range(1, GENUINE + 1)],
    T0 - H,
    T0 + 12 * H,
    15 * M,
    10 * M,
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_no_hostile_message_disturbs_a_genuine_agent(tmp_path_factory: Any, data: st.DataObject) -> None:
    """Each example on a fresh ledger: agent-a's and agent-b's history, then one batch of hostile messages
    with agent-b's next genuine intervals somewhere among them."""
    lab = make_lab(tmp_path_factory.mktemp("fuzz"))
    c = Collector(lab.cfg)
    try:
        process(c, genuine_start(lab))
        good = genuine_chain(lab)
        bad = data.draw(st.lists(hostile(lab, good), min_size=1, max_size=8), label="hostile")
        batch = data.draw(st.permutations(bad + good), label="batch")
        process(c, batch)  # raises nothing
        stored = c.ledger.db.execute("SELECT sha FROM intervals WHERE agent='agent-b'").fetchall()
        assert sorted(s for (s,) in stored) == sorted(
            lab.genuine[f"I3:{n}"][1] for n in range(1, GENUINE + 1)
        )
        assert c.watermarks.upto[("agent-b", "I3")] == GENUINE
        assert hours_of(c.ledger, "I3") == EXPECTED
        assert set(c.live.instruments) <= {"I1", "I2"}  # only agent-a's own, enrolled instruments
    finally:
        c.ledger.close()
        c._pool.shutdown()
