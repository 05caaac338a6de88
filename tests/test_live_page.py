"""The overview and instrument pages as a facility manager sees them, in Debian's Chromium at 1440 and
390 px, on a real agent process (Modbus meters, Mosquitto): honest states and hours, and phones.

- a running instrument's hours today rise while it runs (the open interval counts, marked provisional);
- "no agent enrolled" and "agent down" look different; an agent that goes silent (frozen: no heartbeat,
  no last will) turns its instruments UNKNOWN after the heartbeat timeout;
- at 390 px nothing scrolls sideways (document width equals the viewport), the header is one line;
- the instrument page shows name, unit, state, power, agent, energy, hour ticks and follows ``?lang=en``.

Screenshots go to each test's tmp_path/artifacts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyModbusTCP.server import ModbusServer

from labmeter import config
from tests.conftest import LABMETER, BrokerProcess, free_port
from tests.lab import CollectorThread, wait_for
from tests.support.browser import CHROMIUM, get, launch
from tests.support.modbus import words

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium not installed (make deps installs it)"
)
DESK = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
HOSTILE = "<img src=x onerror=window.__xss=1>X射线衍射仪（未接入）"


@pytest.fixture
def lab(mosquitto: BrokerProcess, tmp_path: Path) -> Iterator[tuple[str, Any, subprocess.Popen[bytes]]]:
    meters = []
    agent_cfg = (
        '[agent]\nid = "bench-01"\nkey_file = "agent.key"\nstate_dir = "state"\nheartbeat_s = 1\nopen_every_s = 2\n'
        f'[broker]\nurl = "{mosquitto.url}"\n'
    )
    for code, watts in (("CZ-ICP-002", 900.0), ("CZ-NMR-001", 0.5)):
        port = free_port()
        m = ModbusServer(host="127.0.0.1", port=port, no_block=True)
        m.data_bank.set_input_registers(0x000C, words(watts))
        m.start()
        meters.append(m)
        agent_cfg += (
            f'[[instrument]]\nid = "{code}"\npoll_s = 0.2\n[instrument.source]\ndriver = "modbus"\n'
            f'url = "tcp://127.0.0.1:{port}"\nprofile = "eastron-sdm120"\n'
            "[instrument.states]\noff_below_w = 5\nrun_above_w = 400\n"
        )
    (tmp_path / "agent.toml").write_text(agent_cfg)
    (tmp_path / "instruments.csv").write_text(
        "code,name,unit,category\nCZ-ICP-002,电感耦合等离子体质谱仪,分析测试中心,020302\n"
        "CZ-NMR-001,核磁共振波谱仪,化学学院,020301\n"
        f'CZ-XRD-009,"{HOSTILE}",化学学院,020101\n',  # a hostile name, imported as a registry would be
        encoding="utf-8",
    )
    (tmp_path / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{tmp_path / "data"}"\n[broker]\nurl = "{mosquitto.url}"\n'
        '[web]\nlisten = "127.0.0.1:0"\n'
    )
    run = lambda *a: subprocess.run([*LABMETER, *a], cwd=tmp_path, capture_output=True, text=True, timeout=60)  # noqa: E731
    out = run("agent", "enroll", "-c", "agent.toml").stdout
    add = next(x.strip() for x in out.splitlines() if x.strip().startswith("labmeter collector"))
    assert run(*add.split()[1:], "-c", "collector.toml").returncode == 0
    assert run("collector", "import-instruments", "instruments.csv", "-c", "collector.toml").returncode == 0
    cfg = config.load(tmp_path / "collector.toml", config.CollectorConfig)
    log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-m", "labmeter", "agent", "run", "-c", "agent.toml"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with CollectorThread(cfg) as ct:
            port = wait_for(lambda: ct.collector and ct.collector.web and ct.collector.web.port, what="web")
            wait_for(
                lambda: len(ct.collector.live.instruments) == 2 if ct.collector else False, what="states"
            )
            wait_for(lambda: ct.collector and ct.collector.live.agents, what="heartbeat")
            yield f"http://127.0.0.1:{port}", ct, agent
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGCONT)
            agent.kill()
        agent.wait(10)
        log.close()
        for m in meters:
            m.stop()


def no_sideways_scroll(page: Any) -> None:
    width = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, innerWidth]")
    assert width == [390, 390, 390], width


def test_overview_and_instrument_page_at_desk_and_phone_width(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    base, _ct, _agent = lab
    art = tmp_path / "artifacts"
    art.mkdir()
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=DESK)
        page.goto(base + "/?lang=en")
        page.wait_for_selector('[data-testid="state-CZ-ICP-002"][data-state="RUNNING"]')
        assert page.text_content('[data-testid="tile-total"] b') == "3"
        assert page.text_content('[data-testid="tile-RUNNING"] b') == "1"
        # never enrolled to any agent: UNKNOWN, and shown as "no agent", not as an agent that is down
        assert page.get_attribute('.row[data-code="CZ-XRD-009"]', "data-agent-status") == "none"
        assert page.get_attribute('.row[data-code="CZ-ICP-002"]', "data-agent-status") == "up"
        assert page.text_content('.row[data-code="CZ-XRD-009"] .c-agent') == "○ no agent enrolled"
        assert page.get_attribute('[data-testid="state-CZ-XRD-009"]', "data-state") == "UNKNOWN"
        assert "labmeter report hours" in page.text_content("#definition")
        # the imported name is text: shown whole, nothing made of it
        assert page.text_content('.row[data-code="CZ-XRD-009"] .name') == HOSTILE
        assert page.evaluate("[window.__xss, document.querySelectorAll('#list img').length]") == [None, 0]
        # today's run hours rise while it runs: the open interval counts (provisional, marked *)
        cell = '[data-testid="run-CZ-ICP-002"]'
        before = int(page.get_attribute(cell, "data-ms") or "-1")
        assert "prov" in (page.get_attribute(cell, "class") or "")
        page.wait_for_function(
            "([sel, n]) => Number(document.querySelector(sel).dataset.ms) > n",
            arg=[cell, before + 1500],
            timeout=5000,
        )
        status, body = get(base + "/api/instruments/CZ-ICP-002")
        assert status == 200 and body["instrument"]["today"]["provisional_run_s"] > 0
        # search by name, then by code
        page.fill("#q", "核磁")
        page.wait_for_function("() => document.querySelectorAll('#win [data-code]').length === 1")
        page.fill("#q", "cz-xrd")
        page.wait_for_function(
            "() => document.querySelector('#win [data-code]')?.dataset.code === 'CZ-XRD-009'"
            " && document.querySelectorAll('#win [data-code]').length === 1"
        )
        page.fill("#q", "")
        page.select_option("#sort", "code")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#win [data-code]')].map(e => e.dataset.code).join() === "
            "'CZ-ICP-002,CZ-NMR-001,CZ-XRD-009'"
        )
        page.screenshot(path=str(art / "overview-1440-en.png"), full_page=True)

        phone = browser.new_page(viewport=PHONE)
        phone.goto(base + "/?lang=zh-CN")
        phone.wait_for_selector('.row[data-code="CZ-ICP-002"]')
        no_sideways_scroll(phone)
        header = phone.evaluate("document.querySelector('header').getBoundingClientRect().height")
        assert header < 60, header  # one line
        assert phone.text_content("h1") == "仪器实时状态"
        phone.screenshot(path=str(art / "overview-390-zh.png"), full_page=True)
        phone.click('.row[data-code="CZ-ICP-002"] a')
        phone.wait_for_selector('[data-testid="timeline"] rect[fill="var(--run)"]')
        assert phone.evaluate("new URL(location.href).searchParams.get('lang')") == "zh-CN"
        no_sideways_scroll(phone)

        phone.goto(base + "/instrument/CZ-ICP-002?lang=en")
        phone.wait_for_selector('[data-testid="timeline"] rect[fill="var(--run)"]')
        phone.wait_for_function(
            "() => document.querySelector('[data-testid=\"name\"] b')?.textContent.length > 1"
        )
        assert phone.evaluate("document.documentElement.lang") == "en"
        assert phone.text_content("h2") == "State timeline"
        facts = {
            k: phone.text_content(f'[data-testid="{k}"]') or ""
            for k in ("name", "unit", "state", "power", "agent", "energy")
        }
        assert facts["name"] == "Name电感耦合等离子体质谱仪" and facts["unit"] == "Unit分析测试中心", facts
        assert "Running" in facts["state"] and "900.0 W" in facts["power"] and "bench-01" in facts["agent"]
        assert facts["energy"] == "Energy today—", facts  # no energy field in this API: a dash, not 0
        ticks = phone.locator('[data-testid="timeline"] line.tick').count()
        assert 23 <= ticks <= 25, ticks  # a day has an hour tick each hour
        assert phone.locator('[data-testid="timeline"] text.tick-label').count() >= 2
        no_sideways_scroll(phone)
        phone.screenshot(path=str(art / "instrument-390-en.png"), full_page=True)
        browser.close()


def test_a_silent_agent_turns_its_instruments_unknown(lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The agent is frozen (SIGSTOP): its connection stays open, so no last will says it is gone; only the
    heartbeat timeout can tell, and then its instruments are UNKNOWN, not their last badge."""
    from playwright.sync_api import sync_playwright

    base, ct, agent = lab
    art = tmp_path / "artifacts"
    art.mkdir()
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=PHONE)
        page.goto(base + "/?lang=en")
        page.wait_for_selector('[data-testid="state-CZ-ICP-002"][data-state="RUNNING"]')
        ct.collector.web.agent_down_after_s = 3.0
        os.kill(agent.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        page.wait_for_selector('[data-testid="state-CZ-ICP-002"][data-state="UNKNOWN"]', timeout=20_000)
        assert time.monotonic() - t0 >= 2.5  # not before the timeout
        assert get(base + "/api/agents")[1]["agents"][0]["online"] is True  # no will came: the timeout did it
        assert page.get_attribute('[data-testid="state-CZ-ICP-002"]', "data-last-state") == "RUNNING"
        assert page.get_attribute('[data-testid="state-CZ-NMR-001"]', "data-state") == "UNKNOWN"
        assert page.get_attribute('.row[data-code="CZ-ICP-002"]', "data-agent-status") == "down"
        assert page.get_attribute('.row[data-code="CZ-XRD-009"]', "data-agent-status") == "none"
        assert page.text_content('[data-testid="tile-UNKNOWN"] b') == "3"
        assert page.text_content('[data-testid="tile-agents-down"] b') == "1"
        # a silent agent's instrument adds no provisional hours
        run = get(base + "/api/instruments/CZ-ICP-002")[1]["instrument"]["today"]
        assert run["provisional_run_s"] == 0
        no_sideways_scroll(page)
        page.screenshot(path=str(art / "agent-silent-390.png"), full_page=True)
        browser.close()
