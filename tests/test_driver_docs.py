"""Each driver's folder documents itself, and its docs are checked: README.md and sample.toml exist,
the sample loads as an agent config and is the README's configuration block, every TOML block of
the README parses and its source tables validate, and every shipped profile loads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from labmeter import config
from labmeter.drivers import DRIVERS
from labmeter.drivers.modbus import load_profile
from labmeter.drivers.profiles import shipped_profiles
from labmeter.drivers.registry import agent_config
from labmeter.drivers.serial import SerialSource, with_profile

FOLDER = Path(__file__).resolve().parent.parent / "drivers"
HEAD = '[agent]\nid = "docs"\nkey_file = "agent.key"\nstate_dir = "state"\n'
BLOCK = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)


def test_every_driver_folder_is_in_the_list() -> None:
    assert {p.parent.name for p in FOLDER.glob("*/__init__.py")} == set(DRIVERS)


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_sample_loads_and_is_in_the_readme(name: str) -> None:
    sample = (FOLDER / name / "sample.toml").read_text()
    cfg = config.parse(HEAD + sample, agent_config(), f"{name}/sample.toml")
    assert all(isinstance(i.source, DRIVERS[name].source) for i in cfg.instrument)
    assert sample in (FOLDER / name / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_every_toml_block_in_the_readme_parses(name: str) -> None:
    blocks = BLOCK.findall((FOLDER / name / "README.md").read_text())
    assert blocks
    for text in blocks:
        data = tomllib.loads(text)
        if "instrument" in data and isinstance(data["instrument"], list):
            config.parse(HEAD + text, agent_config(), f"{name}/README.md")
        elif "instrument" in data:
            src = msgspec.convert(data["instrument"]["source"], DRIVERS[name].source)
            assert isinstance(src, DRIVERS[name].source)
        else:
            assert data["driver"] == name  # a profile


def test_every_shipped_profile_loads() -> None:
    assert shipped_profiles("modbus") and shipped_profiles("serial")
    assert set(shipped_profiles()) == set(shipped_profiles("modbus")) | set(shipped_profiles("serial"))
    for name in shipped_profiles("modbus"):
        assert load_profile(name).power.address >= 0
    for name in shipped_profiles("serial"):
        assert with_profile(SerialSource(url="loop://", profile=name), None).command
