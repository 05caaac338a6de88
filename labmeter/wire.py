"""Wire format shared by agent, collector and ``labmeter verify``.

Topic ``labmeter/v1/<agent>/<instrument>/<kind>``; payload an envelope
``{"kid","body","sig"}`` where ``body`` is the exact JSON text that was signed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from labmeter import signing

VERSION = 1
ROOT = "labmeter/v1"
GENESIS = "0" * 64
MAX_PAYLOAD = 8192
MAX_INTERVAL_MS = 86_400_000
ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class State(StrEnum):
    OFF = "OFF"
    STANDBY = "STANDBY"
    RUNNING = "RUNNING"
    UNKNOWN = "UNKNOWN"


STATES = frozenset(s.value for s in State)


class WireError(ValueError):
    """A message that does not follow the wire format; ``reason`` is stored with the rejection."""


def interval_topic(agent: str, instrument: str) -> str:
    return f"{ROOT}/{agent}/{instrument}/interval"


def open_topic(agent: str, instrument: str) -> str:
    return f"{ROOT}/{agent}/{instrument}/open"


def status_topic(agent: str) -> str:
    return f"{ROOT}/{agent}/status"


def ack_topic(agent: str) -> str:
    return f"{ROOT}/{agent}/ack"


SUBSCRIPTIONS = (f"{ROOT}/+/+/interval", f"{ROOT}/+/+/open", f"{ROOT}/+/status")


@dataclass(frozen=True)
class Topic:
    agent: str
    instrument: str | None
    kind: str


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) == 5 and parts[0] == "labmeter" and parts[1] == "v1":
        return Topic(parts[2], parts[3], parts[4])
    if len(parts) == 4 and parts[0] == "labmeter" and parts[1] == "v1":
        return Topic(parts[2], None, parts[3])
    raise WireError(f"topic {topic!r} is not labmeter/v1/<agent>/<instrument>/<kind>")


def dump_body(body: dict[str, Any]) -> str:
    """Canonical body text: sorted keys, no spaces; this exact text is signed and hashed."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def body_hash(body_text: str) -> str:
    return hashlib.sha256(body_text.encode()).hexdigest()


def seal(key: signing.PrivateKey, kid: str, body_text: str) -> bytes:
    sig = signing.sign(key, body_text.encode())
    return json.dumps({"kid": kid, "body": body_text, "sig": sig}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Envelope:
    kid: str
    body: str
    sig: str


def open_envelope(payload: bytes) -> Envelope:
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("payload is not a JSON object")
    kid, body, sig = obj.get("kid"), obj.get("body"), obj.get("sig")
    if not (isinstance(kid, str) and isinstance(body, str) and isinstance(sig, str)):
        raise WireError("envelope needs string fields kid, body and sig")
    return Envelope(kid, body, sig)


@dataclass(frozen=True)
class Interval:
    """A closed interval ``[start, end)`` of one state, link ``seq`` in its instrument's chain."""

    agent: str
    instrument: str
    seq: int
    prev: str
    start: int
    end: int
    state: str
    note: str | None = None
    clock_step_ms: int = 0

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": VERSION,
            "kind": "interval",
            "agent": self.agent,
            "instrument": self.instrument,
            "seq": self.seq,
            "prev": self.prev,
            "start": self.start,
            "end": self.end,
            "state": self.state,
        }
        if self.note:
            out["note"] = self.note
        if self.clock_step_ms:
            out["clock_step_ms"] = self.clock_step_ms
        return out


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"body field {key!r} must be an integer")
    return value


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise WireError(f"body field {key!r} must be a string")
    return value


def load_body(body_text: str) -> dict[str, Any]:
    try:
        obj = json.loads(body_text)
    except ValueError as exc:
        raise WireError(f"body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("body is not a JSON object")
    if obj.get("v") != VERSION:
        raise WireError(f"body format version {obj.get('v')!r} is not {VERSION}")
    return obj


def parse_interval(obj: dict[str, Any]) -> Interval:
    """Schema and sanity checks that need no clock or ledger."""
    if obj.get("kind") != "interval":
        raise WireError("body kind is not 'interval'")
    iv = Interval(
        agent=_str(obj, "agent"),
        instrument=_str(obj, "instrument"),
        seq=_int(obj, "seq"),
        prev=_str(obj, "prev"),
        start=_int(obj, "start"),
        end=_int(obj, "end"),
        state=_str(obj, "state"),
        note=obj.get("note") if isinstance(obj.get("note"), str) else None,
        clock_step_ms=obj.get("clock_step_ms", 0) if isinstance(obj.get("clock_step_ms", 0), int) else 0,
    )
    if iv.seq < 1:
        raise WireError("seq must be >= 1")
    if len(iv.prev) != 64:
        raise WireError("prev must be a 64-character SHA-256 hex digest")
    if iv.state not in STATES:
        raise WireError(f"state {iv.state!r} is not one of {sorted(STATES)}")
    if iv.end <= iv.start:
        raise WireError(f"end {iv.end} is not after start {iv.start}")
    if iv.end - iv.start > MAX_INTERVAL_MS:
        raise WireError(f"interval of {iv.end - iv.start} ms is longer than a day")
    return iv


def ack_payload(acks: dict[str, int], rejects: list[dict[str, Any]]) -> bytes:
    return json.dumps({"v": VERSION, "acks": acks, "rejects": rejects}, separators=(",", ":")).encode()
