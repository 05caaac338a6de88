"""Every bad message is rejected with a reason and counted; hours stay unchanged; the collector keeps running.

Runs against Mosquitto and against the built-in broker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from labmeter import wire
from labmeter.collector.ledger import Ledger
from tests.conftest import BrokerProcess
from tests.lab import (
    CollectorThread,
    Publisher,
    ack_body,
    collector_config,
    interval_payload,
    make_agent_key,
    register,
    wait_for,
)

T0 = int(time.time() * 1000) // 3_600_000 * 3_600_000 - 3 * 3_600_000
H = 3_600_000


def test_bad_messages_are_rejected_with_reasons(broker: BrokerProcess, tmp_path: Path) -> None:
    cfg = collector_config(tmp_path, broker.url)
    ka, pa, kida = make_agent_key(tmp_path, "a")
    kb, pb, kidb = make_agent_key(tmp_path, "b")
    register(cfg, "agent-a", pa, kida, ["I1"])
    register(cfg, "agent-b", pb, kidb, ["I2"])
    topic = wire.interval_topic("agent-a", "I1")
    good1, sha1 = interval_payload(ka, kida, "agent-a", "I1", 1, wire.GENESIS, T0, T0 + H, "RUNNING")

    with CollectorThread(cfg) as ct:
        pub = Publisher(broker.url)
        pub.subscribe("labmeter/v1/+/ack")
        pub.publish(topic, good1)
        ledger = Ledger.open("sqlite", cfg.collector.data_dir)

        def stored() -> int:
            return int(ledger.db.execute("SELECT count(*) FROM intervals").fetchone()[0])

        wait_for(lambda: stored() == 1, what="first interval stored")

        bad_sig_body = interval_payload(ka, kida, "agent-a", "I1", 2, sha1, T0 + H, T0 + 2 * H, "RUNNING")[0]
        env = json.loads(bad_sig_body)
        env["body"] = env["body"].replace("RUNNING", "STANDBY")
        cases = {
            "wrong key": (
                topic,
                interval_payload(kb, kidb, "agent-a", "I1", 2, sha1, T0 + H, T0 + 2 * H, "RUNNING")[0],
            ),
            "bad signature": (topic, json.dumps(env).encode()),
            "unknown agent": (
                wire.interval_topic("ghost", "I1"),
                interval_payload(ka, kida, "ghost", "I1", 1, wire.GENESIS, T0, T0 + H, "RUNNING")[0],
            ),
            "not enrolled": (
                wire.interval_topic("agent-a", "I2"),
                interval_payload(ka, kida, "agent-a", "I2", 1, wire.GENESIS, T0, T0 + H, "RUNNING")[0],
            ),
            "malformed JSON": (topic, b'{"kid": "x", "body": '),
            "oversize": (topic, b"{" + b" " * (wire.MAX_PAYLOAD + 10) + b"}"),
            "conflict": (
                topic,
                interval_payload(ka, kida, "agent-a", "I1", 1, wire.GENESIS, T0, T0 + H // 2, "RUNNING")[0],
            ),
            "future": (
                topic,
                interval_payload(ka, kida, "agent-a", "I1", 2, sha1, T0 + 30 * H, T0 + 31 * H, "RUNNING")[0],
            ),
            "end before start": (
                topic,
                interval_payload(ka, kida, "agent-a", "I1", 2, sha1, T0 + H, T0 + H, "RUNNING")[0],
            ),
        }
        for t, payload in cases.values():
            pub.publish(t, payload)
        pub.publish(topic, good1)  # replay of an old interval: a duplicate, ignored

        def reasons() -> list[str]:  # authentic ones are kept whole, the others counted
            return [reason for reason, _, n, _ in ledger.rejection_summary() for _ in range(n)]

        wait_for(lambda: len(reasons()) >= len(cases), what="all rejections recorded")
        got = reasons()
        expected_fragments = {
            "wrong key": "is not the key registered",
            "bad signature": "bad signature",
            "unknown agent": "unknown agent 'ghost'",
            "not enrolled": "instrument 'I2' is not enrolled for agent 'agent-a'",
            "malformed JSON": "payload is not JSON",
            "oversize": "exceeds the 8192-byte limit",
            "conflict": "conflict: a different body is already stored for seq 1",
            "future": "s in the future",
            "end before start": "is not after start",
        }
        for name, fragment in expected_fragments.items():
            assert any(fragment in r for r in got), f"{name}: no rejection containing {fragment!r} in {got}"
        assert len(got) == len(cases), got  # the replayed duplicate is not a rejection
        assert stored() == 1
        row = ledger.db.execute("SELECT end_ms, sha FROM intervals WHERE seq=1").fetchone()
        assert row == (T0 + H, sha1)  # the conflict did not overwrite

        # the agent hears about its rejections, with the body hash it can match
        def acks() -> list[dict]:
            return [ack_body(p) for t, p in pub.received if t == wire.ack_topic("agent-a")]

        wait_for(
            lambda: any("in the future" in r["reason"] for a in acks() for r in a["rejects"]),
            what="the rejection reaches the agent's ack topic",
        )
        future = next(r for a in acks() for r in a["rejects"] if "in the future" in r["reason"])
        assert future["seq"] == 2 and len(future["sha256"]) == 64
        assert any(a["acks"].get("I1") == {"seq": 1, "sha256": sha1} for a in acks())

        # still running: the next good interval is stored and acknowledged
        good2, _ = interval_payload(ka, kida, "agent-a", "I1", 2, sha1, T0 + H, T0 + 2 * H, "STANDBY")
        pub.publish(topic, good2)
        wait_for(lambda: stored() == 2, what="second interval stored")
        assert ct.alive
        assert ct.collector is not None and ct.collector.stats["rejected"] == len(cases)
        pub.close()
        ledger.close()
