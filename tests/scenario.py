"""A simulated lab as separate processes on a shared scaled clock, plus its ground truth.

Broker, collector, simulators and agent each run as their own process (``python -m
labmeter ...``) with ``LABMETER_SIM_CLOCK`` set, so restarts and SIGKILLs are real.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
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
MODBUS_TIMEOUT_S = 0.5  # the meter's timeout_s in agent.toml (real seconds)
PLUG_EVERY_S = 1.0
PREP_S, POST_S = 60, 30
WINDOW = (20, 680)
# real seconds from starting the processes to simulated time 0, at least; start_all gives them more on a
# machine where a CLI start (timed at enrolment) is slow, and fails if they are not all up by then (a late
# start would silently shorten what the run covers). Time before 0 is simulated too (all OFF).
HEAD_START_S = 5.0
HEAD_START_CLI_RUNS = 6  # three processes start at once on two cores: each several CLI starts
READY = {
    "collector": ("connected to broker", "collector running"),
    "collector2": ("connected to broker", "collector running"),
    "sim": ("connected to broker",),
    "agent": ("connected to broker", "agent lab-pc-01 running"),
}

# MQTT connections each process makes (the agent: its own link and the plug driver's)
LINKS = {"collector": 1, "collector2": 1, "sim": 1, "agent": 2}

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


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


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
    # fast timers by default; the shipped defaults (5 and 30) in their own variants
    checkpoint_s: float = 2.0
    resend_after_s: float = 2.0
    clock: ScaledClock = field(init=False)
    head_start_s: float = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.set_clock()
        self.meter_port = free_port()
        self.write_files()

    def set_clock(self, head_start_s: float = HEAD_START_S) -> None:
        """Simulated time 0 is ``head_start_s`` from now, for every process started after this."""
        self.head_start_s = head_start_s
        self.clock = ScaledClock(epoch_ms=EPOCH_MS, origin=time.monotonic() + head_start_s, scale=SCALE)
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
            f"checkpoint_s = {self.checkpoint_s}\nresend_after_s = {self.resend_after_s}\n"
            "heartbeat_s = 30\nopen_every_s = 30\n"
            f'[broker]\nurl = "{self.broker.url}"\n'
            f'[[instrument]]\nid = "CZ-XRD-001"\npoll_s = {POLL_S}\nstale_after_s = 8\n'
            f'[instrument.source]\ndriver = "modbus"\nurl = "tcp://127.0.0.1:{self.meter_port}"\n'
            'profile = "eastron-sdm120"\n'
            f"timeout_s = {MODBUS_TIMEOUT_S}\n"
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
    def start(self, name: str, wait: bool = True) -> None:
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
        if name == "sim" and wait:
            wait_port(self.meter_port, timeout=30)

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
        t0 = time.monotonic()
        self.enroll()
        cli_s = (time.monotonic() - t0) / 2
        # enrolment (two CLI runs) does not eat into the head start, and tells how slow a start is here
        self.set_clock(max(HEAD_START_S, HEAD_START_CLI_RUNS * cli_s))
        names = (
            ["collector", "collector2", "sim", "agent"]
            if self.shared_group
            else ["collector", "sim", "agent"]
        )
        for name in names:
            self.start(name, wait=False)
        self.wait_ready(names)

    def wait_ready(self, names: list[str]) -> None:
        """Every process says it is up (its own log) before simulated time 0, or the run fails here."""
        waiting = set(names)
        while waiting:
            for name in list(waiting):
                proc = self.procs[name]
                assert proc.poll() is None, f"{name} exited with {proc.returncode}: {self.log(name)}"
                text = (self.tmp / f"{name}.log").read_text(errors="replace")
                if (
                    all(line in text for line in READY[name])
                    and text.count("connected to broker") >= LINKS[name]
                    and (name != "sim" or port_open(self.meter_port))
                ):
                    waiting.discard(name)
            late = time.monotonic() - self.clock.origin
            if waiting and late > 0:
                raise AssertionError(
                    f"{sorted(waiting)} not up {self.head_start_s:.1f} s after start (simulated time 0): "
                    + " | ".join(f"{n}: {self.log(n)[-800:]}" for n in sorted(waiting))
                )
            time.sleep(0.05)
        print(
            f"all processes up {-late:.1f} s before simulated time 0 (head start {self.head_start_s:.1f} s)"
        )

    def now_s(self) -> float:
        """Simulated seconds since time 0, as every process of the lab reads its clock."""
        return (self.clock.wall_ms() - EPOCH_MS) / 1000

    def log_size(self, name: str) -> int:
        return (self.tmp / f"{name}.log").stat().st_size

    def wait_back(self, offsets: dict[str, int], restarted: bool, timeout: float = 30.0) -> float:
        """Simulated time at which every ``{name: log offset}`` process logs, past its offset, one "connected
        to broker" per MQTT link (and, if ``restarted``, that the agent runs): observed from outside, so the
        ground truth does not come from what the lab stored. Observed late rather than early."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.now_s()
            done = True
            for name, offset in offsets.items():
                proc = self.procs.get(name)
                assert proc is None or proc.poll() is None, (
                    f"{name} died with {proc.returncode}: {self.log(name)}"
                )
                data = (self.tmp / f"{name}.log").read_bytes()
                text = data[offset:].decode(errors="replace")
                up = text.count("connected to broker") >= LINKS[name]
                if name == "agent" and restarted:
                    up = up and "agent lab-pc-01 running" in text
                done = done and up
            if done:
                return now
            assert time.monotonic() < deadline, f"{sorted(offsets)} not back within {timeout} s"
            time.sleep(0.02)

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


Spans = list[tuple[float, float]]

# A real process is not scheduled the instant it could run: on a loaded 2-core machine a poll, a checkpoint or
# our own look at a log may come a tenth of a real second late, which is SCHED_S simulated seconds.
SCHED_S = 0.1 * SCALE
STALE_S = 8.0  # the agent's stale_after_s: a silent plug feed is UNKNOWN after that
# UNKNOWN no fault explains, anywhere in the window: a Modbus read timing out on a loaded machine (its 0.5 s
# timeout is simulated time, 12.5 real ms), and one stall of up to a real second of any process on the
# machine (the agent busy resending a backlog with fsyncs, the broker handing a new subscriber its first
# message): SCALE turns it into 40 simulated seconds, in which the plug's feed goes stale (STALE_S) and
# reads UNKNOWN. Seen on a quiet 2-core CI machine: 8.3 s after a collector restart, 33.6 s after an
# agent lost its state. An agent at real time polling every few seconds does not meet such stalls.
STALL_S = 1.0 * SCALE
SPURIOUS_S = 2 * POLL_S + 1 + STALL_S


def blind_spans(lab: Lab, variant: str, code: str, marks: dict[str, float]) -> tuple[Spans, Spans]:
    """The simulated seconds the agent cannot have seen ``code`` (``must``) and may not have (``may``).

    From the fault's times as the test saw them from outside and the agent's timers; never from the ledger.
    An agent's restart is blind from its last checkpoint (``checkpoint_s`` before the kill at most) until its
    first reading once it runs again (a poll, and for the plug its next message); a broker outage blinds the
    plug (whose readings pass through it) from its feed going stale until both the simulated plug and the
    agent are connected again, and never the Modbus meter.
    """
    schedule, period_s = INSTRUMENTS[code]
    read_s = POLL_S + period_s + 0.5
    if "back" not in marks:
        return [], []
    last, down, up, back = marks["last"], marks["down"], marks["up"], marks["back"]
    seen_again = (back - SCHED_S, back + read_s + SCHED_S)
    if variant.startswith("broker") or variant.startswith("defaults_broker"):
        if period_s == 0:
            return [], []
        return [(down + STALE_S + read_s + SCHED_S, seen_again[0])], [(last, seen_again[1])]
    if variant.endswith("agent_state_lost"):
        # the open interval went with the state: blind since the last change the agent had seen
        surely_seen = max(t for t, _ in schedule if t <= last - read_s - SCHED_S)
        maybe_seen = max(t for t, _ in schedule if t <= down)
        return [(min(maybe_seen + read_s + SCHED_S, down), seen_again[0])], [(surely_seen, seen_again[1])]
    assert variant.endswith("agent_sigkill"), variant
    return [(down, max(up, seen_again[0]))], [(last - lab.checkpoint_s - SCHED_S, seen_again[1])]


def measure(spans: Spans, lo: float = WINDOW[0], hi: float = WINDOW[1]) -> float:
    """Seconds in [lo, hi) covered by the union of ``spans``."""
    total, reach = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, reach), min(b, hi)
        if b > a:
            total += b - a
            reach = b
    return total


def minus(spans: Spans, cut: Spans) -> Spans:
    """``spans`` less everything in ``cut``."""
    out: Spans = []
    for a, b in spans:
        pieces = [(a, b)]
        for c, d in cut:
            pieces = [p for x, y in pieces for p in ((x, min(y, c)), (max(x, d), y)) if p[1] > p[0]]
        out += pieces
    return out


def check_against_truth(lab: Lab, variant: str, marks: dict[str, float]) -> None:
    """The ledger's chains are whole, it is blind exactly where the fault blinded the agent, and its hours
    match the schedules with that time taken out."""
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
            if variant != "agent_state_lost":
                assert h.uncovered_ms == 0, (
                    f"{code}: time with no interval, at "
                    f"{[((s - EPOCH_MS) / 1000, (e - EPOCH_MS) / 1000) for s, e in uncovered(rows, a, b)]} s"
                )
            sim = [((s - EPOCH_MS) / 1000, (e - EPOCH_MS) / 1000, st) for s, e, st, _ in rows]
            blind = [(s, e) for s, e, st in sim if st == "UNKNOWN"]
            blind += [(e0, s1) for (_, e0, _), (s1, _, _) in itertools.pairwise(sim) if s1 > e0]
            must, may = blind_spans(lab, variant, code, marks)
            unseen, spurious = measure(minus(must, blind)), measure(minus(blind, may))
            got_run, got_eff = h.run_ms / 1000, h.effective_ms / 1000
            # the truth with the most and the least the agent may have missed taken out: hours fall between
            run_lo, eff_lo = truth_hours(schedule, may)
            run_hi, eff_hi = truth_hours(schedule, must)
            tol = transitions(schedule) * (POLL_S + period_s + 0.5) + SPURIOUS_S
            msg = (
                f"{variant} {code}: run {got_run:.1f} in [{run_lo:.1f}, {run_hi:.1f}] eff {got_eff:.1f} in "
                f"[{eff_lo:.1f}, {eff_hi:.1f}] tol {tol}; blind {measure(blind):.1f} s, of it {spurious:.1f} s "
                f"unexplained; {unseen:.1f} s of the certain {measure(must):.1f} s not blind; "
                f"marks {marks}; must {must} may {may}; blind {[(round(s, 1), round(e, 1)) for s, e in blind]}"
            )
            print(msg)
            # a stall (STALL_S) delays the poll that notices a silent feed, as it delays the first reading
            assert unseen <= 1.0 + STALL_S, "the ledger claims to have seen what the agent could not: " + msg
            assert spurious <= SPURIOUS_S, "the ledger is blind where nothing blinded the agent: " + msg
            assert run_lo - tol <= got_run <= run_hi + tol, msg
            assert eff_lo - tol <= got_eff <= eff_hi + tol, msg
            assert run_lo > 100, msg  # the known time still holds most of the schedule's running
            # energy after hours: a failure of either says what went wrong first
            check_energy(code, variant, ledger.intervals_between(a, b, code), a, b, reported[code].energy_mwh)
    finally:
        ledger.close()


LEVELS = {"CZ-XRD-001": METER_LEVELS, "CZ-HPLC-002": PLUG_LEVELS}
READ_LAG_S = {"CZ-XRD-001": MODBUS_TIMEOUT_S * SCALE, "CZ-HPLC-002": 0.0}
"""How much older than its time stamp a reading's value may be, in simulated seconds: a Modbus read is
stamped when it returns, up to its timeout after the meter computed it (the plug's lag is its period)."""


# Instruments whose energy the agent integrates from power (no counter), and the share of the truth they
# must reach. Integration drops a step between two reads more than 3 polls apart (a gap: energy is never
# guessed across it); at SCALE 40 that is an event-loop stall of 150 real ms (an fsync, a burst of plug
# messages), which a real-time agent polling every few seconds does not meet. Measured on a quiet 2-core
# machine: 90-97 % of the truth, never above it. At real time power-only integration is within 0.02 %
# (tests/test_energy.py); the meter, which has a counter that bridges such gaps, is held to 1 % here.
# Broker outages are held to the same share (issue #19): traced step by step, a reconnect loses nothing (the
# first message after it starts a new base at the poll that ends UNKNOWN), and the one error found was the
# other way, energy invented from the plug's last message, held by the driver until stale, now taken back.
POWER_ONLY = {"CZ-HPLC-002": 0.8}


def check_energy(code: str, variant: str, rows: list[tuple], a: int, b: int, reported_mwh: int) -> None:
    """The energy the intervals carry against the simulator's schedule, over the time they carry it for.

    The meter counts energy (its counter is the exact integral of the schedule's levels); the plug reports
    power only, which the agent integrates. Truth is the schedule's integral (drivers.sim.Schedule, the
    simulators' own schedule) over each interval that carries energy, clipped to the window: within 1 %,
    plus, where the energy coverage starts or stops inside the window (an agent restart, a silent plug), up
    to one unmeasured poll and one read's lag (READ_LAG_S) of the highest level at each such edge: inside
    a stretch of coverage a lag moves energy between intervals, at its edges it moves it in or out.
    """
    from labmeter.drivers.sim import Schedule

    schedule, period_s = INSTRUMENTS[code]
    levels = LEVELS[code]
    sched = Schedule([(float(t), s) for t, s in schedule], levels=dict(levels), noise=0.0, epoch_ms=EPOCH_MS)
    known = []
    for r in rows:
        start, end, mwh = r.energy()
        lo, hi = max(start, a), min(end, b)
        if mwh is not None and hi > lo:
            known.append((lo, hi, mwh * (hi - lo) / (end - start) / 1000))
    got = sum(wh for _, _, wh in known)
    truth = sum(sched.energy_wh(hi) - sched.energy_wh(lo) for lo, hi, _ in known)
    edges = sum(1 for (_, e0, _), (s1, _, _) in itertools.pairwise(known) if s1 != e0) * 2
    edges += (known[0][0] != a) + (known[-1][1] != b) if known else 0
    slack = edges * (POLL_S + period_s + 0.5 + READ_LAG_S[code]) * max(levels.values()) / 3600
    covered = sum(hi - lo for lo, hi, _ in known)
    msg = (
        f"{variant} {code}: energy {got:.3f} Wh / truth {truth:.3f} Wh over {covered / 1000:.0f} s "
        f"(edges {edges}, slack {slack:.3f} Wh)"
    )
    print(msg)
    assert covered >= 0.5 * (b - a) and truth > 1.0, msg  # most of the window carries energy
    steady = variant in ("steady", "collector_restart", "collector_kill_shared")
    if steady or (code == "CZ-XRD-001" and variant.startswith("broker")):  # a broker never blinds Modbus
        assert covered >= 0.95 * (b - a), msg
    if code in POWER_ONLY:
        # nothing is invented, and what is dropped is bounded: see POWER_ONLY
        assert got <= 1.01 * truth + slack, msg
        assert got >= POWER_ONLY[code] * truth - slack, msg
    else:
        assert abs(got - truth) <= 0.01 * truth + slack, msg
    # the report (rollups and the edges computed) sums exactly what the intervals carry, in whole mWh
    assert abs(reported_mwh / 1000 - got) <= 0.001 * (len(rows) + 1), (reported_mwh, msg)


def truth_state(schedule: list[tuple[int, str]], t: float) -> str:
    state = "OFF"
    for start, s in schedule:
        if start <= t:
            state = s
    return state


def truth_hours(schedule: list[tuple[int, str]], unknown: list[tuple[float, float]]) -> tuple[float, float]:
    """Run and effective seconds in WINDOW by brute force over 0.1 s steps, the ``unknown`` seconds excluded.

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
