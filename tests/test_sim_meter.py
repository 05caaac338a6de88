"""The simulated SDM120 (drivers/modbus/sim.py) that the demo, the scenarios and the benchmarks poll: read over real
Modbus TCP by an independent client (pyModbusTCP), its input registers 0x000C-0x000D hold the schedule's
power as a big-endian float32, changing when the schedule does."""

from __future__ import annotations

import asyncio
import struct

from pyModbusTCP.client import ModbusClient

from labmeter.clock import Clock
from labmeter.drivers.modbus.sim import SimMeter
from labmeter.drivers.sim import Schedule
from tests.conftest import free_port


class FixedClock(Clock):
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def wall_ms(self) -> int:
        return self.ms


def test_sim_meter_serves_schedule_as_float32_over_modbus() -> None:
    levels = {"OFF": 0.5, "RUNNING": 900.0, "STANDBY": 150.25}
    schedule = Schedule([(0, "OFF"), (10, "RUNNING"), (20, "STANDBY")], levels=levels, noise=0.0, epoch_ms=0)
    clock = FixedClock(5_000)
    port = free_port()

    async def main() -> list[tuple[int, list[int] | None]]:
        meter = SimMeter(f"127.0.0.1:{port}", schedule, clock)
        await meter.start()
        client = ModbusClient(host="127.0.0.1", port=port, unit_id=1, timeout=5, auto_open=True)
        loop = asyncio.get_running_loop()
        got = []
        try:
            for at in (5_000, 10_000, 25_000):
                clock.ms = at
                got.append((at, await loop.run_in_executor(None, client.read_input_registers, 0x000C, 2)))
        finally:
            client.close()
            await meter.stop()
        assert meter.reads == 3
        return got

    for at, regs in asyncio.run(main()):
        assert regs is not None and len(regs) == 2, (at, regs)
        watts = struct.unpack(">f", struct.pack(">HH", *regs))[0]
        assert watts == schedule.power_at(at), (at, regs, watts)
    assert [schedule.power_at(t) for t in (5_000, 10_000, 25_000)] == [0.5, 900.0, 150.25]
