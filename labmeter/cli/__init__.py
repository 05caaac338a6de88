"""The ``labmeter`` command: the roof over agent, collector and drivers (click: small, and no heavy
imports in a process that runs for years). One module per command group; what they share is in common."""

from __future__ import annotations

import click

from labmeter import __version__
from labmeter.cli import agent, collector, demo, report, top, verify
from labmeter.cli.common import _opened, fail


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labmeter")
def app() -> None:
    """Verified machine hours for shared scientific instruments."""


for command in (
    agent.agent_group,
    collector.collector_group,
    report.report_group,
    verify.verify,
    collector.broker,
    demo.demo,
    top.top,
    demo.sim,
):
    app.add_command(command)


def main() -> None:
    import sqlite3

    try:
        app()
    except sqlite3.DatabaseError as exc:
        where, check = _opened[-1] if _opened else ("a state file", "labmeter collector check")
        what = str(exc) if isinstance(exc, sqlite3.OperationalError) else f"damaged ({exc})"
        fail(f"{where}: {what}; `{check}` checks it and says what to do")
