"""Modbus RTU over a socat pty pair: a pymodbus RTU server on one end, the agent's driver on the other.

Also a device that answers with a broken CRC, and a port that disappears and comes back
(socat stopped and restarted on the same link name, as a USB adapter re-plugged).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import serial

from labmeter.clock import Clock
from labmeter.drivers.base import Sample
from labmeter.drivers.modbus import ModbusSource, load_profile
from labmeter.drivers.modbus.driver import ModbusDriver
from labmeter.drivers.modbus.sim import SimMeter
from labmeter.drivers.sim import Schedule
from tests.support.pty import SOCAT, PtyPair, pty  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(SOCAT is None, reason="socat is not installed (make deps installs it)")


def source(p: PtyPair) -> ModbusSource:
    return ModbusSource(url=f"rtu://{p.b}?baud=9600&parity=N", profile="eastron-sdm120", timeout_s=0.5)


def test_rtu_reads_and_survives_unplug(pty: PtyPair) -> None:  # noqa: F811
    from pymodbus.server import ModbusSerialServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def main() -> list[Sample]:
        clock = Clock()
        sched = Schedule([(0, "RUNNING")], noise=0.0, epoch_ms=0)
        meter = SimMeter("127.0.0.1:1", sched, clock)  # reuse its register action on a serial server
        dev = SimDevice(
            id=1,
            simdata=[SimData(0, count=0x50, values=0, datatype=DataType.REGISTERS)],
            action=meter._action,
        )

        async def serve() -> ModbusSerialServer:
            server = ModbusSerialServer(dev, port=str(pty.a), baudrate=9600)
            await server.serve_forever(background=True)
            return server

        server = await serve()
        d = ModbusDriver(source(pty), load_profile("eastron-sdm120"))
        out = [await d.read()]
        await server.shutdown()
        pty.stop()  # the adapter is unplugged
        out.append(await d.read())
        pty.start()  # and plugged back in, under the same name
        server = await serve()
        for _ in range(20):
            s = await d.read()
            if s.power_w is not None:
                break
            await asyncio.sleep(0.2)
        out.append(s)
        await d.close()
        await server.shutdown()
        return out

    got = asyncio.run(main())
    assert got[0].power_w == pytest.approx(1200.0), got[0]
    assert got[1].power_w is None and got[1].error is not None
    assert got[2].power_w == pytest.approx(1200.0), got[2]


def crc16(frame: bytes) -> bytes:
    """Modbus RTU CRC-16 (poly 0xA001, init 0xFFFF), low byte first: written out here, not taken from pymodbus."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return bytes([crc & 0xFF, crc >> 8])


@pytest.mark.parametrize("crc_ok", [True, False])
def test_crc_error_is_an_error(pty: PtyPair, crc_ok: bool) -> None:  # noqa: F811
    """A device whose replies carry a wrong CRC (line noise): the read fails, it is never read as 0 W. The
    same device with the right CRC is read as 1234.5 W, and the device saw the request and answered either
    way, so what fails is the CRC, not a silent line."""
    stop = threading.Event()
    replies = []
    frame = bytes([0x01, 0x04, 0x04, 0x44, 0x9A, 0x50, 0x00])  # unit 1, FC04, 4 bytes of 1234.5 as float32
    reply = frame + (crc16(frame) if crc_ok else bytes(a ^ 0xFF for a in crc16(frame)))

    listening = threading.Event()

    def device() -> None:
        with serial.Serial(str(pty.a), 9600, timeout=0.1) as port:
            listening.set()  # pyserial flushes input on open: a request sent before this would be lost
            while not stop.is_set():
                req = port.read(8)
                if len(req) == 8:
                    assert req[6:] == crc16(req[:6]), "the driver's request carries a valid CRC"
                    replies.append(req)
                    port.write(reply)

    t = threading.Thread(target=device, daemon=True)
    t.start()
    assert listening.wait(10), "the fake device did not open its port"

    async def main() -> Sample:
        d = ModbusDriver(source(pty), load_profile("eastron-sdm120"))
        s = await d.read()
        await d.close()
        return s

    try:
        s = asyncio.run(main())
    finally:
        stop.set()
        t.join(2)
    assert replies and replies[0][:2] == bytes([0x01, 0x04]), replies
    if crc_ok:
        assert s.power_w == pytest.approx(1234.5) and s.error is None, s
    else:
        assert s.power_w is None and s.error is not None, s
