"""A simulated meter on Modbus TCP, its power register laid out as a shipped profile says."""

from __future__ import annotations

import struct
from typing import ClassVar

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from labmeter.clock import Clock
from labmeter.drivers.modbus import DATA_TYPES, CheckRegister, EnergyRegister, Register, load_profile
from labmeter.drivers.sim import Schedule
from labmeter.netutil import split_listen


def encode(value: float, type_: str, word_order: str) -> list[int]:
    """A value as the registers a meter holds it in (the inverse of the driver's decoding)."""
    code, n = DATA_TYPES[type_]
    packed = struct.pack(f">{code}", value if code == "f" else round(value))
    words = list(struct.unpack(f">{n}H", packed))
    return words if word_order == "big" else words[::-1]


class SimMeter:
    """A meter serving the schedule's power where its profile's ``[power]`` register is
    (by default an Eastron SDM120: float32 in input registers 0x000C-0x000D), 230 V / 50 Hz in its
    check registers, so ``agent probe`` can confirm the word order, and the running integral of the
    schedule in its ``[energy]`` counter (which can roll over at ``wrap_wh`` or be reset)."""

    MAINS: ClassVar[dict[str, float]] = {"voltage": 230.0, "frequency": 50.0}

    PROFILE = "eastron-sdm120"

    def __init__(
        self,
        listen: str,
        schedule: Schedule,
        clock: Clock,
        device_id: int = 1,
        profile: str = PROFILE,
        counter_wh: float = 0.0,
        wrap_wh: float | None = None,
    ) -> None:
        prof = load_profile(profile)
        self.register = prof.power
        self.energy = prof.energy
        self.counter_wh = counter_wh  # what the energy counter read at the schedule's start
        self.wrap_wh = wrap_wh  # where it rolls over to 0, as a display with fixed digits does
        self.checks = prof.checks()
        if self.register.type == "bit":
            raise ValueError(f"profile {profile!r}: the simulator serves register profiles, not bits")
        host, port = split_listen(listen)
        self.schedule = schedule
        self.clock = clock
        self.reads = 0
        regs: list[Register | CheckRegister | EnergyRegister] = [self.register, *self.checks.values()]
        if self.energy is not None:
            regs.append(self.energy)
        ends = [r.address + DATA_TYPES[r.type][1] for r in regs]
        size = max(0x50, *ends)
        registers = [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)]
        device = SimDevice(id=device_id, simdata=registers, action=self._action)
        self.server = ModbusTcpServer(device, address=(host, port))

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        reg = self.register
        if function_code == reg.function:
            self.reads += 1
            power = self.schedule.power_at(self.clock.wall_ms())
            words = encode(power / reg.scale, reg.type, reg.word_order)
            off = reg.address - start_address
            if off >= 0 and off + len(words) <= len(current_registers):
                current_registers[off : off + len(words)] = words
        en = self.energy
        if en is not None and function_code == en.function:
            words = encode(self.counter_at(self.clock.wall_ms()) / en.scale, en.type, reg.word_order)
            off = en.address - start_address
            if off >= 0 and off + len(words) <= len(current_registers):
                current_registers[off : off + len(words)] = words
        for name, check in self.checks.items():
            if function_code == check.function:
                words = encode(self.MAINS[name] / check.scale, check.type, reg.word_order)
                off = check.address - start_address
                if off >= 0 and off + len(words) <= len(current_registers):
                    current_registers[off : off + len(words)] = words
        return None

    def counter_at(self, wall_ms: int) -> float:
        """The import-energy counter in Wh: the running integral of the schedule's levels."""
        wh = self.counter_wh + self.schedule.energy_wh(wall_ms)
        return wh % self.wrap_wh if self.wrap_wh else wh

    def reset_counter(self) -> None:
        """Zero the counter now, as a meter's reset (or a replacement meter) does."""
        self.counter_wh = -self.schedule.energy_wh(self.clock.wall_ms())

    async def start(self) -> None:
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        await self.server.shutdown()
