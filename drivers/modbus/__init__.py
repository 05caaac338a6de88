"""Modbus TCP / RTU power meters: the config table, the profile schema, build and diagnosis.

The protocol code (pymodbus) is in ``driver.py`` and imported only when a driver is built.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs, urlparse

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


class CheckRegister(Section, frozen=True, kw_only=True):
    """A register whose value has a known range (mains voltage, frequency). ``agent probe`` decodes it
    in both word orders to tell which one the meter uses; it shares ``[power]``'s word order."""

    function: Literal[3, 4] = 4
    address: Annotated[int, Meta(ge=0, le=0xFFFF)]
    type: Literal["float32", "int16", "uint16", "int32", "uint32"] = "float32"
    scale: float = 1.0


class EnergyRegister(Section, frozen=True, kw_only=True):
    """The meter's import active-energy counter; ``scale`` turns its value into Wh (1000 for kWh).

    Read in the same poll as ``[power]``, with its word order; a failed read leaves the energy out,
    never the power."""

    function: Literal[3, 4] = 4
    address: Annotated[int, Meta(ge=0, le=0xFFFF)]
    type: Literal["float32", "int32", "uint32", "uint16"] = "float32"
    scale: Annotated[float, Meta(gt=0)] = 1000.0


PLAUSIBLE: dict[str, tuple[float, float, str]] = {
    "voltage": (80.0, 500.0, "V"),  # 100-127 V and 220-240 V mains, 400 V between phases
    "frequency": (45.0, 65.0, "Hz"),
}
"""What a powered meter's check registers can read (after scale)."""

TINY = 1e-6
"""A float32 register value this small (and not 0) is no reading: it is what the other word order
gives for most real values (850.0 W swapped is -2.45e-41)."""


class ModbusSource(Source, tag=NAME, frozen=True, kw_only=True):
    url: str
    profile: str = "generic"
    register: Register | None = None
    energy: EnergyRegister | None = None
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
    energy: EnergyRegister | None = None
    voltage: CheckRegister | None = None
    frequency: CheckRegister | None = None

    def checks(self) -> dict[str, CheckRegister]:
        return {k: r for k in PLAUSIBLE if (r := getattr(self, k)) is not None}


@dataclass(frozen=True)
class Words:
    """Register words as the meter sent them, shown in hex in probe lines."""

    values: tuple[int, ...]

    def __repr__(self) -> str:
        return " ".join(f"0x{w:04X}" for w in self.values)


@dataclass(frozen=True)
class Refusal:
    """A Modbus exception response and the request it answered."""

    code: int | None
    function: int
    address: int

    def __repr__(self) -> str:
        return f"exception {self.code} to function {self.function} at 0x{self.address:04X}"


def decode(words: Sequence[int], type_: str, word_order: str) -> float:
    """Registers as a number (``word_order`` "big": high word first), as ESPHome and pymodbus read them."""
    code, n = DATA_TYPES[type_]
    ws = list(words[:n])
    if word_order == "little":
        ws.reverse()
    return float(struct.unpack(f">{code}", struct.pack(f">{n}H", *ws))[0])


def other_order(word_order: str) -> str:
    return "little" if word_order == "big" else "big"


ORDER_WORDS = {"big": "high word first", "little": "low word first"}


def power_problem(raw: float, scale: float, type_: str) -> str | None:
    """Why a register value cannot be a power reading, or None."""
    if raw != raw or raw in (float("inf"), float("-inf")):
        return "not a number (word order or data type suspected)"
    if abs(raw * scale) > 5_000_000:
        return f"absurd power {raw * scale:g} W (word order, data type or scale suspected)"
    if type_ == "float32" and 0 < abs(raw) < TINY:
        return f"{raw:g} is no meter reading (a float32 this small is what a swapped word order gives)"
    return None


EXCEPTIONS: dict[int, tuple[str, str]] = {
    1: (
        "illegal function",
        "the meter does not serve function {function} ({table}): wrong function in the profile "
        "(input registers are 4, holding registers 3)",
    ),
    2: (
        "illegal data address",
        "the meter has no register at {address}: wrong register address, or the wrong profile for this model",
    ),
    3: (
        "illegal data value",
        "the meter refused the request (count or value): wrong data type in the profile",
    ),
    4: (
        "server device failure",
        "the meter failed while answering: power-cycle it; if that persists the meter is faulty",
    ),
    5: ("acknowledge", "the meter accepted a long request and answers later: poll less often (poll_s)"),
    6: ("server device busy", "the meter is busy: poll less often (poll_s), or something else polls it too"),
    8: ("memory parity error", "the meter reports a memory parity error: it is faulty"),
    10: (
        "gateway path unavailable",
        "the Modbus gateway has no path to device_id {device_id}: check the gateway's configuration "
        "(its serial port and the IDs it forwards)",
    ),
    11: (
        "gateway target device failed to respond",
        "the gateway got no answer from device_id {device_id} behind it: wrong device_id, the meter "
        "unpowered, or the RS-485 wiring, baud rate or parity between gateway and meter",
    ),
}
"""Modbus exception codes in words, and their likely cause at an installation."""

TABLES = {1: "coils", 2: "discrete inputs", 3: "holding registers", 4: "input registers"}


def exception_name(code: int | None) -> str:
    return EXCEPTIONS[code][0] if code in EXCEPTIONS else "unknown exception"


def load_profile(name: str, extra_dir: Path | None = None) -> ModbusProfile:
    data, where = find_profile(NAME, name, extra_dir)
    try:
        return msgspec.convert(data, ModbusProfile)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def modbus_register(src: ModbusSource, profiles: Path | None) -> Register:
    """The register to read: the source's own ``register`` table, else its profile's."""
    return src.register if src.register is not None else load_profile(src.profile, profiles).power


def modbus_checks(src: ModbusSource, profiles: Path | None) -> dict[str, CheckRegister]:
    """The profile's check registers (none for a source with its own ``register`` table)."""
    return {} if src.register is not None else load_profile(src.profile, profiles).checks()


def modbus_energy(src: ModbusSource, profiles: Path | None) -> EnergyRegister | None:
    """The energy counter to read: the source's own ``energy`` table, else its profile's (none for a
    source with its own ``register`` table and no ``energy``)."""
    if src.energy is not None or src.register is not None:
        return src.energy
    return load_profile(src.profile, profiles).energy


def build(
    inst: InstrumentConfig[Any], agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    from labmeter.drivers.modbus.driver import ModbusDriver

    src: ModbusSource = inst.source
    driver: ModbusDriver = ModbusDriver(
        src, modbus_register(src, profiles), modbus_checks(src, profiles), modbus_energy(src, profiles)
    )
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
    tcp = url.scheme == "tcp"
    where = f"{url.hostname}:{url.port or 502}" if tcp else rtu_port(src.url)
    if sample.cause is Cause.ABSURD:
        return (
            f"the value read is absurd ({error.split(': ', 1)[-1]}): the word order, data type or scale of "
            f"profile {src.profile!r} does not match this meter"
        )
    if sample.cause is Cause.REJECTED:
        r = sample.raw if isinstance(sample.raw, Refusal) else Refusal(None, 0, 0)
        code = r.code
        hint = EXCEPTIONS[code][1] if code in EXCEPTIONS else "see the meter's manual for this code"
        hint = hint.format(
            function=r.function,
            table=TABLES.get(r.function, "?"),
            address=f"0x{r.address:04X}",
            device_id=src.device_id,
        )
        return f"device {src.device_id} answered Modbus exception {code} ({exception_name(code)}): {hint}"
    if sample.cause is Cause.CONNECT and tcp:
        return (
            f"nothing accepts a connection at {where}: check the host and port (Modbus TCP is usually 502), "
            "a firewall between, and that the meter or its Modbus gateway is powered and on this network"
        )
    if sample.cause is Cause.CONNECT:
        return f"cannot open {where}: see the serial checks above"
    if tcp:
        return (
            f"{where} accepts connections but device {src.device_id} did not answer in {src.timeout_s:g} s: "
            "is this a Modbus TCP device (not another service on that port)? Behind a TCP-to-RS-485 "
            f"gateway, device_id ({src.device_id}) must be the meter's own address, and the gateway's "
            "serial side must match the meter"
        )
    q = {k: v[-1] for k, v in parse_qs(url.query).items()}
    line = f"baud={q.get('baud', '9600')} parity={q.get('parity', 'N')} stop={q.get('stop', '1')}"
    return (
        f"no answer from device {src.device_id} on {where} in {src.timeout_s:g} s: check the meter's "
        f"address (device_id = {src.device_id}) and serial settings ({line}; set them in the url as "
        "?baud=...&parity=E), the RS-485 wiring (A/B swapped, ground), termination at the ends of a long "
        "bus, and that the meter is powered"
    )


PLUGIN = Plugin(NAME, ModbusSource, build, diagnose, check)
