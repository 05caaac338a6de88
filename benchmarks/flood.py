"""A flood of unauthenticated messages against a real collector, while one genuine agent keeps sending.

A real `labmeter collector run` process (SQLite ledger) behind Mosquitto. One genuine agent publishes
signed intervals at a steady rate and measures each one's delay: publish to the collector's
acknowledgement covering it (stored and committed). Phase 1 (baseline) is the agent alone; phase 2
the same agent while a separate process publishes --flood unauthenticated messages as fast as
Mosquitto takes them: unknown agents, bad signatures and out-of-range seqs on the genuine agent's own
topic, garbage, payloads up to 4 KB (stored whole, 50,000 of them would be ~100 MB).

    .venv/bin/python -m benchmarks.flood [--flood 50000] [--rate 20]

Prints ledger growth in MB, the collector's peak RSS and the genuine intervals' delay (p50/max) in
both phases, and PASS/FAIL against the targets below.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil

from benchmarks.common import free_port, start_mosquitto
from labmeter import signing, wire
from labmeter.collector.ledger import Ledger

T0 = int(time.time() * 1000) // 3_600_000 * 3_600_000 - 24 * 3_600_000
TARGET_GROWTH_MB = 2.0
TARGET_RSS_MB = 200.0
TARGET_MAX_DELAY_S = 10.0
TARGET_P50_S = 1.0  # under the flood, or 3x the baseline if that is more


def flood_messages(n: int, genuine_key: Any, genuine_kid: str) -> list[tuple[str, bytes]]:
    rnd = random.Random(7)
    out = []
    for i in range(n):
        pad = "x" * rnd.randrange(0, 3800)
        kind = i % 4
        if kind == 0:  # an unknown agent per message
            topic = wire.interval_topic(f"ghost-{i}", f"I{i % 97}")
            out.append((topic, json.dumps({"kid": "k", "body": pad, "sig": "s"}).encode()))
        elif kind == 1:  # the genuine agent's topic, a signature that does not verify
            body = wire.dump_body(
                wire.Interval(
                    "bench-agent", "XRD", 10**9 + i, "f" * 64, T0, T0 + 1000, "RUNNING", note=pad[:150]
                ).body()
            )
            forged = json.loads(wire.seal(genuine_key, genuine_kid, body + " "))
            payload = json.dumps({"kid": genuine_kid, "body": body, "sig": forged["sig"]}).encode()
            out.append((wire.interval_topic("bench-agent", "XRD"), payload))
        elif kind == 2:  # poison: seq 2**64, unsigned
            body = json.dumps(
                {
                    "v": 1,
                    "kind": "interval",
                    "agent": "bench-agent",
                    "instrument": "XRD",
                    "seq": 2**64,
                    "prev": "0" * 64,
                    "start": T0,
                    "end": T0 + 1,
                    "state": "OFF",
                    "pad": pad,
                }
            )
            out.append(
                (
                    wire.interval_topic("bench-agent", "XRD"),
                    json.dumps({"kid": "x", "body": body, "sig": "y"}).encode(),
                )
            )
        else:  # garbage on an open topic of an invented instrument
            out.append((wire.open_topic("bench-agent", f"X{i}"), os.urandom(rnd.randrange(1, 4000))))
    return out


def publish_flood(port: int, n: int, key_file: str, kid: str, done: Any) -> None:
    """Runs in a separate process."""
    msgs = flood_messages(n, signing.load_private_key(Path(key_file)), kid)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-flood")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    start = time.monotonic()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for info in infos:
        info.wait_for_publish(120)
    done.value = time.monotonic() - start
    c.disconnect()
    c.loop_stop()


class Agent:
    """The genuine agent: signed intervals at a steady rate; delay = publish to the covering ack."""

    def __init__(self, port: int, key: Any, kid: str) -> None:
        self.key, self.kid = key, kid
        self.seq = 0
        self.prev = wire.GENESIS
        self.sent: dict[int, float] = {}
        self.delay: dict[int, float] = {}
        self.lock = threading.Lock()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-agent")
        self.c.on_message = self._on_ack
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(wire.ack_topic("bench-agent"), 1)
        self.c.loop_start()
        time.sleep(0.5)

    def _on_ack(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        now = time.monotonic()
        msg = json.loads(m.payload)
        if isinstance(msg.get("body"), str):  # a signed ack
            msg = json.loads(msg["body"])
        upto = int(msg.get("acks", {}).get("XRD", 0))
        with self.lock:
            for seq, at in self.sent.items():
                if seq <= upto and seq not in self.delay:
                    self.delay[seq] = now - at

    def send_for(self, seconds: float, rate: float) -> list[int]:
        seqs = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.seq += 1
            start = T0 + self.seq * 1000
            body = wire.dump_body(
                wire.Interval(
                    "bench-agent", "XRD", self.seq, self.prev, start, start + 1000, "RUNNING"
                ).body()
            )
            self.prev = wire.body_hash(body)
            with self.lock:
                self.sent[self.seq] = time.monotonic()
            self.c.publish(
                wire.interval_topic("bench-agent", "XRD"), wire.seal(self.key, self.kid, body), qos=1
            )
            seqs.append(self.seq)
            time.sleep(1 / rate)
        return seqs

    def wait_acked(self, seqs: list[int], timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not all(s in self.delay for s in seqs):
            time.sleep(0.05)


def ledger_mb(data: Path) -> float:
    return sum(f.stat().st_size for f in data.glob("ledger.sqlite*")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flood", type=int, default=50_000)
    ap.add_argument("--rate", type=float, default=20.0, help="genuine intervals per second")
    ap.add_argument("--baseline-s", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        broker = start_mosquitto(tmp, port)
        key = signing.generate_key_file(tmp / "agent.key")
        kid = signing.key_id(key.public_key())
        data = tmp / "collector"
        ledger = Ledger.open("sqlite", data)
        ledger.add_agent("bench-agent", signing.public_key_text(key.public_key()), kid, ["XRD"])
        ledger.close()
        cfg = tmp / "collector.toml"
        cfg.write_text(f'[collector]\ndata_dir = "{data}"\n[broker]\nurl = "mqtt://127.0.0.1:{port}"\n')
        log = open(tmp / "collector.log", "wb")  # noqa: SIM115
        coll = subprocess.Popen(
            [sys.executable, "-m", "labmeter", "collector", "run", "-c", str(cfg)], stdout=log, stderr=log
        )
        proc = psutil.Process(coll.pid)
        peak = {"rss": 0.0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak["rss"] = max(peak["rss"], proc.memory_info().rss / 1e6)
                except psutil.Error:
                    return
                time.sleep(0.1)

        try:
            time.sleep(2.0)
            agent = Agent(port, key, kid)
            threading.Thread(target=sample, daemon=True).start()
            base = agent.send_for(args.baseline_s, args.rate)
            agent.wait_acked(base, 30)
            rss_base = peak["rss"]
            size0 = ledger_mb(data)
            done = mp.get_context("fork").Value("d", 0.0)
            flooder = mp.get_context("fork").Process(
                target=publish_flood, args=(port, args.flood, str(tmp / "agent.key"), kid, done)
            )
            flooder.start()
            under: list[int] = []
            while flooder.is_alive():
                under += agent.send_for(1.0, args.rate)
            flooder.join()
            under += agent.send_for(2.0, args.rate)
            agent.wait_acked(under, 60)
            time.sleep(2.0)  # let the collector finish the flood's tail before measuring the ledger
            growth = ledger_mb(data) - size0
            stop.set()
        finally:
            coll.terminate()
            coll.wait(30)
            broker.terminate()
            broker.wait()
        lost = [s for s in base + under if s not in agent.delay]
        b = sorted(agent.delay[s] for s in base if s in agent.delay)
        u = sorted(agent.delay[s] for s in under if s in agent.delay)
        ledger = Ledger.open("sqlite", data)
        stored = ledger.db.execute("SELECT COUNT(*) FROM intervals").fetchone()[0]
        counted = ledger.db.execute("SELECT COALESCE(SUM(n),0), COUNT(*) FROM rejection_counts").fetchone()
        kept = ledger.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
        ledger.close()
    p50_b, p50_u = statistics.median(b), statistics.median(u)
    print(
        f"flood: {args.flood} unauthenticated messages published in {done.value:.1f} s ({args.flood / done.value:.0f} msg/s)"
    )
    print(
        f"ledger: grew {growth:.2f} MB under the flood; {counted[0]} rejections counted in {counted[1]} rows, {kept} kept whole"
    )
    print(f"collector RSS: {rss_base:.0f} MB before the flood, peak {peak['rss']:.0f} MB")
    print(
        f"genuine intervals: {len(base)} baseline, delay p50 {p50_b * 1000:.0f} ms max {b[-1] * 1000:.0f} ms"
    )
    print(
        f"genuine intervals: {len(under)} under the flood, delay p50 {p50_u * 1000:.0f} ms max {u[-1] * 1000:.0f} ms"
    )
    print(f"genuine intervals stored {stored} of {len(base) + len(under)}, unacknowledged {len(lost)}")
    checks = {
        f"ledger growth <= {TARGET_GROWTH_MB} MB": growth <= TARGET_GROWTH_MB,
        f"peak RSS <= {TARGET_RSS_MB:.0f} MB": peak["rss"] <= TARGET_RSS_MB,
        f"every genuine interval stored and acknowledged, max delay <= {TARGET_MAX_DELAY_S:.0f} s": not lost
        and stored == len(base) + len(under)
        and u[-1] <= TARGET_MAX_DELAY_S,
        f"p50 delay under the flood <= max({TARGET_P50_S:.0f} s, 3x baseline)": p50_u
        <= max(TARGET_P50_S, 3 * p50_b),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
