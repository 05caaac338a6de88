"""Smart plugs that report power over MQTT (Tasmota ``tele/<t>/SENSOR``).

The feed is pushed, so a read returns the latest value; an ``Offline`` LWT or a
feed silent past ``stale_after_s`` is an error (UNKNOWN), never OFF and never the
last value forever.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from labmeter.drivers.base import Sample, sane_power

from labmeter.clock import Clock
from labmeter.config import BrokerConfig, MqttSource
from labmeter.mqtt import MqttLink


def tasmota_power(payload: bytes) -> float | None:
    """``ENERGY.Power`` of a Tasmota SENSOR message; channels of a multi-channel device are summed."""
    obj: Any = json.loads(payload)
    energy = obj.get("ENERGY") if isinstance(obj, dict) else None
    if not isinstance(energy, dict) or "Power" not in energy:
        return None
    power = energy["Power"]
    if isinstance(power, list):
        return float(sum(float(p) for p in power))
    return float(power)


class TasmotaDriver:
    def __init__(
        self, source: MqttSource, broker: BrokerConfig, client_id: str, stale_after_s: float, clock: Clock
    ):
        self.topic = source.topic
        prefix, _, _ = source.topic.rpartition("/")
        self.lwt_topic = f"{prefix}/LWT"
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._lock = threading.Lock()
        self._value: Sample | None = None
        self._at = 0.0
        self._online: bool | None = None
        self.link = MqttLink(
            source.broker or broker,
            client_id,
            on_message=self._on_message,
            subscriptions=((self.topic, 1), (self.lwt_topic, 1)),
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = self.clock.mono()
        if topic == self.lwt_topic:
            with self._lock:
                self._online = payload.strip().lower() == b"online"
            return
        try:
            power = tasmota_power(payload)
            sample = (
                sane_power(power, self.topic)
                if power is not None
                else Sample(error=f"{self.topic}: no ENERGY.Power in message", raw=payload[:200])
            )
        except (ValueError, TypeError, AttributeError) as exc:
            sample = Sample(error=f"{self.topic}: unreadable message ({exc})", raw=payload[:200])
        with self._lock:
            self._value, self._at = sample, now
            if self._online is None:
                self._online = True

    async def start(self) -> None:
        await self.link.start()

    async def read(self) -> Sample:
        with self._lock:
            value, at, online = self._value, self._at, self._online
        if online is False:
            return Sample(error=f"{self.lwt_topic}: plug is Offline")
        if value is None:
            return Sample(error=f"{self.topic}: no message yet")
        age = self.clock.mono() - at
        if age > self.stale_after_s:
            return Sample(error=f"{self.topic}: silent for more than stale_after_s={self.stale_after_s:g} s")
        return value

    async def close(self) -> None:
        await self.link.stop()
