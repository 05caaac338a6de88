"""``labmeter top``: the live view in a terminal, from the collector's JSON API."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import click

from labmeter.log import fit, printable
from labmeter.netutil import redact_text, redact_url

COLOURS = {"RUNNING": "\033[32m", "STANDBY": "\033[33m", "OFF": "\033[90m", "UNKNOWN": "\033[31m"}


def fetch(url: str, token: str | None) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + "/api/instruments")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        data: dict[str, Any] = json.loads(r.read())
        return data


def _number(v: object, spec: str) -> str:
    return (
        format(v, spec)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        else "-"
    )


@dataclass(frozen=True)
class Column:
    head: str
    width: int
    least: int  # a flexible column shrinks down to this; a fixed one has least == width
    right: bool = False
    optional: int = 0  # 0: always shown; otherwise dropped first when narrow, highest first


COLUMNS = (
    Column("INSTRUMENT", 16, 12),
    Column("NAME", 24, 8, optional=4),
    Column("UNIT", 22, 8),
    Column("STATE", 7, 7),
    Column("SINCE", 11, 11, optional=3),
    Column("POWER W", 9, 9, right=True, optional=2),
    Column("RUN TODAY", 9, 9, right=True),
    Column("EFF TODAY", 9, 9, right=True, optional=1),
    Column("UTIL MON", 8, 8, right=True),
    Column("AGENT", 20, 9),
)

GROW_ORDER = ("UNIT", "NAME", "INSTRUMENT", "AGENT")  # who gets the room left, first


def layout(columns: int) -> list[tuple[int, Column, int]]:
    """(index, column, width) of the columns that fit in ``columns``: optional ones go first, then the
    flexible ones shrink; the space left goes to the flexible ones up to their width."""
    shown = list(enumerate(COLUMNS))

    def need(cols: list[tuple[int, Column]]) -> int:
        return sum(c.least for _, c in cols) + len(cols) - 1

    for level in sorted({c.optional for c in COLUMNS if c.optional}, reverse=True):
        if need(shown) <= columns:
            break
        shown = [(i, c) for i, c in shown if c.optional != level]
    spare = columns - need(shown)
    widths = {i: c.least for i, c in shown}
    for i, c in sorted(
        shown, key=lambda ic: GROW_ORDER.index(ic[1].head) if ic[1].head in GROW_ORDER else 99
    ):
        grow = min(max(spare, 0), c.width - c.least)
        spare -= grow
        widths[i] += grow
    return [(i, c, widths[i]) for i, c in shown]


def render(data: dict[str, Any], colour: bool, columns: int = 120) -> str:
    """The API's instruments as a table ``columns`` wide at most, aligned by display width (a Chinese
    unit name takes two columns a character), so no line wraps; every value from the data is printed as
    plain text (no control characters) and anything that is not a number or a time shows as ``-``."""
    tz = ZoneInfo(data.get("tz") or "Asia/Shanghai")
    columns = max(columns, 20)

    def hhmm(ms: object) -> str:
        if not isinstance(ms, int | float) or isinstance(ms, bool) or not 0 < ms < 253_402_300_800_000:
            return "-"
        return datetime.fromtimestamp(ms / 1000, tz).strftime("%m-%d %H:%M")

    plan = layout(columns)
    title = f"labmeter  {hhmm(data.get('now'))}  ({len(data['instruments'])} instruments)"
    lines = [fit(title, columns).rstrip(), "", " ".join(fit(c.head, w, c.right) for _, c, w in plan).rstrip()]
    for i in sorted(
        data["instruments"], key=lambda x: (printable(x.get("unit") or ""), printable(x["code"]))
    ):
        state = printable(i.get("state", "UNKNOWN"))
        today = i.get("today") if isinstance(i.get("today"), dict) else {}
        month = i.get("month") if isinstance(i.get("month"), dict) else {}
        util = _number(month.get("utilisation_pct"), ".1f")
        agent = printable(i.get("agent") or "-")
        values = (
            printable(i["code"]),
            printable(i.get("name") or ""),
            printable(i.get("unit") or ""),
            state,
            hhmm(i.get("since")),
            _number(i.get("power_w"), ".1f"),
            _number(today.get("run_h", 0), ".2f"),
            _number(today.get("effective_h", 0), ".2f"),
            util + "%" if util != "-" else "-",
            f"DOWN {agent}" if i.get("agent_down") else agent,  # first, so a cut never hides it
        )
        cells = []
        for n, c, w in plan:
            cell = fit(values[n], w, c.right)
            if colour and c.head == "STATE":
                cell = f"{COLOURS.get(state, '')}{cell}\033[0m"
            cells.append(cell)
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def run_top(url: str, token: str | None, every: float, once: bool) -> int:
    colour = sys.stdout.isatty()
    while True:
        try:
            text = render(fetch(url, token), colour, shutil.get_terminal_size((120, 24)).columns)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            text = f"cannot read {redact_url(url)}/api/instruments: {redact_text(str(exc), url)}\n"
            if once:
                sys.stderr.write(text)
                return 1
        if once:
            sys.stdout.write(text)
            return 0
        sys.stdout.write("\033[H\033[2J" + text)
        sys.stdout.flush()
        try:
            time.sleep(every)
        except KeyboardInterrupt:
            return 0


@click.command("top")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The collector's live view.")
@click.option("--token", envvar="LABMETER_TOKEN", help="Token, when the live view needs one.")
@click.option("--every", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print once and exit.")
def top(url: str, token: str | None, every: float, once: bool) -> None:
    """Live instrument states in the terminal (reads the collector's JSON API)."""
    sys.exit(run_top(url, token, every, once))
