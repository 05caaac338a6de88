"""Soak: many agents, one Mosquitto, one collector, both killed and restarted at random; nothing lost.

Each simulated agent measures one instrument and has its own MQTT connection and its own
state file: it signs intervals with the agent's outbox (agent/outbox.py, labmeter/wire.py,
labmeter/signing.py), sends them over labmeter/mqtt.py as the agent does, resends what is
not acknowledged and deletes only what the collector acknowledges. The agents run in a few
worker processes; the collector is a real ``labmeter collector run`` process on an SQLite
ledger. Meanwhile Mosquitto and the collector are SIGKILLed at random moments, stay down
for a random while and start again. At the end both go down for 10 s, so that every run
ends with a backlog; once they are back the agents stop emitting and drain, and every
emitted interval is looked up in the ledger.

    .venv/bin/python -m benchmarks.soak [--agents 1000] [--duration 600] [--processes 4]

Prints messages emitted and stored, lost (target 0), duplicated (target 0: a seq whose
stored body differs, a stored row no agent emitted, or time stored twice for an
instrument), the deepest outbox and the drain time, then PASS or FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import free_port, wait_port
from labmeter import signing, wire
from labmeter.agent.outbox import AgentStore, Signer
from labmeter.agent.timeline import Span
from labmeter.collector.ledger import Ledger
from labmeter.config import BrokerConfig
from labmeter.mqtt import MqttLink, Will
from labmeter.wire import State

STATES = (State.RUNNING, State.STANDBY, State.OFF)
DRAIN_TARGET_S = 120.0
FINAL_OUTAGE_S = 10.0


def agent_id(i: int) -> str:
    return f"soak-{i:04d}"


def instrument_id(i: int) -> str:
    return f"S{i:04d}"


def agent_key(seed: str, i: int) -> signing.PrivateKey:
    """Keys derived from the run's seed, so the workers and the registry agree without key files."""
    return signing.PrivateKey(hashlib.sha256(f"{seed}/{agent_id(i)}".encode()).digest())


# workers --------------------------------------------------------------------
@dataclass
class SimAgent:
    """One agent with one instrument, doing what agent/runtime.py does with its outbox and link."""

    index: int
    store: AgentStore
    signer: Signer
    link: MqttLink
    resend_s: float
    collector: signing.SignatureChecker
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    emitted: list[tuple[int, str]] = field(default_factory=list)
    last_end: int = 0
    max_depth: int = 0
    rejected: int = 0

    @property
    def instrument(self) -> str:
        return instrument_id(self.index)

    def emit(self, now_ms: int, n: int) -> None:
        span = Span(self.last_end, now_ms, STATES[n % len(STATES)])
        for row in self.store.emit(self.signer, self.instrument, [span], None):
            self.emitted.append((row.seq, wire.body_hash(wire.open_envelope(row.payload).body)))
        self.last_end = now_ms
        self.kick.set()

    def on_connected(self) -> None:
        self.store.mark_all_unsent()
        self.kick.set()

    def on_ack(self, _topic: str, payload: bytes) -> None:
        """As agent/runtime.py does: only a signed ack from the collector's key, about this agent's own
        bodies (by hash), deletes anything."""
        try:
            env = wire.open_envelope(payload)
            if not self.collector(env.body.encode(), env.sig):
                print(f"{agent_id(self.index)}: an ack the collector did not sign", file=sys.stderr)
                return
            ack = wire.decode_ack(env.body)
        except wire.WireError as exc:
            print(f"{agent_id(self.index)}: unreadable ack: {exc}", file=sys.stderr)
            return
        if ack.agent != agent_id(self.index):
            return
        for rej in ack.rejects:
            if self.store.reject(rej.instrument, rej.seq, rej.sha256, rej.reason):
                self.rejected += 1
                print(f"{agent_id(self.index)}: rejected seq {rej.seq}: {rej.reason}", file=sys.stderr)
        for chain, entry in ack.acks.items():
            self.store.ack_matching(chain, entry.seq, entry.sha256)

    async def publisher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.kick.wait()
            self.kick.clear()
            if not self.link.connected:
                continue
            now = time.time()
            rows = self.store.unsent(now - self.resend_s)
            sent = [r.id for r in rows if self.link.publish(r.topic, r.payload, qos=1)]
            self.store.mark_sent(sent, now)
            await asyncio.sleep(0)


async def worker_main(args: dict[str, Any]) -> None:
    work = Path(args["dir"])
    broker = BrokerConfig(url=f"mqtt://127.0.0.1:{args['port']}")
    agents: list[SimAgent] = []
    collector = signing.SignatureChecker(signing.parse_public_key(args["collector_key"]))
    for i in args["indices"]:
        key = agent_key(args["seed"], i)
        signer = Signer(agent_id(i), key, signing.key_id(key.public_key()))
        store = AgentStore(work / "agents" / f"{agent_id(i)}.db")
        link = MqttLink(
            broker,
            f"labmeter-agent-{agent_id(i)}",
            will=Will(wire.status_topic(agent_id(i)), b"offline"),
            subscriptions=((wire.ack_topic(agent_id(i)), 1),),
        )
        a = SimAgent(i, store, signer, link, args["resend_s"], collector, last_end=int(time.time() * 1000))
        link.client.on_message = _handler(a)
        link.on_connect(a.on_connected)
        agents.append(a)
    for a in agents:
        await a.link.start()
    for a in agents:
        await a.link.wait_connected()
    (work / f"ready-{args['worker']}").touch()
    tasks = [asyncio.create_task(a.publisher()) for a in agents]
    rng = random.Random(f"{args['seed']}/{args['worker']}")
    every = args["every_s"]
    due = {a.index: time.monotonic() + rng.uniform(0, every) for a in agents}
    counts = dict.fromkeys(due, 0)
    drain_flag = work / "drain"
    peak_total = 0
    next_sample = time.monotonic()
    while not drain_flag.exists():
        now = time.monotonic()
        for a in agents:
            if due[a.index] <= now:
                a.emit(int(time.time() * 1000), counts[a.index])
                counts[a.index] += 1
                due[a.index] = now + every
        if now >= next_sample:
            peak_total = max(peak_total, _sample(agents))
            next_sample = now + 5.0
        await asyncio.sleep(0.1)
    drain_start = time.monotonic()
    deadline = drain_start + args["drain_timeout_s"]
    left = _sample(agents)
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        left = _sample(agents)
    drain_s = time.monotonic() - drain_start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for a in agents:
        await a.link.stop()
        a.store.close()
    result = {
        "emitted": {agent_id(a.index): a.emitted for a in agents},
        "max_depth": max(a.max_depth for a in agents),
        "peak_total": peak_total,
        "left": left,
        "drain_s": drain_s,
        "rejected": sum(a.rejected for a in agents),
    }
    (work / f"worker-{args['worker']}.json").write_text(json.dumps(result))


def _handler(a: SimAgent) -> Any:
    def on_message(_c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        a.on_ack(topic, payload)
        return 0

    return on_message


def _sample(agents: list[SimAgent]) -> int:
    total = 0
    for a in agents:
        depth = a.store.pending_count()
        a.max_depth = max(a.max_depth, depth)
        total += depth
    return total


def worker(args: dict[str, Any]) -> None:
    import os

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(Path(args["dir"]) / f"worker-{args['worker']}.log", "ab") as log:  # gmqtt prints to stdout
        os.dup2(log.fileno(), 1)
    for name in ("gmqtt", "labmeter.mqtt"):  # a warning per agent and kill: 1,000 lines each time
        logging.getLogger(name).setLevel(logging.ERROR)
    asyncio.run(worker_main(args))


# the services -----------------------------------------------------------------
class Service:
    """A process we kill and start again: Mosquitto, or `labmeter collector run`."""

    def __init__(self, name: str, cmd: list[str], log: Path, port: int | None = None) -> None:
        self.name, self.cmd, self.log, self.port = name, cmd, log, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=out)
        if self.port is not None:
            wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.kills += 1

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def chaos(services: list[Service], duration: float, mean_gap: float, rng: random.Random) -> list[str]:
    """Kill one service (sometimes both) at random moments, restart after 1-10 s; returns the log."""
    events = []
    t0 = time.monotonic()
    end = t0 + duration
    while True:
        gap = min(max(rng.expovariate(1 / mean_gap), 3.0), 3 * mean_gap)
        if time.monotonic() + gap >= end:
            break
        time.sleep(gap)
        victims = services if rng.random() < 0.2 else [rng.choice(services)]
        down = rng.uniform(1.0, 10.0)
        for s in victims:
            s.kill()
        events.append(
            f"{time.monotonic() - t0:6.1f} s: killed {' and '.join(s.name for s in victims)}, down {down:.1f} s"
        )
        time.sleep(down)
        for s in services:  # the broker first: the collector connects to it
            if not s.up:
                s.start()
    time.sleep(max(0.0, end - time.monotonic()))
    return events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=600, help="seconds of chaos (default 10 minutes)")
    ap.add_argument("--processes", type=int, default=4, help="worker processes the agents are spread over")
    ap.add_argument("--every-s", type=float, default=10.0, help="each agent emits an interval this often")
    ap.add_argument("--resend-s", type=float, default=30.0, help="agent resend_after_s (the default)")
    ap.add_argument("--mean-gap-s", type=float, default=30.0, help="mean time between kills")
    ap.add_argument("--drain-timeout-s", type=float, default=600.0)
    ap.add_argument("--seed", default="soak")
    ap.add_argument("--keep", type=Path, help="keep the run's files in this folder")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="labmeter-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "agents").mkdir(exist_ok=True)
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\nmax_queued_bytes 0\nmax_inflight_messages 0\n"
    )
    (work / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{work / "collector"}"\n'
        f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\nclient_id = "labmeter-collector-soak"\n'
    )
    collector_pub = signing.load_or_create_key(work / "collector" / "collector.key")[0].public_key()
    ledger = Ledger.open("sqlite", work / "collector")
    for i in range(args.agents):
        pub = agent_key(args.seed, i).public_key()
        ledger.add_agent(agent_id(i), signing.public_key_text(pub), signing.key_id(pub), [instrument_id(i)])
    ledger.close()

    broker = Service(
        "broker",
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
        work / "mosquitto.log",
        port,
    )
    collector = Service(
        "collector",
        [sys.executable, "-m", "labmeter", "collector", "run", "--config", str(work / "collector.toml")],
        work / "collector.log",
    )
    broker.start()
    collector.start()
    ctx = mp.get_context("spawn")
    shares = [list(range(args.agents))[w :: args.processes] for w in range(args.processes)]
    procs = []
    try:
        for w, indices in enumerate(shares):
            wargs = {
                "dir": str(work),
                "port": port,
                "worker": w,
                "indices": indices,
                "seed": args.seed,
                "collector_key": signing.public_key_text(collector_pub),
                "every_s": args.every_s,
                "resend_s": args.resend_s,
                "drain_timeout_s": args.drain_timeout_s,
            }
            p = ctx.Process(target=worker, args=(wargs,), name=f"soak-worker-{w}")
            p.start()
            procs.append(p)
        t_ready = time.monotonic()
        while not all((work / f"ready-{w}").exists() for w in range(args.processes)):
            if any(p.exitcode not in (None, 0) for p in procs):
                raise SystemExit("a worker died at start-up")
            time.sleep(0.2)
        print(
            f"{args.agents} agents connected in {time.monotonic() - t_ready:.1f} s; "
            f"{args.duration:.0f} s of chaos begins",
            flush=True,
        )
        events = chaos([broker, collector], args.duration, args.mean_gap_s, random.Random(args.seed))
        for e in events:
            print(e, flush=True)
        # a last outage of both, so that the drain starts from a backlog every run has
        for s in (broker, collector):
            s.kill()
        time.sleep(FINAL_OUTAGE_S)
        for s in (broker, collector):
            s.start()
        events.append(
            f"{args.duration:6.0f} s: killed broker and collector, down {FINAL_OUTAGE_S:.0f} s (final)"
        )
        for e in events[-1:]:
            print(e, flush=True)
        (work / "drain").touch()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        collector_rc = collector.stop()
        broker.stop()

    results = [json.loads((work / f"worker-{w}.json").read_text()) for w in range(args.processes)]
    report(args, work, results, broker, collector, collector_rc, len(events))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace,
    work: Path,
    results: list[dict[str, Any]],
    broker: Service,
    collector: Service,
    collector_rc: int | None,
    n_events: int,
) -> None:
    emitted = {
        (agent, seq): sha for r in results for agent, rows in r["emitted"].items() for seq, sha in rows
    }
    db = sqlite3.connect(f"file:{work / 'collector' / 'ledger.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT agent, instrument, seq, sha, start_ms, end_ms FROM intervals").fetchall()
    conflicts = db.execute("SELECT count(*) FROM rejections WHERE reason LIKE 'conflict%'").fetchone()[0]
    rejections = db.execute("SELECT count(*) FROM rejections").fetchone()[0]
    db.close()
    stored = {(a, s): sha for a, _i, s, sha, _st, _e in rows}
    lost = sum(1 for k, sha in emitted.items() if stored.get(k) != sha)
    phantoms = sum(1 for k in stored if k not in emitted)
    overlaps = 0
    by_inst: dict[str, list[tuple[int, int]]] = {}
    for _a, inst, _s, _sha, start, end in rows:
        by_inst.setdefault(inst, []).append((start, end))
    for spans in by_inst.values():
        spans.sort()
        overlaps += sum(1 for (_, e0), (s1, _) in itertools.pairwise(spans) if s1 < e0)
    duplicated = conflicts + phantoms + overlaps
    drain = max(r["drain_s"] for r in results)
    left = sum(r["left"] for r in results)
    checks = {
        "lost": lost == 0 and left == 0,
        "duplicated": duplicated == 0,
        "drain": drain <= DRAIN_TARGET_S,
        "collector exit": collector_rc == 0,
    }
    print(
        f"soak: {args.agents} agents in {args.processes} processes, one interval each every {args.every_s:g} s, "
        f"{args.duration:.0f} s; broker killed {broker.kills}x, collector killed {collector.kills}x "
        f"({n_events} kill events, down 1-10 s each)"
    )
    print(f"messages emitted    {len(emitted):>9,}")
    print(f"messages stored     {len(stored):>9,}")
    print(f"lost                {lost:>9,}  (target 0; still in outboxes at the end: {left})")
    print(
        f"duplicated          {duplicated:>9,}  (target 0: {conflicts} conflicting bodies, {phantoms} rows "
        f"no agent emitted, {overlaps} overlapping intervals)"
    )
    print(f"rejections          {rejections:>9,}  (agents saw {sum(r['rejected'] for r in results)})")
    print(
        f"max outbox depth    {max(r['max_depth'] for r in results):>9,}  (one agent; all agents together "
        f"at most {sum(r['peak_total'] for r in results):,}, sampled every 5 s)"
    )
    print(
        f"drain time          {drain:>9.1f} s (target <= {DRAIN_TARGET_S:.0f} s; from the restart after the final outage)"
    )
    print(f"collector exit      {collector_rc!s:>9}  (SIGTERM at the end; 0 = clean)")
    log = (work / "collector.log").read_text(errors="replace").splitlines()
    errors = [ln for ln in log if " ERROR " in ln or ln.startswith("Traceback")]
    print(f"collector errors    {len(errors):>9}  (ERROR lines and tracebacks in its log over all its runs)")
    for ln in errors[:5]:
        print(f"  {ln[:160]}")
    failed = [k for k, ok in checks.items() if not ok]
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
