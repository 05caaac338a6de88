"""Smart plugs and meters that push their power over MQTT.

``format`` picks how a device lays out its topics and payloads (see FORMATS).
The feed is pushed, so a read returns the latest value; the device's own
availability message saying offline, or a feed silent past ``stale_after_s``, is
an error (UNKNOWN): never OFF and never the last value forever.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from labmeter.clock import Clock
from labmeter.config import BrokerConfig
from labmeter.drivers.base import Capability, Cause, DriverBase, Latest, Sample, sane_energy, sane_power
from labmeter.drivers.mqtt import MqttSource
from labmeter.mqtt import MqttLink


def _json_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _number(value: Any) -> float | None:
    if isinstance(value, list):
        parts = [_number(v) for v in value]
        return None if any(p is None for p in parts) else float(sum(p for p in parts if p is not None))
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _no_energy(_payload: bytes, _topic: str) -> float | None:
    return None


def _no_topic(_t: str) -> str | None:
    return None


WH_PER = {"Wh": 1.0, "kWh": 1000.0, "Wmin": 1 / 60}
"""Energy units devices report, in Wh."""


@dataclass(frozen=True)
class Format:
    """Where a device publishes availability, and how its payload gives watts; where it has an energy
    counter, how a power message gives it in Wh (``energy``) or which topic carries it (``energy_topic``,
    a plain number in ``energy_unit``)."""

    availability: Callable[[str], str | None]
    online: tuple[str, ...]
    offline: tuple[str, ...]
    power: Callable[[bytes, str], float | None]
    extra_topics: Callable[[str], tuple[str, ...]] = lambda _t: ()
    energy: Callable[[bytes, str], float | None] = _no_energy
    energy_topic: Callable[[str], str | None] = _no_topic
    energy_unit: str = "kWh"


def _json_power(path: str) -> Callable[[bytes, str], float | None]:
    return lambda payload, _topic: _number(_json_path(json.loads(payload), path))


def _json_energy(path: str, unit: str) -> Callable[[bytes, str], float | None]:
    def energy(payload: bytes, _topic: str) -> float | None:
        value = _number(_json_path(json.loads(payload), path))
        return None if value is None else value * WH_PER[unit]

    return energy


def _shelly_gen2_energy(payload: bytes, topic: str) -> float | None:
    obj = json.loads(payload)
    if topic.endswith("/events/rpc"):
        return _number(_json_path(obj, "params.switch:0.aenergy.total"))
    return _number(_json_path(obj, "aenergy.total"))  # Wh


def _plain_number(payload: bytes, _topic: str) -> float | None:
    return _number(payload.decode().strip())


def _shelly_gen2(payload: bytes, topic: str) -> float | None:
    obj = json.loads(payload)
    if topic.endswith("/events/rpc"):  # NotifyStatus: a partial update, maybe without apower
        if obj.get("method") != "NotifyStatus":
            return None
        return _number(_json_path(obj, "params.switch:0.apower"))
    return _number(obj.get("apower"))


def _parent(topic: str, levels: int) -> str:
    return topic.rsplit("/", levels)[0]


FORMATS: dict[str, Format] = {
    # tele/<topic>/SENSOR  {"ENERGY": {"Power": 12}}; tele/<topic>/LWT  Online | Offline
    # ... "ENERGY": {"Total": 12.345 (kWh)}
    "tasmota": Format(
        lambda t: f"{_parent(t, 1)}/LWT",
        ("online",),
        ("offline",),
        _json_power("ENERGY.Power"),
        energy=_json_energy("ENERGY.Total", "kWh"),
    ),
    # shellies/<id>/relay/0/power  "12.3"; shellies/<id>/online  true | false;
    # shellies/<id>/relay/0/energy  "1234" (Watt-minutes)
    "shelly-gen1": Format(
        lambda t: f"{_parent(t, 3)}/online",
        ("true",),
        ("false",),
        _plain_number,
        energy_topic=lambda t: f"{_parent(t, 1)}/energy",
        energy_unit="Wmin",
    ),
    # <prefix>/status/switch:0  {"apower": 12.3, "aenergy": {"total": 45.6 (Wh)}, ...};
    # <prefix>/events/rpc NotifyStatus; <prefix>/online
    "shelly-gen2": Format(
        lambda t: f"{_parent(t, 2)}/online",
        ("true",),
        ("false",),
        _shelly_gen2,
        lambda t: (f"{_parent(t, 2)}/events/rpc",),
        energy=_shelly_gen2_energy,
    ),
    # zigbee2mqtt/<name>  {"power": 12, "energy": 1.23 (kWh), "state": "ON"};
    # zigbee2mqtt/<name>/availability  {"state":"online"}
    "zigbee2mqtt": Format(
        lambda t: f"{t}/availability",
        ("online",),
        ("offline",),
        _json_power("power"),
        energy=_json_energy("energy", "kWh"),
    ),
    # <node>/sensor/<name>/state  "12.3"; <node>/status  online | offline
    "esphome": Format(lambda t: f"{t.split('/', 1)[0]}/status", ("online",), ("offline",), _plain_number),
}


def format_of(source: MqttSource) -> Format:
    """The source's format, with its own JSON paths and energy topic where it sets them."""
    if source.format == "json":
        fmt = Format(
            lambda _t: source.availability_topic,
            (source.payload_online.lower(),),
            (source.payload_offline.lower(),),
            _json_power(source.json_path or "power"),
            energy=_json_energy(source.energy_path, source.energy_unit) if source.energy_path else _no_energy,
        )
    else:
        fmt = FORMATS[source.format]
    if source.energy_topic:
        fmt = replace(fmt, energy_topic=lambda _t: source.energy_topic, energy_unit=source.energy_unit)
    return fmt


def source_topics(source: MqttSource) -> tuple[str, ...]:
    """Every topic the driver subscribes to for this source: the broker's ACL is made from this."""
    fmt = format_of(source)
    avail, energy = fmt.availability(source.topic), fmt.energy_topic(source.topic)
    topics = [source.topic, *fmt.extra_topics(source.topic), *(t for t in (energy, avail) if t)]
    return tuple(dict.fromkeys(topics))


@dataclass(frozen=True)
class NoMessage:
    """What probe can say when no power message came: whether the availability topic spoke, and as whom."""

    availability_topic: str | None
    online: bool
    username: str | None


class PlugDriver(DriverBase):
    capabilities = Capability.PUSHED

    def __init__(
        self, source: MqttSource, broker: BrokerConfig, client_id: str, stale_after_s: float, clock: Clock
    ):
        self.topic = source.topic
        fmt = format_of(source)
        self.format = fmt
        self.availability_topic = fmt.availability(source.topic)
        self.extra = fmt.extra_topics(source.topic)
        self.energy_topic = fmt.energy_topic(source.topic)
        self.clock = clock
        self.latest = Latest(clock, stale_after_s)
        self.stale_after_s = stale_after_s
        self._energy: tuple[float, float] | None = None  # (Wh, mono) from energy_topic
        self._online: bool | None = None
        subs = [(t, 1) for t in source_topics(source)]
        self.broker = source.broker or broker
        self.link = MqttLink(self.broker, client_id, on_message=self._on_message, subscriptions=tuple(subs))

    def _availability(self, payload: bytes) -> bool | None:
        text = payload.strip().decode(errors="replace")
        try:
            obj = json.loads(text)
            if isinstance(obj, dict) and "state" in obj:
                text = str(obj["state"])
        except ValueError:
            pass
        word = text.strip().lower()
        if word in self.format.online:
            return True
        if word in self.format.offline:
            return False
        return None

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.availability_topic:
            self._online = self._availability(payload)
            return
        if topic == self.energy_topic:
            try:
                value = _number(payload.decode().strip())
            except UnicodeDecodeError:
                value = None
            wh = sane_energy(None if value is None else value * WH_PER[self.format.energy_unit])
            self._energy = None if wh is None else (wh, self.clock.mono())
            return
        try:
            power = self.format.power(payload, topic)
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            self.latest.put(
                Sample(
                    error=f"{topic}: unreadable message ({exc})", raw=payload[:200], cause=Cause.UNREADABLE
                )
            )
            return
        if power is None:
            if topic in self.extra:
                return  # a partial update without power: the last value stands, its age counts on
            self.latest.put(
                Sample(error=f"{topic}: no power in message", raw=payload[:200], cause=Cause.UNREADABLE)
            )
        else:
            sample = sane_power(power, topic)
            if sample.power_w is not None:
                sample = replace(sample, energy_wh=self._message_energy(payload, topic))
            self.latest.put(sample)
        if self._online is None:
            self._online = True

    def _message_energy(self, payload: bytes, topic: str) -> float | None:
        """The energy counter a power message carries, in Wh; a bad one is left out, the power stays."""
        try:
            return sane_energy(self.format.energy(payload, topic))
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
            return None

    async def start(self) -> None:
        await self.link.start()

    async def read(self) -> Sample:
        if self._online is False:
            return Sample(error=f"{self.availability_topic}: device is offline", cause=Cause.OFFLINE)
        if not self.link.connected and self.link.failure:
            return Sample(
                error=self.link.failure, cause=Cause.REFUSED if self.link.refused else Cause.CONNECT
            )
        sample = self.latest.get(f"{self.topic}: no message yet", f"{self.topic}: silent")
        if sample.cause is Cause.NO_MESSAGE:
            seen = NoMessage(self.availability_topic, self._online is True, self.broker.username)
            return Sample(error=sample.error, raw=seen, cause=Cause.NO_MESSAGE)
        if sample.power_w is not None and sample.energy_wh is None and self._energy is not None:
            wh, at = self._energy
            if self.clock.mono() - at <= self.stale_after_s:
                return replace(sample, energy_wh=wh)
        return sample

    async def close(self) -> None:
        await self.link.stop()
