"""Test support for the collector's trust boundary: a small lab of agents with genuine chains, and the
attacker's messages described by data (tests/testcases/ingest/<case>/message.json).

A case's message is the genuine next message of agent-a's instrument I1 with body fields overridden,
or a raw body text, or a replay of another genuine envelope; then signed by agent-a, by agent-b, or
by nobody. ``expected.json`` says what must come of it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labmeter import config, signing, wire
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Collector, Watermarks
from labmeter.machine_hours import Hours, compute

H = 3_600_000
T0 = int(time.time() * 1000) // H * H - 6 * H
S = T0 + 12_345  # agent-a's I2 chain began after lost state: its first seq is the agent's clock
USER = "ab" * 16
CASES = Path(__file__).parent / "testcases" / "ingest"


@dataclass
class Lab:
    """agent-a (I1, I2) and agent-b (I3), registered; agent-a's I1 chain has seqs 1 and 2 stored."""

    tmp: Path
    cfg: config.CollectorConfig
    keys: dict[str, tuple[Any, str]] = field(default_factory=dict)
    genuine: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    """Name -> (envelope, body sha) of the genuine messages the lab has sent."""

    def sign(self, agent: str, body_text: str) -> bytes:
        key, kid = self.keys[agent]
        return wire.seal(key, kid, body_text)

    def interval(self, agent: str, code: str, seq: int, prev: str, start: int, end: int, state: str) -> bytes:
        body = wire.dump_body(wire.Interval(agent, code, seq, prev, start, end, state).body())
        self.genuine[f"{code}:{seq}"] = (self.sign(agent, body), wire.body_hash(body))
        return self.genuine[f"{code}:{seq}"][0]


def make_lab(tmp: Path, broker_url: str = "mqtt://127.0.0.1:1", ledger_url: str = "sqlite") -> Lab:
    text = f'[collector]\ndata_dir = "{tmp / "collector"}"\nledger = "{ledger_url}"\n[broker]\nurl = "{broker_url}"\n'
    lab = Lab(tmp, config.parse(text, config.CollectorConfig))
    ledger = Ledger.open(ledger_url, lab.cfg.collector.data_dir)
    for agent, codes in (("agent-a", ["I1", "I2"]), ("agent-b", ["I3"])):
        key = signing.generate_key_file(tmp / f"{agent}.key")
        pub = key.public_key()
        lab.keys[agent] = (key, signing.key_id(pub))
        ledger.add_agent(agent, signing.public_key_text(pub), signing.key_id(pub), codes)
    ledger.close()
    return lab


def genuine_start(lab: Lab) -> list[tuple[str, bytes]]:
    """agent-a's I1 seqs 1-2 and the first link of its I2 chain (seq S): the history every case starts from."""
    m1 = lab.interval("agent-a", "I1", 1, wire.GENESIS, T0, T0 + H, "RUNNING")
    m2 = lab.interval("agent-a", "I1", 2, lab.genuine["I1:1"][1], T0 + H, T0 + 2 * H, "STANDBY")
    m3 = lab.interval("agent-a", "I2", S, wire.GENESIS, T0, T0 + H, "RUNNING")
    lab.genuine["I2:S"] = lab.genuine[f"I2:{S}"]
    return [
        (wire.interval_topic("agent-a", "I1"), m1),
        (wire.interval_topic("agent-a", "I1"), m2),
        (wire.interval_topic("agent-a", "I2"), m3),
    ]


def base_body(lab: Lab, kind: str, agent: str, code: str) -> dict[str, Any]:
    """The genuine next message of ``kind`` for agent-a's I1 (or another instrument)."""
    if kind == "interval":
        return wire.Interval(agent, code, 3, lab.genuine["I1:2"][1], T0 + 2 * H, T0 + 3 * H, "RUNNING").body()
    if kind == "signin":
        return wire.SignIn(agent, code, 1, wire.GENESIS, T0 + 2 * H, USER).body()
    return {
        "v": 1,
        "kind": "open",
        "agent": agent,
        "instrument": code,
        "start": T0 + 3 * H,
        "state": "RUNNING",
        "at": T0 + 3 * H + 1000,
    }


def value(v: Any) -> Any:
    """Body values may be expressions over T0, H, S and NOW ("=T0+2*H"), so cases stay in the present."""
    if isinstance(v, str) and v.startswith("="):
        return eval(v[1:], {"__builtins__": {}}, {"T0": T0, "H": H, "S": S, "NOW": int(time.time() * 1000)})
    return v


def messages(lab: Lab, spec: dict[str, Any]) -> list[tuple[str, bytes]]:
    """A case's messages, in the order sent."""
    out: list[tuple[str, bytes]] = []
    for m in spec["messages"]:
        for i in range(int(m.get("repeat", 1))):
            topic = m["topic"].replace("{i}", str(i))
            t = wire.parse_topic(topic)
            if "replay" in m:
                payload = lab.genuine[m["replay"]][0]
            else:
                if "body_text" in m:
                    body_text = m["body_text"]
                else:
                    code = str(m.get("body_instrument", "I1")).replace("{i}", str(i))
                    body = base_body(lab, m.get("kind", t.kind), m.get("body_agent", "agent-a"), code)
                    for k, v in m.get("body", {}).items():
                        if v == "$delete":
                            body.pop(k, None)
                        else:
                            body[k] = value(v)
                    body_text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                signer = m.get("signer", "agent-a")
                if signer == "nobody":  # agent-a's key id and a well-formed signature, over another text
                    forged = json.loads(lab.sign("agent-a", body_text + " "))
                    payload = json.dumps(
                        {"kid": forged["kid"], "body": body_text, "sig": forged["sig"]}
                    ).encode()
                else:
                    payload = lab.sign(signer, body_text)
            if "payload_text" in m:
                payload = m["payload_text"].encode()
            out.append((topic, payload))
    return out


def process(collector: Collector, batch: list[tuple[str, bytes]]) -> None:
    asyncio.run(collector.process(batch))


def hours_of(ledger: Ledger, code: str) -> Hours:
    rows = [r.span() for r in ledger.intervals_between(T0 - H, T0 + 12 * H, code)]
    return compute(rows, T0 - H, T0 + 12 * H, 15 * 60_000, 10 * 60_000)


def rebuilt_watermark(ledger: Ledger, agent: str, chain: str) -> int:
    """The watermark a fresh collector process would start from: rebuilt from the ledger alone."""
    marks = Watermarks(ledger)
    key = (agent, chain)
    marks.upto[key] = 0
    for s, start in ledger.handled_seqs(agent, chain):
        marks._push(key, s, start)
    return marks.upto[key]


def ledger_counts(ledger: Ledger) -> dict[str, int]:
    one = ledger.db.execute
    return {
        "intervals": int(one("SELECT COUNT(*) FROM intervals").fetchone()[0]),
        "signins": int(one("SELECT COUNT(*) FROM signins").fetchone()[0]),
        "kept": int(one("SELECT COUNT(*) FROM rejections").fetchone()[0]),
        "counted": int(one("SELECT COALESCE(SUM(n), 0) FROM rejection_counts").fetchone()[0]),
        "count_rows": int(one("SELECT COUNT(*) FROM rejection_counts").fetchone()[0]),
    }


def load_case(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    case = CASES / name
    return (
        json.loads((case / "message.json").read_text(encoding="utf-8")),
        json.loads((case / "expected.json").read_text(encoding="utf-8")),
    )
