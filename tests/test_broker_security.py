"""The shipped Mosquitto config (TLS, a password per agent, ACL) with a real Mosquitto: a wrong password is
refused, an agent publishing under another agent's id is denied and nothing reaches the ledger, and the
normal path (a real agent and the collector) works over TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from pyModbusTCP.server import ModbusServer

from labmeter import config, signing, wire
from tests.certs import certificates
from tests.conftest import LABMETER, ROOT, free_port, mosquitto_bin, wait_port
from tests.lab import CollectorThread, agent_process, interval_payload, wait_for
from tests.support.modbus import words

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates"
)


def cli(d: Path, *args: str) -> str:
    out = subprocess.run([*LABMETER, *args], cwd=d, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def secure(tmp_path: Path):  # type: ignore[no-untyped-def]
    mq = tmp_path / "mosquitto"
    mq.mkdir()
    certificates(mq)
    port = free_port()
    shipped = (ROOT / "config" / "mosquitto" / "labmeter.conf").read_text()
    conf = (
        shipped.replace("/etc/mosquitto/labmeter", str(mq))
        .replace("listener 8883", f"listener {port} 127.0.0.1")
        .replace("persistence true", "persistence false")
        .replace("persistence_location /var/lib/mosquitto/\n", "")
    )
    (mq / "mosquitto.conf").write_text(
        conf + "user root\n"
    )  # the test runs as root; keep mosquitto able to read tmp
    (tmp_path / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{tmp_path / "data"}"\n[broker]\nurl = "mqtts://127.0.0.1:{port}"\n'
        f'username = "labmeter-collector"\npassword_file = "{mq}/secrets/labmeter-collector.pass"\n'
        f'ca_file = "{mq}/ca.pem"\n'
    )
    keys = {}
    for agent in ("lab-a", "lab-b"):
        key = signing.generate_key_file(tmp_path / f"{agent}.key")
        keys[agent] = key
        out = cli(
            tmp_path,
            "collector",
            "add-agent",
            agent,
            "--key",
            signing.public_key_text(key.public_key()),
            "--instrument",
            f"CZ-{agent[-1].upper()}",
            "-c",
            "collector.toml",
            "--mosquitto-dir",
            str(mq),
        )
        assert f"topic write labmeter/v1/{agent}/+/interval" in out
    cli(tmp_path, "collector", "broker-user", "labmeter-collector", "--mosquitto-dir", str(mq))
    log = open(tmp_path / "mosquitto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([mosquitto_bin(), "-c", str(mq / "mosquitto.conf")], stdout=log, stderr=log)
    wait_port(port)
    yield tmp_path, mq, port, keys
    proc.terminate()
    proc.wait(10)


def client(mq: Path, port: int, user: str, password: str) -> tuple[paho.Client, list[int]]:
    rcs: list[int] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{time.monotonic_ns()}")
    c.tls_set(ca_certs=str(mq / "ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
    c.username_pw_set(user, password)
    c.on_connect = lambda _c, _u, _f, rc, _p: rcs.append(rc.value)
    c.connect("127.0.0.1", port)
    c.loop_start()
    wait_for(lambda: rcs, what="CONNACK")
    return c, rcs


def test_wrong_password_is_refused(secure) -> None:  # type: ignore[no-untyped-def]
    _tmp, mq, port, _keys = secure
    c, rcs = client(mq, port, "lab-a", "not-the-password")
    c.loop_stop()
    assert rcs[0] != 0  # CONNACK: not authorised
    good = (mq / "secrets" / "lab-a.pass").read_text().strip()
    c2, rcs2 = client(mq, port, "lab-a", good)
    c2.disconnect()
    c2.loop_stop()
    assert rcs2[0] == 0
    assert oct((mq / "secrets" / "lab-a.pass").stat().st_mode & 0o777) == "0o600"


def test_acl_and_the_normal_path_over_tls(secure) -> None:  # type: ignore[no-untyped-def]
    tmp, mq, port, keys = secure
    meter_port = free_port()
    meter = ModbusServer(host="127.0.0.1", port=meter_port, no_block=True)
    meter.data_bank.set_input_registers(0x000C, words(900.0))
    meter.start()
    shutil.copy(tmp / "lab-a.key", tmp / "agent.key")
    (tmp / "agent.toml").write_text(
        '[agent]\nid = "lab-a"\nkey_file = "agent.key"\nstate_dir = "state"\n'
        f'[broker]\nurl = "mqtts://127.0.0.1:{port}"\nusername = "lab-a"\n'
        f'password_file = "{mq}/secrets/lab-a.pass"\nca_file = "{mq}/ca.pem"\n'
        f'[[instrument]]\nid = "CZ-A"\npoll_s = 0.2\n[instrument.source]\ndriver = "modbus"\n'
        f'url = "tcp://127.0.0.1:{meter_port}"\nprofile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
    )
    cfg = config.load(tmp / "collector.toml", config.CollectorConfig)
    try:
        with CollectorThread(cfg) as ct, agent_process(tmp):
            assert ct.collector is not None
            led = ct.collector.ledger

            def count(sql: str) -> int:
                import sqlite3

                db = sqlite3.connect(led.path)
                try:
                    return int(db.execute(sql).fetchone()[0])
                finally:
                    db.close()

            wait_for(
                lambda: (
                    ct.collector is not None
                    and ct.collector.live.instruments.get("CZ-A", {}).get("state") == "RUNNING"
                ),
                what="the agent's first reading (RUNNING) over TLS",
            )
            meter.data_bank.set_input_registers(0x000C, words(0.5))  # RUNNING -> OFF: intervals close
            wait_for(
                lambda: count("SELECT count(*) FROM intervals WHERE agent='lab-a'") >= 2,
                what="the agent's intervals over TLS",
            )

            # lab-b, with a valid account, publishes a correctly signed lab-a interval under lab-a's id
            key_a = keys["lab-a"]
            t0 = int(time.time() * 1000) - 3_600_000
            payload, _ = interval_payload(
                key_a,
                signing.key_id(key_a.public_key()),
                "lab-a",
                "CZ-A",
                1000,
                wire.GENESIS,
                t0,
                t0 + 60_000,
                "RUNNING",
            )
            b, _ = client(mq, port, "lab-b", (mq / "secrets" / "lab-b.pass").read_text().strip())
            b.publish(wire.interval_topic("lab-a", "CZ-A"), payload, qos=1).wait_for_publish(5)
            time.sleep(1.0)
            assert count("SELECT count(*) FROM intervals WHERE seq=1000") == 0
            assert count("SELECT count(*) FROM rejections") == 0  # it never reached the collector
            b.disconnect()
            b.loop_stop()

            # the same bytes from lab-a's own account do arrive: the ACL, nothing else, stopped them
            a, _ = client(mq, port, "lab-a", (mq / "secrets" / "lab-a.pass").read_text().strip())
            a.publish(wire.interval_topic("lab-a", "CZ-A"), payload, qos=1).wait_for_publish(5)
            wait_for(
                lambda: count("SELECT count(*) FROM intervals WHERE seq=1000") == 1,
                what="lab-a's own publish",
            )
            a.disconnect()
            a.loop_stop()
    finally:
        meter.stop()
