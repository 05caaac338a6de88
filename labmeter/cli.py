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
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from labmeter import __version__, config, log, signing, winsys
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
    from labmeter.drivers.registry import agent_config

    try:
        return config.load(path, agent_config())
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
T = TypeVar("T")


def run_once(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with the event loop the agent uses on this platform (``winsys.loop_factory``)."""
    with asyncio.Runner(loop_factory=winsys.loop_factory()) as runner:
        return runner.run(coro)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a service until SIGINT or SIGTERM (Windows: Ctrl-C or Ctrl-Break), then let it shut down cleanly.

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

        if winsys.WINDOWS:  # no add_signal_handler there: Ctrl-C, Ctrl-Break and closing the console
            winsys.on_console_stop(lambda: loop.call_soon_threadsafe(on_signal), done)
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
        await main(stop)

    done = threading.Event()  # a closed console window waits for this (Windows)
    try:
        with asyncio.Runner(loop_factory=winsys.loop_factory()) as r:
            r.run(runner())
    finally:
        done.set()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labmeter")
def app() -> None:
    """Verified machine hours for shared scientific instruments."""


@app.group("agent")
def agent_group() -> None:
    """Run and manage the agent beside the instruments."""


COLLECTOR_DEPS = ("aiohttp", "amqtt", "openpyxl", "icalendar", "influxdb_client")


def need_collector_deps() -> None:
    """The collector's libraries come with the ``collector`` extra; an agent-only install has none of them."""
    from importlib.util import find_spec

    missing = [m for m in COLLECTOR_DEPS if find_spec(m) is None]
    if missing:
        fail(
            f"this command needs the collector's dependencies ({', '.join(missing)} missing): "
            "pip install 'labmeter[collector]'"
        )


@app.group("collector")
def collector_group() -> None:
    """Run the collector and manage its registry."""
    need_collector_deps()


@app.group("report")
def report_group() -> None:
    """Reports from the ledger."""
    need_collector_deps()
    log.setup()  # progress, such as rebuilding rollups after allowances changed, goes to stderr


# agent ----------------------------------------------------------------------
@agent_group.command("enroll")
@config_option("agent.toml")
@click.option("--force", is_flag=True, help="Replace an existing key.")
@click.option(
    "--collector-key",
    help="The collector's public key (ed25519:..., from `labmeter collector key`): pinned in the config.",
)
def agent_enroll(cfg_path: Path, force: bool, collector_key: str | None) -> None:
    """Create the agent's Ed25519 key (mode 0600; on Windows an ACL) and print the command that registers it.

    With --collector-key, also pin the collector's key ([agent] collector_key in the config), so the agent
    obeys only acknowledgements that collector signed.
    """
    cfg = load_agent(cfg_path)
    if collector_key is not None:
        try:
            collector_key = signing.public_key_text(signing.parse_public_key(collector_key))
        except signing.KeyFileError as exc:
            fail(f"--collector-key: {exc}")
    if cfg.agent.key_file.exists() and not force and collector_key is not None:
        click.echo(f"key {cfg.agent.key_file} exists; kept")
        key = None
    else:
        try:
            key = signing.generate_key_file(cfg.agent.key_file, force=force)
        except signing.KeyFileError as exc:
            fail(str(exc))
    if collector_key is not None:
        _pin_collector_key(cfg_path, collector_key)
    if key is None:
        return
    pub = signing.public_key_text(key.public_key())
    protection = "readable by SYSTEM, Administrators and you only" if winsys.WINDOWS else "mode 0600"
    click.echo(f"key written to {cfg.agent.key_file} ({protection})")
    click.echo(f"public key: {pub}")
    inst = " ".join(f"--instrument {i.id}" for i in cfg.instrument)
    click.echo("register it on the collector with:")
    click.echo(f"  labmeter collector add-agent {cfg.agent.id} --key {pub} {inst}")


def _pin_collector_key(cfg_path: Path, key_text: str) -> None:
    """Write ``[agent] collector_key`` into the agent's config, keeping its comments."""
    import tomlkit

    doc = tomlkit.parse(cfg_path.read_text(encoding="utf-8"))
    section = doc.get("agent")
    if not isinstance(section, dict):
        fail(f"{cfg_path}: no [agent] table")
    section["collector_key"] = key_text
    cfg_path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    fingerprint = signing.key_id(signing.parse_public_key(key_text))
    click.echo(f"collector key {fingerprint} pinned in {cfg_path}:")
    click.echo(f'  [agent] collector_key = "{key_text}"')


@agent_group.command("run")
@config_option("agent.toml")
@verbose_option
def agent_run(cfg_path: Path, verbose: bool) -> None:
    """Poll the instruments and send signed intervals to the collector."""
    log.setup(verbose)
    cfg = load_agent(cfg_path)
    from labmeter.agent.runtime import run_agent

    try:
        run_until_signal(lambda stop: run_agent(cfg, stop))
    except (config.ConfigError, signing.KeyFileError) as exc:
        fail(str(exc))
    except StateFileError as exc:
        fail(exc.message(cfg_path))


@agent_group.command("probe")
@config_option("agent.toml")
@click.option("--instrument", help="Probe only this instrument (and not the broker link).")
@click.option("--reads", type=int, default=3, show_default=True, help="Reads per instrument.")
def agent_probe(cfg_path: Path, instrument: str | None, reads: int) -> None:
    """Read each source a few times: raw value, power, state, and what is wrong if it fails; then the
    agent's own broker link. Exit status 1 when anything is not OK."""
    from labmeter.agent.probe import probe

    log.setup(quiet=True)
    cfg = load_agent(cfg_path)
    if instrument and instrument not in {i.id for i in cfg.instrument}:
        fail(f"{cfg_path}: no instrument {instrument!r}")
    results = run_once(probe(cfg, instrument, reads, link=instrument is None))
    for r in results:
        click.echo(f"{r.instrument}:")
        for line in r.lines:
            click.echo(f"  {line}")
        click.echo(f"  {r.verdict}: {r.diagnosis}")
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
    import time

    from labmeter.agent.calibrate import Progress, find_levels, record, suggest, write_states

    log.setup(quiet=True)
    cfg = load_agent(cfg_path)
    inst = next((i for i in cfg.instrument if i.id == instrument), None)
    if inst is None:
        fail(f"{cfg_path}: no instrument {instrument!r}")
    click.echo(f"recording {instrument} for {minutes:g} min (every {inst.poll_s:g} s)...")
    tty = sys.stdout.isatty()
    shown = [-1e9]

    def show(p: Progress) -> None:  # in place twice a second on a terminal, else a line every 15 s
        now = time.monotonic()
        if now - shown[0] < (0.5 if tty else 15.0):
            return
        shown[0] = now
        click.echo(f"\r  {p.line()}\x1b[K" if tty else f"  {p.line()}", nl=not tty)

    values, errors = run_once(record(cfg, inst, minutes * 60, show))
    if tty:
        click.echo()
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
@config_option(str(winsys.program_data() / "agent.toml") if winsys.WINDOWS else "/etc/labmeter/agent.toml")
@click.option("--dry-run", is_flag=True, help="Print the unit instead of installing it.")
@click.option(
    "--unit-dir", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"), show_default=True
)
@click.option("--no-enable", is_flag=True, help="Write the unit but do not enable and start it.")
@click.option(
    "--exe",
    type=click.Path(path_type=Path),
    help="The labmeter executable the unit runs (default: the one on PATH, e.g. a venv's bin/labmeter).",
)
def agent_install(cfg_path: Path, dry_run: bool, unit_dir: Path, no_enable: bool, exe: Path | None) -> None:
    """Validate the config, then write, enable and start the labmeter-agent systemd unit
    (on Windows: register and start the labmeter-agent service)."""
    import shutil
    import subprocess
    from importlib import resources

    cfg = load_agent(cfg_path)
    if winsys.WINDOWS:
        _windows_install(cfg_path, cfg, dry_run, no_enable)
        return
    program = str(exe) if exe else shutil.which("labmeter") or str(Path(sys.argv[0]).resolve())
    unit = resources.files("labmeter.systemd").joinpath("labmeter-agent.service").read_text(encoding="utf-8")
    unit = unit.replace("/opt/labmeter/bin/labmeter", program).replace(
        "/etc/labmeter/agent.toml", str(cfg_path.resolve())
    )
    _check_sandbox(unit, cfg_path, cfg, program)
    if not cfg.agent.key_file.exists() and not dry_run:
        fail(f"{cfg.agent.key_file}: no key yet; run `labmeter agent enroll --config {cfg_path}` first")
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


def _check_sandbox(unit: str, cfg_path: Path, cfg: config.AgentConfig, exe: str) -> None:
    """Refuse a config whose files the unit's sandbox hides or keeps read-only (the agent logs to the
    journal, so there is no log file to check)."""
    from pathlib import PurePosixPath

    from labmeter import sandbox

    def real(p: Path | str) -> PurePosixPath:
        return PurePosixPath(os.path.realpath(p))

    reads = [("--config", real(cfg_path)), ("the labmeter executable", real(exe))]
    reads.append(("[agent] key_file", real(cfg.agent.key_file)))
    brokers: list[tuple[str, config.BrokerConfig]] = [("[broker]", cfg.broker)]
    for i in cfg.instrument:
        own = getattr(i.source, "broker", None)  # a source with its own broker (mqtt plugs)
        if isinstance(own, config.BrokerConfig):
            brokers.append((f"instrument {i.id} [instrument.source.broker]", own))
    for where, b in brokers:
        for name in ("password_file", "ca_file", "cert_file", "key_file"):
            value = getattr(b, name)
            if value is not None:
                reads.append((f"{where} {name}", real(value)))
    if cfg.profiles_dir is not None:
        reads.append(("profiles_dir", real(cfg.profiles_dir)))
    found = sandbox.problems(
        sandbox.parse_unit(unit), reads, [("[agent] state_dir", real(cfg.agent.state_dir))]
    )
    if found:
        fail(
            f"{cfg_path}: the labmeter-agent unit (ProtectSystem=strict, ProtectHome, PrivateTmp) would not "
            "start with this config:\n  " + "\n  ".join(found)
        )


def _windows_install(cfg_path: Path, cfg: config.AgentConfig, dry_run: bool, no_start: bool) -> None:
    from labmeter.agent import winservice

    try:
        signing.load_private_key(cfg.agent.key_file)
    except signing.KeyFileError as exc:
        fail(f"{exc}; run `labmeter agent enroll --config {cfg_path}` first")
    command = winsys.service_command(sys.executable, cfg_path.resolve())
    if dry_run:
        click.echo(f"service {winsys.SERVICE_NAME}: {command}")
        return
    try:
        winservice.install(command, start=not no_start)
    except winservice.ServiceError as exc:
        fail(str(exc))
    click.echo(f"service {winsys.SERVICE_NAME} installed (automatic start, restarted on failure): {command}")
    if not no_start:
        click.echo(
            f"started; its log is {cfg.agent.state_dir / 'agent.log'}, `sc query {winsys.SERVICE_NAME}`"
        )


@agent_group.command("uninstall")
@config_option(str(winsys.program_data() / "agent.toml") if winsys.WINDOWS else "/etc/labmeter/agent.toml")
def agent_uninstall(cfg_path: Path) -> None:
    """Stop and remove the labmeter-agent service (Windows) or systemd unit; key and state are kept."""
    if winsys.WINDOWS:
        from labmeter.agent import winservice

        try:
            winservice.uninstall()
        except winservice.ServiceError as exc:
            fail(str(exc))
        click.echo(f"service {winsys.SERVICE_NAME} stopped and removed; key and state are kept")
        return
    import subprocess

    subprocess.run(["systemctl", "disable", "--now", "labmeter-agent.service"])
    unit = Path("/etc/systemd/system/labmeter-agent.service")
    with contextlib.suppress(FileNotFoundError):
        unit.unlink()
    subprocess.run(["systemctl", "daemon-reload"])
    click.echo("labmeter-agent disabled and removed; key and state are kept")


@agent_group.command("service", hidden=True)
@config_option(str(winsys.program_data() / "agent.toml"))
def agent_service(cfg_path: Path) -> None:
    """What the Windows service control manager starts (registered by `agent install`)."""
    if not winsys.WINDOWS:
        fail("`agent service` is the Windows service's entry point; on Linux use `agent run` under systemd")
    from labmeter.agent import winservice

    winservice.host(cfg_path)


@agent_group.command("status")
@config_option("agent.toml")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_status(cfg_path: Path, as_json: bool) -> None:
    """Show the outbox: what waits for the collector's acknowledgement, what it rejected, and whether
    the state file is sound (PRAGMA integrity_check; exit status 1 if not)."""
    from labmeter.agent.control import load_pin

    cfg = load_agent(cfg_path)
    store = open_store(cfg, cfg_path)
    problems = store.check(full=True)
    summary = store.summary()
    store.close()
    try:
        pin = load_pin(cfg.agent)
        summary["collector_key"] = (
            {"fingerprint": pin.fingerprint, "key": pin.text, "source": pin.source} if pin else None
        )
        pinned = (
            f"collector key {pin.fingerprint}, pinned from {pin.source}"
            if pin
            else "collector key: not pinned yet (the first signed acknowledgement will pin one)"
        )
    except signing.KeyFileError as exc:
        summary["collector_key"] = {"error": str(exc)}
        pinned = f"collector key: {exc}"
    if as_json:
        click.echo(json.dumps({**summary, "integrity": problems or "ok"}, indent=2))
        sys.exit(1 if problems else 0)
    chain = summary["chain"]
    pending = summary["pending"]
    dead = summary["dead"]
    assert isinstance(chain, dict) and isinstance(pending, dict) and isinstance(dead, list)

    def local(ts: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
        """Local time with its UTC offset, as in the agent's log."""
        return datetime.fromtimestamp(ts).astimezone().strftime(f"{fmt} %z")

    click.echo(f"agent {cfg.agent.id} (times are local, {datetime.now().astimezone():UTC%z})")
    click.echo(f"  {pinned}")
    for inst in cfg.instrument:
        p = pending.get(inst.id)
        waiting = (
            f"{p['count']} waiting for acknowledgement (oldest from {local(p['oldest'])})"
            if p
            else "all acknowledged"
        )
        c = chain.get(inst.id)
        if c is None:
            emitted = "nothing emitted yet"
        else:  # a chain that began at the clock says when; one from an older version began at seq 1
            emitted = f"{c['seq'] - c['first'] + 1} interval(s) emitted" + (
                f" since {local(c['first'] / 1000, '%Y-%m-%d %H:%M')}" if c["first"] > 1 else ""
            )
        click.echo(f"  {inst.id}: {emitted}, {waiting}")
    if dead:
        click.echo(f"rejected by the collector ({len(dead)}); fix the cause, then `labmeter agent resend`:")
        for d in dead[-20:]:
            click.echo(f"  {d['instrument']} seq {d['seq']} at {local(d['at'])}: {d['reason']}")
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
    from labmeter.collector.ledger import LedgerError
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
        try:
            await collector.run(stop)
        except signing.KeyFileError as exc:
            fail(f"[collector] key_file: {exc}")

    try:
        config.check_secret_files(cfg)
        run_until_signal(main)
    except (config.ConfigError, LedgerError) as exc:
        fail(str(exc))


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
@click.option(
    "--agent-config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The agent's agent.toml: its account may read exactly the plug topics its instruments use.",
)
def collector_add_agent(
    agent_id: str,
    key: str,
    instruments: tuple[str, ...],
    cfg_path: Path,
    mosquitto_dir: Path | None,
    agent_config: Path | None,
) -> None:
    """Register an agent's public key and the instruments it may report."""
    from labmeter.wire import ID_RE

    cfg = load_collector(cfg_path)
    for name in [agent_id, *instruments]:
        if not ID_RE.match(name):
            fail(f"{name!r}: ids use letters, digits, '.', '_' and '-' only (at most 64)")
    if agent_config is not None and mosquitto_dir is None:
        fail("--agent-config needs --mosquitto-dir (it sets what the broker account may read)")
    block = _agent_block(agent_id, agent_config) if mosquitto_dir is not None else ""
    if agent_config is not None:
        missing = [i.id for i in load_agent(agent_config).instrument if i.id not in instruments]
        if missing:
            click.echo(
                f"note: {agent_config} also has {', '.join(missing)}, not registered here (no --instrument): "
                "the collector will reject their intervals",
                err=True,
            )
    try:
        pub = signing.parse_public_key(key)
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = open_ledger(cfg, cfg_path)
    ledger.add_agent(agent_id, key, signing.key_id(pub), instruments)
    ledger.close()
    click.echo(
        f"agent {agent_id} registered for {', '.join(instruments)} (key fingerprint {signing.key_id(pub)}); "
        "publish the key list again: labmeter collector export-keys -o keys.json"
    )
    own = _collector_public_key(cfg)
    click.echo(f"pin this collector's key in the agent's agent.toml, under [agent] (fingerprint {own[1]}):")
    click.echo(f'  collector_key = "{own[0]}"')
    click.echo(f"  or: labmeter agent enroll --collector-key {own[0]}")
    if mosquitto_dir is not None:
        _broker_account(mosquitto_dir, agent_id, "agent", block)


def _collector_public_key(cfg: config.CollectorConfig) -> tuple[str, str]:
    """The collector's public key text and fingerprint (its key is created on first use)."""
    from labmeter.collector.identity import collector_key

    try:
        pub = collector_key(cfg.collector).public_key()
    except signing.KeyFileError as exc:
        fail(f"[collector] key_file: {exc}")
    return signing.public_key_text(pub), signing.key_id(pub)


@collector_group.command("key")
@config_option("collector.toml")
def collector_key_cmd(cfg_path: Path) -> None:
    """Show the collector's public key and fingerprint (agents pin it; it signs their acknowledgements)."""
    cfg = load_collector(cfg_path)
    text, fingerprint = _collector_public_key(cfg)
    click.echo(f"collector key file: {cfg.collector.key_path}")
    click.echo(f"fingerprint: {fingerprint}")
    click.echo(f"public key: {text}")
    click.echo("pin it in each agent.toml, under [agent]:")
    click.echo(f'  collector_key = "{text}"')


def _agent_block(agent_id: str, agent_config: Path | None) -> str:
    """The agent's ACL: its own labmeter topics, plus the plug topics its config reads (none without one)."""
    from labmeter.collector.mosquitto import AccountError, agent_acl, agent_plug_topics

    if agent_config is None:
        click.echo(
            f"note: no --agent-config: {agent_id} may read no plug topics; give its agent.toml if it reads "
            "MQTT plugs on this broker",
            err=True,
        )
        return agent_acl(agent_id)
    acfg = load_agent(agent_config)
    if acfg.agent.id != agent_id:
        fail(f"{agent_config}: [agent] id is {acfg.agent.id!r}, not {agent_id!r}")
    try:
        plugs = agent_plug_topics(acfg)
    except AccountError as exc:
        fail(f"{agent_config}: {exc}")
    for inst in plugs.elsewhere:
        click.echo(
            f"note: instrument {inst} reads its plug from its own [instrument.source.broker]; "
            "make its account on that broker",
            err=True,
        )
    return agent_acl(agent_id, plugs.topics)


new_password_option = click.option(
    "--new-password",
    is_flag=True,
    help="Give an existing account a new password (it keeps its own otherwise).",
)


def _broker_account(directory: Path, user: str, role: str, block: str, new_password: bool = False) -> None:
    from labmeter.collector.mosquitto import AccountError, add_account

    try:
        account = add_account(directory, user, block, new_password)
    except AccountError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{directory}: {exc.strerror or exc}")
    if account.new_password:
        click.echo(
            f"broker account {user}: password in {account.secret} (mode 0600; copy it to the {role}'s "
            + ("device settings)" if role == "plug" else "password_file)")
        )
    else:
        click.echo(
            f"broker account {user}: exists, password kept (--new-password to change it); ACL rewritten"
        )
    if account.owner is not None:
        click.echo(
            f"{directory / 'passwd'} and {directory / 'acl'}: {account.owner.name}:{account.owner.name} 0600"
        )
    else:
        click.echo(
            f"warning: not root or no 'mosquitto' user here: {directory}/passwd and acl are yours, mode 0600; "
            f"Mosquitto 2 reads them as its own user: chown mosquitto:mosquitto {directory}/passwd {directory}/acl",
            err=True,
        )
    for warning in account.warnings:
        click.echo(f"warning: {warning}; Mosquitto could not read its files", err=True)
    click.echo(f"ACL lines in {directory / 'acl'}:")
    click.echo("".join(f"  {line}\n" for line in account.block.splitlines()).rstrip())
    click.echo("reload Mosquitto to apply: systemctl reload mosquitto (or kill -HUP)")


mosquitto_dir_option = click.option(
    "--mosquitto-dir", required=True, type=click.Path(path_type=Path), help="Where passwd and acl live."
)


@collector_group.command("broker-user")
@click.argument("user")
@mosquitto_dir_option
@click.option("--role", type=click.Choice(["collector", "agent"]), default="collector", show_default=True)
@click.option(
    "--agent-config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="--role agent: the agent's agent.toml, for the plug topics its account may read.",
)
@new_password_option
def collector_broker_user(
    user: str, mosquitto_dir: Path, role: str, agent_config: Path | None, new_password: bool
) -> None:
    """Create a Mosquitto account (the collector's own, usually): password line, ACL block, secret file.

    Run it again for an agent to follow a changed agent.toml (the password is kept; --new-password
    changes it)."""
    from labmeter.collector.mosquitto import collector_acl

    if role == "collector":
        if agent_config is not None:
            fail("--agent-config is for --role agent")
        block = collector_acl(user)
    else:
        block = _agent_block(user, agent_config)
    _broker_account(mosquitto_dir, user, role, block, new_password)


@collector_group.command("plug-user")
@click.argument("user")
@mosquitto_dir_option
@click.option(
    "--agent-config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The agent.toml that reads this plug; with --instrument, its format and topic are taken from there.",
)
@click.option("--instrument", "instruments", multiple=True, help="The instrument this plug meters (repeat).")
@click.option(
    "--format", "fmt", help="tasmota, shelly-gen1, shelly-gen2, zigbee2mqtt, esphome or json (the driver's)."
)
@click.option("--topic", help="With --format: the topic the instrument reads, e.g. tele/plug-07/SENSOR.")
@click.option("--availability-topic", help="With --format json: the device's online/offline topic.")
@new_password_option
def collector_plug_user(
    user: str,
    mosquitto_dir: Path,
    agent_config: Path | None,
    instruments: tuple[str, ...],
    fmt: str | None,
    topic: str | None,
    availability_topic: str | None,
    new_password: bool,
) -> None:
    """Create a smart plug's (or a Zigbee2MQTT bridge's) Mosquitto account: it may write only its own topics.

    Give --agent-config and --instrument (the plug's format and topic as the agent reads them), or
    --format and --topic."""
    from labmeter.collector.mosquitto import AccountError, Plug, agent_plugs, plug_acl

    try:
        if agent_config is not None:
            if not instruments or fmt or topic:
                fail("--agent-config goes with --instrument (and without --format/--topic)")
            plugs = agent_plugs(load_agent(agent_config), instruments)
        elif fmt and topic:
            if instruments:
                fail("--instrument needs --agent-config")
            plugs = [Plug(fmt, topic, availability_topic)]
        else:
            fail("give --agent-config agent.toml --instrument ID, or --format FORMAT --topic TOPIC")
        block = plug_acl(user, plugs)
    except AccountError as exc:
        fail(f"{agent_config}: {exc}" if agent_config else str(exc))
    _broker_account(mosquitto_dir, user, "plug", block, new_password)


@collector_group.command("export-keys")
@config_option("collector.toml")
@click.option(
    "--output",
    "-o",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File to write (default: stdout).",
)
def collector_export_keys(cfg_path: Path, out: Path | None) -> None:
    """Write the agents' and the collector's public keys and fingerprints, to publish for `verify --trust`."""
    import time

    from labmeter.collector.evidence import export_keys
    from labmeter.collector.identity import collector_key

    cfg = load_collector(cfg_path)
    try:
        pub = collector_key(cfg.collector).public_key()
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = open_ledger(cfg, cfg_path)
    try:
        doc = export_keys(ledger, pub, int(time.time() * 1000))
    finally:
        ledger.close()
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror or exc})")
    click.echo(
        f"{len(doc['agents'])} agent key(s) and the collector key {doc['collector']['fingerprint']} written to {out}; "
        "publish it where evaluators can fetch it apart from any bundle",
        err=True,
    )


@collector_group.command("import-instruments")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@config_option("collector.toml")
def collector_import(file: Path, cfg_path: Path) -> None:
    """Add or update instruments from a CSV or XLSX sheet (all rows or none).

    Columns (English or Chinese headers, synonyms such as 设备编号 accepted; title rows above the header
    are skipped): code 仪器编号, name 仪器名称, unit 管理单位, department 所在部门, category 分类编码
    (6 digits; a leading zero Excel dropped is restored), kind 仪器类型 (general 通用 / special 专用),
    value_wan 原值（万元）, rated_hours 定额机时, share_mode 共享模式. CSV may be UTF-8 (with or without
    BOM) or GBK/GB18030. Numbers must be finite and not negative (rated_hours at most 8784, allowances at
    most a day); every bad cell is named by row and column.
    """
    from labmeter.collector.registry import ImportError_, import_instruments

    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    notes: list[str] = []
    try:
        n = import_instruments(ledger, file, notes)
    except ImportError_ as exc:
        fail(str(exc))
    finally:
        ledger.close()
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{n} instrument(s) imported")


@collector_group.command("import-services")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--instrument", help="Instrument the file is about (for a per-instrument sheet or calendar).")
@click.option(
    "--replace",
    is_flag=True,
    help="First remove each instrument's stored records that start within the file's span for it.",
)
@config_option("collector.toml")
@click.option("--tz", help="Time zone of times without one (default: the config's [policy] timezone).")
def collector_import_services(
    file: Path, instrument: str | None, replace: bool, cfg_path: Path, tz: str | None
) -> None:
    """Import service records (bookings, usage logs) from CSV, XLSX or iCalendar as one batch (all rows or none).

    Columns: instrument 仪器编号, start 开始时间, end 结束时间, applicant 申请人, applicant_unit 申请单位,
    service_type 服务类型 (120 internal 对内 / 130 external 对外), direction 服务方向 (135-138), amount 金额.
    Times: 2026-03-02 08:30, Excel's 2026/3/2 8:30, 2026年3月2日 8:30 or date-time cells. A record identical
    to one already imported (instrument, start, end, applicant) is skipped; to correct records, import
    the corrected file with --replace, or remove a batch with `collector services delete BATCH`.
    """
    from labmeter.collector.registry import ImportError_, import_services

    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        res = import_services(ledger, file, zone_for(tz, cfg), instrument, replace=replace)
    except ImportError_ as exc:
        fail(str(exc))
    finally:
        ledger.close()
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    msg = f"batch {res.batch}: {res.added} service record(s) imported, {res.duplicates} already present"
    if replace:
        msg += f", {res.replaced} replaced"
    click.echo(msg)
    if res.differ:
        click.echo(
            f"warning: {res.differ} of the records already present differ from the stored ones (unit, type, "
            "direction or amount); the stored ones were kept. Import with --replace to correct them.",
            err=True,
        )


@collector_group.group("services")
def services_group() -> None:
    """Service-record import batches: list them, delete one."""


@services_group.command("list")
@config_option("collector.toml")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tz", help="Time zone for the times shown (default: the config's [policy] timezone).")
def services_list(cfg_path: Path, as_json: bool, tz: str | None) -> None:
    """Every import batch: id, file, when imported, records it holds, instruments and time span."""
    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    ledger = open_ledger(cfg, cfg_path)
    try:
        batches = ledger.service_batches()
    finally:
        ledger.close()
    if as_json:
        click.echo(json.dumps(batches, ensure_ascii=False, indent=2))
        return
    if not batches:
        click.echo("no service records imported")

    def when(ms: object) -> str:
        if not isinstance(ms, int):
            return "-"
        return datetime.fromtimestamp(ms / 1000, zone).strftime("%Y-%m-%d %H:%M")

    for b in batches:
        bid = "-" if b["batch"] is None else str(b["batch"])
        codes = b["instruments"] if isinstance(b["instruments"], list) else []
        click.echo(
            f"{bid:>5}  {when(b['imported_ms'])}  {b['records']:>6} record(s)  {when(b['from_ms'])} .. "
            f"{when(b['to_ms'])}  {','.join(map(str, codes)) or '-'}  {log.printable(str(b['source']))}"
        )


@services_group.command("delete")
@click.argument("batch", type=int)
@config_option("collector.toml")
def services_delete(batch: int, cfg_path: Path) -> None:
    """Remove one import batch and all of its service records (reports recompute the hours)."""
    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        n = ledger.delete_service_batch(batch)
    finally:
        ledger.close()
    if n is None:
        fail(f"no batch {batch} (see `labmeter collector services list`)", code=1)
    click.echo(f"batch {batch} deleted: {n} service record(s) removed")


@collector_group.command("rejections")
@click.option("--hours", type=click.IntRange(min=1), default=24, show_default=True, help="How far back.")
@config_option("collector.toml")
def collector_rejections(hours: int, cfg_path: Path) -> None:
    """Rejected messages: authentic ones (the sender's own, kept whole) and the unauthenticated ones'
    hourly counts, most frequent first."""
    import time

    from labmeter.collector.ledger import Ledger

    cfg = load_collector(cfg_path)
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    try:
        rows = ledger.rejection_summary(int(time.time() * 1000) - hours * 3_600_000)
    finally:
        ledger.close()
    if not rows:
        click.echo(f"no rejections in the last {hours} h")
    for reason, topic, n, authentic in rows:
        click.echo(f"{n:>8}  {'kept   ' if authentic else 'counted'}  {topic}  {reason}")


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
@click.option("--no-bom", is_flag=True, help="CSV without the UTF-8 BOM (Excel needs it to read UTF-8).")
@click.option("--tz", help="Time zone for days and months (default: the config's [policy] timezone).")
def report_hours(
    start: str,
    end: str,
    cfg_path: Path,
    by: str,
    fmt: str,
    out: Path | None,
    lang: str,
    no_bom: bool,
    tz: str | None,
) -> None:
    """Run, effective, service and external hours, utilisation, sharing rate and coverage.

    XLSX has an About (说明) sheet and JSON a "meta" object: period, time zone, allowances, rated-hours
    basis, generation time, version, ledger, caveats and every column's definition. JSON and CSV carry
    exact seconds beside the hours. Each instrument counts from when its metering began up to now.
    """
    from labmeter.collector.report import (
        GROUPINGS,
        PeriodError,
        hours_report,
        hours_reports,
        parse_time,
        render,
        report_meta,
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
            meta = report_meta(ledger, a, b, cfg.policy, zone, GROUPINGS)
            sheets = hours_reports(ledger, a, b, cfg.policy, GROUPINGS, zone, meta["generated_ms"])
            write_xlsx(out, sheets, lang, meta, zone)
            click.echo(f"written {out}")
            return
        meta = report_meta(ledger, a, b, cfg.policy, zone, [by])
        rows = hours_report(ledger, a, b, cfg.policy, by, zone, now_ms=meta["generated_ms"])
        text = render(rows, fmt, lang, by, meta, bom=not no_bom, tz=zone)
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
@click.option("--ins-code", default="", help="The unit's code at the national platform (insCode).")
@config_option("collector.toml")
@click.option("--tz", help="Time zone for days and months (default: the config's [policy] timezone).")
def report_national(year: int, out: Path, ins_code: str, cfg_path: Path, tz: str | None) -> None:
    """National sharing-platform export: instrument records (runMachine, serviceMachine) and service records.

    The platform's field names and codes (docs/national.md); exact times and seconds beside them under
    "labmeter". The format follows the extension (.json or .xlsx; anything else is refused). Warns
    when the year is not over or has little or no coverage.
    """
    from labmeter.collector.national import ExportError, format_for, national_export, write_national

    try:
        format_for(out)
    except ExportError as exc:
        fail(str(exc))
    cfg = load_collector(cfg_path)
    ledger = open_ledger(cfg, cfg_path)
    try:
        data = national_export(ledger, year, cfg.policy, zone_for(tz, cfg), ins_code)
    finally:
        ledger.close()
    write_national(data, out)
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{len(data['instruments']['instruList'])} instrument(s), "
        f"{len(data['serviceRecords']['instruList'])} service record(s) -> {out}"
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
    """Write the signed intervals and public keys behind an instrument's hours, countersigned, for `labmeter verify`."""
    from labmeter.collector.evidence import write_bundle
    from labmeter.collector.identity import collector_key
    from labmeter.collector.report import PeriodError, parse_time
    from labmeter.collector.rollup import allowances_ms

    cfg = load_collector(cfg_path)
    zone = zone_for(tz, cfg)
    try:
        key = collector_key(cfg.collector)
    except signing.KeyFileError as exc:
        fail(str(exc))
    ledger = open_ledger(cfg, cfg_path)
    try:
        a, b = parse_time(start, zone), parse_time(end, zone, end=True)
        info = next((i for i in ledger.instruments() if i["code"] == instrument), {})
        prep_ms, post_ms = allowances_ms(info, cfg.policy)
        bundle = write_bundle(ledger, instrument, a, b, prep_ms // 1000, post_ms // 1000, out, key)
    except PeriodError as exc:
        fail(str(exc))
    finally:
        ledger.close()
    if not bundle["intervals"]:
        fail(f"no intervals for instrument {instrument!r} in that period", code=1)
    click.echo(
        f"{bundle['intervals']} signed interval(s) and {bundle['services']} service record(s) written to "
        f"{out}, countersigned by collector key "
        f"{signing.key_id(key.public_key())}; check with: labmeter verify {out} --trust KEYS.json"
    )


VERIFY_UNTRUSTED = 3
"""Exit status of a bundle that is consistent but whose keys were not checked against a trust source."""


@app.command("verify")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--trust",
    "trust_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Key list from `labmeter collector export-keys`, as published by the owner or the bureau.",
)
@click.option(
    "--key",
    "fingerprints",
    multiple=True,
    help="A trusted key's fingerprint (16 hex digits) or ed25519:... text (repeat; agents and collector).",
)
def verify(folder: Path, trust_file: Path | None, fingerprints: tuple[str, ...]) -> None:
    """Re-check an evidence bundle: keys against a trust source, signatures, chain, coverage, hours, countersignature.

    Exit status: 0 all checks pass and every key is in the trust source; 1 discrepancies; 2 the bundle
    or trust file cannot be read; 3 no discrepancy, but keys were not checked (no --trust or --key).
    """
    from labmeter import evidence
    from labmeter.verify import BundleError, H, iso, verify_bundle

    trust = None
    try:
        if trust_file is not None:
            trust = evidence.load_trust(trust_file)
        if fingerprints:
            trust = evidence.add_fingerprints(fingerprints, trust)
        res = verify_bundle(folder, trust)
    except (BundleError, evidence.TrustError) as exc:
        fail(str(exc))
    click.echo(f"bundle      {folder} (format {res.version})")
    click.echo(f"instrument  {res.instrument}")
    click.echo(f"period      {iso(res.from_ms)} to {iso(res.to_ms)} ({(res.to_ms - res.from_ms) / H:.3f} h)")
    for k in res.keys:
        click.echo(f"key         {k.who}: {k.fingerprint} {k.status}")
    click.echo(f"countersig  {res.countersignature}")
    for agent, (n, good) in res.counts.items():
        click.echo(f"intervals   {agent}: {n} in the bundle, {good} with a valid signature")
    click.echo(f"intervals   {res.checked} in all")
    if res.services is not None:
        click.echo(f"services    {res.services} service record(s)")
    for s, e in res.gaps:
        click.echo(f"gap         {iso(s)} to {iso(e)} ({(e - s) / H:.3f} h, no interval)")
    for r in res.restarts:
        click.echo(f"new chain   {r}")
    for note in res.notes:
        click.echo(f"note        {note}")
    for f in res.findings:
        click.echo(f"DISCREPANCY {f}")
    shown = ("run_ms", "effective_ms", "unknown_ms", "unverified_ms", "uncovered_ms")
    for key in (*shown, *(k for k in evidence.SERVICE_CLAIMS if k in res.recomputed)):
        claimed = f"{res.claimed[key] / H:10.3f} h" if key in res.claimed else "      none"
        click.echo(
            f"{key.removesuffix('_ms'):>11}: claimed {claimed}, recomputed {res.recomputed.get(key, 0) / H:10.3f} h"
        )
    if "energy_mwh" in res.claimed or res.recomputed.get("energy_ms"):
        claimed = (
            f"{res.claimed['energy_mwh'] / 1e6:10.3f} kWh" if "energy_mwh" in res.claimed else "      none"
        )
        click.echo(
            f"     energy: claimed {claimed}, recomputed {res.recomputed['energy_mwh'] / 1e6:10.3f} kWh"
        )
    if not res.ok:
        click.echo(f"FAILED: {len(res.findings)} discrepancy(ies) in {res.checked} interval(s)")
        sys.exit(1)
    if not res.keys_checked:
        click.echo(
            "WARNING: keys were NOT checked: the bundle's own keys were used, and anyone can re-sign a "
            "bundle with keys of their own. Check against the published key list: "
            f"labmeter verify {folder} --trust KEYS.json (or --key FINGERPRINT for every key above)"
        )
        click.echo(
            f"UNCHECKED: {res.checked} signed interval(s) are consistent, but their keys were not checked"
        )
        sys.exit(VERIFY_UNTRUSTED)
    click.echo(
        f"OK: {res.checked} signed interval(s) check out, the hours match, and every key is in {res.trust}"
    )


# broker, demo, sim ------------------------------------------------------------
@app.command("broker")
@click.option("--listen", default="127.0.0.1:1883", show_default=True, help="host:port to listen on.")
@verbose_option
def broker(listen: str, verbose: bool) -> None:
    """Run the built-in MQTT broker on its own (the collector starts it itself when embedded = true)."""
    need_collector_deps()
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
    need_collector_deps()
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
    from labmeter.drivers.sim import run_sim

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
