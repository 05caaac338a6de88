"""Every MQTT plug format through a real Mosquitto, with payloads as the devices' own documentation shows them.

Each case: the device's telemetry gives the right watts; its availability message saying offline
makes the reading an error (UNKNOWN), never OFF; back online it reads again; a silent feed goes stale.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from labmeter.clock import Clock
from labmeter.config import BrokerConfig
from labmeter.drivers.base import Sample
from labmeter.drivers.mqtt import MqttSource
from labmeter.drivers.mqtt.driver import PlugDriver
from tests.conftest import BrokerProcess
from tests.lab import Publisher


@dataclass(frozen=True)
class Case:
    format: str
    topic: str
    payload: bytes
    watts: float
    availability: str
    online: bytes
    offline: bytes
    extra: dict[str, str] | None = None


CASES = [
    Case(
        "tasmota",
        "tele/hplc_plug/SENSOR",
        json.dumps(
            {
                "Time": "2026-03-02T10:00:00",
                "ENERGY": {"Total": 12.3, "Power": 1234, "Voltage": 229, "Current": 5.6},
            }
        ).encode(),
        1234.0,
        "tele/hplc_plug/LWT",
        b"Online",
        b"Offline",
    ),
    Case(
        "tasmota",
        "tele/dual/SENSOR",
        json.dumps({"ENERGY": {"Power": [10, 20.5]}}).encode(),
        30.5,
        "tele/dual/LWT",
        b"Online",
        b"Offline",
    ),
    Case(
        "shelly-gen1",
        "shellies/shellyplug-s-ABC123/relay/0/power",
        b"45.32",
        45.32,
        "shellies/shellyplug-s-ABC123/online",
        b"true",
        b"false",
    ),
    Case(
        "shelly-gen2",
        "shellyplusplugs-a8032ab12345/status/switch:0",
        json.dumps(
            {
                "id": 0,
                "source": "init",
                "output": True,
                "apower": 12.3,
                "voltage": 230.1,
                "current": 0.061,
                "aenergy": {"total": 5.6, "by_minute": [0, 0, 0], "minute_ts": 1700000000},
                "temperature": {"tC": 35.1, "tF": 95.2},
            }
        ).encode(),
        12.3,
        "shellyplusplugs-a8032ab12345/online",
        b"true",
        b"false",
    ),
    Case(
        "zigbee2mqtt",
        "zigbee2mqtt/lab_plug",
        json.dumps(
            {"state": "ON", "power": 61.5, "energy": 1.2, "voltage": 229, "linkquality": 120}
        ).encode(),
        61.5,
        "zigbee2mqtt/lab_plug/availability",
        b'{"state":"online"}',
        b'{"state":"offline"}',
    ),
    Case(
        "zigbee2mqtt",
        "zigbee2mqtt/legacy_plug",
        json.dumps({"power": 7}).encode(),
        7.0,
        "zigbee2mqtt/legacy_plug/availability",
        b"online",
        b"offline",
    ),
    Case(
        "esphome",
        "hplc-node/sensor/hplc_power/state",
        b"123.4",
        123.4,
        "hplc-node/status",
        b"online",
        b"offline",
    ),
    Case(
        "json",
        "lab/meter/7",
        json.dumps({"data": {"p_w": 77.0}}).encode(),
        77.0,
        "lab/meter/7/avail",
        b"up",
        b"down",
        {
            "json_path": "data.p_w",
            "availability_topic": "lab/meter/7/avail",
            "payload_online": "up",
            "payload_offline": "down",
        },
    ),
]


def run_case(
    broker: BrokerProcess, case: Case, script: list[tuple[str, bytes] | float | str]
) -> list[Sample]:
    pub = Publisher(broker.url, f"dev-{case.format}")
    clock = Clock()

    async def main() -> list[Sample]:
        src = MqttSource(topic=case.topic, format=case.format, **(case.extra or {}))  # type: ignore[arg-type]
        d = PlugDriver(
            src, BrokerConfig(url=broker.url), f"agent-{case.format}", stale_after_s=1.0, clock=clock
        )
        await d.start()
        assert await d.link.wait_connected(10)
        await asyncio.sleep(0.3)
        out = []
        for step in script:
            if step == "read":
                out.append(await d.read())
            elif isinstance(step, float):
                await asyncio.sleep(step)
            else:
                assert isinstance(step, tuple)
                await asyncio.get_running_loop().run_in_executor(None, pub.publish, *step)
                await asyncio.sleep(0.2)
        await d.close()
        return out

    try:
        return asyncio.run(main())
    finally:
        pub.close()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.format}:{c.topic.split('/')[1]}" for c in CASES])
def test_format(mosquitto: BrokerProcess, case: Case) -> None:
    got = run_case(
        mosquitto,
        case,
        [
            "read",
            (case.availability, case.online),
            (case.topic, case.payload),
            "read",
            (case.availability, case.offline),
            "read",
            (case.availability, case.online),
            (case.topic, case.payload),
            "read",
            1.3,
            "read",
        ],
    )
    assert got[0].error is not None and "no message yet" in got[0].error
    assert got[1].power_w == pytest.approx(case.watts)
    assert got[2].power_w is None and got[2].error is not None and "offline" in got[2].error
    assert got[3].power_w == pytest.approx(case.watts)
    assert got[4].power_w is None and got[4].error is not None and "silent for more than" in got[4].error


def test_shelly_gen2_partial_updates(mosquitto: BrokerProcess) -> None:
    case = CASES[3]
    rpc = "shellyplusplugs-a8032ab12345/events/rpc"
    notify = {
        "src": "shellyplusplugs-a8032ab12345",
        "dst": "shellyplusplugs-a8032ab12345/events",
        "method": "NotifyStatus",
        "params": {"ts": 1700000001.5, "switch:0": {"id": 0, "apower": 88.4}},
    }
    partial = {**notify, "params": {"ts": 1700000002.5, "switch:0": {"id": 0, "temperature": {"tC": 36.0}}}}
    got = run_case(
        mosquitto,
        case,
        [
            (case.topic, case.payload),
            "read",
            (rpc, json.dumps(notify).encode()),
            "read",
            (rpc, json.dumps(partial).encode()),
            "read",
        ],
    )
    assert [s.power_w for s in got] == [pytest.approx(12.3), pytest.approx(88.4), pytest.approx(88.4)]


def test_garbage_is_an_error_not_off(mosquitto: BrokerProcess) -> None:
    case = CASES[0]
    got = run_case(
        mosquitto, case, [(case.topic, b"{garbage"), "read", (case.topic, b'{"StatusSNS": {}}'), "read"]
    )
    assert got[0].power_w is None and got[0].error is not None and "unreadable" in got[0].error
    assert got[1].power_w is None and got[1].error is not None and "no power" in got[1].error


def test_plugs_on_their_own_broker(mosquitto: BrokerProcess) -> None:
    """The plugs' broker differs from labmeter's: the source's own [broker] table is used."""
    pub = Publisher(mosquitto.url, "own-broker-plug")
    clock = Clock()

    async def main() -> Sample:
        src = MqttSource(topic="tele/p/SENSOR", broker=BrokerConfig(url=mosquitto.url))
        agent_broker = BrokerConfig(url="mqtt://127.0.0.1:9")  # labmeter's broker: not where the plug is
        d = PlugDriver(src, agent_broker, "agent-own", stale_after_s=5.0, clock=clock)
        await d.start()
        assert await d.link.wait_connected(10)
        await asyncio.sleep(0.3)
        await asyncio.get_running_loop().run_in_executor(
            None, pub.publish, "tele/p/SENSOR", b'{"ENERGY": {"Power": 42}}'
        )
        await asyncio.sleep(0.3)
        s = await d.read()
        await d.close()
        return s

    try:
        assert asyncio.run(main()).power_w == 42.0
    finally:
        pub.close()
