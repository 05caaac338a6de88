"""Time sources.

Durations come from the monotonic clock and boundaries from UTC wall time. A
``ScaledClock`` lets the demo and the scenario tests run a working day in a minute:
every process that shares ``LABMETER_SIM_CLOCK`` sees the same simulated time,
because CLOCK_MONOTONIC is system-wide.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

SIM_CLOCK_ENV = "LABMETER_SIM_CLOCK"
SIM_CLOCK_SHIFT_ENV = "LABMETER_SIM_CLOCK_SHIFT"  # a file holding a wall-clock offset in ms (a clock step)


class Clock:
    """Real time: wall clock in UTC milliseconds, monotonic seconds."""

    scale = 1.0

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def mono(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.scale)

    def real_seconds(self, seconds: float) -> float:
        """Real seconds that pass while ``seconds`` pass on this clock."""
        return seconds / self.scale

    @property
    def simulated(self) -> bool:
        return False


@dataclass
class ScaledClock(Clock):
    """Simulated time: ``epoch_ms`` at monotonic ``origin``, running ``scale`` times faster."""

    epoch_ms: int
    origin: float
    scale: float = 1.0
    shift_file: str | None = None
    _shift: tuple[float, int] = (-1.0, 0)

    def wall_ms(self) -> int:
        return self.epoch_ms + int((time.monotonic() - self.origin) * self.scale * 1000) + self.shift_ms()

    def shift_ms(self) -> int:
        """The simulated wall clock's step (NTP or an operator setting it), read from ``shift_file``.

        The monotonic clock does not move with it, as on a real machine. Read at most
        every 50 ms; a missing or unreadable file is no step.
        """
        if self.shift_file is None:
            return 0
        at, value = self._shift
        now = time.monotonic()
        if now - at >= 0.05:
            try:
                with open(self.shift_file, encoding="ascii") as f:
                    value = int(f.read().strip() or 0)
            except (OSError, ValueError):
                value = 0
            self._shift = (now, value)
        return value

    def mono(self) -> float:
        return (time.monotonic() - self.origin) * self.scale

    @property
    def simulated(self) -> bool:
        return True

    def env_value(self) -> str:
        return f"{self.epoch_ms}:{self.origin!r}:{self.scale!r}"

    @classmethod
    def start(cls, epoch_ms: int, scale: float) -> ScaledClock:
        return cls(epoch_ms=epoch_ms, origin=time.monotonic(), scale=scale)


def clock_from_env() -> Clock:
    """The clock for this process: simulated when ``LABMETER_SIM_CLOCK`` is set."""
    spec = os.environ.get(SIM_CLOCK_ENV)
    if not spec:
        return Clock()
    try:
        epoch, origin, scale = spec.split(":")
        shift = os.environ.get(SIM_CLOCK_SHIFT_ENV) or None
        return ScaledClock(epoch_ms=int(epoch), origin=float(origin), scale=float(scale), shift_file=shift)
    except ValueError as exc:
        raise ValueError(f"{SIM_CLOCK_ENV}={spec!r}: expected EPOCH_MS:ORIGIN:SCALE") from exc
