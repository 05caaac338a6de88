"""Tasmota plugs through a real Mosquitto, with payloads as Tasmota's documentation shows them."""

from __future__ import annotations

import asyncio
import json

from labmeter.drivers.base import Sample
from labmeter.drivers.mqtt_plug import TasmotaDriver, tasmota_power

from labmeter.clock import Clock
from labmeter.config import BrokerConfig, MqttSource
from tests.conftest import BrokerProcess
from tests.lab import Publisher

SENSOR = {
    "Time": "2026-03-02T10:00:00",
    "ENERGY": {
        "TotalStartTime": "2026-01-01T00:00:00",
        "Total": 12.3,
        "Yesterday": 1.2,
        "Today": 0.4,
        "Period": 2,
        "Power": 1234,
        "ApparentPower": 1300,
        "ReactivePower": 400,
        "Factor": 0.95,
        "Voltage": 229,
        "Current": 5.6,
    },
}


def test_power_parsing() -> None:
    assert tasmota_power(json.dumps(SENSOR).encode()) == 1234.0
    multi = {"ENERGY": {"Power": [10, 20.5], "Voltage": [230, 230]}}
    assert tasmota_power(json.dumps(multi).encode()) == 30.5
    assert tasmota_power(b'{"DS18B20": {"Temperature": 21}}') is None


def test_plug_feed_lwt_and_stale(mosquitto: BrokerProcess) -> None:
    topic = "tele/hplc_plug/SENSOR"
    pub = Publisher(mosquitto.url, "plug")
    clock = Clock()

    async def main() -> list[Sample]:
        src = MqttSource(topic=topic, format="tasmota")
        d = TasmotaDriver(src, BrokerConfig(url=mosquitto.url), "agent-plug", stale_after_s=1.0, clock=clock)
        await d.start()
        assert await d.link.wait_connected(10)
        await asyncio.sleep(0.3)
        out = [await d.read()]  # nothing yet
        pub.publish("tele/hplc_plug/LWT", b"Online")
        pub.publish(topic, json.dumps(SENSOR).encode())
        await asyncio.sleep(0.3)
        out.append(await d.read())
        pub.publish("tele/hplc_plug/LWT", b"Offline")
        await asyncio.sleep(0.3)
        out.append(await d.read())  # offline: not the last value
        pub.publish("tele/hplc_plug/LWT", b"Online")
        pub.publish(topic, json.dumps(SENSOR).encode())
        await asyncio.sleep(0.3)
        out.append(await d.read())
        await asyncio.sleep(1.3)
        out.append(await d.read())  # silent past stale_after_s
        pub.publish(topic, b"{garbage")
        await asyncio.sleep(0.3)
        out.append(await d.read())
        await d.close()
        return out

    try:
        samples = asyncio.run(main())
    finally:
        pub.close()
    assert samples[0].error is not None and "no message yet" in samples[0].error
    assert samples[1].power_w == 1234.0
    assert samples[2].power_w is None and samples[2].error is not None and "Offline" in samples[2].error
    assert samples[3].power_w == 1234.0
    assert (
        samples[4].power_w is None
        and samples[4].error is not None
        and "silent for more than" in samples[4].error
    )
    assert samples[5].power_w is None and samples[5].error is not None and "unreadable" in samples[5].error
