"""Run and effective hours from intervals, checked against hand-computed cases."""

from __future__ import annotations

import pytest

from labmeter.machine_hours import compute

M = 60_000
PREP, POST = 15 * M, 10 * M


def rows(*spec: tuple[int, int, str]) -> list[tuple[int, int, str, bool]]:
    return [(a * M, b * M, s, True) for a, b, s in spec]


@pytest.mark.parametrize(
    ("name", "spec", "run_min", "eff_min"),
    [
        ("standby before run within prep", [(0, 10, "STANDBY"), (10, 70, "RUNNING")], 60, 70),
        ("long standby before run capped at prep", [(0, 40, "STANDBY"), (40, 100, "RUNNING")], 60, 75),
        ("standby after run capped at post", [(0, 30, "RUNNING"), (30, 100, "STANDBY")], 30, 40),
        (
            "standby between runs: post + prep",
            [(0, 10, "RUNNING"), (10, 60, "STANDBY"), (60, 70, "RUNNING")],
            20,
            45,
        ),
        (
            "short standby between runs counted whole",
            [(0, 10, "RUNNING"), (10, 30, "STANDBY"), (30, 40, "RUNNING")],
            20,
            40,
        ),
        ("off breaks adjacency", [(0, 10, "STANDBY"), (10, 11, "OFF"), (11, 20, "RUNNING")], 9, 9),
        ("unknown breaks adjacency", [(0, 10, "RUNNING"), (10, 12, "UNKNOWN"), (12, 20, "STANDBY")], 10, 10),
        (
            "split standby intervals merge",
            [(0, 5, "STANDBY"), (5, 20, "STANDBY"), (20, 30, "RUNNING")],
            10,
            25,
        ),
    ],
)
def test_effective(name: str, spec: list[tuple[int, int, str]], run_min: int, eff_min: int) -> None:
    h = compute(rows(*spec), 0, 200 * M, PREP, POST)
    assert h.run_ms == run_min * M, name
    assert h.effective_ms == eff_min * M, name


def test_period_edges_use_context_outside_the_period() -> None:
    spec = rows((0, 100, "STANDBY"), (100, 160, "RUNNING"))
    # period starts at 90: 10 min of standby inside it lies within the prep allowance
    h = compute(spec, 90 * M, 130 * M, PREP, POST)
    assert h.run_ms == 30 * M
    assert h.effective_ms == 40 * M
    assert h.standby_ms == 10 * M


def test_unverified_gaps_and_coverage() -> None:
    spec = [(0, 10 * M, "RUNNING", True), (10 * M, 20 * M, "RUNNING", False), (30 * M, 40 * M, "OFF", True)]
    h = compute(spec, 0, 40 * M, PREP, POST)
    assert h.run_ms == 10 * M
    assert h.unverified_ms == 10 * M
    assert h.uncovered_ms == 10 * M
    assert h.coverage == pytest.approx(0.5)


def test_overlapping_intervals_count_once() -> None:
    spec = rows((0, 30, "RUNNING"), (20, 40, "RUNNING"))
    assert compute(spec, 0, 60 * M, PREP, POST).run_ms == 40 * M


def test_of_two_copies_of_an_interval_the_linked_one_counts() -> None:
    """A copy sent before a new chain began may be stored unlinked; the new chain's copy is verified time."""
    copies = [(0, 10 * M, "RUNNING", False), (0, 10 * M, "RUNNING", True)]
    for order in (copies, copies[::-1]):
        h = compute(order, 0, 10 * M, PREP, POST)
        assert (h.run_ms, h.unverified_ms) == (10 * M, 0)
    alone = compute([(0, 10 * M, "RUNNING", False)], 0, 10 * M, PREP, POST)
    assert (alone.run_ms, alone.unverified_ms) == (0, 10 * M)
