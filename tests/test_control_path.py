"""The control path is signed: only the pinned collector's acks delete anything, and only for bodies the
agent holds; status counts only when a registered agent signed it.

These cases drive the real agent (its store, its ack handler) with acks made by the collector's own code
(``wire.seal_acks``); tests/test_control_path_live.py runs the same attacks over real brokers.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from labmeter import config, signing, wire
from labmeter.agent.runtime import Agent
from labmeter.agent.timeline import Span
from labmeter.drivers.registry import agent_config
from labmeter.wire import State
from tests.conftest import LABMETER

AGENT = "bench-01"
INST = "CZ-XRD-001"
T0 = 1_780_000_000_000


def agent_toml(tmp: Path, collector_key: str | None = None) -> Path:
    pin = f'collector_key = "{collector_key}"\n' if collector_key else ""
    path = tmp / "agent.toml"
    path.write_text(
        f'[agent]\nid = "{AGENT}"\nkey_file = "agent.key"\nstate_dir = "state"\n{pin}'
        '[broker]\nurl = "mqtt://127.0.0.1:9"\n'
        f'[[instrument]]\nid = "{INST}"\n[instrument.source]\ndriver = "mqtt"\ntopic = "tele/x/SENSOR"\n'
        "[instrument.states]\noff_below_w = 3\nrun_above_w = 60\n"
    )
    if not (tmp / "agent.key").exists():
        signing.generate_key_file(tmp / "agent.key")
    return path


def make_agent(tmp: Path, collector_key: str | None = None) -> Agent:
    return Agent(config.load(agent_toml(tmp, collector_key), agent_config()))


def emit(agent: Agent, n: int, start: int = T0, state: State = State.RUNNING) -> list[tuple[int, str]]:
    """Emit ``n`` intervals; their (seq, body hash), as the collector would name them."""
    spans = [Span(start + i * 60_000, start + (i + 1) * 60_000, state) for i in range(n)]
    rows = agent.store.emit(agent.signer, INST, spans, None)
    return [(r.seq, wire.body_hash(wire.open_envelope(r.payload).body)) for r in rows]


def ack(
    key: signing.PrivateKey,
    seq_sha: tuple[int, str],
    agent: str = AGENT,
    rejects: list[wire.AckReject] | None = None,
) -> bytes:
    (payload,) = wire.seal_acks(key, agent, T0, {INST: wire.AckEntry(*seq_sha)}, rejects or [])
    return payload


def pending(agent: Agent) -> int:
    return agent.store.pending_count()


def test_tofu_pins_the_first_signed_key_then_refuses_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    collector, other = signing.PrivateKey.generate(), signing.PrivateKey.generate()
    agent = make_agent(tmp_path)
    rows = emit(agent, 3)
    assert agent.gate.pin is None
    with caplog.at_level(logging.WARNING, "labmeter.agent"):
        agent._on_ack(wire.ack_topic(AGENT), ack(collector, rows[0]))
    assert pending(agent) == 2
    fingerprint = signing.key_id(collector.public_key())
    line = signing.public_key_text(collector.public_key())
    assert fingerprint in caplog.text and f'collector_key = "{line}"' in caplog.text
    assert line in (tmp_path / "state" / "collector.pub").read_text()

    caplog.clear()
    with caplog.at_level(logging.WARNING, "labmeter.agent"):
        agent._on_ack(wire.ack_topic(AGENT), ack(other, rows[2]))  # validly signed, by someone else
    assert pending(agent) == 2
    assert f"not signed by the pinned collector key {fingerprint}" in caplog.text
    agent.store.close()

    # after a restart the pin holds (from the state dir), and `agent status` says where it came from
    agent = make_agent(tmp_path)
    assert agent.gate.pin is not None and agent.gate.pin.fingerprint == fingerprint
    agent._on_ack(wire.ack_topic(AGENT), ack(other, rows[2]))
    assert pending(agent) == 2
    agent._on_ack(wire.ack_topic(AGENT), ack(collector, rows[2]))
    assert pending(agent) == 0
    agent.store.close()
    out = subprocess.run(
        [*LABMETER, "agent", "status", "-c", "agent.toml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert f"collector key {fingerprint}, pinned from first use" in out.stdout, out.stdout


def test_a_pinned_key_from_agent_toml_refuses_even_the_first_other_key(tmp_path: Path) -> None:
    collector, attacker = signing.PrivateKey.generate(), signing.PrivateKey.generate()
    agent = make_agent(tmp_path, signing.public_key_text(collector.public_key()))
    rows = emit(agent, 2)
    agent._on_ack(wire.ack_topic(AGENT), ack(attacker, rows[1]))
    assert pending(agent) == 2 and not (tmp_path / "state" / "collector.pub").exists()
    agent._on_ack(wire.ack_topic(AGENT), ack(collector, rows[1]))
    assert pending(agent) == 0
    agent.store.close()
    out = subprocess.run(
        [*LABMETER, "agent", "status", "-c", "agent.toml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert f"{signing.key_id(collector.public_key())}, pinned from agent.toml" in out.stdout


# every one of these reaches the agent's ack topic from someone on the broker; none may delete or dead-letter
FORGERIES = {
    "legacy unsigned ack (the reported attack)": lambda k, rows: (
        b'{"v":1,"acks":{"CZ-XRD-001":999999999999}}'
    ),
    "legacy ack with rejects": lambda k, rows: (
        b'{"v":1,"acks":{},"rejects":[{"instrument":"CZ-XRD-001","seq":%d,"sha256":"%s","reason":"x"}]}'
        % (rows[0][0], rows[0][1].encode())
    ),
    "signed by an attacker's key": lambda k, rows: ack(signing.PrivateKey.generate(), rows[-1]),
    "attacker's reject with the right hash": lambda k, rows: wire.seal_acks(
        signing.PrivateKey.generate(), AGENT, T0, {}, [wire.AckReject(INST, rows[0][0], rows[0][1], "forged")]
    )[0],
    "genuine ack for another agent": lambda k, rows: ack(k, rows[-1], agent="bench-02"),
    "genuine signature, body altered": lambda k, rows: ack(k, rows[0]).replace(
        str(rows[0][0]).encode(), str(rows[-1][0]).encode()
    ),
    "genuine ack for a seq not yet written": lambda k, rows: ack(k, (rows[-1][0] + 10, rows[-1][1])),
    "genuine ack naming another body": lambda k, rows: ack(k, (rows[-1][0], "ab" * 32)),
    "seq beyond 64 bits": lambda k, rows: ack(k, rows[0]).replace(str(rows[0][0]).encode(), b"9" * 30),
    "not JSON": lambda k, rows: b"\xff\xfe garbage",
    "JSON array": lambda k, rows: b"[1,2,3]",
    "oversize": lambda k, rows: b'{"kid":"x","body":"' + b"a" * 10_000 + b'","sig":"x"}',
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_or_misdirected_acks_delete_nothing(tmp_path: Path, name: str) -> None:
    collector = signing.PrivateKey.generate()
    agent = make_agent(tmp_path, signing.public_key_text(collector.public_key()))
    rows = emit(agent, 3)
    agent._on_ack(wire.ack_topic(AGENT), FORGERIES[name](collector, rows))
    summary = agent.store.summary()
    assert pending(agent) == 3 and summary["dead"] == [], name
    assert agent.gate.ignored >= 1
    agent._on_ack(wire.ack_topic(AGENT), ack(collector, rows[-1]))  # the genuine ack still works
    assert pending(agent) == 0
    agent.store.close()


def test_legacy_ack_says_the_collector_needs_upgrading_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(tmp_path)
    emit(agent, 1)
    with caplog.at_level(logging.WARNING, "labmeter.agent"):
        for _ in range(50):
            agent._on_ack(wire.ack_topic(AGENT), b'{"v":1,"acks":{"CZ-XRD-001":999999999999}}')
    assert pending(agent) == 1 and agent.gate.pin is None
    assert caplog.text.count("the collector needs upgrading") == 1
    assert agent.gate.ignored == 50
    agent.store.close()


def test_replayed_genuine_ack_after_a_restore_from_backup_deletes_nothing(tmp_path: Path) -> None:
    """An agent restored from a backup writes new bodies at seqs the collector acknowledged before; the old
    signed ack, replayed, names the old bodies and deletes none of the new ones."""
    collector = signing.PrivateKey.generate()
    agent = make_agent(tmp_path, signing.public_key_text(collector.public_key()))
    first = emit(agent, 2)
    agent.store.close()
    shutil.copy(tmp_path / "state" / "agent.db", tmp_path / "backup.db")
    agent = make_agent(tmp_path, signing.public_key_text(collector.public_key()))
    later = emit(agent, 2, start=T0 + 2 * 60_000)
    recorded = ack(collector, later[-1])  # genuine: the collector stored all four
    agent._on_ack(wire.ack_topic(AGENT), recorded)
    assert pending(agent) == 0
    agent.store.close()

    (tmp_path / "state" / "agent.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / "state" / f"agent.db{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", tmp_path / "state" / "agent.db")
    agent = make_agent(tmp_path, signing.public_key_text(collector.public_key()))
    assert pending(agent) == 2  # the backup's rows, as they were
    redone = emit(agent, 2, start=T0 + 5 * 60_000, state=State.STANDBY)  # same seqs, other bodies
    assert [s for s, _ in redone] == [s for s, _ in later] and redone != later
    agent._on_ack(wire.ack_topic(AGENT), recorded)  # the replay
    assert pending(agent) == 4
    # an old ack about bodies the agent does hold again (the backup's) is true, and deletes just those
    agent._on_ack(wire.ack_topic(AGENT), ack(collector, first[-1]))
    assert pending(agent) == 2
    agent._on_ack(wire.ack_topic(AGENT), ack(collector, redone[-1]))
    assert pending(agent) == 0
    agent.store.close()


def test_genuine_reject_dead_letters_before_the_ack_covering_it(tmp_path: Path) -> None:
    collector = signing.PrivateKey.generate()
    agent = make_agent(tmp_path, signing.public_key_text(collector.public_key()))
    rows = emit(agent, 3)
    rej = wire.AckReject(INST, rows[1][0], rows[1][1], "end is 90000 s in the future")
    (payload,) = wire.seal_acks(collector, AGENT, T0, {INST: wire.AckEntry(*rows[2])}, [rej])
    agent._on_ack(wire.ack_topic(AGENT), payload)
    dead = agent.store.summary()["dead"]
    assert pending(agent) == 0 and [d["seq"] for d in dead] == [rows[1][0]]  # type: ignore[index]
    agent.store.close()


def test_a_large_ack_is_split_into_messages_an_agent_reads() -> None:
    key = signing.PrivateKey.generate()
    acks = {f"I{i:03d}@signin": wire.AckEntry(T0 + i, f"{i:064x}") for i in range(150)}
    rejects = [wire.AckReject("I001", T0 + i, f"{i:064x}", "x" * 1000) for i in range(60)]
    rejects.append(wire.AckReject("I001", 2**64, "0" * 64, "a hostile seq"))  # would spoil the message
    payloads = wire.seal_acks(key, AGENT, T0, acks, rejects)
    assert len(payloads) > 1 and all(len(p) <= wire.MAX_PAYLOAD for p in payloads)
    got = [wire.decode_ack(wire.open_envelope(p).body) for p in payloads]
    assert {c: e for a in got for c, e in a.acks.items()} == acks
    assert [r.seq for a in got for r in a.rejects] == [T0 + i for i in range(60)]
    assert all(len(r.reason) == wire.MAX_REASON for a in got for r in a.rejects)
    seen_ack = False
    for a in got:  # rejects come first, so no ack deletes a row before its reject dead-letters it
        assert not (seen_ack and a.rejects)
        seen_ack = seen_ack or bool(a.acks)


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ('collector_key = "ed25519:short"', "[agent] collector_key: public key 'ed25519:short'"),
        ('collector_key = "rsa:AAAA"', "expected 'ed25519:<base64>'"),
    ],
)
def test_a_bad_pinned_key_stops_start_up_with_the_key_named(
    tmp_path: Path, setting: str, fragment: str
) -> None:
    path = agent_toml(tmp_path)
    path.write_text(path.read_text().replace("[broker]", f"{setting}\n[broker]"))
    run = subprocess.run(
        [*LABMETER, "agent", "run", "-c", "agent.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and fragment in run.stderr and "Traceback" not in run.stderr, run.stderr
    enroll = subprocess.run(
        [*LABMETER, "agent", "enroll", "-c", "agent.toml", "--collector-key", "ed25519:short"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enroll.returncode == 2 and "--collector-key: public key" in enroll.stderr


def test_a_corrupt_pin_file_is_named_by_status(tmp_path: Path) -> None:
    agent_toml(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "collector.pub").write_text("ed25519:broken\n")
    out = subprocess.run(
        [*LABMETER, "agent", "status", "-c", "agent.toml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0 and "collector.pub" in out.stdout and "delete the file" in out.stdout


def test_collector_key_command_and_add_agent_print_the_line_to_pin(tmp_path: Path) -> None:
    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp_path / "data"}"\n')
    run = lambda *a: subprocess.run(  # noqa: E731
        [*LABMETER, *a, "-c", "collector.toml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    shown = run("collector", "key")
    assert shown.returncode == 0, shown.stderr
    key = signing.load_private_key(tmp_path / "data" / "collector.key").public_key()
    text, fingerprint = signing.public_key_text(key), signing.key_id(key)
    assert f"fingerprint: {fingerprint}" in shown.stdout and f'collector_key = "{text}"' in shown.stdout
    agent = signing.PrivateKey.generate().public_key()
    added = run(
        "collector", "add-agent", AGENT, "--key", signing.public_key_text(agent), "--instrument", INST
    )
    assert (
        added.returncode == 0 and f'collector_key = "{text}"' in added.stdout and fingerprint in added.stdout
    )
    assert run("collector", "key").stdout == shown.stdout  # the same key, not a new one each time


def test_connection_numbers_only_grow_even_when_the_clock_goes_back(tmp_path: Path) -> None:
    """Status order rests on them: a status from an earlier connection must never look newer."""
    agent = make_agent(tmp_path)
    first = agent._will_conn
    later = agent.store.next_connection(first - 86_400_000)  # the clock was set back a day
    assert later == first + 1
    agent.store.close()
    again = make_agent(tmp_path)  # and across restarts
    assert again._will_conn > later
    st = wire.decode_status(wire.open_envelope(again._will().payload).body)
    assert st.status == "offline" and st.conn == again._will_conn and st.agent == AGENT
    again.store.close()
