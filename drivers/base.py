"""What every driver returns, what it can do, and what the drivers' list holds for each one."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from labmeter.clock import Clock
from labmeter.config import BrokerConfig, InstrumentConfig, Source
from labmeter.wire import MAX_ENERGY_WH, State


class Cause(enum.Enum):
    """Why a read gave no value, as a value: probe's diagnosis keys on it, never on message text."""

    CONNECT = "connect"  # nothing answers, or the port cannot be opened
    REFUSED = "refused"  # a server answered but refused the login (an MQTT broker: credentials)
    REJECTED = "rejected"  # the device answered with an error (a Modbus exception response)
    NO_REPLY = "no_reply"  # no answer in time, a broken or short answer
    ABSURD = "absurd"  # NaN or more than 5 MW: word order, data type or scale
    OFFLINE = "offline"  # the device's own availability message says offline
    NO_MESSAGE = "no_message"  # nothing has arrived yet
    STALE = "stale"  # the feed went silent for longer than stale_after_s
    UNREADABLE = "unreadable"  # a message or reply that cannot be decoded
    NO_MATCH = "no_match"  # a reply that does not match the configured regex
    PORT = "port"  # the serial port failed (missing, unplugged, no permission)


@dataclass(frozen=True)
class Sample:
    """One read: a power in watts or a status, or an error saying why there is neither.

    ``energy_wh`` is the meter's own cumulative energy counter in Wh where the source has one (it may
    reset or roll over: the power downsampler deals with that); None where it has none or its read failed.
    ``age_s``: on a pushed feed gone silent (STALE), how long ago its last value arrived, so that the energy
    the agent integrated from that value while it was held can be taken back (it was not measured)."""

    power_w: float | None = None
    status: State | None = None
    error: str | None = None
    raw: Any = None
    cause: Cause | None = None
    energy_wh: float | None = None
    age_s: float | None = None


@dataclass(frozen=True)
class Reading:
    """A sample stamped with the agent's monotonic time and timeline time (UTC ms)."""

    mono: float
    at_ms: int
    power_w: float | None = None
    status: State | None = None
    error: str | None = None
    raw: Any = None
    cause: Cause | None = None
    energy_wh: float | None = None
    age_s: float | None = None

    @classmethod
    def of(cls, sample: Sample, mono: float, at_ms: int) -> Reading:
        return cls(
            mono,
            at_ms,
            sample.power_w,
            sample.status,
            sample.error,
            sample.raw,
            sample.cause,
            sample.energy_wh,
            sample.age_s,
        )


@dataclass(frozen=True)
class Verification:
    """What a driver can tell ``agent probe`` beyond a read: whether its values can be trusted.

    ``problem`` set means the value read cannot be vouched for (a word order the meter's own
    mains voltage contradicts); ``unsure`` means nothing contradicts it but nothing confirms it."""

    lines: tuple[str, ...] = ()
    problem: str | None = None
    unsure: str | None = None


class Capability(enum.Flag):
    """What a driver does beyond reading, declared so that nobody has to probe for it."""

    NONE = 0
    SIGNINS = enum.auto()  # reports card sign-ins: take_signins() hands them over
    PUSHED = enum.auto()  # the device pushes its values: the first one can take a while to come


FIRST_MESSAGE_WAIT_S = 10.0
"""How long ``agent probe`` waits for the first value of a PUSHED driver."""


class Driver(Protocol):
    capabilities: Capability

    async def start(self) -> None: ...

    async def read(self) -> Sample: ...

    async def close(self) -> None: ...

    def take_signins(self) -> list[tuple[int, str]]: ...

    async def verify(self) -> Verification: ...


class DriverBase:
    """The defaults of a driver that only reads."""

    capabilities = Capability.NONE

    def take_signins(self) -> list[tuple[int, str]]:
        return []

    async def verify(self) -> Verification:
        return Verification()


class Latest:
    """The newest value of a pushed feed, which goes stale: never carried forward past ``stale_after_s``."""

    def __init__(self, clock: Clock, stale_after_s: float) -> None:
        self.clock = clock
        self.stale_after_s = stale_after_s
        self.sample: Sample | None = None
        self.at = 0.0

    def put(self, sample: Sample) -> None:
        self.sample, self.at = sample, self.clock.mono()

    def get(self, none_yet: str, silent: str) -> Sample:
        """The newest sample; else ``none_yet`` (NO_MESSAGE), or ``silent`` (STALE) once it is too old."""
        if self.sample is None:
            return Sample(error=none_yet, cause=Cause.NO_MESSAGE)
        age = self.clock.mono() - self.at
        if age > self.stale_after_s:
            return Sample(
                error=f"{silent} for more than stale_after_s={self.stale_after_s:g} s",
                cause=Cause.STALE,
                age_s=age,
            )
        return self.sample


Build = Callable[[InstrumentConfig[Any], str, BrokerConfig, Clock, Path | None], Driver]
"""(instrument, agent id, the agent's broker, clock, the site's profiles_dir) -> a driver."""


def no_check(src: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Plugin:
    """One entry of the drivers' list: its ``driver = "..."`` name, its config table, how to build
    and diagnose it. ``build`` imports the driver's code only when called, so loading a config
    costs no protocol library."""

    name: str
    source: type[Source]
    build: Build
    diagnose: Callable[[InstrumentConfig[Any], Sample], str]
    check: Callable[[Any], str | None] = no_check  # what can be said before opening (a missing port)


def sane_power(value: float, what: str) -> Sample:
    """Reject values no instrument draws; usually a word-order or scale mistake in the profile."""
    if value != value or value in (float("inf"), float("-inf")):
        return Sample(
            error=f"{what}: value is not a number (word order or data type suspected)",
            raw=value,
            cause=Cause.ABSURD,
        )
    if abs(value) > 5_000_000:
        return Sample(
            error=f"{what}: absurd power {value:g} W (word order or scale suspected)",
            raw=value,
            cause=Cause.ABSURD,
        )
    return Sample(power_w=abs(value), raw=value)


def sane_energy(value: float | None) -> float | None:
    """A counter reading in Wh, or None where it cannot be one (NaN, negative, absurd)."""
    if value is None or not math.isfinite(value) or not 0 <= value <= MAX_ENERGY_WH:
        return None
    return value
