"""Alerts reach a local webhook, WeCom- and DingTalk-style robots and an SMTP server (STARTTLS): each rule
fires once, repeats are suppressed, the recovery is sent, a restart repeats and forgets nothing, and a
receiver that is down, slow or failing neither stalls ingest nor leaks a secret into the log.

The rules run on a fake clock (``evaluate(now)``); the peers are real servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from labmeter import config, wire
from labmeter.cli import app
from labmeter.collector import alerts
from labmeter.collector.alerts import Alerter, dingtalk_sign, http_session
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Collector, LiveState
from labmeter.netutil import free_port
from tests.attack import make_lab
from tests.certs import certificates
from tests.support.receivers import SmtpServer, WebhookReceiver

MIN = 60_000
AGENT, CODE = "lab-pc-1", "ICP-01"
NAME, UNIT = "电感耦合等离子体质谱仪", "化学与分子工程学院"
WECOM_KEY = "wecom-key-5f1e2d3c"
DING_TOKEN = "ding-token-9a8b7c6d"
DING_SECRET = "SECding-secret-0011aabb"
HOOK_PATH_SECRET = "hookpathsecret77"
HOOK_TOKEN = "hook-bearer-4242"
T0 = 1_780_000_000_000  # 2026-05-28, on the fake clock


@dataclass
class FakeClock:
    now: int = T0

    def wall_ms(self) -> int:
        return self.now


@dataclass
class World:
    tmp: Path
    rx: WebhookReceiver
    ledger: Ledger
    live: LiveState = field(default_factory=LiveState)
    clock: FakeClock = field(default_factory=FakeClock)
    stored: list[int] = field(default_factory=lambda: [0])

    def cfg(self, extra: str = "", lang: str = "zh-CN") -> config.AlertsConfig:
        for name, value in (
            ("wecom.key", WECOM_KEY),
            ("ding.token", DING_TOKEN),
            ("ding.secret", DING_SECRET),
            ("hook.token", HOOK_TOKEN),
        ):
            (self.tmp / name).write_text(value + "\n")
        text = f"""
[collector]
data_dir = "{self.tmp}"
[alerts]
lang = "{lang}"
agent_silent_min = 10
unknown_min = 30
no_intervals_min = 60
{extra}
[[alerts.webhook]]
url = "{self.rx.url("/hook")}?x={HOOK_PATH_SECRET}"
token_file = "hook.token"
[[alerts.wecom]]
key_file = "wecom.key"
url = "{self.rx.url("/wecom")}"
[[alerts.dingtalk]]
token_file = "ding.token"
secret_file = "ding.secret"
url = "{self.rx.url("/dingtalk")}"
"""
        cfg = config.parse(text, config.CollectorConfig, "collector.toml", base=self.tmp).alerts
        assert cfg is not None
        return cfg

    def alerter(self, cfg: config.AlertsConfig | None = None, **kw: Any) -> Alerter:
        return Alerter(
            cfg or self.cfg(),
            self.ledger,
            self.live,
            config.PolicyConfig(),
            self.clock,
            lambda: self.stored[0],
            **kw,
        )

    def reopen(self) -> None:
        """A collector restart: the ledger closed and opened again, the live state empty."""
        self.ledger.close()
        self.ledger = Ledger.open("sqlite", self.tmp)
        self.live = LiveState()


@pytest.fixture(scope="module")
def shared_rx() -> Iterator[WebhookReceiver]:
    rx = WebhookReceiver()
    yield rx
    rx.close()


@pytest.fixture
def world(tmp_path: Path, shared_rx: WebhookReceiver) -> Iterator[World]:
    rx = shared_rx
    rx.status, rx.delay_s, rx.dingtalk_secret = 200, 0.0, DING_SECRET
    rx.hits.clear()
    ledger = Ledger.open("sqlite", tmp_path)
    ledger.add_agent(AGENT, "ed25519:AAAA", "kid1", [CODE])
    ledger.upsert_instruments(
        [
            {
                "code": CODE,
                "name": NAME,
                "unit": UNIT,
                "department": "",
                "category": "",
                "kind": "general",
                "share_mode": "",
            }
        ]
    )
    w = World(tmp_path, rx, ledger)
    yield w
    w.ledger.close()
    if w.rx is not rx:
        w.rx.close()


def deliver(al: Alerter) -> None:
    """Work off every channel's queue now (retries without the backoff pause)."""

    async def main() -> None:
        async with http_session() as session:
            for name in al.channels:
                while await al.deliver_one(name, session) is not None:
                    pass

    asyncio.run(main())


# each rule: (set the condition up at T0, the minute it fires, clear it) -----------------------------
def _silent_setup(w: World) -> None:
    pass


def _silent_clear(w: World) -> None:
    w.live.agents[AGENT] = {"online": True, "verified": True, "received": w.clock.now}


def _unknown_setup(w: World) -> None:
    w.live.instruments[CODE] = {"instrument": CODE, "agent": AGENT, "state": "UNKNOWN", "start": T0}


def _unknown_clear(w: World) -> None:
    w.live.instruments[CODE] = {"instrument": CODE, "agent": AGENT, "state": "RUNNING", "start": w.clock.now}


def _stored_clear(w: World) -> None:
    w.stored[0] += 5


RULES = {
    "agent_silent": (_silent_setup, 10, _silent_clear, [AGENT, CODE, NAME, UNIT]),
    "unknown": (_unknown_setup, 30, _unknown_clear, [CODE, NAME, UNIT, "UNKNOWN"]),
    "no_intervals": (_silent_setup, 60, _stored_clear, ["MQTT"]),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_fires_once_is_not_repeated_and_recovers(world: World, rule: str) -> None:
    setup, minutes, clear, named = RULES[rule]
    al = world.alerter(_config_with_only(world, rule))
    setup(world)
    assert al.evaluate(T0 + (minutes - 1) * MIN) == 0
    assert al.evaluate(T0 + minutes * MIN) == 3  # one message per channel
    deliver(al)
    assert len(world.rx.wait_hits(3)) == 3
    for text in world.rx.texts():
        assert "告警" in text and all(word in text for word in named), text
        assert "2026-05-29 04:26 (UTC+0800)" in text  # times in the collector's zone
    for later in (minutes + 1, minutes + 30, minutes + 600):
        assert al.evaluate(T0 + later * MIN) == 0, "an active alert is not sent again"
    deliver(al)
    assert len(world.rx.hits) == 3
    world.clock.now = T0 + (minutes + 700) * MIN
    clear(world)
    assert al.evaluate(world.clock.now) == 3
    deliver(al)
    recovery = world.rx.texts()[3:]
    assert len(recovery) == 3 and all("恢复" in t for t in recovery), recovery
    assert al.evaluate(world.clock.now + MIN) == 0


def _config_with_only(world: World, rule: str) -> config.AlertsConfig:
    """Only ``rule`` on: the other rules' conditions hold in these worlds too."""
    cfg = world.cfg()
    off = {k: 0 for k in ("agent_silent_min", "unknown_min", "no_intervals_min")}
    off.pop(
        {"agent_silent": "agent_silent_min", "unknown": "unknown_min", "no_intervals": "no_intervals_min"}[
            rule
        ]
    )
    return config.replace(cfg, **off)


def test_every_channel_gets_its_own_format(world: World) -> None:
    """Webhook: the JSON event; WeCom and DingTalk: msgtype text; DingTalk signed with its secret."""
    al = world.alerter(config.replace(world.cfg(lang="en"), agent_silent_min=0, no_intervals_min=0))
    _unknown_setup(world)
    al.evaluate(T0 + 30 * MIN)
    deliver(al)
    hits = {h.path: h for h in world.rx.wait_hits(3)}
    hook = hits["/hook"].body
    assert hook["event"] == "firing" and hook["rule"] == "unknown" and hook["key"] == f"unknown:{CODE}"
    assert hook["subject"] == {"code": CODE, "name": NAME, "unit": UNIT} and hook["since_ms"] == T0
    assert hook["lang"] == "en" and "has been UNKNOWN since 2026-05-29 04:26" in hook["text"]
    assert hits["/hook"].headers["Authorization"] == f"Bearer {HOOK_TOKEN}"
    assert hits["/wecom"].query == {"key": WECOM_KEY}
    assert hits["/wecom"].body["msgtype"] == "text" and CODE in hits["/wecom"].body["text"]["content"]
    ding = hits["/dingtalk"]
    assert ding.query["access_token"] == DING_TOKEN and ding.body["msgtype"] == "text"
    assert al.counts["delivered"] == 3  # the receiver checked the signature: a bad one is refused


def test_a_wrong_dingtalk_secret_is_a_failed_delivery(world: World) -> None:
    world.rx.dingtalk_secret = "SECsomething-else"
    al = world.alerter(config.replace(world.cfg(), max_attempts=2))
    al.evaluate(T0 + 10 * MIN)
    deliver(al)
    assert al.counts["given_up"] == 1 and al.counts["delivered"] == 2


def test_the_dingtalk_signature_follows_its_documented_recipe() -> None:
    # base64(HMAC-SHA256(secret, "ts\nsecret")), URL-encoded: computed independently here
    import base64
    import hashlib
    import hmac
    import urllib.parse

    ts, secret = 1_700_000_000_000, "SECabc+/="
    mac = hmac.new(secret.encode(), f"{ts}\n{secret}".encode(), hashlib.sha256).digest()
    assert dingtalk_sign(secret, ts) == urllib.parse.quote_plus(base64.b64encode(mac).decode())


def test_a_restart_neither_repeats_nor_forgets(world: World) -> None:
    _unknown_setup(world)
    al = world.alerter(config.replace(world.cfg(), agent_silent_min=0, no_intervals_min=0))
    assert al.evaluate(T0 + 30 * MIN) == 3
    deliver(al)
    world.reopen()  # the live state is empty again: the alert waits for the instrument's next state
    _unknown_setup(world)
    al2 = world.alerter(config.replace(world.cfg(), agent_silent_min=0, no_intervals_min=0))
    assert set(al2.active) == {f"unknown:{CODE}"}
    assert al2.evaluate(T0 + 40 * MIN) == 0
    deliver(al2)
    assert len(world.rx.hits) == 3
    _unknown_clear(world)
    assert al2.evaluate(T0 + 50 * MIN) == 3
    deliver(al2)
    assert len(world.rx.hits) == 6 and all("恢复" in t for t in world.rx.texts()[3:])
    assert "持续了 50 分钟" in world.rx.texts()[4], "the recovery counts from before the restart"


@pytest.mark.parametrize("rule", ["agent_silent", "no_intervals"])
def test_a_restart_does_not_mistake_its_own_start_for_a_recovery(world: World, rule: str) -> None:
    """Silence counted from the collector's start would end an alert raised before the restart."""
    _, minutes, clear, _ = RULES[rule]
    al = world.alerter(_config_with_only(world, rule))
    assert al.evaluate(T0 + minutes * MIN) == 3
    world.reopen()
    world.clock.now = T0 + 2 * minutes * MIN
    al2 = world.alerter(_config_with_only(world, rule))
    assert al2.evaluate(world.clock.now + MIN) == 0 and set(al2.active) == set(al.active)
    world.clock.now += 5 * MIN
    clear(world)
    assert al2.evaluate(world.clock.now) == 3
    deliver(al2)
    assert f"{_duration_text(2 * minutes + 5)}" in world.rx.texts()[-1]


def _duration_text(minutes: int) -> str:
    h, m = divmod(minutes, 60)
    return f"{h} 小时 {m} 分钟" if h else f"{m} 分钟"


def test_a_message_queued_before_a_restart_is_delivered_once_after(world: World) -> None:
    world.rx.status = 503
    al = world.alerter(config.replace(world.cfg(), unknown_min=0, no_intervals_min=0))
    al.evaluate(T0 + 10 * MIN)
    deliver_once = asyncio.run(_one_attempt(al))
    assert deliver_once == 3 and len(world.rx.hits) == 3
    world.reopen()
    world.rx.status = 200
    world.rx.hits.clear()
    al2 = world.alerter(config.replace(world.cfg(), unknown_min=0, no_intervals_min=0))
    assert al2.evaluate(T0 + 11 * MIN) == 0
    deliver(al2)
    deliver(al2)
    assert sorted(h.path for h in world.rx.hits) == ["/dingtalk", "/hook", "/wecom"]


async def _one_attempt(al: Alerter) -> int:
    async with http_session() as session:
        return sum([await al.deliver_one(name, session) is not None for name in al.channels])


def test_a_500_is_retried_then_given_up_and_the_queue_is_bounded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.rx.status = 500
    al = world.alerter(config.replace(world.cfg(), max_attempts=3, agent_silent_min=0, no_intervals_min=0))
    _unknown_setup(world)
    al.evaluate(T0 + 30 * MIN)
    deliver(al)
    assert len(world.rx.hits) == 9  # 3 attempts on each of 3 channels
    assert al.counts["given_up"] == 3 and al.queued() == {}
    assert al.backoff_s(0) == 5 and al.backoff_s(3) == 40 and al.backoff_s(30) == alerts.MAX_BACKOFF_S
    monkeypatch.setattr(alerts, "MAX_QUEUED", 20)
    for i in range(50):  # one more instrument stuck at each check, while the receiver fails
        world.live.instruments[f"X{i:02d}"] = {"state": "UNKNOWN", "start": T0}
        assert al.evaluate(T0 + (60 + i) * MIN) == 3
    assert al.queued() == {"wecom-1": 20, "dingtalk-1": 20, "webhook-1": 20}
    assert len(al.active) == 51


def test_a_storm_of_alike_alerts_is_one_message(world: World) -> None:
    """A broker outage silences every agent at once: the group gets one message naming them, not 30."""
    for i in range(30):
        world.ledger.add_agent(f"pc-{i:03d}", "ed25519:AAAA", "kid", [f"I{i:03d}"])
    al = world.alerter(_config_with_only(world, "agent_silent"))
    assert al.evaluate(T0 + 10 * MIN) == 3 and len(al.active) == 31
    deliver(al)
    hook = next(h.body for h in world.rx.hits if h.path == "/hook")
    assert hook["key"] == "agent_silent:*" and hook["subject"]["count"] == 31
    assert "×31" in hook["title"] and "另有 11 项" in hook["text"] and "pc-000" in hook["text"]
    wecom = next(h.body["text"]["content"] for h in world.rx.hits if h.path == "/wecom")
    assert "另有 11 项" in wecom and len(wecom.encode()) <= 2048  # whole, within the robot's limit
    for i in range(30):
        world.live.agents[f"pc-{i:03d}"] = {"online": True, "verified": True, "received": T0 + 11 * MIN}
    assert al.evaluate(T0 + 11 * MIN) == 3  # 30 recover together, one message; lab-pc-1 is still silent
    deliver(al)
    assert "恢复" in world.rx.texts()[-1] and "×30" in world.rx.texts()[-1]
    assert set(al.active) == {f"agent_silent:{AGENT}"}


def test_a_down_or_slow_receiver_does_not_stall_ingest(tmp_path: Path) -> None:
    """The collector stores and acknowledges a batch while every channel hangs or refuses connections."""
    lab = make_lab(tmp_path)
    slow = WebhookReceiver(delay_s=30)
    dead = free_port()
    text = f"""
[[webhook]]
url = "{slow.url("/hook")}"
[[webhook]]
url = "http://127.0.0.1:{dead}/hook"
"""
    import tomllib

    cfg = config.replace(
        config.AlertsConfig(
            **{"webhook": [config.WebhookChannel(**w) for w in tomllib.loads(text)["webhook"]]}
        ),
        agent_silent_min=1,
    )
    c = Collector(lab.cfg)

    async def main() -> float:
        al = Alerter(cfg, c.ledger, c.live, c.cfg.policy, c.clock, lambda: c.stats["stored"], retry_s=0.01)
        al.started_ms -= 2 * MIN
        await al.start()
        try:
            assert al.evaluate() == 4  # agent-a and agent-b, each to both channels
            await asyncio.sleep(0.3)  # the slow channel is mid-request, the dead one retrying
            t = time.monotonic()
            now = c.clock.wall_ms() // 3_600_000 * 3_600_000 - 3 * 3_600_000
            key, kid = lab.keys["agent-a"]
            batch = []
            prev = wire.GENESIS
            for seq in range(1, 21):
                body = wire.dump_body(
                    wire.Interval(
                        "agent-a", "I1", seq, prev, now + seq * MIN, now + (seq + 1) * MIN, "RUNNING"
                    ).body()
                )
                prev = wire.body_hash(body)
                batch.append((wire.interval_topic("agent-a", "I1"), wire.seal(key, kid, body)))
            await c.process(batch)
            took = time.monotonic() - t
            assert c.stats["stored"] == 20
            assert al.counts["failed"] >= 1  # the dead receiver was tried meanwhile
            return took
        finally:
            await al.close()

    try:
        took = asyncio.run(main())
    finally:
        c.ledger.close()
        slow.close()
    assert took < 5, f"a batch took {took:.1f} s while alerts were stuck"


def test_no_secret_reaches_the_log(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    world.rx = WebhookReceiver(status=500, dingtalk_secret=DING_SECRET)  # its own: it is closed below
    (world.tmp / "mail.pw").write_text("mail-password-xyz\n")
    extra = f"""
[[alerts.email]]
host = "127.0.0.1"
port = {free_port()}
username = "alerts"
password_file = "mail.pw"
sender = "labmeter@example.org"
to = ["ops@example.org"]
"""
    al = world.alerter(config.replace(world.cfg(extra), max_attempts=2))
    al.evaluate(T0 + 60 * MIN)
    deliver(al)
    world.rx.close()  # and now nothing listens at all
    world.rx = WebhookReceiver()
    al.evaluate(T0 + 61 * MIN)
    deliver(al)
    assert al.counts["given_up"] >= 4
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (WECOM_KEY, DING_TOKEN, DING_SECRET, HOOK_PATH_SECRET, HOOK_TOKEN, "mail-password-xyz"):
        assert secret not in logged, secret
    assert "webhook-1" in logged and "wecom-1" in logged  # failures are named by channel


def test_email_over_starttls_with_a_password(world: World, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    certificates(certs)
    port = free_port()
    smtp = SmtpServer(certs, port, "alerts", "s3cret-mail")
    (tmp_path / "mail.pw").write_text("s3cret-mail\n")
    try:
        text = f"""
[collector]
data_dir = "{tmp_path}"
[alerts]
unknown_min = 0
no_intervals_min = 0
[[alerts.email]]
host = "127.0.0.1"
port = {port}
username = "alerts"
password_file = "mail.pw"
ca_file = "certs/ca.pem"
sender = "labmeter@example.org"
to = ["ops@example.org", "lab@example.org"]
"""
        cfg = config.parse(text, config.CollectorConfig, base=tmp_path).alerts
        assert cfg is not None
        al = world.alerter(cfg)
        assert al.evaluate(T0 + 10 * MIN) == 1
        deliver(al)
        assert al.counts["delivered"] == 1 and smtp.logins == ["alerts"]
        sender, rcpt, raw = smtp.mails[0]
        mail = email.message_from_bytes(raw, policy=email.policy.default)
        assert sender == "labmeter@example.org" and rcpt == ["ops@example.org", "lab@example.org"]
        assert "采集代理无消息" in str(mail["Subject"]) and AGENT in str(mail["Subject"])
        assert NAME in mail.get_body().get_content()  # type: ignore[union-attr]
        world.clock.now = T0 + 30 * MIN
        _silent_clear(world)
        assert al.evaluate(world.clock.now) == 1
        deliver(al)
        assert len(smtp.mails) == 2 and "恢复" in str(
            email.message_from_bytes(smtp.mails[1][2], policy=email.policy.default)["Subject"]
        )
    finally:
        smtp.close()


def test_alert_test_command_reports_each_channel(world: World, tmp_path: Path) -> None:
    bad = WebhookReceiver(status=500)
    try:
        world.cfg()  # writes the secret files
        cfg_file = tmp_path / "collector.toml"
        cfg_file.write_text(
            f"""[collector]
data_dir = "{tmp_path}"
[[alerts.wecom]]
key_file = "wecom.key"
url = "{world.rx.url("/wecom")}"
[[alerts.dingtalk]]
name = "ops-ding"
token_file = "ding.token"
secret_file = "ding.secret"
url = "{world.rx.url("/dingtalk")}"
[[alerts.webhook]]
url = "{bad.url("/hook")}"
"""
        )
        result = CliRunner().invoke(app, ["collector", "alert-test", "--config", str(cfg_file)])
        lines = result.output.splitlines()
        assert result.exit_code == 1, result.output
        assert any(line.startswith("wecom-1") and "sent" in line for line in lines), lines
        assert any(line.startswith("ops-ding") and "sent" in line for line in lines), lines
        assert any(line.startswith("webhook-1") and "FAILED: HTTP 500" in line for line in lines), lines
        assert "测试" in world.rx.texts()[0]
        assert WECOM_KEY not in result.output and DING_SECRET not in result.output
    finally:
        bad.close()


def test_coverage_under_the_threshold_fires_for_the_day_and_recovers(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labmeter.collector.ledger.rollup import Calendar
    from tests.lab import store_schedule

    cal = Calendar(ZoneInfo("Asia/Shanghai"))
    d0 = cal.day_floor(T0)
    d1, d2 = cal.next_day(d0), cal.next_day(cal.next_day(d0))
    store_schedule(world.tmp, world.ledger, AGENT, CODE, [(d0, d1, "RUNNING")])  # all of d0, none of d1
    store_schedule(
        world.tmp, world.ledger, "pc-2", "XRD-2", [(d0, d0 + 6 * 3_600_000, "OFF"), (d1, d2, "OFF")]
    )
    cfg = config.replace(
        world.cfg(), agent_silent_min=0, unknown_min=0, no_intervals_min=0, coverage_below_pct=80
    )
    al = world.alerter(cfg)
    assert al.evaluate(d1 + 30 * MIN) == 0, "a day is judged an hour after it ends"
    monkeypatch.setattr(alerts, "COVERAGE_REFRESH_STEPS", 0)
    assert al.evaluate(d1 + 61 * MIN) == 0, "stale rollups: judged later, not from them"
    monkeypatch.undo()
    assert al.evaluate(d1 + 62 * MIN) == 3  # XRD-2 covered 25 % of d0; ICP-01 all of it
    assert al.evaluate(d1 + 120 * MIN) == 0
    deliver(al)
    day0 = datetime.fromtimestamp(d0 / 1000, ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%d")
    assert all("XRD-2" in t and day0 in t and "25.0%" in t and "80%" in t for t in world.rx.texts())
    assert al.evaluate(d2 + 61 * MIN) == 6  # d1: ICP-01 uncovered (fires), XRD-2 covered (recovers)
    deliver(al)
    later = world.rx.texts()[3:]
    assert sum("ICP-01" in t and "告警" in t for t in later) == 3
    assert sum("XRD-2" in t and "恢复" in t and "100.0%" in t for t in later) == 3


def test_the_running_collector_alerts_once_across_a_restart(tmp_path: Path) -> None:
    """`collector run` with [alerts]: both registered agents are silent; the alert is sent once, and a
    restarted collector sends it no second time."""
    lab = make_lab(tmp_path)
    rx = WebhookReceiver()
    text = f"""[collector]
data_dir = "{tmp_path / "collector"}"
[broker]
embedded = true
listen = "127.0.0.1:{free_port()}"
[alerts]
check_every_s = 1
agent_silent_min = 0.01
unknown_min = 0
no_intervals_min = 0
[[alerts.webhook]]
url = "{rx.url("/hook")}"
"""
    cfg = config.parse(text, config.CollectorConfig)
    del lab

    async def run_for(seconds: float, until_hits: int | None = None) -> None:
        c = Collector(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(c.run(stop))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and (until_hits is None or len(rx.hits) < until_hits):
            await asyncio.sleep(0.1)
        stop.set()
        await task

    try:
        asyncio.run(run_for(15, until_hits=2))
        assert sorted(h.body["key"] for h in rx.hits) == ["agent_silent:agent-a", "agent_silent:agent-b"]
        asyncio.run(run_for(1.5))  # it assesses at once on start, then every second
        assert len(rx.hits) == 2, [h.body["key"] for h in rx.hits]
    finally:
        rx.close()


def test_a_reminder_only_when_asked_for(world: World) -> None:
    cfg = config.replace(_config_with_only(world, "unknown"), remind_h=2)
    al = world.alerter(cfg)
    _unknown_setup(world)
    assert al.evaluate(T0 + 30 * MIN) == 3
    assert al.evaluate(T0 + 149 * MIN) == 0
    assert al.evaluate(T0 + 150 * MIN) == 3  # two hours after it was sent
    assert al.evaluate(T0 + 151 * MIN) == 0
    deliver(al)
    events = [h.body["event"] for h in world.rx.hits if h.path == "/hook"]
    assert events == ["firing", "reminder"]
    assert "仍在告警" in world.rx.texts()[-1]


def test_a_missing_secret_file_stops_start_up_naming_it(world: World) -> None:
    cfg = world.cfg()
    (world.tmp / "ding.secret").unlink()
    full = config.replace(
        config.parse(f'[collector]\ndata_dir = "{world.tmp}"\n', config.CollectorConfig), alerts=cfg
    )
    with pytest.raises(config.ConfigError, match=r"ding\.secret: cannot read alerts dingtalk-1 secret file"):
        config.check_secret_files(full)


def test_turning_a_rule_off_clears_its_alerts_without_a_message(world: World) -> None:
    al = world.alerter(_config_with_only(world, "agent_silent"))
    assert al.evaluate(T0 + 10 * MIN) == 3
    world.reopen()
    al2 = world.alerter(config.replace(_config_with_only(world, "agent_silent"), agent_silent_min=0))
    assert al2.evaluate(T0 + 11 * MIN) == 0 and al2.active == {} and world.ledger.active_alerts() == []
