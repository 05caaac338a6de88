"""Modbus TCP meters against two server implementations (pymodbus and pyModbusTCP), with faults."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from pyModbusTCP.server import ModbusServer

from labmeter.agent.classifier import Classifier
from labmeter.clock import Clock
from labmeter.config import StatesConfig
from labmeter.drivers.base import Reading, Sample
from labmeter.drivers.modbus import ModbusSource, load_profile
from labmeter.drivers.modbus.driver import ModbusDriver
from labmeter.drivers.modbus.sim import SimMeter
from labmeter.drivers.profiles import ProfileError
from labmeter.drivers.sim import Schedule
from labmeter.wire import State
from tests.conftest import free_port
from tests.support.modbus import words


def source(port: int, profile: str = "eastron-sdm120", device_id: int = 1) -> ModbusSource:
    return ModbusSource(url=f"tcp://127.0.0.1:{port}", profile=profile, device_id=device_id, timeout_s=0.5)


def independent_server(port: int, value: float, order: str = "big") -> ModbusServer:
    server = ModbusServer(host="127.0.0.1", port=port, no_block=True)
    server.data_bank.set_input_registers(0x000C, words(value, order))
    server.start()
    return server


def test_reads_power_from_independent_server() -> None:
    port = free_port()
    server = independent_server(port, 1234.5)
    try:

        async def main() -> list[float | None]:
            d = ModbusDriver(source(port), load_profile("eastron-sdm120"))
            await d.start()
            out = [(await d.read()).power_w for _ in range(3)]
            await d.close()
            return out

        assert asyncio.run(main()) == [1234.5, 1234.5, 1234.5]
    finally:
        server.stop()


def test_site_profile_with_little_word_order(tmp_path: Path) -> None:
    (tmp_path / "meter-le.toml").write_text(
        'name = "little-endian meter"\ndriver = "modbus"\n[power]\nfunction = 4\naddress = 12\n'
        'type = "float32"\nword_order = "little"\nscale = 1000.0\n'
    )
    port = free_port()
    server = independent_server(port, 0.75, order="little")  # kW on the wire, W after scale
    try:

        async def main() -> float | None:
            d = ModbusDriver(source(port, "meter-le"), load_profile("meter-le", tmp_path))
            s = await d.read()
            await d.close()
            return s.power_w

        assert asyncio.run(main()) == pytest.approx(750.0)
    finally:
        server.stop()


def test_wrong_word_order_is_reported_as_absurd() -> None:
    port = free_port()
    server = independent_server(port, 1234.5, order="little")
    try:

        async def main() -> str | None:
            d = ModbusDriver(source(port), load_profile("eastron-sdm120"))
            s = await d.read()
            await d.close()
            return s.error

        err = asyncio.run(main())
        assert err is not None and "word order" in err
    finally:
        server.stop()


def test_unknown_profile_lists_shipped_ones() -> None:
    with pytest.raises(ProfileError, match="eastron-sdm120"):
        load_profile("no-such-meter")


def test_pymodbus_server_down_then_up_then_dropping() -> None:
    """Down at start → UNKNOWN; server appears → reads; server stops mid-run → UNKNOWN, never OFF; back → recovers."""
    port = free_port()
    clock = Clock()
    cls = Classifier(StatesConfig(off_below_w=5, run_above_w=400))

    async def state(d: ModbusDriver) -> State:
        s = await d.read()
        return cls.update(Reading.of(s, clock.mono(), clock.wall_ms())).state

    async def main() -> list[State]:
        meter = SimMeter(f"127.0.0.1:{port}", Schedule([(0, "RUNNING")], noise=0.0, epoch_ms=0), clock)
        d = ModbusDriver(source(port), load_profile("eastron-sdm120"))
        seen = [await state(d)]
        await meter.start()
        for _ in range(30):  # the driver retries with back-off (0.5 s, 1 s, ...)
            first_up = await state(d)
            if first_up is State.RUNNING:
                break
            await asyncio.sleep(0.1)
        seen.append(first_up)
        await meter.stop()
        await asyncio.sleep(0.2)
        seen.append(await state(d))
        meter = SimMeter(f"127.0.0.1:{port}", Schedule([(0, "RUNNING")], noise=0.0, epoch_ms=0), clock)
        await meter.start()
        await asyncio.sleep(0.2)
        for _ in range(40):
            last = await state(d)
            if last is State.RUNNING:
                break
            await asyncio.sleep(0.1)
        seen.append(last)
        await meter.stop()
        await d.close()
        return seen

    assert asyncio.run(main()) == [State.UNKNOWN, State.RUNNING, State.UNKNOWN, State.RUNNING]


def test_wrong_device_id_is_an_error_not_off() -> None:
    port = free_port()
    clock = Clock()

    async def main() -> str | None:
        meter = SimMeter(
            f"127.0.0.1:{port}", Schedule([(0, "OFF")], noise=0.0, epoch_ms=0), clock, device_id=1
        )
        await meter.start()
        d = ModbusDriver(source(port, device_id=7), load_profile("eastron-sdm120"))
        s = await d.read()
        await d.close()
        await meter.stop()
        assert s.power_w is None
        return s.error

    err = asyncio.run(main())
    assert err is not None


def test_sim_meter_serves_schedule_as_float32() -> None:
    assert words(1.0) == [0x3F80, 0x0000]
    s = Schedule([(0, "OFF"), (10, "RUNNING")], levels={"OFF": 0.5, "RUNNING": 900.0}, noise=0.0, epoch_ms=0)
    assert s.power_at(5_000) == 0.5 and s.power_at(10_000) == 900.0
    assert not math.isnan(s.power_at(-1))


def test_short_and_garbled_responses_are_errors() -> None:
    """A gateway that answers with too few bytes, then one that answers garbage: errors (UNKNOWN), never 0 W."""
    import socket
    import threading

    replies = [
        # MBAP says 5 bytes follow (unit, FC04, byte count 4 ...) but only 2 data bytes come: a short response
        lambda tid: tid + b"\x00\x00\x00\x05\x01\x04\x04\x44\x9a",
        lambda tid: tid + b"\x00\x00\x00\x03\x01\x84\x02",  # an exception response (illegal address)
        lambda tid: b"\xff" * 7,  # garbage
    ]
    port = free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen()
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        i = 0
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(0.2)
                while not stop.is_set():
                    try:
                        req = conn.recv(64)
                    except OSError:
                        continue
                    if not req:
                        break
                    conn.sendall(replies[min(i, len(replies) - 1)](req[:2]))
                    i += 1

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    async def main() -> list[Sample]:
        d = ModbusDriver(source(port), load_profile("eastron-sdm120"))
        out = []
        for _ in range(3):
            out.append(await d.read())
            d._next_try = 0.0  # no back-off wait between the cases
        await d.close()
        return out

    try:
        got = asyncio.run(main())
    finally:
        stop.set()
        t.join(2)
        srv.close()
    assert all(s.power_w is None and s.error for s in got), got
    assert "answered" in (got[1].error or "")
