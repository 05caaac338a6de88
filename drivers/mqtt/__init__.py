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
    availability_topic: str | None = None
    payload_online: str = "online"
    payload_offline: str = "offline"
    broker: BrokerConfig | None = None

    def __post_init__(self) -> None:
        if self.format == "json" and not self.json_path:
            raise ValueError('json_path is needed with format = \'json\' (e.g. "ENERGY.Power" or "power")')


def build(
    inst: InstrumentConfig[Any], agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    from labmeter.drivers.mqtt.driver import PlugDriver

    driver: PlugDriver = PlugDriver(
        inst.source, broker, f"{agent_id}-{inst.id}-plug", inst.stale_after_s, clock
    )
    return driver


def diagnose(inst: InstrumentConfig[Any], sample: Sample) -> str:
    src: MqttSource = inst.source
    if sample.cause is Cause.OFFLINE:
        return "the plug reports Offline (its LWT): it lost power or Wi-Fi"
    if sample.cause is Cause.NO_MESSAGE:
        return (
            f"no message on {src.topic} within {FIRST_MESSAGE_WAIT_S:g} s: check the topic "
            "(Tasmota: tele/<topic>/SENSOR), the plug's MQTT broker settings and its TelePeriod"
        )
    if sample.cause is Cause.STALE:
        return f"the feed stopped: is the plug's reporting period longer than stale_after_s ({inst.stale_after_s:g} s)?"
    return f"unreadable messages on {src.topic}: is format = {src.format!r} right for this device?"


PLUGIN = Plugin(NAME, MqttSource, build, diagnose)
