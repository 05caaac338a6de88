"""A simulated Tasmota plug on MQTT."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from labmeter.clock import Clock
from labmeter.config import BrokerConfig
from labmeter.drivers.sim import Schedule
from labmeter.mqtt import MqttLink, Will


class SimPlug:
    """A Tasmota plug: ``tele/<t>/SENSOR`` every ``every_s``, retained ``tele/<t>/LWT`` Online/Offline."""

    def __init__(
        self,
        topic: str,
        broker: BrokerConfig,
        schedule: Schedule,
        clock: Clock,
        every_s: float,
        counts_energy: bool = False,
    ) -> None:
        self.topic = topic
        self.prefix = topic.rpartition("/")[0]
        self.schedule = schedule
        self.clock = clock
        self.every_s = every_s
        self.counts_energy = counts_energy  # ENERGY.Total in kWh (3 decimals, as Tasmota sends it)
        self.link = MqttLink(
            broker,
            f"sim-{self.prefix.replace('/', '-')}",
            will=Will(f"{self.prefix}/LWT", b"Offline", retain=True),
        )
        self.link.on_connect(self._online)
        self._task: asyncio.Task[None] | None = None

    def _online(self) -> None:
        self.link.publish(f"{self.prefix}/LWT", b"Online", retain=True)

    def message(self, now: int) -> bytes:
        """The SENSOR message at ``now``: the schedule's power, and its running integral as the counter."""
        energy: dict[str, Any] = {
            "Power": round(self.schedule.power_at(now), 1),
            "Voltage": 229,
            "Current": 0.5,
        }
        if self.counts_energy:
            energy["Total"] = round(self.schedule.energy_wh(now) / 1000, 3)
        msg = {
            "Time": datetime.fromtimestamp(now / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "ENERGY": energy,
        }
        return json.dumps(msg).encode()

    async def _run(self) -> None:
        while True:
            self.link.publish(self.topic, self.message(self.clock.wall_ms()), qos=0)
            await self.clock.sleep(self.every_s)

    async def start(self) -> None:
        await self.link.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.link.publish(f"{self.prefix}/LWT", b"Offline", retain=True)
        await self.link.stop()
