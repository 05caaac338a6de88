"""Build the driver an instrument's ``[instrument.source]`` asks for."""

from __future__ import annotations

from pathlib import Path

from labmeter.drivers.base import Driver
from labmeter.drivers.modbus import ModbusDriver
from labmeter.drivers.mqtt_plug import TasmotaDriver
from labmeter.drivers.profiles import load_profile

from labmeter.clock import Clock
from labmeter.config import BrokerConfig, InstrumentConfig, ModbusSource, MqttSource


def build(
    inst: InstrumentConfig, agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    src = inst.source
    if isinstance(src, ModbusSource):
        return ModbusDriver(src, load_profile(src.profile, profiles))
    if isinstance(src, MqttSource):
        return TasmotaDriver(src, broker, f"{agent_id}-{inst.id}-plug", inst.stale_after_s, clock)
    raise ValueError(f"no driver for {src!r}")
