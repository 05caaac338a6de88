"""What every driver returns, and how a driver is built from its config section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from labmeter.wire import State


@dataclass(frozen=True)
class Sample:
    """One read: a power in watts or a status, or an error saying why there is neither."""

    power_w: float | None = None
    status: State | None = None
    error: str | None = None
    raw: Any = None


@dataclass(frozen=True)
class Reading:
    """A sample stamped with the agent's monotonic time and timeline time (UTC ms)."""

    mono: float
    at_ms: int
    power_w: float | None = None
    status: State | None = None
    error: str | None = None
    raw: Any = None

    @classmethod
    def of(cls, sample: Sample, mono: float, at_ms: int) -> Reading:
        return cls(mono, at_ms, sample.power_w, sample.status, sample.error, sample.raw)


class Driver(Protocol):
    async def start(self) -> None: ...

    async def read(self) -> Sample: ...

    async def close(self) -> None: ...


def sane_power(value: float, what: str) -> Sample:
    """Reject values no instrument draws; usually a word-order or scale mistake in the profile."""
    if value != value or value in (float("inf"), float("-inf")):
        return Sample(error=f"{what}: value is not a number (word order or data type suspected)", raw=value)
    if abs(value) > 5_000_000:
        return Sample(error=f"{what}: absurd power {value:g} W (word order or scale suspected)", raw=value)
    return Sample(power_w=abs(value), raw=value)
