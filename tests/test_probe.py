"""`labmeter agent probe` against real peers: a good meter, nothing listening, a wrong word order,
a device that does not answer, a missing serial port, and a plug topic with no messages."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pyModbusTCP.server import ModbusServer

from tests.conftest import LABMETER, BrokerProcess, free_port
from tests.support.modbus import words

HEAD = '[agent]\nid = "probe-pc"\nkey_file = "agent.key"\nstate_dir = "state"\n'


def modbus(code: str, url: str, extra: str = "") -> str:
    return (
        f'[[instrument]]\nid = "{code}"\npoll_s = 0.1\n[instrument.source]\ndriver = "modbus"\nurl = "{url}"\n'
        f'profile = "eastron-sdm120"\ntimeout_s = 0.3\n{extra}[instrument.states]\noff_below_w = 5\n'
        "run_above_w = 400\n"
    )


def probe(tmp: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp / "agent.toml").write_text(text)
    return subprocess.run(
        [*LABMETER, "agent", "probe", "-c", "agent.toml", "--reads", "2", *args],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_probe_diagnoses(tmp_path: Path, mosquitto: BrokerProcess) -> None:
    good_port, swapped_port, closed_port = free_port(), free_port(), free_port()
    good = ModbusServer(host="127.0.0.1", port=good_port, no_block=True)
    good.data_bank.set_input_registers(0x000C, words(850.0))
    swapped = ModbusServer(host="127.0.0.1", port=swapped_port, no_block=True)
    swapped.data_bank.set_input_registers(0x000C, words(1234.5)[::-1])
    good.start()
    swapped.start()
    try:
        text = HEAD + f'[broker]\nurl = "{mosquitto.url}"\n'
        text += modbus("GOOD", f"tcp://127.0.0.1:{good_port}")
        text += modbus("CLOSED", f"tcp://127.0.0.1:{closed_port}")
        text += modbus("SWAPPED", f"tcp://127.0.0.1:{swapped_port}")
        text += modbus("SERIAL", "rtu:///dev/ttyUSB-labmeter-missing?baud=9600")
        text += (
            '[[instrument]]\nid = "PLUG"\n[instrument.source]\ndriver = "mqtt"\ntopic = "tele/nobody/SENSOR"\n'
            "[instrument.states]\noff_below_w = 3\nrun_above_w = 60\n"
        )
        out = probe(tmp_path, text)
    finally:
        good.stop()
        swapped.stop()
    assert out.returncode == 1, out.stderr
    text_out = out.stdout
    assert "GOOD:\n  read 1: raw 850.0 -> 850.0 W -> RUNNING" in text_out
    assert "OK: reads fine, classified RUNNING" in text_out
    assert f"PROBLEM: nothing answers at 127.0.0.1:{closed_port}" in text_out
    assert "PROBLEM: the value read is absurd" in text_out and "word order" in text_out
    assert "PROBLEM: serial port /dev/ttyUSB-labmeter-missing does not exist" in text_out
    assert "PROBLEM: no message on tele/nobody/SENSOR" in text_out


def test_probe_one_instrument_ok(tmp_path: Path) -> None:
    port = free_port()
    meter = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    meter.data_bank.set_input_registers(0x000C, words(2.0))
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
    assert "classified OFF" in out.stdout and "B:" not in out.stdout
