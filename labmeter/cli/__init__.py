"""The ``labmeter`` command: the roof over agent, collector and drivers (click: small, and no heavy
imports in a process that runs for years). One module per command group; what they share is in common."""

from __future__ import annotations

import importlib

import click

from labmeter import __version__
from labmeter.cli.common import _opened, fail

# command -> "module:attribute"; a module is imported only when its command runs (or --help lists it),
# so `labmeter agent run` loads the agent's commands and nothing of the others (urllib for top, ...)
COMMANDS = {
    "agent": "labmeter.cli.agent:agent_group",
    "collector": "labmeter.cli.collector:collector_group",
    "report": "labmeter.cli.report:report_group",
    "verify": "labmeter.cli.verify:verify",
    "broker": "labmeter.cli.collector:broker",
    "demo": "labmeter.cli.demo:demo",
    "top": "labmeter.cli.top:top",
    "sim": "labmeter.cli.demo:sim",
}


class LazyGroup(click.Group):
    """click's documented lazy-loading group: the table above instead of imports at start-up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attr = COMMANDS[cmd_name].split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labmeter")
def app() -> None:
    """Verified machine hours for shared scientific instruments."""


def main() -> None:
    import sqlite3

    try:
        app()
    except sqlite3.DatabaseError as exc:
        where, check = _opened[-1] if _opened else ("a state file", "labmeter collector check")
        what = str(exc) if isinstance(exc, sqlite3.OperationalError) else f"damaged ({exc})"
        fail(f"{where}: {what}; `{check}` checks it and says what to do")
