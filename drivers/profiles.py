"""Device profiles: device knowledge kept as data (TOML) in each driver's ``profiles/`` folder.

One lookup for every driver: a site's own ``profiles_dir`` first, so a site can fix a profile
locally, then the profiles shipped with the driver (package data).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any


class ProfileError(Exception):
    pass


def _shipped_dir(driver: str) -> Traversable:
    return resources.files("labmeter.drivers").joinpath(driver, "profiles")


def shipped_profiles(driver: str | None = None) -> list[str]:
    """The names of the profiles shipped with ``driver`` (every driver's when None)."""
    root = resources.files("labmeter.drivers")
    drivers = [driver] if driver else [d.name for d in root.iterdir() if d.is_dir()]
    names: list[str] = []
    for d in drivers:
        folder = _shipped_dir(d)
        if folder.is_dir():
            names += [p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")]
    return sorted(names)


def find_profile(driver: str, name: str, site_dir: Path | None = None) -> tuple[dict[str, Any], str]:
    """A profile's table and where it came from (for messages); it must be one of ``driver``'s."""
    site = site_dir / f"{name}.toml" if site_dir is not None else None
    if site is not None and site.is_file():
        where, text = str(site), site.read_text(encoding="utf-8")
    else:
        res = _shipped_dir(driver).joinpath(f"{name}.toml")
        if not res.is_file():
            shipped = ", ".join(shipped_profiles(driver)) or "none"
            raise ProfileError(f"unknown profile {name!r}; shipped {driver} profiles: {shipped}")
        where, text = f"profile {name}", res.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    if data.get("driver") != driver:
        raise ProfileError(f"{where} is not a {driver} profile (driver = {data.get('driver')!r})")
    return data, where
