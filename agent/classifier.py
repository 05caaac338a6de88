"""Power (or status) readings to OFF / STANDBY / RUNNING / UNKNOWN."""

from __future__ import annotations

from dataclasses import dataclass

from labmeter.config import StatesConfig
from labmeter.drivers.base import Reading
from labmeter.wire import State


@dataclass
class Change:
    """A confirmed state and, when it changed, the timeline time it began (backdated over the dwell)."""

    state: State
    since_ms: int | None


class Classifier:
    """Thresholds with hysteresis and a dwell-time debounce.

    A failed or stale read is UNKNOWN at once: a metering system must not guess.
    A debounced change is backdated to the first reading that showed it, so the
    dwell delays the decision but not the hours.
    """

    def __init__(self, cfg: StatesConfig) -> None:
        self.cfg = cfg
        self.state = State.UNKNOWN
        self._candidate: State | None = None
        self._candidate_mono = 0.0
        self._candidate_ms = 0

    def level(self, power_w: float) -> State:
        c = self.cfg
        if (
            self.state is State.RUNNING
            and power_w >= c.run_above_w - c.hysteresis_w
            and power_w >= c.off_below_w
        ):
            return State.RUNNING
        if self.state is State.OFF and power_w < c.off_below_w + c.hysteresis_w and power_w < c.run_above_w:
            return State.OFF
        if power_w >= c.run_above_w:
            return State.RUNNING
        if power_w < c.off_below_w:
            return State.OFF
        return State.STANDBY

    def update(self, reading: Reading) -> Change:
        if reading.error is not None:
            seen = State.UNKNOWN
        elif reading.status is not None:
            seen = reading.status
        elif reading.power_w is not None:
            seen = self.level(reading.power_w)
        else:
            seen = State.UNKNOWN
        if seen is self.state:
            self._candidate = None
            return Change(self.state, None)
        if seen is State.UNKNOWN or self.state is State.UNKNOWN or self.cfg.min_dwell_s <= 0:
            self.state = seen
            self._candidate = None
            return Change(seen, reading.at_ms)
        if self._candidate is not seen:
            self._candidate = seen
            self._candidate_mono = reading.mono
            self._candidate_ms = reading.at_ms
        if reading.mono - self._candidate_mono >= self.cfg.min_dwell_s:
            self.state = seen
            self._candidate = None
            return Change(seen, self._candidate_ms)
        return Change(self.state, None)
