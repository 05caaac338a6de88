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
