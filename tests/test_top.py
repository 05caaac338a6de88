"""``labmeter top`` lines up by display width (a CJK character is two columns) and never wraps: in a real
terminal (tmux) 80 and 120 columns wide, every row is one screen line, the columns start where their
headings do, and a down agent's DOWN stays visible."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from labmeter.cli.top import render

NOW = 1_780_000_000_000
ROWS: list[dict[str, Any]] = [
    {
        "code": "ICP-MS-01",
        "name": "电感耦合等离子体质谱仪",
        "unit": "化学与分子工程学院分析测试中心",
        "state": "RUNNING",
        "since": NOW - 3_600_000,
        "power_w": 1234.5,
        "agent": "lab-pc-chem-01",
        "agent_down": False,
        "today": {"run_h": 3.25, "effective_h": 3.5},
        "month": {"utilisation_pct": 41.2},
    },
    {
        "code": "XRD-2",
        "name": "X射线衍射仪",
        "unit": "材料学院",
        "state": "UNKNOWN",
        "since": NOW - 60_000,
        "power_w": None,
        "agent": "pc-materials-basement-07",
        "agent_down": True,
        "today": {"run_h": 0, "effective_h": 0},
        "month": {"utilisation_pct": 3.5},
    },
    {
        "code": "SEM",
        "name": "Scanning electron microscope",
        "unit": "Physics",
        "state": "OFF",
        "since": "\x1b[2Jnot a time",
        "power_w": "NaN",
        "agent": "pc-phys",
        "agent_down": False,
        "today": {},
        "month": {},
    },
]
DATA = {"now": NOW, "tz": "Asia/Shanghai", "instruments": ROWS}


def width(text: str) -> int:
    """Display width, counted here on its own: East Asian Wide/Fullwidth take two columns."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def at_column(line: str, col: int) -> str:
    """The text of ``line`` from display column ``col`` on."""
    used = 0
    for i, ch in enumerate(line):
        if used >= col:
            return line[i:]
        used += width(ch)
    return ""


def heading_columns(head: str) -> dict[str, int]:
    return {m.group(0).strip(): width(head[: m.start()]) for m in re.finditer(r"\S+( \S+)?", head)}


@pytest.mark.parametrize("columns", [80, 120])
def test_rows_fit_and_line_up_by_display_width(columns: int) -> None:
    lines = render(DATA, colour=False, columns=columns).splitlines()
    assert all(width(line) <= columns for line in lines), [width(x) for x in lines]
    head, rows = lines[2], lines[3:]
    assert len(rows) == 3
    starts = heading_columns(head)
    for row in rows:
        # every row has its state exactly under STATE, whatever the CJK text before it
        assert at_column(row, starts["STATE"]).split()[0] in ("RUNNING", "UNKNOWN", "OFF"), (row, starts)
        assert at_column(row, starts["RUN TODAY"]).split()[0] in ("3.25", "0.00", "-")
    down = next(r for r in rows if "XRD-2" in r)
    assert "DOWN" in down
    chem = next(r for r in rows if "ICP-MS-01" in r)
    assert "…" in chem  # the long unit is cut, not wrapped
    assert "\x1b" not in "".join(rows) and "not a time" not in "".join(rows)
    if columns == 120:
        assert "NAME" in starts and "电感耦合" in chem
    else:
        assert "NAME" not in starts  # dropped before anything a manager needs


def test_colour_codes_do_not_count_as_width() -> None:
    plain = render(DATA, colour=False, columns=80).splitlines()
    coloured = render(DATA, colour=True, columns=80).splitlines()
    strip = [re.sub(r"\x1b\[[0-9;]*m", "", x) for x in coloured]
    assert strip == plain


@pytest.fixture
def api() -> Iterator[str]:
    body = json.dumps(DATA, ensure_ascii=False).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("columns", [80, 120])
def test_in_a_real_terminal_no_line_wraps(api: str, columns: int) -> None:
    session = f"labmeter-top-{columns}-{time.monotonic_ns()}"
    cmd = f"{sys.executable} -m labmeter top --url {api} --every 60"
    subprocess.run(
        [
            "tmux",
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            str(columns),
            "-y",
            "20",
            "env",
            "LANG=C.UTF-8",
            *cmd.split(),
        ],
        check=True,
    )
    try:
        screen: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            )
            screen = out.stdout.splitlines()
            if any("SEM" in line for line in screen):
                break
            time.sleep(0.1)
        rows = [line for line in screen if line.strip()]
        # title, heading and three instruments: a wrapped row would add a screen line
        assert len(rows) == 5, screen
        assert sum("DOWN" in r for r in rows) == 1 and all(width(r) <= columns for r in rows)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
