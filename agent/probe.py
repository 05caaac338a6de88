"""``labmeter agent probe``: read each source a few times and say plainly what is wrong.

For the installer standing next to the instrument: raw value (Modbus: the register words in hex),
decoded power or status, classified state, what the driver can check beyond that (a meter's
word order from its mains voltage), and on failure a diagnosis with the likely fix. Then the
agent's own link to the labmeter broker. Nothing here raises: whatever fails is a PROBLEM line,
and the other instruments are still probed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from labmeter import wire
from labmeter.agent.classifier import Classifier
from labmeter.clock import Clock
from labmeter.config import AgentConfig, ConfigError, InstrumentConfig
from labmeter.drivers import registry
from labmeter.drivers.base import (
    FIRST_MESSAGE_WAIT_S,
    Capability,
    Cause,
    Driver,
    Reading,
    Sample,
    Verification,
)
from labmeter.drivers.profiles import ProfileError

log = logging.getLogger("labmeter.probe")

SHOW_RAW = (Cause.ABSURD, Cause.UNREADABLE, Cause.NO_MATCH, Cause.REJECTED)
"""Errors whose raw reply helps the reader (a reply that is there but wrong)."""


@dataclass
class ProbeResult:
    instrument: str
    lines: list[str] = field(default_factory=list)
    diagnosis: str = ""
    verdict: str = "PROBLEM"  # OK, UNSURE (nothing contradicts the value, nothing confirms it), PROBLEM

    @property
    def ok(self) -> bool:
        return self.verdict == "OK"


def _line(n: int, sample: Sample, state: str) -> str:
    if sample.error:
        raw = f" (raw {sample.raw!r})" if sample.cause in SHOW_RAW and sample.raw is not None else ""
        return f"read {n}: ERROR {sample.error}{raw} -> {state}"
    decoded = f"{sample.power_w:.1f} W" if sample.power_w is not None else f"status {sample.status}"
    return f"read {n}: raw {sample.raw!r} -> {decoded} -> {state}"


async def probe_instrument(cfg: AgentConfig, inst: InstrumentConfig, reads: int, clock: Clock) -> ProbeResult:
    res = ProbeResult(inst.id)
    try:
        if problem := registry.check(inst):
            res.diagnosis = problem
            return res
        driver = registry.build(inst, f"probe-{cfg.agent.id}", cfg.broker, clock, cfg.profiles_dir)
    except (ProfileError, ConfigError) as exc:
        res.diagnosis = str(exc)
        return res
    except Exception as exc:  # one instrument that cannot be set up must not hide the others
        log.debug("building %s failed", inst.id, exc_info=True)
        res.diagnosis = f"cannot set up this instrument: {type(exc).__name__}: {exc}"
        return res
    classifier = Classifier(inst.thresholds)
    errors: list[Sample] = []
    verification = Verification()
    try:
        await driver.start()
        for n in range(1, reads + 1):
            sample = await _read(driver, clock, first=n == 1)
            state = classifier.update(Reading.of(sample, clock.mono(), clock.wall_ms())).state
            if sample.error:
                errors.append(sample)
            res.lines.append(_line(n, sample, state.value))
            if n < reads:
                await asyncio.sleep(min(inst.poll_s, 1.0))
        if all(e.cause is Cause.ABSURD for e in errors):  # a wrong value: the driver may know why
            verification = await asyncio.wait_for(driver.verify(), timeout=60)
    except Exception as exc:
        log.debug("probing %s failed", inst.id, exc_info=True)
        errors.append(Sample(error=f"{type(exc).__name__}: {exc}"))
        res.lines.append(f"ERROR {type(exc).__name__}: {exc}")
    finally:
        try:
            await driver.close()
        except Exception:
            log.debug("closing %s failed", inst.id, exc_info=True)
    res.lines += verification.lines
    if verification.problem:
        res.diagnosis = verification.problem
    elif errors:
        last = errors[-1]
        res.diagnosis = registry.diagnose(inst, last) if last.cause is not None else last.error or "?"
    elif verification.unsure:
        res.verdict, res.diagnosis = "UNSURE", verification.unsure
    else:
        res.verdict, res.diagnosis = "OK", f"reads fine, classified {classifier.state.value}"
    return res


async def _read(driver: Driver, clock: Clock, first: bool) -> Sample:
    read = driver.read
    try:
        sample: Sample = await asyncio.wait_for(read(), timeout=30)
    except TimeoutError:
        return Sample(error="the driver gave no reading in 30 s", cause=Cause.NO_REPLY)
    if first and Capability.PUSHED in driver.capabilities:
        deadline = clock.mono() + FIRST_MESSAGE_WAIT_S
        while sample.cause in (Cause.NO_MESSAGE, Cause.CONNECT) and clock.mono() < deadline:
            await asyncio.sleep(0.2)
            sample = await read()
    return sample


def agent_topics(cfg: AgentConfig) -> tuple[str, ...]:
    """Every topic the agent publishes on (wire.py names them)."""
    aid = cfg.agent.id
    topics = [wire.status_topic(aid)]
    for inst in cfg.instrument:
        topics += [wire.interval_topic(aid, inst.id), wire.open_topic(aid, inst.id)]
        if registry.plugin(inst.source).name == "serial":
            topics.append(wire.signin_topic(aid, inst.id))
    return tuple(topics)


async def probe_link(cfg: AgentConfig) -> ProbeResult:
    """The agent's own broker link: connection, TLS, login, publish permission, its ack subscription."""
    from labmeter.mqtt import check_access

    res = ProbeResult(f"broker link (agent {cfg.agent.id})")
    try:
        access = await check_access(
            cfg.broker, f"probe-{cfg.agent.id}-link", agent_topics(cfg), wire.ack_topic(cfg.agent.id)
        )
    except Exception as exc:
        log.debug("checking the broker link failed", exc_info=True)
        res.diagnosis = f"cannot check the broker link: {type(exc).__name__}: {exc}"
        return res
    res.lines = access.lines
    if access.problem:
        res.diagnosis = access.problem
    elif access.unverified:  # Mosquitto cannot be asked about reading without writing: not a fault
        res.verdict = "OK"
        res.diagnosis = (
            f"connects and may publish its topics (not testable from here: {', '.join(access.unverified)})"
        )
    else:
        res.verdict, res.diagnosis = (
            "OK",
            "connects, may publish its topics and receives its acknowledgements",
        )
    return res


async def probe(cfg: AgentConfig, only: str | None, reads: int, link: bool = True) -> list[ProbeResult]:
    clock = Clock()
    targets = [i for i in cfg.instrument if only is None or i.id == only]
    results = [await probe_instrument(cfg, inst, reads, clock) for inst in targets]
    if link:
        results.append(await probe_link(cfg))
    return results
