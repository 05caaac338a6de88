"""Adding a driver is a folder and a line in DRIVERS: a small fake driver, registered by that one line
(patched here), is accepted by the config, built by the registry, diagnosed by probe, and named in
the "expected one of" message; unregistered, it is rejected."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labmeter import config
from labmeter.clock import Clock
from labmeter.config import BrokerConfig, InstrumentConfig, Source
from labmeter.drivers import DRIVERS, registry
from labmeter.drivers.base import Cause, DriverBase, Plugin, Sample

HEAD = '[agent]\nid = "pc"\nkey_file = "agent.key"\nstate_dir = "state"\n'
FAKE = (
    '[[instrument]]\nid = "F-1"\npoll_s = 0.1\n[instrument.source]\ndriver = "fake"\nwatts = {watts}\n'
    "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
)


class FakeSource(Source, tag="fake", frozen=True, kw_only=True):
    watts: float


class FakeDriver(DriverBase):
    def __init__(self, watts: float) -> None:
        self.watts = watts

    async def start(self) -> None:
        pass

    async def read(self) -> Sample:
        if self.watts < 0:
            return Sample(error="fake: negative", cause=Cause.UNREADABLE)
        return Sample(power_w=self.watts, raw=self.watts)

    async def close(self) -> None:
        pass


def build(
    inst: InstrumentConfig[Any], agent_id: str, broker: BrokerConfig, clock: Clock, profiles: Path | None
) -> FakeDriver:
    return FakeDriver(inst.source.watts)


def diagnose(inst: InstrumentConfig[Any], sample: Sample) -> str:
    return f"the fake says {sample.cause.value if sample.cause else '?'}"


@pytest.fixture
def fake_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(DRIVERS, "fake", Plugin("fake", FakeSource, build, diagnose))
    yield


def load(text: str) -> config.AgentConfig[Any]:
    return config.parse(HEAD + text, registry.agent_config(), "agent.toml")


def test_a_registered_driver_is_configured_built_and_probed(fake_registered: None) -> None:
    from labmeter.agent.probe import probe_instrument

    cfg = load(FAKE.format(watts=850.0))
    inst = cfg.instrument[0]
    assert isinstance(inst.source, FakeSource) and inst.source.watts == 850.0
    driver = registry.build(inst, "pc", cfg.broker, Clock(), None)
    assert asyncio.run(driver.read()).power_w == 850.0

    good = asyncio.run(probe_instrument(cfg, inst, 1, Clock()))
    assert good.ok and "classified RUNNING" in good.diagnosis
    bad_cfg = load(FAKE.format(watts=-1.0))
    bad = asyncio.run(probe_instrument(bad_cfg, bad_cfg.instrument[0], 1, Clock()))
    assert not bad.ok and bad.diagnosis == "the fake says unreadable"


def test_the_list_names_it_in_the_unknown_driver_message(fake_registered: None) -> None:
    with pytest.raises(config.ConfigError) as err:
        load(FAKE.format(watts=1.0).replace('"fake"', '"fak"'))
    assert "unknown driver; expected one of 'modbus', 'mqtt', 'serial', 'fake'" in str(err.value)
    with pytest.raises(
        config.ConfigError, match=r"agent\.toml:\d+: unknown key 'instrument\[0\]\.source\.wats'"
    ):
        load(FAKE.format(watts=1.0).replace("watts =", "wats ="))


def test_an_unregistered_driver_is_rejected() -> None:
    assert "fake" not in DRIVERS
    with pytest.raises(config.ConfigError) as err:
        load(FAKE.format(watts=1.0))
    assert "unknown driver; expected one of 'modbus', 'mqtt', 'serial' (got 'fake')" in str(err.value)


def test_the_generic_schema_is_not_loaded_by_mistake() -> None:
    """AgentConfig without its sources would read every source as its base: refuse, naming the way."""
    with pytest.raises(TypeError, match="agent_config"):
        config.parse(HEAD + FAKE.format(watts=1.0), config.AgentConfig, "agent.toml")
