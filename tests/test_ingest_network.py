"""Poison over the network: one hostile message, retained or not, on Mosquitto and on the built-in broker,
while another agent's genuine intervals must still be stored within seconds; a cross-instrument replay
across a collector restart. The messages come from tests/testcases/ingest."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from labmeter import wire
from labmeter.collector.ledger import Ledger
from tests.attack import T0, H, Lab, genuine_start, load_case, make_lab, messages
from tests.conftest import BrokerProcess
from tests.lab import CollectorThread, Publisher, wait_for


def _b_intervals(lab: Lab, n: int) -> list[tuple[str, bytes]]:
    out, prev = [], wire.GENESIS
    for seq in range(1, n + 1):
        out.append(
            (
                wire.interval_topic("agent-b", "I3"),
                lab.interval(
                    "agent-b", "I3", seq, prev, T0 + seq * 60_000, T0 + (seq + 1) * 60_000, "RUNNING"
                ),
            )
        )
        prev = lab.genuine[f"I3:{seq}"][1]
    return out


def _count(lab: Lab, sql: str) -> int:
    ledger = Ledger.open("sqlite", lab.cfg.collector.data_dir)
    try:
        return int(ledger.db.execute(sql).fetchone()[0])
    finally:
        ledger.close()


def _seq(ack: dict[str, Any], chain: str) -> int:
    """The seq a (signed, hash-bound) ack entry acknowledges for a chain; 0 when it names none."""
    entry = ack["acks"].get(chain)
    return int(entry["seq"]) if isinstance(entry, dict) else 0


def _acks(pub: Publisher, agent: str) -> list[dict[str, Any]]:
    out = []
    for topic, payload in list(pub.received):
        if topic == wire.ack_topic(agent):
            msg = json.loads(payload)
            if isinstance(msg.get("body"), str):  # a signed ack
                msg = json.loads(msg["body"])
            out.append(msg)
    return out


@pytest.mark.parametrize("case", ["poison_seq_2_64_unsigned", "poison_seq_2_64_signed", "seq_2_63"])
def test_poison_does_not_stop_ingest(broker: BrokerProcess, tmp_path: Path, case: str) -> None:
    lab = make_lab(tmp_path, broker.url)
    spec, _ = load_case(case)
    genuine_start(lab)  # makes the genuine history the case's body refers to (seq 3 after I1's 2)
    poison = messages(lab, spec)
    with CollectorThread(lab.cfg) as ct:
        pub = Publisher(broker.url)
        for topic, payload in poison:
            pub.publish(topic, payload)
        sent = time.monotonic()
        for topic, payload in _b_intervals(lab, 20):
            pub.publish(topic, payload)
        wait_for(
            lambda: _count(lab, "SELECT COUNT(*) FROM intervals WHERE agent='agent-b'") == 20,
            10,
            "agent-b stored",
        )
        assert time.monotonic() - sent < 10
        assert ct.collector is not None and ct.collector.stats["rejected"] == len(poison)
        assert not ct.collector.inbox  # nothing waits for a retry
        pub.close()
    assert ct.error is None


def test_retained_poison_is_ignored_and_cleared(broker: BrokerProcess, tmp_path: Path) -> None:
    """Retained before the collector starts (what survives every restart today): it arrives flagged
    retained, is ignored, and is cleared, so the next collector does not even see it."""
    lab = make_lab(tmp_path, broker.url)
    spec, _ = load_case("poison_seq_2_64_unsigned")
    genuine_start(lab)
    ((topic, poison),) = messages(lab, spec)
    pub = Publisher(broker.url, "attacker")
    pub.client.publish(topic, poison, qos=1, retain=True).wait_for_publish(10)
    with CollectorThread(lab.cfg) as ct:
        assert ct.collector is not None
        wait_for(
            lambda: ct.collector is not None and ct.collector.stats["retained"] == 1, 10, "retained seen"
        )
        for t, p in _b_intervals(lab, 5):
            pub.publish(t, p)
        wait_for(
            lambda: _count(lab, "SELECT COUNT(*) FROM intervals WHERE agent='agent-b'") == 5,
            10,
            "agent-b stored",
        )
        assert ct.collector.stats["rejected"] == 0  # ignored, not even a rejection
    # cleared: a new subscriber gets no retained message on the topic
    watcher = Publisher(broker.url, "watcher")
    watcher.subscribe(topic)
    time.sleep(0.5)
    assert [p for t, p in watcher.received if p] == []
    watcher.close()
    with CollectorThread(lab.cfg) as ct2:
        time.sleep(0.5)
        assert ct2.collector is not None and ct2.collector.stats["retained"] == 0
    pub.close()


def test_retained_while_running_then_restart(broker: BrokerProcess, tmp_path: Path) -> None:
    """Retained while the collector is subscribed: delivered live (not flagged), so rejected by its bounds;
    after a restart the broker replays it flagged retained, and it is ignored."""
    lab = make_lab(tmp_path, broker.url)
    spec, _ = load_case("poison_seq_2_64_signed")
    genuine_start(lab)
    ((topic, poison),) = messages(lab, spec)
    pub = Publisher(broker.url, "attacker")
    with CollectorThread(lab.cfg) as ct:
        pub.client.publish(topic, poison, qos=1, retain=True).wait_for_publish(10)
        wait_for(lambda: ct.collector is not None and ct.collector.stats["rejected"] == 1, 10, "rejected")
    with CollectorThread(lab.cfg) as ct2:
        for t, p in _b_intervals(lab, 3):
            pub.publish(t, p)
        wait_for(
            lambda: _count(lab, "SELECT COUNT(*) FROM intervals WHERE agent='agent-b'") == 3, 10, "stored"
        )
        # the built-in broker replays it once per matching subscription (the session's and ours): each ignored
        assert ct2.collector is not None and ct2.collector.stats["retained"] >= 1
        assert ct2.collector.stats["rejected"] == 0
    pub.close()


def test_cross_instrument_replay_survives_no_restart(broker: BrokerProcess, tmp_path: Path) -> None:
    """agent-a's genuine first link of I2 (a chain start far above I1's seqs) replayed on I1's topic: I1's
    acknowledgement stays at 2, and after a restart (watermarks rebuilt from the ledger) I1's seq 3 is
    acknowledged as 3, not as the replayed seq."""
    lab = make_lab(tmp_path, broker.url)
    history = genuine_start(lab)
    spec, _ = load_case("cross_instrument_replay")
    replay = messages(lab, spec)
    pub = Publisher(broker.url, "agent-a-and-attacker")
    pub.subscribe(wire.ack_topic("agent-a"))
    with CollectorThread(lab.cfg) as ct:
        for t, p in history:
            pub.publish(t, p)
        wait_for(lambda: any(_seq(a, "I1") == 2 for a in _acks(pub, "agent-a")), 10, "I1 acked to 2")
        for t, p in replay:
            pub.publish(t, p)
        wait_for(
            lambda: ct.collector is not None and ct.collector.stats["rejected"] == 1, 10, "replay rejected"
        )
        assert all(_seq(a, "I1") <= 2 for a in _acks(pub, "agent-a"))
    pub.received.clear()
    with CollectorThread(lab.cfg):
        seq3 = lab.interval("agent-a", "I1", 3, lab.genuine["I1:2"][1], T0 + 2 * H, T0 + 3 * H, "OFF")
        pub.publish(wire.interval_topic("agent-a", "I1"), seq3)
        wait_for(lambda: any("I1" in a["acks"] for a in _acks(pub, "agent-a")), 10, "I1 acked")
        assert [_seq(a, "I1") for a in _acks(pub, "agent-a") if "I1" in a["acks"]] == [3]
    pub.close()


def test_messages_queued_while_the_collector_was_away_are_not_taken_for_retained(
    mosquitto: BrokerProcess, tmp_path: Path
) -> None:
    """Ignoring retained messages must not ignore what the broker queued for the collector's persistent
    session while it was down. Mosquitto only: the built-in broker queues nothing for anonymous sessions
    (amqtt 0.12), there agents' resends carry the gap."""
    broker = mosquitto
    lab = make_lab(tmp_path, broker.url)
    pub = Publisher(broker.url, "agent-b")
    with CollectorThread(lab.cfg):
        pass  # the collector's persistent session now exists
    for t, p in _b_intervals(lab, 5):
        pub.publish(t, p)
    with CollectorThread(lab.cfg) as ct:
        wait_for(
            lambda: _count(lab, "SELECT COUNT(*) FROM intervals WHERE agent='agent-b'") == 5, 10, "stored"
        )
        assert ct.collector is not None and ct.collector.stats["retained"] == 0
    pub.close()
