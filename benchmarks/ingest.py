"""Collector ingest rate against a raw paho QoS 1 subscriber, both draining the same queued backlog.

A separate process publishes N signed interval messages to Mosquitto while the
subscriber is offline (persistent session), so the broker holds them; then the
subscriber connects and drains them. The raw subscriber only counts messages; the
collector verifies signatures, stores in the ledger (SQLite, and PostgreSQL on a
throwaway local server) and acknowledges.

    .venv/bin/python -m benchmarks.ingest [--messages 20000] [--runs 3] [--ledgers sqlite,postgresql]
    .venv/bin/python -m benchmarks.ingest --store-only [--runs 3] [--ledgers ...]   # the ledger's commits alone

Each run measures both rates afresh; the median ratio is the result. Ledgers:
``sqlite`` as shipped (synchronous=FULL: a commit is on disk before it is acknowledged),
``sqlite-normal`` the earlier synchronous=NORMAL (for comparison), ``postgresql`` on a
server with fsync off (as the tests run it), ``postgresql-durable`` on one with fsync on
and synchronous_commit as shipped (on).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho

from benchmarks.common import Verdicts, free_port, start_mosquitto
from labmeter import config, signing, wire
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Collector

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

AGENTS, INSTRUMENTS_PER_AGENT = 10, 10
LEDGERS = ("sqlite", "sqlite-normal", "postgresql", "postgresql-durable")
SHIPPED_SYNCHRONOUS = Ledger.synchronous
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def make_messages(tmp: Path, n: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, str, str, list[str]]]]:
    per_instrument = max(1, n // (AGENTS * INSTRUMENTS_PER_AGENT))
    msgs: list[tuple[str, bytes]] = []
    registry = []
    for a in range(AGENTS):
        agent = f"agent-{a:02d}"
        key = signing.generate_key_file(tmp / f"{agent}.key")
        pub = key.public_key()
        kid = signing.key_id(pub)
        codes = [f"I{a:02d}{i:02d}" for i in range(INSTRUMENTS_PER_AGENT)]
        registry.append((agent, signing.public_key_text(pub), kid, codes))
        for code in codes:
            prev = wire.GENESIS
            for seq in range(1, per_instrument + 1):
                start = T0 + (seq - 1) * 60_000
                state = ("RUNNING", "STANDBY", "OFF")[seq % 3]
                body = wire.dump_body(
                    wire.Interval(agent, code, seq, prev, start, start + 60_000, state).body()
                )
                prev = wire.body_hash(body)
                msgs.append((wire.interval_topic(agent, code), wire.seal(key, kid, body)))
    return msgs, registry


def publish_all(port: int, msgs: list[tuple[str, bytes]]) -> None:
    """Runs in a separate process."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for info in infos:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


def publish_in_child(port: int, msgs: list[tuple[str, bytes]]) -> None:
    proc = mp.get_context("fork").Process(target=publish_all, args=(port, msgs))
    proc.start()
    proc.join()


def raw_rate(port: int, msgs: list[tuple[str, bytes]]) -> float:
    n = len(msgs)
    got = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        nonlocal got, first, last
        got += 1
        if got == 1:
            first = time.perf_counter()
        if got == n:
            last = time.perf_counter()
            done.set()

    def client() -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-raw", clean_session=False)
        c.on_message = on_message
        c.on_connect = lambda cl, *_: cl.subscribe([(s, 1) for s in wire.SUBSCRIPTIONS])
        return c

    c = client()
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()
    publish_in_child(port, msgs)
    c = client()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(300)
    c.disconnect()
    c.loop_stop()
    assert got == n, f"raw subscriber got {got} of {n}"
    return n / (last - first)


def collector_rate(
    port: int, tmp: Path, msgs: list[tuple[str, bytes]], registry: list, ledger_url: str = "sqlite"
) -> float:
    n = len(msgs)
    cfg = config.parse(
        f'[collector]\ndata_dir = "{tmp / "collector"}"\nledger = "{ledger_url}"\n'
        f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n',
        config.CollectorConfig,
    )
    ledger = Ledger.open(ledger_url, cfg.collector.data_dir)
    for agent, pub, kid, codes in registry:
        ledger.add_agent(agent, pub, kid, codes)
    ledger.close()

    async def session(wait_all: bool) -> float:
        stop = asyncio.Event()
        c = Collector(cfg)
        task = asyncio.create_task(c.run(stop))
        await c.ready.wait()
        first = 0.0
        if wait_all:
            while not c.stats["stored"] and not c.inbox:
                await asyncio.sleep(0.0005)
            first = time.perf_counter()
            while c.stats["stored"] + c.stats["rejected"] < n:
                await asyncio.sleep(0.002)
        else:
            await asyncio.sleep(0.5)
        elapsed = time.perf_counter() - first
        assert c.stats["rejected"] == 0, c.rejections
        stop.set()
        await task
        return elapsed

    asyncio.run(session(wait_all=False))  # creates the persistent session
    publish_in_child(port, msgs)
    return n / asyncio.run(session(wait_all=True))


def store_rates(kinds: list[str], servers: dict[str, PostgresServer], runs: int) -> None:
    """The ledger alone: seconds per commit and per interval for batches of 1, 50 and 2,000, each kind
    in turn on a fresh ledger, ``runs`` times (no broker, no signatures: the durability cost is here)."""
    from labmeter.collector.ledger import StoredInterval
    from labmeter.wire import load_body, open_envelope, parse_interval

    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        msgs, _registry = make_messages(Path(d), 20_000)
        rows = []
        for _topic, payload in msgs:
            env = open_envelope(payload)
            rows.append(
                (
                    StoredInterval.of(parse_interval(load_body(env.body)), wire.body_hash(env.body), payload),
                    None,
                )
            )
        for run in range(runs):
            for kind in kinds:
                for batch in (1, 50, 2000):
                    n = min(len(rows), 400 * batch)
                    with tempfile.TemporaryDirectory() as ld:
                        url = servers[kind].new_database() if kind in servers else "sqlite"
                        Ledger.synchronous = "NORMAL" if kind == "sqlite-normal" else SHIPPED_SYNCHRONOUS
                        ledger = Ledger.open(url, Path(ld))
                        t0 = time.perf_counter()
                        for i in range(0, n, batch):
                            ledger.store(rows[i : i + batch], [])
                        elapsed = time.perf_counter() - t0
                        ledger.close()
                        Ledger.synchronous = SHIPPED_SYNCHRONOUS
                    results.setdefault((kind, batch), []).append(elapsed / (n / batch))
                    print(
                        f"run {run + 1}: {kind:<18} batches of {batch:>4}: {1000 * elapsed / (n / batch):7.2f} ms "
                        f"per commit, {1e6 * elapsed / n:6.1f} us per interval",
                        flush=True,
                    )
    for (kind, batch), per_commit in results.items():
        med = statistics.median(per_commit)
        print(
            f"{kind:<18} batches of {batch:>4}: median {1000 * med:7.2f} ms per commit, "
            f"{1e6 * med / batch:6.1f} us per interval, {batch / med:8.0f} intervals/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--ledgers",
        default="sqlite,postgresql",
        help="comma-separated: " + ", ".join(LEDGERS) + " (PostgreSQL: a throwaway local server)",
    )
    ap.add_argument(
        "--store-only", action="store_true", help="time the ledger's commits alone (batches of 1, 50, 2000)"
    )
    args = ap.parse_args()
    kinds = args.ledgers.split(",")
    unknown = set(kinds) - set(LEDGERS)
    if unknown:
        ap.error(f"--ledgers: unknown {', '.join(sorted(unknown))} (choose from {', '.join(LEDGERS)})")
    servers: dict[str, PostgresServer] = {}
    for kind in kinds:
        if kind.startswith("postgresql"):
            from tests.postgres import PostgresServer

            servers[kind] = PostgresServer(fsync=kind == "postgresql-durable").start()
    if args.store_only:
        try:
            store_rates(kinds, servers, args.runs)
        finally:
            for server in servers.values():
                server.stop()
        return
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    try:
        for run in range(args.runs):
            for kind in kinds:
                with tempfile.TemporaryDirectory() as d:
                    tmp = Path(d)
                    msgs, registry = make_messages(tmp, args.messages)
                    url = servers[kind].new_database() if kind in servers else "sqlite"
                    port = free_port()
                    broker = start_mosquitto(tmp, port)
                    Ledger.synchronous = "NORMAL" if kind == "sqlite-normal" else SHIPPED_SYNCHRONOUS
                    try:
                        raw = raw_rate(port, msgs)
                        coll = collector_rate(port, tmp, msgs, registry, url)
                    finally:
                        Ledger.synchronous = SHIPPED_SYNCHRONOUS
                        broker.terminate()
                        broker.wait()
                results[kind].append((raw, coll))
                print(
                    f"run {run + 1}: raw paho subscriber {raw:8.0f} msg/s, collector ({kind}) {coll:8.0f} msg/s, "
                    f"ratio {coll / raw:.2f}",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    verdicts = Verdicts()
    for kind, pairs in results.items():
        ratios = sorted(c / r for r, c in pairs)
        median = statistics.median(ratios)
        print(
            f"{kind}: {args.messages} messages per run; collector median {statistics.median(c for _, c in pairs):.0f} "
            f"msg/s; median ratio {median:.2f} (min {ratios[0]:.2f}, max {ratios[-1]:.2f})"
        )
        verdicts.check(
            f"ingest {kind}, median collector/raw ratio", round(median, 2), ">= 0.5", median >= 0.5
        )
    verdicts.exit()


if __name__ == "__main__":
    main()
