"""The time-series sink against VictoriaMetrics with its DEFAULT flags (it keeps every sample, even an identical
one: no "same timestamp overwrites"), read back through its Prometheus query API: over a day with sink restarts,
late intervals for hours already written and a store outage, every sum equals the ledger's to the millisecond.
(No InfluxDB server is installable here; VictoriaMetrics speaks the InfluxDB v2 write API.)"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from labmeter.collector.ledger import Ledger
from labmeter.collector.ledger.rollup import direct
from labmeter.collector.sink_influx import CURSOR, STATE_CODE, InfluxSink
from labmeter.config import InfluxConfig
from tests.victoria import DAY, POLICY, RANGES, H, Victoria, needs_vm, setup_ledger, store, t, vm

pytestmark = needs_vm
__all__ = ["vm"]  # the fixture


def sums(vm: Victoria, field: str, a: int, b: int) -> dict[str, float]:
    return vm.query(f"sum_over_time(labmeter_usage_{field}[{(b - a) // 60_000}m])", b)


def assert_matches_ledger(vm: Victoria, ledger: Ledger, ranges: list[tuple[int, int]]) -> None:
    for a, b in ranges:
        truth = direct(ledger, a, b, POLICY)
        run, eff = sums(vm, "run_s", a, b), sums(vm, "effective_s", a, b)
        for code, h in truth.items():
            if h.period_ms == h.uncovered_ms:
                continue
            assert round(run.get(code, 0) * 1000) == h.run_ms, (code, a, b, "run")
            assert round(eff.get(code, 0) * 1000) == h.effective_ms, (code, a, b, "effective")


def test_a_day_on_default_victoria_metrics_sums_to_the_ledger(vm: Victoria, tmp_path: Path) -> None:
    ledger, day = setup_ledger(tmp_path)
    # XRD's 06:00-08:00 intervals are held back: they arrive after those hours were written
    late = [iv for iv in day["CZ-XRD-001"] if t(2, 6) <= iv.start_ms < t(2, 8)]
    now = [t(2, 0)]

    def upto(ms: int) -> None:
        """The clock moves to ``ms``; every interval that ended by then is stored (but the late ones)."""
        now[0] = ms
        store(ledger, [iv for rows in day.values() for iv in rows if iv.end_ms <= ms and iv not in late])

    def sink() -> InfluxSink:
        return InfluxSink(
            InfluxConfig(url=vm.url), ledger, POLICY, settle_ms=0, reset_every_s=0, now_ms=lambda: now[0]
        )

    async def main() -> None:
        s = sink()
        # the morning, round after round; the hour in progress changes every time, each hour is written once
        for hh in range(1, 11):
            for mm in (5, 20, 40):
                upto(t(2, hh, mm))
                await s.flush()
        upto(t(2, 11, 30))
        await s.flush()
        final_before = t(2, 11)  # 10:00 is final at 11:00 + 15 min allowance + 2 min grace
        assert_matches_ledger(vm, ledger, [(t(2, 0), final_before), (t(2, 8), t(2, 10)), (t(2, 3), t(2, 9))])
        # written and pending add up to the ledger's hours so far
        pending = vm.query("last_over_time(labmeter_usage_current_run_s[10m])", now[0])
        so_far = direct(ledger, t(2, 0), t(2, 12), POLICY)
        for code, h in so_far.items():
            assert (
                round((sums(vm, "run_s", t(2, 0), t(2, 12)).get(code, 0) + pending[code]) * 1000) == h.run_ms
            )

        # the sink restarts (a collector restart): nothing is written again
        count = vm.samples("labmeter_usage_run_s")
        await s.close()
        s = sink()
        await s.flush()
        assert vm.samples("labmeter_usage_run_s") == count

        # the late intervals arrive: hours 05-08 of XRD were written without them; corrections put them right
        store(ledger, late)
        await s.flush()
        assert_matches_ledger(vm, ledger, [(t(2, 0), final_before), (t(2, 5), t(2, 9)), (t(2, 6), t(2, 7))])
        assert vm.samples("labmeter_usage_run_s") > count

        # the store goes down through the afternoon; the ledger keeps taking intervals; nothing is lost
        vm.stop()
        for hh in (13, 15, 17):
            upto(t(2, hh, 30))
            power = {"agent": "pc-a", "instrument": "CZ-ICP-101", "start": t(2, hh, 29), "end": t(2, hh, 30)}
            s.on_live("power", {**power, "n": 60, "mean_w": 1200.0 + hh, "min_w": 1190.0, "max_w": 1230.0})
            cursor = ledger.sink_cursor(CURSOR)
            with pytest.raises(aiohttp.ClientOSError, match=f"127.0.0.1:{vm.port}"):
                await s.flush()  # reset or refused: the store is down, and the error names it
            assert ledger.sink_cursor(CURSOR) == cursor
        vm.start()
        await s.flush()
        await s.close()
        # the live points that waited through the outage are there too
        power = dict(vm.export("labmeter_power_mean_w")["CZ-ICP-101"])
        assert power == {t(2, hh, 29): 1200.0 + hh for hh in (13, 15, 17)}

        # another restart, then the rest of the day and a night of rounds
        s = sink()
        for hh in range(18, 24):
            upto(t(2, hh, 30))
            await s.flush()
        upto(t(3, 2))
        await s.flush()
        await s.close()

    asyncio.run(main())
    assert_matches_ledger(vm, ledger, RANGES)
    truth = direct(ledger, t(2, 0), t(3, 0), POLICY)
    # each hour's points sum to it: at most one correction, never a rewrite of the same hour
    for code, points in vm.export("labmeter_usage_run_s").items():
        hours: dict[int, float] = {}
        for ts, v in points:
            hours[ts - (ts % H)] = hours.get(ts - (ts % H), 0) + v
            assert ts % H in (1, 2), "a point's offset in its hour is its revision"
        assert round(sum(hours.values()) * 1000) == truth[code].run_ms
    states = vm.export("labmeter_state_code")
    for code, (_, spans) in DAY.items():
        at = dict(states[code])
        for start, _end, state in spans:
            assert at[start] == STATE_CODE[state]
    with urllib.request.urlopen(f"{vm.url}/api/v1/label/__name__/values", timeout=10) as r:
        names = set(json.loads(r.read())["data"])
    assert not any(n.endswith("_state_state") for n in names), "no string field reaches the store"
    ledger.close()


def test_what_the_sink_wrote_is_kept_on_both_ledger_backends(any_ledger: Ledger) -> None:
    """The sink's own bookkeeping (which hours it wrote, at which revision) on SQLite and PostgreSQL."""
    assert any_ledger.sink_hours(CURSOR, "CZ-A", 0, 2**62) == {}
    any_ledger.record_sink_hours(CURSOR, [("CZ-A", H, 1, (1, 2, 3, 4, 5, 6)), ("CZ-A", 2 * H, 1, (0,) * 6)])
    any_ledger.record_sink_hours(CURSOR, [("CZ-A", H, 2, (7, 2, 3, 4, 5, 9))])
    any_ledger.record_sink_hours("other-store", [("CZ-A", H, 1, (0,) * 6)])
    assert any_ledger.sink_hours(CURSOR, "CZ-A", 0, 2**62) == {
        H: (2, 7, 2, 3, 4, 5, 9),
        2 * H: (1, 0, 0, 0, 0, 0, 0),
    }
    assert any_ledger.sink_hours(CURSOR, "CZ-A", 2 * H, 3 * H) == {2 * H: (1, 0, 0, 0, 0, 0, 0)}
    assert any_ledger.sink_hours(CURSOR, "CZ-B", 0, 2**62) == {}
    assert any_ledger.dirty_floors() == {}


def test_one_collector_of_several_on_a_ledger_writes_the_hours(any_ledger: Ledger) -> None:
    assert any_ledger.take_sink_lease(CURSOR, "a", 1_000, 120_000)
    assert not any_ledger.take_sink_lease(CURSOR, "b", 2_000, 120_000)
    assert any_ledger.take_sink_lease(CURSOR, "a", 100_000, 120_000), "the holder renews"
    assert not any_ledger.take_sink_lease(CURSOR, "b", 219_999, 120_000)
    assert any_ledger.take_sink_lease(CURSOR, "b", 220_001, 120_000), "a silent holder's lease runs out"
    assert not any_ledger.take_sink_lease(CURSOR, "a", 220_002, 120_000)
    assert any_ledger.take_sink_lease("another-store", "a", 220_002, 120_000)


def test_two_collectors_sharing_a_ledger_write_each_hour_once(vm: Victoria, tmp_path: Path) -> None:
    ledger, day = setup_ledger(tmp_path)
    store(ledger, [iv for rows in day.values() for iv in rows])

    async def main() -> None:
        sinks = [
            InfluxSink(
                InfluxConfig(url=vm.url),
                ledger,
                POLICY,
                settle_ms=0,
                reset_every_s=0,
                now_ms=lambda: t(3, 2),
                holder=h,
            )
            for h in ("host-1:/var/lib/labmeter", "host-2:/var/lib/labmeter")
        ]
        for _ in range(3):  # at the same time, as two processes would
            await asyncio.gather(*(s.flush() for s in sinks))
        await sinks[0].close()  # the first stops; the second takes over at once
        await sinks[1].flush()
        await sinks[1].close()

    asyncio.run(main())
    assert_matches_ledger(vm, ledger, RANGES)
    ledger.close()
