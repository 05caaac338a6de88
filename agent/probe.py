"""``labmeter agent probe``: read each source a few times and say plainly what is wrong.

For the installer standing next to the instrument: raw value, decoded power or
status, classified state, and on failure a diagnosis with the likely fix.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from labmeter.agent.classifier import Classifier
from labmeter.clock import Clock
from labmeter.config import AgentConfig, InstrumentConfig
from labmeter.drivers import registry
from labmeter.drivers.base import FIRST_MESSAGE_WAIT_S, Capability, Cause, Driver, Reading, Sample
from labmeter.drivers.profiles import ProfileError


@dataclass
class ProbeResult:
    instrument: str
    lines: list[str] = field(default_factory=list)
    diagnosis: str = ""
    ok: bool = False


async def probe_instrument(cfg: AgentConfig, inst: InstrumentConfig, reads: int, clock: Clock) -> ProbeResult:
    res = ProbeResult(inst.id)
    if problem := registry.check(inst):
        res.diagnosis = problem
        return res
    try:
        driver = registry.build(inst, f"probe-{cfg.agent.id}", cfg.broker, clock, cfg.profiles_dir)
    except ProfileError as exc:
        res.diagnosis = str(exc)
        return res
    classifier = Classifier(inst.thresholds)
    errors: list[Sample] = []
    try:
        await driver.start()
        for n in range(1, reads + 1):
            sample = await _read(driver, inst, clock, first=n == 1)
            state = classifier.update(Reading.of(sample, clock.mono(), clock.wall_ms())).state
            if sample.error:
                errors.append(sample)
                res.lines.append(f"read {n}: ERROR {sample.error} -> {state.value}")
            else:
                decoded = (
                    f"{sample.power_w:.1f} W" if sample.power_w is not None else f"status {sample.status}"
                )
                res.lines.append(f"read {n}: raw {sample.raw!r} -> {decoded} -> {state.value}")
            if n < reads:
                await asyncio.sleep(min(inst.poll_s, 1.0))
    finally:
        await driver.close()
    if errors:
        res.diagnosis = registry.diagnose(inst, errors[-1])
    else:
        res.ok = True
        res.diagnosis = f"OK: reads fine, classified {classifier.state.value}"
    return res


async def _read(driver: Driver, inst: InstrumentConfig, clock: Clock, first: bool) -> Sample:
    read = driver.read
    sample: Sample = await asyncio.wait_for(read(), timeout=30)
    if first and Capability.PUSHED in driver.capabilities:
        deadline = clock.mono() + FIRST_MESSAGE_WAIT_S
        while sample.cause is Cause.NO_MESSAGE and clock.mono() < deadline:
            await asyncio.sleep(0.2)
            sample = await read()
    return sample


async def probe(cfg: AgentConfig, only: str | None, reads: int) -> list[ProbeResult]:
    clock = Clock()
    targets = [i for i in cfg.instrument if only is None or i.id == only]
    return [await probe_instrument(cfg, inst, reads, clock) for inst in targets]
