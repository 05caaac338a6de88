"""The time-series sink against VictoriaMetrics (it speaks the InfluxDB v2 write API; no InfluxDB server is
installable here), read back through its export API: hours equal the ledger's, re-sending changes nothing, and
after the store was down the sink catches up from the ledger."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from labmeter.collector.ledger import Ledger
from labmeter.collector.report import per_instrument
from labmeter.collector.sink_influx import CURSOR, InfluxSink

from labmeter.config import InfluxConfig, PolicyConfig
from tests.conftest import free_port, wait_port
from tests.lab import store_schedule

VM = shutil.which("victoria-metrics")
pytestmark = pytest.mark.skipif(
    VM is None, reason="victoria-metrics is not installed (make deps installs it)"
)
TZ = ZoneInfo("Asia/Shanghai")
POLICY = PolicyConfig(prep_allowance_s=900, post_allowance_s=600)


def t(day: int, hh: int, mm: int = 0) -> int:
    return int(datetime(2026, 3, day, hh, mm, tzinfo=TZ).timestamp() * 1000)


class Victoria:
    def __init__(self, data: Path) -> None:
        self.data, self.port = data, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert VM
        self.proc = subprocess.Popen(
            [
                VM,
                f"-storageDataPath={self.data}",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                "-dedup.minScrapeInterval=1ms",
                "-retentionPeriod=100y",
                "-search.latencyOffset=0s",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def export(self, name: str) -> dict[str, list[float]]:
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).read()
        q = urllib.parse.urlencode({"match[]": f'{{__name__="{name}"}}'})
        out: dict[str, list[float]] = defaultdict(list)
        for line in urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=10).read().splitlines():
            series = json.loads(line)
            out[series["metric"]["instrument"]] += series["values"]
        return out


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Victoria]:
    v = Victoria(tmp_path / "vm")
    v.start()
    yield v
    v.stop()


def test_sink_hours_idempotence_and_catch_up(vm: Victoria, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store_schedule(
        tmp_path,
        ledger,
        "pc-a",
        "CZ-A",
        [
            (t(2, 0), t(2, 8), "OFF"),
            (t(2, 8), t(2, 9), "STANDBY"),
            (t(2, 9), t(2, 12, 30), "RUNNING"),
            (t(2, 12, 30), t(2, 13), "STANDBY"),
            (t(2, 13), t(3, 0), "OFF"),
        ],
    )
    day = (t(2, 0), t(3, 0))
    want = per_instrument(ledger, *day, POLICY)["CZ-A"]

    async def main() -> None:
        sink = InfluxSink(
            InfluxConfig(url=vm.url), ledger, POLICY, settle_ms=0
        )  # the client lives in this loop
        assert await sink.flush() > 0
        run = vm.export("labmeter_usage_run_s")
        eff = vm.export("labmeter_usage_effective_s")
        assert sum(run["CZ-A"]) * 1000 == want.run_ms == 3.5 * 3_600_000
        assert sum(eff["CZ-A"]) * 1000 == want.effective_ms
        states = vm.export("labmeter_state_state_code")
        assert 2 in states["CZ-A"] and 0 in states["CZ-A"]

        # everything again: the same series and timestamps, nothing counted twice
        ledger.set_sink_cursor(CURSOR, 0)
        await sink.flush()
        assert sum(vm.export("labmeter_usage_run_s")["CZ-A"]) * 1000 == want.run_ms

        # the store goes down; the ledger keeps taking intervals; the sink fails without losing its place
        vm.stop()
        store_schedule(
            tmp_path, ledger, "pc-b", "CZ-B", [(t(2, 10), t(2, 11), "RUNNING"), (t(2, 11), t(2, 12), "OFF")]
        )
        cursor = ledger.sink_cursor(CURSOR)
        with pytest.raises(aiohttp.ClientOSError, match=f"127.0.0.1:{vm.port}"):
            await sink.flush()  # reset or refused: the store is down, and the error names it
        assert ledger.sink_cursor(CURSOR) == cursor
        vm.start()
        await sink.flush()
        run = vm.export("labmeter_usage_run_s")
        assert sum(run["CZ-B"]) == 3600.0
        assert sum(run["CZ-A"]) * 1000 == want.run_ms
        await sink.close()

    asyncio.run(main())
    ledger.close()
