"""From the drivers' list to what the agent uses: its config schema, a driver per instrument, a diagnosis."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from labmeter.clock import Clock
from labmeter.config import AgentConfig, BrokerConfig, InstrumentConfig, Source
from labmeter.drivers import DRIVERS
from labmeter.drivers.base import Driver, Plugin, Sample


def agent_config() -> type[AgentConfig[Any]]:
    """``agent.toml``'s schema, its sources the union of every listed driver's (looked up at each call,
    so a driver added to the list, as a test does, is accepted at once)."""
    sources = tuple(p.source for p in DRIVERS.values())
    schema: type[AgentConfig[Any]] = AgentConfig[Union[sources]]  # type: ignore[valid-type]  # noqa: UP007
    return schema


def plugin(src: Source) -> Plugin:
    for p in DRIVERS.values():
        if type(src) is p.source:
            return p
    raise ValueError(f"no driver for {src!r}")


def build(
    inst: InstrumentConfig[Any], agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> Driver:
    return plugin(inst.source).build(inst, agent_id, broker, clock, profiles)


def check(inst: InstrumentConfig[Any]) -> str | None:
    """What can be said about the source before opening it (a serial port that is missing)."""
    return plugin(inst.source).check(inst.source)


def diagnose(inst: InstrumentConfig[Any], sample: Sample) -> str:
    return plugin(inst.source).diagnose(inst, sample)
