"""Simulated instruments that speak the real protocols: an SDM120 on Modbus TCP, a Tasmota plug on MQTT.

Power follows a schedule of (seconds since the simulated start, state); the demo
and the scenario tests compare metered hours against that schedule.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import random
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from labmeter.clock import Clock
from labmeter.config import BrokerConfig
from labmeter.mqtt import MqttLink, Will
from labmeter.netutil import split_listen

log = logging.getLogger("labmeter.sim")

DEFAULT_LEVELS = {"OFF": 0.8, "STANDBY": 150.0, "RUNNING": 1200.0}


@dataclass
class Schedule:
    """Piecewise-constant states; ``levels`` gives the watts drawn in each."""

    points: list[tuple[float, str]]
    levels: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LEVELS))
    noise: float = 0.02
    epoch_ms: int = 0

    def __post_init__(self) -> None:
        self.points = sorted((float(t), s) for t, s in self.points)
        self._times = [t for t, _ in self.points]
        self._rng = random.Random(7)

    def state_at(self, t_s: float) -> str:
        i = bisect.bisect_right(self._times, t_s) - 1
        return self.points[i][1] if i >= 0 else "OFF"

    def power_at(self, wall_ms: int) -> float:
        level = self.levels[self.state_at((wall_ms - self.epoch_ms) / 1000)]
        return max(0.0, level * (1 + self._rng.uniform(-self.noise, self.noise)))


def float32_words(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


class SimMeter:
    """An Eastron SDM120: active power as float32 in input registers 0x000C-0x000D."""

    POWER_REG = 0x000C

    def __init__(self, listen: str, schedule: Schedule, clock: Clock, device_id: int = 1) -> None:
        host, port = split_listen(listen)
        self.schedule = schedule
        self.clock = clock
        self.reads = 0
        registers = [SimData(0, count=0x50, values=0, datatype=DataType.REGISTERS)]
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
        if function_code == 4:
            self.reads += 1
            words = float32_words(self.schedule.power_at(self.clock.wall_ms()))
            off = self.POWER_REG - start_address
            if 0 <= off < len(current_registers) - 1:
                current_registers[off : off + 2] = words
        return None

    async def start(self) -> None:
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        await self.server.shutdown()


class SimPlug:
    """A Tasmota plug: ``tele/<t>/SENSOR`` every ``every_s``, retained ``tele/<t>/LWT`` Online/Offline."""

    def __init__(
        self, topic: str, broker: BrokerConfig, schedule: Schedule, clock: Clock, every_s: float
    ) -> None:
        self.topic = topic
        self.prefix = topic.rpartition("/")[0]
        self.schedule = schedule
        self.clock = clock
        self.every_s = every_s
        self.link = MqttLink(
            broker,
            f"sim-{self.prefix.replace('/', '-')}",
            will=Will(f"{self.prefix}/LWT", b"Offline", retain=True),
        )
        self.link.on_connect(self._online)
        self._task: asyncio.Task[None] | None = None

    def _online(self) -> None:
        self.link.publish(f"{self.prefix}/LWT", b"Online", retain=True)

    async def _run(self) -> None:
        while True:
            now = self.clock.wall_ms()
            msg: dict[str, Any] = {
                "Time": datetime.fromtimestamp(now / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "ENERGY": {"Power": round(self.schedule.power_at(now), 1), "Voltage": 229, "Current": 0.5},
            }
            self.link.publish(self.topic, json.dumps(msg).encode(), qos=0)
            await self.clock.sleep(self.every_s)

    async def start(self) -> None:
        await self.link.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.link.publish(f"{self.prefix}/LWT", b"Offline", retain=True)
        await self.link.stop()


def schedules_from(spec: dict[str, Any], epoch_ms: int) -> Schedule:
    return Schedule(
        points=[(float(t), str(s)) for t, s in spec["schedule"]],
        levels={**DEFAULT_LEVELS, **spec.get("levels", {})},
        noise=float(spec.get("noise", 0.02)),
        epoch_ms=epoch_ms,
    )


async def run_sim(spec: dict[str, Any], clock: Clock, stop: asyncio.Event) -> None:
    """Run the meters and plugs a sim spec (TOML/JSON dict) describes until ``stop``."""
    epoch_ms = int(spec.get("epoch_ms", clock.wall_ms()))
    parts: list[SimMeter | SimPlug] = []
    for m in spec.get("meter", []):
        parts.append(SimMeter(m["listen"], schedules_from(m, epoch_ms), clock, int(m.get("device_id", 1))))
    for p in spec.get("plug", []):
        broker = BrokerConfig(url=p.get("broker", "mqtt://127.0.0.1:1883"))
        parts.append(
            SimPlug(p["topic"], broker, schedules_from(p, epoch_ms), clock, float(p.get("every_s", 10)))
        )
    for part in parts:
        await part.start()
    log.info("simulating %d instrument(s)", len(parts))
    try:
        await stop.wait()
    finally:
        for part in parts:
            await part.stop()
