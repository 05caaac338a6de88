"""Power telemetry: readings of the simulator's known schedule, downsampled by the agent's code, signed, sent
through Mosquitto to the real collector and its sink, land in VictoriaMetrics within the sampling bound; beside it
the attacker's messages (forged, unsigned, another agent's instrument, out of range) change nothing anywhere."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from labmeter import config, signing, wire
from labmeter.agent.outbox import Signer
from labmeter.agent.power import PowerDownsampler, Window, power_body, publish
from labmeter.drivers.sim import DEFAULT_LEVELS, Schedule
from labmeter.mqtt import MqttLink
from tests.conftest import BrokerProcess
from tests.lab import CollectorThread, Publisher, make_agent_key, register, wait_for
from tests.scenario import EPOCH_MS, INSTRUMENTS, METER_LEVELS, PLUG_LEVELS, POLL_S, Lab
from tests.victoria import Victoria, needs_vm, vm

__all__ = ["vm"]  # the fixture
MIN = 60_000
NOISE = 0.02


def windows_of(schedule: Schedule, start_ms: int, minutes: int, poll_ms: int = 1000) -> list[Window]:
    """What the agent's downsampler makes of one reading per ``poll_ms`` (a failed read every 17th)."""
    ds = PowerDownsampler()
    out = []
    for i, at in enumerate(range(start_ms, start_ms + minutes * MIN + 1, poll_ms)):
        w = ds.feed(at, None if i % 17 == 5 else schedule.power_at(at))
        if w is not None:
            out.append(w)
    return out


def bound(schedule: Schedule, w: Window, slack_ms: int = 1000) -> tuple[float, float, float, float]:
    """The sampling bound: (mean low, mean high, min low, max high) of the schedule's power over the window.

    A reading may lag the schedule by up to ``slack_ms`` (one poll for a steady poll; more where the source
    publishes on its own beat or reads are late), so the mean may differ from the schedule's mean over the
    window by that weight of the level step seen in reach, plus the noise.
    """

    def level(t: int) -> float:
        return schedule.levels[schedule.state_at((t - schedule.epoch_ms) / 1000)]

    inside = [level(t) for t in range(w.start, w.end, 1000)]
    reach = [level(t) for t in range(w.start - slack_ms, w.end, 1000)]
    mean = sum(inside) / len(inside)
    step = (max(reach) - min(reach)) * slack_ms / (w.end - w.start)
    return (
        mean * (1 - NOISE) - step,
        mean * (1 + NOISE) + step,
        min(reach) * (1 - NOISE),
        max(reach) * (1 + NOISE),
    )


def schedule_at(epoch_ms: int) -> Schedule:
    s = [(0, "OFF"), (150.5, "STANDBY"), (400, "RUNNING"), (730.25, "STANDBY"), (900, "OFF")]
    return Schedule(s, levels=dict(DEFAULT_LEVELS), noise=NOISE, epoch_ms=epoch_ms)


def test_downsampler_follows_the_schedule_within_the_sampling_bound() -> None:
    epoch = 1_772_380_800_000
    sched = schedule_at(epoch)
    got = windows_of(sched, epoch, 20)
    assert [w.start for w in got] == [epoch + i * MIN for i in range(20)]
    for w in got:
        lo, hi, low, high = bound(sched, w)
        assert lo <= w.mean_w <= hi and low <= w.min_w <= w.max_w <= high, w
        assert w.n in (56, 57) and w.end - w.start == MIN
    assert PowerDownsampler().feed(epoch, None) is None
    ds = PowerDownsampler()
    ds.feed(epoch, None)
    assert ds.feed(epoch + MIN, 5.0) is None, "a minute without a valid reading is no data, not zero watts"
    for bad in (math.nan, math.inf, -1e12):
        assert ds.feed(epoch + MIN + 1, bad) is None
    assert ds.close() == Window(epoch + MIN, epoch + 2 * MIN, 1, 5.0, 5.0, 5.0, None)


def sealed(key: Any, kid: str, body: dict[str, Any]) -> bytes:
    return wire.seal(key, kid, wire.dump_body(body))


@needs_vm
def test_power_reaches_the_store_and_attackers_change_nothing(
    mosquitto: BrokerProcess, vm: Victoria, tmp_path: Path
) -> None:
    key, pub, kid = make_agent_key(tmp_path, "pc-a")
    other, _, other_kid = make_agent_key(tmp_path, "pc-x")
    text = (
        f'[collector]\ndata_dir = "{tmp_path / "collector"}"\n[broker]\nurl = "{mosquitto.url}"\n'
        f'[influxdb]\nurl = "{vm.url}"\nevery_s = 0.2\n'
    )
    cfg = config.parse(text, config.CollectorConfig)
    register(cfg, "pc-a", pub, kid, ["CZ-A", "CZ-B"])
    register(cfg, "pc-b", signing.public_key_text(other.public_key()), other_kid, ["CZ-C"])
    epoch = (int(time.time() * 1000) // MIN - 40) * MIN
    sched = schedule_at(epoch)
    genuine = windows_of(sched, epoch, 20)
    base = power_body("pc-a", "CZ-A", genuine[0]).body()
    attacks: list[tuple[str, bytes]] = [
        # forged: pc-a's key id, another key's signature
        (wire.power_topic("pc-a", "CZ-A"), sealed(other, kid, {**base, "mean_w": 9999.0, "max_w": 9999.0})),
        # unsigned: the bare body, and an envelope without a valid signature
        (wire.power_topic("pc-a", "CZ-A"), wire.dump_body({**base, "mean_w": 9999.0}).encode()),
        (
            wire.power_topic("pc-a", "CZ-A"),
            wire.dump_body({"kid": kid, "body": wire.dump_body(base), "sig": "AA"}).encode(),
        ),
        # pc-b's own genuine key, for an instrument enrolled to pc-a, on pc-b's topic and on pc-a's
        (wire.power_topic("pc-b", "CZ-A"), sealed(other, other_kid, {**base, "agent": "pc-b"})),
        (wire.power_topic("pc-a", "CZ-A"), sealed(other, other_kid, base)),
        # pc-a's key, an instrument not enrolled to it; a body naming another instrument than its topic
        (wire.power_topic("pc-a", "CZ-C"), sealed(key, kid, {**base, "instrument": "CZ-C"})),
        (wire.power_topic("pc-a", "CZ-B"), sealed(key, kid, base)),
        # out of range, signed by the genuine key
        (
            wire.power_topic("pc-a", "CZ-B"),
            sealed(key, kid, {**base, "instrument": "CZ-B", "mean_w": 1e9, "max_w": 1e9}),
        ),
        (
            wire.power_topic("pc-a", "CZ-B"),
            sealed(key, kid, {**base, "instrument": "CZ-B", "min_w": 50.0, "max_w": 10.0}),
        ),
        (wire.power_topic("pc-a", "CZ-B"), sealed(key, kid, {**base, "instrument": "CZ-B", "n": 0})),
        (
            wire.power_topic("pc-a", "CZ-B"),
            sealed(key, kid, {**base, "instrument": "CZ-B", "end": base["start"] + 3_600_000}),
        ),
        (
            wire.power_topic("pc-a", "CZ-B"),
            sealed(key, kid, {**base, "instrument": "CZ-B", "start": 5, "end": 6}),
        ),
        (
            wire.power_topic("pc-a", "CZ-B"),
            sealed(
                key,
                kid,
                {**base, "instrument": "CZ-B", "start": epoch + 86_400_000, "end": epoch + 86_460_000},
            ),
        ),
        (
            wire.power_topic("pc-a", "CZ-B"),
            sealed(key, kid, {**base, "instrument": "CZ-B", "mean_w": "1200"}),
        ),
        (
            wire.power_topic("pc-a", "CZ-B"),
            sealed(key, kid, {**base, "instrument": "CZ-B", "energy_wh": -1.0}),
        ),
        (wire.power_topic("pc-a", "CZ-B"), b"\x00" * 9000),
    ]
    with CollectorThread(cfg) as ct:
        c = ct.collector
        assert c is not None
        attacker = Publisher(mosquitto.url, "attacker")
        for topic, payload in attacks:
            attacker.publish(topic, payload)
        wait_for(lambda: c.stats["rejected"] >= len(attacks), what="every attack rejected")
        reasons = {k for k in c.rejections if k.startswith("power: ")}
        assert len(reasons) >= 10, reasons
        assert c.live.power == {} and c.live.instruments == {}

        async def agent() -> None:
            link = MqttLink(config.BrokerConfig(url=mosquitto.url), "pc-a")
            await link.start()
            assert await link.wait_connected(10)
            a = SimpleNamespace(id="pc-a", signer=Signer("pc-a", key, kid), link=link)
            for w in genuine:
                publish(a, "CZ-A", w)  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            await link.stop()

        asyncio.run(agent())
        wait_for(
            lambda: len(vm.export("labmeter_power_mean_w").get("CZ-A", [])) == len(genuine),
            what="power in store",
        )
        assert set(c.live.power) == {"CZ-A"} and c.live.power["CZ-A"]["start"] == genuine[-1].start
        assert ct.alive
        assert c.stats["stored"] == 0, "power is never counted as hours"
    stored = {name: vm.export(f"labmeter_power_{name}") for name in ("mean_w", "min_w", "max_w")}
    assert set(stored["mean_w"]) == {"CZ-A"}, "nothing of the attacks reached the store"
    mean, low, high = (dict(stored[n]["CZ-A"]) for n in ("mean_w", "min_w", "max_w"))
    assert sorted(mean) == [w.start for w in genuine]
    for w in genuine:
        lo, hi, floor, ceiling = bound(sched, w)
        assert lo <= mean[w.start] <= hi and floor <= low[w.start] <= high[w.start] <= ceiling, w
    assert not any(v == 9999.0 or v >= 1e9 for v in mean.values())


@dataclass
class PowerLab(Lab):
    """The scenario lab (simulated SDM120 on Modbus TCP and Tasmota plug, a real agent and collector, all on a
    shared scaled clock), its collector writing to VictoriaMetrics."""

    vm_url: str = ""

    def write_files(self) -> None:
        super().write_files()
        with (self.tmp / "collector.toml").open("a") as f:
            f.write(f'[influxdb]\nurl = "{self.vm_url}"\nevery_s = 0.5\n')


@needs_vm
def test_power_from_a_real_agent_follows_the_simulated_meters(
    mosquitto: BrokerProcess, vm: Victoria, tmp_path: Path
) -> None:
    lab = PowerLab(tmp_path, mosquitto, vm_url=vm.url)
    try:
        lab.start_all()
        lab.sleep_until(430)
        curves = {name: vm.export(f"labmeter_power_{name}") for name in ("mean_w", "min_w", "max_w", "n")}
        lab.stop("agent")
        lab.stop("collector")
        lab.stop("sim")
    finally:
        lab.cleanup()
    for code, (schedule_points, _every) in INSTRUMENTS.items():
        levels = METER_LEVELS if code == "CZ-XRD-001" else PLUG_LEVELS
        sched = Schedule(
            [(float(t), s) for t, s in schedule_points], levels=levels, noise=0.01, epoch_ms=EPOCH_MS
        )
        mean, low, high, count = (dict(curves[n][code]) for n in ("mean_w", "min_w", "max_w", "n"))
        starts = sorted(mean)
        assert len(starts) >= 5, (code, starts)
        # a window the agent only partly saw (it was starting) holds too few readings to follow the schedule
        full = [s for s in starts if count[s] >= 0.8 * MIN / (POLL_S * 1000)]
        assert len(full) >= 4, (code, count)
        assert all((s - EPOCH_MS) % MIN == 0 for s in starts), "windows are UTC minutes"
        for s in full:
            w = Window(s, s + MIN, 1, mean[s], low[s], high[s], None)
            lo, hi, floor, ceiling = bound(sched, w, slack_ms=int(POLL_S * 1000) * 3)
            assert lo <= w.mean_w <= hi, (code, (s - EPOCH_MS) / 1000, lo, w.mean_w, hi)
            assert floor <= w.min_w <= w.max_w <= ceiling, (code, (s - EPOCH_MS) / 1000, w)


POWER_CASES = sorted((Path(__file__).parent / "testcases" / "power").iterdir())


@pytest.mark.parametrize("case", POWER_CASES, ids=[c.name for c in POWER_CASES])
def test_bad_power_body_is_refused_naming_the_field(case: Path) -> None:
    """Bounds before anything else (testcases/power/<case>/body.json and the error it must raise)."""
    with pytest.raises(wire.WireError) as err:
        wire.decode_power((case / "body.json").read_text().strip())
    assert (case / "expected_error.txt").read_text().strip() in str(err.value)
