"""``/metrics``: the collector's counters and backlogs in the Prometheus text format (version 0.0.4).

Counters are totals since the collector started (Prometheus's ``rate()`` turns them into rates); the
ingest rate over the last minute is given as a gauge too, for a glance without a query. Label values
are the collector's own words (rejection reasons cut at their first colon, channel names from the
config), escaped all the same. docs/metrics.md lists every metric and a scrape config.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labmeter.collector.service import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RATE_WINDOW_S = 60.0
OUTCOMES = (
    "stored",
    "rejected",
    "signins",
    "dropped",
    "dropped_inbox",
    "retained",
    "empty",
    "status_ignored",
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')[:200]


class Metrics:
    """Renders one collector's metrics; keeps the samples behind the ingest-rate gauge (bounded)."""

    def __init__(self, collector: Collector) -> None:
        self.c = collector
        self._samples: deque[tuple[float, int]] = deque(maxlen=1000)

    def _rate(self) -> float:
        now, stored = time.monotonic(), self.c.stats["stored"]
        self._samples.append((now, stored))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (stored - n0) / (now - t0) if now > t0 else 0.0

    def render(self, agents_online: int) -> str:
        c = self.c
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
            out.append(f"# HELP labmeter_{name} {help_}")
            out.append(f"# TYPE labmeter_{name} {kind}")
            out.extend(f"labmeter_{name}{labels} {value:g}" for labels, value in rows)

        metric(
            "messages_total",
            "counter",
            "Messages handled since start, by outcome.",
            [(f'{{outcome="{o}"}}', c.stats[o]) for o in OUTCOMES],
        )
        metric(
            "ingest_intervals_per_second",
            "gauge",
            "Intervals stored per second over the last minute.",
            [("", round(self._rate(), 3))],
        )
        metric(
            "rejections_total",
            "counter",
            "Rejected messages since start, by reason.",
            [(f'{{reason="{_label(r)}"}}', n) for r, n in sorted(c.rejections.items())],
        )
        registered = len(c.verifier.keys)
        metric("agents_registered", "gauge", "Agents in the registry.", [("", registered)])
        metric(
            "agents_online",
            "gauge",
            "Registered agents whose signed status is online and fresh.",
            [("", agents_online)],
        )
        pending = sum(
            p
            for a in c.live.agents.values()
            if a.get("verified") is True
            and isinstance(p := a.get("pending"), int)
            and not isinstance(p, bool)
        )
        metric(
            "ack_backlog_messages",
            "gauge",
            "Messages the agents hold unacknowledged, as their last signed status says.",
            [("", pending)],
        )
        metric(
            "inbox_messages",
            "gauge",
            "Messages received and not yet verified and stored.",
            [("", len(c.inbox))],
        )
        metric(
            "rollup_backlog_ranges",
            "gauge",
            "Marked ranges waiting for a rollup refresh.",
            [("", c.ledger.rollup_backlog())],
        )
        if c.sink is not None:
            from labmeter.collector.sink_influx import CURSOR

            newest = c.ledger.last_received_ms() or 0
            lag = max(0, newest - c.ledger.sink_cursor(CURSOR)) / 1000 if newest else 0.0
            metric(
                "sink_lag_seconds",
                "gauge",
                "How far the time-series sink's cursor is behind the newest stored interval.",
                [("", lag)],
            )
            metric(
                "sink_points_dropped_total",
                "counter",
                "Live points the sink dropped (store unreachable).",
                [("", c.sink.dropped)],
            )
        if c.alerts is not None:
            a = c.alerts
            metric(
                "alerts_active", "gauge", "Alerts that fired and have not recovered.", [("", len(a.active))]
            )
            queued = a.queued()
            metric(
                "alert_queue_messages",
                "gauge",
                "Alert messages waiting for delivery, by channel.",
                [(f'{{channel="{_label(n)}"}}', queued.get(n, 0)) for n in a.channels],
            )
            metric(
                "alert_events_total",
                "counter",
                "Alert events since start, by kind.",
                [
                    (f'{{kind="{k}"}}', a.counts[k])
                    for k in ("fired", "resolved", "reminded", "delivered", "failed", "given_up")
                ],
            )
        return "\n".join(out) + "\n"
