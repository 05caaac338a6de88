"""Alerts: rules over the live state and the ledger, sent to group robots, webhooks and e-mail.

An alert is a key (rule and subject, ``agent_silent:lab-pc-1``). It fires once when its condition has
held long enough and sends one recovery when it stops holding; in between nothing is repeated (unless
``remind_h`` asks for it). Which alerts are active and the messages not yet delivered live in the ledger,
written in one transaction, so a restarted collector neither sends an alert again nor forgets the recovery
of one it sent. Only verified state counts: an unsigned status can neither raise nor clear an alert.

Delivery runs on one task per channel, in order, with retries and backoff and a bounded queue per
channel; ingest never waits for it. Secrets (robot keys, tokens, passwords) are read with
``config.read_secret``, so no log line shows them, and URLs are never logged, only the channel's name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import smtplib
import socket
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

from labmeter import config
from labmeter.collector.ledger import ActiveAlert, Ledger
from labmeter.collector.ledger.rollup import Calendar, Rollups
from labmeter.config import (
    AlertChannel,
    AlertsConfig,
    DingtalkChannel,
    EmailChannel,
    PolicyConfig,
    WebhookChannel,
    WecomChannel,
)
from labmeter.log import hide, printable, redact
from labmeter.machine_hours import HOUR_MS

if TYPE_CHECKING:
    import aiohttp

    from labmeter.collector.service import LiveState

log = logging.getLogger("labmeter.alerts")

MIN_MS = 60_000
MAX_QUEUED = 200
"""Undelivered messages kept per channel; past it the oldest go (a receiver down for days must not grow
the ledger without end)."""
MAX_ACTIVE = 20_000
SEND_TIMEOUT_S = 15.0
MAX_BACKOFF_S = 600.0
GROUP_AT = 5  # more alerts than this of one rule in one check go out as one message
GROUP_SHOWN = 20
GROUP_KEYS = 500
ROBOT_TEXT_BYTES = 2000  # WeCom takes at most 2048 bytes of text content
COVERAGE_REFRESH_STEPS = 4  # rollup transactions the check may do itself; the collector's task does the rest
COVERAGE_AFTER_MS = HOUR_MS  # a day's coverage is judged an hour after it ends: late intervals come in

RULES = ("agent_silent", "unknown", "no_intervals", "coverage")
NAMES = {
    "zh-CN": {
        "agent_silent": "采集代理无消息",
        "unknown": "仪器状态未知",
        "no_intervals": "无区间入库",
        "coverage": "数据覆盖率低",
        "test": "测试消息",
    },
    "en": {
        "agent_silent": "agent silent",
        "unknown": "instrument state unknown",
        "no_intervals": "no intervals stored",
        "coverage": "low data coverage",
        "test": "test message",
    },
}
EVENTS = {
    "zh-CN": {"firing": "告警", "resolved": "恢复", "reminder": "仍在告警", "test": "测试"},
    "en": {"firing": "ALERT", "resolved": "RESOLVED", "reminder": "STILL FIRING", "test": "TEST"},
}
TEXTS = {
    "zh-CN": {
        (
            "agent_silent",
            "firing",
        ): "采集代理 {agent} 自 {since} 起没有消息（已 {duration}）。其仪器：{instruments}",
        (
            "agent_silent",
            "resolved",
        ): "采集代理 {agent} 已恢复（{at}），中断 {duration}。其仪器：{instruments}",
        ("unknown", "firing"): "仪器 {instrument} 自 {since} 起状态为 UNKNOWN（已 {duration}）。",
        ("unknown", "resolved"): "仪器 {instrument} 已不再是 UNKNOWN（{at}），持续了 {duration}。",
        ("no_intervals", "firing"): (
            "采集器 {host} 自 {since} 起没有存入任何区间（已 {duration}）：请检查采集器、MQTT 代理和采集代理。"
        ),
        ("no_intervals", "resolved"): "采集器 {host} 已重新存入区间（{at}），中断 {duration}。",
        ("coverage", "firing"): "仪器 {instrument} 在 {day} 的数据覆盖率为 {pct}%，低于 {threshold}%。",
        (
            "coverage",
            "resolved",
        ): "仪器 {instrument} 在 {day} 的数据覆盖率为 {pct}%，已恢复到 {threshold}% 以上。",
        ("test", "test"): "这是 labmeter 采集器 {host} 在 {at} 发出的测试消息：收到即说明此通道可用。",
    },
    "en": {
        (
            "agent_silent",
            "firing",
        ): "Agent {agent} has sent nothing since {since} ({duration}). Its instruments: {instruments}",
        (
            "agent_silent",
            "resolved",
        ): "Agent {agent} is heard from again ({at}) after {duration}. Its instruments: {instruments}",
        ("unknown", "firing"): "Instrument {instrument} has been UNKNOWN since {since} ({duration}).",
        (
            "unknown",
            "resolved",
        ): "Instrument {instrument} is no longer UNKNOWN ({at}); it was for {duration}.",
        ("no_intervals", "firing"): (
            "The collector on {host} has stored no interval since {since} ({duration}): check the collector, "
            "the MQTT broker and the agents."
        ),
        (
            "no_intervals",
            "resolved",
        ): "The collector on {host} stores intervals again ({at}) after {duration}.",
        (
            "coverage",
            "firing",
        ): "Instrument {instrument} had {pct}% data coverage on {day}, below {threshold}%.",
        (
            "coverage",
            "resolved",
        ): "Instrument {instrument} had {pct}% data coverage on {day}, back above {threshold}%.",
        ("test", "test"): "A test message from the labmeter collector on {host} at {at}: this channel works.",
    },
}


class Clock(Protocol):
    def wall_ms(self) -> int: ...


class DeliveryError(Exception):
    """A channel refused or could not take a message; the text is safe to log (no secret, no URL)."""


@dataclass(frozen=True)
class Assessment:
    """What a rule found for one subject now: ``holding`` is whether the alert condition holds."""

    key: str
    rule: str
    holding: bool
    since_ms: int
    subject: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False
    """Cleared without a recovery message: the subject left the registry, or its rule was turned off."""


@dataclass(frozen=True)
class Message:
    """One alert event as every channel gets it; ``body`` of the generic webhook is ``asdict`` of it."""

    event: str  # firing | resolved | reminder | test
    rule: str
    key: str
    title: str
    text: str
    at_ms: int
    since_ms: int
    lang: str
    subject: dict[str, Any]

    def encode(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def decode(cls, body: str) -> Message:
        return cls(**json.loads(body))


# composing -------------------------------------------------------------------
def _time(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).strftime("%Y-%m-%d %H:%M (UTC%z)")


def _duration(ms: int, lang: str) -> str:
    minutes = max(0, ms) // MIN_MS
    h, m = divmod(minutes, 60)
    if lang == "en":
        return f"{h} h {m} min" if h else f"{m} min"
    return f"{h} 小时 {m} 分钟" if h else f"{m} 分钟"


def instrument_label(info: dict[str, Any], lang: str) -> str:
    """``CODE 名称（单位）``: code, name and owning unit, the parts that are set."""
    code, name, unit = (printable(info.get(k) or "")[:80] for k in ("code", "name", "unit"))
    text = " ".join(p for p in (code, name) if p)
    if unit:
        text += f"（{unit}）" if lang == "zh-CN" else f" ({unit})"
    return text


def compose(
    event: str,
    rule: str,
    key: str,
    since_ms: int,
    at_ms: int,
    subject: dict[str, Any],
    lang: str,
    tz: ZoneInfo,
) -> Message:
    kind = "test" if event == "test" else ("firing" if event == "reminder" else event)
    sep = "，" if lang == "zh-CN" else ", "
    values = {
        "host": printable(socket.gethostname())[:64],
        "since": _time(since_ms, tz),
        "at": _time(at_ms, tz),
        "duration": _duration(at_ms - since_ms, lang),
        "agent": printable(subject.get("agent", ""))[:64],
        "instrument": instrument_label(subject, lang),
        "instruments": sep.join(instrument_label(i, lang) for i in subject.get("instruments", [])[:10])
        or "-",
        "day": subject.get("day", ""),
        "pct": subject.get("pct", ""),
        "threshold": subject.get("threshold", ""),
    }
    detail = TEXTS[lang][(rule, kind)].format(**values)
    who = values["agent"] or values["instrument"] or values["host"]
    title = f"[labmeter] {EVENTS[lang][event]}: {NAMES[lang][rule]} {who}".rstrip()
    return Message(event, rule, key, title, f"{title}\n{detail}", at_ms, since_ms, lang, subject)


# channels --------------------------------------------------------------------
class Sender(Protocol):
    kind: str

    async def send(self, msg: Message, session: aiohttp.ClientSession) -> None: ...


def _trim(text: str, limit: int = ROBOT_TEXT_BYTES) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[: limit - 3].decode(errors="ignore") + "..."


def _reason(exc: BaseException) -> str:
    text = printable(str(exc)).strip()
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:200]


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> Any:
    """POST JSON; any status but 2xx is an error. Returns the parsed JSON answer (None if it is not JSON)."""
    import aiohttp

    try:
        async with session.post(url, json=body, headers=headers, allow_redirects=False) as resp:
            raw = await resp.content.read(64 * 1024)
            if not 200 <= resp.status < 300:
                raise DeliveryError(f"HTTP {resp.status}")
    except aiohttp.ClientError as exc:
        raise DeliveryError(_reason(exc)) from None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _robot_answer(answer: Any) -> None:
    """WeCom and DingTalk answer 200 with ``errcode`` 0 on success and another errcode on refusal."""
    if not isinstance(answer, dict) or answer.get("errcode") != 0:
        code = answer.get("errcode") if isinstance(answer, dict) else None
        msg = printable(answer.get("errmsg", ""))[:120] if isinstance(answer, dict) else "not JSON"
        raise DeliveryError(f"refused: errcode {code!r} {redact(msg)}")


class WebhookSender:
    kind = "webhook"

    def __init__(self, ch: WebhookChannel) -> None:
        self.url = ch.url
        token = config.read_secret(ch.token_file, "alerts webhook token file") if ch.token_file else None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        # a webhook URL often is its own secret (a key in the path or query): it never appears in a log line
        hide(ch.url)
        hide(urllib.parse.urlsplit(ch.url).path if len(urllib.parse.urlsplit(ch.url).path) > 8 else None)

    async def send(self, msg: Message, session: aiohttp.ClientSession) -> None:
        await _post(session, self.url, asdict(msg), self.headers)


class WecomSender:
    kind = "wecom"

    def __init__(self, ch: WecomChannel) -> None:
        key = config.read_secret(ch.key_file, "alerts WeCom key file")
        hide(urllib.parse.quote(key, safe=""))
        self.url = f"{ch.url}?key={urllib.parse.quote(key, safe='')}"

    async def send(self, msg: Message, session: aiohttp.ClientSession) -> None:
        body = {"msgtype": "text", "text": {"content": _trim(msg.text)}}
        _robot_answer(await _post(session, self.url, body, {}))


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's 加签: base64(HMAC-SHA256(key=secret, "timestamp\\nsecret")), URL-encoded."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return urllib.parse.quote_plus(base64.b64encode(digest))


class DingtalkSender:
    kind = "dingtalk"

    def __init__(self, ch: DingtalkChannel) -> None:
        self.base = ch.url
        self.token = config.read_secret(ch.token_file, "alerts DingTalk token file")
        hide(urllib.parse.quote(self.token, safe=""))
        self.secret = (
            config.read_secret(ch.secret_file, "alerts DingTalk secret file") if ch.secret_file else None
        )

    def url(self, now_ms: int) -> str:
        url = f"{self.base}?access_token={urllib.parse.quote(self.token, safe='')}"
        if self.secret:  # signed at sending time: DingTalk refuses a timestamp over an hour off
            url += f"&timestamp={now_ms}&sign={dingtalk_sign(self.secret, now_ms)}"
        return url

    async def send(self, msg: Message, session: aiohttp.ClientSession) -> None:
        body = {"msgtype": "text", "text": {"content": _trim(msg.text)}}
        _robot_answer(await _post(session, self.url(int(time.time() * 1000)), body, {}))


class EmailSender:
    kind = "email"

    def __init__(self, ch: EmailChannel) -> None:
        self.ch = ch
        self.password = (
            config.read_secret(ch.password_file, "alerts e-mail password file") if ch.password_file else None
        )

    def _send(self, mail: EmailMessage) -> None:
        ch = self.ch
        with smtplib.SMTP(ch.host, ch.port, timeout=SEND_TIMEOUT_S) as smtp:
            smtp.ehlo()
            if ch.starttls:
                smtp.starttls(context=ssl.create_default_context(cafile=ch.ca_file))
                smtp.ehlo()
            if ch.username and self.password is not None:
                smtp.login(ch.username, self.password)
            smtp.send_message(mail)

    async def send(self, msg: Message, session: aiohttp.ClientSession) -> None:
        mail = EmailMessage()
        mail["Subject"] = msg.title
        mail["From"] = self.ch.sender
        mail["To"] = ", ".join(self.ch.to)
        mail.set_content(msg.text)
        try:
            await asyncio.to_thread(self._send, mail)
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            raise DeliveryError(_reason(exc)) from None


SENDERS: dict[type[AlertChannel], Callable[[Any], Sender]] = {
    WebhookChannel: WebhookSender,
    WecomChannel: WecomSender,
    DingtalkChannel: DingtalkSender,
    EmailChannel: EmailSender,
}


def senders(cfg: AlertsConfig) -> dict[str, Sender]:
    """A sender per configured channel, by name; reads the secret files (ConfigError names a bad one)."""
    return {name: SENDERS[type(ch)](ch) for name, ch in cfg.channels()}


def http_session() -> aiohttp.ClientSession:
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S))


async def send_test(cfg: AlertsConfig, tz: ZoneInfo) -> list[tuple[str, str, str | None]]:
    """``alert-test``: one test message to each channel; (name, kind, error or None) per channel."""
    now = int(time.time() * 1000)
    msg = compose("test", "test", "test", now, now, {}, cfg.lang, tz)
    out: list[tuple[str, str, str | None]] = []
    async with http_session() as session:
        for name, sender in senders(cfg).items():
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S + 1):
                    await sender.send(msg, session)
                out.append((name, sender.kind, None))
            except DeliveryError as exc:
                out.append((name, sender.kind, str(exc)))
            except TimeoutError:
                out.append((name, sender.kind, f"no answer within {SEND_TIMEOUT_S:g} s"))
    return out


# rules and state -------------------------------------------------------------
class Alerter:
    """Assesses the rules every ``check_every_s`` and queues what changed; one delivery task per channel.

    Takes what it reads, not the collector: the ledger, the live state, the policy (time zone) and a
    count of stored intervals (``no_intervals`` watches it move, on the alerts' own clock).
    """

    def __init__(
        self,
        cfg: AlertsConfig,
        ledger: Ledger,
        live: LiveState,
        policy: PolicyConfig,
        clock: Clock,
        stored: Callable[[], int],
        channels: dict[str, Sender] | None = None,
        retry_s: float = 5.0,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.live = live
        self.policy = policy
        self.tz = ZoneInfo(policy.timezone)
        self.calendar = Calendar(self.tz)
        self.clock = clock
        self.stored = stored
        self.channels = senders(cfg) if channels is None else channels
        self.retry_s = retry_s
        self.started_ms = clock.wall_ms()
        self.active: dict[str, ActiveAlert] = {a.key: a for a in ledger.active_alerts(MAX_ACTIVE)}
        dropped = ledger.drop_alert_channels(self.channels)
        if dropped:
            log.warning("dropped %d undelivered alert message(s) of channels no longer configured", dropped)
        self._stored_seen = stored()
        before = self.active.get("no_intervals")  # nothing stored since before a restart: still silent
        self._last_stored = before.since_ms if before else self.started_ms
        self._coverage_day: int | None = None
        self._registry: dict[str, dict[str, Any]] | None = None
        self.counts: Counter[str] = Counter()
        """fired, resolved, reminded, delivered, failed (attempts), given_up, dropped_active."""
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._logged: dict[str, float] = {}

    # assessing ---------------------------------------------------------------
    def assess(self, now: int) -> list[Assessment]:
        """What each rule finds now: every subject whose condition holds, and every active alert's subject
        that the rule judged (a subject neither holding nor active is left out: nothing to do)."""
        cfg = self.cfg
        enrolled = self.ledger.enrolments()
        self._registry = None  # read once per check, and only if a message needs names
        out: list[Assessment] = []
        if cfg.agent_silent_min:
            out += self._agents(now, enrolled)
        if cfg.unknown_min:
            out += self._unknown(now)
        if cfg.no_intervals_min:
            out += self._no_intervals(now, enrolled)
        if cfg.coverage_below_pct:
            out += self._coverage(now, enrolled)
        on = {r for r, minutes in zip(RULES, self._limits(), strict=True) if minutes}
        out += [
            Assessment(k, a.rule, False, now, quiet=True) for k, a in self.active.items() if a.rule not in on
        ]
        return out

    def _limits(self) -> tuple[float, ...]:
        c = self.cfg
        return (c.agent_silent_min, c.unknown_min, c.no_intervals_min, c.coverage_below_pct)

    def _matters(self, holding: bool, active: ActiveAlert | None, now: int) -> bool:
        """Whether an assessment can change anything: a new alert, a recovery, or a reminder due."""
        if active is None:
            return holding
        return not holding or bool(self.cfg.remind_h and now - active.fired_ms >= self.cfg.remind_h * HOUR_MS)

    def _info(self, code: str) -> dict[str, str]:
        if self._registry is None:
            self._registry = self.ledger.instruments_by_code()
        info = self._registry.get(code, {})
        return {"code": code, "name": str(info.get("name") or ""), "unit": str(info.get("unit") or "")}

    def _agents(self, now: int, enrolled: set[tuple[str, str]]) -> list[Assessment]:
        """An agent is heard from by its verified "online" status; silence counts from then (or from this
        collector's start, for an agent not heard from since, unless it was already silent before)."""
        limit = self.cfg.agent_silent_min * MIN_MS
        registered = set(self.ledger.agent_keys())
        mine = {k.split(":", 1)[1] for k, a in self.active.items() if a.rule == "agent_silent"}
        codes_of: dict[str, list[str]] = {}
        for ag, code in sorted(enrolled):
            codes_of.setdefault(ag, []).append(code)
        out = []
        for agent in sorted(registered | mine):
            key = f"agent_silent:{agent}"
            if agent not in registered:  # removed from the registry: nothing left to wait for
                out.append(Assessment(key, "agent_silent", False, now, quiet=True))
                continue
            a = self.live.agents.get(agent) or {}
            received = a.get("received") if a.get("verified") is True else None
            heard = isinstance(received, int) and not isinstance(received, bool)
            active = self.active.get(key)
            # not heard from since this collector started: silent since then, or since before a restart
            since = int(received) if heard else (active.since_ms if active else self.started_ms)  # type: ignore[arg-type]
            online = heard and a.get("online") is True and now - since < limit
            holding = not online and now - since >= limit
            if not self._matters(holding, active, now):
                continue
            subject = {"agent": agent, "instruments": [self._info(c) for c in codes_of.get(agent, [])[:10]]}
            out.append(Assessment(key, "agent_silent", holding, since, subject))
        return out

    def _unknown(self, now: int) -> list[Assessment]:
        """Only instruments with live state are judged: after a restart an active alert waits for the
        instrument's next verified state rather than recovering for want of one."""
        limit = self.cfg.unknown_min * MIN_MS
        out = []
        for code, live in list(self.live.instruments.items()):
            start = live.get("start")
            if not isinstance(start, int) or isinstance(start, bool):
                continue
            holding = live.get("state") == "UNKNOWN" and now - start >= limit
            key = f"unknown:{code}"
            if self._matters(holding, self.active.get(key), now):
                out.append(Assessment(key, "unknown", holding, start, self._info(code)))
        return out

    def _no_intervals(self, now: int, enrolled: set[tuple[str, str]]) -> list[Assessment]:
        count = self.stored()
        if count != self._stored_seen:
            self._stored_seen, self._last_stored = count, now
        holding = bool(enrolled) and now - self._last_stored >= self.cfg.no_intervals_min * MIN_MS
        return [Assessment("no_intervals", "no_intervals", holding, self._last_stored)]

    def _coverage(self, now: int, enrolled: set[tuple[str, str]]) -> list[Assessment]:
        """Once a day, an hour after it ended: the share of the previous local day that enrolled
        instruments' stored intervals cover."""
        today = self.calendar.day_floor(now)
        day = self.calendar.day_floor(today - 1)
        if now < today + COVERAGE_AFTER_MS or self._coverage_day == day:
            return []
        rollups = Rollups(self.ledger, self.policy)
        rollups.refresh(steps=COVERAGE_REFRESH_STEPS, wait=False)
        if self.ledger.rollup_backlog():  # not current yet: judged at a later check, not from stale rollups
            return []
        totals = rollups.totals(day, today, ("covered_ms",))
        self._coverage_day = day
        threshold = self.cfg.coverage_below_pct
        label = datetime.fromtimestamp(day / 1000, self.tz).strftime("%Y-%m-%d")
        out = []
        for code in sorted({c for _, c in enrolled}):
            pct = 100 * totals.get(code, [0])[0] / (today - day)
            subject = {
                **self._info(code),
                "day": label,
                "pct": f"{pct:.1f}",
                "threshold": f"{threshold:g}",
            }
            out.append(Assessment(f"coverage:{code}", "coverage", pct < threshold, day, subject))
        return out

    # acting ------------------------------------------------------------------
    def evaluate(self, now: int | None = None) -> int:
        """Assess every rule, then record what fired, recovered or is due a reminder and queue its messages,
        all in one transaction; returns the messages queued (one per channel each)."""
        now = self.clock.wall_ms() if now is None else now
        remind_ms = self.cfg.remind_h * HOUR_MS
        events: dict[tuple[str, str], list[tuple[Assessment, ActiveAlert | None]]] = {}
        opened: list[ActiveAlert] = []
        closed: list[str] = []
        for a in self.assess(now):
            active = self.active.get(a.key)
            if a.holding and active is None:
                if len(self.active) + len(opened) >= MAX_ACTIVE:
                    self.counts["dropped_active"] += 1
                    continue
                event = "firing"
            elif a.holding and active is not None and remind_ms and now - active.fired_ms >= remind_ms:
                event = "reminder"
            elif not a.holding and active is not None:
                event = "resolved"
            else:
                continue
            if event == "resolved":
                closed.append(a.key)
            else:
                since = active.since_ms if active is not None else a.since_ms
                opened.append(
                    ActiveAlert(a.key, a.rule, since, now, json.dumps(a.subject, ensure_ascii=False))
                )
            if not a.quiet:
                events.setdefault((event, a.rule), []).append((a, active))
            self.counts[{"firing": "fired", "reminder": "reminded", "resolved": "resolved"}[event]] += 1
        if not opened and not closed:
            return 0
        messages = [
            m for (event, rule), items in events.items() for m in self._messages(event, rule, items, now)
        ]
        rows = [(name, m.encode()) for m in messages for name in self.channels]
        self.ledger.record_alerts(opened, closed, rows, now, MAX_QUEUED)
        for row in opened:
            self.active[row.key] = row
        for key in closed:
            del self.active[key]
        for m in messages:
            (log.info if m.event == "resolved" else log.warning)("alert %s: %s", m.event, m.title)
        self._notify()
        return len(rows)

    def _messages(
        self, event: str, rule: str, items: list[tuple[Assessment, ActiveAlert | None]], now: int
    ) -> list[Message]:
        """A message per alert; past GROUP_AT alike in one check (a broker outage silences every agent at
        once) one message naming them, so a group robot is not flooded nor its rate limit hit."""
        single = []
        for a, active in items:
            subject = a.subject
            if active is not None and event == "resolved":
                with contextlib.suppress(ValueError):
                    subject = {**json.loads(active.subject), **a.subject}
            since = active.since_ms if active is not None else a.since_ms
            single.append(compose(event, rule, a.key, since, now, subject, self.cfg.lang, self.tz))
        if len(single) <= GROUP_AT:
            return single
        lang = self.cfg.lang
        # one short line each (a robot takes 2,000 bytes): who, and since when
        shown = [
            f"- {printable(a.subject.get('agent', ''))[:64] or instrument_label(a.subject, lang)} "
            f"({_time(m.since_ms, self.tz)})"
            for (a, _), m in zip(items[:GROUP_SHOWN], single, strict=False)
        ]
        rest = len(single) - len(shown)
        if rest:
            shown.append(f"…另有 {rest} 项" if lang == "zh-CN" else f"... and {rest} more")
        title = f"[labmeter] {EVENTS[lang][event]}: {NAMES[lang][rule]} ×{len(single)}"
        subject = {"count": len(single), "keys": [m.key for m in single[:GROUP_KEYS]]}
        since = min(m.since_ms for m in single)
        return [
            Message(event, rule, f"{rule}:*", title, "\n".join([title, *shown]), now, since, lang, subject)
        ]

    # delivering --------------------------------------------------------------
    def _notify(self) -> None:
        for event in self._wake.values():
            event.set()

    def _log_limited(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -1e9) > 60:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[key] = now
            log.warning(msg, *args)

    async def deliver_one(self, name: str, session: aiohttp.ClientSession) -> bool | None:
        """Send the channel's oldest queued message: True sent, False failed (kept or given up), None idle."""
        item = self.ledger.next_alert_message(name)
        if item is None:
            return None
        sender = self.channels[name]
        try:
            msg = Message.decode(item.body)
        except (ValueError, TypeError):
            self.ledger.alert_done(item.id)
            return False
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S + 1):
                await sender.send(msg, session)
        except Exception as exc:  # a refusal, a timeout, or a sender's bug: counted against this message
            reason = (
                str(exc)
                if isinstance(exc, DeliveryError)
                else "no answer in time"
                if isinstance(exc, TimeoutError)
                else _reason(exc)
            )
            self.counts["failed"] += 1
            if item.attempts + 1 >= self.cfg.max_attempts:
                self.ledger.alert_done(item.id)
                self.counts["given_up"] += 1
                log.error(
                    "alert channel %s: gave up on a message after %d attempt(s) (%s): %s",
                    name,
                    item.attempts + 1,
                    reason,
                    msg.title,
                )
            else:
                self.ledger.alert_attempted(item.id)
                self._log_limited(
                    f"send:{name}", "alert channel %s: sending failed (%s); retrying", name, reason
                )
            return False
        self.ledger.alert_done(item.id)
        self.counts["delivered"] += 1
        return True

    def backoff_s(self, attempts: int) -> float:
        return float(min(MAX_BACKOFF_S, self.retry_s * 2 ** min(attempts, 20)))

    async def _channel(self, name: str, session: aiohttp.ClientSession) -> None:
        wake = self._wake[name]
        failures = 0
        while True:
            try:
                result = await self.deliver_one(name, session)
            except Exception:  # the ledger, or a bug: the channel goes on after a pause
                log.exception("alert channel %s: delivering failed", name)
                result = False
            if result is None:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await wake.wait()
            elif result is False:
                failures += 1
                await asyncio.sleep(self.backoff_s(failures - 1))
            else:
                failures = 0

    def queued(self) -> dict[str, int]:
        return self.ledger.alert_queue()

    async def start(self) -> None:
        self._session = http_session()
        for name in self.channels:
            self._wake[name] = asyncio.Event()
            self._wake[name].set()
            self._tasks.append(asyncio.create_task(self._channel(name, self._session), name=f"alerts-{name}"))

    async def run(self) -> None:
        """Assess on the alerts' cadence until cancelled; a failing check is logged and tried again."""
        await self.start()
        try:
            while True:
                try:
                    self.evaluate()
                except Exception:
                    log.exception("checking alert rules failed; trying again")
                await asyncio.sleep(self.cfg.check_every_s)
        finally:
            await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
