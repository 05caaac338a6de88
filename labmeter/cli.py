"""The ``labmeter`` command (click: small, and no heavy imports in a process that runs for years)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from labmeter import __version__, config, log, signing
from labmeter.statefile import StateFileError

if TYPE_CHECKING:
    from labmeter.agent.outbox import AgentStore
    from labmeter.collector.ledger import Ledger


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def config_option(default: str) -> Callable[[Any], Any]:
    return click.option(
        "--config",
        "-c",
        "cfg_path",
        type=click.Path(path_type=Path),
        default=default,
        show_default=True,
        help="Config file (TOML).",
    )


verbose_option = click.option("--verbose", "-v", is_flag=True, help="Debug logging.")


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


# (file, the command that checks it) of the state files this command opened: an SQLite error met later
# (a damaged page that the start-up checks do not read) is reported against them, not as a traceback
_opened: list[tuple[str, str]] = []


def open_store(cfg: config.AgentConfig, cfg_path: Path) -> AgentStore:
    """The agent's state file, or a one-line error naming it and the fix."""
    from labmeter.agent.outbox import AgentStore

    try:
        store = AgentStore(cfg.agent.state_dir / "agent.db")
    except StateFileError as exc:
        fail(exc.message(cfg_path))
    _opened.append((str(store.path), f"labmeter agent status --config {cfg_path}"))
    return store


def open_ledger(cfg: config.CollectorConfig, cfg_path: Path) -> Ledger:
    """The ledger, or a one-line error naming it and the fix."""
    from labmeter.collector.ledger import Ledger, LedgerError

    try:
        ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    except StateFileError as exc:
        fail(exc.message(cfg_path))
    except LedgerError as exc:
        fail(str(exc))
    _opened.append((ledger.name, f"labmeter collector check --config {cfg_path}"))
    return ledger


def zone_for(tz: str | None, cfg: config.CollectorConfig) -> ZoneInfo:
    """--tz if given, else the collector's [policy] timezone (the one its rollups use)."""
    try:
        return ZoneInfo(tz or cfg.policy.timezone)
    except (ValueError, ZoneInfoNotFoundError):
        fail(f"--tz {tz!r}: unknown time zone (e.g. Asia/Shanghai)")


SHUTDOWN_GRACE_S = 15.0


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a service until SIGINT or SIGTERM, then let it shut down cleanly.

    A shutdown that hangs (a library waiting on a dead socket) must not keep a
    service from stopping: after ``SHUTDOWN_GRACE_S``, or at a second signal, the
    process exits. Everything durable is already committed by then.
    """

    loop_ref: list[asyncio.AbstractEventLoop] = []

    def force_exit() -> None:
        logging.getLogger("labmeter").error(
            "shutdown took longer than %.0f s; exiting. Still running:", SHUTDOWN_GRACE_S
        )
        with contextlib.suppress(Exception):
            for task in asyncio.all_tasks(loop_ref[0]):
                task.print_stack(limit=4, file=sys.stderr)
        sys.stderr.flush()
        os._exit(70)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop_ref.append(loop)

        def on_signal() -> None:
            if stop.is_set():
                os._exit(130)
            stop.set()
            timer = threading.Timer(SHUTDOWN_GRACE_S, force_exit)
            timer.daemon = True
            timer.start()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await main(stop)

    asyncio.run(runner())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labmeter")
def app() -> None:
    """Verified machine hours for shared scientific instruments."""


@app.group("agent")
def agent_group() -> None:
    """Run and manage the agent beside the instruments."""


@app.group("collector")
def collector_group() -> None:
    """Run the collector and manage its registry."""


@app.group("report")
def report_group() -> None:
    """Reports from the ledger."""
    log.setup()  # progress, such as rebuilding rollups after allowances changed, goes to stderr


# agent ----------------------------------------------------------------------
@agent_group.command("enroll")
@config_option("agent.toml")
@click.option("--force", is_flag=True, help="Replace an existing key.")
def agent_enroll(cfg_path: Path, force: bool) -> None:
    """Create the agent's Ed25519 key (mode 0600) and print the command that registers it."""
    cfg = load_agent(cfg_path)
    try:
        key = signing.generate_key_file(cfg.agent.key_file, force=force)
    except signing.KeyFileError as exc:
        fail(str(exc))
    pub = signing.public_key_text(key.public_key())
    click.echo(f"key written to {cfg.agent.key_file} (mode 0600)")
    click.echo(f"public key: {pub}")
    inst = " ".join(f"--instrument {i.id}" for i in cfg.instrument)
    click.echo("register it on the collector with:")
    click.echo(f"  labmeter collector add-agent {cfg.agent.id} --key {pub} {inst}")


@agent_group.command("run")
@config_option("agent.toml")
@verbose_option
def agent_run(cfg_path: Path, verbose: bool) -> None:
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
        except StateFileError as exc:
            fail(exc.message(cfg_path))
        await agent.run(stop)

    run_until_signal(main)


@agent_group.command("probe")
@config_option("agent.toml")
@click.option("--instrument", help="Probe only this instrument.")
@click.option("--reads", type=int, default=3, show_default=True, help="Reads per instrument.")
def agent_probe(cfg_path: Path, instrument: str | None, reads: int) -> None:
    """Read each source a few times: raw value, power, state, and what is wrong if it fails."""
    from labmeter.agent.probe import probe

    log.setup(quiet=True)
    cfg = load_agent(cfg_path)
    if instrument and instrument not in {i.id for i in cfg.instrument}:
        fail(f"{cfg_path}: no instrument {instrument!r}")
    results = asyncio.run(probe(cfg, instrument, reads))
    for r in results:
        click.echo(f"{r.instrument}:")
        for line in r.lines:
            click.echo(f"  {line}")
        click.echo(f"  {'OK' if r.ok else 'PROBLEM'}: {r.diagnosis.removeprefix('OK: ')}")
    sys.exit(0 if all(r.ok for r in results) else 1)


@agent_group.command("calibrate")
@config_option("agent.toml")
@click.option("--instrument", required=True, help="The instrument to record.")
@click.option(
    "--minutes",
    type=float,
    default=10,
    show_default=True,
    help="How long to record; run the instrument through off, standby and a measurement meanwhile.",
)
@click.option("--write", is_flag=True, help="Write the suggested thresholds into the config (comments kept).")
def agent_calibrate(cfg_path: Path, instrument: str, minutes: float, write: bool) -> None:
    """Record power, find the off/standby/running levels and suggest thresholds."""
    from labmeter.agent.calibrate import find_levels, record, suggest, write_states

    log.setup(quiet=True)
    cfg = load_agent(cfg_path)
    inst = next((i for i in cfg.instrument if i.id == instrument), None)
    if inst is None:
        fail(f"{cfg_path}: no instrument {instrument!r}")
    click.echo(f"recording {instrument} for {minutes:g} min (every {inst.poll_s:g} s)...")
    values, errors = asyncio.run(record(cfg, inst, minutes * 60))
    click.echo(f"{len(values)} reading(s), {errors} failed")
    try:
        s = suggest(find_levels(values))
    except ValueError as exc:
        fail(str(exc), code=1)
    for name, level in zip(
        ("off", "standby", "running") if len(s.levels) == 3 else ("low", "high"), s.levels, strict=False
    ):
        click.echo(
            f"  {name:<8} {level.mean_w:9.1f} W  ({level.low_w:.1f}-{level.high_w:.1f} W, "
            f"{100 * level.share:.0f}% of the time)"
        )
    click.echo(
        f"suggested: off_below_w = {s.off_below_w:g}, run_above_w = {s.run_above_w:g}, "
        f"hysteresis_w = {s.hysteresis_w:g}"
    )
    if write:
        write_states(cfg_path, instrument, s)
        click.echo(f"written to {cfg_path}")


@agent_group.command("install")
@config_option("/etc/labmeter/agent.toml")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of installing it.")
@click.option(
    "--unit-dir", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"), show_default=True
)
@click.option("--no-enable", is_flag=True, help="Write the unit but do not enable and start it.")
def agent_install(cfg_path: Path, dry_run: bool, unit_dir: Path, no_enable: bool) -> None:
    """Validate the config, then write, enable and start the labmeter-agent systemd unit."""
    import shutil
    import subprocess
    from importlib import resources

    cfg = load_agent(cfg_path)
    if not cfg.agent.key_file.exists() and not dry_run:
        fail(f"{cfg.agent.key_file}: no key yet; run `labmeter agent enroll --config {cfg_path}` first")
    exe = shutil.which("labmeter") or str(Path(sys.argv[0]).resolve())
    unit = resources.files("labmeter.systemd").joinpath("labmeter-agent.service").read_text(encoding="utf-8")
    unit = unit.replace("/opt/labmeter/bin/labmeter", exe).replace(
        "/etc/labmeter/agent.toml", str(cfg_path.resolve())
    )
    if dry_run:
        click.echo(unit, nl=False)
        return
    target = unit_dir / "labmeter-agent.service"
    target.write_text(unit, encoding="utf-8")
    click.echo(f"written {target}")
    if not no_enable:
        for cmd in (
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "labmeter-agent.service"],
        ):
            if subprocess.run(cmd).returncode != 0:
                fail(f"`{' '.join(cmd)}` failed")
        click.echo("labmeter-agent enabled and started; `journalctl -u labmeter-agent -f` shows its log")


@agent_group.command("status")
@config_option("agent.toml")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_status(cfg_path: Path, as_json: bool) -> None:
    """Show the outbox: what waits for the collector's acknowledgement, what it rejected, and whether
    the state file is sound (PRAGMA integrity_check; exit status 1 if not)."""
    cfg = load_agent(cfg_path)
    store = open_store(cfg, cfg_path)
    problems = store.check(full=True)
    summary = store.summary()
    store.close()
    if as_json:
        click.echo(json.dumps({**summary, "integrity": problems or "ok"}, indent=2))
        sys.exit(1 if problems else 0)
    chain = summary["chain"]
    pending = summary["pending"]
    dead = summary["dead"]
    assert isinstance(chain, dict) and isinstance(pending, dict) and isinstance(dead, list)
    click.echo(f"agent {cfg.agent.id}")
    for inst in cfg.instrument:
        p = pending.get(inst.id)
        waiting = f"{p['count']} waiting for acknowledgement" if p else "all acknowledged"
        c = chain.get(inst.id)
        if c is None:
            emitted = "nothing emitted yet"
        else:  # a chain that began at the clock says when; one from an older version began at seq 1
            since = datetime.fromtimestamp(c["first"] / 1000) if c["first"] > 1 else None
            emitted = f"{c['seq'] - c['first'] + 1} interval(s) emitted" + (
                f" since {since:%Y-%m-%d %H:%M}" if since else ""
            )
        click.echo(f"  {inst.id}: {emitted}, {waiting}")
    if dead:
        click.echo(f"rejected by the collector ({len(dead)}); fix the cause, then `labmeter agent resend`:")
        for d in dead[-20:]:
            click.echo(f"  {d['instrument']} seq {d['seq']}: {d['reason']}")
    path = cfg.agent.state_dir / "agent.db"
    if problems:
        click.echo(f"state file {path}: DAMAGED (integrity_check: {'; '.join(problems)})")
        click.echo(f"  restore it from a backup, or: labmeter agent reset-state --config {cfg_path}")
        sys.exit(1)
    click.echo(f"state file {path}: OK (integrity_check)")


@agent_group.command("resend")
@config_option("agent.toml")
def agent_resend(cfg_path: Path) -> None:
    """Put rejected messages back in the outbox, once their cause is fixed."""
    cfg = load_agent(cfg_path)
    store = open_store(cfg, cfg_path)
    n = store.resend_dead()
    store.close()
    click.echo(f"{n} message(s) queued again")


@agent_group.command("reset-state")
@config_option("agent.toml")
@click.option(
    "--force", is_flag=True, help="Also when the file is sound: its unacknowledged intervals are lost."
)
def agent_reset_state(cfg_path: Path, force: bool) -> None:
    """Move a damaged state file (agent.db) aside, so that the next start begins new chains.

    Stop the agent first. The old file stays beside the new one, renamed agent.db.damaged-<UTC time>.
    """
    from labmeter.agent.outbox import AgentStore

    cfg = load_agent(cfg_path)
    path = cfg.agent.state_dir / "agent.db"
    problem = _reset_precheck(
        path, force, lambda: AgentStore(path), lambda s: s.pending_count(), "interval(s) not yet acknowledged"
    )
    target = _move_aside(path)
    click.echo(f"moved {path} to {target} ({problem})")
    click.echo(
        "the next `labmeter agent run` starts new chains above the old seqs; what the old file held "
        "that the collector had not acknowledged is not sent (the collector reports that time as no data)"
    )


def _reset_precheck(
    path: Path, force: bool, opener: Callable[[], Any], held: Callable[[Any], int], what: str
) -> str:
    """Why ``path`` may be moved aside (damaged, or --force); fails when it is absent, in use or sound."""
    from labmeter import statefile

    if not path.exists():
        fail(f"{path} does not exist: nothing to reset (the next start creates it)", code=1)
    if statefile.in_use(path):
        fail(f"{path} is open in another process: stop the service first", code=1)
    try:
        store = opener()
    except StateFileError as exc:
        return exc.problem
    try:
        problems = store.check(full=True)
        n = held(store)
    except Exception as exc:  # damage that integrity_check itself trips over
        return f"unreadable: {exc}"
    finally:
        store.close()
    if problems:
        return "damaged: " + "; ".join(problems)
    if not force:
        fail(f"{path} is sound ({n} {what}); nothing to reset. --force moves it aside anyway", code=1)
    return f"sound, moved with --force; it held {n} {what}"


def _move_aside(path: Path) -> Path:
    from labmeter import statefile

    try:
        return statefile.move_aside(path)
    except OSError as exc:
        fail(f"cannot move {path} aside: {exc.strerror or exc}")


# collector ------------------------------------------------------------------
@collector_group.command("run")
@config_option("collector.toml")
@verbose_option
def collector_run(cfg_path: Path, verbose: bool) -> None:
    """Receive, verify and store intervals (starts the built-in broker if [broker] embedded = true)."""
    from labmeter.clock import clock_from_env
    from labmeter.collector.service import Collector

    log.setup(verbose)
    cfg = load_collector(cfg_path)

    async def main(stop: asyncio.Event) -> None:
        from labmeter.collector.ledger import LedgerError

        try:
            collector = Collector(cfg, clock_from_env())
        except StateFileError as exc:
            fail(exc.message(cfg_path))
        except LedgerError as exc:
            fail(str(exc))
        await collector.run(stop)

    run_until_signal(main)


@collector_group.command("check")
@config_option("collector.toml")
@click.option("--quick", is_flag=True, help="SQLite: PRAGMA quick_check (O(N)) instead of integrity_check.")
def collector_check(cfg_path: Path, quick: bool) -> None:
    """Check the config, the ledger (SQLite: PRAGMA integrity_check; PostgreSQL: connection and schema)
    and the collector's key; exit status 1 if anything is wrong.

    On PostgreSQL the pages themselves are not read: that is the server's job (initdb --data-checksums,
    pg_amcheck).
    """
    import time

    from labmeter.collector.ledger import Ledger, LedgerError

    cfg = load_collector(cfg_path)
    click.echo(f"config  {cfg_path}: OK")
    ok = True
    url = cfg.collector.ledger
    path = Ledger.sqlite_path(url, cfg.collector.data_dir)
    name = str(path) if path else url.split("@")[-1]
    if path is not None and not path.exists():
        click.echo(f"ledger  {path}: not created yet (the first `collector run` or `add-agent` creates it)")
    else:
        try:
            t0 = time.monotonic()
            ledger = Ledger.open(url, cfg.collector.data_dir)
            try:
                problems = ledger.check(full=not quick)
                counts = ledger.counts()
                settings = ledger.server_settings()
            finally:
                ledger.close()
            how = ("quick_check" if quick else "integrity_check") if path else "connection and schema"
            took = time.monotonic() - t0
        except StateFileError as exc:
            problems, how, settings = [exc.problem], "", {}
        except LedgerError as exc:
            problems, how, settings = [str(exc)], "", {}
        except Exception as exc:  # damage that the check itself trips over
            problems, how, settings = [f"damaged: {exc}"], "", {}
        if problems:
            ok = False
            label = "DAMAGED" if path is not None else "PROBLEM"
            click.echo(f"ledger  {name}: {label} {'(' + how + ') ' if how else ''}{'; '.join(problems)}")
            if path is not None:
                click.echo(
                    f"  restore it from a backup, or: labmeter collector reset-ledger --config {cfg_path}"
                )
        else:
            click.echo(
                f"ledger  {name}: OK ({how}, {took:.1f} s; {counts['agents']} agent(s), "
                f"{counts['instruments']} instrument(s), {counts['intervals']} interval(s), "
                f"{counts['rejections']} rejection(s))"
            )
        if path is None and settings:
            click.echo(
                f"  PostgreSQL {settings['server_version']}: fsync {settings['fsync']}, synchronous_commit "
                f"{settings['synchronous_commit']}, data_checksums {settings['data_checksums']}; not checked "
                "here: the server's pages (initdb --data-checksums, pg_amcheck)"
            )
    key_path = cfg.collector.key_path
    if not key_path.exists():
        click.echo(f"key     {key_path}: not created yet (the first `collector run` creates it)")
    else:
        try:
            key = signing.load_private_key(key_path)
            click.echo(f"key     {key_path}: OK (agents pin {signing.public_key_text(key.public_key())})")
        except signing.KeyFileError as exc:
            ok = False
            click.echo(f"key     {exc}")
    sys.exit(0 if ok else 1)


@collector_group.command("reset-ledger")
@config_option("collector.toml")
@click.option("--force", is_flag=True, help="Also when the ledger is sound: everything in it is set aside.")
def collector_reset_ledger(cfg_path: Path, force: bool) -> None:
    """Move a damaged SQLite ledger aside, so that the next start begins an empty one.

    Stop the collector first. The old file stays beside the new one, renamed ledger.sqlite.damaged-<UTC time>.
    """
    from labmeter.collector.ledger import Ledger

    cfg = load_collector(cfg_path)
    path = Ledger.sqlite_path(cfg.collector.ledger, cfg.collector.data_dir)
    if path is None:
        fail(
            "the ledger is on PostgreSQL, not in a file: restore it with pg_restore, or drop and "
            "create the database yourself (docs/deploy.md)",
            code=1,
        )
    problem = _reset_precheck(
        path, force, lambda: Ledger(path), lambda s: s.counts()["intervals"], "interval(s)"
    )
    target = _move_aside(path)
    click.echo(f"moved {path} to {target} ({problem})")
    click.echo(
        "the next start creates an empty ledger: register the agents again (`labmeter collector add-agent`) "
        "and import the instruments; agents then resend what they still hold unacknowledged"
    )


@collector_group.command("add-agent")
@click.argument("agent_id")
@click.option("--key", required=True, help="Public key printed by `labmeter agent enroll` (ed25519:...).")
@click.option(
    "--instrument",
    "instruments",
    multiple=True,
    required=True,
    help="Instrument code this agent measures (repeat).",
)
@config_option("collector.toml")
@click.option(
    "--mosquitto-dir",
    type=click.Path(path_type=Path),
    help="Also create the agent's broker account here (passwd, acl, secrets/ID.pass).",
)
def collector_add_agent(
    agent_id: str, key: str, instruments: tuple[str, ...], cfg_path: Path, mosquitto_dir: Path | None
) -> None:
    """Register an agent's public key and the instruments it may report."""
    from labmeter.wire import ID_RE

    cfg = load_collector(cfg_path)
    for name in [agent_id, *instruments]:
        if not ID_RE.match(name):
            fail(f"{name!r}: ids use letters, digits, '.', '_' and '-' only (at most 64)")
    try:
        pub = signing.parse_public_key(key)
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = open_ledger(cfg, cfg_path)
    ledger.add_agent(agent_id, key, signing.key_id(pub), instruments)
    ledger.close()
    click.echo(f"agent {agent_id} registered for {', '.join(instruments)}")
    if mosquitto_dir is not None:
        _broker_account(mosquitto_dir, agent_id, "agent")


def _broker_account(directory: Path, user: str, role: str) -> None:
    from labmeter.collector.mosquitto import add_account

    secret, block = add_account(directory, user, role)
    click.echo(
        f"broker account {user}: password in {secret} (mode 0600; copy it to the {role}'s password_file)"
    )
    click.echo(f"ACL lines in {directory / 'acl'}:")
    click.echo("".join(f"  {line}\n" for line in block.splitlines()).rstrip())
    click.echo("reload Mosquitto to apply: systemctl reload mosquitto (or kill -HUP)")


@collector_group.command("broker-user")
@click.argument("user")
@click.option(
    "--mosquitto-dir", required=True, type=click.Path(path_type=Path), help="Where passwd and acl live."
)
@click.option("--role", type=click.Choice(["collector", "agent"]), default="collector", show_default=True)
def collector_broker_user(user: str, mosquitto_dir: Path, role: str) -> None:
    """Create a Mosquitto account (the collector's own, usually): password line, ACL block, secret file."""
    _broker_account(mosquitto_dir, user, role)


@collector_group.command("import-instruments")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@config_option("collector.toml")
def collector_import(file: Path, cfg_path: Path) -> None:
    """Add or update instruments from a CSV or XLSX sheet (all rows or none).

    Columns (English or Chinese headers): code 仪器编号, name 仪器名称, unit 管理单位, department 所在部门,
    category 分类编码 (6 digits), kind 仪器类型 (general 通用 / special 专用), value_wan 原值（万元）,
    rated_hours 定额机时, share_mode 共享模式.
    """
    from labmeter.collector.registry import ImportError_, import_instruments

    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        n = import_instruments(ledger, file)
    except ImportError_ as exc:
        fail(str(exc))
    finally:
        ledger.close()
    click.echo(f"{n} instrument(s) imported")


@collector_group.command("import-services")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--instrument", help="Instrument the file is about (for a per-instrument sheet or calendar).")
@config_option("collector.toml")
@click.option("--tz", help="Time zone of times without one (default: the config's [policy] timezone).")
def collector_import_services(file: Path, instrument: str | None, cfg_path: Path, tz: str | None) -> None:
    """Import service records (bookings, usage logs) from CSV, XLSX or iCalendar (all rows or none).

    Columns: instrument 仪器编号, start 开始时间, end 结束时间, applicant 申请人, applicant_unit 申请单位,
    service_type 服务类型 (120 internal 对内 / 130 external 对外), direction 服务方向 (135-138), amount 金额.
    A record identical to one already imported (instrument, start, end, applicant) is skipped.
    """
    from labmeter.collector.registry import ImportError_, import_services

    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        res = import_services(ledger, file, zone_for(tz, cfg), instrument)
    except ImportError_ as exc:
        fail(str(exc))
    finally:
        ledger.close()
    click.echo(f"{res.added} service record(s) imported, {res.duplicates} already present")


# report ---------------------------------------------------------------------
@report_group.command("hours")
@click.option("--from", "start", required=True, help="First day (2026-01-01) or time, local.")
@click.option("--to", "end", required=True, help="Last day (inclusive) or end time, local.")
@config_option("collector.toml")
@click.option(
    "--by",
    type=click.Choice(["instrument", "unit", "category", "month"]),
    default="instrument",
    show_default=True,
    help="Grouping (XLSX has a sheet for each).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json", "xlsx"]), default="table", show_default=True
)
@click.option(
    "--output", "-o", "out", type=click.Path(path_type=Path), help="File to write (needed for xlsx)."
)
@click.option(
    "--lang",
    type=click.Choice(["zh", "en"]),
    default="zh",
    show_default=True,
    help="Language of the column names.",
)
@click.option("--tz", help="Time zone for days and months (default: the config's [policy] timezone).")
def report_hours(
    start: str, end: str, cfg_path: Path, by: str, fmt: str, out: Path | None, lang: str, tz: str | None
) -> None:
    """Run, effective, service and external hours, utilisation, sharing rate and coverage."""
    from labmeter.collector.report import (
        GROUPINGS,
        PeriodError,
        hours_report,
        hours_reports,
        parse_time,
        render,
        write_xlsx,
    )

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    if fmt == "xlsx" and out is None:
        fail("--format xlsx needs --output FILE.xlsx")
    ledger = open_ledger(cfg, cfg_path)
    try:
        a, b = parse_time(start, zone), parse_time(end, zone, end=True)
        if fmt == "xlsx":
            assert out is not None
            write_xlsx(out, hours_reports(ledger, a, b, cfg.policy, GROUPINGS, zone), lang)
            click.echo(f"written {out}")
            return
        text = render(hours_report(ledger, a, b, cfg.policy, by, zone), fmt, lang, by)
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if out is not None:
        out.write_text(text, encoding="utf-8")
        click.echo(f"written {out}")
    else:
        sys.stdout.write(text)


@report_group.command("national")
@click.option("--year", type=int, required=True, help="Calendar year (local time).")
@click.option(
    "--output", "-o", "out", required=True, type=click.Path(path_type=Path), help="FILE.json or FILE.xlsx"
)
@config_option("collector.toml")
@click.option("--tz", help="Time zone for days and months (default: the config's [policy] timezone).")
def report_national(year: int, out: Path, cfg_path: Path, tz: str | None) -> None:
    """National sharing-platform export: runMachine and serviceMachine per instrument, and service records."""
    from labmeter.collector.national import national_export, write_national

    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        data = national_export(ledger, year, cfg.policy, zone_for(tz, cfg))
    finally:
        ledger.close()
    write_national(data, out)
    click.echo(
        f"{len(data['instruments'])} instrument(s), {len(data['serviceRecords'])} service record(s) -> {out}"
    )


@report_group.command("findings")
@click.option("--from", "start", required=True, help="First day (2026-01-01) or time, local.")
@click.option("--to", "end", required=True, help="Last day (inclusive) or end time, local.")
@config_option("collector.toml")
@click.option(
    "--low-use",
    "low_use",
    type=float,
    default=50,
    show_default=True,
    help="List instruments under this share (%) of their rated hours.",
)
@click.option(
    "--min-coverage",
    type=float,
    default=90,
    show_default=True,
    help="List instruments whose state is known for less than this share (%) of the period.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tz", help="Time zone for days and months (default: the config's [policy] timezone).")
def report_findings(
    start: str, end: str, cfg_path: Path, low_use: float, min_coverage: float, as_json: bool, tz: str | None
) -> None:
    """Instruments to act on: low use, poor coverage (agents down, unknown time), no data at all."""
    from labmeter.collector.national import findings
    from labmeter.collector.report import PeriodError, parse_time

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    ledger = open_ledger(cfg, cfg_path)
    try:
        res = findings(
            ledger,
            parse_time(start, zone),
            parse_time(end, zone, end=True),
            cfg.policy,
            low_use,
            min_coverage,
        )
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps(res, ensure_ascii=False, indent=2))
        return
    titles = {
        "low_use": f"Low use (< {low_use:g}% of rated hours) 低使用率",
        "poor_coverage": f"Poor coverage (< {min_coverage:g}% known) 数据覆盖不足",
        "no_data": "No data 无数据",
    }
    for key, title in titles.items():
        click.echo(f"{title}: {len(res[key])}")
        for item in res[key]:
            extra = ", ".join(f"{k} {v}" for k, v in item.items() if k not in ("instrument", "name", "unit"))
            click.echo(f"  {item['instrument']}  {item['name']}  {item['unit']}  {extra}")


@report_group.command("evidence")
@click.option("--instrument", required=True, help="Instrument code.")
@click.option("--from", "start", required=True, help="First day (2026-01-01) or time, local.")
@click.option("--to", "end", required=True, help="Last day (inclusive) or end time, local.")
@click.option(
    "--output", "-o", "out", required=True, type=click.Path(path_type=Path), help="Folder to write."
)
@config_option("collector.toml")
@click.option("--tz", help="Time zone for dates (default: the config's [policy] timezone).")
def report_evidence(instrument: str, start: str, end: str, out: Path, cfg_path: Path, tz: str | None) -> None:
    """Write the signed intervals and public keys behind an instrument's hours, for `labmeter verify`."""
    from labmeter.collector.evidence import write_bundle
    from labmeter.collector.report import PeriodError, parse_time
    from labmeter.collector.rollup import allowances_ms

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    ledger = open_ledger(cfg, cfg_path)
    try:
        a, b = parse_time(start, zone), parse_time(end, zone, end=True)
        info = next((i for i in ledger.instruments() if i["code"] == instrument), {})
        prep_ms, post_ms = allowances_ms(info, cfg.policy)
        bundle = write_bundle(ledger, instrument, a, b, prep_ms // 1000, post_ms // 1000, out)
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if not bundle["intervals"]:
        fail(f"no intervals for instrument {instrument!r} in that period", code=1)
    click.echo(
        f"{bundle['intervals']} signed interval(s) written to {out}; check with: labmeter verify {out}"
    )


@app.command("verify")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
def verify(folder: Path) -> None:
    """Re-check an evidence bundle: signatures, chain, contiguity, and the claimed hours."""
    from labmeter.verify import BundleError, H, verify_bundle

    try:
        res = verify_bundle(folder)
    except BundleError as exc:
        fail(str(exc))
    for r in res.restarts:
        click.echo(f"new chain   {r}")
    for f in res.findings:
        click.echo(f"DISCREPANCY {f}")
    for key in ("run_ms", "effective_ms", "unknown_ms", "unverified_ms", "uncovered_ms"):
        click.echo(
            f"{key.removesuffix('_ms'):>11}: claimed {res.claimed.get(key, 0) / H:10.3f} h, "
            f"recomputed {res.recomputed.get(key, 0) / H:10.3f} h"
        )
    if res.ok:
        click.echo(f"OK: {res.checked} signed interval(s) check out and the hours match")
    else:
        click.echo(f"FAILED: {len(res.findings)} discrepancy(ies) in {res.checked} interval(s)")
        sys.exit(1)


# broker, demo, sim ------------------------------------------------------------
@app.command("broker")
@click.option("--listen", default="127.0.0.1:1883", show_default=True, help="host:port to listen on.")
@verbose_option
def broker(listen: str, verbose: bool) -> None:
    """Run the built-in MQTT broker on its own (the collector starts it itself when embedded = true)."""
    from labmeter.collector.broker import EmbeddedBroker
    from labmeter.netutil import split_listen

    try:
        split_listen(listen)
    except ValueError as exc:
        fail(f"--listen: {exc}")
    log.setup(verbose)

    async def main(stop: asyncio.Event) -> None:
        b = EmbeddedBroker(listen)
        await b.start()
        await stop.wait()
        await b.stop()

    run_until_signal(main)


@app.command("demo")
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
    from labmeter.demo import run_demo

    log.setup(quiet=True)
    run_until_signal(lambda stop: run_demo(duration, directory, port, stop))


@app.command("top")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The collector's live view.")
@click.option("--token", envvar="LABMETER_TOKEN", help="Token, when the live view needs one.")
@click.option("--every", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print once and exit.")
def top(url: str, token: str | None, every: float, once: bool) -> None:
    """Live instrument states in the terminal (reads the collector's JSON API)."""
    from labmeter.top import run_top

    sys.exit(run_top(url, token, every, once))


@app.command("sim", hidden=True)
@click.argument("spec_file", type=click.Path(path_type=Path))
@verbose_option
def sim(spec_file: Path, verbose: bool) -> None:
    """Run simulated instruments from a TOML spec (for tests and benchmarks)."""
    from labmeter.clock import clock_from_env
    from labmeter.sim import run_sim

    log.setup(verbose)
    spec = tomllib.loads(spec_file.read_text(encoding="utf-8"))
    run_until_signal(lambda stop: run_sim(spec, clock_from_env(), stop))


def main() -> None:
    import sqlite3

    try:
        app()
    except sqlite3.DatabaseError as exc:
        where, check = _opened[-1] if _opened else ("a state file", "labmeter collector check")
        what = str(exc) if isinstance(exc, sqlite3.OperationalError) else f"damaged ({exc})"
        fail(f"{where}: {what}; `{check}` checks it and says what to do")
