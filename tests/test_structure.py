"""The import graph keeps its layers: the core (labmeter/) imports nothing above it, drivers import
neither the agent nor the collector. Imports are read with ast, so a lazy import inside a function
counts as much as one at the top."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject's package-dir)
FOLDERS = {
    "labmeter": "labmeter",
    "agent": "labmeter.agent",
    "collector": "labmeter.collector",
    "drivers": "labmeter.drivers",
}
# the command line (labmeter/cli/) is the roof: it may import every side
ROOF = ("labmeter.cli", "labmeter.__main__")
ABOVE_CORE = ("labmeter.agent", "labmeter.collector", "labmeter.drivers")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


MODULES = modules()


def test_the_core_imports_nothing_above_it() -> None:
    core = {n: p for n, p in MODULES.items() if within(n, ("labmeter",)) and not within(n, ABOVE_CORE)}
    assert "labmeter.config" in core and "labmeter.cli.report" in core
    wrong = {
        n: sorted(m for m in imports(n, p) if within(m, ABOVE_CORE))
        for n, p in core.items()
        if not within(n, ROOF)
    }
    assert not {n: m for n, m in wrong.items() if m}, wrong


def test_verify_needs_neither_the_collector_nor_the_agent() -> None:
    """`labmeter verify` is the auditor's: it must run from the core alone, on a machine without the
    collector (its code and its ledger)."""
    verify = MODULES["labmeter.cli.verify"]
    wrong = sorted(m for m in imports("labmeter.cli.verify", verify) if within(m, ABOVE_CORE))
    assert not wrong, wrong


def test_drivers_import_neither_agent_nor_collector() -> None:
    drivers = {n: p for n, p in MODULES.items() if within(n, ("labmeter.drivers",))}
    assert "labmeter.drivers.modbus.driver" in drivers
    wrong = {
        n: sorted(m for m in imports(n, p) if within(m, ("labmeter.agent", "labmeter.collector")))
        for n, p in drivers.items()
    }
    assert not {n: m for n, m in wrong.items() if m}, wrong


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from labmeter.collector.ledger import Ledger\n", {"labmeter.collector.ledger"}),
        ("def f():\n    import labmeter.agent.runtime\n", {"labmeter.agent.runtime"}),
        ("from ..agent import runtime\n", {"labmeter.agent"}),
    ],
    ids=["top-level", "inside-a-function", "relative"],
)
def test_the_check_sees_every_kind_of_import(tmp_path: Path, source: str, expected: set[str]) -> None:
    """The checker itself: an upward import is found wherever and however it is written."""
    (tmp_path / "mod.py").write_text(source)
    got = imports("labmeter.drivers.mod", tmp_path / "mod.py")
    assert expected <= got and any(within(m, ABOVE_CORE) for m in got)


def test_every_package_folder_is_installed() -> None:
    """A package missing from pyproject's packages (a driver, a collector role, the CLI) would work in the
    source tree but not in a wheel; a folder of modules without __init__.py would not be a package at all."""
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    with_modules = {
        ".".join([FOLDERS[d.relative_to(ROOT).parts[0]], *d.relative_to(ROOT).parts[1:]])
        for top in FOLDERS
        for d in (ROOT / top).rglob("*")
        if d.is_dir() and any(d.glob("*.py"))
    }
    assert "labmeter.collector.ledger" in folders and "labmeter.cli" in folders
    assert with_modules <= folders, sorted(with_modules - folders)
    assert folders <= packages, sorted(folders - packages)


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in tests/support, conftest or the lab/scenario harness, never in a test module."""
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found = {
            m for m in imports(name, path) if m.split(".")[-1].startswith("test_") and m.startswith("tests.")
        }
        if found:
            offenders[name] = sorted(found)
    assert offenders == {}
