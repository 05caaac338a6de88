"""The signed control path with real peers: a real agent process, real brokers (Mosquitto and the built-in
one, which has no accounts), the collector and its web server.

- someone on the broker forges acks: the agent deletes nothing until the genuine collector acknowledges;
- status that is unsigned, hostile, replayed or from unregistered agents keeps the APIs at 200 and puts
  nothing fake in the live view;
- upgrade: a ledger and an agent state from before the signed control path keep working.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyModbusTCP.server import ModbusServer

from labmeter import config, signing, wire
from labmeter.collector.ledger import Ledger
from labmeter.drivers.registry import agent_config
from tests.conftest import LABMETER, BrokerProcess, free_port
from tests.lab import CollectorThread, Publisher, agent_process, make_agent_key, register, wait_for
from tests.support.modbus import words

AGENT = "bench-01"
INST = "CZ-NMR-009"


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABMETER, *args], cwd=tmp, capture_output=True, text=True, timeout=60)


def write_configs(tmp: Path, broker_url: str, meter_port: int, web_port: int | None = None) -> None:
    (tmp / "agent.toml").write_text(
        "# the agent of the control-path tests\n"
        f'[agent]\nid = "{AGENT}"\nkey_file = "agent.key"\nstate_dir = "state"\nheartbeat_s = 1\n'
        "resend_after_s = 1\n"
        f'[broker]\nurl = "{broker_url}"\n'
        f'[[instrument]]\nid = "{INST}"\npoll_s = 0.2\n[instrument.source]\ndriver = "modbus"\n'
        f'url = "tcp://127.0.0.1:{meter_port}"\nprofile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
    )
    web = f'[web]\nlisten = "127.0.0.1:{web_port}"\n' if web_port else ""
    (tmp / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{tmp / "data"}"\n[broker]\nurl = "{broker_url}"\n{web}'
    )


def status(tmp: Path) -> dict[str, Any]:
    out = cli(tmp, "agent", "status", "-c", "agent.toml", "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def pending(tmp: Path) -> int:
    return sum(int(p["count"]) for p in status(tmp)["pending"].values())


@contextmanager
def meter() -> Iterator[tuple[ModbusServer, int]]:
    port = free_port()
    m = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    m.data_bank.set_input_registers(0x000C, words(900.0))
    m.start()
    try:
        yield m, port
    finally:
        m.stop()


def signed(tmp: Path) -> int:
    """Intervals the agent has signed so far (its chain head), from its state: cheaper than a CLI run."""
    path = tmp / "state" / "agent.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COALESCE(SUM(seq), 0) FROM chain").fetchone()[0])
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return 0
    finally:
        db.close()


def toggle(m: ModbusServer, times: int, tmp: Path) -> None:
    """RUNNING -> OFF -> RUNNING ...: every change closes an interval. Each change waits until the agent has
    signed the interval the last one closed (the first, until its first reading closed the start-up's), so a
    slow start or a late poll cannot merge two changes into none."""
    wait_for(lambda: signed(tmp) >= 1, 60, what="the agent's first reading")
    for i in range(times):
        n = signed(tmp)
        m.data_bank.set_input_registers(0x000C, words(0.5 if i % 2 == 0 else 900.0))
        wait_for(lambda n=n: signed(tmp) > n, 30, what=f"the agent seeing change {i + 1}")


def test_forged_acks_from_the_broker_delete_nothing(broker: BrokerProcess, tmp_path: Path) -> None:
    with meter() as (m, port):
        write_configs(tmp_path, broker.url, port)
        key_out = cli(tmp_path, "collector", "key", "-c", "collector.toml")
        assert key_out.returncode == 0, key_out.stderr
        collector_key = next(w for w in key_out.stdout.split() if w.startswith("ed25519:"))
        enroll = cli(tmp_path, "agent", "enroll", "-c", "agent.toml", "--collector-key", collector_key)
        assert enroll.returncode == 0, enroll.stderr
        assert f'collector_key = "{collector_key}"' in enroll.stdout
        assert config.load(tmp_path / "agent.toml", agent_config()).agent.collector_key == collector_key
        assert "# the agent of the control-path tests" in (tmp_path / "agent.toml").read_text()
        add = next(
            x.strip() for x in enroll.stdout.splitlines() if x.strip().startswith("labmeter collector")
        )
        added = cli(tmp_path, *add.split()[1:], "-c", "collector.toml")
        assert added.returncode == 0 and f'collector_key = "{collector_key}"' in added.stdout

        attacker = Publisher(broker.url, "attacker")
        attacker.subscribe(f"labmeter/v1/{AGENT}/+/interval")  # what the agent sends is visible to anyone
        with agent_process(tmp_path):
            toggle(m, 3, tmp_path)
            wait_for(lambda: pending(tmp_path) >= 3, what="intervals waiting (no collector yet)")
            seen = {}
            for _topic, payload in list(attacker.received):
                body = wire.open_envelope(payload).body
                seen[wire.decode_interval(body).seq] = wire.body_hash(body)
            top = max(seen)
            forged_key = signing.PrivateKey.generate()
            forgeries = [
                b'{"v":1,"acks":{"%s":999999999999}}' % INST.encode(),  # the reported attack, verbatim
                b'{"v":1,"acks":{"INS":999999999999}}',
                # signed, with the right seq and body hash, by a key that is not the pinned one
                *wire.seal_acks(forged_key, AGENT, 0, {INST: wire.AckEntry(top, seen[top])}, []),
                *wire.seal_acks(
                    forged_key, AGENT, 0, {}, [wire.AckReject(INST, s, h, "forged") for s, h in seen.items()]
                ),
                b"not json at all",
            ]
            before = pending(tmp_path)
            for f in forgeries:
                attacker.publish(wire.ack_topic(AGENT), f)
            # a retained forgery reaches the agent again at every reconnect
            attacker.client.publish(wire.ack_topic(AGENT), forgeries[0], qos=1, retain=True).wait_for_publish(
                10
            )
            # the agent has read and refused the forgeries (its log says so for each kind)
            wait_for(
                lambda: all(
                    line in (tmp_path / "agent.log").read_text()
                    for line in ("the collector needs upgrading", "not signed by the pinned collector key")
                ),
                what="the agent refusing the forged acks",
            )
            st = status(tmp_path)
            assert sum(p["count"] for p in st["pending"].values()) >= before and st["dead"] == []
            text = cli(tmp_path, "agent", "status", "-c", "agent.toml").stdout
            assert "waiting for acknowledgement" in text
            assert "pinned from agent.toml" in text
            log = (tmp_path / "agent.log").read_text()
            assert "the collector needs upgrading" in log
            assert "not signed by the pinned collector key" in log

            cfg = config.load(tmp_path / "collector.toml", config.CollectorConfig)
            with CollectorThread(cfg) as ct:
                wait_for(lambda: pending(tmp_path) == 0, timeout=30, what="the genuine collector's acks")
                assert ct.collector is not None
                stored = sqlite3.connect(ct.collector.ledger.path).execute(
                    "SELECT seq, sha FROM intervals WHERE agent=?", (AGENT,)
                )
                assert set(seen.items()) <= set(stored)
        attacker.client.publish(wire.ack_topic(AGENT), b"", qos=1, retain=True).wait_for_publish(10)
        attacker.close()


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_status_counts_only_when_a_registered_agent_signed_it(
    mosquitto: BrokerProcess, tmp_path: Path
) -> None:
    web_port = free_port()
    write_configs(tmp_path, mosquitto.url, free_port(), web_port)
    cfg = config.load(tmp_path / "collector.toml", config.CollectorConfig)
    key, pub, kid = make_agent_key(tmp_path, "bench")
    register(cfg, AGENT, pub, kid, [INST])
    base = f"http://127.0.0.1:{web_port}"
    topic = wire.status_topic(AGENT)
    now = int(time.time() * 1000)

    def signed(status: str, conn: int, at: int, k: Any = key, agent: str = AGENT, pending: int = 0) -> bytes:
        return wire.seal_status(
            k, signing.key_id(k.public_key()), wire.AgentStatus(agent, status, at, conn, pending, "0")
        )

    def body(text: str, k: Any = key) -> bytes:
        return wire.seal(k, signing.key_id(k.public_key()), text)

    with CollectorThread(cfg) as ct:
        assert ct.collector is not None
        c = ct.collector
        pub_ = Publisher(mosquitto.url, "attacker")

        def agents() -> list[dict[str, Any]]:
            code, data = get(f"{base}/api/agents")
            assert code == 200, data
            assert get(f"{base}/api/instruments")[0] == 200
            return list(data["agents"])

        def settle() -> None:
            marker = c.stats["status_ignored"] + 1
            pub_.publish(wire.status_topic("marker"), b"{}")  # an ignored one, last: all before it are in
            wait_for(lambda: c.stats["status_ignored"] >= marker, what="status processed")

        # an old agent's unsigned status, with the reported hostile field
        pub_.publish(topic, b'{"v":1,"status":"online","received":"not-a-number","pending":"x","at":"y"}')
        settle()
        assert agents() == [
            {
                "agent": AGENT,
                "online": False,
                "status": "unverified",
                "last_seen": agents()[0]["last_seen"],
                "pending": None,
                "down": True,
            }
        ]
        assert isinstance(agents()[0]["last_seen"], int)

        # a flood of unregistered agents, unsigned and self-signed: none appears
        for i in range(300):
            pub_.publish(wire.status_topic(f"ghost-{i}"), b'{"v":1,"status":"online"}')
        for i in range(30):
            ghost = signing.PrivateKey.generate()
            pub_.publish(wire.status_topic(f"ghost-s{i}"), signed("online", 1, now, ghost, f"ghost-s{i}"))
        pub_.publish(topic, signed("online", 5, now, signing.PrivateKey.generate()))  # not bench-01's key
        settle()
        assert [a["agent"] for a in agents()] == [AGENT] and set(c.live.agents) == {AGENT}
        assert agents()[0]["status"] == "unverified"

        # the genuine agent: online
        pub_.publish(topic, signed("online", 10, now, pending=7))
        settle()
        wait_for(lambda: agents()[0]["online"], what="signed status counts")
        assert agents()[0]["status"] == "online" and agents()[0]["pending"] == 7

        # signed by the agent's key but hostile bodies: ignored, nothing raw reaches the API
        hostile = [
            '{"v":1,"kind":"status","agent":"bench-01","status":"online","at":"not-a-number","conn":11}',
            '{"v":1,"kind":"status","agent":"bench-01","status":"<script>alert(1)</script>","at":1,"conn":11}',
            '{"v":1,"kind":"status","agent":"bench-01","status":"offline","at":1,"conn":99999999999999999999}',
            '{"v":1,"kind":"status","agent":"other","status":"offline","at":1,"conn":12}',
            '{"v":1,"kind":"status","agent":"bench-01","status":"offline","at":1,"conn":13,"pending":-1}',
            "[1,2,3]",
        ]
        for text in hostile:
            pub_.publish(topic, body(text))
        pub_.publish(topic, b"offline")  # an unsigned last will does not override a signed status
        settle()
        got = agents()[0]
        assert got["online"] is True and got["pending"] == 7 and isinstance(got["last_seen"], int)
        assert set(c.live.agents[AGENT]) == {
            "online",
            "verified",
            "received",
            "at",
            "pending",
            "version",
            "order",
        }

        # a signed extra field is never kept
        pub_.publish(
            topic,
            body(
                wire.dump_body(
                    {
                        "v": 1,
                        "kind": "status",
                        "agent": AGENT,
                        "status": "online",
                        "at": now,
                        "conn": 14,
                        "pending": 3,
                        "version": "0",
                        "received": "not-a-number",
                        "error": "<img src=x onerror=alert(1)>",
                    }
                )
            ),
        )
        settle()
        wait_for(lambda: agents()[0]["pending"] == 3, what="newer signed status")
        assert "error" not in json.dumps(agents()) and "not-a-number" not in json.dumps(agents())

        # order: the signed will of connection 14 makes it offline; a replay of connection 14's online
        # does not bring it back; connection 15's online does
        offline_14 = signed("offline", 14, now - 1)
        online_14 = signed("online", 14, now + 5)
        pub_.publish(topic, offline_14)
        settle()
        wait_for(lambda: agents()[0]["online"] is False, what="signed offline")
        pub_.publish(topic, online_14)
        settle()
        assert agents()[0]["online"] is False and agents()[0]["status"] == "offline"
        pub_.publish(topic, signed("online", 15, now + 10))
        settle()
        wait_for(lambda: agents()[0]["online"], what="next connection online")
        pub_.publish(topic, offline_14)  # replayed old will
        settle()
        assert agents()[0]["online"] is True
        # an "online" signed an hour ago (recorded, replayed on a new conn number it once had) is not online
        pub_.publish(topic, signed("online", 16, now - 3_600_000))
        settle()
        assert agents()[0]["online"] is False
        assert ct.alive
        pub_.close()


def test_upgrade_keeps_an_existing_ledger_and_agent_working(mosquitto: BrokerProcess, tmp_path: Path) -> None:
    """A ledger without a collector key and an agent state without a pinned key or connection numbers,
    with rows still waiting, as the code before the signed control path left them."""
    from labmeter.agent.outbox import AgentStore, Signer
    from labmeter.agent.timeline import Span
    from labmeter.wire import State

    with meter() as (m, port):
        write_configs(tmp_path, mosquitto.url, port)
        cfg = config.load(tmp_path / "collector.toml", config.CollectorConfig)
        agent_key = signing.generate_key_file(tmp_path / "agent.key")
        pub = agent_key.public_key()
        ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
        ledger.add_agent(AGENT, signing.public_key_text(pub), signing.key_id(pub), [INST])
        ledger.close()
        store = AgentStore(tmp_path / "state" / "agent.db")
        t0 = int(time.time() * 1000) - 3_600_000
        old = store.emit(
            Signer(AGENT, agent_key, signing.key_id(pub)),
            INST,
            [Span(t0, t0 + 600_000, State.RUNNING), Span(t0 + 600_000, t0 + 1_200_000, State.OFF)],
            None,
        )
        store.db.execute("DROP TABLE meta")  # not there before this change
        store.close()
        key_file = cfg.collector.key_path
        assert not key_file.exists() and not (tmp_path / "state" / "collector.pub").exists()

        with CollectorThread(cfg) as ct, agent_process(tmp_path):
            assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
            wait_for(lambda: pending(tmp_path) == 0, timeout=30, what="old rows acknowledged after TOFU")
            assert ct.collector is not None
            seqs = {
                r[0] for r in sqlite3.connect(ct.collector.ledger.path).execute("SELECT seq FROM intervals")
            }
            assert {r.seq for r in old} <= seqs
            fingerprint = signing.key_id(signing.load_private_key(key_file).public_key())
            text = cli(tmp_path, "agent", "status", "-c", "agent.toml").stdout
            assert f"collector key {fingerprint}, pinned from first use" in text, text
            log = (tmp_path / "agent.log").read_text()
            assert f"pinned the collector key {fingerprint} on first use" in log
            assert 'collector_key = "ed25519:' in log
            n = len(seqs)
            toggle(m, 2, tmp_path)  # new intervals flow and are acknowledged too
            wait_for(
                lambda: (
                    len(list(sqlite3.connect(ct.collector.ledger.path).execute("SELECT seq FROM intervals")))
                    >= n + 2
                    and pending(tmp_path) == 0
                ),
                timeout=30,
                what="new intervals stored and acknowledged",
            )
            wait_for(
                lambda: ct.collector is not None and ct.collector.live.agents.get(AGENT, {}).get("online"),
                what="the upgraded agent's signed heartbeat",
            )
