"""``labmeter demo``: a simulated lab through the real code path, a working day in a minute.

Built-in broker + collector on SQLite, one agent, an SDM120 meter on Modbus TCP
and a Tasmota plug on MQTT, all sharing one scaled clock. At the end the report
is printed beside the schedule's ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from labmeter import config, signing
from labmeter.agent.runtime import Agent
from labmeter.clock import ScaledClock
from labmeter.collector.identity import collector_key
from labmeter.collector.ledger import Ledger
from labmeter.collector.registry import import_instruments, import_services
from labmeter.collector.reports.hours import hours_report, render
from labmeter.collector.service import Collector
from labmeter.drivers.registry import agent_config
from labmeter.drivers.sim import run_sim
from labmeter.netutil import free_port

TZ = ZoneInfo("Asia/Shanghai")
DAY_START_H, DAY_HOURS = 7, 14
H = 3600

# Schedules in seconds from 07:00 local: a working day for each instrument.
INSTRUMENTS: list[dict[str, Any]] = [
    {
        "id": "CZ-XRD-001",
        "name": "X-ray diffractometer",
        "unit": "School of Materials",
        "kind": "meter",
        "schedule": [
            (0, "OFF"),
            (1.5 * H, "STANDBY"),
            (2 * H, "RUNNING"),
            (4.5 * H, "STANDBY"),
            (6 * H, "RUNNING"),
            (9 * H, "STANDBY"),
            (9.4 * H, "OFF"),
        ],
        "levels": {"OFF": 0.8, "STANDBY": 180, "RUNNING": 1500},
    },
    {
        "id": "CZ-SEM-003",
        "name": "Scanning electron microscope",
        "unit": "Analysis Centre",
        "kind": "meter",
        "schedule": [
            (0, "STANDBY"),
            (1 * H, "RUNNING"),
            (5 * H, "STANDBY"),
            (5.5 * H, "RUNNING"),
            (11 * H, "STANDBY"),
        ],
        "levels": {"OFF": 1.0, "STANDBY": 350, "RUNNING": 2200},
    },
    {
        "id": "CZ-HPLC-002",
        "name": "HPLC (smart plug)",
        "unit": "School of Chemistry",
        "kind": "plug",
        "schedule": [
            (0, "OFF"),
            (2 * H, "STANDBY"),
            (2.25 * H, "RUNNING"),
            (7 * H, "STANDBY"),
            (7.5 * H, "OFF"),
            (8 * H, "STANDBY"),
            (8.1 * H, "RUNNING"),
            (12 * H, "OFF"),
        ],
        "levels": {"OFF": 0.5, "STANDBY": 35, "RUNNING": 140},
    },
]


def write_configs(
    d: Path,
    broker_port: int,
    web_port: int,
    meter_ports: dict[str, int],
    metering_start: datetime,
    collector_key: str | None = None,
) -> tuple[Path, Path]:
    pin = f'collector_key = "{collector_key}"\n' if collector_key else ""
    parts = [
        "# Written by `labmeter demo`. Times are simulated: one real second is many simulated ones.\n"
        f'[agent]\nid = "demo-lab-pc"\nkey_file = "agent.key"\nstate_dir = "agent-state"\n{pin}'
        "bucket_s = 3600\ncheckpoint_s = 60\nheartbeat_s = 300\nopen_every_s = 300\nresend_after_s = 30\n\n"
        f'[broker]\nurl = "mqtt://127.0.0.1:{broker_port}"\n'
    ]
    for inst in INSTRUMENTS:
        levels = inst["levels"]
        parts.append(f'\n[[instrument]]\nid = "{inst["id"]}"\npoll_s = 30\nstale_after_s = 120\n')
        if inst["kind"] == "meter":
            parts.append(
                f'[instrument.source]\ndriver = "modbus"\nurl = "tcp://127.0.0.1:{meter_ports[inst["id"]]}"\n'
                'profile = "eastron-sdm120"\ndevice_id = 1\n'
            )
        else:
            parts.append(
                f'[instrument.source]\ndriver = "mqtt"\ntopic = "tele/{inst["id"].lower()}/SENSOR"\n'
                'format = "tasmota"\n'
            )
        off, run = levels["OFF"] * 3 + 2, (levels["STANDBY"] + levels["RUNNING"]) / 2
        parts.append(
            f"[instrument.states]\noff_below_w = {off:g}\nrun_above_w = {run:g}\nhysteresis_w = 5\n"
            "min_dwell_s = 60\n"
        )
    agent_toml = d / "agent.toml"
    agent_toml.write_text("".join(parts), encoding="utf-8")
    collector_toml = d / "collector.toml"
    collector_toml.write_text(
        '[collector]\ndata_dir = "collector-data"\nledger = "sqlite"\nmax_future_s = 3600\n\n'
        f'[broker]\nembedded = true\nlisten = "127.0.0.1:{broker_port}"\n\n'
        f'[web]\nlisten = "127.0.0.1:{web_port}"\n\n'
        "[policy]\nprep_allowance_s = 900\npost_allowance_s = 600\n",
        encoding="utf-8",
    )
    (d / "instruments.csv").write_text(
        # metered from the simulated day's start, as an installer records it: rated hours cover the whole day
        "code,name,unit,category,kind,rated_hours,metering_start\n"
        + "".join(
            f"{i['id']},{i['name']},{i['unit']},,general,,{metering_start:%Y-%m-%d %H:%M}\n"
            for i in INSTRUMENTS
        ),
        encoding="utf-8",
    )
    return agent_toml, collector_toml


# Bookings (service records) for the simulated day, hours after 07:00: who used what, internal or external.
BOOKINGS = [
    ("CZ-XRD-001", 2.0, 4.5, "Zhang Wei", "School of Materials", 120, 135),
    ("CZ-XRD-001", 6.0, 9.0, "Acme Batteries Ltd", "Acme Batteries Ltd", 130, 136),
    ("CZ-SEM-003", 1.0, 5.0, "Li Na", "Provincial Geology Institute", 130, 135),
    ("CZ-SEM-003", 5.5, 8.0, "Wang Fang", "School of Physics", 120, 137),
    ("CZ-HPLC-002", 2.0, 7.0, "Chen Jie", "School of Chemistry", 120, 135),
]


def write_bookings(path: Path, day_start: datetime) -> None:
    lines = ["instrument,start,end,applicant,applicant_unit,service_type,direction,amount"]
    for code, s, e, who, unit, st, direction in BOOKINGS:
        start, end = day_start + timedelta(hours=s), day_start + timedelta(hours=e)
        lines.append(f"{code},{start:%Y-%m-%d %H:%M},{end:%Y-%m-%d %H:%M},{who},{unit},{st},{direction},0")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def truth_run_hours(points: list[tuple[float, str]], end_s: float) -> float:
    total = 0.0
    for (t, state), nxt in zip(points, [*points[1:], (end_s, "")], strict=True):
        if state == "RUNNING":
            total += min(nxt[0], end_s) - t
    return total / H


async def run_demo(duration: float, directory: Path | None, port: int, stop: asyncio.Event) -> None:
    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="labmeter-demo-")
        directory = Path(tmp.name)
    directory.mkdir(parents=True, exist_ok=True)
    today = datetime.now(TZ).replace(hour=DAY_START_H, minute=0, second=0, microsecond=0) - timedelta(days=1)
    epoch_ms = int(today.timestamp() * 1000)
    clock = ScaledClock.start(epoch_ms, DAY_HOURS * H / duration)
    broker_port = port or free_port()
    meter_ports = {i["id"]: free_port() for i in INSTRUMENTS if i["kind"] == "meter"}
    web_port = free_port()
    agent_toml, collector_toml = write_configs(directory, broker_port, web_port, meter_ports, today)
    ccfg = config.load(collector_toml, config.CollectorConfig)
    # the agent pins the collector's key from the start, as an installer does at enrolment
    own = signing.public_key_text(collector_key(ccfg.collector).public_key())
    write_configs(directory, broker_port, web_port, meter_ports, today, own)
    acfg = config.load(agent_toml, agent_config())

    key = signing.generate_key_file(acfg.agent.key_file, force=True)
    ledger = Ledger.open(ccfg.collector.ledger, ccfg.collector.data_dir)
    import_instruments(ledger, directory / "instruments.csv", tz=TZ)
    pub = key.public_key()
    ledger.add_agent(
        acfg.agent.id, signing.public_key_text(pub), signing.key_id(pub), [i["id"] for i in INSTRUMENTS]
    )
    write_bookings(directory / "services.csv", today)
    import_services(ledger, directory / "services.csv", TZ)
    ledger.close()

    print(f"labmeter demo: a simulated working day ({DAY_HOURS} h from {today:%H:%M}) in {duration:g} s")
    print(f"  configs and data in {directory}")
    print(
        f"  built-in broker on 127.0.0.1:{broker_port}; SDM120 meters on Modbus TCP; a Tasmota plug on MQTT"
    )
    print(f"  live view: http://127.0.0.1:{web_port}/  (open it while the demo runs)\n")

    spec = {
        "epoch_ms": epoch_ms,
        "meter": [
            {"listen": f"127.0.0.1:{meter_ports[i['id']]}", "schedule": i["schedule"], "levels": i["levels"]}
            for i in INSTRUMENTS
            if i["kind"] == "meter"
        ],
        "plug": [
            {
                "topic": f"tele/{i['id'].lower()}/SENSOR",
                "broker": f"mqtt://127.0.0.1:{broker_port}",
                "every_s": 30,
                "schedule": i["schedule"],
                "levels": i["levels"],
            }
            for i in INSTRUMENTS
            if i["kind"] == "plug"
        ],
    }
    collector = Collector(ccfg, clock)
    stops = {name: asyncio.Event() for name in ("collector", "sim", "agent")}
    ctask = asyncio.create_task(collector.run(stops["collector"]))
    await collector.ready.wait()
    stask = asyncio.create_task(run_sim(spec, clock, stops["sim"]))
    agent = Agent(acfg, clock)
    atask = asyncio.create_task(agent.run(stops["agent"]))
    end_ms = epoch_ms + DAY_HOURS * H * 1000
    try:
        while clock.wall_ms() < end_ms and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.5, duration / 14))
            show_live(collector, clock.wall_ms())
    finally:
        stops["agent"].set()
        await atask
        for _ in range(50):
            if collector.stats["stored"] and not collector.inbox:
                break
            await asyncio.sleep(0.1)
        stops["sim"].set()
        stops["collector"].set()
        await asyncio.gather(stask, ctask)

    ledger = Ledger.open(ccfg.collector.ledger, ccfg.collector.data_dir)
    rows = hours_report(ledger, epoch_ms, end_ms, ccfg.policy)
    ledger.close()
    print("\nReport for the simulated day (labmeter report hours):\n")
    sys.stdout.write(render(rows, "table", "en"))
    print("\nGround truth from the simulators' schedules (run hours):")
    for inst in INSTRUMENTS:
        print(f"  {inst['id']:<12} {truth_run_hours(inst['schedule'], DAY_HOURS * H):6.2f} h")
    print(f"\nstored {collector.stats['stored']} signed intervals, rejected {collector.stats['rejected']}")
    if tmp is None:
        print(
            f"re-run the report: labmeter report hours --config {collector_toml} "
            f"--from {today:%Y-%m-%d} --to {today:%Y-%m-%d}"
        )
    else:
        tmp.cleanup()


def show_live(collector: Collector, now_ms: int) -> None:
    t = datetime.fromtimestamp(now_ms / 1000, TZ).strftime("%H:%M")
    cells = []
    for inst in INSTRUMENTS:
        live = collector.live.instruments.get(inst["id"], {})
        power = live.get("power_w")
        shown = f"{power:7.1f} W" if isinstance(power, int | float) else "      - "
        cells.append(f"{inst['id']} {live.get('state', '-'):<8}{shown}")
    print(f"[{t}] " + " | ".join(cells), flush=True)
