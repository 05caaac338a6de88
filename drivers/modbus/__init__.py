"""Modbus TCP / RTU power meters: the config table, the profile schema, build and diagnosis.

The protocol code (pymodbus) is in ``driver.py`` and imported only when a driver is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlparse

import msgspec
from msgspec import Meta

from labmeter import winsys
from labmeter.clock import Clock
from labmeter.config import BrokerConfig, InstrumentConfig, Section, Source
from labmeter.drivers.base import Cause, Driver, Plugin, Sample
from labmeter.drivers.ports import port_problem
from labmeter.drivers.profiles import ProfileError, find_profile

if TYPE_CHECKING:
    from labmeter.drivers.modbus.driver import ModbusDriver

NAME = "modbus"

# data type -> (struct code, registers it takes), as ESPHome's DEFAULT_STRUCT_FORMAT
DATA_TYPES: dict[str, tuple[str, int]] = {
    "float32": ("f", 2),
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "bit": ("?", 1),
}


class Register(Section, frozen=True, kw_only=True):
    """Where a value lives: function 1 coils, 2 discrete inputs (type "bit"), 3 holding, 4 input registers.

    The one register schema: a profile's ``[power]`` and a config's ``[instrument.source.register]``."""

    function: Literal[1, 2, 3, 4] = 4
    address: Annotated[int, Meta(ge=0, le=0xFFFF)]
    type: Literal["float32", "int16", "uint16", "int32", "uint32", "bit"] = "float32"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    on_state: Literal["RUNNING", "STANDBY", "OFF"] = "RUNNING"
    off_state: Literal["RUNNING", "STANDBY", "OFF"] = "OFF"

    def __post_init__(self) -> None:
        if (self.type == "bit") != (self.function in (1, 2)):
            raise ValueError("type 'bit' goes with function 1 or 2, register types with function 3 or 4")


class ModbusSource(Source, tag=NAME, frozen=True, kw_only=True):
    url: str
    profile: str = "generic"
    register: Register | None = None
    device_id: Annotated[int, Meta(ge=0, le=247)] = 1
    timeout_s: Annotated[float, Meta(gt=0, le=30)] = 1.0

    def __post_init__(self) -> None:
        if not re.match(r"^(tcp://[^/:]+(:\d+)?|rtu:///.+|rtu://COM[1-9]\d{0,2}/?(\?.*)?)$", self.url, re.I):
            raise ValueError(
                "url must be tcp://host:port or rtu:///dev/ttyX?baud=9600 (Windows: rtu://COM12?baud=9600) "
                f"(got {self.url!r})"
            )
        if self.profile == "generic" and self.register is None:
            raise ValueError(
                "profile 'generic' needs an [instrument.source.register] table (function, address, type)"
            )


class ModbusProfile(Section, frozen=True, kw_only=True):
    name: str
    driver: Literal["modbus"]
    doc: str = ""
    power: Register


def load_profile(name: str, extra_dir: Path | None = None) -> ModbusProfile:
    data, where = find_profile(NAME, name, extra_dir)
    try:
        return msgspec.convert(data, ModbusProfile)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def modbus_register(src: ModbusSource, profiles: Path | None) -> Register:
    """The register to read: the source's own ``register`` table, else its profile's."""
    return src.register if src.register is not None else load_profile(src.profile, profiles).power


def build(
    inst: InstrumentConfig[Any], agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    from labmeter.drivers.modbus.driver import ModbusDriver

    driver: ModbusDriver = ModbusDriver(inst.source, modbus_register(inst.source, profiles))
    return driver


def rtu_port(url: str) -> str:
    """The serial port of an ``rtu://`` URL: ``rtu:///dev/ttyUSB0`` -> /dev/ttyUSB0; ``rtu://COM12`` and
    ``rtu:///COM12`` -> COM12 (Windows port names are not paths)."""
    u = urlparse(url)
    name = winsys.com_name(u.netloc) or winsys.com_name(u.path)
    return name or u.path


def check(src: ModbusSource) -> str | None:
    return port_problem(rtu_port(src.url)) if src.url.startswith("rtu:") else None


def diagnose(inst: InstrumentConfig[Any], sample: Sample) -> str:
    src: ModbusSource = inst.source
    error = sample.error or ""
    url = urlparse(src.url)
    where = f"{url.hostname}:{url.port or 502}" if url.scheme == "tcp" else rtu_port(src.url)
    if sample.cause is Cause.ABSURD:
        return (
            f"the value read is absurd ({error.split(': ', 1)[-1]}): the word order, data type or scale of "
            f"profile {src.profile!r} does not match this meter"
        )
    if sample.cause is Cause.REJECTED:
        return (
            f"the device rejected the request ({sample.raw}): wrong register address "
            f"or function code for this model, or wrong device_id ({src.device_id})"
        )
    if sample.cause is Cause.CONNECT and url.scheme == "tcp":
        return (
            f"nothing answers at {where}: check the address and port, and that the meter or its "
            "Modbus gateway is powered and on this network"
        )
    if sample.cause is Cause.CONNECT:
        return f"cannot open {where}: see the serial checks above"
    return (
        f"the device did not answer in {src.timeout_s:g} s: wrong device_id ({src.device_id}), "
        "baud rate or parity, or the RS-485 wiring (A/B swapped, no termination)"
    )


PLUGIN = Plugin(NAME, ModbusSource, build, diagnose, check)
