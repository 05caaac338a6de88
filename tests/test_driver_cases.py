"""Each driver's data-driven cases (tests/drivers/<driver>/<case>/), named after the mistake or fault
they guard: an ``instrument.toml`` that must fail with ``expected_error.txt``, or one whose driver,
fed ``feed.txt``, must read what ``expected.txt`` says (``power W`` with ``energy WH`` where it reads the counter, ``status STATE`` or ``cause CAUSE``).
No device is involved: the feed goes in where the transport would deliver it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labmeter import config
from labmeter.clock import Clock
from labmeter.drivers import DRIVERS, registry
from labmeter.drivers.base import Driver, Sample

ROOT = Path(__file__).parent / "drivers"
CASES = sorted(p for p in ROOT.glob("*/*") if p.is_dir())
HEAD = '[agent]\nid = "cases"\nkey_file = "agent.key"\nstate_dir = "state"\n'


def feed_mqtt(driver: Any, lines: list[str]) -> Sample:
    for line in lines:
        topic, _, payload = line.partition(" ")
        driver._on_message(topic, payload.encode())
    sample: Sample = asyncio.run(driver.read())
    return sample


def feed_serial(driver: Any, lines: list[str]) -> Sample:
    samples = [driver.decode(line) for line in lines]
    return samples[-1]


FEEDS: dict[str, Callable[[Driver, list[str]], Sample]] = {"mqtt": feed_mqtt, "serial": feed_serial}


def shown(sample: Sample) -> str:
    if sample.cause is not None:
        return f"cause {sample.cause.value}"
    if sample.status is not None:
        return f"status {sample.status.value}"
    energy = "" if sample.energy_wh is None else f" energy {sample.energy_wh:g}"
    return f"power {sample.power_w:g}{energy}"


def test_every_driver_has_cases() -> None:
    assert {c.parent.name for c in CASES} == set(DRIVERS)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_case(case: Path) -> None:
    text = HEAD + (case / "instrument.toml").read_text()
    if (case / "expected_error.txt").exists():
        with pytest.raises(config.ConfigError) as err:
            config.parse(text, registry.agent_config(), "agent.toml")
        assert (case / "expected_error.txt").read_text().strip() in str(err.value)
        return
    cfg = config.parse(text, registry.agent_config(), "agent.toml")
    inst = cfg.instrument[0]
    driver = registry.build(inst, "cases", cfg.broker, Clock(), None)
    lines = (case / "feed.txt").read_text().splitlines()
    assert shown(FEEDS[case.parent.name](driver, lines)) == (case / "expected.txt").read_text().strip()
