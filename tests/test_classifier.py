"""Thresholds, hysteresis, dwell debounce, and UNKNOWN on failed reads."""

from __future__ import annotations

import pytest

from labmeter.agent.classifier import Classifier
from labmeter.config import StatesConfig
from labmeter.drivers.base import Reading
from labmeter.wire import State

OFF, SB, RUN, UNK = State.OFF, State.STANDBY, State.RUNNING, State.UNKNOWN


def run(cfg: StatesConfig, powers: list[float | None]) -> list[tuple[State, int | None]]:
    c = Classifier(cfg)
    out = []
    for i, p in enumerate(powers):
        r = Reading(mono=float(i), at_ms=i * 1000, power_w=p, error=None if p is not None else "timeout")
        ch = c.update(r)
        out.append((ch.state, ch.since_ms))
    return out


@pytest.mark.parametrize(
    ("powers", "states"),
    [
        ([0, 100, 500, 100, 0], [OFF, SB, RUN, SB, OFF]),
        ([4.9, 5, 399.9, 400], [OFF, SB, SB, RUN]),
        ([500, None, 500], [RUN, UNK, RUN]),
        ([None, 0], [UNK, OFF]),
    ],
)
def test_thresholds(powers: list[float | None], states: list[State]) -> None:
    cfg = StatesConfig(off_below_w=5, run_above_w=400)
    assert [s for s, _ in run(cfg, powers)] == states


def test_hysteresis_holds_state_near_threshold() -> None:
    cfg = StatesConfig(off_below_w=5, run_above_w=400, hysteresis_w=20)
    got = [s for s, _ in run(cfg, [410, 390, 381, 379, 390, 400, 6, 3, 20, 26])]
    assert got == [RUN, RUN, RUN, SB, SB, RUN, SB, OFF, OFF, SB]


def test_dwell_debounces_and_backdates_the_change() -> None:
    cfg = StatesConfig(off_below_w=5, run_above_w=400, min_dwell_s=3)
    got = run(cfg, [500, 500, 100, 500, 100, 100, 100, 100, 100])
    states = [s for s, _ in got]
    # a one-sample dip is ignored; a change that holds 3 s is confirmed and dated to its first sample
    assert states == [RUN, RUN, RUN, RUN, RUN, RUN, RUN, SB, SB]
    assert got[7] == (SB, 4000)


def test_read_error_is_unknown_at_once_even_with_dwell() -> None:
    cfg = StatesConfig(off_below_w=5, run_above_w=400, min_dwell_s=30)
    got = run(cfg, [500, None, 0])
    assert got == [(RUN, 0), (UNK, 1000), (OFF, 2000)]
