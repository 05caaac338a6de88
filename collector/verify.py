"""Every message is checked before it can count: topic, size, envelope, agent, key, signature, schema, time."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
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
class OpenState:
    agent: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Status:
    agent: str
    online: bool
    body: dict[str, Any]


class Verifier:
    """Holds the registry snapshot (keys, enrolments); refreshes it when it meets a newcomer."""

    def __init__(self, ledger: Ledger, clock: Clock, max_future_s: float) -> None:
        self.ledger = ledger
        self.clock = clock
        self.max_future_ms = int(max_future_s * 1000)
        self.keys: dict[str, tuple[Ed25519PublicKey, str]] = {}
        self.enrolled: set[tuple[str, str]] = set()
        self._loaded = 0.0
        self.reload()

    def reload(self) -> None:
        self.keys = {
            a: (signing.parse_public_key(k), kid) for a, (k, kid) in self.ledger.agent_keys().items()
        }
        self.enrolled = self.ledger.enrolments()
        self._loaded = time.monotonic()

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._loaded > RELOAD_EVERY_S:
            self.reload()

    def check(self, topic: str, payload: bytes) -> Accepted | OpenState | Status:
        try:
            t = wire.parse_topic(topic)
        except wire.WireError as exc:
            raise Rejected(Rejection(str(exc), topic, payload)) from None
        if t.kind == "status" and t.instrument is None:
            return self._status(t.agent, payload)
        if t.instrument is None or t.kind not in ("interval", "open"):
            raise Rejected(Rejection(f"unknown message kind {t.kind!r}", topic, payload, t.agent))
        try:
            env = wire.open_envelope(payload)
        except wire.WireError as exc:
            raise Rejected(Rejection(str(exc), topic, payload, t.agent, t.instrument)) from None
        seq, sha = _peek_seq(env.body), wire.body_hash(env.body)

        def reject(reason: str, authentic: bool) -> Rejected:
            return Rejected(Rejection(reason, topic, payload, t.agent, t.instrument, seq, authentic, sha))

        if t.agent not in self.keys:
            self._maybe_reload()
            if t.agent not in self.keys:
                raise reject(
                    f"unknown agent {t.agent!r}: register it with `labmeter collector add-agent`", False
                )
        key, kid = self.keys[t.agent]
        if env.kid != kid:
            raise reject(f"key id {env.kid!r} is not the key registered for agent {t.agent!r}", False)
        if not signing.verify(key, env.body.encode(), env.sig):
            raise reject("bad signature", False)
        try:
            body = wire.load_body(env.body)
            if body.get("agent") != t.agent or body.get("instrument") != t.instrument:
                raise wire.WireError("body agent/instrument do not match the topic")
            if t.kind == "open":
                return OpenState(t.agent, body)
            iv = wire.parse_interval(body)
        except wire.WireError as exc:
            raise reject(str(exc), True) from None
        if (t.agent, t.instrument) not in self.enrolled:
            self._maybe_reload()
            if (t.agent, t.instrument) not in self.enrolled:
                raise reject(f"instrument {t.instrument!r} is not enrolled for agent {t.agent!r}", True)
        now = self.clock.wall_ms()
        if iv.start < EARLIEST_MS:
            raise reject(f"start {iv.start} is before 2000-01-01", True)
        if iv.end > now + self.max_future_ms:
            raise reject(f"end is {(iv.end - now) / 1000:.0f} s in the future", True)
        stored = StoredInterval(
            iv.agent,
            iv.instrument,
            iv.seq,
            iv.start,
            iv.end,
            iv.state,
            iv.prev,
            sha,
            iv.clock_step_ms,
            payload,
        )
        return Accepted(stored, iv.note)

    def _status(self, agent: str, payload: bytes) -> Status:
        if payload.strip() == b"offline":
            return Status(agent, False, {})
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise Rejected(
                Rejection(f"status is not JSON: {exc}", wire.status_topic(agent), payload, agent)
            ) from None
        return Status(agent, body.get("status") == "online", body)


def _peek_seq(body_text: str) -> int | None:
    try:
        seq = json.loads(body_text).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None
