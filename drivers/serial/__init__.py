"""Instruments on a serial port: the config table, serial profiles, build and diagnosis.

The port handling (pyserial) is in ``driver.py``, imported only when a driver is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from labmeter.clock import Clock
from labmeter.config import BrokerConfig, InstrumentConfig, Source
from labmeter.drivers.base import Cause, Driver, Plugin, Sample
from labmeter.drivers.ports import port_problem
from labmeter.drivers.profiles import find_profile

if TYPE_CHECKING:
    from labmeter.drivers.serial.driver import SerialDriver

NAME = "serial"


class SerialSource(Source, tag=NAME, frozen=True, kw_only=True):
    """An instrument's own serial port: a query it answers, status lines it streams, or a modem-status line."""

    url: str = ""
    mode: Literal["query", "stream", "modem"] = "query"
    profile: str | None = None
    baud: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    timeout_s: Annotated[float, Meta(gt=0, le=30)] = 1.0
    command: str | None = None
    terminator: str = "\n"
    regex: str | None = None
    value_map: dict[str, Literal["RUNNING", "STANDBY", "OFF"]] | None = None
    running_mask: int | None = None
    line: Literal["CTS", "DSR", "DCD", "RI"] = "CTS"
    signin_regex: str | None = None

    def __post_init__(self) -> None:
        if self.signin_regex is not None and "(?P<card>" not in self.signin_regex:
            raise ValueError("signin_regex needs a (?P<card>...) group, e.g. 'CARD:(?P<card>\\d+)'")
        if not self.url:
            raise ValueError(
                "url is needed (/dev/serial/by-id/..., usb-serial://SERIALNO, /dev/ttyUSB0, COM3 on Windows or loop://)"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None

    @property
    def gives_status(self) -> bool:
        return self.mode == "modem" or self.value_map is not None or self.running_mask is not None


def serial_profile(name: str, extra_dir: Path | None = None) -> dict[str, object]:
    """A serial profile's settings (the keys of [instrument.source] it fills in)."""
    data, _where = find_profile(NAME, name, extra_dir)
    return {k: v for k, v in data.items() if k not in ("name", "driver", "doc")}


def with_profile(src: SerialSource, profiles: Path | None) -> SerialSource:
    """The source with its profile's settings filled in; keys set in the config win."""
    if not src.profile:
        return src
    defaults = SerialSource(url=src.url)
    own = {f: getattr(src, f) for f in src.__struct_fields__ if getattr(src, f) != getattr(defaults, f)}
    own["url"] = src.url
    return msgspec.convert({**serial_profile(src.profile, profiles), **own}, SerialSource)


def build(
    inst: InstrumentConfig[Any], agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    from labmeter.drivers.serial.driver import SerialDriver

    driver: SerialDriver = SerialDriver(with_profile(inst.source, profiles), inst.stale_after_s, clock)
    return driver


def check(src: SerialSource) -> str | None:
    return port_problem(src.url)


def diagnose(inst: InstrumentConfig[Any], sample: Sample) -> str:
    src: SerialSource = inst.source
    if sample.cause is Cause.NO_MATCH:
        return f"the instrument answers, but not in the expected form: check regex {src.regex!r}"
    if sample.cause is Cause.NO_REPLY:
        return (
            f"no reply in {src.timeout_s:g} s: check baud ({src.baud}), parity ({src.parity}), the command "
            "and its terminator, and the cable (null-modem or straight)"
        )
    if sample.cause in (Cause.NO_MESSAGE, Cause.STALE):
        return "the instrument sends no status lines: is streaming output enabled on it?"
    return sample.error or ""


PLUGIN = Plugin(NAME, SerialSource, build, diagnose, check)
