"""`labmeter demo` and the hidden `labmeter sim`: a simulated lab on this machine (the lab itself is in
demolab, imported only when it runs, so that the agent's process never loads the collector's side)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click

from labmeter import log
from labmeter.cli.common import need_collector_deps, run_until_signal, verbose_option


@click.command("demo")
@click.option(
    "--duration",
    type=float,
    default=60,
    show_default=True,
    help="Real seconds to run; a 14-hour working day is compressed into them.",
)
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Keep configs and data here.")
@click.option("--port", type=int, default=0, help="Port for the built-in broker (default: a free one).")
def demo(duration: float, directory: Path | None, port: int) -> None:
    """A simulated lab end to end: built-in broker, collector, agent, Modbus meters and a Tasmota plug."""
    need_collector_deps()
    from labmeter.cli.demolab import run_demo

    log.setup(quiet=True)
    run_until_signal(lambda stop: run_demo(duration, directory, port, stop))


@click.command("sim", hidden=True)
@click.argument("spec_file", type=click.Path(path_type=Path))
@verbose_option
def sim(spec_file: Path, verbose: bool) -> None:
    """Run simulated instruments from a TOML spec (for tests and benchmarks)."""
    from labmeter.clock import clock_from_env
    from labmeter.drivers.sim import run_sim

    log.setup(verbose)
    spec = tomllib.loads(spec_file.read_text(encoding="utf-8"))
    run_until_signal(lambda stop: run_sim(spec, clock_from_env(), stop))
