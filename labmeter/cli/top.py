"""``labmeter top``: the live view in a terminal, from the collector's JSON API."""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import click

from labmeter.log import printable
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


def render(data: dict[str, Any], colour: bool) -> str:
    """The API's instruments as a table; every value from the data is printed as plain text (no control
    characters) and anything that is not a number or a time shows as ``-``."""
    tz = ZoneInfo(data.get("tz") or "Asia/Shanghai")

    def hhmm(ms: object) -> str:
        if not isinstance(ms, int | float) or isinstance(ms, bool) or not 0 < ms < 253_402_300_800_000:
            return "-"
        return datetime.fromtimestamp(ms / 1000, tz).strftime("%m-%d %H:%M")

    lines = [f"labmeter  {hhmm(data.get('now'))}  ({len(data['instruments'])} instruments)", ""]
    head = f"{'INSTRUMENT':<16} {'UNIT':<22} {'STATE':<8} {'SINCE':<11} {'POWER W':>9} {'RUN TODAY':>9} {'EFF TODAY':>9} {'UTIL MONTH':>10}  AGENT"
    lines.append(head)
    for i in sorted(
        data["instruments"], key=lambda x: (printable(x.get("unit") or ""), printable(x["code"]))
    ):
        state = printable(i.get("state", "UNKNOWN"))
        shown = f"{state:<8}"
        if colour:
            shown = f"{COLOURS.get(state, '')}{shown}\033[0m"
        today = i.get("today") if isinstance(i.get("today"), dict) else {}
        month = i.get("month") if isinstance(i.get("month"), dict) else {}
        util = _number(month.get("utilisation_pct"), ".1f")
        agent = printable(i.get("agent") or "-") + (" DOWN" if i.get("agent_down") else "")
        lines.append(
            f"{printable(i['code']):<16} {printable(i.get('unit') or '')[:22]:<22} {shown} {hhmm(i.get('since')):<11} "
            f"{_number(i.get('power_w'), '.1f'):>9} {_number(today.get('run_h', 0), '.2f'):>9} "
            f"{_number(today.get('effective_h', 0), '.2f'):>9} {util + '%' if util != '-' else '-':>10}  {agent}"
        )
    return "\n".join(lines) + "\n"


def run_top(url: str, token: str | None, every: float, once: bool) -> int:
    colour = sys.stdout.isatty()
    while True:
        try:
            text = render(fetch(url, token), colour)
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
