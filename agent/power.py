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


Point = tuple[int, float]
"""(time in UTC ms, value)."""

DEFAULT_MAX_GAP_MS = 10_000
"""Steps between reads longer than this count no energy (the runner passes three poll intervals)."""


Step = tuple[int, int, float]
"""(start ms, end ms, Wh) of the energy measured between two reads."""


class EnergySteps:
    """The energy between consecutive reads: the one rule for power windows and intervals alike.

    A step is the meter's counter difference where the counter was read at both ends, else the trapezoid
    of the power between two successful reads. A step longer than ``max_gap_ms``, a failed read, or a
    counter that went down (reset, rollover, a new meter) or jumped beyond what MAX_POWER_W could draw
    gives no step and starts afresh, so energy is never negative, doubled or invented. A counter keeps
    counting while reads fail, so its difference may span up to ``counter_gap_ms`` of failed or missing
    reads (default: no longer than a power step).
    """

    def __init__(self, max_gap_ms: int = DEFAULT_MAX_GAP_MS, counter_gap_ms: int | None = None) -> None:
        self.max_gap_ms = max_gap_ms
        self.counter_gap_ms = max_gap_ms if counter_gap_ms is None else max(max_gap_ms, counter_gap_ms)
        self._power: Point | None = None  # the last successful read without a counter
        self._counter: Point | None = None  # the last counter reading (the base of the next step)

    def reset(self) -> None:
        """Forget both bases (the time base moved: a clock step), so no step spans the jump."""
        self._power = self._counter = None

    def feed(self, at_ms: int, power_w: float | None, energy_wh: float | None = None) -> Step | None:
        """The step that ends at this reading, or None; an invalid power or counter counts as not read."""
        ok = power_w is not None and math.isfinite(power_w) and abs(power_w) <= wire.MAX_POWER_W
        counter = energy_wh if ok and energy_wh is not None and math.isfinite(energy_wh) else None
        if counter is not None and not 0 <= counter <= wire.MAX_ENERGY_WH:
            counter = None
        step = self._step(at_ms, power_w if ok else None, counter)
        return None if step is None else (step[0], at_ms, step[1])

    def _step(self, at_ms: int, power_w: float | None, counter: float | None) -> tuple[int, float] | None:
        """The energy since the previous read, as (its start, Wh), or None when it cannot be measured."""
        prev_p, prev_c = self._power, self._counter
        if power_w is None:  # a failed read: the next step starts afresh (a counter base may bridge it)
            self._power = None
            if prev_c is not None and at_ms - prev_c[0] > self.counter_gap_ms:
                self._counter = None
            return None
        if counter is not None:
            self._counter, self._power = (at_ms, counter), None
            if prev_c is None or not 0 < at_ms - prev_c[0] <= self.counter_gap_ms or counter < prev_c[1]:
                return None  # the first counter reading, a gap, or a reset / rollover / new meter: a new base
            wh = counter - prev_c[1]
            if wh > wire.max_window_energy_wh(at_ms - prev_c[0]):
                return None  # more than any instrument draws: a jump to a new meter's count, not energy
            return prev_c[0], wh
        self._power = (at_ms, power_w)
        if prev_c is not None and at_ms - prev_c[0] <= self.max_gap_ms:
            return None  # the counter missed one read: its next reading covers this step
        self._counter = None
        if prev_p is None or not 0 < at_ms - prev_p[0] <= self.max_gap_ms:
            return None
        return prev_p[0], (prev_p[1] + power_w) / 2 * (at_ms - prev_p[0]) / 3_600_000


class IntervalEnergy:
    """The measured energy of the open interval, cut wherever the timeline closes one.

    Steps are kept until an interval that ends at or after them is closed (a state change may be dated
    back to when it began, so a cut can fall inside steps already taken); a step crossing the cut is
    split in proportion to time; a step read only after the interval it began in had closed counts in
    the one it ends in, so no measured energy is lost. :meth:`take` gives None for an interval no step
    reaches: unknown, never 0. At most ``MAX_STEPS`` steps are held; beyond that the oldest two are
    merged (a cut inside the merged step is then split in proportion over both), so memory stays
    bounded whatever the poll rate.
    """

    MAX_STEPS = 4096

    def __init__(self, max_gap_ms: int = DEFAULT_MAX_GAP_MS) -> None:
        # the counter may bridge failed reads for up to an interval's longest length (see EnergySteps)
        self.steps = EnergySteps(max_gap_ms, counter_gap_ms=wire.MAX_INTERVAL_MS)
        self._held: list[list[float]] = []

    def feed(self, at_ms: int, power_w: float | None, energy_wh: float | None = None) -> None:
        step = self.steps.feed(at_ms, power_w, energy_wh)
        if step is None:
            return
        self._held.append([float(step[0]), float(step[1]), max(0.0, step[2])])
        if len(self._held) > self.MAX_STEPS:
            (s0, _e0, w0), (_s1, e1, w1) = self._held[0], self._held[1]
            self._held[0:2] = [[s0, e1, w0 + w1]]

    def reset(self) -> None:
        self.steps.reset()

    def withdraw(self, after_ms: int) -> None:
        """Take back what was integrated after ``after_ms``: a pushed feed's last value, held by the driver
        and read again at every poll until the feed was found silent, was not measured past its arrival.

        Only steps still held (not yet in a closed interval) can be taken back; a step across ``after_ms``
        keeps its share before it, in proportion to time.
        """
        keep: list[list[float]] = []
        for s, e, wh in self._held:
            if e <= after_ms:
                keep.append([s, e, wh])
            elif s < after_ms:
                keep.append([s, float(after_ms), wh * (after_ms - s) / (e - s)])
        self._held = keep

    def take(self, start: int, end: int) -> float | None:
        """The energy in [start, end) in Wh (whole mWh, at most the one bound for its length),
        None when no measured step overlaps it; steps before ``end`` are dropped."""
        total: float | None = None
        keep: list[list[float]] = []
        for s, e, wh in self._held:
            # a step that began before this interval was read only after the previous one had closed (its
            # reads failed meanwhile): its early part counts here, where it was measured, not nowhere
            lo, hi = s, min(e, end)
            if hi > lo:
                total = (total or 0.0) + wh * (hi - lo) / (e - s)
            if e > end:
                keep.append([max(s, end), e, wh * (e - max(s, end)) / (e - s)] if s < end else [s, e, wh])
        self._held = keep
        if total is None:
            return None
        # whole mWh, rounded down: never above the bound the collector checks
        return math.floor(min(total, wire.max_window_energy_wh(end - start)) * 1000) / 1000


class PowerDownsampler:
    """Feed it every reading; it returns a window when a reading lands in the next one.

    A window without a valid reading is never sent (no data, not zero watts). Its energy is the sum of
    the :class:`EnergySteps` in it, a step split at the window boundary in proportion. ``energy_wh`` is
    None for a window in which no step could be measured.
    """

    def __init__(self, window_ms: int = wire.POWER_WINDOW_MS, max_gap_ms: int = DEFAULT_MAX_GAP_MS) -> None:
        self.window_ms = window_ms
        self.max_gap_ms = max_gap_ms
        self._start: int | None = None
        self._n = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._energy: float | None = None
        self._steps = EnergySteps(max_gap_ms)

    def feed(self, at_ms: int, power_w: float | None, energy_wh: float | None = None) -> Window | None:
        start = at_ms - at_ms % self.window_ms
        ok = power_w is not None and math.isfinite(power_w) and abs(power_w) <= wire.MAX_POWER_W
        measured = self._steps.feed(at_ms, power_w, energy_wh)
        step = None if measured is None else (measured[0], measured[2])
        done = None
        if self._start is not None and start != self._start:
            if step is not None and self._start < start and step[0] < start:
                before = step[1] * (start - step[0]) / (at_ms - step[0]) if at_ms > step[0] else 0.0
                self._add_energy(before)
                step = (step[0], step[1] - before)
            done = self.close()
        if self._start is None:
            self._start = start
        if step is not None:
            self._add_energy(step[1])
        if ok and power_w is not None:
            self._n += 1
            self._sum += power_w
            self._min = min(self._min, power_w)
            self._max = max(self._max, power_w)
        return done

    def _add_energy(self, wh: float) -> None:
        self._energy = (self._energy or 0.0) + max(0.0, wh)

    def close(self) -> Window | None:
        """The window so far (None if it holds no reading); the next reading opens a new one."""
        start, self._start = self._start, None
        n, total, lo, hi, energy = self._n, self._sum, self._min, self._max, self._energy
        self._n, self._sum, self._min, self._max, self._energy = 0, 0.0, math.inf, -math.inf, None
        if start is None or n == 0:
            return None
        mean = min(max(total / n, lo), hi)
        if energy is not None and not energy <= wire.max_window_energy_wh(self.window_ms):
            energy = None
        e = None if energy is None else round(energy, 6)
        return Window(start, start + self.window_ms, n, round(mean, 3), round(lo, 3), round(hi, 3), e)


def power_body(agent: str, instrument: str, w: Window) -> wire.Power:
    return wire.Power(agent, instrument, w.start, w.end, w.n, w.mean_w, w.min_w, w.max_w, w.energy_wh)


def publish(agent: Agent, instrument: str, window: Window | None) -> None:
    """Sign and send a window at QoS 0; while disconnected it is dropped (it is telemetry, not hours)."""
    if window is None:
        return
    payload = wire.seal_power(agent.signer.key, agent.signer.kid, power_body(agent.id, instrument, window))
    agent.link.publish(wire.power_topic(agent.id, instrument), payload, qos=0)
