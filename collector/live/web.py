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
from collections.abc import Generator
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import msgspec
from aiohttp import web

from labmeter.collector.ledger.rollup import Calendar, allowances_ms
from labmeter.collector.reports.hours import (
    GROUPINGS,
    hours_report,
    metering_starts,
    per_instrument,
    utilisation_pct,
)
from labmeter.config import ConfigError
from labmeter.machine_hours import HOUR_MS as H
from labmeter.machine_hours import compute
from labmeter.netutil import is_loopback, split_listen
from labmeter.wire import ID_RE, STATES

if TYPE_CHECKING:
    from labmeter.collector.metrics import Metrics
    from labmeter.collector.service import Collector

log = logging.getLogger("labmeter.web")
DAY = 24 * H
CACHE_S = 10.0
STEP_ROWS = 1000
"""Instruments formatted between two turns of the event loop while the live view's hours are recomputed."""
STALE_S = 120.0
AGENT_DOWN_AFTER_S = 90.0
PERIODS = ("today", "month", "year")
LIVE_COLUMNS = ("state", "last_state", "since", "power_w", "error", "agent", "agent_status")
PERIOD_COLUMNS = (
    "run_s",
    "effective_s",
    "rated_h",
    "utilisation_pct",
    "provisional_run_s",
    "provisional_effective_s",
    "energy_wh",
)


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: past it no date can be shown
MAX_PERIOD_DAYS = 400  # a utilisation query covers a year and a bit, not centuries
MAX_SIGNINS = 200
MAX_SERVICES = 200


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
        self.agent_down_after_s = AGENT_DOWN_AFTER_S
        """An agent not heard of for longer is down and its instruments UNKNOWN (a test shortens it)."""
        self.listeners: set[asyncio.Queue[str]] = set()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._refreshing: set[str] = set()
        self._pending: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.hours_at = 0
        self._heads: dict[bool, dict[str, tuple[Any, str, str, str]]] = {False: {}, True: {}}
        """Per view: each instrument's encoded live columns and the live record, status and agent they show."""
        """When the hours the last ``instruments()`` gave were computed (ms): a page counts on from there."""
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
        """``make()``, computed at most every CACHE_S. A value up to STALE_S old is answered at once and
        recomputed after the answer: at province scale the hours take a second or more to compute, and a
        page must not wait for that on every tenth-second load."""
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit and now - hit[0] < CACHE_S:
            return hit[1]
        if hit and now - hit[0] < STALE_S:
            with contextlib.suppress(RuntimeError):  # no event loop: compute now, below
                loop = asyncio.get_running_loop()
                if key not in self._refreshing:
                    self._refreshing.add(key)
                    self._pending[key] = make
                    loop.call_later(1.0, self._refresh_pending)  # if no answer runs them first
                return hit[1]
        value = make()
        if isinstance(value, Generator):
            value = _run_through(value)
        self._cache[key] = (now, value)
        return value

    def _refresh_pending(self) -> None:
        while self._pending:
            key, make = self._pending.popitem()
            self._refresh(key, make)

    async def _answer(self, request: web.Request, body: Any) -> web.Response:
        """A JSON answer (``body`` encoded here, or already a JSON text) sent before the recomputations it left pending run (they block the loop)."""
        text = body if isinstance(body, str) else _dumps(body)
        resp = web.Response(text=text, content_type="application/json")
        if self.token and request.query.get("token"):
            resp.set_cookie("labmeter_token", self.token, httponly=True, samesite="Strict")
        await resp.prepare(request)
        await resp.write_eof()
        if self._pending:  # the answer (megabytes) out of the process first
            t = request.transport
            for _ in range(100):
                if t is None or t.is_closing() or t.get_write_buffer_size() == 0:
                    break
                await asyncio.sleep(0.01)
            self._refresh_pending()
        return resp

    def _refresh(self, key: str, make: Any) -> None:
        """A recomputation that comes in steps (a generator) runs as a task that yields the loop between
        them: at province scale a whole one holds it for half a second or more, and ingest waits."""
        try:
            value = make()
            if isinstance(value, Generator):
                task = asyncio.get_running_loop().create_task(self._step_through(key, value))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            self._cache[key] = (time.monotonic(), value)
        except Exception:
            log.exception("recomputing the live view's %s failed; the last value stays", key)
        self._refreshing.discard(key)

    async def _step_through(self, key: str, steps: Generator[None, None, Any]) -> None:
        try:
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    self._cache[key] = (time.monotonic(), done.value)
                    return
                await asyncio.sleep(0)
        except Exception:
            log.exception("recomputing the live view's %s failed; the last value stays", key)
        finally:
            self._refreshing.discard(key)

    def _period_starts(self, now: int) -> dict[str, int]:
        cal = self.calendar
        year = datetime.fromtimestamp(now / 1000, self.tz).replace(month=1, day=1)
        return {
            "today": cal.day_floor(now),
            "month": cal.month_floor(now),
            "year": cal.day_floor(int(year.timestamp() * 1000)),
        }

    def _periods(self, now: int) -> dict[str, tuple[int, int]]:
        """Today, this month and this year as `labmeter report hours` takes them (whole local days, the
        period's end after now): so the report's rated hours, prorated to now, are the page's."""
        starts = self._period_starts(now)
        y = datetime.fromtimestamp(starts["year"] / 1000, self.tz)
        next_year = int(datetime(y.year + 1, 1, 1, tzinfo=self.tz).timestamp() * 1000)
        return {
            "today": (starts["today"], self.calendar.next_day(now)),
            "month": (starts["month"], self.calendar.next_month(now)),
            "year": (starts["year"], next_year),
        }

    def _usage(
        self, now: int, registry: dict[str, dict[str, Any]]
    ) -> Generator[None, None, dict[str, dict[str, tuple[int, ...]]]]:
        """Each instrument's (run, effective, rated, provisional run, provisional effective) ms today, this
        month and this year: the report's per-instrument hours (stored, verified intervals) and what the
        open interval adds."""
        c = self.collector
        policy = c.cfg.policy
        first = metering_starts(c.ledger)
        periods = self._periods(now)
        stored = {}
        for name, (a, b) in periods.items():
            yield
            stored[name] = per_instrument(c.ledger, a, b, policy, now, first)
        yield
        extra = yield from self._provisional(now, registry, {n: a for n, (a, _b) in periods.items()})
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, per in stored.items():
            for code, h in per.items():
                run_p, eff_p = extra.get(code, {}).get(name, (0, 0))
                energy = h.energy_mwh if h.energy_ms else -1  # -1: no energy measured
                out.setdefault(code, {})[name] = (h.run_ms, h.effective_ms, h.rated_ms, run_p, eff_p, energy)
        return out

    def _usage_shown(
        self, now: int, registry: dict[str, dict[str, Any]]
    ) -> Generator[None, None, dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]]]:
        """Each period's hours as the API gives them, without and with the open interval: built once per
        computation, not per request (5,000 instruments x 3 periods)."""
        usage = yield from self._usage(now, registry)
        out = {}
        for k, (code, per) in enumerate(usage.items()):
            if k % STEP_ROWS == STEP_ROWS - 1:
                yield
            out[code] = {p: (_usage_json(v, False), _usage_json(v, True)) for p, v in per.items()}
        return out

    def _provisional(
        self, now: int, registry: dict[str, dict[str, Any]], starts: dict[str, int]
    ) -> Generator[None, None, dict[str, dict[str, tuple[int, int]]]]:
        """Run and effective ms the open intervals add to each period: the open interval of every instrument
        whose agent is up, from after its last stored interval to now, judged with the stored ones around it
        by the same rules (:func:`labmeter.machine_hours.compute`). Agents cut intervals at every hour, so
        the stored neighbours are in the last two hours: one query for all instruments. A period that
        began before the window judged gives what any other such period gives: judged once."""
        c = self.collector
        opened: dict[str, tuple[int, str]] = {}
        for code, live in c.live.instruments.items():
            start, state, agent = live.get("start"), live.get("state"), live.get("agent")
            if (
                isinstance(start, int)
                and not isinstance(start, bool)
                and isinstance(state, str)
                and state in STATES
                and isinstance(agent, str)
                and not self._agent_down(agent, now)
                and start < now
            ):
                opened[code] = (start, str(state))
        if not opened:
            return {}
        policy = c.cfg.policy
        back = now - 2 * H
        rows: dict[str, list[tuple[int, int, str, bool]]] = {}
        for r in c.ledger.intervals_between(back, now):
            if r[0] in opened:
                rows.setdefault(r[0], []).append((int(r[3]), int(r[4]), str(r[5]), bool(r[6])))
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for k, (code, (start, state)) in enumerate(opened.items()):
            if k % STEP_ROWS == STEP_ROWS - 1:
                yield
            near = rows.get(code, [])
            lo = max([start, *(e for _s, e, _st, _l in near)])
            if lo >= now:
                continue
            prep, post = allowances_ms(registry.get(code, {}), policy)
            with_open = [*near, (lo, now, state, True)]
            judged: dict[int, tuple[int, int]] = {}
            for name, a in starts.items():
                w = max(a, lo - prep - post)
                if w >= now:
                    continue
                if w not in judged:
                    before, after = compute(near, w, now, prep, post), compute(with_open, w, now, prep, post)
                    judged[w] = (after.run_ms - before.run_ms, after.effective_ms - before.effective_ms)
                run, eff = judged[w]
                if run or eff:
                    out.setdefault(code, {})[name] = (run, eff)
        return out

    def _snapshot(self) -> tuple[int, dict[str, dict[str, Any]], Any, Any, dict[str, list[str]]]:
        """Now, the registry, the cached hours (as the list gives them and as the overview's encoded row
        tails) and the enrolments, as one answer uses them."""
        c = self.collector
        now = c.clock.wall_ms()
        # the registry changes on imports only: read with the hours, not on every request
        registry = self._cached("registry", c.ledger.instruments_by_code)
        self.hours_at, hours, tails = self._cached("usage", lambda: self._compute(now, registry))
        enrolled = self._cached("enrolled", self._enrolled)
        return now, registry, hours, tails, enrolled

    def _compute(
        self, now: int, registry: dict[str, dict[str, Any]]
    ) -> Generator[None, None, tuple[int, Any, Any]]:
        hours = yield from self._usage_shown(now, registry)
        tails = {}
        for public in (False, True) if self.public else (False,):
            yield
            tails[public] = yield from self._tails(registry, hours, public)
        return now, hours, tails

    def _tails(
        self, registry: dict[str, dict[str, Any]], hours: Any, public: bool
    ) -> Generator[None, None, dict[tuple[str, bool], str]]:
        """Each instrument's overview row after its live columns, encoded, with its agent up and down: built
        with the hours, so an answer encodes only what changes between recomputations."""
        out = {}
        for k, code in enumerate(hours):
            if k % STEP_ROWS == STEP_ROWS - 1:
                yield
            for up in (True, False):
                out[(code, up)] = self._tail(registry, hours, public, code, up)
        return out

    def _tail(
        self, registry: dict[str, dict[str, Any]], hours: Any, public: bool, code: str, up: bool
    ) -> str:
        _live_cols, reg_cols, hour_cols = self._columns(public)
        info = registry.get(code, {})
        per = hours.get(code, {})
        values: list[Any] = [info.get(k) or "" for k in reg_cols]
        for period in PERIODS:
            shown = per[period][up] if period in per else {}
            values += [shown.get(k) for k in hour_cols]
        return _dumps(values)[1:-1]

    def _agent_status(
        self,
        code: str,
        live: dict[str, Any] | None,
        enrolled: dict[str, list[str]],
        now: int,
        memo: dict[str, bool],
    ) -> tuple[str, str]:
        """The agent(s) shown for an instrument, and ``up``, ``down`` or ``none`` (no agent enrolled);
        ``memo`` keeps each agent's answer for the rest of one request."""
        reported = str(live.get("agent", "")) if live else ""
        agent = reported or ", ".join(enrolled.get(code, ()))
        if not agent:
            return agent, "none"
        judged = reported or enrolled[code][0]
        down = memo.get(judged)
        if down is None:
            down = memo[judged] = self._agent_down(judged, now)
        return agent, "down" if down else "up"

    @staticmethod
    def _live_fields(live: dict[str, Any] | None, agent: str, status: str) -> dict[str, Any]:
        """The state is UNKNOWN (the last one reported kept as ``last_state``) unless an agent is up for it:
        a badge from a silent agent is no state."""
        live = live or {}
        last = live.get("state")
        return {
            "state": last if status == "up" and last is not None else "UNKNOWN",
            "last_state": last,
            "since": live.get("start"),
            "power_w": live.get("power_w"),
            "error": live.get("error"),
            "agent": agent,
            "agent_status": status,
        }

    def _codes(self, registry: dict[str, dict[str, Any]]) -> list[str]:
        return sorted(set(registry) | set(self.collector.live.instruments))

    def instruments(self) -> list[dict[str, Any]]:
        """Every known instrument, its state now and its hours."""
        now, registry, hours, _tails, enrolled = self._snapshot()
        lives, memo = self.collector.live.instruments, dict[str, bool]()
        out = []
        for code in self._codes(registry):
            info = registry.get(code, {})
            agent, status = self._agent_status(code, lives.get(code), enrolled, now, memo)
            live = self._live_fields(lives.get(code), agent, status)
            out.append(
                {
                    "code": code,
                    "name": info.get("name") or "",
                    "unit": info.get("unit") or "",
                    "category": info.get("category") or "",
                    **live,
                    "agent_down": status != "up",
                    **{k: v[status == "up"] for k, v in hours.get(code, {}).items()},
                }
            )
        return out

    def _columns(self, public: bool) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """The overview's columns: live ones (read per answer), registry ones and each period's hours."""
        live: tuple[str, ...]
        if public:
            live = ("state", "since", "power_w") if self.public_power else ("state", "since")
            hours = tuple(k for k in PERIOD_COLUMNS if k != "energy_wh" or self.public_power)
        else:
            live, hours = LIVE_COLUMNS, PERIOD_COLUMNS
        return live, ("name", "unit", "category"), hours

    def overview(self, public: bool = False) -> str:
        """Every instrument as one row of values, the columns named once: the page's data in a quarter of the
        list's bytes. What comes from the registry and the cached hours is encoded once per recomputation;
        an answer encodes only the live columns."""
        now, registry, hours, tails, enrolled = self._snapshot()
        live_cols, reg_cols, hour_cols = self._columns(public)
        mine, heads = tails[public], self._heads[public]
        lives, memo = self.collector.live.instruments, dict[str, bool]()
        parts = []
        for code in self._codes(registry):
            live = lives.get(code)
            agent, status = self._agent_status(code, live, enrolled, now, memo)
            held = heads.get(code)
            if held is None or held[0] is not live or held[1] != status or held[2] != agent:
                fields = self._live_fields(live, agent, status)
                held = heads[code] = (
                    live,
                    status,
                    agent,
                    _dumps([code, *(fields[k] for k in live_cols)])[:-1],
                )
            up = status == "up"
            tail = mine.get((code, up)) or self._tail(registry, hours, public, code, up)
            parts.append(held[3] + "," + tail + "]")
        for gone in heads.keys() - lives.keys() - registry.keys():
            del heads[gone]
        columns = ["code", *live_cols, *reg_cols, *(f"{p}.{k}" for p in PERIODS for k in hour_cols)]
        head = {"now": now, "tz": str(self.tz), "columns": columns}
        if not public:
            head["hours_at"] = self.hours_at
        return _dumps(head)[:-1] + ',"rows":[' + ",".join(parts) + "]}"

    def _enrolled(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for agent, code in sorted(self.collector.ledger.enrolments()):
            out.setdefault(code, []).append(agent)
        return out

    def _agent_down(self, agent: str, now: int) -> bool:
        a = self.collector.live.agents.get(agent)
        if a is None or a.get("online") is not True or (received := _received_ms(a)) is None:
            return True
        return now - received > self.agent_down_after_s * 1000 * max(1.0, self.collector.clock.scale)

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
            if request.query.get("token") and not resp.prepared:  # an _answer has set it already
                resp.set_cookie("labmeter_token", self.token, httponly=True, samesite="Strict")
            return resp
        return await handler(request)

    async def page(self, request: web.Request) -> web.Response:
        return _page("live.html")

    async def api_instruments(self, request: web.Request) -> web.Response:
        rows = self.instruments()
        return await self._answer(
            request,
            {
                "now": self.collector.clock.wall_ms(),
                "hours_at": self.hours_at,
                "tz": str(self.tz),
                "instruments": rows,
            },
        )

    async def api_overview(self, request: web.Request) -> web.Response:
        return await self._answer(request, self.overview())

    async def public_overview(self, request: web.Request) -> web.Response:
        return await self._answer(request, self.overview(public=True))

    def _instrument(self, request: web.Request) -> str:
        """The path's instrument code: 400 if it cannot be one, 404 if no such instrument is known."""
        code = request.match_info["code"]
        if not ID_RE.fullmatch(code):
            raise BadRequest(f"code={_shown(code)}: an instrument code has letters, digits, '.', '_', '-'")
        if code not in self.collector.live.instruments and self.collector.ledger.instrument(code) is None:
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

    async def api_instrument(self, request: web.Request) -> web.Response:
        """One instrument as in the list: what its page shows at the top."""
        code = self._instrument(request)
        row = next((i for i in self.instruments() if i["code"] == code), None)
        if row is None:  # gone between the two reads
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"no instrument {code!r}"}), content_type="application/json"
            )
        return await self._answer(
            request, {"now": self.collector.clock.wall_ms(), "tz": str(self.tz), "instrument": row}
        )

    async def api_services(self, request: web.Request) -> web.Response:
        """Service records (bookings) overlapping a range: when, what kind and for which unit; no names."""
        code = self._instrument(request)
        now = self.collector.clock.wall_ms()
        b = _time_param(request, "to", now, self.tz)
        a = _time_param(request, "from", b - 7 * DAY, self.tz)
        if b <= a:
            raise BadRequest("to must be after from")
        if b - a > 31 * DAY:
            raise BadRequest("from, to: service records span at most 31 days")
        rows = self.collector.ledger.service_records(a, b, code)[-MAX_SERVICES:]
        keep = ("start_ms", "end_ms", "service_type", "direction", "applicant_unit")
        return web.json_response(
            {
                "instrument": code,
                "from": a,
                "to": b,
                "services": [{k: _service_value(r.get(k)) for k in keep} for r in rows],
            },
            dumps=_dumps,
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
        return await self._answer(
            request, {"now": self.collector.clock.wall_ms(), "tz": str(self.tz), "instruments": rows}
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
        app.router.add_get("/api/overview", self.api_overview)
        app.router.add_get("/api/instruments/{code}/timeline", self.api_timeline)
        app.router.add_get("/api/utilisation", self.api_utilisation)
        app.router.add_get("/api/agents", self.api_agents)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/api/openapi.json", self.api_openapi)
        app.router.add_get("/api/instruments/{code}/signins", self.api_signins)
        app.router.add_get("/api/instruments/{code}/services", self.api_services)
        app.router.add_get("/api/instruments/{code}", self.api_instrument)
        app.router.add_get("/instrument/{code}", self.instrument_page)
        app.router.add_get("/metrics", self.metrics)
        if self.public:
            app.router.add_get("/public", self.page)
            app.router.add_get("/public/api/instruments", self.public_api)
            app.router.add_get("/public/api/overview", self.public_overview)
        return app

    async def start(self) -> None:
        host, port = split_listen(self.listen)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = int(self._runner.addresses[0][1])  # the port bound, also when listen asked for port 0
        log.info("live view on http://%s:%d/", host, self.port)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
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


def _run_through(steps: Generator[None, None, Any]) -> Any:
    """A stepwise computation at once (nothing else to let run: the caller waits for it)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _dumps(obj: Any) -> str:
    """UTF-8 JSON without escapes; msgspec, because the instruments list of a province is megabytes."""
    return msgspec.json.encode(obj).decode()


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage_json(v: tuple[int, ...], live: bool) -> dict[str, Any]:
    """A period's hours as the API gives them; the open interval counts only while its agent is up."""
    run, effective, rated, run_p, eff_p, mwh = v if live else (*v[:3], 0, 0, v[5])
    return {
        "energy_wh": mwh / 1000 if mwh >= 0 else None,
        "run_h": round((run + run_p) / H, 2),
        "effective_h": round((effective + eff_p) / H, 2),
        "run_s": (run + run_p) / 1000,
        "effective_s": (effective + eff_p) / 1000,
        "rated_h": round(rated / H, 2),
        "utilisation_pct": utilisation_pct(effective + eff_p, rated),
        "provisional_run_s": run_p / 1000,
        "provisional_effective_s": eff_p / 1000,
    }


def _service_value(value: Any) -> int | str | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return str(value)[:200]
