"""The live view in a real browser (Debian's Chromium driven by Playwright) and its JSON API.

A real agent process polls a Modbus meter (pyModbusTCP) and reports through Mosquitto
to the collector, which serves the page; changing the meter's power must show on the
page within 2 s. Screenshots go to each test's own tmp_path/artifacts (pytest keeps the last runs).
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pyModbusTCP.server import ModbusServer

from labmeter import config
from tests.conftest import LABMETER, BrokerProcess, free_port
from tests.lab import CollectorThread, agent_process, closed_port, wait_for
from tests.support.browser import CHROMIUM, get, launch
from tests.support.modbus import words


@pytest.fixture
def lab(mosquitto: BrokerProcess, tmp_path: Path):  # type: ignore[no-untyped-def]
    meters = {}
    agent_cfg = (
        '[agent]\nid = "bench-01"\nkey_file = "agent.key"\nstate_dir = "state"\nheartbeat_s = 2\nopen_every_s = 5\n'
        f'[broker]\nurl = "{mosquitto.url}"\n'
    )
    for code, watts in (("CZ-NMR-001", 0.5), ("CZ-ICP-002", 900.0)):
        port = free_port()
        m = ModbusServer(host="127.0.0.1", port=port, no_block=True)
        m.data_bank.set_input_registers(0x000C, words(watts))
        m.start()
        meters[code] = m
        agent_cfg += (
            f'[[instrument]]\nid = "{code}"\npoll_s = 0.2\n[instrument.source]\ndriver = "modbus"\n'
            f'url = "tcp://127.0.0.1:{port}"\nprofile = "eastron-sdm120"\n'
            "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
        )
    (tmp_path / "agent.toml").write_text(agent_cfg)
    (tmp_path / "instruments.csv").write_text(
        "code,name,unit,category\nCZ-NMR-001,核磁共振波谱仪,化学学院,020301\nCZ-ICP-002,ICP-MS,分析测试中心,020302\n"
    )
    (tmp_path / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{tmp_path / "data"}"\n[broker]\nurl = "{mosquitto.url}"\n'
        '[web]\nlisten = "127.0.0.1:0"\n'  # the view binds a port itself; read back below
    )
    run = lambda *a: subprocess.run([*LABMETER, *a], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # noqa: E731
    out = run("agent", "enroll", "-c", "agent.toml").stdout
    add = next(x.strip() for x in out.splitlines() if x.strip().startswith("labmeter collector"))
    assert run(*add.split()[1:], "-c", "collector.toml").returncode == 0
    assert run("collector", "import-instruments", "instruments.csv", "-c", "collector.toml").returncode == 0
    cfg = config.load(tmp_path / "collector.toml", config.CollectorConfig)
    try:
        with CollectorThread(cfg) as ct, agent_process(tmp_path):
            web_port = wait_for(
                lambda: ct.collector and ct.collector.web and ct.collector.web.port, what="web"
            )
            base = f"http://127.0.0.1:{web_port}"
            wait_for(
                lambda: len(ct.collector.live.instruments) == 2 if ct.collector else False, what="live states"
            )
            yield base, meters, ct
    finally:
        for m in meters.values():
            m.stop()


def test_api_endpoints_and_bad_parameters(lab) -> None:  # type: ignore[no-untyped-def]
    base, _meters, _ct = lab
    status, body = get(f"{base}/api/instruments")
    assert status == 200
    got = {i["code"]: i for i in body["instruments"]}
    assert got["CZ-NMR-001"]["state"] == "OFF" and got["CZ-ICP-002"]["state"] == "RUNNING"
    assert got["CZ-NMR-001"]["unit"] == "化学学院" and got["CZ-ICP-002"]["power_w"] == 900.0
    # every interval is minutes old: today's hours are within this month's, within this year's (equal,
    # unless local midnight fell during the test)
    icp = got["CZ-ICP-002"]
    for key in ("run_h", "effective_h"):
        assert icp["today"][key] <= icp["month"][key] <= icp["year"][key], icp
    assert set(icp["today"]) >= {
        "run_h",
        "effective_h",
        "rated_h",
        "utilisation_pct",
        "provisional_run_s",
        "provisional_effective_s",
        "energy_wh",
    }
    assert 0 <= icp["today"]["run_h"] <= icp["today"]["effective_h"] <= 1.0
    # it runs now: the open interval counts, as provisional seconds within the hours
    assert icp["agent_status"] == "up" and icp["today"]["provisional_run_s"] > 0
    assert icp["today"]["run_h"] * 3600 >= icp["today"]["provisional_run_s"] - 36
    wait_for(lambda: get(f"{base}/api/agents")[1]["agents"], what="heartbeat")
    agents = get(f"{base}/api/agents")[1]["agents"]
    assert agents[0]["agent"] == "bench-01" and agents[0]["online"] is True
    status, tl = get(f"{base}/api/instruments/CZ-ICP-002/timeline")
    assert status == 200 and tl["intervals"] and tl["intervals"][-1]["state"] == "RUNNING"
    status, util = get(f"{base}/api/utilisation?by=unit")
    assert status == 200 and [r["key"] for r in util["rows"]] == ["分析测试中心", "化学学院", "TOTAL"]
    for url, fragment in [
        ("/api/utilisation?by=room", "by='room'"),
        ("/api/utilisation?from=yesterday", "from='yesterday'"),
        (
            "/api/instruments/CZ-ICP-002/timeline?from=2026-03-02T10:00&to=2026-03-01T10:00",
            "to must be after from",
        ),
        ("/api/instruments/CZ-ICP-002/timeline?from=2026-01-01&to=2026-03-01", "at most 31 days"),
    ]:
        status, body = get(base + url)
        assert status == 400 and fragment in body["error"], (url, body)
    assert get(f"{base}/api/instruments/NOPE/timeline")[0] == 404
    status, spec = get(f"{base}/api/openapi.json")
    assert status == 200 and "/api/instruments/{code}/timeline" in spec["paths"]


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium not installed (make deps installs it)"
)
def test_page_in_browser(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    base, meters, _ct = lab
    ARTIFACTS = tmp_path / "artifacts"
    ARTIFACTS.mkdir()
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 600})
        page.goto(base + "/?lang=zh-CN")
        page.wait_for_selector('[data-testid="state-CZ-NMR-001"]')
        assert page.locator("#win [data-code]").count() == 2
        assert page.get_attribute('[data-testid="state-CZ-NMR-001"]', "data-state") == "OFF"
        assert page.text_content("h1") == "仪器实时状态"
        page.screenshot(path=str(ARTIFACTS / "live-zh.png"))

        meters["CZ-NMR-001"].data_bank.set_input_registers(0x000C, words(1500.0))
        t0 = time.monotonic()
        page.wait_for_selector('[data-testid="state-CZ-NMR-001"][data-state="RUNNING"]', timeout=2000)
        latency = time.monotonic() - t0
        assert latency < 2.0
        page.screenshot(path=str(ARTIFACTS / "live-state-change.png"))

        page.click("#lang")
        page.wait_for_function("document.querySelector('h1').textContent === 'Instruments, live'")
        assert page.text_content('[data-testid="state-CZ-NMR-001"]') == "Running"
        assert page.evaluate("document.documentElement.lang") == "en"
        page.select_option("#f-unit", "化学学院")
        assert page.locator("#win [data-code]").count() == 1
        page.screenshot(path=str(ARTIFACTS / "live-en-filtered.png"))
        browser.close()


def test_top_reads_the_api(lab) -> None:  # type: ignore[no-untyped-def]
    base, _meters, _ct = lab
    out = subprocess.run(
        [*LABMETER, "top", "--url", base, "--once"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("CZ-")}
    assert "OFF" in rows["CZ-NMR-001"] and "RUNNING" in rows["CZ-ICP-002"]
    assert "900.0" in rows["CZ-ICP-002"] and "bench-01" in rows["CZ-ICP-002"]
    with closed_port() as port:
        bad = subprocess.run(
            [*LABMETER, "top", "--url", f"http://127.0.0.1:{port}", "--once"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def test_token_required_off_loopback(tmp_path: Path) -> None:
    import asyncio

    from labmeter.collector.live.web import LiveView
    from labmeter.collector.service import Collector

    cfg = config.parse(f'[collector]\ndata_dir = "{tmp_path}"\n', config.CollectorConfig)

    async def main() -> list[int]:
        collector = Collector(cfg)
        with pytest.raises(config.ConfigError, match="set token_file"):
            LiveView(collector, "0.0.0.0:8080")
        view = LiveView(collector, "127.0.0.1:0", token="s3cret")
        await view.start()  # binds a port of its own choosing: nothing can take it in between
        port = view.port
        loop = asyncio.get_running_loop()
        codes = []
        for suffix in ("/api/agents", "/api/agents?token=wrong", "/api/agents?token=s3cret"):
            codes.append(
                await loop.run_in_executor(None, lambda s=suffix: get(f"http://127.0.0.1:{port}{s}")[0])
            )
        await view.stop()
        return codes

    assert asyncio.run(main()) == [401, 401, 200]


def test_public_view_shows_no_private_data(tmp_path: Path) -> None:
    import asyncio

    from labmeter.collector.live.web import LiveView
    from labmeter.collector.service import Collector

    cfg = config.parse(f'[collector]\ndata_dir = "{tmp_path}"\n', config.CollectorConfig)

    async def main() -> tuple[int, dict, int, int]:
        collector = Collector(cfg)
        collector.live.instruments["CZ-A"] = {
            "instrument": "CZ-A",
            "state": "RUNNING",
            "start": 1,
            "power_w": 812.0,
            "agent": "lab-pc",
            "error": None,
        }
        loop = asyncio.get_running_loop()
        view = LiveView(collector, "127.0.0.1:0", token="s3cret", public=True)
        await view.start()
        port = view.port
        status, body = await loop.run_in_executor(
            None, get, f"http://127.0.0.1:{port}/public/api/instruments"
        )
        private = (await loop.run_in_executor(None, get, f"http://127.0.0.1:{port}/api/instruments"))[0]
        await view.stop()
        off = LiveView(collector, "127.0.0.1:0")  # public is off by default
        await off.start()
        closed_port = off.port
        disabled = (
            await loop.run_in_executor(None, get, f"http://127.0.0.1:{closed_port}/public/api/instruments")
        )[0]
        await off.stop()
        return status, body, private, disabled

    status, body, private, disabled = asyncio.run(main())
    assert status == 200 and private == 401 and disabled == 404
    item = body["instruments"][0]
    # lab-pc has sent no heartbeat: its instrument's last state is no state now
    assert item["code"] == "CZ-A" and item["state"] == "UNKNOWN"
    assert not {"power_w", "agent", "agent_status", "agent_down", "error", "last_state"} & set(item)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium not installed (make deps installs it)"
)
def test_instrument_page(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    from labmeter.collector.ledger import Ledger
    from labmeter.collector.registry import import_instruments
    from tests.lab import store_schedule

    base, _meters, ct = lab
    status, si = get(f"{base}/api/instruments/CZ-ICP-002/signins")
    assert status == 200 and si["signins"] == []
    # a third instrument with a known history (one hour of running, ending an hour ago) and two sign-ins,
    # stored through a second connection to the collector's ledger (its own belongs to its thread)
    now = int(time.time() * 1000)
    run = (now - 2 * 3_600_000, now - 3_600_000)
    ledger = Ledger.open(ct.cfg.collector.ledger, ct.cfg.collector.data_dir)
    (tmp_path / "more.csv").write_text("code,name,unit\nCZ-HIS-003,历史仪器,化学学院\n", encoding="utf-8")
    import_instruments(ledger, tmp_path / "more.csv")
    store_schedule(
        tmp_path,
        ledger,
        "pc-his",
        "CZ-HIS-003",
        [(run[0] - 3_600_000, run[0], "OFF"), (*run, "RUNNING"), (run[1], now - 60_000, "OFF")],
    )
    ledger.store_signins(
        [("pc-his", "CZ-HIS-003", i, now - i * 60_000, f"p-{i:04d}", f"sha-{i}", b"{}") for i in (1, 2)]
    )
    ledger.close()
    ARTIFACTS = tmp_path / "artifacts"
    ARTIFACTS.mkdir()
    with sync_playwright() as p:
        browser = launch(p)
        # a browser far from the collector's zone: the page's days are still the collector's local days
        page = browser.new_page(viewport={"width": 1100, "height": 500}, timezone_id="America/New_York")
        page.goto(base + "/?lang=zh-CN")
        with page.expect_response(lambda r: "/timeline?" in r.url and "/instrument/" in r.frame.url) as resp:
            page.click('.row[data-code="CZ-ICP-002"] a')
        start = datetime.fromtimestamp(resp.value.json()["from"] / 1000, ZoneInfo("Asia/Shanghai"))
        assert (start.hour, start.minute) == (0, 0), start
        page.wait_for_selector('[data-testid="timeline"] rect[fill="var(--run)"]')
        assert page.text_content("#title") == "CZ-ICP-002"
        page.wait_for_function("document.querySelector('[data-testid=\"name\"] b')?.textContent === 'ICP-MS'")
        assert page.locator("#signins code").count() == 0
        page.screenshot(path=str(ARTIFACTS / "instrument-page.png"))

        with page.expect_response(lambda r: "/timeline?" in r.url) as resp:
            page.goto(base + "/instrument/CZ-HIS-003?lang=zh-CN")
        day = resp.value.json()
        page.wait_for_selector("#signins code")
        # the sign-in list shows both, newest first
        assert page.locator("#signins code").all_text_contents() == ["p-0001", "p-0002"]
        # the day's run hours: the part of the known hour inside today (local), as the API reports it
        today_h = max(0, min(run[1], day["to"]) - max(run[0], day["from"])) / 3_600_000
        shown = float(page.text_content('[data-testid="run_h"]') or "nan")
        assert shown == round(today_h, 2), (shown, today_h)
        # the week view: seven of the collector's local days ending with today, holding the whole hour
        with page.expect_response(lambda r: "/timeline?" in r.url) as week:
            page.select_option("#span", "7")
        wk = week.value.json()
        first = datetime.fromtimestamp(wk["from"] / 1000, ZoneInfo("Asia/Shanghai"))
        last = datetime.fromtimestamp(wk["to"] / 1000, ZoneInfo("Asia/Shanghai"))
        assert (first.hour, first.minute, last.hour, last.minute) == (0, 0, 0, 0)
        assert round((wk["to"] - wk["from"]) / 86_400_000) == 7 and wk["to"] == day["to"]
        assert [iv["state"] for iv in wk["intervals"]].count("RUNNING") >= 1
        page.wait_for_function(
            "document.querySelector('[data-testid=\"run_h\"]')?.textContent === '1'"
            " || document.querySelector('[data-testid=\"run_h\"]')?.textContent === '1.0'"
        )
        assert float(page.text_content('[data-testid="run_h"]') or "nan") == 1.0
        page.screenshot(path=str(ARTIFACTS / "instrument-week.png"))
        browser.close()


@pytest.mark.parametrize("page_zone", ["Asia/Shanghai", "Australia/Brisbane"])
def test_usage_so_far_equals_the_report(tmp_path: Path, page_zone: str) -> None:
    """Today's, this month's and this year's hours on the page equal the report's for [start, now), also
    when the page's time zone is not the one the rollups are kept in."""
    from labmeter.collector.live.web import LiveView
    from labmeter.collector.reports.hours import per_instrument
    from labmeter.collector.service import Collector
    from tests.lab import store_schedule

    cfg = config.CollectorConfig(
        collector=config.CollectorSection(data_dir=tmp_path / "data"), web=config.WebConfig()
    )
    collector = Collector(cfg)
    now = int(time.time() * 1000)
    t0 = now - 40 * 86_400_000
    states = ["OFF", "STANDBY", "RUNNING", "STANDBY", "RUNNING", "OFF"]
    spans = [
        (s, min(s + 97 * 60_000, now - 600_000), states[i % 6])
        for i, s in enumerate(range(t0, now - 600_000, 97 * 60_000))
    ]
    store_schedule(tmp_path, collector.ledger, "a1", "CZ-XRD-001", spans)
    view = LiveView(collector, "127.0.0.1:0", tz=page_zone)
    got = {i["code"]: i for i in view.instruments()}["CZ-XRD-001"]
    for name, start in view._period_starts(collector.clock.wall_ms()).items():
        h = per_instrument(collector.ledger, start, now, cfg.policy)["CZ-XRD-001"]
        assert got[name]["run_h"] == round(h.run_ms / 3_600_000, 2), name
        assert got[name]["effective_h"] == round(h.effective_ms / 3_600_000, 2), name
        assert got[name]["utilisation_pct"] == pytest.approx(100 * h.effective_ms / h.rated_ms, abs=0.15), (
            name
        )
    year = view._period_starts(collector.clock.wall_ms())["year"]
    if any(st == "RUNNING" and e > year for _s, e, st in spans):  # not so early in January that none did
        assert got["year"]["run_h"] > 0
    collector.ledger.close()
