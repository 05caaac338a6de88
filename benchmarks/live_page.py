"""The overview page in Chromium at province scale: time from navigation until rows and tiles are shown.

Debian's Chromium (driven by Playwright, launched as the tests launch it) loads ``/`` from the
collector's web server, which runs in a process of its own (as it does for a user: a busy collector
loop must not hold up the browser's driver, nor the driver the collector) on a ledger built with
:mod:`benchmarks.province`: 5,000 instruments, and 50 instruments built from the same generator (the
baseline in the same run). Every instrument has a live state from its enrolled agent, as on a running
collector (a tenth of the agents down). The time is the page's own clock (``performance.now()``, zero
at navigation start) when the first instrument row and the tiles are in the page, taken in the page
by a MutationObserver installed before its script runs.

Three cases: "cold" clears the view's cache before each load, so the server computes every
instrument's hours while the page waits (a page open while the collector starts); "stale" makes the
cached hours older than their 10 s, so the answer comes at once and the hours are recomputed after it
(a page loaded on a running collector); "fresh" is a load within the 10 s. Targets, on "stale" and
"fresh" (medians): under 1 s at 5,000, and within 2x of 50.

    .venv/bin/python -m benchmarks.province --instruments 5000 --days 35 --db /tmp/province.sqlite
    .venv/bin/python -m benchmarks.live_page --db /tmp/province.sqlite [--loads 5]

With ``--steps``, no browser: how long each step of one recomputation of the hours holds the collector's
event loop (after a stale answer they run with the loop free between them; target: the longest under
250 ms at 5,000, what an acknowledgement or another page may wait).

    .venv/bin/python -m benchmarks.live_page --db /tmp/province.sqlite --steps
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import Verdicts
from labmeter import config
from labmeter.collector import service
from labmeter.collector.ledger import Ledger
from labmeter.collector.live.web import CACHE_S, LiveView
from labmeter.collector.service import Collector

# installed before the page's script: the first moment a row and a non-zero total tile are in the page
MARK = """
new MutationObserver((_, obs) => {
  const row = document.querySelector('#win [data-code]');
  const tile = document.querySelector('[data-testid="tile-total"] b');
  if (row && tile && tile.textContent !== '0') { window.__shown = performance.now(); obs.disconnect(); }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""
STATES = ("RUNNING", "STANDBY", "OFF", "OFF", "RUNNING", "OFF", "STANDBY", "OFF", "RUNNING", "OFF")


def _open_without_check(url: str, data_dir: Path, quick_check: bool = False) -> Ledger:
    """The collector's start-up integrity check reads the whole file (minutes for a province's gigabytes on
    a busy machine): a cost of starting, not of loading a page."""
    return Ledger.open(url, data_dir)


def _live_state(collector: Collector) -> None:
    """What a running collector holds: each instrument's last verified state from its agent (every tenth
    agent silent, so its instruments show UNKNOWN and "agent down")."""
    now = collector.clock.wall_ms()
    for k, (agent, code) in enumerate(sorted(collector.ledger.enrolments())):
        state = STATES[k % len(STATES)]
        collector.live.instruments[code] = {
            "instrument": code,
            "agent": agent,
            "state": state,
            "start": now - 600_000 - k * 1000,
            "power_w": {"RUNNING": 850.0, "STANDBY": 120.0}.get(state, 0.5),
            "error": None,
            "received": now,
        }
    _heartbeats(collector)


def _heartbeats(collector: Collector) -> None:
    """Agents heard of just now, as their heartbeats keep them; a state record changes only with a state."""
    now = collector.clock.wall_ms()
    for k, agent in enumerate(sorted({str(i["agent"]) for i in collector.live.instruments.values()})):
        up = k % 10 != 9
        collector.live.agents[agent] = {
            "online": up,
            "received": now if up else now - 3_600_000,
            "verified": True,
        }


def _collector(db: Path, data_dir: Path) -> Collector:
    """A collector on ``db`` (not started: no broker) holding a running collector's live state."""
    cfg = config.CollectorConfig(
        collector=config.CollectorSection(data_dir=data_dir, ledger=f"sqlite:///{db}"),
        web=config.WebConfig(listen="127.0.0.1:0"),
    )
    service.Ledger = type("Ledger", (Ledger,), {"open": staticmethod(_open_without_check)})
    collector = Collector(cfg)
    service.Ledger = Ledger
    _live_state(collector)
    return collector


async def serve(db: Path) -> None:
    """The collector's live view on ``db``, told over stdin what to do to its cache before each load."""
    with tempfile.TemporaryDirectory() as tmp:
        collector = _collector(db, Path(tmp))
        view = LiveView(collector, "127.0.0.1:0")
        await view.start()
        print(view.port, flush=True)
        loop = asyncio.get_running_loop()
        try:
            while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
                while view._refreshing:  # the last load's recomputation has finished
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)
                _heartbeats(collector)  # no agent times out during the run
                if line == "cold":
                    view._cache.clear()
                elif line == "stale":
                    view._cache = {k: (t - CACHE_S - 1, v) for k, (t, v) in view._cache.items()}
                print("ok", flush=True)
        finally:
            await view.stop()
            collector.ledger.close()


def steps(db: Path, rounds: int = 3) -> None:
    """Each step of the view's recomputation timed on its own (the loop is free between steps)."""
    import time

    with tempfile.TemporaryDirectory() as tmp:
        collector = _collector(db, Path(tmp))
        view = LiveView(collector, "127.0.0.1:0")
        view.overview()  # rollups brought up to date
        registry = collector.ledger.instruments_by_code()
        longest = []
        for _ in range(rounds):
            gen, held = view._compute(collector.clock.wall_ms(), registry), []
            t = time.perf_counter()
            while True:
                try:
                    next(gen)
                except StopIteration:
                    held.append((time.perf_counter() - t) * 1000)
                    break
                held.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
            print(
                f"{len(held)} steps, {sum(held):.0f} ms in all, longest {max(held):.0f} ms: "
                + ", ".join(f"{x:.0f}" for x in held)
            )
            longest.append(max(held))
        collector.ledger.close()
    verdicts = Verdicts()
    worst = statistics.median(longest)
    verdicts.check("longest step of a recomputation, median", round(worst), "< 250 ms", worst < 250, " ms")
    verdicts.exit()


async def measure(db: Path, loads: int, browser: Any, width: int) -> dict[str, list[float]]:
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.live_page", "--serve", str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin and server.stdout
    port = int(server.stdout.readline())
    out: dict[str, list[float]] = {"cold": [], "stale": [], "fresh": []}
    try:
        ctx = await browser.new_context(viewport={"width": width, "height": 900})
        await ctx.add_init_script(MARK)
        page = await ctx.new_page()
        await page.goto(f"http://127.0.0.1:{port}/")  # rollups brought up to date, page compiled
        await page.wait_for_function("() => window.__shown")
        for name in out:
            for _ in range(loads):
                server.stdin.write(name + "\n")
                server.stdin.flush()
                assert await asyncio.to_thread(server.stdout.readline) == "ok\n"
                await page.goto(f"http://127.0.0.1:{port}/?lang=zh-CN", wait_until="commit")
                got = await page.wait_for_function("() => window.__shown", timeout=60_000)
                out[name].append(float(await got.json_value()))
                rows = await page.locator("#win [data-code]").count()
                assert 0 < rows < 200, f"{rows} row elements: the list is not virtual"
        await ctx.close()
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    return out


async def main_async(db: Path, small: Path, loads: int) -> None:
    from playwright.async_api import async_playwright

    from tests.support.browser import CHROMIUM, CHROMIUM_ARGS

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        results: dict[tuple[int, int], dict[str, list[float]]] = {}
        for width in (1440, 390):
            for n, path in ((50, small), (5000, db)):
                results[(n, width)] = await measure(path, loads, browser, width)
        await browser.close()
    verdicts = Verdicts()
    for (n, width), r in results.items():
        for name, ms in r.items():
            print(
                f"{n:>5} instruments, {width} px, {name}: median {statistics.median(ms):.0f} ms "
                f"(runs {', '.join(f'{x:.0f}' for x in ms)})"
            )
    for width in (1440, 390):
        for name in ("stale", "fresh"):
            big = statistics.median(results[(5000, width)][name])
            base = statistics.median(results[(50, width)][name])
            what = f"5,000 instruments at {width} px, {name}"
            verdicts.check(f"{what}, median", round(big), "< 1000 ms", big < 1000, " ms")
            verdicts.check(f"{what}, vs 50", round(big / base, 2), "<= 2x", big <= 2 * base, "x")
    print(json.dumps({f"{n}@{w}": r for (n, w), r in results.items()}))
    verdicts.exit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, help="the 5,000-instrument ledger (benchmarks.province)")
    p.add_argument("--small-db", type=Path, help="a 50-instrument ledger; built here (35 days) if not given")
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--steps", action="store_true", help="time the steps of one recomputation (no browser)")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    if args.db is None:
        p.error("--db is required")
    if args.steps:
        steps(args.db)
        return
    with tempfile.TemporaryDirectory() as tmp:
        small = args.small_db
        if small is None:
            small = Path(tmp) / "province-50.sqlite"
            db = ("--db", str(small))
            subprocess.run(
                [sys.executable, "-m", "benchmarks.province", "--instruments", "50", "--days", "35", *db],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        asyncio.run(main_async(args.db, small, args.loads))


if __name__ == "__main__":
    main()
