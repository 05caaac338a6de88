"""``/metrics`` answers in the Prometheus text format with what the collector really did, behind the
live view's token; label values that come from messages cannot break the exposition."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from pathlib import Path

from labmeter import wire
from labmeter.collector.live.web import LiveView
from labmeter.collector.service import Collector
from tests.attack import genuine_start, make_lab, process

LINE = re.compile(r'^labmeter_[a-z_]+(\{[a-z_]+="(?:[^"\\\n]|\\.)*"\})? -?[0-9.e+]+$')


def get(url: str, token: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", ""


def parse(text: str) -> dict[str, float]:
    out = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        assert LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        assert name.split("{")[0] in typed, f"{name} has no TYPE line"
        out[name] = float(value)
    return out


def test_metrics_count_what_the_collector_did(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    c = Collector(lab.cfg)
    process(c, genuine_start(lab))
    forged = lab.sign(
        "agent-b", wire.dump_body(wire.Interval("agent-a", "I1", 9, wire.GENESIS, 0, 1, "OFF").body())
    )
    process(c, [(wire.interval_topic("agent-a", "I1"), forged)])
    c.rejections['evil "reason"\nlabmeter_agents_online 999'] += 1  # as if a reason carried a sender's text
    now = c.clock.wall_ms()
    c.live.agents["agent-a"] = {"verified": True, "online": True, "received": now, "pending": 7}
    c.live.agents["agent-b"] = {"verified": True, "online": False, "received": now, "pending": 2}
    (tmp_path / "token").write_text("metrics-token\n")

    async def main() -> list[tuple[int, str, str]]:
        view = LiveView(c, "127.0.0.1:0", token="metrics-token")
        await view.start()
        url = f"http://127.0.0.1:{view.port}/metrics"
        loop = asyncio.get_running_loop()
        try:
            return [
                await loop.run_in_executor(None, get, url),
                await loop.run_in_executor(None, get, url, "metrics-token"),
            ]
        finally:
            await view.stop()

    try:
        (denied, _, _), (status, ctype, text) = asyncio.run(main())
    finally:
        c.ledger.close()
    assert denied == 401
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), ctype
    m = parse(text)
    assert m['labmeter_messages_total{outcome="stored"}'] == 3
    assert m['labmeter_messages_total{outcome="rejected"}'] == 1
    assert sum(v for k, v in m.items() if k.startswith("labmeter_rejections_total")) == 2
    assert m["labmeter_agents_registered"] == 2 and m["labmeter_agents_online"] == 1
    assert m["labmeter_ack_backlog_messages"] == 9
    assert m["labmeter_inbox_messages"] == 0
    assert m["labmeter_rollup_backlog_ranges"] >= 1  # stored intervals mark their rollups stale
    assert "labmeter_ingest_intervals_per_second" in m
    assert 'reason="evil \\"reason\\"\\nlabmeter_agents_online 999"' in text


def test_sink_lag_and_alert_queue(tmp_path: Path) -> None:
    """The sink's lag is its cursor behind the newest stored interval; the alerts' queue is per channel.
    (The sink here is a stand-in with its counter: the cursor is the ledger's, as the real sink keeps it.)"""
    from types import SimpleNamespace

    from labmeter import config
    from labmeter.collector.alerts import Alerter
    from labmeter.collector.metrics import Metrics
    from labmeter.collector.sink_influx import CURSOR

    lab = make_lab(tmp_path)
    c = Collector(lab.cfg)
    try:
        process(c, genuine_start(lab))
        newest = c.ledger.last_received_ms()
        assert newest is not None
        c.ledger.set_sink_cursor(CURSOR, newest - 42_000)
        c.sink = SimpleNamespace(dropped=3)  # type: ignore[assignment]
        cfg = config.AlertsConfig(webhook=[config.WebhookChannel(url="http://127.0.0.1:9/hook")])
        c.alerts = Alerter(cfg, c.ledger, c.live, c.cfg.policy, c.clock, lambda: 0)
        c.alerts.started_ms -= 3_600_000
        c.alerts.evaluate()
        m = parse(Metrics(c).render(0))
        assert m["labmeter_sink_lag_seconds"] == 42 and m["labmeter_sink_points_dropped_total"] == 3
        assert m['labmeter_alert_queue_messages{channel="webhook-1"}'] == 2  # the two silent agents
        assert m["labmeter_alerts_active"] == 2 and m['labmeter_alert_events_total{kind="fired"}'] == 2
    finally:
        c.ledger.close()


def test_odd_live_values_neither_break_nor_inflate_the_exposition(tmp_path: Path) -> None:
    from labmeter.collector.metrics import Metrics

    lab = make_lab(tmp_path)
    c = Collector(lab.cfg)
    try:
        c.live.agents["agent-a"] = {"verified": True, "online": True, "received": "soon", "pending": True}
        c.live.agents["agent-b"] = {"verified": True, "online": "yes", "received": None, "pending": "7"}
        c.live.agents["agent-c"] = {"verified": False, "pending": 5}  # an unsigned status says nothing
        c.live.agents["agent-d"] = {"verified": True, "pending": 4}
        m = parse(Metrics(c).render(0))
        assert m["labmeter_ack_backlog_messages"] == 4 and m["labmeter_agents_registered"] == 2
    finally:
        c.ledger.close()
