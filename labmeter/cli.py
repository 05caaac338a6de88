"""The ``labmeter`` command."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, NoReturn
from zoneinfo import ZoneInfo

import typer

from labmeter import config, log, signing

app = typer.Typer(
    help="Verified machine hours for shared scientific instruments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
agent_app = typer.Typer(help="Run and manage the agent beside the instruments.", no_args_is_help=True)
collector_app = typer.Typer(help="Run the collector and manage its registry.", no_args_is_help=True)
report_app = typer.Typer(help="Reports from the ledger.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")
app.add_typer(collector_app, name="collector")
app.add_typer(report_app, name="report")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Config file (TOML).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_agent(path: Path) -> config.AgentConfig:
    try:
        return config.load(path, config.AgentConfig)
    except config.ConfigError as exc:
        fail(str(exc))


def load_collector(path: Path) -> config.CollectorConfig:
    try:
        return config.load(path, config.CollectorConfig)
    except config.ConfigError as exc:
        fail(str(exc))


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a service until SIGINT or SIGTERM, then let it shut down cleanly."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


# agent ----------------------------------------------------------------------
@agent_app.command("enroll")
def agent_enroll(
    cfg_path: ConfigOpt = Path("agent.toml"),
    force: Annotated[bool, typer.Option(help="Replace an existing key.")] = False,
) -> None:
    """Create the agent's Ed25519 key (mode 0600) and print the command that registers it."""
    cfg = load_agent(cfg_path)
    try:
        key = signing.generate_key_file(cfg.agent.key_file, force=force)
    except signing.KeyFileError as exc:
        fail(str(exc))
    pub = signing.public_key_text(key.public_key())
    typer.echo(f"key written to {cfg.agent.key_file} (mode 0600)")
    typer.echo(f"public key: {pub}")
    inst = " ".join(f"--instrument {i.id}" for i in cfg.instrument)
    typer.echo("register it on the collector with:")
    typer.echo(f"  labmeter collector add-agent {cfg.agent.id} --key {pub} {inst}")


@agent_app.command("run")
def agent_run(cfg_path: ConfigOpt = Path("agent.toml"), verbose: Verbose = False) -> None:
    """Poll the instruments and send signed intervals to the collector."""
    from labmeter.agent.runtime import Agent
    from labmeter.clock import clock_from_env

    log.setup(verbose)
    cfg = load_agent(cfg_path)

    async def main(stop: asyncio.Event) -> None:
        try:
            agent = Agent(cfg, clock_from_env())
        except signing.KeyFileError as exc:
            fail(str(exc))
        await agent.run(stop)

    run_until_signal(main)


@agent_app.command("status")
def agent_status(
    cfg_path: ConfigOpt = Path("agent.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the outbox: what waits for the collector's acknowledgement, and what it rejected."""
    from labmeter.agent.outbox import AgentStore

    cfg = load_agent(cfg_path)
    store = AgentStore(cfg.agent.state_dir / "agent.db")
    summary = store.summary()
    store.close()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    chain = summary["chain"]
    pending = summary["pending"]
    assert isinstance(chain, dict) and isinstance(pending, dict)
    typer.echo(f"agent {cfg.agent.id}")
    for inst in cfg.instrument:
        p = pending.get(inst.id)
        waiting = f"{p['count']} waiting for acknowledgement" if p else "all acknowledged"
        typer.echo(f"  {inst.id}: {chain.get(inst.id, 0)} interval(s) emitted, {waiting}")
    dead = summary["dead"]
    assert isinstance(dead, list)
    if dead:
        typer.echo(f"rejected by the collector ({len(dead)}); fix the cause, then `labmeter agent resend`:")
        for d in dead[-20:]:
            typer.echo(f"  {d['instrument']} seq {d['seq']}: {d['reason']}")


@agent_app.command("resend")
def agent_resend(cfg_path: ConfigOpt = Path("agent.toml")) -> None:
    """Put rejected messages back in the outbox, once their cause is fixed."""
    from labmeter.agent.outbox import AgentStore

    cfg = load_agent(cfg_path)
    store = AgentStore(cfg.agent.state_dir / "agent.db")
    n = store.resend_dead()
    store.close()
    typer.echo(f"{n} message(s) queued again")


# collector ------------------------------------------------------------------
@collector_app.command("run")
def collector_run(cfg_path: ConfigOpt = Path("collector.toml"), verbose: Verbose = False) -> None:
    """Receive, verify and store intervals (starts the built-in broker if [broker] embedded = true)."""
    from labmeter.clock import clock_from_env
    from labmeter.collector.service import Collector

    log.setup(verbose)
    cfg = load_collector(cfg_path)

    async def main(stop: asyncio.Event) -> None:
        await Collector(cfg, clock_from_env()).run(stop)

    run_until_signal(main)


@collector_app.command("add-agent")
def collector_add_agent(
    agent_id: Annotated[str, typer.Argument(help="The agent's id, as in its agent.toml.")],
    key: Annotated[str, typer.Option(help="Public key printed by `labmeter agent enroll` (ed25519:...).")],
    instrument: Annotated[list[str], typer.Option(help="Instrument code this agent measures (repeat).")],
    cfg_path: ConfigOpt = Path("collector.toml"),
) -> None:
    """Register an agent's public key and the instruments it may report."""
    from labmeter.collector.ledger import Ledger
    from labmeter.wire import ID_RE

    cfg = load_collector(cfg_path)
    for name in [agent_id, *instrument]:
        if not ID_RE.match(name):
            fail(f"{name!r}: ids use letters, digits, '.', '_' and '-' only (at most 64)")
    try:
        pub = signing.parse_public_key(key)
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    ledger.add_agent(agent_id, key, signing.key_id(pub), instrument)
    ledger.close()
    typer.echo(f"agent {agent_id} registered for {', '.join(instrument)}")


@collector_app.command("import-instruments")
def collector_import(
    file: Annotated[Path, typer.Argument(help="CSV with columns code,name,unit,category,kind,rated_hours.")],
    cfg_path: ConfigOpt = Path("collector.toml"),
) -> None:
    """Add or update instruments from a CSV file (all rows or none)."""
    from labmeter.collector.ledger import Ledger, LedgerError

    cfg = load_collector(cfg_path)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    try:
        n = ledger.import_instruments(file)
    except (LedgerError, OSError) as exc:
        fail(str(exc))
    finally:
        ledger.close()
    typer.echo(f"{n} instrument(s) imported")


# report ---------------------------------------------------------------------
@report_app.command("hours")
def report_hours(
    start: Annotated[str, typer.Option("--from", help="First day (2026-01-01) or time, local.")],
    end: Annotated[str, typer.Option("--to", help="Last day (inclusive) or end time, local.")],
    cfg_path: ConfigOpt = Path("collector.toml"),
    by: Annotated[str, typer.Option(help="instrument | unit")] = "instrument",
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    lang: Annotated[str, typer.Option(help="en | zh (column names)")] = "en",
    tz: Annotated[str, typer.Option(help="Time zone for dates.")] = "Asia/Shanghai",
) -> None:
    """Run, effective and unknown hours, and coverage, per instrument or unit."""
    from labmeter.collector.ledger import Ledger
    from labmeter.collector.report import PeriodError, hours_report, parse_time, render

    if by not in ("instrument", "unit"):
        fail(f"--by {by!r}: use instrument or unit")
    if fmt not in ("table", "csv", "json"):
        fail(f"--format {fmt!r}: use table, csv or json")
    if lang not in ("en", "zh"):
        fail(f"--lang {lang!r}: use en or zh")
    cfg = load_collector(cfg_path)
    zone = ZoneInfo(tz)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    try:
        rows = hours_report(ledger, parse_time(start, zone), parse_time(end, zone, end=True), cfg.policy, by)
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    sys.stdout.write(render(rows, fmt, lang))


# broker, demo, sim ------------------------------------------------------------
@app.command("broker")
def broker(
    listen: Annotated[str, typer.Option(help="host:port to listen on.")] = "127.0.0.1:1883",
    verbose: Verbose = False,
) -> None:
    """Run the built-in MQTT broker on its own (the collector starts it itself when embedded = true)."""
    from labmeter.collector.broker import EmbeddedBroker

    log.setup(verbose)

    async def main(stop: asyncio.Event) -> None:
        b = EmbeddedBroker(listen)
        await b.start()
        await stop.wait()
        await b.stop()

    run_until_signal(main)


@app.command("demo")
def demo(
    duration: Annotated[
        float, typer.Option(help="Real seconds to run; a working day is compressed into them.")
    ] = 60,
    directory: Annotated[Path | None, typer.Option("--dir", help="Keep configs and data here.")] = None,
    port: Annotated[int, typer.Option(help="Port for the built-in broker.")] = 18830,
) -> None:
    """A simulated lab end to end: built-in broker, collector, agent, Modbus meter and Tasmota plug."""
    from labmeter.demo import run_demo

    log.setup(quiet=True)
    run_until_signal(lambda stop: run_demo(duration, directory, port, stop))


@app.command("sim", hidden=True)
def sim(spec_file: Path, verbose: Verbose = False) -> None:
    """Run simulated instruments from a TOML spec (for tests and benchmarks)."""
    from labmeter.clock import clock_from_env
    from labmeter.sim import run_sim

    log.setup(verbose)
    spec = tomllib.loads(spec_file.read_text(encoding="utf-8"))
    run_until_signal(lambda stop: run_sim(spec, clock_from_env(), stop))


def main() -> None:
    app()


def local(ms: int, tz: str = "Asia/Shanghai") -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")
