"""A wall-clock step is detected and recorded, never stretched into an interval."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from labmeter.agent.outbox import AgentStore
from labmeter.agent.runtime import TimeBase
from labmeter.clock import Clock
from labmeter.wire import State


class SteppingClock(Clock):
    """Monotonic time we control, and a wall clock that can jump (as NTP or an operator may make it)."""

    def __init__(self) -> None:
        self.m = 100.0
        self.offset_ms = 1_772_445_600_000

    def mono(self) -> float:
        return self.m

    def wall_ms(self) -> int:
        return self.offset_ms + int(self.m * 1000)


def test_step_is_detected_and_durations_follow_the_monotonic_clock() -> None:
    clock = SteppingClock()
    tb = TimeBase(clock)
    start = tb.now_ms()
    clock.m += 60
    assert tb.now_ms() - start == 60_000
    assert tb.check_step() is None
    clock.offset_ms += 3_600_000  # the wall clock jumps an hour forward
    clock.m += 10
    assert tb.now_ms() - start == 70_000  # the open interval does not grow by the jump
    step = tb.check_step()
    assert step is not None
    expected, wall = step
    assert wall - expected == 3_600_000
    assert tb.now_ms() == wall  # re-anchored: later boundaries follow UTC again
    assert tb.check_step() is None


def test_steps_stay_on_their_intervals_when_the_next_step_or_a_shutdown_closes_them(tmp_path: Path) -> None:
    """Issue 11: the step was dropped when a second step or the shutdown closed the interval after it."""
    from labmeter import config, signing, wire
    from labmeter.agent.runtime import Agent, InstrumentRunner
    from labmeter.drivers import registry

    signing.generate_key_file(tmp_path / "agent.key")
    cfg = config.parse(
        f'[agent]\nid = "a1"\nkey_file = "{tmp_path / "agent.key"}"\nstate_dir = "{tmp_path / "state"}"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:1"\n'
        '[[instrument]]\nid = "I1"\n[instrument.source]\ndriver = "modbus"\nurl = "tcp://127.0.0.1:1"\n'
        'profile = "eastron-sdm120"\n[instrument.states]\noff_below_w = 5\nrun_above_w = 600\n',
        registry.agent_config(),
    )
    clock = SteppingClock()
    agent = Agent(cfg, clock)
    runner = InstrumentRunner(cfg.instrument[0], None, agent)  # type: ignore[arg-type]  # never polled
    runner.recover(agent.timebase.now_ms())
    agent.runners.append(runner)
    runner.timeline.state = State.RUNNING
    for jump_ms in (60_000, -30_000):  # forward, then back before the interval after the first closed
        clock.m += 5
        clock.offset_ms += jump_ms
        step = agent.timebase.check_step()
        assert step is not None
        agent._clock_stepped(*step)
    clock.m += 4
    asyncio.run(agent._shutdown())

    store = AgentStore(tmp_path / "state" / "agent.db")
    bodies = [wire.load_body(wire.open_envelope(r.payload).body) for r in store.unsent(1e18)]
    assert [b.get("clock_step_ms", 0) for b in bodies] == [0, 60_000, -30_000]
    for prev, cur in itertools.pairwise(bodies):  # every link meets its predecessor: all verified time
        assert prev["end"] + cur.get("clock_step_ms", 0) == cur["start"]
    assert sum(b["end"] - b["start"] for b in bodies) == 14_000
