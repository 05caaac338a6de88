"""The live view against hostile input: every bad parameter answers 400 naming it (never 500), and
hostile text in any field (live state, error, agent, instrument names, units, codes, sign-in users)
is shown as text in real Chromium, at desk and phone width, and runs nothing.

The hostile values are put straight into the collector's live state and ledger: the ingest path may
refuse them, but the pages must be safe whatever the data."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from labmeter import config
from tests.support.browser import CHROMIUM, get, launch

XSS = [
    "<img src=x onerror=\"window.__xss=(window.__xss||0)+1;document.title='pwned'\">",
    '<script>window.__xss=(window.__xss||0)+1;document.title="pwned"</script>',
    '"><svg onload="window.__xss=(window.__xss||0)+1">',
    "' onmouseover='window.__xss=1' x='",
]
HOSTILE_CODE = "<img src=x onerror=window.__xss=1>"
TERMINAL = "\x1b]0;pwned\x07\x1b[2J\x1b[31m"  # retitle, clear and recolour a terminal


class ViewThread:
    """A collector's live view (the real aiohttp server) on its own event loop; hostile data injected."""

    def __init__(self, tmp: Path, token: str | None = None) -> None:
        self.tmp = tmp
        self.token = token
        self.port = 0
        self.base = ""
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.view: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from labmeter.collector.live.web import LiveView
        from labmeter.collector.service import Collector

        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            cfg = config.parse(f'[collector]\ndata_dir = "{self.tmp / "data"}"\n', config.CollectorConfig)
            collector = Collector(cfg)
            seed(collector)
            self.view = LiveView(collector, "127.0.0.1:0", token=self.token, public=True)
            await self.view.start()  # binds a port itself: nothing can take it between choosing and binding
            self.port = self.view.port
            self.base = f"http://127.0.0.1:{self.port}"

        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.view.publish, kind, data)

    def __enter__(self) -> ViewThread:
        self.thread.start()
        assert self.ready.wait(30), "the live view did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.view.stop(), self.loop).result(15)
        self.view.collector.ledger.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(15)


def seed(collector: Any) -> None:
    now = int(time.time() * 1000)
    blank = {"department": "", "kind": "general", "share_mode": ""}
    collector.ledger.upsert_instruments(
        [
            {**blank, "code": "CZ-A", "name": XSS[0], "unit": XSS[1], "category": XSS[2]},
            {**blank, "code": "CZ-B", "name": XSS[3], "unit": XSS[0] + TERMINAL, "category": XSS[1]},
        ]
    )
    collector.ledger.add_agent("a1", "ed25519:x", "kid", ["CZ-A"])
    collector.ledger.store_signins([("a1", "CZ-A", 1, now - 60_000, XSS[0], "sha", b"env")])
    collector.live.instruments["CZ-A"] = {
        "instrument": "CZ-A",
        "state": XSS[1],
        "start": now - 3_600_000,
        "power_w": XSS[2],
        "agent": XSS[2] + TERMINAL,
        "error": XSS[0],
    }
    collector.live.instruments[HOSTILE_CODE] = {"instrument": HOSTILE_CODE, "state": XSS[0], "start": "x"}
    collector.live.agents[XSS[2]] = {"online": True, "received": "not-a-number", "pending": XSS[0]}
    collector.live.agents["a1"] = {"online": True, "received": float("nan")}


@pytest.fixture
def view(tmp_path: Path) -> Iterator[ViewThread]:
    with ViewThread(tmp_path) as v:
        yield v


BAD = [
    ("/api/instruments/CZ-A/timeline?from=yesterday", "from='yesterday'"),
    ("/api/instruments/CZ-A/timeline?to=%C2%B2", "to="),  # '²' passes str.isdigit
    ("/api/instruments/CZ-A/timeline?to=%EF%BC%91%EF%BC%92", "to="),  # full-width digits
    ("/api/instruments/CZ-A/timeline?to=99999999999999999999", "to="),
    ("/api/instruments/CZ-A/timeline?from=-5", "from="),
    ("/api/instruments/CZ-A/timeline?from=0001-01-01T00:00%2B14:00", "from="),
    ("/api/instruments/CZ-A/timeline?to=9999-12-31T23:59:59-14:00", "to="),
    ("/api/instruments/CZ-A/timeline?to=2026-02-30", "to="),
    ("/api/instruments/CZ-A/timeline?from=2026-03-02&to=2026-03-01", "to must be after from"),
    ("/api/instruments/CZ-A/timeline?from=0&to=253402300799999", "from, to"),
    ("/api/instruments/CZ%3Cx%3E/timeline", "code="),
    ("/api/instruments/" + "A" * 65 + "/timeline", "code="),
    ("/api/instruments/CZ-A%0A/timeline", "code="),
    ("/api/utilisation?by=room", "by='room'"),
    ("/api/utilisation?by=", "by="),
    ("/api/utilisation?from=0&to=253402300799999", "from, to"),
    ("/api/utilisation?from=2026-03-01T25:00", "from="),
    ("/api/utilisation?to=" + "9" * 5000, "to="),
    ("/api/utilisation?from=2026-03-02&to=2026-03-02", "to must be after from"),
    ("/api/instruments/CZ-A/signins?limit=abc", "limit="),
    ("/api/instruments/CZ-A/signins?limit=-1", "limit="),
    ("/api/instruments/CZ-A/signins?limit=0", "limit="),
    ("/api/instruments/CZ-A/signins?limit=100000", "limit="),
    ("/api/instruments/CZ-A/signins?limit=1e3", "limit="),
    ("/api/instruments/CZ%22%3E/signins", "code="),
    ("/api/instruments/CZ%3Cx%3E", "code="),
    ("/api/instruments/CZ-A/services?from=yesterday", "from='yesterday'"),
    ("/api/instruments/CZ-A/services?from=0&to=253402300799999", "from, to"),
    ("/api/instruments/CZ-A/services?to=%EF%BC%91", "to="),
    ("/api/instruments/CZ-A/services?from=2026-03-02&to=2026-03-01", "to must be after from"),
    ("/api/instruments/CZ%0A/services", "code="),
]


def test_every_bad_parameter_answers_400_naming_it(view: ViewThread) -> None:
    for path, fragment in BAD:
        status, body = get(view.base + path)
        assert status == 400 and fragment in body.get("error", ""), (path, status, body)
        assert len(body["error"]) < 300, (path, body)  # a 5000-digit value is not echoed whole
    assert get(view.base + "/api/instruments/NOPE/timeline")[0] == 404
    assert get(view.base + "/api/instruments/NOPE/signins")[0] == 404
    assert get(view.base + "/api/instruments/NOPE")[0] == 404
    assert get(view.base + "/api/instruments/NOPE/services")[0] == 404
    for good in ("/api/instruments/CZ-A/signins?limit=1", "/api/utilisation?by=category&from=2026-03-01"):
        assert get(view.base + good)[0] == 200, good


def test_hostile_live_state_keeps_every_api_at_200(view: ViewThread) -> None:
    for path in ("/api/instruments", "/api/agents", "/public/api/instruments", "/api/utilisation"):
        status, body = get(view.base + path)
        assert status == 200, (path, body)
    body = get(view.base + "/api/agents")[1]
    assert all(a["down"] for a in body["agents"])  # an unusable heartbeat time is no sign of life
    codes = {i["code"] for i in get(view.base + "/api/instruments")[1]["instruments"]}
    assert {"CZ-A", "CZ-B", HOSTILE_CODE} <= codes


def test_a_token_that_is_not_ascii_is_refused_not_a_500(tmp_path: Path) -> None:
    with ViewThread(tmp_path, token="s3cret") as v:
        assert get(v.base + "/api/agents?token=%E5%AF%86%E7%A0%81")[0] == 401
        assert get(v.base + "/api/agents?token=s3cret")[0] == 200


def test_top_prints_hostile_fields_as_plain_text(view: ViewThread) -> None:
    from tests.conftest import LABMETER

    out = subprocess.run(
        [*LABMETER, "top", "--url", view.base, "--once"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "CZ-A" in out.stdout and "<script>" in out.stdout
    assert not any(ch in out.stdout for ch in "\x1b\x07\r"), repr(out.stdout)


PAGES = [
    "/?lang=en",
    "/public",
    "/instrument/CZ-A",
    "/instrument/" + quote(HOSTILE_CODE, safe=""),
    "/?lang=" + quote(XSS[0], safe="") + "&sort=" + quote(XSS[1], safe=""),  # unknown: the defaults
    "/instrument/CZ-A?lang=__proto__",
]
VIEWPORTS = {"desk": {"width": 1400, "height": 800}, "phone": {"width": 390, "height": 844}}


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium not installed (make deps installs it)"
)
@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_hostile_fields_run_nothing_in_chromium(view: ViewThread, width: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS = tmp_path / "artifacts"  # per test: parallel runs never overwrite each other's screenshots
    ARTIFACTS.mkdir()
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=VIEWPORTS[width])
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        for path in PAGES:
            page.goto(view.base + path)
            if path.startswith("/instrument/%3C"):
                page.wait_for_function(
                    "c => document.querySelector('#title').textContent === c", arg=HOSTILE_CODE
                )
                page.wait_for_selector("#signins td")
            elif path.startswith("/instrument/"):
                page.wait_for_selector("#signins code")
                shown = page.inner_text("#signins")
                assert XSS[0] in shown, shown
                assert XSS[0] in page.inner_text("#facts")  # the name, as text
            else:
                page.wait_for_selector('.row[data-code="CZ-A"]')
                shown = page.inner_text("#list")
                assert XSS[0] in shown and XSS[1] in shown and HOSTILE_CODE in shown, shown
                assert page.locator("#win [data-code]").count() == 3
                if not path.startswith("/public"):
                    # its agent has never been heard of: UNKNOWN, with the last reported state kept aside
                    badge = page.locator('[data-testid="state-CZ-A"]')
                    assert badge.get_attribute("data-state") == "UNKNOWN"
                    assert badge.get_attribute("data-last-state") == XSS[1]
                    assert XSS[0] in (badge.get_attribute("title") or "")
                    view.publish(
                        "state",
                        {"instrument": "CZ-A", "state": XSS[0], "start": 1, "error": XSS[1], "agent": XSS[3]},
                    )
                    page.wait_for_function(
                        "s => document.querySelector('[data-testid=\"state-CZ-A\"]').dataset.state === s",
                        arg=XSS[0],
                    )
                    href = page.get_attribute(f'.row[data-code="{HOSTILE_CODE}"] a', "href") or ""
                    assert href.startswith("instrument/%3Cimg"), href
            page.wait_for_timeout(300)
            if width == "phone":  # hostile text never widens the page into horizontal scrolling
                assert page.evaluate("document.documentElement.scrollWidth") == 390, path
            ran = page.evaluate(
                "({flag: window.__xss, title: document.title, scripts: document.scripts.length,"
                " injected: document.querySelectorAll('img, iframe, object, embed, [onerror], [onload], [onmouseover]').length})"
            )
            assert ran == {"flag": None, "title": "labmeter", "scripts": 1, "injected": 0}, (path, ran)
            page.screenshot(
                path=str(
                    ARTIFACTS
                    / f"hostile-{width}-{path.strip('/').split('?')[0].replace('/', '-') or 'live'}.png"
                )
            )
        assert not [m for m in console if "Content Security Policy" in m or "pageerror" in m], console
        browser.close()
