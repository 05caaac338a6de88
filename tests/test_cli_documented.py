"""Every command a user can type is documented: walk the click groups of labmeter/cli/ and find each full
command (`labmeter agent resend`) in README.md or docs/*.md. A new command without a line of docs fails."""

from __future__ import annotations

from collections.abc import Iterator

import click

from labmeter.cli import app
from tests.conftest import ROOT


def commands(group: click.Group, prefix: str) -> Iterator[str]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        if cmd.hidden:
            continue
        path = f"{prefix} {name}"
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path)
        else:
            yield path


def test_every_command_is_documented() -> None:
    docs = "\n".join(
        p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]
    )
    found = sorted(commands(app, "labmeter"))
    assert len(found) >= 20 and "labmeter report hours" in found  # the walk itself works
    missing = [c for c in found if c not in docs]
    assert missing == [], f"commands documented nowhere in README.md or docs/*.md: {missing}"
