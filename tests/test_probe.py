"""`labmeter agent probe` against real peers, each fault with its own diagnosis and exit status 1.

Meters are served by pyModbusTCP, which shares no code with pymodbus (the driver's library) nor with
labmeter's simulator; its data handler answers the Modbus exception a gateway sends. Brokers are
Mosquitto as Debian ships it, with a password file and an ACL. Serial meters are socat ptys."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from pyModbusTCP.constants import EXP_GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND
from pyModbusTCP.server import DataHandler, ModbusServer

from labmeter import config
from labmeter.agent.probe import ProbeResult, probe_instrument
from labmeter.clock import Clock
from labmeter.drivers import registry
from labmeter.drivers.modbus import EXCEPTIONS, load_profile
from labmeter.drivers.profiles import shipped_profiles
from tests.conftest import LABMETER, BrokerProcess, free_port, mosquitto_bin, wait_port
from tests.support.modbus import SilentServer, words
from tests.support.pty import PtyPair

HEAD = '[agent]\nid = "probe-pc"\nkey_file = "agent.key"\nstate_dir = "state"\n'


def modbus(code: str, url: str, extra: str = "", profile: str = "eastron-sdm120") -> str:
    return (
        f'[[instrument]]\nid = "{code}"\npoll_s = 0.1\n[instrument.source]\ndriver = "modbus"\nurl = "{url}"\n'
        f'profile = "{profile}"\ntimeout_s = 0.3\n{extra}[instrument.states]\noff_below_w = 5\n'
        "run_above_w = 400\n"
    )


def plug(code: str, topic: str) -> str:
    return (
        f'[[instrument]]\nid = "{code}"\n[instrument.source]\ndriver = "mqtt"\ntopic = "{topic}"\n'
        "[instrument.states]\noff_below_w = 3\nrun_above_w = 60\n"
    )


def probe(tmp: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp / "agent.toml").write_text(text)
    return subprocess.run(
        [*LABMETER, "agent", "probe", "-c", "agent.toml", "--reads", "2", *args],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )


def verdict(out: str, name: str) -> str:
    """The verdict line of instrument ``name``."""
    lines = out.splitlines()
    start = lines.index(f"{name}:")
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        if line.startswith(("  OK:", "  PROBLEM:", "  UNSURE:")):
            return line.strip()
    raise AssertionError(f"no verdict for {name} in:\n{out}")


# ---- every shipped meter profile, four powers, both word orders ------------------------------------


def _serve_meter(profile: str, power_w: float, order: str) -> tuple[ModbusServer, int]:
    """A meter laid out as ``profile`` says, its words in ``order``, at 230 V / 50 Hz."""
    prof = load_profile(profile)
    port = free_port()
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    bank = server.data_bank
    for reg, value in [
        (prof.power, power_w),
        *((r, {"voltage": 230.0, "frequency": 50.0}[k]) for k, r in prof.checks().items()),
    ]:
        put = bank.set_input_registers if reg.function == 4 else bank.set_holding_registers
        put(reg.address, words(value / reg.scale, order))
    server.start()
    return server, port


REGISTER_PROFILES = [p for p in shipped_profiles("modbus") if load_profile(p).power.type != "bit"]
MATRIX = [(p, w, o) for p in REGISTER_PROFILES for w in (0.0, 12.5, 850.0, 2000.0) for o in ("big", "little")]


def _probe_one(text: str, reads: int = 1) -> ProbeResult:
    cfg = config.parse(HEAD + text, registry.agent_config(), "agent.toml")
    return asyncio.run(probe_instrument(cfg, cfg.instrument[0], reads, Clock()))


def test_every_register_profile_has_checks() -> None:
    for p in REGISTER_PROFILES:
        assert set(load_profile(p).checks()) == {"voltage", "frequency"}, p


@pytest.mark.parametrize(("profile", "power", "order"), MATRIX, ids=[f"{p}-{w:g}W-{o}" for p, w, o in MATRIX])
def test_word_order_is_never_passed_unchecked(profile: str, power: float, order: str) -> None:
    server, port = _serve_meter(profile, power, order)
    try:
        res = _probe_one(modbus("M", f"tcp://127.0.0.1:{port}", profile=profile))
    finally:
        server.stop()
    reg = load_profile(profile).power
    hexwords = " ".join(f"0x{w:04X}" for w in words(power / reg.scale, order))
    assert f"raw {hexwords}" in "\n".join(res.lines), res.lines
    if order == reg.word_order:
        assert res.verdict == "OK", (res.diagnosis, res.lines)
        assert f"-> {power:.1f} W" in res.lines[0]
        assert any("confirmed by the voltage and frequency" in line for line in res.lines)
    else:
        assert res.verdict == "PROBLEM", (res.diagnosis, res.lines)
        assert "low word first" in res.diagnosis and 'word_order = "little"' in res.diagnosis


def test_generic_register_at_zero_is_unsure_not_ok() -> None:
    """Without a check register, 0 W reads the same in both orders: probe cannot vouch for the order."""
    port = free_port()
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    server.data_bank.set_holding_registers(100, [0, 0])
    server.start()
    reg = '[instrument.source.register]\nfunction = 3\naddress = 100\ntype = "float32"\n'
    try:
        zero = _probe_one(modbus("G", f"tcp://127.0.0.1:{port}", reg, profile="generic"))
        server.data_bank.set_holding_registers(100, words(850.0, "little"))
        swapped = _probe_one(modbus("G", f"tcp://127.0.0.1:{port}", reg, profile="generic"))
        server.data_bank.set_holding_registers(100, words(850.0))
        good = _probe_one(modbus("G", f"tcp://127.0.0.1:{port}", reg, profile="generic"))
    finally:
        server.stop()
    assert zero.verdict == "UNSURE" and "both word orders" in zero.diagnosis
    assert swapped.verdict == "PROBLEM" and "word order" in swapped.diagnosis, swapped
    assert good.verdict == "OK", good


# ---- faults of a meter, each its own diagnosis, through the command --------------------------------


class GatewayTimeout(DataHandler):
    """A Modbus TCP gateway whose meter behind it does not answer: exception 11 for every read."""

    def read_i_regs(self, address: int, count: int, srv_info: Any) -> DataHandler.Return:
        return DataHandler.Return(exp_code=EXP_GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND)


def test_meter_faults(tmp_path: Path, mosquitto: BrokerProcess) -> None:
    good_port, gw_port, silent_port, closed_port = free_port(), free_port(), free_port(), free_port()
    good = ModbusServer(host="127.0.0.1", port=good_port, no_block=True)
    good.data_bank.set_input_registers(0x0000, words(230.0))
    good.data_bank.set_input_registers(0x000C, words(850.0))
    good.data_bank.set_input_registers(0x0046, words(50.0))
    gateway = ModbusServer(host="127.0.0.1", port=gw_port, no_block=True, data_hdl=GatewayTimeout())
    silent = SilentServer(silent_port)
    pty = PtyPair(tmp_path)  # the meter's end stays unopened: nothing answers on the line
    good.start()
    gateway.start()
    pty.start()
    try:
        text = HEAD + f'[broker]\nurl = "{mosquitto.url}"\n'
        text += modbus("GOOD", f"tcp://127.0.0.1:{good_port}")
        text += modbus("GATEWAY", f"tcp://127.0.0.1:{gw_port}", "device_id = 7\n")
        text += modbus("SILENT-TCP", f"tcp://127.0.0.1:{silent_port}")
        text += modbus("CLOSED", f"tcp://127.0.0.1:{closed_port}")
        text += modbus("SILENT-RTU", f"rtu://{pty.b}?baud=9600")
        text += modbus("MISSING-PORT", "rtu:///dev/ttyUSB-labmeter-missing?baud=9600")
        out = probe(tmp_path, text)
    finally:
        good.stop()
        gateway.stop()
        silent.stop()
        pty.stop()
    o = out.stdout
    assert out.returncode == 1, o + out.stderr
    assert "Traceback" not in o + out.stderr
    assert "GOOD:\n  read 1: raw 0x4454 0x8000 -> 850.0 W -> RUNNING" in o, o
    assert "voltage (function 4, 0x0000): raw 0x4366 0x0000 -> 230 V" in o
    assert verdict(o, "GOOD") == "OK: reads fine, classified RUNNING"
    gw = verdict(o, "GATEWAY")
    assert "exception 11 (gateway target device failed to respond)" in gw and "device_id 7" in gw, gw
    assert "ExceptionResponse" not in o
    st = verdict(o, "SILENT-TCP")
    assert f"127.0.0.1:{silent_port} accepts connections but device 1 did not answer" in st, st
    assert "baud" not in st and "A/B" not in st
    assert f"nothing accepts a connection at 127.0.0.1:{closed_port}" in verdict(o, "CLOSED")
    sr = verdict(o, "SILENT-RTU")
    assert "no answer from device 1 on" in sr and "A/B swapped" in sr and "baud=9600" in sr, sr
    assert "firewall" not in sr
    assert "serial port /dev/ttyUSB-labmeter-missing does not exist" in verdict(o, "MISSING-PORT")
    assert verdict(o, "broker link (agent probe-pc)").startswith("OK:")


def test_probe_one_instrument_ok(tmp_path: Path) -> None:
    port = free_port()
    meter = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    meter.data_bank.set_input_registers(0x0000, words(230.0))
    meter.data_bank.set_input_registers(0x000C, words(2.0))
    meter.data_bank.set_input_registers(0x0046, words(50.0))
    meter.start()
    try:
        out = probe(
            tmp_path,
            HEAD + modbus("A", f"tcp://127.0.0.1:{port}") + modbus("B", "tcp://127.0.0.1:1"),
            "--instrument",
            "A",
        )
    finally:
        meter.stop()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "classified OFF" in out.stdout and "B:" not in out.stdout and "broker link" not in out.stdout


# ---- the agent's own broker link, and plugs behind a broker's login and ACL -------------------------

ACL = """user lab-a
topic write labmeter/v1/lab-a/#
topic read labmeter/v1/lab-a/ack
topic read tele/open/#

user lab-mute
topic write labmeter/v1/lab-mute/#

user lab-ro
topic read labmeter/v1/lab-ro/ack

user plug
topic write tele/#
"""
PASSWORDS = {"lab-a": "a-secret", "lab-mute": "m-secret", "lab-ro": "r-secret", "plug": "p-secret"}


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Mosquitto with a password file and an ACL, as the shipped config sets it up (plain port here)."""
    d = tmp_path / "mq"
    d.mkdir()
    pw = d / "passwd"
    for user, secret in PASSWORDS.items():
        flags = ["-b"] if pw.exists() else ["-c", "-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(pw), user, secret], check=True, capture_output=True)
        (d / f"{user}.pass").write_text(secret + "\n")
    (d / "acl").write_text(ACL)
    port = free_port()
    user = "user root\n" if os.geteuid() == 0 else ""
    (d / "m.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\nacl_file {d / 'acl'}\n"
        f"persistence false\n{user}"
    )
    log = open(tmp_path / "mosquitto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([mosquitto_bin(), "-c", str(d / "m.conf")], stdout=log, stderr=log)
    wait_port(port)
    yield port, d
    proc.terminate()
    proc.wait(10)


def broker(port: int, user: str, password_file: Path | str) -> str:
    return (
        f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\nusername = "{user}"\npassword_file = "{password_file}"\n'
    )


def head(agent: str) -> str:
    return HEAD.replace('"probe-pc"', f'"{agent}"')


def publish_retained(port: int, messages: dict[str, str]) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"plug-{time.monotonic_ns()}")
    c.username_pw_set("plug", PASSWORDS["plug"])
    c.connect("127.0.0.1", port)
    c.loop_start()
    for topic, payload in messages.items():
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_plug_hidden_by_the_acl(tmp_path: Path, locked_broker: tuple[int, Path]) -> None:
    port, d = locked_broker
    publish_retained(
        port,
        {
            "tele/open/SENSOR": '{"ENERGY": {"Power": 42}}',
            "tele/open/LWT": "Online",
            "tele/hidden/SENSOR": '{"ENERGY": {"Power": 42}}',
            "tele/hidden/LWT": "Online",
        },
    )
    text = head("lab-a") + broker(port, "lab-a", d / "lab-a.pass")
    text += plug("OPEN", "tele/open/SENSOR") + plug("HIDDEN", "tele/hidden/SENSOR")
    out = probe(tmp_path, text)
    o = out.stdout
    assert out.returncode == 1, o + out.stderr
    assert verdict(o, "OPEN") == "OK: reads fine, classified STANDBY", o
    hidden = verdict(o, "HIDDEN")
    assert "nothing arrived on tele/hidden/SENSOR or tele/hidden/LWT" in hidden, hidden
    assert "accepted the login as 'lab-a' but may hide these topics" in hidden
    assert "`topic read tele/hidden/SENSOR`" in hidden and "TelePeriod" in hidden
    assert verdict(o, "broker link (agent lab-a)").startswith("OK:"), o


def test_agent_link_faults(tmp_path: Path, locked_broker: tuple[int, Path]) -> None:
    """A wrong password (for the agent and for a plug on the same broker), a missing password file,
    an account that may not publish, one that may not read its acks: each named, exit status 1."""
    port, d = locked_broker
    (d / "wrong.pass").write_text("not-the-password\n")
    meter_port = free_port()
    meter = ModbusServer(host="127.0.0.1", port=meter_port, no_block=True)
    meter.data_bank.set_input_registers(0x0000, words(230.0))
    meter.data_bank.set_input_registers(0x000C, words(850.0))
    meter.data_bank.set_input_registers(0x0046, words(50.0))
    meter.start()
    runs: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for name, agent, user, pw in [
            ("wrong", "lab-a", "lab-a", d / "wrong.pass"),
            ("missing", "lab-a", "lab-a", tmp_path / "broker.pass"),
            ("mute", "lab-mute", "lab-mute", d / "lab-mute.pass"),
            ("deaf", "lab-ro", "lab-ro", d / "lab-ro.pass"),
            ("fine", "lab-a", "lab-a", d / "lab-a.pass"),
        ]:
            run = tmp_path / name
            run.mkdir()
            text = head(agent) + broker(port, user, pw) + modbus("METER", f"tcp://127.0.0.1:{meter_port}")
            if name in ("wrong", "missing"):
                text += plug("PLUG", "tele/open/SENSOR")
            runs[name] = probe(run, text)
    finally:
        meter.stop()
    for name, out in runs.items():
        assert "Traceback" not in out.stdout + out.stderr, name
        assert verdict(out.stdout, "METER").startswith("OK:"), (name, out.stdout)  # the others still probed
    agents = {"wrong": "lab-a", "missing": "lab-a", "mute": "lab-mute", "deaf": "lab-ro", "fine": "lab-a"}
    link = {name: verdict(out.stdout, f"broker link (agent {agents[name]})") for name, out in runs.items()}
    assert "refused the login as 'lab-a' (not authorised)" in link["wrong"], link["wrong"]
    assert "refused the login as 'lab-a'" in verdict(runs["wrong"].stdout, "PLUG")
    assert "the plug's broker refused the agent" in verdict(runs["wrong"].stdout, "PLUG")
    assert "check the topic" not in runs["wrong"].stdout
    assert "broker.pass: cannot read password file" in link["missing"], link["missing"]
    assert "cannot read password file" in verdict(runs["missing"].stdout, "PLUG")
    assert "does not deliver labmeter/v1/lab-mute/ack" in link["mute"], link["mute"]
    assert "ACL does not let lab-ro publish on labmeter/v1/lab-ro/status" in link["deaf"], link["deaf"]
    assert link["fine"].startswith("OK:"), link["fine"]
    for name in ("wrong", "missing", "mute", "deaf"):
        assert runs[name].returncode == 1, (name, runs[name].stdout)
    assert runs["fine"].returncode == 0, runs["fine"].stdout


def test_link_over_tls_with_the_wrong_ca(tmp_path: Path) -> None:
    """An agent whose ca_file did not sign the broker's certificate is told so."""
    from tests.certs import certificates

    mq = tmp_path / "mq"
    mq.mkdir()
    certificates(mq)
    other = tmp_path / "other"
    other.mkdir()
    certificates(other)
    port = free_port()
    user = "user root\n" if os.geteuid() == 0 else ""
    (mq / "m.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\ncafile {mq / 'ca.pem'}\n"
        f"certfile {mq / 'server.pem'}\nkeyfile {mq / 'server.key'}\npersistence false\n{user}"
    )
    proc = subprocess.Popen([mosquitto_bin(), "-c", str(mq / "m.conf")], stderr=subprocess.DEVNULL)
    meter, meter_port = _serve_meter("eastron-sdm120", 850.0, "big")
    inst = modbus("METER", f"tcp://127.0.0.1:{meter_port}")
    try:
        wait_port(port)
        bad = head("lab-a") + f'[broker]\nurl = "mqtts://127.0.0.1:{port}"\nca_file = "{other / "ca.pem"}"\n'
        out = probe(tmp_path, bad + inst)
        plain = head("lab-a") + f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n'
        (tmp_path / "p").mkdir()
        out_plain = probe(tmp_path / "p", plain + inst)
    finally:
        meter.stop()
        proc.terminate()
        proc.wait(10)
    assert verdict(out.stdout, "METER").startswith("OK:"), out.stdout + out.stderr
    link = verdict(out.stdout, "broker link (agent lab-a)")
    assert out.returncode == 1 and "TLS certificate is not trusted" in link, link
    link_plain = verdict(out_plain.stdout, "broker link (agent lab-a)")
    assert out_plain.returncode == 1 and "use mqtts://" in link_plain, link_plain


class Refuses(DataHandler):
    """A meter (or gateway) answering every register read with one Modbus exception."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def read_i_regs(self, address: int, count: int, srv_info: Any) -> DataHandler.Return:
        return DataHandler.Return(exp_code=self.code)


@pytest.mark.parametrize("code", sorted(EXCEPTIONS))
def test_exception_codes_in_words(code: int) -> None:
    port = free_port()
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True, data_hdl=Refuses(code))
    server.start()
    try:
        res = _probe_one(modbus("M", f"tcp://127.0.0.1:{port}"))
    finally:
        server.stop()
    name, _hint = EXCEPTIONS[code]
    assert res.verdict == "PROBLEM"
    assert f"exception {code} ({name})" in res.diagnosis, res.diagnosis
    assert "ExceptionResponse" not in res.diagnosis + "\n".join(res.lines)


def test_unknown_exception_code_and_garbage_mains() -> None:
    """What a hostile or broken meter may send: an exception code no table has, a NaN voltage."""
    port = free_port()
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True, data_hdl=Refuses(0x42))
    server.start()
    try:
        odd = _probe_one(modbus("M", f"tcp://127.0.0.1:{port}"))
    finally:
        server.stop()
    assert odd.verdict == "PROBLEM" and "exception 66 (unknown exception)" in odd.diagnosis, odd
    server, port = _serve_meter("eastron-sdm120", 850.0, "big")
    server.data_bank.set_input_registers(0x0000, [0x7FC0, 0x0000])  # NaN either way round
    try:
        nan = _probe_one(modbus("M", f"tcp://127.0.0.1:{port}"))
    finally:
        server.stop()
    assert (
        nan.verdict == "PROBLEM" and "voltage reads nan V" in nan.diagnosis and "not mains" in nan.diagnosis
    )


def test_link_to_something_that_is_no_broker(tmp_path: Path) -> None:
    port = free_port()
    silent = SilentServer(port)
    meter, meter_port = _serve_meter("eastron-sdm120", 850.0, "big")
    try:
        out = probe(
            tmp_path,
            head("lab-a")
            + f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n'
            + modbus("METER", f"tcp://127.0.0.1:{meter_port}"),
        )
    finally:
        silent.stop()
        meter.stop()
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert "sent no MQTT answer" in verdict(out.stdout, "broker link (agent lab-a)"), out.stdout
    assert verdict(out.stdout, "METER").startswith("OK:")


def test_probe_passes_an_install_made_by_labmeter_commands(tmp_path: Path) -> None:
    """The shipped Mosquitto config over TLS, accounts and ACLs made only by `add-agent --agent-config`
    and `plug-user`: probe passes the agent, its meter and its plug. Its ACL lets the agent write
    only the four topics it publishes, so the ack subscription is reported as not testable, not
    as a fault."""
    from labmeter import signing
    from tests.certs import certificates
    from tests.conftest import ROOT

    mq = tmp_path / "mosquitto"
    mq.mkdir()
    certificates(mq)
    port = free_port()
    conf = (
        (ROOT / "config" / "mosquitto" / "labmeter.conf")
        .read_text()
        .replace("/etc/mosquitto/labmeter", str(mq))
        .replace("listener 8883", f"listener {port} 127.0.0.1")
        .replace("persistence true", "persistence false")
        .replace("persistence_location /var/lib/mosquitto/\n", "")
    )
    (mq / "mosquitto.conf").write_text(conf + ("user root\n" if os.geteuid() == 0 else ""))
    (tmp_path / "collector.toml").write_text(f'[collector]\ndata_dir = "{tmp_path / "data"}"\n')
    meter, meter_port = _serve_meter("eastron-sdm120", 850.0, "big")
    agent = (
        head("lab-a")
        + f'[broker]\nurl = "mqtts://127.0.0.1:{port}"\nusername = "lab-a"\n'
        + f'password_file = "{mq}/secrets/lab-a.pass"\nca_file = "{mq}/ca.pem"\n'
        + modbus("METER", f"tcp://127.0.0.1:{meter_port}")
        + plug("PLUG", "tele/plug-a/SENSOR")
    )
    (tmp_path / "agent.toml").write_text(agent)
    key = signing.generate_key_file(tmp_path / "lab-a.key")

    def cli(*args: str) -> None:
        out = subprocess.run([*LABMETER, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr

    cli(
        "collector", "add-agent", "lab-a", "--key", signing.public_key_text(key.public_key()),
        "--instrument", "METER", "--instrument", "PLUG", "--agent-config", "agent.toml",
        "--mosquitto-dir", str(mq),
    )  # fmt: skip
    cli("collector", "plug-user", "plug-a", "--agent-config", "agent.toml", "--instrument", "PLUG",
        "--mosquitto-dir", str(mq))  # fmt: skip
    log = open(tmp_path / "mosquitto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([mosquitto_bin(), "-c", str(mq / "mosquitto.conf")], stdout=log, stderr=log)
    try:
        wait_port(port)
        import ssl

        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="plug-a")
        c.tls_set(ca_certs=str(mq / "ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
        c.username_pw_set("plug-a", (mq / "secrets" / "plug-a.pass").read_text().strip())
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.publish("tele/plug-a/SENSOR", '{"ENERGY": {"Power": 120}}', qos=1, retain=True).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        out = probe(tmp_path, agent)
    finally:
        meter.stop()
        proc.terminate()
        proc.wait(10)
    o = out.stdout
    assert out.returncode == 0, o + out.stderr
    assert (
        verdict(o, "METER").startswith("OK:") and verdict(o, "PLUG") == "OK: reads fine, classified RUNNING"
    )
    link = verdict(o, "broker link (agent lab-a)")
    assert link.startswith("OK:") and "labmeter/v1/lab-a/ack" in link, o
    assert "over TLS (MQTT 5)" in o
