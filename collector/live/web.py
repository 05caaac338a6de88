"""The live view: a web page and its JSON API, served by the collector (aiohttp).

Bound to 127.0.0.1 unless configured; on any other address a token is required.
State changes reach open pages through server-sent events as the collector
receives them. The page is one self-contained file: no CDN, works offline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import time
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import msgspec
from aiohttp import web

from labmeter.collector.ledger.rollup import Calendar, Rollups
from labmeter.collector.reports.hours import GROUPINGS, hours_report, metered_rated_ms, metering_starts
from labmeter.config import ConfigError
from labmeter.machine_hours import HOUR_MS as H
from labmeter.netutil import is_loopback, split_listen
from labmeter.wire import ID_RE

if TYPE_CHECKING:
    from labmeter.collector.metrics import Metrics
    from labmeter.collector.service import Collector

log = logging.getLogger("labmeter.web")
DAY = 24 * H
CACHE_S = 10.0
AGENT_DOWN_AFTER_S = 90.0


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: past it no date can be shown
MAX_PERIOD_DAYS = 400  # a utilisation query covers a year and a bit, not centuries
MAX_SIGNINS = 200


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:40] + "...")


def _time_param(request: web.Request, name: str, default: int, tz: ZoneInfo) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    hint = "use milliseconds since 1970 or an ISO time (2026-03-02T08:00)"
    if raw.isascii() and raw.isdigit():
        value = int(raw) if len(raw) <= 16 else MAX_MS + 1
    else:
        try:
            dt = datetime.fromisoformat(raw)
            value = int((dt if dt.tzinfo else dt.replace(tzinfo=tz)).timestamp() * 1000)
        except (ValueError, OverflowError, OSError):
            raise BadRequest(f"{name}={_shown(raw)}: {hint}") from None
    if not 0 <= value <= MAX_MS:
        raise BadRequest(f"{name}={_shown(raw)}: outside 1970-01-01 to 9999-12-31")
    return value


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and lo <= int(raw) <= hi):
        raise BadRequest(f"{name}={_shown(raw)}: use a whole number from {lo} to {hi}")
    return int(raw)


def _received_ms(agent: dict[str, Any]) -> float | None:
    """When the agent was last heard of, if the live state holds a usable time."""
    v = agent.get("received")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


class LiveView:
    def __init__(
        self,
        collector: Collector,
        listen: str,
        tz: str = "Asia/Shanghai",
        token: str | None = None,
        public: bool = False,
        public_power: bool = False,
    ):
        self.collector = collector
        self.public = public
        self.public_power = public_power
        self.listen = listen
        self.tz = ZoneInfo(tz)
        self.calendar = Calendar(self.tz)
        self.token = token
        self.listeners: set[asyncio.Queue[str]] = set()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._metrics: Metrics | None = None
        if not is_loopback(split_listen(listen)[0]) and not token:
            raise ConfigError(
                f"[web] listen = {listen!r} is not loopback: set token_file so the page needs a token"
            )

    # events ---------------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Called by the collector for every live change; slow pages drop events, never the collector."""
        if not self.listeners:
            return
        msg = f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
        for q in self.listeners:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(msg)

    # data -----------------------------------------------------------------
    def _cached(self, key: str, make: Any) -> Any:
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit and now - hit[0] < CACHE_S:
            return hit[1]
        value = make()
        self._cache[key] = (now, value)
        return value

    def _period_starts(self, now: int) -> dict[str, int]:
        cal = self.calendar
        year = datetime.fromtimestamp(now / 1000, self.tz).replace(month=1, day=1)
        return {
            "today": cal.day_floor(now),
            "month": cal.month_floor(now),
            "year": cal.day_floor(int(year.timestamp() * 1000)),
        }

    def instruments(self) -> list[dict[str, Any]]:
        c = self.collector
        now = c.clock.wall_ms()
        registry = c.ledger.instruments_by_code()

        def usage() -> dict[str, dict[str, dict[str, float | None]]]:
            """Hours so far today, this month and this year. Intervals end in the past, so the rollup of
            the whole current day or month holds exactly what has happened in it so far."""
            out: dict[str, dict[str, dict[str, float | None]]] = {}
            policy = c.cfg.policy
            rollups = Rollups(c.ledger, policy, registry)
            rollups.refresh()
            metered = metering_starts(c.ledger)
            starts = self._period_starts(now)
            # periods end at the page's next midnight or month: nothing is recorded between now and then
            ends = {"today": self.calendar.next_day(now), "month": self.calendar.next_month(now)}
            for name, start in starts.items():
                columns = ("run_ms", "effective_ms", "energy_mwh", "energy_ms")
                totals = rollups.totals(start, ends.get(name, ends["month"]), columns)
                for code, (run, effective, mwh, energy_ms) in totals.items():
                    rated = metered_rated_ms(
                        registry.get(code, {}), policy, start, now, now, metered.get(code)
                    )
                    out.setdefault(code, {})[name] = {
                        "run_h": round(run / H, 2),
                        "effective_h": round(effective / H, 2),
                        "utilisation_pct": round(100 * effective / rated, 1) if rated else None,
                        "energy_wh": mwh / 1000 if energy_ms else None,
                    }
            return out

        hours = self._cached("usage", usage)
        out = []
        for code in sorted(set(registry) | set(c.live.instruments)):
            info = registry.get(code, {})
            live = c.live.instruments.get(code, {})
            agent = str(live.get("agent", ""))
            out.append(
                {
                    "code": code,
                    "name": info.get("name") or "",
                    "unit": info.get("unit") or "",
                    "category": info.get("category") or "",
                    "state": live.get("state", "UNKNOWN"),
                    "since": live.get("start"),
                    "power_w": live.get("power_w"),
                    "error": live.get("error"),
                    "agent": agent,
                    "agent_down": self._agent_down(agent, now) if agent else True,
                    **hours.get(code, {}),
                }
            )
        return out

    def _agent_down(self, agent: str, now: int) -> bool:
        a = self.collector.live.agents.get(agent)
        if a is None or a.get("online") is not True or (received := _received_ms(a)) is None:
            return True
        return now - received > AGENT_DOWN_AFTER_S * 1000 * max(1.0, self.collector.clock.scale)

    def agents(self) -> list[dict[str, Any]]:
        """Registered agents that sent status; an unsigned status shows as "unverified", never online."""
        now = self.collector.clock.wall_ms()
        registered = self.collector.verifier.keys
        out = []
        for a, v in sorted(self.collector.live.agents.items()):
            if a not in registered:
                continue
            verified = v.get("verified") is True
            online = verified and v.get("online") is True
            out.append(
                {
                    "agent": a,
                    "online": online,
                    "status": ("online" if online else "offline") if verified else "unverified",
                    "last_seen": _int_or_none(v.get("received")),
                    "pending": _int_or_none(v.get("pending")),
                    "down": self._agent_down(a, now),
                }
            )
        return out

    # handlers -------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token and not request.path.startswith("/public"):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            given = given or request.query.get("token", "") or request.cookies.get("labmeter_token", "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise web.HTTPUnauthorized(text="token required: open /?token=...")
            resp = await handler(request)
            if request.query.get("token"):
                resp.set_cookie("labmeter_token", self.token, httponly=True, samesite="Strict")
            return resp
        return await handler(request)

    async def page(self, request: web.Request) -> web.Response:
        return _page("live.html")

    async def api_instruments(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"now": self.collector.clock.wall_ms(), "tz": str(self.tz), "instruments": self.instruments()},
            dumps=_dumps,
        )

    def _instrument(self, request: web.Request) -> str:
        """The path's instrument code: 400 if it cannot be one, 404 if no such instrument is known."""
        code = request.match_info["code"]
        if not ID_RE.fullmatch(code):
            raise BadRequest(f"code={_shown(code)}: an instrument code has letters, digits, '.', '_', '-'")
        known = {str(i["code"]) for i in self.collector.ledger.instruments()} | set(
            self.collector.live.instruments
        )
        if code not in known:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"no instrument {code!r}"}), content_type="application/json"
            )
        return code

    async def api_timeline(self, request: web.Request) -> web.Response:
        code = self._instrument(request)
        now = self.collector.clock.wall_ms()
        b = _time_param(request, "to", now, self.tz)
        a = _time_param(request, "from", b - DAY, self.tz)
        if b <= a:
            raise BadRequest("to must be after from")
        if b - a > 31 * DAY:
            raise BadRequest("from, to: a timeline spans at most 31 days")
        rows = self.collector.ledger.intervals_between(a, b, code)
        intervals = [
            {"start": max(r.start_ms, a), "end": min(r.end_ms, b), "state": r.state, "verified": r.linked}
            for r in rows
        ]
        live = self.collector.live.instruments.get(code)
        if (
            live
            and live.get("start", 0) < b
            and (not intervals or live.get("start", 0) >= intervals[-1]["end"])
        ):
            intervals.append(
                {"start": live["start"], "end": min(now, b), "state": live["state"], "open": True}
            )
        return web.json_response(
            {"instrument": code, "from": a, "to": b, "intervals": intervals}, dumps=_dumps
        )

    async def api_utilisation(self, request: web.Request) -> web.Response:
        by = request.query.get("by", "instrument")
        if by not in GROUPINGS:
            raise BadRequest(f"by={by!r}: use one of {', '.join(GROUPINGS)}")
        now = self.collector.clock.wall_ms()
        b = _time_param(request, "to", now, self.tz)
        a = _time_param(request, "from", self._period_starts(now)["month"], self.tz)
        if b <= a:
            raise BadRequest("to must be after from")
        if b - a > MAX_PERIOD_DAYS * DAY:
            raise BadRequest(f"from, to: utilisation spans at most {MAX_PERIOD_DAYS} days")
        rows = hours_report(self.collector.ledger, a, b, self.collector.cfg.policy, by, self.tz)
        return web.json_response(
            {"from": a, "to": b, "by": by, "rows": [r.values() for r in rows]}, dumps=_dumps
        )

    async def api_signins(self, request: web.Request) -> web.Response:
        code = self._instrument(request)
        rows = self.collector.ledger.recent_signins(
            code, limit=_int_param(request, "limit", 20, 1, MAX_SIGNINS)
        )
        return web.json_response({"instrument": code, "signins": [{"at": at, "user": u} for at, u in rows]})

    async def instrument_page(self, request: web.Request) -> web.Response:
        return _page("instrument.html")

    async def public_api(self, request: web.Request) -> web.Response:
        """What an owning unit may publish: state and utilisation; no agents, errors, sign-ins or (by default) power."""
        keep = ["code", "name", "unit", "category", "state", "since", "today", "month", "year"]
        if self.public_power:
            keep.append("power_w")
        rows = [{k: i.get(k) for k in keep} for i in self.instruments()]
        if not self.public_power:  # energy tells what power tells
            for row in rows:
                for period in ("today", "month", "year"):
                    if isinstance(usage := row.get(period), dict):
                        row[period] = {k: v for k, v in usage.items() if k != "energy_wh"}
        return web.json_response(
            {"now": self.collector.clock.wall_ms(), "tz": str(self.tz), "instruments": rows}, dumps=_dumps
        )

    async def api_agents(self, request: web.Request) -> web.Response:
        return web.json_response({"agents": self.agents()}, dumps=_dumps)

    async def api_openapi(self, request: web.Request) -> web.Response:
        spec = resources.files("labmeter.collector.live").joinpath("openapi.json").read_text(encoding="utf-8")
        return web.Response(text=spec, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format (docs/metrics.md), behind the same token and binding as the API."""
        from labmeter.collector.metrics import CONTENT_TYPE, Metrics

        if self._metrics is None:
            self._metrics = Metrics(self.collector)
        now = self.collector.clock.wall_ms()
        online = sum(not self._agent_down(a, now) for a in self.collector.verifier.keys)
        text = self._metrics.render(online)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        q: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self.listeners.add(q)
        try:
            await resp.write(b": hello\n\n")
            while True:
                try:
                    async with asyncio.timeout(15):
                        msg = await q.get()
                except TimeoutError:
                    msg = ": keep-alive\n\n"
                await resp.write(msg.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.listeners.discard(q)
        return resp

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self.page)
        app.router.add_get("/api/instruments", self.api_instruments)
        app.router.add_get("/api/instruments/{code}/timeline", self.api_timeline)
        app.router.add_get("/api/utilisation", self.api_utilisation)
        app.router.add_get("/api/agents", self.api_agents)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/api/openapi.json", self.api_openapi)
        app.router.add_get("/api/instruments/{code}/signins", self.api_signins)
        app.router.add_get("/instrument/{code}", self.instrument_page)
        app.router.add_get("/metrics", self.metrics)
        if self.public:
            app.router.add_get("/public", self.page)
            app.router.add_get("/public/api/instruments", self.public_api)
        return app

    async def start(self) -> None:
        host, port = split_listen(self.listen)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = int(self._runner.addresses[0][1])  # the port bound, also when listen asked for port 0
        log.info("live view on http://%s:%d/", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@functools.cache
def _page_and_policy(name: str) -> tuple[str, str]:
    """A page and its Content-Security-Policy: only the page's own inline script runs (by its hash), so
    markup that reached the page some other way could run nothing; the pages build their content from
    text nodes anyway."""
    html = resources.files("labmeter.collector.live").joinpath(name).read_text(encoding="utf-8")
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
        for m in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    ]
    policy = (
        f"default-src 'none'; script-src {' '.join(hashes)}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, policy


def _page(name: str) -> web.Response:
    html, policy = _page_and_policy(name)
    return web.Response(
        text=html,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"},
    )


def _dumps(obj: Any) -> str:
    """UTF-8 JSON without escapes; msgspec, because the instruments list of a province is megabytes."""
    return msgspec.json.encode(obj).decode()


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
