"""Energy per power window: a simulated meter over real Modbus TCP whose import-energy counter is the running
integral of its schedule (reset, rolled over, refused), and a meter that reports only power, read by the real
driver and downsampled by the agent's code; the sums are compared with the schedule's exact integral. Beside
them the faults that must never give energy: a decreasing counter, a jump no instrument can draw, a gap."""

from __future__ import annotations

import asyncio
import itertools
import math
import struct
from collections.abc import Callable

from pyModbusTCP.client import ModbusClient

from labmeter import wire
from labmeter.agent.power import PowerDownsampler, Window
from labmeter.clock import Clock
from labmeter.drivers.modbus import EnergyRegister, ModbusSource, Register, load_profile
from labmeter.drivers.modbus.driver import ModbusDriver
from labmeter.drivers.modbus.sim import SimMeter
from labmeter.drivers.sim import Schedule
from tests.conftest import free_port

EPOCH = 1_772_380_800_000
HOUR_S = 3600.0
LEVELS = {"OFF": 0.8, "STANDBY": 150.0, "RUNNING": 1200.0}


class FixedClock(Clock):
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def wall_ms(self) -> int:
        return self.ms


def day() -> Schedule:
    """A lab day: off overnight, standby, two runs with a pause, standby, off (state times in seconds)."""
    points = [
        (0, "OFF"),
        (7.5 * HOUR_S + 17, "STANDBY"),
        (8.25 * HOUR_S + 41, "RUNNING"),
        (12 * HOUR_S + 3, "STANDBY"),
        (13.1 * HOUR_S, "RUNNING"),
        (17.6 * HOUR_S + 29, "STANDBY"),
        (19 * HOUR_S + 11, "OFF"),
    ]
    return Schedule(points, levels=dict(LEVELS), noise=0.02, epoch_ms=EPOCH)


def source(port: int, register: Register | None = None) -> ModbusSource:
    return ModbusSource(
        url=f"tcp://127.0.0.1:{port}", profile="eastron-sdm120", register=register, timeout_s=2
    )


Make = Callable[[], tuple[SimMeter, ModbusDriver]]


def poll(
    make: Make,
    clock: FixedClock,
    start_ms: int,
    end_ms: int,
    every_ms: int,
    during: Callable[[SimMeter, int], None] = lambda _m, _at: None,
) -> tuple[list[Window], list[float | None], SimMeter]:
    """Read the meter every ``every_ms`` of simulated time and downsample as the agent does (three polls of gap)."""
    ds = PowerDownsampler(max_gap_ms=3 * every_ms)
    windows: list[Window] = []
    counters: list[float | None] = []

    async def main() -> SimMeter:
        meter, driver = make()
        await meter.start()
        try:
            for at in range(start_ms, end_ms + 1, every_ms):
                clock.ms = at
                during(meter, at)
                sample = await driver.read()
                assert sample.power_w is not None, sample
                counters.append(sample.energy_wh)
                if (w := ds.feed(at, sample.power_w, sample.energy_wh)) is not None:
                    windows.append(w)
            if (w := ds.close()) is not None:
                windows.append(w)
        finally:
            await driver.close()
            await meter.stop()
        return meter

    meter = asyncio.run(main())
    return windows, counters, meter


def energy(windows: list[Window]) -> float:
    assert all(
        w.energy_wh is None or 0 <= w.energy_wh <= wire.max_window_energy_wh(w.end - w.start) for w in windows
    )
    return sum(w.energy_wh or 0.0 for w in windows)


def test_meter_counter_gives_the_integral_of_its_schedule_over_a_day() -> None:
    sched, clock, port = day(), FixedClock(EPOCH), free_port()

    def make() -> tuple[SimMeter, ModbusDriver]:
        meter = SimMeter(f"127.0.0.1:{port}", sched, clock, counter_wh=1_234_567.0)
        return meter, ModbusDriver(source(port), load_profile("eastron-sdm120"))

    end = EPOCH + 24 * 3_600_000
    windows, counters, meter = poll(make, clock, EPOCH, end, 60_000)
    truth = sched.energy_wh(end) - sched.energy_wh(EPOCH)
    assert truth > 8_000  # the day really used energy: about 9.7 kWh
    got = energy(windows)
    assert abs(got - truth) <= 0.01 * truth, (got, truth)
    # the driver read the counter the meter serves, in Wh (float32 of kWh: about 0.1 Wh of resolution here)
    assert all(c is not None for c in counters)
    assert abs((counters[-1] or 0) - meter.counter_at(end)) < 1.0
    assert len(windows) == 24 * 60 + 1 and all(w.energy_wh is not None for w in windows[1:])


def test_the_energy_register_holds_the_counter_for_an_independent_client() -> None:
    """pyModbusTCP reads 0x0048 as the Eastron manual lays it out: float32 kWh, high word first."""
    sched, clock, port = day(), FixedClock(EPOCH + 10 * 3_600_000), free_port()

    async def main() -> list[int] | None:
        meter = SimMeter(f"127.0.0.1:{port}", sched, clock, counter_wh=500_000.0)
        await meter.start()
        client = ModbusClient(host="127.0.0.1", port=port, unit_id=1, timeout=5, auto_open=True)
        try:
            regs: list[int] | None = await asyncio.get_running_loop().run_in_executor(
                None, client.read_input_registers, 0x0048, 2
            )
            return regs
        finally:
            client.close()
            await meter.stop()

    regs = asyncio.run(main())
    assert regs is not None and len(regs) == 2
    kwh = struct.unpack(">f", struct.pack(">HH", *regs))[0]
    assert math.isclose(kwh, (500_000.0 + sched.energy_wh(clock.ms)) / 1000, rel_tol=1e-6)


def test_counter_reset_and_rollover_mid_run_give_no_negative_or_doubled_energy() -> None:
    sched = Schedule([(0, "RUNNING")], levels=dict(LEVELS), noise=0.0, epoch_ms=EPOCH)
    clock, port = FixedClock(EPOCH), free_port()
    # a display of 100 kWh that rolls over 30 minutes in (1200 W), and a reset two hours in

    def make() -> tuple[SimMeter, ModbusDriver]:
        meter = SimMeter(f"127.0.0.1:{port}", sched, clock, counter_wh=99_400.0, wrap_wh=100_000.0)
        return meter, ModbusDriver(source(port), load_profile("eastron-sdm120"))

    reset_at = EPOCH + 2 * 3_600_000

    def during(meter: SimMeter, at: int) -> None:
        if at == reset_at:
            meter.reset_counter()

    end = EPOCH + 4 * 3_600_000
    windows, counters, _ = poll(make, clock, EPOCH, end, 30_000, during)
    downs = [(a, b) for a, b in itertools.pairwise(counters) if a is not None and b is not None and b < a]
    assert len(downs) == 2, downs  # the rollover and the reset, as the meter served them
    truth = sched.energy_wh(end)  # 4800 Wh
    got = energy(windows)
    step = 1200 * 30 / 3600  # what one poll's step is worth: the most each fault may leave out
    assert truth - 2 * step - 0.001 * truth <= got <= truth * 1.001, (got, truth)


def test_a_meter_that_reports_only_power_is_integrated() -> None:
    sched, clock, port = day(), FixedClock(EPOCH), free_port()
    only_power = Register(function=4, address=0x000C, type="float32")

    def make() -> tuple[SimMeter, ModbusDriver]:
        meter = SimMeter(f"127.0.0.1:{port}", sched, clock)
        return meter, ModbusDriver(source(port, only_power), only_power)

    start, end = EPOCH + 7 * 3_600_000, EPOCH + 20 * 3_600_000
    windows, counters, _ = poll(make, clock, start, end, 10_000)
    assert counters == [None] * len(counters)
    truth = sched.energy_wh(end) - sched.energy_wh(start)
    got = energy(windows)
    assert abs(got - truth) <= 0.01 * truth, (got, truth)


def test_a_refused_energy_register_leaves_the_power_and_is_not_asked_again() -> None:
    sched, clock, port = day(), FixedClock(EPOCH), free_port()
    reg = load_profile("eastron-sdm120").power

    async def main() -> list[tuple[float | None, float | None]]:
        meter = SimMeter(f"127.0.0.1:{port}", sched, clock)
        driver = ModbusDriver(source(port), reg, energy=EnergyRegister(function=4, address=0x9000))
        await meter.start()
        try:
            got = []
            for _ in range(3):
                s = await driver.read()
                got.append((s.power_w, s.energy_wh))
            assert driver.energy is None
            return got
        finally:
            await driver.close()
            await meter.stop()

    got = asyncio.run(main())
    assert [e for _, e in got] == [None, None, None]
    assert all(p is not None and p > 0 for p, _ in got)


def feed(ds: PowerDownsampler, reads: list[tuple[int, float | None, float | None]]) -> list[Window]:
    out = [w for at, p, e in reads if (w := ds.feed(at, p, e)) is not None]
    return out + [w for w in [ds.close()] if w is not None]


def test_a_gap_invents_no_energy() -> None:
    """Running at 1200 W throughout; reads fail for 20 minutes, then none come for 20 more: neither span
    gets energy, with a counter or without one."""
    for counting in (True, False):
        reads: list[tuple[int, float | None, float | None]] = []
        for s in range(0, 3 * 3600, 10):
            at = EPOCH + s * 1000
            wh = 1200 * s / 3600 if counting else None
            if 3600 <= s < 4800:
                reads.append((at, None, None))  # failed reads
            elif 4800 <= s < 6000:
                continue  # silence
            else:
                reads.append((at, 1200.0, wh))
        windows = feed(PowerDownsampler(max_gap_ms=30_000), reads)
        measured = 1200 * (3 * 3600 - 2400) / 3600
        got = energy(windows)
        assert measured - 2 * 1200 * 10 / 3600 <= got <= measured + 1e-6, (counting, got, measured)
        assert all(
            w.energy_wh in (None, 0.0) for w in windows if EPOCH + 3_660_000 <= w.start < EPOCH + 6_000_000
        )


def test_a_counter_that_goes_down_or_jumps_counts_nothing_for_that_step() -> None:
    ds = PowerDownsampler(max_gap_ms=30_000)
    base = 5_000.0
    reads: list[tuple[int, float | None, float | None]] = [
        (EPOCH, 100.0, base),
        (EPOCH + 10_000, 100.0, base + 1.0),
        (EPOCH + 20_000, 100.0, 3.0),  # reset: a new base, nothing counted
        (EPOCH + 30_000, 100.0, 3.5),
        (EPOCH + 40_000, 100.0, 9e9),  # 9 GWh in 10 s: a jump, not energy
        (EPOCH + 50_000, 100.0, 9e9 + 0.25),
    ]
    [w] = feed(ds, reads)
    assert w.energy_wh == 1.0 + 0.5 + 0.25


def test_a_counter_missing_one_read_is_bridged_and_never_mixed_with_integration() -> None:
    ds = PowerDownsampler(max_gap_ms=30_000)
    reads: list[tuple[int, float | None, float | None]] = [
        (EPOCH, 3600.0, 10.0),
        (EPOCH + 10_000, 3600.0, None),  # the energy read failed, the power did not
        (EPOCH + 20_000, 3600.0, 30.0),
    ]
    [w] = feed(ds, reads)
    assert w.energy_wh == 20.0


def test_a_step_across_the_window_boundary_is_split_and_sums_exactly() -> None:
    ds = PowerDownsampler(max_gap_ms=30_000)
    reads: list[tuple[int, float | None, float | None]] = [
        (EPOCH + 50_000, 360.0, None),
        (EPOCH + 70_000, 360.0, None),  # 2 Wh over 20 s, half in each minute
    ]
    w1, w2 = feed(ds, reads)
    assert (w1.energy_wh, w2.energy_wh) == (1.0, 1.0)
    assert PowerDownsampler().feed(EPOCH, 100.0, 5.0) is None
    [only] = feed(PowerDownsampler(), [(EPOCH, 100.0, 5.0)])
    assert only.energy_wh is None  # one read measures no energy: absent, not zero


def test_the_broker_acl_lets_the_agent_read_the_energy_topics() -> None:
    """The energy topic is subscribed, so the ACL made from the driver's topics must grant it too."""
    from labmeter.collector.mosquitto import source_subscriptions
    from labmeter.drivers.mqtt import MqttSource

    gen1 = MqttSource(topic="shellies/p1/relay/0/power", format="shelly-gen1")
    assert "shellies/p1/relay/0/energy" in source_subscriptions(gen1)
    esp = MqttSource(topic="n/sensor/power/state", format="esphome", energy_topic="n/sensor/energy/state")
    assert source_subscriptions(esp) == ("n/sensor/power/state", "n/sensor/energy/state", "n/status")


def plug_day(counts_energy: bool) -> tuple[float, float, list[float | None]]:
    """The simulated Tasmota plug's messages (every 10 s), read by the mqtt driver every 5 s of simulated time.

    The broker is left out (a simulated day through it would take a day): the messages go in where the
    transport delivers them, as in tests/drivers/mqtt/."""
    from labmeter.config import BrokerConfig
    from labmeter.drivers.mqtt import MqttSource
    from labmeter.drivers.mqtt.driver import PlugDriver
    from labmeter.drivers.mqtt.sim import SimPlug

    sched, clock = day(), FixedClock(EPOCH)
    start, end = EPOCH + 7 * 3_600_000, EPOCH + 20 * 3_600_000
    broker = BrokerConfig(url="mqtt://127.0.0.1:1")

    async def main() -> tuple[list[Window], list[float | None]]:
        plug = SimPlug("tele/p/SENSOR", broker, sched, clock, 10, counts_energy=counts_energy)
        driver = PlugDriver(MqttSource(topic="tele/p/SENSOR"), broker, "t", 60, clock)
        ds = PowerDownsampler(max_gap_ms=15_000)
        windows, counters = [], []
        for at in range(start, end + 1, 5_000):
            clock.ms = at
            if at % 10_000 == 0:
                driver._on_message("tele/p/SENSOR", plug.message(at))
            sample = await driver.read()
            counters.append(sample.energy_wh)
            if (w := ds.feed(at, sample.power_w, sample.energy_wh)) is not None:
                windows.append(w)
        return windows + [w for w in [ds.close()] if w is not None], counters

    windows, counters = asyncio.run(main())
    return energy(windows), sched.energy_wh(end) - sched.energy_wh(start), counters


def test_a_plug_that_reports_only_power_is_integrated_and_one_that_counts_gives_its_counter() -> None:
    got, truth, counters = plug_day(False)
    assert counters == [None] * len(counters)
    assert abs(got - truth) <= 0.01 * truth, (got, truth)
    got, truth, counters = plug_day(True)
    assert all(c is not None for c in counters)
    assert abs(got - truth) <= 0.01 * truth, (got, truth)
