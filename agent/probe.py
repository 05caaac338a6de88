"""``labmeter agent probe``: read each source a few times and say plainly what is wrong.

For the installer standing next to the instrument: raw value, decoded power or
status, classified state, and on failure a diagnosis with the likely fix.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

from labmeter.agent.classifier import Classifier
from labmeter.drivers import registry
from labmeter.drivers.base import Reading, Sample
from labmeter.drivers.profiles import ProfileError

from labmeter.clock import Clock
from labmeter.config import AgentConfig, InstrumentConfig, ModbusSource, MqttSource, SerialSource

FIRST_MESSAGE_WAIT_S = 10.0


@dataclass
class ProbeResult:
    instrument: str
    lines: list[str] = field(default_factory=list)
    diagnosis: str = ""
    ok: bool = False


def diagnose(inst: InstrumentConfig, error: str) -> str:
    src = inst.source
    e = error.lower()
    if isinstance(src, ModbusSource):
        url = urlparse(src.url)
        where = f"{url.hostname}:{url.port or 502}" if url.scheme == "tcp" else url.path
        if "word order" in e or "scale" in e or "not a number" in e:
            return (
                f"the value read is absurd ({error.split(': ', 1)[-1]}): the word order, data type or scale of "
                f"profile {src.profile!r} does not match this meter"
            )
        if "answered" in e:
            return (
                f"the device rejected the request ({error.split('answered ', 1)[-1]}): wrong register address "
                f"or function code for this model, or wrong device_id ({src.device_id})"
            )
        if "cannot connect" in e and url.scheme == "tcp":
            return (
                f"nothing answers at {where}: check the address and port, and that the meter or its "
                "Modbus gateway is powered and on this network"
            )
        if "cannot connect" in e:
            return f"cannot open {where}: see the serial checks above"
        return (
            f"the device did not answer in {src.timeout_s:g} s: wrong device_id ({src.device_id}), "
            "baud rate or parity, or the RS-485 wiring (A/B swapped, no termination)"
        )
    if isinstance(src, MqttSource):
        if "offline" in e:
            return "the plug reports Offline (its LWT): it lost power or Wi-Fi"
        if "no message" in e:
            return (
                f"no message on {src.topic} within {FIRST_MESSAGE_WAIT_S:g} s: check the topic "
                "(Tasmota: tele/<topic>/SENSOR), the plug's MQTT broker settings and its TelePeriod"
            )
        if "silent" in e:
            return f"the feed stopped: is the plug's reporting period longer than stale_after_s ({inst.stale_after_s:g} s)?"
        return f"unreadable messages on {src.topic}: is format = {src.format!r} right for this device?"
    if isinstance(src, SerialSource):
        if "does not match" in e:
            return f"the instrument answers, but not in the expected form: check regex {src.regex!r}"
        if "no reply" in e:
            return (
                f"no reply in {src.timeout_s:g} s: check baud ({src.baud}), parity ({src.parity}), the command "
                "and its terminator, and the cable (null-modem or straight)"
            )
        if "no status line" in e:
            return "the instrument sends no status lines: is streaming output enabled on it?"
    return error


def serial_checks(src: ModbusSource | SerialSource) -> str | None:
    """What can be said about a serial port before opening it."""
    url = urlparse(src.url)
    if isinstance(src, ModbusSource) and url.scheme != "rtu":
        return None
    path = url.path if isinstance(src, ModbusSource) else src.url
    if "://" in path:
        return None
    if not os.path.exists(path):
        hint = " (USB adapters: prefer /dev/serial/by-id/... so a re-plug cannot change the name)"
        return f"serial port {path} does not exist: is the adapter plugged in?{hint}"
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"no permission on {path}: add the agent's user to the dialout group "
            "(sudo usermod -aG dialout $USER) and log in again"
        )
    return None


async def probe_instrument(cfg: AgentConfig, inst: InstrumentConfig, reads: int, clock: Clock) -> ProbeResult:
    res = ProbeResult(inst.id)
    if isinstance(inst.source, ModbusSource | SerialSource) and (problem := serial_checks(inst.source)):
        res.diagnosis = problem
        return res
    try:
        driver = registry.build(inst, f"probe-{cfg.agent.id}", cfg.broker, clock, cfg.profiles_dir)
    except ProfileError as exc:
        res.diagnosis = str(exc)
        return res
    classifier = Classifier(inst.thresholds)
    errors: list[str] = []
    try:
        await driver.start()
        for n in range(1, reads + 1):
            sample = await _read(driver, inst, clock, first=n == 1)
            state = classifier.update(Reading.of(sample, clock.mono(), clock.wall_ms())).state
            if sample.error:
                errors.append(sample.error)
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
        res.diagnosis = diagnose(inst, errors[-1])
    else:
        res.ok = True
        res.diagnosis = f"OK: reads fine, classified {classifier.state.value}"
    return res


async def _read(driver: object, inst: InstrumentConfig, clock: Clock, first: bool) -> Sample:
    read = driver.read  # type: ignore[attr-defined]
    sample: Sample = await asyncio.wait_for(read(), timeout=30)
    if first and isinstance(inst.source, MqttSource):
        deadline = clock.mono() + FIRST_MESSAGE_WAIT_S
        while sample.error and "no message" in sample.error and clock.mono() < deadline:
            await asyncio.sleep(0.2)
            sample = await read()
    return sample


async def probe(cfg: AgentConfig, only: str | None, reads: int) -> list[ProbeResult]:
    clock = Clock()
    targets = [i for i in cfg.instrument if only is None or i.id == only]
    return [await probe_instrument(cfg, inst, reads, clock) for inst in targets]
