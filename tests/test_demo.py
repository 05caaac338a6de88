"""`make demo` as a user runs it: the installed `labmeter demo` entry point in a subprocess (with a short
--duration), its printed report checked against the simulated schedule in labmeter/cli/demolab.py, and the report
command it suggests re-run through the CLI on the data it kept."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from labmeter.cli.demolab import BOOKINGS, DAY_HOURS, INSTRUMENTS
from labmeter.config import PolicyConfig
from tests.conftest import ROOT

H = 3600.0
POLICY = PolicyConfig()
DEMO_PREP_S, DEMO_POST_S = 900, 600  # the demo's collector.toml [policy]
# per state change: a poll (30 simulated s) plus the dwell (60 s) late, and real-time jitter at ~2500x on a
# loaded machine (0.1 real s is about 250 simulated s)
PER_CHANGE_H = 0.1


def entry_point() -> list[str]:
    """The console script the Makefile runs (`$(BIN)/labmeter demo`), else the module."""
    script = Path(sys.executable).parent / "labmeter"
    return [str(script)] if script.exists() else [sys.executable, "-m", "labmeter"]


def spans(schedule: list[tuple[float, str]]) -> list[tuple[float, float, str]]:
    end = DAY_HOURS * H
    return [
        (t, min(nxt, end), s) for (t, s), (nxt, _) in zip(schedule, [*schedule[1:], (end, "")], strict=True)
    ]


def truth(schedule: list[tuple[float, str]]) -> tuple[float, list[tuple[float, float]]]:
    """Run hours, and the effective spans (seconds): running plus standby within the allowances of a run."""
    parts = spans(schedule)
    run = sum(e - s for s, e, st in parts if st == "RUNNING") / H
    eff: list[tuple[float, float]] = []
    for i, (s, e, st) in enumerate(parts):
        if st == "RUNNING":
            eff.append((s, e))
        elif st == "STANDBY":
            before = i > 0 and parts[i - 1][2] == "RUNNING"
            after = i + 1 < len(parts) and parts[i + 1][2] == "RUNNING"
            if before:
                eff.append((s, min(e, s + DEMO_POST_S)))
            if after:
                eff.append((max(s, e - DEMO_PREP_S), e))
    return run, eff


def overlap(spans_s: list[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(e, b) - max(s, a)) for s, e in spans_s) / H


def table(text: str, title: str) -> dict[str, dict[str, str]]:
    """The rows of the report table printed after ``title``, by instrument, by English column name."""
    lines = text[text.index(title) :].splitlines()[2:]
    header = [c.strip() for c in lines[0].split("  ") if c.strip()]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("CZ-"):
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_make_demo_runs_this_command() -> None:
    """The test below runs what `make demo` runs (plus --duration and --dir): if the Makefile changes, so must it."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    recipe = lines[lines.index(next(x for x in lines if x.startswith("demo:"))) + 1]
    assert recipe.strip() == "$(BIN)/labmeter demo", recipe


def test_demo_report_matches_the_simulated_day(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*entry_point(), "demo", "--duration", "20", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    out = proc.stdout
    assert f"a simulated working day ({DAY_HOURS} h from 07:00)" in out
    stored = int(out.split("stored ", 1)[1].split()[0])
    assert stored > 3 * DAY_HOURS, out[-2000:]  # at least one interval per instrument and hour bucket
    assert "rejected 0" in out

    rows = table(out, "Report for the simulated day")
    assert set(rows) == {i["id"] for i in INSTRUMENTS}
    for inst in INSTRUMENTS:
        code, schedule = inst["id"], inst["schedule"]
        run, eff = truth(schedule)
        # the printed ground truth is the schedule's
        assert f"  {code:<12} {run:6.2f} h" in out, out[-1500:]
        row = rows[code]
        unknown = float(row["Unknown (h)"]) + float(row["No data (h)"])
        tol = (len(schedule) - 1) * PER_CHANGE_H + unknown
        got_run = float(row["Run hours (h)"])
        assert abs(got_run - run) <= tol, (
            f"{code}: run {got_run} h, schedule {run:.2f} h, tolerance {tol:.2f}"
        )
        got_eff = float(row["Effective hours (h)"])
        eff_h = overlap(eff, 0, DAY_HOURS * H)
        assert abs(got_eff - eff_h) <= tol, f"{code}: effective {got_eff} h, schedule {eff_h:.2f} h"
        assert float(row["Unverified (h)"]) == 0.0
        assert float(row["Coverage (%)"]) >= 85.0, row
        assert float(row["Rated hours (h)"]) == round(POLICY.rated_hours_general * DAY_HOURS / (365 * 24), 2)
        booked = [(s * H, e * H, kind) for c, s, e, _who, _unit, kind, _direction in BOOKINGS if c == code]
        service = sum(overlap(eff, s, e) for s, e, _ in booked)
        external = sum(overlap(eff, s, e) for s, e, kind in booked if kind == 130)  # 130: external service
        assert abs(float(row["Service hours (h)"]) - service) <= tol, (code, row, service)
        assert abs(float(row["External service hours (h)"]) - external) <= tol, (code, row, external)

    # the command the demo suggests, run through the CLI on the data it kept, gives the same figures
    hint = out.rsplit("re-run the report: ", 1)[1].splitlines()[0]
    args = shlex.split(hint)
    assert args[:3] == ["labmeter", "report", "hours"]
    again = subprocess.run(
        [*entry_point(), *args[1:], "--format", "json", "--lang", "en"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert {r["key"] for r in data["rows"]} == set(rows)
    for r in data["rows"]:
        # not no data: the hint's period is the calendar day, the printed report's the simulated 14 h, and
        # the hours after the last interval are no data (docs/decisions.md, "Reports count each
        # instrument's metered part only")
        for col, key in (
            ("Run hours (h)", "run"),
            ("Effective hours (h)", "effective"),
            ("Service hours (h)", "service"),
            ("External service hours (h)", "external"),
        ):
            assert f"{r[f'{key}_h']:.2f}" == rows[r["key"]][col], (col, r)
            # the exact seconds beside the hours are the same figure
            assert r[f"{key}_h"] == round(r["seconds"][f"{key}_s"] / 3600, 2), (key, r)
    assert abs(data["total"]["seconds"]["run_s"] - sum(r["seconds"]["run_s"] for r in data["rows"])) < 0.001
