"""Drivers: one folder per transport, each turning an ``[instrument.source]`` into readings.

``DRIVERS`` is the one list: the config's union of sources, the registry and the "expected
one of" message all come from it. Adding a driver is a folder and a line here.
"""

from __future__ import annotations

from labmeter.drivers import modbus, mqtt, serial
from labmeter.drivers.base import Plugin

DRIVERS: dict[str, Plugin] = {p.name: p for p in (modbus.PLUGIN, mqtt.PLUGIN, serial.PLUGIN)}
