"""Energy per closed interval, on the agent's side: the timeline cut as the runner cuts it and each interval
given what agent.power.IntervalEnergy measured in it, read from a simulated day whose exact integral
(drivers.sim.Schedule.energy_wh) is the ground truth. A meter counter (also reset, rolled over, across a gap,
replaced), a plug with power only, failed reads; and the wire format's bounds on what an interval may claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from labmeter import wire
from labmeter.agent.power import IntervalEnergy
from labmeter.agent.timeline import Span, Timeline
from labmeter.clock import Clock
from labmeter.drivers.sim import Schedule
from labmeter.wire import State

EPOCH = 1_772_380_800_000  # 2026-03-01T16:00:00Z, an hour boundary
H = 3_600_000
HOUR_S = 3600.0
EVERY = 10_000
BASE_WH = 1_234_567.0

Read = Callable[[int], tuple[float | None, float | None]]
"""A poll at a time: (watts or None for a failed read, the counter in Wh or None)."""


def day() -> Schedule:
    points = [
        (0, "OFF"),
        (7.5 * HOUR_S + 17, "STANDBY"),
        (8.25 * HOUR_S + 41, "RUNNING"),
        (12 * HOUR_S + 3, "STANDBY"),
        (13.1 * HOUR_S, "RUNNING"),
        (17.6 * HOUR_S + 29, "STANDBY"),
        (19 * HOUR_S + 11, "OFF"),
    ]
    return Schedule(points, noise=0.0, epoch_ms=EPOCH)


def meter(sched: Schedule, counter: Callable[[int], float | None] | None = None) -> Read:
    def read(at: int) -> tuple[float | None, float | None]:
        return sched.power_at(at), (BASE_WH + sched.energy_wh(at)) if counter is None else counter(at)

    return read


def plug(sched: Schedule) -> Read:
    return lambda at: (sched.power_at(at), None)


def run(sched: Schedule, read: Read, start: int = EPOCH, end: int = EPOCH + 24 * H) -> list[Span]:
    """Poll every EVERY ms and close intervals as the runner does (state from the schedule, UNKNOWN when
    a read fails), each closed one with the energy measured in it."""
    energy = IntervalEnergy(max_gap_ms=3 * EVERY)
    tl = Timeline(H, start, State.UNKNOWN)
    out: list[Span] = []
    for at in range(start, end + 1, EVERY):
        power, counter = read(at)
        energy.feed(at, power, counter)
        state = State(sched.state_at((at - EPOCH) / 1000)) if power is not None else State.UNKNOWN
        out += [replace(s, energy_wh=energy.take(s.start, s.end)) for s in tl.advance(at, state)]
    out += [replace(s, energy_wh=energy.take(s.start, s.end)) for s in tl.close(end)]
    return out


def truth(sched: Schedule, a: int, b: int) -> float:
    return sched.energy_wh(b) - sched.energy_wh(a)


def total(spans: list[Span]) -> float:
    for s in spans:  # every interval passes the collector's own check
        wire.decode_interval(
            wire.dump_body(
                wire.Interval(
                    "a", "i", 1, wire.GENESIS, s.start, s.end, s.state.value, energy_wh=s.energy_wh
                ).body()
            )
        )
    return sum(s.energy_wh or 0.0 for s in spans)


def test_each_interval_carries_the_counter_difference_across_it() -> None:
    sched = day()
    spans = run(sched, meter(sched))
    assert len(spans) > 24 and all(s.energy_wh is not None for s in spans[1:])
    for s in spans[1:]:  # intervals start and end at reads, so each is the counter's exact difference
        assert abs((s.energy_wh or 0) - truth(sched, s.start, s.end)) < 0.002, s
    got, want = total(spans), truth(sched, EPOCH, EPOCH + 24 * H)
    assert want > 8_000 and abs(got - want) <= 0.01 * want, (got, want)


def test_a_plug_with_power_only_is_integrated_within_one_percent() -> None:
    sched = day()
    spans = run(sched, plug(sched))
    got, want = total(spans), truth(sched, EPOCH, EPOCH + 24 * H)
    assert abs(got - want) <= 0.01 * want, (got, want)
    running = [s for s in spans if s.state is State.RUNNING and s.end - s.start >= 30 * 60_000]
    assert running
    for s in running:
        assert abs((s.energy_wh or 0) - truth(sched, s.start, s.end)) <= 0.01 * truth(sched, s.start, s.end)


@pytest.mark.parametrize(
    "fault",
    [
        "reset",  # the counter is zeroed (a meter reset, or a new meter starting at 0)
        "rollover",  # a counter of 99,999.9 kWh wraps to 0
        "new meter",  # replaced by a meter whose count is far higher than anything could draw
    ],
)
def test_a_counter_fault_mid_interval_is_never_negative_or_doubled(fault: str) -> None:
    sched = day()
    at_fault = EPOCH + 9 * H + 20 * 60_000 + 5_000  # inside a RUNNING interval, between two reads
    wrap = 99_999_900.0

    def counter(at: int) -> float:
        e = sched.energy_wh(at)
        if at < at_fault:
            return (wrap - 300.0 + e - sched.energy_wh(at_fault)) if fault == "rollover" else BASE_WH + e
        after = e - sched.energy_wh(at_fault)
        return {"reset": after, "rollover": after, "new meter": 5e11 + after}[fault]

    spans = run(sched, meter(sched, counter))
    hit = next(s for s in spans if s.start <= at_fault < s.end)
    assert hit.state is State.RUNNING and hit.energy_wh is not None
    want = truth(sched, hit.start, hit.end)
    # the step across the fault counts nothing: at most one read's worth (1200 W for 10 s) is missing
    assert want - 1200 * EVERY / H - 0.01 <= hit.energy_wh <= want + 0.002, (hit.energy_wh, want)
    assert all((s.energy_wh or 0) >= 0 for s in spans)
    day_truth = truth(sched, EPOCH, EPOCH + 24 * H)
    assert day_truth - 4 <= total(spans) <= day_truth + 0.05


def test_a_gap_in_power_only_reads_invents_nothing() -> None:
    sched = day()
    gap = (EPOCH + 10 * H + 5 * 60_000, EPOCH + 10 * H + 35 * 60_000)  # 30 min of failed reads, running

    def read(at: int) -> tuple[float | None, float | None]:
        return (None, None) if gap[0] <= at < gap[1] else (sched.power_at(at), None)

    spans = run(sched, read)
    unknown = [s for s in spans if s.state is State.UNKNOWN and s.start >= gap[0]]
    assert unknown and all(s.energy_wh is None for s in unknown)  # unknown, never 0 and never made up
    want = truth(sched, EPOCH, EPOCH + 24 * H) - truth(sched, gap[0] - EVERY, gap[1])
    got = total(spans)
    assert got <= want + 0.01 * want and abs(got - want) <= 0.01 * want, (got, want)


def test_a_counter_spans_a_gap_in_reads_when_it_kept_counting() -> None:
    """The meter stops answering for 30 minutes while the instrument runs; its counter went on, so the
    energy across the gap is measured (in the UNKNOWN interval), not invented."""
    sched = day()
    gap = (EPOCH + 10 * H + 5 * 60_000, EPOCH + 10 * H + 35 * 60_000)
    read_ok = meter(sched)

    def read(at: int) -> tuple[float | None, float | None]:
        return (None, None) if gap[0] <= at < gap[1] else read_ok(at)

    spans = run(sched, read)
    got, want = total(spans), truth(sched, EPOCH, EPOCH + 24 * H)
    assert abs(got - want) < 0.01, (got, want)
    # the UNKNOWN interval of the gap holds the counter's step across it (from the last read before)
    across = [s for s in spans if s.state is State.UNKNOWN and gap[0] <= s.start < gap[1]]
    assert across and all(s.energy_wh is not None for s in across)
    assert abs(sum(s.energy_wh or 0 for s in across) - truth(sched, gap[0] - EVERY, gap[1])) < 0.01


def test_a_counter_reset_during_a_gap_counts_nothing_for_the_gap() -> None:
    sched = day()
    gap = (EPOCH + 10 * H + 5 * 60_000, EPOCH + 10 * H + 35 * 60_000)

    def read(at: int) -> tuple[float | None, float | None]:
        if gap[0] <= at < gap[1]:
            return None, None
        e = sched.energy_wh(at)
        return sched.power_at(at), BASE_WH + e if at < gap[0] else e - sched.energy_wh(gap[1] - 60_000)

    spans = run(sched, read)
    in_gap = [s for s in spans if gap[0] <= s.start and s.end <= gap[1]]
    assert in_gap and all(s.energy_wh is None for s in in_gap)
    want = truth(sched, EPOCH, EPOCH + 24 * H) - truth(sched, gap[0] - EVERY, gap[1])
    assert abs(total(spans) - want) < 0.01 * want


def test_a_state_change_dated_back_splits_the_energy_already_read() -> None:
    """The classifier dates a change back to when it began (debounce): the cut falls inside steps already
    fed, and each side gets its own part, in proportion."""
    energy = IntervalEnergy(max_gap_ms=30_000)
    for k in range(7):  # 1000 W for a minute: 10 s steps of 2.777... Wh, counted by power
        energy.feed(EPOCH + k * EVERY, 1000.0)
    first, second = energy.take(EPOCH, EPOCH + 25_000), energy.take(EPOCH + 25_000, EPOCH + 60_000)
    assert first == pytest.approx(1000 * 25 / 3600, abs=0.001)
    assert second == pytest.approx(1000 * 35 / 3600, abs=0.001)
    assert energy.take(EPOCH + 60_000, EPOCH + 70_000) is None  # nothing read after it: unknown, not 0


def test_held_steps_are_bounded_and_keep_their_energy() -> None:
    energy = IntervalEnergy(max_gap_ms=3_000)
    n = 3 * IntervalEnergy.MAX_STEPS
    for k in range(n + 1):
        energy.feed(EPOCH + k * 1000, 360.0)  # 0.1 Wh a second
    assert len(energy._held) <= IntervalEnergy.MAX_STEPS
    assert energy.take(EPOCH, EPOCH + n * 1000) == pytest.approx(0.1 * n, abs=0.002)


def test_an_interval_body_without_energy_is_still_version_1_and_unknown() -> None:
    old = '{"agent":"a","end":2000,"instrument":"i","kind":"interval","prev":"%s","seq":1,"start":1000,"state":"RUNNING","v":1}'
    iv = wire.decode_interval(old % wire.GENESIS)
    assert iv.energy_wh is None and iv.v == 1
    body = wire.Interval("a", "i", 1, wire.GENESIS, 1000, 2000, "RUNNING").body()
    assert "energy_wh" not in body  # a measured nothing is absent, never 0
    with_energy = wire.Interval("a", "i", 1, wire.GENESIS, 0, H, "RUNNING", energy_wh=1234.567)
    assert wire.decode_interval(wire.dump_body(with_energy.body())).energy_wh == 1234.567


@pytest.mark.parametrize(
    ("energy", "length", "why"),
    [
        (-0.001, H, "negative"),
        (math.nan, H, "NaN"),
        (math.inf, H, "infinite"),
        (wire.max_window_energy_wh(H) * 1.0001, H, "beyond 10 MW for the hour"),
        (2_800.0, 1_000, "beyond 10 MW for one second"),
    ],
)
def test_impossible_interval_energy_is_rejected_with_a_reason(energy: float, length: int, why: str) -> None:
    body = wire.Interval("a", "i", 1, wire.GENESIS, EPOCH, EPOCH + length, "RUNNING").body()
    body["energy_wh"] = energy
    with pytest.raises(wire.WireError, match="energy_wh must be within 0"):
        wire.parse_interval(body)


def test_energy_that_is_not_a_number_is_rejected() -> None:
    body = wire.Interval("a", "i", 1, wire.GENESIS, EPOCH, EPOCH + H, "RUNNING").body()
    for bad in ("12.5", True, [1.0], {"wh": 1}):
        body["energy_wh"] = bad
        with pytest.raises(wire.WireError, match="energy_wh"):
            wire.decode_interval(wire.dump_body(body))


class Mono(Clock):
    """Real-time (unscaled) monotonic and wall clocks that move only when the test moves them."""

    def __init__(self) -> None:
        self.m = 0.0

    def mono(self) -> float:
        return self.m

    def wall_ms(self) -> int:
        return EPOCH + round(self.m * 1000)


@pytest.mark.parametrize("level_after_w", [1.0, 1200.0])  # the device switches off as the feed stops, or not
def test_a_feed_silent_until_stale_and_back_counts_only_what_its_messages_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, level_after_w: float
) -> None:
    """A broker outage as the runner meets it (issue #19): a plug pushing its power every second, polled every
    2 s; its last message before the outage is held by the driver and read again at every poll until it is
    stale_after_s old (UNKNOWN), then the feed comes back. What the polls integrated from the held value is
    taken back, so the interval before the outage carries no energy past the last message and never more
    than was drawn, however the device's power changed in the silence."""
    from labmeter import config, signing
    from labmeter.agent.runtime import Agent, InstrumentRunner
    from labmeter.drivers import registry
    from labmeter.drivers.base import DriverBase, Latest, Sample

    signing.generate_key_file(tmp_path / "agent.key")
    cfg = config.parse(
        f'[agent]\nid = "a1"\nkey_file = "{tmp_path / "agent.key"}"\nstate_dir = "{tmp_path / "state"}"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:1"\n'
        '[[instrument]]\nid = "P1"\npoll_s = 2\n[instrument.source]\ndriver = "modbus"\n'
        'url = "tcp://127.0.0.1:1"\nprofile = "eastron-sdm120"\n'
        "[instrument.states]\noff_below_w = 5\nrun_above_w = 600\n",
        registry.agent_config(),
    )
    clock = Mono()
    agent = Agent(cfg, clock)
    runner = InstrumentRunner(cfg.instrument[0], DriverBase(), agent)  # never read: fed by hand below
    runner.recover(agent.timebase.now_ms())
    spans: list[Span] = []
    monkeypatch.setattr(agent, "emit", lambda _i, closed, _cp: spans.extend(closed))
    latest = Latest(clock, stale_after_s=8.0)
    down_s, up_s, end_s = 100.5, 150.0, 200.0  # the feed stops and comes back; the device's power changes
    for tick in range(1, 2 * int(end_s) + 1):  # half seconds
        clock.m = tick / 2
        if clock.m == int(clock.m) and not down_s <= clock.m < up_s:
            latest.put(Sample(power_w=1200.0 if clock.m < down_s else level_after_w))
        if tick % 4 == 0:
            runner.step(latest.get("no message yet", "silent"))

    spans += runner.with_energy(runner.timeline.close(agent.timebase.now_ms()))

    after = State.RUNNING if level_after_w > 600 else State.OFF
    states = [(s.state, (s.start - EPOCH) / 1000, (s.end - EPOCH) / 1000) for s in spans]
    assert states == [
        (State.UNKNOWN, 0.0, 2.0),
        (State.RUNNING, 2.0, 110.0),  # stale at the first poll more than 8 s after the last message
        (State.UNKNOWN, 110.0, 150.0),
        (after, 150.0, 200.0),
    ]
    measured = [None, 1200.0 * (100 - 2) / 3600, None, level_after_w * 50 / 3600]  # between messages
    for span, wh in zip(spans, measured, strict=True):
        assert (span.energy_wh is None) is (wh is None), spans  # the silence is unknown, energy included
        if wh is not None and span.energy_wh is not None:
            assert wh - 1e-3 <= span.energy_wh <= wh, spans
