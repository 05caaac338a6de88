"""A simulated lab as separate processes on a shared scaled clock, plus its ground truth.

Broker, collector, simulators and agent each run as their own process (``python -m
labmeter ...``) with ``LABMETER_SIM_CLOCK`` set, so restarts and SIGKILLs are real.
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from labmeter.clock import SIM_CLOCK_ENV, ScaledClock
from labmeter.collector.ledger import Ledger
from labmeter.machine_hours import uncovered
from labmeter.wire import GENESIS
from tests.conftest import LABMETER, BrokerProcess, free_port, wait_port

EPOCH_MS = 1_772_445_300_000  # 2026-03-02T09:55:00Z: the run crosses a UTC hour boundary
SCALE = 40.0
POLL_S = 2.0
PLUG_EVERY_S = 1.0
PREP_S, POST_S = 60, 30
WINDOW = (20, 680)
# real seconds from starting the processes to simulated time 0; start_all fails if they are not all up by
# then (a late start would silently shorten what the run covers). Time before 0 is simulated too (all OFF).
HEAD_START_S = 5.0
READY = {
    "collector": ("connected to broker", "collector running"),
    "collector2": ("connected to broker", "collector running"),
    "sim": ("connected to broker",),
    "agent": ("connected to broker", "agent lab-pc-01 running"),
}

METER_SCHEDULE = [
    (0, "OFF"),
    (40, "STANDBY"),
    (100, "RUNNING"),
    (250, "STANDBY"),
    (290, "RUNNING"),
    (420, "STANDBY"),
    (480, "OFF"),
    (540, "STANDBY"),
    (560, "RUNNING"),
    (640, "OFF"),
]
PLUG_SCHEDULE = [
    (0, "OFF"),
    (60, "STANDBY"),
    (80, "RUNNING"),
    (200, "OFF"),
    (230, "STANDBY"),
    (300, "RUNNING"),
    (500, "STANDBY"),
    (600, "OFF"),
]
METER_LEVELS = {"OFF": 1.0, "STANDBY": 150.0, "RUNNING": 1200.0}
PLUG_LEVELS = {"OFF": 0.4, "STANDBY": 30.0, "RUNNING": 140.0}


def _toml_schedule(points: list[tuple[int, str]]) -> str:
    return "[" + ", ".join(f'[{t}, "{s}"]' for t, s in points) + "]"


def _toml_levels(levels: dict[str, float]) -> str:
    return "{ " + ", ".join(f"{k} = {v}" for k, v in levels.items()) + " }"


@dataclass
class Lab:
    tmp: Path
    broker: BrokerProcess
    ledger_url: str = "sqlite"
    shared_group: str | None = None  # two collectors sharing the load, as in a scale-out
    clock: ScaledClock = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.set_clock()
        self.meter_port = free_port()
        self.write_files()

    def set_clock(self) -> None:
        """Simulated time 0 is HEAD_START_S from now, for every process started after this."""
        self.clock = ScaledClock(epoch_ms=EPOCH_MS, origin=time.monotonic() + HEAD_START_S, scale=SCALE)
        self.env = {**os.environ, SIM_CLOCK_ENV: self.clock.env_value(), "PYTHONUNBUFFERED": "1"}

    # files ---------------------------------------------------------------
    def write_files(self) -> None:
        t = self.tmp
        (t / "sim.toml").write_text(
            f"epoch_ms = {EPOCH_MS}\n"
            f'[[meter]]\nlisten = "127.0.0.1:{self.meter_port}"\nnoise = 0.01\n'
            f"schedule = {_toml_schedule(METER_SCHEDULE)}\nlevels = {_toml_levels(METER_LEVELS)}\n"
            f'[[plug]]\ntopic = "tele/lab_plug/SENSOR"\nbroker = "{self.broker.url}"\nevery_s = {PLUG_EVERY_S}\n'
            f"noise = 0.01\nschedule = {_toml_schedule(PLUG_SCHEDULE)}\nlevels = {_toml_levels(PLUG_LEVELS)}\n"
        )
        (t / "agent.toml").write_text(
            '[agent]\nid = "lab-pc-01"\nkey_file = "agent.key"\nstate_dir = "agent-state"\n'
            "checkpoint_s = 2\nresend_after_s = 2\nheartbeat_s = 30\nopen_every_s = 30\n"
            f'[broker]\nurl = "{self.broker.url}"\n'
            f'[[instrument]]\nid = "CZ-XRD-001"\npoll_s = {POLL_S}\nstale_after_s = 8\n'
            f'[instrument.source]\ndriver = "modbus"\nurl = "tcp://127.0.0.1:{self.meter_port}"\n'
            'profile = "eastron-sdm120"\ntimeout_s = 0.5\n'
            "[instrument.states]\noff_below_w = 5\nrun_above_w = 600\n"
            f'[[instrument]]\nid = "CZ-HPLC-002"\npoll_s = {POLL_S}\nstale_after_s = 8\n'
            '[instrument.source]\ndriver = "mqtt"\ntopic = "tele/lab_plug/SENSOR"\n'
            "[instrument.states]\noff_below_w = 3\nrun_above_w = 80\n"
        )
        for name in ("collector", "collector2") if self.shared_group else ("collector",):
            shared = (
                f'shared_group = "{self.shared_group}"\nclient_id = "{name}"\n' if self.shared_group else ""
            )
            (t / f"{name}.toml").write_text(
                f'[collector]\ndata_dir = "{name}-data"\nmax_future_s = 60\nledger = "{self.ledger_url}"\n'
                # collectors sharing a ledger share one key: the agent pins one
                'key_file = "collector.key"\n'
                f'[broker]\nurl = "{self.broker.url}"\n{shared}'
                f"[policy]\nprep_allowance_s = {PREP_S}\npost_allowance_s = {POST_S}\n"
            )

    def cli(self, *args: str) -> str:
        proc = subprocess.run(
            [*LABMETER, *args], cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def enroll(self) -> None:
        out = self.cli("agent", "enroll", "--config", "agent.toml")
        add = next(line.strip() for line in out.splitlines() if line.strip().startswith("labmeter collector"))
        self.cli(*add.split()[1:], "--config", "collector.toml")

    # processes -------------------------------------------------------------
    def start(self, name: str) -> None:
        args = {
            "sim": ["sim", "sim.toml"],
            "collector": ["collector", "run", "--config", "collector.toml"],
            "collector2": ["collector", "run", "--config", "collector2.toml"],
            "agent": ["agent", "run", "--config", "agent.toml"],
        }[name]
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [*LABMETER, *args], cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        if name == "sim":
            wait_port(self.meter_port)

    def stop(self, name: str, kill: bool = False) -> int:
        """SIGTERM (which must end the process cleanly within 20 s) or SIGKILL; its exit status."""
        proc = self.procs.pop(name)
        assert proc.poll() is None, f"{name} had already exited with {proc.returncode}: {self.log(name)}"
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"{name} did not stop within 20 s of SIGTERM: {self.log(name)}") from None
        assert kill or rc == 0, f"{name} exited with {rc} on SIGTERM: {self.log(name)}"
        return rc

    def start_all(self) -> None:
        self.enroll()
        self.set_clock()  # enrolment (two CLI runs) does not eat into the head start
        names = (
            ["collector", "collector2", "sim", "agent"]
            if self.shared_group
            else ["collector", "sim", "agent"]
        )
        for name in names:
            self.start(name)
        self.wait_ready(names)

    def wait_ready(self, names: list[str]) -> None:
        """Every process says it is up (its own log) before simulated time 0, or the run fails here."""
        waiting = set(names)
        while waiting:
            for name in list(waiting):
                proc = self.procs[name]
                assert proc.poll() is None, f"{name} exited with {proc.returncode}: {self.log(name)}"
                text = (self.tmp / f"{name}.log").read_text(errors="replace")
                if all(line in text for line in READY[name]):
                    waiting.discard(name)
            late = time.monotonic() - self.clock.origin
            if waiting and late > 0:
                raise AssertionError(
                    f"{sorted(waiting)} not up {HEAD_START_S} s after start (simulated time 0): "
                    + " | ".join(f"{n}: {self.log(n)[-800:]}" for n in sorted(waiting))
                )
            time.sleep(0.05)
        print(f"all processes up {-late:.1f} s before simulated time 0 (head start {HEAD_START_S} s)")

    def sleep_until(self, sim_s: float) -> None:
        """Wait for simulated time ``sim_s``; a process that dies meanwhile fails the run at once."""
        target_ms = EPOCH_MS + sim_s * 1000
        while self.clock.wall_ms() < target_ms:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} died with {proc.returncode}: {self.log(name)}"
            time.sleep(0.02)

    def finish(self) -> None:
        self.sleep_until(WINDOW[1] + 10)
        assert self.stop("agent") == 0, self.log("agent")
        self.wait_settled()
        for name in ("collector", "collector2"):
            if name in self.procs:
                assert self.stop(name) == 0, self.log(name)
        assert self.stop("sim") == 0, self.log("sim")

    def wait_settled(self, timeout: float = 10.0) -> None:
        """Until the ledger holds the last link of every chain the agent signed (instead of a guessed pause);
        on timeout the ground-truth check reports what is missing."""
        db = sqlite3.connect(self.tmp / "agent-state" / "agent.db")
        try:
            heads = dict(db.execute("SELECT instrument, seq FROM chain").fetchall())
        finally:
            db.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ledger = self.ledger()
            try:
                stored = dict(
                    ledger.db.execute(
                        "SELECT instrument, MAX(seq) FROM intervals GROUP BY instrument"
                    ).fetchall()
                )
            finally:
                ledger.close()
            if all(stored.get(code, 0) >= seq for code, seq in heads.items() if code in INSTRUMENTS):
                return
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Kill whatever a failed scenario left running, so it cannot disturb the next one."""
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def outbox_left(self) -> int:
        db = sqlite3.connect(self.tmp / "agent-state" / "agent.db")
        try:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        finally:
            db.close()

    def ledger(self) -> Ledger:
        return Ledger.open(self.ledger_url, self.tmp / "collector-data")


INSTRUMENTS = {"CZ-XRD-001": (METER_SCHEDULE, 0.0), "CZ-HPLC-002": (PLUG_SCHEDULE, PLUG_EVERY_S)}


def check_against_truth(lab: Lab, variant: str, marks: dict[str, float]) -> None:
    """The ledger's chains are whole and its hours match the schedules, within what a disruption explains."""
    from labmeter.collector.reports.hours import per_instrument
    from labmeter.config import PolicyConfig
    from labmeter.machine_hours import compute

    assert lab.outbox_left() == 0, "the outbox did not drain: " + lab.log("agent")
    a, b = EPOCH_MS + WINDOW[0] * 1000, EPOCH_MS + WINDOW[1] * 1000
    ledger = lab.ledger()
    try:
        for code, (schedule, period_s) in INSTRUMENTS.items():
            chain = ledger.db.execute(
                "SELECT seq, prev FROM intervals WHERE instrument=? ORDER BY seq", (code,)
            ).fetchall()
            starts = [seq for seq, prev in chain if prev == GENESIS]
            assert chain[0][0] == starts[0], f"{code}: the chain's first link is missing"
            for (s0, _), (s1, p1) in itertools.pairwise(chain):
                assert s1 == s0 + 1 or p1 == GENESIS, f"{code}: chain has a gap after seq {s0}"
            assert len(starts) == (2 if variant == "agent_state_lost" else 1), f"{code}: chains {starts}"
            rows = [r.span() for r in ledger.intervals_between(a - PREP_S * 1000, b + PREP_S * 1000, code)]
            conflicts = ledger.db.execute(
                "SELECT COUNT(*) FROM rejections WHERE instrument=? AND reason LIKE 'conflict%'", (code,)
            ).fetchone()[0]
            assert conflicts == 0, f"{code}: {conflicts} conflict(s)"
            h = compute(rows, a, b, PREP_S * 1000, POST_S * 1000)
            reported = per_instrument(
                ledger, a, b, PolicyConfig(prep_allowance_s=PREP_S, post_allowance_s=POST_S)
            )
            assert (reported[code].run_ms, reported[code].effective_ms) == (h.run_ms, h.effective_ms), code
            assert h.unverified_ms == 0, f"{code}: unverified time"
            unknown = [
                ((s - EPOCH_MS) / 1000, (e - EPOCH_MS) / 1000) for s, e, st, _ in rows if st == "UNKNOWN"
            ]
            # a change is seen up to a poll late: what happened just before a gap had not been seen yet
            lag = POLL_S + period_s + 0.5
            gaps = [
                ((e0 - EPOCH_MS) / 1000 - lag, (s1 - EPOCH_MS) / 1000)
                for (_, e0, _, _), (s1, _, _, _) in itertools.pairwise(rows)
                if s1 > e0
            ]
            down = marks.get("up", 0) - marks.get("down", 0)
            if variant == "agent_state_lost":
                # the open interval went with the state: no data from the last state change the old agent
                # reported until the new agent's first reading
                last_change = max(t for t, _ in schedule if t < marks["down"] - 5)
                gap_s = h.uncovered_ms / 1000
                assert down - 3 <= gap_s <= marks["up"] - last_change + 60, f"{code}: no data for {gap_s} s"
            else:
                assert h.uncovered_ms == 0, (
                    f"{code}: time with no interval, at "
                    f"{[((s - EPOCH_MS) / 1000, (e - EPOCH_MS) / 1000) for s, e in uncovered(rows, a, b)]} s"
                )
            run_s, eff_s = truth_hours(schedule, unknown + gaps)
            tol = transitions(schedule) * (POLL_S + period_s + 0.5)
            got_run, got_eff, unknown_s = h.run_ms / 1000, h.effective_ms / 1000, h.unknown_ms / 1000
            msg = f"{variant} {code}: run {got_run:.1f}/{run_s:.1f} eff {got_eff:.1f}/{eff_s:.1f} unknown {unknown_s:.1f} tol {tol}"
            print(msg)
            assert abs(got_run - run_s) <= tol, msg
            assert abs(got_eff - eff_s) <= tol, msg
            assert run_s > 100, msg  # the known time still holds most of the schedule's running

            if variant in ("steady", "collector_restart", "collector_kill_shared"):
                assert unknown_s <= 2 * POLL_S + 1, msg
            elif variant == "agent_state_lost":
                assert unknown_s <= (80 if code == "CZ-XRD-001" else 240), (
                    msg
                )  # the down time is no data instead
            elif variant == "agent_sigkill":
                # the agent's down time is UNKNOWN: at least the real gap less one checkpoint period, plus the
                # restarted agent's start-up (a process start; for the plug also a broker connection and a
                # first message), a few real seconds at this time scale on a loaded machine
                slack = 80 if code == "CZ-XRD-001" else 240
                assert down - 3 <= unknown_s <= down + slack, msg
            elif code == "CZ-XRD-001":
                assert unknown_s <= 2 * POLL_S + 1, msg  # a broker outage does not blind a Modbus meter
            else:
                assert unknown_s <= down + 400, msg  # the plug's feed goes through the broker
    finally:
        ledger.close()


def truth_state(schedule: list[tuple[int, str]], t: float) -> str:
    state = "OFF"
    for start, s in schedule:
        if start <= t:
            state = s
    return state


def truth_hours(schedule: list[tuple[int, str]], unknown: list[tuple[float, float]]) -> tuple[float, float]:
    """Run and effective seconds in WINDOW by brute force over 0.1 s steps, seconds the ledger says UNKNOWN excluded.

    Written independently of labmeter.machine_hours on purpose: a bug there must not cancel out here.
    """
    step = 0.1
    lo, hi = WINDOW[0] - PREP_S - 10, WINDOW[1] + PREP_S + 10
    n = int((hi - lo) / step)
    times = [lo + i * step for i in range(n)]
    states = []
    for t in times:
        masked = any(a <= t < b for a, b in unknown)
        states.append("UNKNOWN" if masked else truth_state(schedule, t))
    # distance to the next/previous RUNNING sample across contiguous STANDBY only
    to_next = [float("inf")] * n
    for i in range(n - 2, -1, -1):
        if states[i + 1] == "RUNNING":
            to_next[i] = step
        elif states[i + 1] == "STANDBY":
            to_next[i] = to_next[i + 1] + step
    since_prev = [float("inf")] * n
    for i in range(1, n):
        if states[i - 1] == "RUNNING":
            since_prev[i] = 0.0
        elif states[i - 1] == "STANDBY":
            since_prev[i] = since_prev[i - 1] + step
    run = eff = 0.0
    for i, t in enumerate(times):
        if not (WINDOW[0] <= t < WINDOW[1]):
            continue
        if states[i] == "RUNNING":
            run += step
            eff += step
        elif states[i] == "STANDBY" and (to_next[i] <= PREP_S + 1e-9 or since_prev[i] < POST_S - 1e-9):
            eff += step
    return run, eff


def transitions(schedule: list[tuple[int, str]]) -> int:
    return sum(1 for t, _ in schedule if WINDOW[0] - PREP_S <= t <= WINDOW[1])
