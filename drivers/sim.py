"""Simulated instruments that speak the real protocols (each driver's ``sim.py``), run from one spec.

Power follows a schedule of (seconds since the simulated start, state); the demo
and the scenario tests compare metered hours against that schedule.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from labmeter.clock import Clock
from labmeter.config import BrokerConfig

log = logging.getLogger("labmeter.sim")

DEFAULT_LEVELS = {"OFF": 0.8, "STANDBY": 150.0, "RUNNING": 1200.0}


@dataclass
class Schedule:
    """Piecewise-constant states; ``levels`` gives the watts drawn in each."""

    points: list[tuple[float, str]]
    levels: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LEVELS))
    noise: float = 0.02
    epoch_ms: int = 0

    def __post_init__(self) -> None:
        self.points = sorted((float(t), s) for t, s in self.points)
        self._times = [t for t, _ in self.points]
        self._rng = random.Random(7)

    def state_at(self, t_s: float) -> str:
        i = bisect.bisect_right(self._times, t_s) - 1
        return self.points[i][1] if i >= 0 else "OFF"

    def power_at(self, wall_ms: int) -> float:
        level = self.levels[self.state_at((wall_ms - self.epoch_ms) / 1000)]
        return max(0.0, level * (1 + self._rng.uniform(-self.noise, self.noise)))

    def energy_wh(self, wall_ms: int) -> float:
        """The exact integral of the levels (without noise) from the start to ``wall_ms``, in Wh: what an
        ideal meter's energy counter has counted, the ground truth energy tests compare against."""
        t_end = (wall_ms - self.epoch_ms) / 1000
        total, t, state = 0.0, 0.0, "OFF"
        for at, s in self.points:
            if at >= t_end:
                break
            if at > t:
                total += self.levels[state] * (at - t)
                t = at
            state = s
        if t_end > t:
            total += self.levels[state] * (t_end - t)
        return total / 3600


def schedules_from(spec: dict[str, Any], epoch_ms: int) -> Schedule:
    return Schedule(
        points=[(float(t), str(s)) for t, s in spec["schedule"]],
        levels={**DEFAULT_LEVELS, **spec.get("levels", {})},
        noise=float(spec.get("noise", 0.02)),
        epoch_ms=epoch_ms,
    )


async def run_sim(spec: dict[str, Any], clock: Clock, stop: asyncio.Event) -> None:
    """Run the meters and plugs a sim spec (TOML/JSON dict) describes until ``stop``."""
    from labmeter.drivers.modbus.sim import SimMeter
    from labmeter.drivers.mqtt.sim import SimPlug

    epoch_ms = int(spec.get("epoch_ms", clock.wall_ms()))
    parts: list[SimMeter | SimPlug] = []
    for m in spec.get("meter", []):
        sched = schedules_from(m, epoch_ms)
        profile = str(m.get("profile", SimMeter.PROFILE))
        parts.append(SimMeter(m["listen"], sched, clock, int(m.get("device_id", 1)), profile))
    for p in spec.get("plug", []):
        broker = BrokerConfig(url=p.get("broker", "mqtt://127.0.0.1:1883"))
        parts.append(
            SimPlug(p["topic"], broker, schedules_from(p, epoch_ms), clock, float(p.get("every_s", 10)))
        )
    for part in parts:
        await part.start()
    log.info("simulating %d instrument(s)", len(parts))
    try:
        await stop.wait()
    finally:
        for part in parts:
            await part.stop()
