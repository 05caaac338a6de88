"""The time-series sink: hourly usage, state changes, agents up/down and power, as InfluxDB line protocol.

Usage cannot multiply. Stores differ on "same series and timestamp": InfluxDB overwrites,
VictoriaMetrics with its default flags keeps every sample, even an identical one. So no
usage point is ever sent twice: an hour is written once it is final (its allowances and a
grace time have passed and no rollup of it waits for a refresh), at ``hour start + 1 ms``;
when the ledger's hour changes later (late intervals, allowances changed), the difference
is written as a correction at ``hour start + rev ms``. The ledger keeps what was written per
hour (``sink_hours``), so the sum of an hour's points always equals the ledger's hour, on any
store, over any range of whole hours. Hours not yet final are in ``labmeter_usage_current``:
one point per round holding what the final points still lack, for "now"; never summed.

The sink follows the ledger, never blocks it: the collector's ingest only notes what is
stale; this reads rollups and intervals (a cursor on the time intervals were stored) on
its own schedule. State changes come from the collector's live stream as they happen and
are confirmed by the closed intervals; power comes from the agents' signed power messages.
States are numbers, never strings: ``code`` (see :data:`STATE_CODE`) and one 0/1 field per state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from influxdb_client import WritePrecision
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

from labmeter.collector.ledger import SINK_VALUES, Ledger
from labmeter.collector.ledger.rollup import HOUR, Rollups, allowances_ms
from labmeter.collector.reports.hours import YEAR_MS, rated_ms
from labmeter.config import InfluxConfig, PolicyConfig, read_secret
from labmeter.machine_hours import HOUR_MS as H
from labmeter.netutil import redact_text, redact_url

log = logging.getLogger("labmeter.sink")

STATE_CODE = {"OFF": 0, "STANDBY": 1, "RUNNING": 2, "UNKNOWN": -1}
STATE_FIELD = {"OFF": "off", "STANDBY": "standby", "RUNNING": "running", "UNKNOWN": "unknown"}
USAGE = "labmeter_usage"
CURRENT = "labmeter_usage_current"
STATE = "labmeter_state"
AGENT = "labmeter_agent"
POWER = "labmeter_power"
USAGE_FIELDS = ("run_s", "standby_s", "off_s", "unknown_s", "effective_s")
"""Fields of USAGE and CURRENT; ``unknown_s`` is unknown plus unverified time."""
POWER_FIELDS = ("mean_w", "min_w", "max_w", "n", "energy_wh")
INSTRUMENT = "labmeter_instrument"
TAGS = ("instrument", "unit", "category")
SERIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    USAGE: (USAGE_FIELDS, TAGS),
    CURRENT: (USAGE_FIELDS, TAGS),
    STATE: (("code", *STATE_FIELD.values()), TAGS),
    POWER: (POWER_FIELDS, TAGS),
    INSTRUMENT: (("rated_h",), TAGS),
    AGENT: (("up",), ("agent",)),
}
"""Every measurement the sink writes: (fields, tags). VictoriaMetrics names a field's series
``<measurement>_<field>``; the dashboards in config/grafana/ read exactly these (tests/test_grafana.py)."""

CURSOR = "influxdb"
SETTLE_MS = 2_000  # rows stored in the last moments wait for the next round, so none slips past the cursor
GRACE_MS = 120_000  # an hour is final this long after its allowances have passed
LOOKBACK_MS = 48 * H  # hours compared with the ledger every round; older ones at start and every RECONCILE_MS
RECONCILE_MS = H
REFRESH_STEPS = 4
RESET_EVERY_S = 30.0  # VictoriaMetrics' query cache is reset at most this often (if past points were written)
LEASE_MS = 120_000  # a collector that stops renewing leaves the hours to another after this long
REFRESH_EVERY_MS = 60_000  # agents' up/down and the pending usage rewritten at least this often
LIVE_MAX = 20_000  # live points waiting for the store; the oldest go first (states return from the ledger)
CHUNK = 5_000  # lines per write
EARLIEST_MS = 946_684_800_000
FUTURE_MS = 86_400_000


def _tag(v: object) -> str:
    text = "" if v is None else str(v).replace("\n", " ").replace("\r", " ")
    return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ") or "-"


def _num(x: float) -> str:
    return repr(round(float(x), 6))


def usage_line(tags: str, values: Sequence[int], ts: int, measurement: str = USAGE) -> str:
    """One usage point from SINK_VALUES in milliseconds."""
    run, standby, off, unknown, unverified, effective = values
    seconds = (run, standby, off, unknown + unverified, effective)
    fields = ",".join(f"{f}={_num(ms / 1000)}" for f, ms in zip(USAGE_FIELDS, seconds, strict=True))
    return f"{measurement},{tags} {fields} {ts}"


def state_line(tags: str, state: str, ts: int) -> str:
    flags = ",".join(f"{f}={int(s == state)}i" for s, f in STATE_FIELD.items())
    return f"{STATE},{tags} code={STATE_CODE[state]}i,{flags} {ts}"


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class InfluxSink:
    def __init__(
        self,
        cfg: InfluxConfig,
        ledger: Ledger,
        policy: PolicyConfig,
        settle_ms: int = SETTLE_MS,
        grace_ms: int = GRACE_MS,
        now_ms: Callable[[], int] | None = None,
        holder: str | None = None,
        reset_every_s: float = RESET_EVERY_S,
    ) -> None:
        self.cfg = cfg
        self.settle_ms = settle_ms
        self.grace_ms = grace_ms
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.ledger = ledger
        self.policy = policy
        token = read_secret(cfg.token_file, "InfluxDB token file") if cfg.token_file else ""
        self.client = InfluxDBClientAsync(url=cfg.url, token=token, org=cfg.org, timeout=10_000)
        self._auth = {"Authorization": f"Token {token}"} if token else {}
        self.sent = 0
        self.live: deque[str] = deque(maxlen=LIVE_MAX)
        self.dropped = 0
        self._registry: dict[str, dict[str, object]] = {}
        self._enrolled: set[tuple[str, str]] = set()
        self._loaded = -1e18
        self._last_state: dict[str, tuple[int, str]] = {}
        self._agents: dict[str, bool] = {}
        self._agents_at = -1e18
        self._touched: dict[str, int] = {}
        self._reconciled = -1e18
        self._pending: dict[str, tuple[tuple[int, ...], int]] = {}
        self.holder = holder or f"{socket.gethostname()}:{ledger.name}"
        """Names this collector in the sink lease: the same after a restart, so a restarted one goes on at once."""
        self._leader: bool | None = None
        self.reset_every_s = reset_every_s
        self._stale = False  # points for past times written since the store's query cache was last reset
        self._reset_at = -1e18

    # tags and the registry ---------------------------------------------------
    def _reload(self, force: bool = False) -> None:
        if force or time.monotonic() - self._loaded > 10:
            self._registry = self.ledger.instruments_by_code()
            self._enrolled = self.ledger.enrolments()
            self._loaded = time.monotonic()

    def _tags(self, instrument: str, info: dict[str, object] | None = None) -> str:
        info = self._registry.get(instrument, {}) if info is None else info
        return f"instrument={_tag(instrument)},unit={_tag(info.get('unit'))},category={_tag(info.get('category'))}"

    def _is_enrolled(self, agent: object, instrument: object) -> bool:
        key = (str(agent), str(instrument))
        if key not in self._enrolled:
            self._reload()
        return key in self._enrolled

    # the live stream ---------------------------------------------------------
    def on_live(self, kind: str, data: dict[str, Any]) -> None:
        """The collector's live-state hook: queue points for the next flush. Never raises, never waits."""
        try:
            line = self._live_line(kind, data)
        except Exception:
            log.exception("live %s event for the time-series store", kind)
            return
        if line is not None:
            if len(self.live) == self.live.maxlen:
                self.dropped += 1
            self.live.append(line)

    def _live_line(self, kind: str, data: dict[str, Any]) -> str | None:
        if kind == "agent":
            agent, online = data.get("agent"), data.get("online")
            if isinstance(agent, str) and isinstance(online, bool) and agent in self._known_agents():
                self._agents[agent] = online
                return f"{AGENT},agent={_tag(agent)} up={int(online)}i {self.now_ms()}"
            return None
        instrument, agent = data.get("instrument"), data.get("agent")
        if not self._is_enrolled(agent, instrument):
            return None
        code = str(instrument)
        if kind == "state":
            state, start = data.get("state"), _int(data.get("start"))
            if state not in STATE_CODE or start is None or not self._plausible(start):
                return None
            if self._last_state.get(code) == (start, state):
                return None
            self._last_state[code] = (start, str(state))
            return state_line(self._tags(code), str(state), start)
        if kind == "power":
            start = _int(data.get("start"))
            values = [data.get(f) for f in POWER_FIELDS]
            if start is None or not self._plausible(start):
                return None
            fields = ",".join(
                f"{f}={int(v)}i" if f == "n" else f"{f}={_num(v)}"
                for f, v in zip(POWER_FIELDS, values, strict=True)
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            )
            return f"{POWER},{self._tags(code)} {fields} {start}" if fields else None
        return None

    def _known_agents(self) -> set[str]:
        agents = {a for a, _ in self._enrolled}
        if not agents:
            self._reload()
            agents = {a for a, _ in self._enrolled}
        return agents

    def _plausible(self, t: int) -> bool:
        return EARLIEST_MS <= t <= self.now_ms() + FUTURE_MS

    # writing -----------------------------------------------------------------
    async def _write(self, lines: list[str]) -> None:
        for i in range(0, len(lines), CHUNK):
            await self.client.write_api().write(
                bucket=self.cfg.bucket,
                org=self.cfg.org,
                record=lines[i : i + CHUNK],
                write_precision=cast(WritePrecision, WritePrecision.MS),
            )

    async def flush(self) -> int:
        """Send live points, the states of intervals stored since the cursor, and usage; returns points sent."""
        self._reload(force=True)
        sent = await self._send_live()
        if not self._lease():
            self.sent += sent
            return sent  # another collector sharing the ledger writes the hours and the confirmed states
        old = await self._send_states()
        old += await self._send_usage()
        if self._stale and time.monotonic() - self._reset_at >= self.reset_every_s:
            await self._reset_cache()
        self.sent += sent + old
        return sent + old

    def _lease(self) -> bool:
        """Whether this sink writes what comes from the ledger: with several collectors on one ledger, one does,
        or every hour would be written once by each."""
        held = self.ledger.take_sink_lease(CURSOR, self.holder, int(time.time() * 1000), LEASE_MS)
        if held != self._leader:
            self._leader = held
            log.info("this collector %s the hours to %s", "writes" if held else "leaves", self.cfg.url)
        return held

    async def _reset_cache(self) -> None:
        """VictoriaMetrics caches query results for times older than five minutes, and points for past hours
        (finals, corrections, confirmed states) land there; reset the cache so no dashboard reads a stale sum.
        Other stores have no such endpoint and answer 404, which is ignored."""
        import aiohttp

        self._stale, self._reset_at = False, time.monotonic()
        with contextlib.suppress(Exception):
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(
                    f"{self.cfg.url.rstrip('/')}/internal/resetRollupResultCache", headers=self._auth
                ) as resp,
            ):
                await resp.read()

    async def _send_live(self) -> int:
        now = self.now_ms()
        if time.monotonic() - self._agents_at > REFRESH_EVERY_MS / 1000:
            self._agents_at = time.monotonic()
            self.live.extend(f"{AGENT},agent={_tag(a)} up={int(up)}i {now}" for a, up in self._agents.items())
            self.live.extend(
                f"{INSTRUMENT},{self._tags(code, info)} rated_h={_num(rated_ms(info, self.policy, YEAR_MS) / H)} {now}"
                for code, info in sorted(self._registry.items())
            )
        lines = list(self.live)
        if not lines:
            return 0
        self.live.clear()
        try:
            await self._write(lines)
        except BaseException:
            arrived = list(self.live)  # what came while writing; the oldest go first if it is too much
            self.live.clear()
            self.live.extend(lines + arrived)
            raise
        return len(lines)

    async def _send_states(self) -> int:
        """A state point at each stored interval's start: the closed intervals confirm the live points."""
        sent = 0
        cursor = self.ledger.sink_cursor(CURSOR)
        now = int(time.time() * 1000) - self.settle_ms  # the ledger stamps received_ms with the host's clock
        saved = time.monotonic()
        while cursor < now:
            # a page at a time: a catch-up over a whole history is one query otherwise (a second or more)
            rows, cursor = self.ledger.received_between(cursor, now, CHUNK)
            lines = []
            for instrument, _agent, start, _end, state in rows:
                lines.append(state_line(self._tags(instrument), state, start))
                self._touched[instrument] = min(self._touched.get(instrument, start), start)
            if lines:
                await self._write(lines)
                self._stale = True
                sent += len(lines)
            # kept at most every second and at the end: a restart sends again what came after, points that
            # overwrite themselves, where a commit per page (an fsync) held the loop
            if cursor >= now or time.monotonic() - saved >= 1.0:
                self.ledger.set_sink_cursor(CURSOR, cursor)
                saved = time.monotonic()
        return sent

    async def _send_usage(self) -> int:
        """Final hours not written yet or changed since, as corrections; then what is still pending."""
        rollups = Rollups(self.ledger, self.policy)
        rollups.refresh(steps=REFRESH_STEPS, wait=False)
        registry = rollups.registry()
        cal = rollups.calendar
        floors = self.ledger.dirty_floors()
        now = self.now_ms()
        full = now - self._reconciled >= RECONCILE_MS or self._reconciled > now
        touched, self._touched = self._touched, {}
        lines: list[str] = []
        records: list[tuple[str, int, int, Sequence[int]]] = []
        current: list[str] = []
        pending_of: list[str] = []
        zero = (0,) * len(SINK_VALUES)
        sent = 0

        async def push() -> None:
            """Write what is gathered, then note it as written (a chunk at a time: memory stays bounded)."""
            nonlocal lines, records, sent
            if not lines:
                return
            if sent and not self._lease():
                raise RuntimeError("lost the sink lease to another collector; it goes on from here")
            await self._write(lines)
            self._stale = True
            self.ledger.record_sink_hours(CURSOR, records)
            sent += len(lines)
            lines, records = [], []

        try:
            for code in sorted(self.ledger.rollup_basis()):
                info = registry.get(code, {})
                tags = self._tags(code, info)
                pad = max(allowances_ms(info, self.policy))
                frontier = cal.hour_floor(min(now - self.grace_ms, floors.get(code, now)) - pad)
                recent = min(now - LOOKBACK_MS, touched.get(code, now) - pad)
                lo = 0 if full else max(0, cal.hour_floor(recent))
                want = self._ledger_hours(code, lo, now + FUTURE_MS)
                have = self.ledger.sink_hours(CURSOR, code, lo, now + FUTURE_MS)
                pending = [0] * len(SINK_VALUES)
                for start in sorted(set(want) | set(have)):
                    values = want.get(start, zero)
                    rev, *written = have.get(start, (0, *zero))
                    if tuple(written) == values:
                        continue
                    delta = [w - x for w, x in zip(values, written, strict=True)]
                    if start >= frontier:
                        pending = [p + d for p, d in zip(pending, delta, strict=True)]
                        continue
                    if rev + 1 >= H:
                        log.error("%s: hour %d was corrected %d times; not writing more", code, start, rev)
                        continue
                    lines.append(usage_line(tags, delta, start + rev + 1))
                    records.append((code, start, rev + 1, values))
                last = self._pending.get(code)
                if last is None or last[0] != tuple(pending) or now - last[1] >= REFRESH_EVERY_MS:
                    current.append(usage_line(tags, pending, now, CURRENT))
                    pending_of.append(code)
                    self._pending[code] = (tuple(pending), now)
                if len(lines) >= CHUNK:
                    await push()
                else:
                    await asyncio.sleep(0)  # a full comparison reads every hour: let ingest run in between
            await push()
            if current:
                await self._write(current)
        except BaseException:
            for code, t in touched.items():  # look at them again next round
                self._touched[code] = min(self._touched.get(code, t), t)
            for code in pending_of:  # not written: write them next round
                self._pending.pop(code, None)
            raise
        if full:
            self._reconciled = now
        return sent + len(current)

    def _ledger_hours(self, code: str, lo: int, hi: int) -> dict[int, tuple[int, ...]]:
        return {
            int(r[0]): tuple(int(x) for x in r[1:])
            for r in self.ledger.rollup_rows(code, HOUR, lo, hi, SINK_VALUES)
        }

    async def run(self) -> None:
        backoff = self.cfg.every_s
        while True:
            try:
                await self.flush()
                backoff = self.cfg.every_s
            except Exception as exc:
                log.warning(
                    "time-series store %s: %s; retrying in %.0f s (ingestion goes on)",
                    redact_url(self.cfg.url),
                    redact_text((str(exc).splitlines() or [type(exc).__name__])[0][:200], self.cfg.url),
                    backoff,
                )
                backoff = min(backoff * 2, 300.0)
            await asyncio.sleep(backoff)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._leader:
                self.ledger.take_sink_lease(CURSOR, self.holder, int(time.time() * 1000), -LEASE_MS)
        await self.client.close()
