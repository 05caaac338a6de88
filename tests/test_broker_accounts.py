"""Broker accounts made only by labmeter commands, on Debian's Mosquitto started as the Debian service
starts it: `/usr/sbin/mosquitto -c <main conf>` as root, no `user` line, so Mosquitto drops to the
`mosquitto` user before it reads the password file and the ACL (and again at every reload), with the
shipped config/mosquitto/labmeter.conf in its conf.d.

An agent reads its own ESPHome and Tasmota plugs and nothing of another lab's; a plug writes only its own
topics; an agent writes only its own labmeter topics, and only the collector writes acks."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from labmeter import config, signing, wire
from labmeter.collector.mosquitto import source_subscriptions
from labmeter.drivers.registry import agent_config
from tests.conftest import LABMETER, ROOT, free_port, mosquitto_bin, wait_port
from tests.lab import wait_for

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed for test certificates"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting Mosquitto as the service does needs root"),
]


def cli(d: Path, *args: str) -> str:
    out = subprocess.run([*LABMETER, *args], cwd=d, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def agent_toml(agent: str, port: int, mq: Path, plugs: list[tuple[str, str, str]]) -> str:
    text = (
        f'[agent]\nid = "{agent}"\nkey_file = "{agent}.key"\nstate_dir = "state-{agent}"\n'
        f'[broker]\nurl = "mqtts://127.0.0.1:{port}"\nusername = "{agent}"\n'
        f'password_file = "{mq}/secrets/{agent}.pass"\nca_file = "{mq}/ca.pem"\n'
    )
    for inst, fmt, topic in plugs:
        text += (
            f'[[instrument]]\nid = "{inst}"\n[instrument.source]\ndriver = "mqtt"\nformat = "{fmt}"\n'
            f'topic = "{topic}"\n[instrument.states]\noff_below_w = 3\nrun_above_w = 60\n'
        )
    return text


def docs_tls_recipe(mq: Path) -> None:
    """Run docs/deploy.md's TLS commands as written, for 127.0.0.1 instead of broker.example.org."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    start = doc.index("cd /etc/mosquitto/labmeter\n")
    script = doc[start : doc.index("```", start)]
    assert "chown root:mosquitto server.key" in script and "-extfile server.ext" in script
    script = (
        script.replace("cd /etc/mosquitto/labmeter", f"cd {mq}")
        .replace("DNS:broker.example.org, DNS:broker, IP:192.168.1.10", "DNS:localhost, IP:127.0.0.1")
        .replace("mv ca.key /root/labmeter-ca.key && chmod 0600 /root/labmeter-ca.key", "rm ca.key")
    )
    subprocess.run(["sh", "-e", "-c", script], check=True, capture_output=True, timeout=120)


@dataclass
class Broker:
    home: Path
    mq: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    plain: int
    agents: dict[str, config.AgentConfig[Any]] = field(default_factory=dict)

    def password(self, user: str) -> str:
        return (self.mq / "secrets" / f"{user}.pass").read_text().strip()


@pytest.fixture
def debian_broker() -> Iterator[Broker]:
    # pytest's tmp_path is under a 0700 directory of root's: the mosquitto user could not reach it
    home = Path(tempfile.mkdtemp(prefix="labmeter-accounts-"))
    home.chmod(0o755)
    mq = home / "etc-mosquitto-labmeter"  # /etc/mosquitto/labmeter
    confd = home / "conf.d"
    var = home / "var-lib-mosquitto"
    run = home / "run-mosquitto"
    for d in (mq, confd, var, run):
        d.mkdir()
    shutil.chown(var, "mosquitto", "root")  # as Debian ships /var/lib/mosquitto
    shutil.chown(run, "mosquitto")  # as mosquitto.service's ExecStartPre makes /run/mosquitto
    docs_tls_recipe(mq)
    port, plain = free_port(), free_port()
    shipped = (ROOT / "config" / "mosquitto" / "labmeter.conf").read_text()
    assert "#listener 1883 192.168.1.10\n" in shipped
    (confd / "labmeter.conf").write_text(
        shipped.replace("/etc/mosquitto/labmeter", str(mq))
        .replace("listener 8883", f"listener {port} 127.0.0.1")
        .replace("#listener 1883 192.168.1.10", f"listener {plain} 127.0.0.1")  # the plugs' listener
        .replace("/var/lib/mosquitto/", f"{var}/")
    )
    debian_main = Path("/etc/mosquitto/mosquitto.conf").read_text()  # the package's own main config
    main = home / "mosquitto.conf"
    main.write_text(
        debian_main.replace("/run/mosquitto/", f"{run}/")
        .replace("/var/lib/mosquitto/", f"{var}/")
        .replace("/var/log/mosquitto/mosquitto.log", f"{home}/mosquitto.log")
        .replace("/etc/mosquitto/conf.d", str(confd))
    )
    (home / "mosquitto.log").touch()
    shutil.chown(home / "mosquitto.log", "mosquitto")

    collector_toml = home / "collector.toml"
    collector_toml.write_text(f'[collector]\ndata_dir = "{home / "data"}"\n')
    agents = {
        "lab-a": [
            ("CZ-ESP", "esphome", "esp-a/sensor/power/state"),
            ("CZ-TAS", "tasmota", "tele/plug-a/SENSOR"),
        ],
        "lab-b": [("CZ-B", "tasmota", "tele/plug-b/SENSOR")],
    }
    cfgs = {}
    for agent, plugs in agents.items():
        (home / f"{agent}.toml").write_text(agent_toml(agent, port, mq, plugs))
        cfgs[agent] = config.load(home / f"{agent}.toml", agent_config())
        key = signing.generate_key_file(home / f"{agent}.key")
        args = [a for inst, _f, _t in plugs for a in ("--instrument", inst)]
        cli(
            home,
            *("collector", "add-agent", agent, "--key", signing.public_key_text(key.public_key()), *args),
            *("-c", str(collector_toml), "--mosquitto-dir", str(mq), "--agent-config", f"{agent}.toml"),
        )
    cli(home, "collector", "broker-user", "labmeter-collector", "--mosquitto-dir", str(mq))
    for user, agent, inst in (
        ("plug-esp-a", "lab-a", "CZ-ESP"),
        ("plug-tas-a", "lab-a", "CZ-TAS"),
        ("plug-tas-b", "lab-b", "CZ-B"),
    ):
        cli(
            home,
            *("collector", "plug-user", user, "--mosquitto-dir", str(mq)),
            *("--agent-config", f"{agent}.toml", "--instrument", inst),
        )
    log = home / "mosquitto.log"
    proc = subprocess.Popen(
        [mosquitto_bin(), "-c", str(main)], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    try:
        try:
            wait_port(port)
        except TimeoutError:
            proc.terminate()
            pytest.fail(f"mosquitto did not start:\n{log.read_text()}")
        yield Broker(home, mq, port, proc, log, plain, cfgs)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(home, ignore_errors=True)


class Client:
    def __init__(self, b: Broker, user: str, password: str | None = None, tls: bool = True) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.rcs: list[int] = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{time.monotonic_ns()}")
        if tls:
            self.c.tls_set(ca_certs=str(b.mq / "ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
        self.c.username_pw_set(user, b.password(user) if password is None else password)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self.rcs.append(rc.value)
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", b.port if tls else b.plain)
        self.c.loop_start()
        wait_for(lambda: self.rcs, what=f"CONNACK for {user}")

    def subscribe(self, *topics: str) -> None:
        acked: list[int] = []
        self.c.on_subscribe = lambda *_a: acked.append(1)
        for t in topics:
            self.c.subscribe(t, qos=1)
        wait_for(lambda: len(acked) == len(topics), what="SUBACK")

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def topics(self) -> set[str]:
        return {t for t, _p in self.got}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_files_are_the_mosquitto_users_and_the_broker_runs_as_it(debian_broker: Broker) -> None:
    b = debian_broker
    mosq = pwd.getpwnam("mosquitto")
    for name in ("passwd", "acl"):
        st = (b.mq / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (mosq.pw_uid, mosq.pw_gid, 0o600), name
    assert (b.mq / "secrets").stat().st_mode & 0o777 == 0o700
    status = Path(f"/proc/{b.proc.pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == mosq.pw_uid  # dropped to mosquitto: it read passwd and acl as that user
    c = Client(b, "lab-a")
    assert c.rcs == [0]
    c.close()
    wrong = Client(b, "plug-tas-a", password="guessed", tls=False)  # the plain plug listener checks too
    wrong.close()
    assert wrong.rcs[0] != 0
    log = b.log.read_text()
    assert "running" in log and "Error" not in log and "Warning" not in log, log


def _reads(b: Broker, agent: str) -> list[str]:
    return [t for inst in b.agents[agent].instrument for t in source_subscriptions(inst.source)]  # type: ignore[arg-type]


def test_agents_read_their_plugs_only_and_plugs_write_their_topics_only(debian_broker: Broker) -> None:
    b = debian_broker
    a, bb, coll = Client(b, "lab-a"), Client(b, "lab-b"), Client(b, "labmeter-collector")
    # each agent subscribes to what its drivers subscribe to, and to everything, and to the other lab's plug
    a.subscribe(*_reads(b, "lab-a"), "#", *_reads(b, "lab-b"), wire.ack_topic("lab-a"))
    bb.subscribe(*_reads(b, "lab-b"), "#", wire.ack_topic("lab-b"))
    coll.subscribe(f"{wire.ROOT}/#")
    # the Tasmota plugs (ESP8266: no TLS) use the plain plug listener, with the same accounts and ACL
    esp = Client(b, "plug-esp-a")
    tas_a, tas_b = Client(b, "plug-tas-a", tls=False), Client(b, "plug-tas-b", tls=False)
    tas_b.subscribe("#")  # a plug reads nothing of anyone else's

    # the plugs' own feeds, as the devices publish them
    esp.publish("esp-a/status", b"online")
    esp.publish("esp-a/sensor/power/state", b"12.5")
    tas_a.publish("tele/plug-a/LWT", b"Online")
    tas_a.publish("tele/plug-a/SENSOR", b'{"ENERGY":{"Power":850}}')
    tas_b.publish("tele/plug-b/SENSOR", b'{"ENERGY":{"Power":7}}')
    wait_for(
        lambda: (
            {"esp-a/status", "esp-a/sensor/power/state", "tele/plug-a/LWT", "tele/plug-a/SENSOR"}
            <= a.topics()
        ),
        what="lab-a's ESPHome and Tasmota plugs at lab-a",
    )
    assert ("esp-a/sensor/power/state", b"12.5") in a.got
    wait_for(lambda: "tele/plug-b/SENSOR" in bb.topics(), what="lab-b's plug at lab-b")

    # forgeries, each acknowledged by the broker (QoS 1) before the sentinel that shows delivery happened
    tas_a.publish("tele/plug-b/SENSOR", b'{"ENERGY":{"Power":9999}}')  # another lab's plug
    tas_a.publish("esp-a/sensor/power/state", b"9999")  # a plug of its own lab, but not itself
    tas_a.publish("tele/plug-b/LWT", b"Offline")
    tas_a.publish(wire.interval_topic("lab-a", "CZ-TAS"), b"forged")  # labmeter's topics
    tas_a.publish(wire.ack_topic("lab-a"), b"forged")
    esp.publish("tele/plug-a/SENSOR", b'{"ENERGY":{"Power":9999}}')
    # the agent: its own labmeter topics go through, another agent's and its own ack topic do not
    a.publish(wire.interval_topic("lab-a", "CZ-TAS"), b"mine")
    a.publish(wire.status_topic("lab-a"), b"status")
    a.publish(wire.interval_topic("lab-b", "CZ-B"), b"forged")
    a.publish(wire.status_topic("lab-b"), b"forged")
    a.publish(wire.ack_topic("lab-a"), b"forged")
    a.publish(wire.ack_topic("lab-b"), b"forged")
    a.publish("tele/plug-b/SENSOR", b'{"ENERGY":{"Power":9999}}')  # an agent is not a plug either
    bb.publish(wire.interval_topic("lab-a", "CZ-TAS"), b"forged")
    coll.publish(wire.ack_topic("lab-a"), b"ack-a")  # the collector alone writes acks

    # sentinels, published after every forgery was acknowledged
    tas_b.publish("tele/plug-b/SENSOR", b"sentinel-b")
    tas_a.publish("tele/plug-a/SENSOR", b"sentinel-a")
    esp.publish("esp-a/sensor/power/state", b"sentinel-esp")
    a.publish(wire.interval_topic("lab-a", "CZ-ESP"), b"sentinel")
    wait_for(lambda: ("tele/plug-b/SENSOR", b"sentinel-b") in bb.got, what="sentinel at lab-b")
    wait_for(lambda: ("esp-a/sensor/power/state", b"sentinel-esp") in a.got, what="sentinel at lab-a")
    wait_for(lambda: ("tele/plug-a/SENSOR", b"sentinel-a") in a.got, what="sentinel at lab-a")
    wait_for(
        lambda: (wire.interval_topic("lab-a", "CZ-ESP"), b"sentinel") in coll.got,
        what="sentinel at collector",
    )
    wait_for(lambda: (wire.ack_topic("lab-a"), b"ack-a") in a.got, what="the collector's ack at lab-a")

    everything = a.got + bb.got + coll.got + tas_b.got
    assert not [m for m in everything if b"9999" in m[1] or m[1] in (b"forged", b"Offline")], everything
    # lab-a saw nothing of lab-b's plug, and nothing beyond its plugs and its acks
    assert a.topics() <= {*_reads(b, "lab-a"), wire.ack_topic("lab-a")}, a.topics()
    assert bb.topics() <= {*_reads(b, "lab-b"), wire.ack_topic("lab-b")}, bb.topics()
    assert (wire.interval_topic("lab-a", "CZ-TAS"), b"mine") in coll.got
    assert (wire.status_topic("lab-a"), b"status") in coll.got
    assert tas_b.got == []  # a plug account reads no one's topics (its own cmnd/ only)
    for c in (a, bb, coll, esp, tas_a, tas_b):
        c.close()


def test_a_new_password_applies_at_reload_as_the_mosquitto_user(debian_broker: Broker) -> None:
    """Rotating an account rewrites passwd (by rename) while the broker runs; the reload, done as the
    mosquitto user, reads it: the old password is refused, the new one accepted, the others untouched."""
    b = debian_broker
    old = b.password("plug-tas-a")
    cli(
        b.home,
        *("collector", "plug-user", "plug-tas-a", "--mosquitto-dir", str(b.mq), "--new-password"),
        *("--agent-config", "lab-a.toml", "--instrument", "CZ-TAS"),
    )
    assert b.password("plug-tas-a") != old
    b.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "Reloading config" in b.log.read_text() or "reload" in b.log.read_text().lower(),
        what="the reload in the log",
    )
    time.sleep(0.5)
    assert b.proc.poll() is None, b.log.read_text()

    def rc(user: str, password: str | None = None) -> int:
        c = Client(b, user, password)
        c.close()
        return c.rcs[0]

    assert rc("plug-tas-a", old) != 0
    assert rc("plug-tas-a") == 0
    assert rc("lab-a") == 0 and rc("plug-esp-a") == 0 and rc("labmeter-collector") == 0
    assert "Error" not in b.log.read_text() and "Warning" not in b.log.read_text()
