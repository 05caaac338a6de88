"""Device profiles: device knowledge kept as data (TOML), shipped with the package."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct


class Register(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Where a value lives: function 1 coils, 2 discrete inputs (type "bit"), 3 holding, 4 input registers."""

    function: Literal[1, 2, 3, 4] = 4
    address: Annotated[int, Meta(ge=0, le=0xFFFF)]
    type: Literal["float32", "int16", "uint16", "int32", "uint32", "bit"] = "float32"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    on_state: Literal["RUNNING", "STANDBY", "OFF"] = "RUNNING"
    off_state: Literal["RUNNING", "STANDBY", "OFF"] = "OFF"

    def __post_init__(self) -> None:
        if (self.type == "bit") != (self.function in (1, 2)):
            raise ValueError("type 'bit' goes with function 1 or 2, register types with function 3 or 4")


class ModbusProfile(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: str
    driver: Literal["modbus"]
    doc: str = ""
    power: Register


class ProfileError(Exception):
    pass


def load_profile(name: str, extra_dir: Path | None = None) -> ModbusProfile:
    """A site's own profiles directory wins over the shipped ones, so a site can fix a profile locally."""
    text: str | None = None
    where = ""
    if extra_dir is not None and (extra_dir / f"{name}.toml").is_file():
        where = str(extra_dir / f"{name}.toml")
        text = (extra_dir / f"{name}.toml").read_text(encoding="utf-8")
    else:
        res = resources.files("labmeter.profiles").joinpath(f"{name}.toml")
        if res.is_file():
            where = f"profile {name}"
            text = res.read_text(encoding="utf-8")
    if text is None:
        raise ProfileError(f"unknown profile {name!r}; shipped profiles: {', '.join(shipped_profiles())}")
    try:
        return msgspec.convert(tomllib.loads(text), ModbusProfile)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ProfileError(f"{where}: {exc}") from None


def shipped_profiles(driver: str | None = None) -> list[str]:
    names = sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("labmeter.profiles").iterdir()
        if p.name.endswith(".toml")
    )
    if driver is None:
        return names
    return [n for n in names if _raw(n, None)[0].get("driver") == driver]


def _raw(name: str, extra_dir: Path | None) -> tuple[dict[str, object], str]:
    if extra_dir is not None and (extra_dir / f"{name}.toml").is_file():
        path = extra_dir / f"{name}.toml"
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    res = resources.files("labmeter.profiles").joinpath(f"{name}.toml")
    if not res.is_file():
        raise ProfileError(f"unknown profile {name!r}; shipped profiles: {', '.join(shipped_profiles())}")
    return tomllib.loads(res.read_text(encoding="utf-8")), f"profile {name}"


def serial_profile(name: str, extra_dir: Path | None = None) -> dict[str, object]:
    """A serial profile's settings (the keys of [instrument.source] it fills in)."""
    data, where = _raw(name, extra_dir)
    if data.get("driver") != "serial":
        raise ProfileError(f"{where} is not a serial profile")
    return {k: v for k, v in data.items() if k not in ("name", "driver", "doc")}
