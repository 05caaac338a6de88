"""The alerts' two ledger tables on SQLite and PostgreSQL: a check's alerts and messages are written together,
each channel's queue is bounded (the oldest go) and delivered in order, and a channel no longer
configured loses its queue."""

from __future__ import annotations

from typing import Any

from labmeter.collector.ledger import ActiveAlert


def test_alert_state_and_queue(any_ledger: Any) -> None:
    ledger = any_ledger
    assert ledger.active_alerts() == [] and ledger.next_alert_message("hook") is None
    a = ActiveAlert("unknown:X1", "unknown", 1000, 2000, '{"code": "X1", "name": "质谱仪"}')
    ledger.record_alerts([a], [], [("hook", "m1"), ("robot", "m1")], 2000, keep=3)
    assert ledger.active_alerts() == [a]
    ledger.record_alerts([a._replace(fired_ms=9000)], [], [("hook", "m2")], 9000, keep=3)  # a reminder
    assert ledger.active_alerts() == [a._replace(fired_ms=9000)]
    assert ledger.alert_queue() == {"hook": 2, "robot": 1}
    first = ledger.next_alert_message("hook")
    assert first is not None and first.body == "m1" and first.attempts == 0
    ledger.alert_attempted(first.id)
    again = ledger.next_alert_message("hook")
    assert again is not None and again.id == first.id and again.attempts == 1
    ledger.alert_done(first.id)
    nxt = ledger.next_alert_message("hook")
    assert nxt is not None and nxt.body == "m2"
    ledger.record_alerts([], ["unknown:X1"], [("hook", f"r{i}") for i in range(5)], 10_000, keep=3)
    assert ledger.active_alerts() == []
    assert ledger.alert_queue() == {"hook": 3, "robot": 1}  # bounded: m2, r0, r1 went
    bodies = []
    while (item := ledger.next_alert_message("hook")) is not None:
        bodies.append(item.body)
        ledger.alert_done(item.id)
    assert bodies == ["r2", "r3", "r4"]
    assert ledger.drop_alert_channels(["hook"]) == 1 and ledger.alert_queue() == {}
    ledger.record_alerts([a], [], [("robot", "x")], 2000, keep=3)
    assert ledger.drop_alert_channels([]) == 1
