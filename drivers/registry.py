"""Build the driver an instrument's ``[instrument.source]`` asks for."""

from __future__ import annotations

from pathlib import Path

import msgspec
from labmeter.drivers.base import Driver
from labmeter.drivers.modbus import ModbusDriver
from labmeter.drivers.mqtt_plug import PlugDriver
from labmeter.drivers.profiles import Register, load_profile, serial_profile
from labmeter.drivers.serial_line import SerialDriver

from labmeter.clock import Clock
from labmeter.config import BrokerConfig, InstrumentConfig, ModbusSource, MqttSource, SerialSource


def modbus_register(src: ModbusSource, profiles: Path | None) -> Register:
    """The register to read: the source's own ``register`` table, else its profile's."""
    if src.register is not None:
        return Register(**{f: getattr(src.register, f) for f in src.register.__struct_fields__})
    return load_profile(src.profile, profiles).power


def with_profile(src: SerialSource, profiles: Path | None) -> SerialSource:
    """The source with its profile's settings filled in; keys set in the config win."""
    if not src.profile:
        return src
    defaults = SerialSource(url=src.url)
    own = {f: getattr(src, f) for f in src.__struct_fields__ if getattr(src, f) != getattr(defaults, f)}
    own["url"] = src.url
    return msgspec.convert({**serial_profile(src.profile, profiles), **own}, SerialSource)


def build(
    inst: InstrumentConfig, agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    src = inst.source
    if isinstance(src, ModbusSource):
        return ModbusDriver(src, modbus_register(src, profiles))
    if isinstance(src, MqttSource):
        return PlugDriver(src, broker, f"{agent_id}-{inst.id}-plug", inst.stale_after_s, clock)
    if isinstance(src, SerialSource):
        return SerialDriver(with_profile(src, profiles), inst.stale_after_s, clock)
    raise ValueError(f"no driver for {src!r}")
