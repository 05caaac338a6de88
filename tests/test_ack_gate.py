"""The agent's ack gate on its own: which payloads it opens, what it pins, and that a flood of refusals
is one warning a minute per kind (tests/test_control_path.py drives the same gate through the agent)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from labmeter import config, signing, wire
from labmeter.agent import control
from labmeter.agent.control import AckGate
from labmeter.drivers.registry import agent_config

AGENT = "bench-01"
T0 = 1_780_000_000_000


def section(tmp: Path, pin: str | None = None) -> config.AgentSection:
    line = f'collector_key = "{pin}"\n' if pin else ""
    path = tmp / "agent.toml"
    path.write_text(
        f'[agent]\nid = "{AGENT}"\nkey_file = "agent.key"\nstate_dir = "state"\n{line}'
        '[broker]\nurl = "mqtt://127.0.0.1:9"\n'
        '[[instrument]]\nid = "I1"\n[instrument.source]\ndriver = "mqtt"\ntopic = "tele/x/SENSOR"\n'
        "[instrument.states]\noff_below_w = 3\nrun_above_w = 60\n"
    )
    return config.load(path, agent_config()).agent


def ack(key: signing.PrivateKey, agent: str = AGENT, seq: int = 3) -> bytes:
    (payload,) = wire.seal_acks(key, agent, T0, {"I1": wire.AckEntry(seq, "a" * 64)}, [])
    return payload


def test_a_pinned_gate_opens_only_its_collectors_acks_for_this_agent(tmp_path: Path) -> None:
    collector, other = signing.PrivateKey.generate(), signing.PrivateKey.generate()
    s = section(tmp_path, signing.public_key_text(collector.public_key()))
    gate = AckGate(s, control.load_pin(s))
    got = gate.open(ack(collector))
    assert got is not None and got.acks["I1"].seq == 3 and gate.ignored == 0
    refused = [
        ack(other),  # validly signed, naming its own key
        ack(collector, agent="bench-02"),  # genuine, for another agent
        b'{"v": 1, "acks": {"I1": 3}}',  # a collector from before signed acks
        b"not json",
    ]
    assert [gate.open(p) for p in refused] == [None] * len(refused)
    assert gate.ignored == len(refused)
    assert not control.pin_path(s).exists()


def test_an_unpinned_gate_pins_the_first_valid_signer_and_then_only_it(tmp_path: Path) -> None:
    collector, other = signing.PrivateKey.generate(), signing.PrivateKey.generate()
    s = section(tmp_path)
    gate = AckGate(s, control.load_pin(s))
    assert gate.pin is None
    env = json.loads(ack(collector))
    env["kid"] = signing.key_id(other.public_key())  # kid names another key than the body's
    assert gate.open(json.dumps(env).encode()) is None and gate.pin is None
    env = json.loads(ack(collector))
    env["sig"] = json.loads(ack(other))["sig"]
    assert gate.open(json.dumps(env).encode()) is None and gate.pin is None
    body = json.loads(wire.open_envelope(ack(collector)).body)
    body["key"] = "ed25519:short"
    bad_key = wire.seal(collector, signing.key_id(collector.public_key()), wire.dump_body(body))
    assert gate.open(bad_key) is None and gate.pin is None
    assert gate.ignored == 3
    assert gate.open(ack(collector)) is not None
    assert gate.pin is not None and gate.pin.fingerprint == signing.key_id(collector.public_key())
    assert control.load_pin(s) is not None and control.load_pin(s).fingerprint == gate.pin.fingerprint  # type: ignore[union-attr]
    assert gate.open(ack(other)) is None  # now pinned: a second valid signer is refused
    assert gate.open(ack(collector)) is not None


def test_refusals_warn_once_a_minute_per_kind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector, other = signing.PrivateKey.generate(), signing.PrivateKey.generate()
    s = section(tmp_path, signing.public_key_text(collector.public_key()))
    gate = AckGate(s, control.load_pin(s))
    now = [1000.0]
    monkeypatch.setattr(control.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.WARNING, "labmeter.agent"):
        for _ in range(50):
            gate.open(ack(other))
        assert len(caplog.records) == 1
        gate.open(b"junk")  # another kind warns at once
        assert len(caplog.records) == 2
        now[0] += control.WARN_EVERY_S - 1
        gate.open(ack(other))
        assert len(caplog.records) == 2
        now[0] += 1
        gate.open(ack(other))
        assert len(caplog.records) == 3
    assert gate.ignored == 53
