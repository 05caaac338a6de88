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
from typing import Any, TypeVar

import msgspec

from labmeter import signing

VERSION = 1
ROOT = "labmeter/v1"
GENESIS = "0" * 64
MAX_PAYLOAD = 8192
MAX_INTERVAL_MS = 86_400_000
ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def chain_origin(now_ms: int) -> int:
    """The seq of a new chain's first link: the agent's clock in milliseconds, not 1.

    An agent whose state directory is lost (a re-imaged SD card) keeps its key
    but starts its chains again. Starting at the clock keeps every new chain's
    seqs above those of the agent's earlier chains (an agent cuts far fewer than
    one interval per millisecond), so nothing collides with what the ledger
    holds; ``prev = GENESIS`` declares the restart.
    """
    return max(now_ms, 1)


def starts_chain(prev: str) -> bool:
    return prev == GENESIS


CONFLICT = "conflict"
NOTE_AGENT_DOWN = "agent_down"  # an UNKNOWN interval for time the agent was not running


def conflict_reason(seq: int) -> str:
    """The reject reason for a seq the ledger holds with another body; agents begin a new chain on it."""
    return f"{CONFLICT}: a different body is already stored for seq {seq}"


def is_conflict(reason: str) -> bool:
    return reason.startswith(CONFLICT + ":")


def envelope_starts_chain(payload: bytes) -> bool:
    """Whether a stored envelope is a chain's first link; False for anything unreadable."""
    try:
        return starts_chain(str(load_body(open_envelope(payload).body).get("prev", "")))
    except WireError:
        return False


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


def signin_topic(agent: str, instrument: str) -> str:
    return f"{ROOT}/{agent}/{instrument}/signin"


def signin_chain(instrument: str) -> str:
    """Sign-ins form their own chain per instrument, acknowledged under this key."""
    return f"{instrument}@signin"


def status_topic(agent: str) -> str:
    return f"{ROOT}/{agent}/status"


def ack_topic(agent: str) -> str:
    return f"{ROOT}/{agent}/ack"


SUBSCRIPTIONS = (f"{ROOT}/+/+/interval", f"{ROOT}/+/+/open", f"{ROOT}/+/+/signin", f"{ROOT}/+/status")
LEDGER_TOPICS = (f"{ROOT}/+/+/interval", f"{ROOT}/+/+/signin")


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


def relink(body_text: str, seq: int, prev: str) -> str:
    """The same body as link ``seq`` after ``prev`` (moved to a new chain); every other field unchanged."""
    body = load_body(body_text)
    body["seq"], body["prev"] = seq, prev
    return dump_body(body)


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


class _EnvelopeShape(msgspec.Struct):
    kid: str
    body: str
    sig: str


_envelope_decoder = msgspec.json.Decoder(_EnvelopeShape)
_any_decoder = msgspec.json.Decoder()


def open_envelope(payload: bytes) -> Envelope:
    """Decode an envelope (msgspec: typed, in C; this is the collector's hot path)."""
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    try:
        e = _envelope_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        if str(exc).startswith("Expected `object`"):
            raise WireError("payload is not a JSON object") from None
        raise WireError(f"envelope needs string fields kid, body and sig ({exc})") from None
    except msgspec.DecodeError as exc:
        raise WireError(f"payload is not JSON: {exc}") from None
    return Envelope(e.kid, e.body, e.sig)


class Interval(msgspec.Struct, frozen=True):
    """A closed interval ``[start, end)`` of one state, link ``seq`` in its instrument's chain.

    A msgspec struct, so the collector decodes a body straight into it, types checked in C.
    """

    agent: str
    instrument: str
    seq: int
    prev: str
    start: int
    end: int
    state: str
    note: str | None = None
    clock_step_ms: int = 0
    v: int = VERSION
    kind: str = "interval"

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


_interval_decoder = msgspec.json.Decoder(Interval)


class SignIn(msgspec.Struct, frozen=True):
    """A user signed in at an instrument (card reader): ``user`` is a salted hash, never the card number."""

    agent: str
    instrument: str
    seq: int
    prev: str
    at: int
    user: str
    v: int = VERSION
    kind: str = "signin"

    def body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": "signin",
            "agent": self.agent,
            "instrument": self.instrument,
            "seq": self.seq,
            "prev": self.prev,
            "at": self.at,
            "user": self.user,
        }


_signin_decoder = msgspec.json.Decoder(SignIn)


T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], body_text: str) -> T:
    """Typed decoding; a wrong type or missing field and broken JSON become WireErrors with msgspec's path."""
    try:
        return decoder.decode(body_text)
    except msgspec.ValidationError as exc:
        raise WireError(f"body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise WireError(f"body is not JSON: {exc}") from None


def decode_signin(body_text: str) -> SignIn:
    si = _decode(_signin_decoder, body_text)
    if si.v != VERSION or si.kind != "signin":
        raise WireError("body is not a version-1 signin")
    if si.seq < 1 or len(si.prev) != 64 or not re.fullmatch(r"[0-9a-f]{16,64}", si.user):
        raise WireError("signin needs seq >= 1, a 64-hex prev and a hex user pseudonym")
    return si


def load_body(body_text: str) -> dict[str, Any]:
    try:
        obj = _any_decoder.decode(body_text)
    except msgspec.DecodeError as exc:
        raise WireError(f"body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("body is not a JSON object")
    if obj.get("v") != VERSION:
        raise WireError(f"body format version {obj.get('v')!r} is not {VERSION}")
    return obj


def decode_interval(body_text: str) -> Interval:
    """Body text to a checked Interval (the collector's hot path)."""
    return _checked(_decode(_interval_decoder, body_text))


def parse_interval(obj: dict[str, Any]) -> Interval:
    """A decoded body (dict) to a checked Interval."""
    try:
        iv = msgspec.convert(obj, Interval)
    except msgspec.ValidationError as exc:
        raise WireError(f"body: {exc}") from None
    return _checked(iv)


def _checked(iv: Interval) -> Interval:
    """Schema and sanity checks that need no clock or ledger."""
    if iv.v != VERSION:
        raise WireError(f"body format version {iv.v!r} is not {VERSION}")
    if iv.kind != "interval":
        raise WireError("body kind is not 'interval'")
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
