"""Power telemetry: readings downsampled to one signed window a minute (mean, min, max, energy).

For the live view and the time-series store only: published at QoS 0 beside the
outbox, never stored in it, never counted as hours, and a lost window is just a gap
in a curve. Windows are UTC-aligned, so every agent's minutes line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from labmeter import wire

if TYPE_CHECKING:
    from labmeter.agent.runtime import Agent


@dataclass(frozen=True)
class Window:
    start: int
    end: int
    n: int
    mean_w: float
    min_w: float
    max_w: float
    energy_wh: float | None


class PowerDownsampler:
    """Feed it every reading; it returns a window when a reading lands in the next one.

    A window without a valid reading is never sent (no data, not zero watts).
    """

    def __init__(self, window_ms: int = wire.POWER_WINDOW_MS) -> None:
        self.window_ms = window_ms
        self._start: int | None = None
        self._n = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._energy: float | None = None

    def feed(self, at_ms: int, power_w: float | None, energy_wh: float | None = None) -> Window | None:
        start = at_ms - at_ms % self.window_ms
        done = self.close() if self._start is not None and start != self._start else None
        if self._start is None:
            self._start = start
        if power_w is not None and math.isfinite(power_w) and abs(power_w) <= wire.MAX_POWER_W:
            self._n += 1
            self._sum += power_w
            self._min = min(self._min, power_w)
            self._max = max(self._max, power_w)
            if energy_wh is not None and math.isfinite(energy_wh) and 0 <= energy_wh <= wire.MAX_ENERGY_WH:
                self._energy = energy_wh
        return done

    def close(self) -> Window | None:
        """The window so far (None if it holds no reading); the next reading opens a new one."""
        start, self._start = self._start, None
        n, total, lo, hi, energy = self._n, self._sum, self._min, self._max, self._energy
        self._n, self._sum, self._min, self._max, self._energy = 0, 0.0, math.inf, -math.inf, None
        if start is None or n == 0:
            return None
        mean = min(max(total / n, lo), hi)
        return Window(start, start + self.window_ms, n, round(mean, 3), round(lo, 3), round(hi, 3), energy)


def power_body(agent: str, instrument: str, w: Window) -> wire.Power:
    return wire.Power(agent, instrument, w.start, w.end, w.n, w.mean_w, w.min_w, w.max_w, w.energy_wh)


def publish(agent: Agent, instrument: str, window: Window | None) -> None:
    """Sign and send a window at QoS 0; while disconnected it is dropped (it is telemetry, not hours)."""
    if window is None:
        return
    payload = wire.seal_power(agent.signer.key, agent.signer.kid, power_body(agent.id, instrument, window))
    agent.link.publish(wire.power_topic(agent.id, instrument), payload, qos=0)
