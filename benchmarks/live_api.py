"""`GET /api/instruments` with 5,000 instruments and a year in the ledger: the live view's main request.

The collector's web server runs in this process on the synthetic ledger of
:mod:`benchmarks.province`; a client fetches the instruments (state, today's hours,
utilisation this month and this year). "Uncached" clears the view's 10-second cache
before every request, so each one computes today's, this month's and this year's hours
afresh; "cached" is what most page loads see. The baseline is `/api/agents` on the same
server (the HTTP round trip with next to no work). Target: under 200 ms median, uncached.

    .venv/bin/python -m benchmarks.live_api --db /tmp/province.sqlite [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.common import Verdicts
from labmeter import config
from labmeter.collector.live.web import LiveView
from labmeter.collector.service import Collector


async def measure(db: Path, requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.CollectorConfig(
            collector=config.CollectorSection(data_dir=Path(tmp), ledger=f"sqlite:///{db}"),
            web=config.WebConfig(listen="127.0.0.1:0"),
        )
        collector = Collector(cfg)
        view = LiveView(collector, cfg.web.listen if cfg.web else "")
        await view.start()
        base = f"http://127.0.0.1:{view.port}"
        try:
            async with aiohttp.ClientSession() as http:

                async def get(path: str, clear: bool) -> tuple[float, int]:
                    if clear:
                        view._cache.clear()
                    t = time.perf_counter()
                    async with http.get(base + path) as r:
                        body = await r.read()
                        assert r.status == 200, body[:200]
                    return (time.perf_counter() - t) * 1000, len(body)

                first, size = await get("/api/instruments", True)  # includes bringing rollups up to date
                results = {}
                for name, path, clear in (
                    ("uncached", "/api/instruments", True),
                    ("cached", "/api/instruments", False),
                    ("baseline /api/agents", "/api/agents", False),
                ):
                    results[name] = [(await get(path, clear))[0] for _ in range(requests)]
        finally:
            await view.stop()
            collector.ledger.close()
    print(f"first request {first:.0f} ms; response {size / 1e6:.2f} MB")
    base_ms = statistics.median(results["baseline /api/agents"])
    for name, ms in results.items():
        med = statistics.median(ms)
        print(
            f"{name}: median {med:.1f} ms, p90 {sorted(ms)[int(len(ms) * 0.9) - 1]:.1f} ms "
            f"({med / base_ms:.0f}x baseline)"
        )
    uncached = statistics.median(results["uncached"]) if "uncached" in results else None
    verdicts = Verdicts()
    if uncached is not None:
        verdicts.check(
            "uncached /api/instruments, median", round(uncached, 1), "< 200 ms", uncached < 200, " ms"
        )
    verdicts.exit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, required=True, help="a ledger built by benchmarks.province")
    p.add_argument("--requests", type=int, default=30)
    args = p.parse_args()
    if not args.db.exists():
        raise SystemExit(f"{args.db}: build it first with python -m benchmarks.province")
    asyncio.run(measure(args.db, args.requests))


if __name__ == "__main__":
    main()
