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

import paho.mqtt.client as paho
import pytest

from labmeter import config, signing, wire
from labmeter.collector.mosquitto import source_subscriptions
from tests.certs import certificates
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


@dataclass
class Broker:
    home: Path
    mq: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    agents: dict[str, config.AgentConfig] = field(default_factory=dict)

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
    certificates(mq)  # the TLS recipe of docs/deploy.md: the key readable by the mosquitto group only
    shutil.chown(mq / "server.key", "root", "mosquitto")
    (mq / "server.key").chmod(0o640)
    port = free_port()
    shipped = (ROOT / "config" / "mosquitto" / "labmeter.conf").read_text()
    (confd / "labmeter.conf").write_text(
        shipped.replace("/etc/mosquitto/labmeter", str(mq))
        .replace("listener 8883", f"listener {port} 127.0.0.1")
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
        cfgs[agent] = config.load(home / f"{agent}.toml", config.AgentConfig)
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
        yield Broker(home, mq, port, proc, log, cfgs)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(home, ignore_errors=True)


class Client:
    def __init__(self, b: Broker, user: str, password: str | None = None) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.rcs: list[int] = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{time.monotonic_ns()}")
        self.c.tls_set(ca_certs=str(b.mq / "ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
        self.c.username_pw_set(user, b.password(user) if password is None else password)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self.rcs.append(rc.value)
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", b.port)
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
    log = b.log.read_text()
    assert "running" in log and "Error" not in log and "Warning" not in log, log
