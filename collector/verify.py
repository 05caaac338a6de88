"""Every message is checked before it can count: topic, size, envelope, agent, key, signature, schema, time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from labmeter import signing, wire
from labmeter.clock import Clock
from labmeter.collector.ledger import Ledger, Rejection, StoredInterval

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
    body: wire.Interval | wire.SignIn | wire.OpenInterval | None
    body_error: wire.WireError | None
    seq: int | None
    sha: str
    checker: signing.SignatureChecker | None = None

    def signature_ok(self) -> bool:
        return self.checker is not None and self.checker(self.env.body.encode(), self.env.sig)

    def reject(self, reason: str, authentic: bool, answer: bool | None = None) -> Rejected:
        """``authentic``: signed by the enrolled key over a body naming this topic's agent, instrument and
        kind. Only such a rejection counts for a chain (its seq may move the acknowledgement watermark);
        one without a seq a ledger can hold counts for nothing."""
        authentic = authentic and self.seq is not None and self.kind in ("interval", "signin")
        starts = isinstance(self.body, wire.Interval | wire.SignIn) and wire.starts_chain(self.body.prev)
        chain = None
        if authentic:
            chain = wire.signin_chain(self.instrument) if self.kind == "signin" else self.instrument
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
                chain,
                authentic if answer is None else answer,
            )
        )

    def names_topic(self) -> bool:
        """Whether the body (typed, or raw when it failed its schema) names this topic's agent, instrument, kind."""
        body = self.body
        if body is not None:
            return body.agent == self.agent and body.instrument == self.instrument and body.kind == self.kind
        raw = wire.raw_body(self.env.body)
        return (
            raw is not None
            and raw.get("agent") == self.agent
            and raw.get("instrument") == self.instrument
            and raw.get("kind", self.kind) == self.kind
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
            raise Rejected(Rejection(f"unknown message kind {t.kind[:40]!r}", topic, payload))
        if not wire.ID_RE.fullmatch(t.agent) or not wire.ID_RE.fullmatch(t.instrument):
            raise Rejected(
                Rejection("topic agent and instrument must be [A-Za-z0-9._-]{1,64}", topic, payload)
            )
        try:
            env = wire.open_envelope(payload)
        except wire.WireError as exc:
            raise Rejected(Rejection(str(exc), topic, payload, t.agent, t.instrument)) from None
        body: wire.Interval | wire.SignIn | wire.OpenInterval | None = None
        body_error: wire.WireError | None = None
        try:
            if t.kind == "interval":
                body = wire.decode_interval(env.body)
            elif t.kind == "signin":
                body = wire.decode_signin(env.body)
            else:
                body = wire.decode_open(env.body)
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
                # answered: with no key to check, a copy of the agent's message gets the same answer as the message
                raise p.reject(
                    f"unknown agent {t.agent!r}: register it with `labmeter collector add-agent`",
                    False,
                    answer=True,
                )
        p.checker, kid = self.keys[t.agent]
        if env.kid != kid:
            raise p.reject(f"key id {env.kid!r} is not the key registered for agent {t.agent!r}", False)
        return p

    def finish(self, p: Pending, signature_ok: bool) -> Accepted | AcceptedSignIn | OpenState:
        """Everything after the signature check: topic, body and enrolment agree; then schema and time.

        Until the first two hold, a rejection is unauthenticated (a genuine body replayed on another
        instrument's topic is the attacker's message, not the agent's) and counts for no chain."""
        if not signature_ok:
            raise p.reject("bad signature", False)
        if not p.names_topic():
            if p.body is None and wire.raw_body(p.env.body) is None:
                raise p.reject(str(p.body_error or wire.WireError("body is not a JSON object")), False)
            raise p.reject("body agent/instrument/kind do not match the topic", False)
        self._check_enrolled(p)
        body = p.body
        if body is None:
            raise p.reject(str(p.body_error or wire.WireError("body is not JSON")), True)
        now = self.clock.wall_ms()
        if isinstance(body, wire.OpenInterval):
            if body.start < EARLIEST_MS or body.start > now + self.max_future_ms:
                raise p.reject(f"open interval start {body.start} is not plausible", False)
            return OpenState(p.agent, body.live())
        if isinstance(body, wire.SignIn):
            if body.at > now + self.max_future_ms or body.at < EARLIEST_MS:
                raise p.reject(f"sign-in time {body.at} is not plausible", True)
            return AcceptedSignIn(body, p.sha, p.payload)
        iv = body
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
                raise p.reject(
                    f"instrument {p.instrument!r} is not enrolled for agent {p.agent!r}", False, answer=True
                )

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


def _seq_of(body: wire.Interval | wire.SignIn | wire.OpenInterval | None, text: str) -> int | None:
    """The seq a rejection is about, even from a body that failed its schema check; None unless a ledger
    can hold it."""
    if isinstance(body, wire.Interval | wire.SignIn):
        return body.seq
    if isinstance(body, wire.OpenInterval):
        return None
    raw = wire.raw_body(text)
    return wire.bounded_seq(raw.get("seq")) if raw is not None else None
