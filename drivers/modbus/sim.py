"""A simulated meter on Modbus TCP, its power register laid out as a shipped profile says."""

from __future__ import annotations

import struct

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from labmeter.clock import Clock
from labmeter.drivers.modbus import DATA_TYPES, load_profile
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
    (by default an Eastron SDM120: float32 in input registers 0x000C-0x000D)."""

    PROFILE = "eastron-sdm120"

    def __init__(
        self, listen: str, schedule: Schedule, clock: Clock, device_id: int = 1, profile: str = PROFILE
    ) -> None:
        self.register = load_profile(profile).power
        if self.register.type == "bit":
            raise ValueError(f"profile {profile!r}: the simulator serves register profiles, not bits")
        host, port = split_listen(listen)
        self.schedule = schedule
        self.clock = clock
        self.reads = 0
        size = max(0x50, self.register.address + DATA_TYPES[self.register.type][1])
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
        return None

    async def start(self) -> None:
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        await self.server.shutdown()
