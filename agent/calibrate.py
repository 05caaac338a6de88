"""``labmeter agent calibrate``: record an instrument's power and suggest its thresholds.

Instruments sit at two or three power levels (off, standby, running) with noise
around each. Levels are found by 1-D k-means on log power (the levels differ by
orders of magnitude), and the thresholds go midway between neighbouring levels.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from labmeter.clock import Clock
from labmeter.config import AgentConfig, InstrumentConfig
from labmeter.drivers import registry


@dataclass(frozen=True)
class Level:
    mean_w: float
    low_w: float
    high_w: float
    share: float


@dataclass(frozen=True)
class Suggestion:
    levels: list[Level]
    off_below_w: float
    run_above_w: float
    hysteresis_w: float


def find_levels(values: list[float], max_levels: int = 3) -> list[Level]:
    """Power levels present in ``values``, lowest first; neighbours closer than ×1.5 are one level."""
    if not values:
        return []
    xs = sorted(math.log10(max(v, 0.0) + 1.0) for v in values)
    k = min(max_levels, len(set(xs)))
    centres = [
        xs[min(len(xs) - 1, int(q * (len(xs) - 1)))]
        for q in ([0.05, 0.5, 0.95][:k] if k == 3 else [0.1, 0.9][:k] if k == 2 else [0.5])
    ]
    groups: list[list[float]] = [[] for _ in centres]
    for _ in range(50):
        groups = [[] for _ in centres]
        for x in xs:
            groups[min(range(len(centres)), key=lambda i: abs(x - centres[i]))].append(x)
        new = [statistics.fmean(g) if g else c for g, c in zip(groups, centres, strict=True)]
        if new == centres:
            break
        centres = new
    watts = [[10**x - 1.0 for x in g] for g in groups if g]
    merged: list[list[float]] = []
    for g in sorted(watts, key=statistics.fmean):
        if merged and statistics.fmean(g) < 1.5 * statistics.fmean(merged[-1]) + 1.0:
            merged[-1] += g
        else:
            merged.append(list(g))
    return [Level(statistics.fmean(g), min(g), max(g), len(g) / len(values)) for g in merged]


def suggest(levels: list[Level]) -> Suggestion:
    """Thresholds midway (geometric mean) between levels; hysteresis a tenth of the running gap."""
    if len(levels) < 2:
        raise ValueError(
            "only one power level seen: record while the instrument goes through off/standby/running"
        )
    low = levels[0]
    if len(levels) == 2:
        mid = math.sqrt(max(low.high_w, 0.1) * max(levels[1].low_w, 0.1))
        return Suggestion(levels, round(mid, 1), round(mid * 1.2, 1), round(mid * 0.1, 1))
    sb, run = levels[1], levels[-1]
    off_below = math.sqrt(max(low.high_w, 0.1) * max(sb.low_w, 0.1))
    run_above = math.sqrt(max(sb.high_w, 0.1) * max(run.low_w, 0.1))
    hysteresis = max(0.0, (run.low_w - sb.high_w) * 0.1)
    return Suggestion(levels, round(off_below, 1), round(run_above, 1), round(hysteresis, 1))


@dataclass(frozen=True)
class Progress:
    """What the recording shows while it runs: the live reading and the time left."""

    left_s: float
    power_w: float | None
    error: str | None
    readings: int
    errors: int

    def line(self) -> str:
        now = f"now {self.power_w:9.1f} W" if self.power_w is not None else f"no reading ({self.error})"
        left = max(0, math.ceil(self.left_s))
        return (
            f"{now}   {left // 60}:{left % 60:02d} left   ({self.readings} reading(s), {self.errors} failed)"
        )


async def record(
    cfg: AgentConfig,
    inst: InstrumentConfig,
    seconds: float,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[list[float], int]:
    clock = Clock()
    driver = registry.build(inst, f"calibrate-{cfg.agent.id}", cfg.broker, clock, cfg.profiles_dir)
    values: list[float] = []
    errors = 0
    await driver.start()
    try:
        end = clock.mono() + seconds
        while clock.mono() < end:
            s = await driver.read()
            if s.power_w is not None and s.error is None:
                values.append(s.power_w)
            else:
                errors += 1
            if progress is not None:
                ok = s.error is None and s.power_w is not None
                progress(
                    Progress(end - clock.mono(), s.power_w if ok else None, s.error, len(values), errors)
                )
            await asyncio.sleep(inst.poll_s)
    finally:
        await driver.close()
    return values, errors


def write_states(path: Path, instrument: str, s: Suggestion) -> None:
    """Set the thresholds of one instrument in the config file, keeping its comments and layout."""
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    for table in doc.get("instrument", []):
        if table.get("id") == instrument:
            states = table.setdefault("states", tomlkit.table())
            states["off_below_w"] = s.off_below_w
            states["run_above_w"] = s.run_above_w
            states["hysteresis_w"] = s.hysteresis_w
            path.write_text(tomlkit.dumps(doc), encoding="utf-8")
            return
    raise KeyError(instrument)
