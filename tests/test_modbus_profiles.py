"""Every shipped Modbus profile read from an independent server (pyModbusTCP), as the device lays out its data."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pyModbusTCP.server import ModbusServer

from labmeter.drivers.base import Sample
from labmeter.drivers.modbus import ModbusSource, modbus_register
from labmeter.drivers.modbus import Register as RegisterConfig
from labmeter.drivers.modbus.driver import ModbusDriver
from labmeter.drivers.profiles import shipped_profiles
from labmeter.wire import State
from tests.conftest import free_port
from tests.support.modbus import words

# profile, where the device keeps it, address, raw value on the wire, what labmeter must read
CASES: list[tuple[str, str, int, Any, Any]] = [
    ("eastron-sdm120", "input", 0x000C, words(1234.5), 1234.5),
    ("eastron-sdm230", "input", 0x000C, words(230.0), 230.0),
    ("eastron-sdm630", "input", 0x0034, words(6300.0), 6300.0),
    ("chint-ddsu666", "holding", 0x2004, words(1.25), 1250.0),  # kW on the wire
    ("chint-dtsu666", "holding", 0x2012, words(12345.0), 1234.5),  # 0.1 W units
    ("di-module", "discrete", 0, [True], State.RUNNING),
    ("di-module", "discrete", 0, [False], State.OFF),
]


def read_once(port: int, source: ModbusSource) -> Sample:
    async def main() -> Sample:
        d = ModbusDriver(source, modbus_register(source, None))
        s = await d.read()
        await d.close()
        return s

    return asyncio.run(main())


def serve(kind: str, address: int, value: Any) -> tuple[ModbusServer, int]:
    port = free_port()
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    {
        "input": server.data_bank.set_input_registers,
        "holding": server.data_bank.set_holding_registers,
        "discrete": server.data_bank.set_discrete_inputs,
    }[kind](address, value)
    server.start()
    return server, port


@pytest.mark.parametrize(
    ("profile", "kind", "address", "raw", "expected"), CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES]
)
def test_profile(profile: str, kind: str, address: int, raw: Any, expected: Any) -> None:
    server, port = serve(kind, address, raw)
    try:
        s = read_once(port, ModbusSource(url=f"tcp://127.0.0.1:{port}", profile=profile, timeout_s=0.5))
    finally:
        server.stop()
    assert s.error is None, s.error
    if isinstance(expected, State):
        assert s.status is expected
    else:
        assert s.power_w == pytest.approx(expected)


def test_every_shipped_profile_has_a_case() -> None:
    assert set(shipped_profiles("modbus")) == {c[0] for c in CASES}


def test_generic_register_from_config() -> None:
    server, port = serve("holding", 100, [1234])
    try:
        src = ModbusSource(
            url=f"tcp://127.0.0.1:{port}",
            profile="generic",
            register=RegisterConfig(function=3, address=100, type="int16", scale=0.5),
        )
        s = read_once(port, src)
    finally:
        server.stop()
    assert s.power_w == 617.0
