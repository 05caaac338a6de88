"""Outbox drain: marking rows sent, and how long the agent's event loop is held while a backlog drains.

A backlog of signed intervals in a real agent state file is published to Mosquitto
twice in the same run: once as the publisher did before issue 11 (a batch of 1,000
published without yielding, then marked sent one autocommitted row at a time), once
through ``Agent._publish_batch`` (chunks with a yield between them, one transaction
per batch). A ticker task measures the longest time the loop could not run it: what
polling, acks and SIGTERM waited for.

    .venv/bin/python -m benchmarks.drain [--rows 20000] [--dir /var/tmp]

Target (docs/performance.md): through ``Agent._publish_batch`` the longest stall stays under 250 ms, a
quarter of the agent's 1 s polling period, so no sample is late by more than that while a backlog
drains; and every row is marked sent. The "before" path is the comparison and has no target.

With ``--builtin`` the backlog goes instead through a real collector process holding the built-in
broker, without and with the agent's limit on rows unacknowledged by the collector (MAX_UNACKED):
how long until the outbox is empty, and how many deliveries amqtt dropped. Target, with the shipped
MAX_UNACKED: the outbox empty within 120 s of the first publish (the soak's drain target); the run
without the limit is the comparison and has none.

    .venv/bin/python -m benchmarks.drain --builtin --rows 20000 --dir /var/tmp --timeout 120
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import MethodType, SimpleNamespace

from benchmarks.common import Verdicts, free_port, start_mosquitto, wait_port
from labmeter import signing
from labmeter.agent import runtime
from labmeter.agent.outbox import AgentStore, Signer
from labmeter.agent.runtime import Agent
from labmeter.agent.timeline import Span
from labmeter.config import BrokerConfig
from labmeter.mqtt import MqttLink
from labmeter.wire import State

BATCH = 1000
STALL_TARGET_S = 0.25
DRAIN_TARGET_S = 120.0


def old_mark_sent(db: sqlite3.Connection, ids: list[int], at: float) -> None:
    """The code before: one autocommitted UPDATE (one fsync) per row."""
    if ids:
        db.executemany("UPDATE outbox SET sent_at=? WHERE id=?", [(at, i) for i in ids])


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - t - 0.005)


async def old_drain(store: AgentStore, link: MqttLink, marks: list[float]) -> int:
    marked = 0
    while rows := store.unsent(time.time() - 3600, BATCH):
        sent = [r.id for r in rows if link.publish(r.topic, r.payload, qos=1)]
        t = time.perf_counter()
        old_mark_sent(store.db, sent, time.time())
        marks.append(time.perf_counter() - t)
        marked += len(sent)
        await asyncio.sleep(0)  # the old loop's kick.wait() returned at once: this is one loop turn at most
    return marked


async def new_drain(store: AgentStore, link: MqttLink, marks: list[float]) -> int:
    """Drains through ``Agent._publish_batch``; returns how many rows it marked sent."""
    agent = SimpleNamespace(store=store, link=link, stopping=False)
    agent._wait_for_network = MethodType(Agent._wait_for_network, agent)
    real = store.mark_sent
    marked = 0

    def timed(ids: list[int], at: float) -> None:
        nonlocal marked
        t = time.perf_counter()
        real(ids, at)
        marks.append(time.perf_counter() - t)
        marked += len(ids)

    store.mark_sent = timed  # type: ignore[method-assign]
    window, runtime.MAX_UNACKED = runtime.MAX_UNACKED, 10**9  # no collector acknowledges here
    try:
        while await Agent._publish_batch(agent, time.time() - 3600, BATCH):  # type: ignore[arg-type]
            await asyncio.sleep(0)
    finally:
        store.mark_sent = real  # type: ignore[method-assign]
        runtime.MAX_UNACKED = window
    return marked


async def run(rows: int, workdir: Path, verdicts: Verdicts) -> None:
    port = free_port()
    broker = start_mosquitto(workdir, port)
    try:
        key = signing.generate_key_file(workdir / "agent.key")
        signer = Signer("bench", key, signing.key_id(key.public_key()))
        store = AgentStore(workdir / "state" / "agent.db")
        spans = [Span(i * 1000, (i + 1) * 1000, State.OFF) for i in range(rows)]
        store.emit(signer, "I1", spans, None)
        link = MqttLink(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), "bench-drain")
        await link.start()
        assert await link.wait_connected(10), "no broker"
        results = {}
        for name, drain in (("before", old_drain), ("after", new_drain)):
            store.mark_all_unsent()
            lags: list[float] = []
            marks: list[float] = []
            stop = asyncio.Event()
            tick = asyncio.create_task(ticker(lags, stop))
            await asyncio.sleep(0.05)
            t = time.perf_counter()
            marked = await drain(store, link, marks)
            took = time.perf_counter() - t
            stop.set()
            await tick
            results[name] = (took, statistics.median(marks) * 1000, max(lags) * 1000)
            print(
                f"{name:>6}: {rows} rows published in {took:.2f} s; mark_sent per {BATCH} rows "
                f"{results[name][1]:.1f} ms (median); longest event-loop stall {results[name][2]:.0f} ms"
            )
            if name == "after":
                verdicts.check("rows marked sent", marked, f"= {rows}", marked == rows)
                verdicts.check(
                    "longest event-loop stall, after",
                    round(results[name][2]),
                    f"< {STALL_TARGET_S * 1000:g} ms",
                    results[name][2] < STALL_TARGET_S * 1000,
                    " ms",
                )
        b, a = results["before"], results["after"]
        print(
            f"ratio after/before: drain {a[0] / b[0]:.2f}, mark_sent {a[1] / b[1]:.3f}, "
            f"longest stall {a[2] / b[2]:.2f}"
        )
        await link.stop()
        store.close()
    finally:
        broker.terminate()
        broker.wait(10)


async def builtin(
    rows: int, workdir: Path, window: int | None, timeout_s: float, verbose: bool = False
) -> tuple[int, float]:
    """The backlog drained through a real collector process holding the built-in broker (the single-node
    default): an agent's publisher and ack handling in this process, the collector verifying, storing
    and acknowledging. Prints and returns how many rows were left and the seconds it took."""
    from labmeter import wire
    from labmeter.agent.control import AckGate
    from labmeter.collector.ledger import Ledger
    from labmeter.config import AgentSection

    port = free_port()
    key = signing.generate_key_file(workdir / "agent.key")
    pub = key.public_key()
    signer = Signer("bench", key, signing.key_id(pub))
    data = workdir / "collector-data"
    ledger = Ledger(data / "ledger.sqlite")
    ledger.add_agent("bench", signing.public_key_text(pub), signing.key_id(pub), ["I1"])
    ledger.close()
    (workdir / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{data}"\n[broker]\nembedded = true\nlisten = "127.0.0.1:{port}"\n'
    )
    store = AgentStore(workdir / "state" / "agent.db")
    t0 = int(time.time() * 1000) - (rows + 600) * 1000
    store.emit(signer, "I1", [Span(t0 + i * 1000, t0 + (i + 1) * 1000, State.OFF) for i in range(rows)], None)
    log = open(workdir / "collector.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labmeter",
            "collector",
            "run",
            "--config",
            str(workdir / "collector.toml"),
            *(["--verbose"] if verbose else []),  # amqtt's own warnings (which client timed out)
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, 30)
        # The broker listens before the collector has subscribed, and what is published in between finds
        # no subscriber and waits out the resend timer: start the clock once the collector says it runs.
        deadline = time.monotonic() + 30
        while b"collector running" not in (workdir / "collector.log").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, "the collector did not start"
            await asyncio.sleep(0.05)
        section = AgentSection(id="bench", key_file=workdir / "agent.key", state_dir=workdir / "state")
        gate = AckGate(section, None)

        def on_ack(_topic: str, payload: bytes) -> None:
            ack = gate.open(payload)
            for chain, e in (ack.acks if ack else {}).items():
                store.ack_matching(chain, e.seq, e.sha256)

        link = MqttLink(
            BrokerConfig(url=f"mqtt://127.0.0.1:{port}"),
            "bench-agent",
            on_message=on_ack,
            subscriptions=((wire.ack_topic("bench"), 1),),
        )
        await link.start()
        assert await link.wait_connected(10), "no broker"
        agent = SimpleNamespace(store=store, link=link, stopping=False)
        agent._wait_for_network = MethodType(Agent._wait_for_network, agent)
        if window is not None:
            runtime.MAX_UNACKED = window
        resend = 30.0  # the agent's default resend_after_s
        t = time.perf_counter()
        left = rows
        while left and time.perf_counter() - t < timeout_s:
            await Agent._publish_batch(agent, time.time() - resend)  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            left = store.pending_count()
        took = time.perf_counter() - t
        text = (workdir / "collector.log").read_bytes().decode(errors="replace")
        timeouts = text.count("Timeout waiting for PUBACK")
        if left:
            print(f"built-in broker: {left} of {rows} rows still unacknowledged after {took:.0f} s", end="")
        else:
            print(f"built-in broker: {rows} rows stored and acknowledged in {took:.1f} s", end="")
        print(f"; amqtt PUBACK timeouts logged: {timeouts}")
        await link.stop()
        return left, took
    finally:
        proc.terminate()
        proc.wait(30)
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dir", type=Path, default=None, help="where the state file goes (default: a temp dir)")
    ap.add_argument(
        "--builtin", action="store_true", help="drain through a collector holding the built-in broker"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="with --builtin: give up after this")
    ap.add_argument(
        "--verbose", action="store_true", help="with --builtin: the collector logs at debug level"
    )
    args = ap.parse_args()
    verdicts = Verdicts()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        if args.builtin:
            for name, window in (("before", 10**9), ("after", runtime.MAX_UNACKED)):
                print(f"{name}: at most {window:,} rows unacknowledged by the collector", flush=True)
                (Path(d) / name).mkdir()
                left, took = asyncio.run(
                    builtin(args.rows, Path(d) / name, window, args.timeout, args.verbose)
                )
            verdicts.check(f"rows left, at most {window:,} unacknowledged", left, "= 0", left == 0)
            verdicts.check(
                "time until the outbox is empty",
                round(took, 1),
                f"<= {DRAIN_TARGET_S:g} s",
                not left and took <= DRAIN_TARGET_S,
                " s",
            )
        else:
            asyncio.run(run(args.rows, Path(d), verdicts))
    verdicts.exit()


if __name__ == "__main__":
    main()
