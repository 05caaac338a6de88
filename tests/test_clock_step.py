"""A wall-clock step is detected and recorded, never stretched into an interval."""

from __future__ import annotations

from labmeter.agent.runtime import TimeBase
from labmeter.clock import Clock


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
