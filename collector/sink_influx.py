"""The time-series sink: state changes and per-hour usage (the hourly rollups) as InfluxDB line protocol.

It follows the ledger, never the MQTT stream: a cursor on the time intervals were
stored says what is not sent yet, so an outage of the time-series store never blocks
or loses ingestion, and the sink catches up when the store is back. Points are keyed
by series and timestamp, so sending them again overwrites instead of double counting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from influxdb_client import WritePrecision
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

from labmeter.collector.ledger import Ledger
from labmeter.collector.rollup import HOUR, Rollups, allowances_ms
from labmeter.config import InfluxConfig, PolicyConfig, read_secret
from labmeter.netutil import redact_text, redact_url

log = logging.getLogger("labmeter.sink")
H = 3_600_000
STATE_CODE = {"OFF": 0, "STANDBY": 1, "RUNNING": 2, "UNKNOWN": -1}
CURSOR = "influxdb"
WINDOW_MS = 60_000
SETTLE_MS = 2_000  # rows stored in the last moments wait for the next round, so none slips past the cursor


def _tag(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ") or "-"


def points(ledger: Ledger, rows: list[tuple[str, str, int, int, str]], policy: PolicyConfig) -> list[str]:
    """Line protocol for new intervals: a state point at each start, and the hourly rollups of the hours
    they (and the allowances around them) touch."""
    rollups = Rollups(ledger, policy)
    rollups.refresh()
    registry = rollups.registry()
    cal = rollups.calendar
    lines: list[str] = []
    reach: dict[str, tuple[int, int]] = {}
    for instrument, agent, start, end, state in rows:
        info = registry.get(instrument, {})
        tags = f"instrument={_tag(instrument)},agent={_tag(agent)},unit={_tag(info.get('unit'))},category={_tag(info.get('category'))}"
        lines.append(f'labmeter_state,{tags} state_code={STATE_CODE[state]}i,state="{state}" {start}')
        lo, hi = reach.get(instrument, (start, end))
        reach[instrument] = (min(lo, start), max(hi, end))
    for instrument, (lo, hi) in reach.items():
        info = registry.get(instrument, {})
        pad = max(allowances_ms(info, policy))
        tags = f"instrument={_tag(instrument)},unit={_tag(info.get('unit'))},category={_tag(info.get('category'))}"
        first, last = cal.hour_floor(lo - pad), cal.hour_ceil(hi + pad)
        for hour, run, standby, off, unknown, unverified, effective in ledger.rollup_rows(
            instrument,
            HOUR,
            first,
            last,
            ("run_ms", "standby_ms", "off_ms", "unknown_ms", "unverified_ms", "effective_ms"),
        ):
            lines.append(
                f"labmeter_usage,{tags} run_s={run / 1000},standby_s={standby / 1000},"
                f"off_s={off / 1000},unknown_s={(unknown + unverified) / 1000},"
                f"effective_s={effective / 1000} {hour}"
            )
    return lines


class InfluxSink:
    def __init__(
        self, cfg: InfluxConfig, ledger: Ledger, policy: PolicyConfig, settle_ms: int = SETTLE_MS
    ) -> None:
        self.cfg = cfg
        self.settle_ms = settle_ms
        self.ledger = ledger
        self.policy = policy
        token = read_secret(cfg.token_file, "InfluxDB token file") if cfg.token_file else ""
        self.client = InfluxDBClientAsync(url=cfg.url, token=token, org=cfg.org, timeout=10_000)
        self.sent = 0

    async def flush(self) -> int:
        """Send everything stored since the cursor, a minute of ingest at a time; returns the points sent."""
        sent = 0
        cursor = self.ledger.sink_cursor(CURSOR)
        now = int(time.time() * 1000) - self.settle_ms
        while cursor < now:
            upto = min(now, cursor + WINDOW_MS) if cursor else now
            rows = self.ledger.received_between(cursor, upto)
            if rows:
                lines = points(self.ledger, rows, self.policy)
                await self.client.write_api().write(
                    bucket=self.cfg.bucket,
                    org=self.cfg.org,
                    record=lines,
                    write_precision=cast(WritePrecision, WritePrecision.MS),
                )
                sent += len(lines)
            cursor = upto
            self.ledger.set_sink_cursor(CURSOR, cursor)
        self.sent += sent
        return sent

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
        await self.client.close()
