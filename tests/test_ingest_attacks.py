"""The collector's trust boundary, one data-driven case per attack (tests/testcases/ingest/<case>/): what an
attacker's message leaves behind in the ledger, the watermarks (live, and rebuilt from the ledger as a
restarted collector would), the live view and the hours.

Each case is run through the real ``Collector.process`` on a real SQLite ledger; the network path
(brokers, retained messages, restarts) is in test_ingest_network.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from labmeter import signing, wire
from labmeter.collector.ledger import REJECTION_KEYS
from labmeter.collector.service import BATCH, Collector
from tests.attack import (
    CASES,
    T0,
    H,
    genuine_start,
    hours_of,
    ledger_counts,
    load_case,
    make_lab,
    messages,
    process,
    rebuilt_watermark,
    value,
)
from tests.lab import ack_body


class AckRecorder:
    """Stands in for the MQTT link: records what the collector would publish."""

    def __init__(self, key: signing.PrivateKey) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.check = signing.SignatureChecker(key.public_key())

    def publish(self, topic: str, payload: bytes, *args: Any, **kwargs: Any) -> bool:
        self.sent.append((topic, payload))
        return True

    def rejects(self, agent: str) -> list[dict[str, Any]]:
        out = []
        for topic, payload in self.sent:
            if topic != f"labmeter/v1/{agent}/ack":
                continue
            env = wire.open_envelope(payload)
            assert self.check(env.body.encode(), env.sig), "an ack the collector did not sign"
            out += ack_body(payload).get("rejects", [])
        return out


def test_every_case_has_both_files() -> None:
    for case in CASES.iterdir():
        assert (case / "message.json").is_file() and (case / "expected.json").is_file(), case


@pytest.mark.parametrize("name", sorted(p.name for p in CASES.iterdir()))
def test_attack(name: str, tmp_path: Path) -> None:
    spec, want = load_case(name)
    lab = make_lab(tmp_path)
    c = Collector(lab.cfg)
    try:
        process(c, genuine_start(lab))
        assert c.stats["stored"] == 3 and c.stats["rejected"] == 0
        ledger = c.ledger
        live_before = dict(c.live.instruments)
        hours_before = {code: hours_of(ledger, code) for code in ("I1", "I2", "I3")}
        before = ledger_counts(ledger)
        size_before = _ledger_bytes(tmp_path)
        c.key = signing.PrivateKey.generate()
        c.link = AckRecorder(c.key)  # type: ignore[assignment]
        msgs = messages(lab, spec)
        for i in range(0, len(msgs), BATCH):
            process(c, msgs[i : i + BATCH])
        after = ledger_counts(ledger)

        reasons = [r for r, _, _, _ in ledger.rejection_summary()]
        assert any(want["reason"] in r for r in reasons) or want["reason"] in str(c.rejections), (
            f"{name}: no rejection containing {want['reason']!r}: {reasons} {dict(c.rejections)}"
        )
        assert c.stats["rejected"] == len(msgs), c.rejections
        assert after["intervals"] == before["intervals"], "an attacker's interval was stored"
        assert after["signins"] == before["signins"]
        assert after["kept"] - before["kept"] == want.get("kept", 0), "kept whole (authentic)"
        assert after["counted"] - before["counted"] == want.get("counted", 0), "counted (unauthenticated)"
        assert after["count_rows"] <= want.get("max_count_rows", REJECTION_KEYS)
        if "max_growth_kb" in want:
            assert _ledger_bytes(tmp_path) - size_before <= want["max_growth_kb"] * 1024
        seqs = ledger.db.execute("SELECT seq FROM rejections WHERE seq IS NOT NULL").fetchall()
        assert all(1 <= s <= 2**53 for (s,) in seqs), seqs

        marks = {"agent-a/I1": 2, **want.get("watermarks", {})}
        for key, expected in marks.items():
            agent, chain = key.split("/")
            expected = value(expected)
            assert c.watermarks.upto.get((agent, chain), 0) == expected, f"{key} watermark"
            assert rebuilt_watermark(ledger, agent, chain) == expected, (
                f"{key} watermark rebuilt from the ledger"
            )

        assert c.live.instruments == live_before, "the live view changed"
        assert {code: hours_of(ledger, code) for code in ("I1", "I2", "I3")} == hours_before
        if "answered" in want:  # whether agent-a is told (so that it dead-letters the row with that hash)
            assert bool(c.link.rejects("agent-a")) == want["answered"], c.link.rejects("agent-a")  # type: ignore[attr-defined]

        # and the next genuine interval is still stored and acknowledged
        nxt = lab.interval(
            "agent-a",
            "I1",
            4 if marks["agent-a/I1"] == 3 else 3,
            lab.genuine["I1:2"][1],
            lab_t(2),
            lab_t(3),
            "OFF",
        )
        process(c, [("labmeter/v1/agent-a/I1/interval", nxt)])
        assert ledger_counts(ledger)["intervals"] == before["intervals"] + 1
    finally:
        c.ledger.close()
        c._pool.shutdown()


def lab_t(hours: int) -> int:
    return T0 + hours * H


def _ledger_bytes(tmp: Path) -> int:
    return sum(f.stat().st_size for f in (tmp / "collector").glob("ledger.sqlite*"))
