"""What every command shares: errors, option bundles, config and state-file opening, the run loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from labmeter import config, winsys
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


def tz_option(what: str = "days and months") -> Callable[[Any], Any]:
    """``--tz``: the zone of local days and times; the config's [policy] timezone (the rollups') by default."""
    return click.option("--tz", help=f"Time zone for {what} (default: the config's [policy] timezone).")


def period_options(what: str = "days and months") -> Callable[[Any], Any]:
    """``--from``, ``--to`` (an inclusive day, or a time) and ``--tz``: the period every report takes."""

    def deco(f: Any) -> Any:
        f = tz_option(what)(f)
        f = click.option("--to", "end", required=True, help="Last day (inclusive) or end time, local.")(f)
        return click.option("--from", "start", required=True, help="First day (2026-01-01) or time, local.")(
            f
        )

    return deco


def reset_precheck(
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


def move_aside(path: Path) -> Path:
    from labmeter import statefile

    try:
        return statefile.move_aside(path)
    except OSError as exc:
        fail(f"cannot move {path} aside: {exc.strerror or exc}")


def output_options(offered: tuple[str, ...]) -> Callable[[Any], Any]:
    """``--format`` (one of ``offered``; default: what ``-o``'s suffix names, else the first) and ``-o``."""

    def deco(f: Any) -> Any:
        f = click.option(
            "--output", "-o", "out", type=click.Path(path_type=Path), help="File to write (needed for xlsx)."
        )(f)
        return click.option(
            "--format",
            "fmt",
            type=click.Choice(offered),
            help=f"{' | '.join(offered)} (default: from the --output suffix, else {offered[0]}).",
        )(f)

    return deco


def choose_format(fmt: str | None, out: Path | None, offered: tuple[str, ...], report: str) -> str:
    from labmeter.collector.reports.formats import FormatError, choose

    try:
        return choose(fmt, out, offered, report)
    except FormatError as exc:
        fail(str(exc))
