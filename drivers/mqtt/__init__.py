"""Smart plugs and meters that push their power over MQTT: the config table, build and diagnosis.

The code (topics and payload formats) is in ``driver.py``, imported only when a driver is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from labmeter.clock import Clock
from labmeter.config import BrokerConfig, InstrumentConfig, Source
from labmeter.drivers.base import FIRST_MESSAGE_WAIT_S, Cause, Driver, Plugin, Sample

if TYPE_CHECKING:
    from labmeter.drivers.mqtt.driver import PlugDriver

NAME = "mqtt"


class MqttSource(Source, tag=NAME, frozen=True, kw_only=True):
    topic: str
    format: Literal["tasmota", "shelly-gen1", "shelly-gen2", "zigbee2mqtt", "esphome", "json"] = "tasmota"
    json_path: str | None = None
    energy_path: str | None = None  # format "json": where the message holds the energy counter
    energy_topic: str | None = None  # format "esphome" or "json": a topic carrying the counter as a number
    energy_unit: Literal["Wh", "kWh", "Wmin"] = "kWh"  # of energy_path / energy_topic
    availability_topic: str | None = None
    payload_online: str = "online"
    payload_offline: str = "offline"
    broker: BrokerConfig | None = None

    def __post_init__(self) -> None:
        if self.format == "json" and not self.json_path:
            raise ValueError('json_path is needed with format = \'json\' (e.g. "ENERGY.Power" or "power")')
        if self.energy_path and self.format != "json":
            raise ValueError(
                f"energy_path goes with format = 'json' (format {self.format!r} knows where its energy is)"
            )
        if self.energy_topic and self.format not in ("esphome", "json"):
            raise ValueError(
                f"energy_topic goes with format = 'esphome' or 'json' (format {self.format!r} knows where "
                "its energy is)"
            )
        if self.energy_topic and self.energy_topic in (self.topic, self.availability_topic):
            raise ValueError("energy_topic must differ from topic and availability_topic")


def build(
    inst: InstrumentConfig[Any], agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    from labmeter.drivers.mqtt.driver import PlugDriver

    driver: PlugDriver = PlugDriver(
        inst.source, broker, f"{agent_id}-{inst.id}-plug", inst.stale_after_s, clock
    )
    return driver


WHERE_IT_PUBLISHES: dict[str, str] = {
    "tasmota": "Tasmota publishes tele/<Topic>/SENSOR every TelePeriod seconds (default 300; `TelePeriod 10` to test) "
    "and tele/<Topic>/LWT",
    "shelly-gen1": "a Shelly Gen1 publishes shellies/<id>/relay/0/power and shellies/<id>/online",
    "shelly-gen2": "a Shelly Gen2 publishes <prefix>/status/switch:0 only with 'Generic status update over MQTT' "
    "enabled, and <prefix>/online",
    "zigbee2mqtt": "Zigbee2MQTT publishes zigbee2mqtt/<friendly_name>, and .../availability when availability is on",
    "esphome": "ESPHome publishes <node>/sensor/<sensor name>/state and <node>/status",
    "json": "check the device's own MQTT settings for the topic it publishes on",
}


def diagnose(inst: InstrumentConfig[Any], sample: Sample) -> str:
    src: MqttSource = inst.source
    hint = WHERE_IT_PUBLISHES[src.format]
    if sample.cause is Cause.REFUSED:
        return f"the plug's broker refused the agent: {sample.error}"
    if sample.cause is Cause.CONNECT:
        return f"the agent cannot reach the plug's broker: {sample.error}"
    if sample.cause is Cause.OFFLINE:
        return "the plug reports itself offline (its last will): it lost power or Wi-Fi"
    if sample.cause is Cause.NO_MESSAGE:
        seen = sample.raw
        avail = getattr(seen, "availability_topic", None)
        if getattr(seen, "online", False):
            return (
                f"the plug says online on {avail}, but no power message came on {src.topic} within "
                f"{FIRST_MESSAGE_WAIT_S:g} s: the topic is not the one it reports power on, or it reports "
                f"less often ({hint})"
            )
        user = getattr(seen, "username", None)
        topics = f"{src.topic}" + (f" or {avail}" if avail else "")
        acl = (
            f"the broker accepted the login as {user!r} but may hide these topics from it (Mosquitto drops "
            f"messages an account may not read, silently: its ACL needs `topic read {src.topic}` under "
            f"`user {user}`), or "
            if user
            else ""
        )
        return (
            f"nothing arrived on {topics} within {FIRST_MESSAGE_WAIT_S:g} s: {acl}the plug publishes "
            f"elsewhere or not to this broker (format {src.format!r}: {hint})"
        )
    if sample.cause is Cause.STALE:
        return f"the feed stopped: is the plug's reporting period longer than stale_after_s ({inst.stale_after_s:g} s)?"
    return f"unreadable messages on {src.topic}: is format = {src.format!r} right for this device? ({hint})"


PLUGIN = Plugin(NAME, MqttSource, build, diagnose)
