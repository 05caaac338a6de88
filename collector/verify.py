"""Every message is checked before it can count: topic, size, envelope, agent, key, signature, schema, time."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from labmeter.collector.ledger import Ledger, Rejection, StoredInterval

from labmeter import signing, wire
from labmeter.clock import Clock

log = logging.getLogger("labmeter.collector.verify")

EARLIEST_MS = 946_684_800_000  # 2000-01-01: anything older is a broken clock
RELOAD_EVERY_S = 2.0


class Rejected(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


@dataclass(frozen=True)
class Accepted:
    interval: StoredInterval
    note: str | None


@dataclass(frozen=True)
class AcceptedSignIn:
    signin: wire.SignIn
    sha: str
    envelope: bytes


@dataclass(frozen=True)
class OpenState:
    agent: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Status:
    """A status message: ``report`` is set only when it is a registered agent's, validly signed.

    ``problem`` says why not (kept out of the ledger: status carries no hours); ``registered`` lets the
    collector show an old agent's unsigned status as unverified without letting anyone add agents.
    """

    agent: str
    report: wire.AgentStatus | None
    problem: str = ""
    registered: bool = False

    @property
    def online(self) -> bool:
        return self.report is not None and self.report.online


@dataclass(slots=True)
class Pending:
    """A message that passed the cheap checks and waits for its signature check."""

    topic: str
    payload: bytes
    agent: str
    instrument: str
    kind: str
    env: wire.Envelope
    body: wire.Interval | wire.SignIn | dict[str, Any] | None
    body_error: wire.WireError | None
    seq: int | None
    sha: str
    checker: signing.SignatureChecker | None = None

    def signature_ok(self) -> bool:
        return self.checker is not None and self.checker(self.env.body.encode(), self.env.sig)

    def reject(self, reason: str, authentic: bool) -> Rejected:
        starts = isinstance(self.body, wire.Interval | wire.SignIn) and wire.starts_chain(self.body.prev)
        return Rejected(
            Rejection(
                reason,
                self.topic,
                self.payload,
                self.agent,
                self.instrument,
                self.seq,
                authentic,
                self.sha,
                authentic and starts,
            )
        )


class Verifier:
    """Holds the registry snapshot (keys, enrolments); refreshes it when it meets a newcomer."""

    def __init__(self, ledger: Ledger, clock: Clock, max_future_s: float) -> None:
        self.ledger = ledger
        self.clock = clock
        self.max_future_ms = int(max_future_s * 1000)
        self.keys: dict[str, tuple[signing.SignatureChecker, str]] = {}
        self.enrolled: set[tuple[str, str]] = set()
        self._loaded = 0.0
        self.reload()

    def reload(self) -> None:
        self.keys = {
            a: (signing.SignatureChecker(signing.parse_public_key(k)), kid)
            for a, (k, kid) in self.ledger.agent_keys().items()
        }
        self.enrolled = self.ledger.enrolments()
        self._loaded = time.monotonic()

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._loaded > RELOAD_EVERY_S:
            self.reload()

    def check(self, topic: str, payload: bytes) -> Accepted | AcceptedSignIn | OpenState | Status:
        """Verify one message (the batch path splits this in two around the signature checks)."""
        p = self.prepare(topic, payload)
        if isinstance(p, Status):
            return p
        return self.finish(p, p.signature_ok())

    def prepare(self, topic: str, payload: bytes) -> Pending | Status:
        """Everything before the signature check: topic, size, envelope, agent, key id."""
        try:
            t = wire.parse_topic(topic)
        except wire.WireError as exc:
            raise Rejected(Rejection(str(exc), topic, payload)) from None
        if t.kind == "status" and t.instrument is None:
            return self._status(t.agent, payload)
        if t.instrument is None or t.kind not in ("interval", "open", "signin"):
            raise Rejected(Rejection(f"unknown message kind {t.kind!r}", topic, payload, t.agent))
        try:
            env = wire.open_envelope(payload)
        except wire.WireError as exc:
            raise Rejected(Rejection(str(exc), topic, payload, t.agent, t.instrument)) from None
        body: wire.Interval | wire.SignIn | dict[str, Any] | None = None
        body_error: wire.WireError | None = None
        try:
            if t.kind == "interval":
                body = wire.decode_interval(env.body)
            elif t.kind == "signin":
                body = wire.decode_signin(env.body)
            else:
                body = wire.load_body(env.body)
        except wire.WireError as exc:
            body_error = exc
        p = Pending(
            topic,
            payload,
            t.agent,
            t.instrument,
            t.kind,
            env,
            body,
            body_error,
            _seq_of(body, env.body),
            wire.body_hash(env.body),
        )
        if t.agent not in self.keys:
            self._maybe_reload()
            if t.agent not in self.keys:
                raise p.reject(
                    f"unknown agent {t.agent!r}: register it with `labmeter collector add-agent`", False
                )
        p.checker, kid = self.keys[t.agent]
        if env.kid != kid:
            raise p.reject(f"key id {env.kid!r} is not the key registered for agent {t.agent!r}", False)
        return p

    def finish(self, p: Pending, signature_ok: bool) -> Accepted | AcceptedSignIn | OpenState:
        """Everything after the signature check: schema, enrolment, time sanity."""
        if not signature_ok:
            raise p.reject("bad signature", False)
        body = p.body
        try:
            if body is None:
                raise p.body_error or wire.WireError("body is not JSON")
            if isinstance(body, dict):
                if body.get("agent") != p.agent or body.get("instrument") != p.instrument:
                    raise wire.WireError("body agent/instrument do not match the topic")
                return OpenState(p.agent, body)
            if body.agent != p.agent or body.instrument != p.instrument:
                raise wire.WireError("body agent/instrument do not match the topic")
        except wire.WireError as exc:
            raise p.reject(str(exc), True) from None
        if isinstance(body, wire.SignIn):
            self._check_enrolled(p)
            if body.at > self.clock.wall_ms() + self.max_future_ms or body.at < EARLIEST_MS:
                raise p.reject(f"sign-in time {body.at} is not plausible", True)
            return AcceptedSignIn(body, p.sha, p.payload)
        iv = body
        self._check_enrolled(p)
        now = self.clock.wall_ms()
        if iv.start < EARLIEST_MS:
            raise p.reject(f"start {iv.start} is before 2000-01-01", True)
        if iv.end > now + self.max_future_ms:
            raise p.reject(f"end is {(iv.end - now) / 1000:.0f} s in the future", True)
        stored = StoredInterval.of(iv, p.sha, p.payload)
        return Accepted(stored, iv.note)

    def _check_enrolled(self, p: Pending) -> None:
        if (p.agent, p.instrument) not in self.enrolled:
            self._maybe_reload()
            if (p.agent, p.instrument) not in self.enrolled:
                raise p.reject(f"instrument {p.instrument!r} is not enrolled for agent {p.agent!r}", True)

    def _status(self, agent: str, payload: bytes) -> Status:
        """Check a status message; never raises: a bad one is a Status without a report."""
        if agent not in self.keys:
            self._maybe_reload()
            if agent not in self.keys:
                return Status(agent, None, "unknown agent")
        checker, kid = self.keys[agent]
        try:
            env = wire.open_envelope(payload)
        except wire.WireError:
            return Status(agent, None, "unsigned status (an agent from before signed status?)", True)
        if env.kid != kid or not checker(env.body.encode(), env.sig):
            return Status(agent, None, "status not signed by the agent's registered key", True)
        try:
            report = wire.decode_status(env.body)
        except wire.WireError as exc:
            return Status(agent, None, f"status body: {exc}", True)
        if report.agent != agent:
            return Status(agent, None, "status body names another agent", True)
        if report.at > self.clock.wall_ms() + self.max_future_ms:
            return Status(agent, None, "status time is in the future", True)
        return Status(agent, report, "", True)

    def check_power(self, topic: str, payload: bytes) -> wire.Power:
        """Verify a power message: topic, envelope, registered agent and key, signature, bounds, enrolment.

        Power carries no hours, so a rejection is only counted; nothing here touches the ledger.
        """
        try:
            t = wire.parse_topic(topic)
        except wire.WireError as exc:
            raise Rejected(Rejection(str(exc), topic, payload)) from None
        if t.instrument is None or t.kind != "power":
            raise Rejected(Rejection(f"unknown message kind: {t.kind!r}", topic, payload, t.agent))

        def reject(reason: str, authentic: bool = False) -> Rejected:
            return Rejected(Rejection(reason, topic, payload, t.agent, t.instrument, None, authentic))

        try:
            env = wire.open_envelope(payload)
        except wire.WireError as exc:
            raise reject(str(exc)) from None
        if t.agent not in self.keys:
            self._maybe_reload()
            if t.agent not in self.keys:
                raise reject(f"unknown agent: {t.agent!r}")
        checker, kid = self.keys[t.agent]
        if env.kid != kid or not checker(env.body.encode(), env.sig):
            raise reject("bad signature")
        try:
            p = wire.decode_power(env.body)
        except wire.WireError as exc:
            raise reject(str(exc), True) from None
        if p.agent != t.agent or p.instrument != t.instrument:
            raise reject("body agent/instrument do not match the topic", True)
        if (t.agent, t.instrument) not in self.enrolled:
            self._maybe_reload()
            if (t.agent, t.instrument) not in self.enrolled:
                raise reject(f"instrument not enrolled: {t.instrument!r} for agent {t.agent!r}", True)
        if p.start < EARLIEST_MS or p.end > self.clock.wall_ms() + self.max_future_ms:
            raise reject(f"implausible power window: {p.start}..{p.end}", True)
        return p


def _seq_of(body: wire.Interval | wire.SignIn | dict[str, Any] | None, text: str) -> int | None:
    """The seq a rejection is about, even from a body that failed its schema check."""
    if isinstance(body, wire.Interval | wire.SignIn):
        return body.seq
    if body is None:
        try:
            body = json.loads(text)
        except ValueError:
            return None
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
