"""Receive rate of the one MQTT client labmeter uses (gmqtt via ``labmeter.mqtt.MqttLink``) against a raw
paho-mqtt subscriber, both draining the same queued QoS 1 backlog from Mosquitto in the same run.

This is the measurement behind docs/decisions.md "One MQTT client: gmqtt": the client itself, with no
verification or storage (benchmarks.ingest measures the collector).

    .venv/bin/python -m benchmarks.mqtt_receive [--messages 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import Verdicts, free_port, start_mosquitto
from benchmarks.ingest import make_messages, publish_in_child, raw_rate
from labmeter import config, wire
from labmeter.mqtt import MqttLink


def gmqtt_rate(port: int, msgs: list[tuple[str, bytes]]) -> float:
    n = len(msgs)
    broker = config.BrokerConfig(url=f"mqtt://127.0.0.1:{port}")

    async def session(drain: bool) -> float:
        got = 0
        first = last = 0.0
        done = asyncio.Event()

        def on_message(_topic: str, _payload: bytes) -> None:
            nonlocal got, first, last
            got += 1
            if got == 1:
                first = time.perf_counter()
            if got == n:
                last = time.perf_counter()
                done.set()

        link = MqttLink(
            broker,
            "bench-gmqtt",
            clean_session=False,
            on_message=on_message,
            subscriptions=tuple((s, 1) for s in wire.SUBSCRIPTIONS),
        )
        await link.start()
        if not drain:
            await asyncio.sleep(0.5)  # the persistent session and its subscriptions exist now
            await link.stop()
            return 0.0
        await asyncio.wait_for(done.wait(), 300)
        await link.stop()
        return n / (last - first)

    asyncio.run(session(drain=False))
    publish_in_child(port, msgs)
    return asyncio.run(session(drain=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    pairs = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            msgs, _ = make_messages(tmp, args.messages)
            port = free_port()
            broker = start_mosquitto(tmp, port)
            try:
                paho_rate = raw_rate(port, msgs)
                gm_rate = gmqtt_rate(port, msgs)
            finally:
                broker.terminate()
                broker.wait()
        pairs.append((paho_rate, gm_rate))
        print(
            f"run {run + 1}: paho {paho_rate:8.0f} msg/s, gmqtt (MqttLink) {gm_rate:8.0f} msg/s, "
            f"ratio {gm_rate / paho_rate:.2f}",
            flush=True,
        )
    ratio = statistics.median(g / p for p, g in pairs)
    print(
        f"median: paho {statistics.median(p for p, _ in pairs):.0f} msg/s, "
        f"gmqtt {statistics.median(g for _, g in pairs):.0f} msg/s"
    )
    verdicts = Verdicts()
    verdicts.check(
        "gmqtt/paho receive ratio (median)",
        round(ratio, 2),
        ">= 1.0: the chosen client is not slower",
        ratio >= 1.0,
    )
    verdicts.exit()


if __name__ == "__main__":
    main()
