"""Debian's Chromium through Playwright, and a JSON GET that returns error bodies too: shared by the page tests."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# headless, with nothing reaching for the network (this machine has none)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch(p: Any) -> Any:
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}")
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}
