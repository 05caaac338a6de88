"""Wire format shared by agent, collector and ``labmeter verify``.

Topic ``labmeter/v1/<agent>/<instrument>/<kind>``; payload an envelope
``{"kid","body","sig"}`` where ``body`` is the exact JSON text that was signed.
"""

from __future__ import annotations

import hashlib
import json
import math
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
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
# Bounds every body is checked against before anything touches the ledger: well inside signed 64 bits
# (SQLite INTEGER, PostgreSQL BIGINT) and inside what a JSON reader keeps exact (2**53), with room for
# the ledger's seq +/- 1 arithmetic.
MAX_SEQ = 2**53 - 1
MAX_TIME_MS = 253_402_300_800_000  # 10000-01-01: times are checked against the clock later, this bounds type
MAX_NOTE = 200
MAX_ERROR = 200
MAX_POWER_W = 1e9


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


SUBSCRIPTIONS = (
    f"{ROOT}/+/+/interval",
    f"{ROOT}/+/+/open",
    f"{ROOT}/+/+/signin",
    f"{ROOT}/+/status",
    f"{ROOT}/+/+/power",  # telemetry, see Power at the end
)
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
    ``energy_wh``: the energy used in the interval, measured by the agent; absent (None) where it could
    not be measured and in bodies from agents before energy, which stay version 1 (docs/decisions.md).
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
    energy_wh: float | None = None
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
        if self.energy_wh is not None:
            out["energy_wh"] = self.energy_wh
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
    _ids(si.agent, si.instrument)
    _link(si.seq, si.prev)
    _time("at", si.at)
    if not re.fullmatch(r"[0-9a-f]{16,64}", si.user):
        raise WireError("signin needs a hex user pseudonym of 16-64 characters")
    return si


class OpenInterval(msgspec.Struct, frozen=True):
    """The provisional current interval, for live views only: never stored, never counted."""

    agent: str
    instrument: str
    start: int
    state: str
    at: int
    power_w: float | None = None
    error: str | None = None
    v: int = VERSION
    kind: str = "open"

    def live(self) -> dict[str, Any]:
        """The fields a live view shows; nothing the sender added beyond them."""
        out: dict[str, Any] = {
            "agent": self.agent,
            "instrument": self.instrument,
            "start": self.start,
            "state": self.state,
            "at": self.at,
        }
        if self.power_w is not None:
            out["power_w"] = self.power_w
        if self.error is not None:
            out["error"] = self.error
        return out


_open_decoder = msgspec.json.Decoder(OpenInterval)


def decode_open(body_text: str) -> OpenInterval:
    """An ``open`` body, typed and bounded like the others (the live view shows what passes here)."""
    op = _decode(_open_decoder, body_text)
    if op.v != VERSION or op.kind != "open":
        raise WireError("body is not a version-1 open interval")
    _ids(op.agent, op.instrument)
    if op.state not in STATES:
        raise WireError(f"state {op.state[:20]!r} is not one of {sorted(STATES)}")
    _time("start", op.start)
    _time("at", op.at)
    if op.power_w is not None and not -MAX_POWER_W <= op.power_w <= MAX_POWER_W:
        raise WireError("power_w is not a plausible power")
    if op.error is not None and len(op.error) > MAX_ERROR:
        raise WireError(f"error is longer than {MAX_ERROR} characters")
    return op


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


def raw_body(body_text: str) -> dict[str, Any] | None:
    """Any JSON object, unchecked, or None: what a rejection reads its agent, instrument and seq from."""
    try:
        obj = _any_decoder.decode(body_text)
    except (msgspec.DecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def bounded_seq(value: object) -> int | None:
    """``value`` if it is a seq a ledger can hold, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEQ:
        return value
    return None


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


def _ids(agent: str, instrument: str) -> None:
    if not ID_RE.fullmatch(agent) or not ID_RE.fullmatch(instrument):
        raise WireError("body agent and instrument must be 1-64 characters of [A-Za-z0-9._-]")


def _link(seq: int, prev: str) -> None:
    if not 1 <= seq <= MAX_SEQ:
        raise WireError(f"seq must be between 1 and {MAX_SEQ}")
    if not HEX64_RE.fullmatch(prev):
        raise WireError("prev must be a 64-character SHA-256 hex digest")


def _time(name: str, ms: int) -> None:
    if not 0 <= ms <= MAX_TIME_MS:
        raise WireError(f"{name} must be between 0 and {MAX_TIME_MS} ms")


def _checked(iv: Interval) -> Interval:
    """Schema and sanity checks that need no clock or ledger; every integer in range, every string capped."""
    if iv.v != VERSION:
        raise WireError(f"body format version {iv.v!r} is not {VERSION}")
    if iv.kind != "interval":
        raise WireError("body kind is not 'interval'")
    _ids(iv.agent, iv.instrument)
    _link(iv.seq, iv.prev)
    _time("start", iv.start)
    _time("end", iv.end)
    if not -MAX_TIME_MS <= iv.clock_step_ms <= MAX_TIME_MS:
        raise WireError(f"clock_step_ms must be within +/-{MAX_TIME_MS}")
    if iv.note is not None and len(iv.note) > MAX_NOTE:
        raise WireError(f"note is longer than {MAX_NOTE} characters")
    if iv.state not in STATES:
        raise WireError(f"state {iv.state[:20]!r} is not one of {sorted(STATES)}")
    if iv.end <= iv.start:
        raise WireError(f"end {iv.end} is not after start {iv.start}")
    if iv.end - iv.start > MAX_INTERVAL_MS:
        raise WireError(f"interval of {iv.end - iv.start} ms is longer than a day")
    if iv.energy_wh is not None:
        check_energy("interval", iv.energy_wh, iv.end - iv.start)
    return iv


def check_energy(what: str, energy_wh: float, length_ms: int) -> None:
    """Energy of a window or interval: finite, not negative, at most MAX_POWER_W for its whole length."""
    most = max_window_energy_wh(length_ms)
    if not (math.isfinite(energy_wh) and 0 <= energy_wh <= most):
        raise WireError(
            f"energy_wh must be within 0 .. {most:.0f} Wh (at most {MAX_POWER_W:.0f} W for the {what}'s "
            f"{length_ms} ms), not {energy_wh!r}"
        )


# Control path: signed acknowledgements (collector -> agent) and signed status (agent -> collector) ------

MAX_SEQ = 2**63 - 1
MAX_REASON = 200
CHAIN_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}(@signin)?$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
STATUSES = ("online", "offline")


class AckEntry(msgspec.Struct, frozen=True):
    """The collector holds every link of a chain up to ``seq``, and at ``seq`` the body hashing to ``sha256``.

    The hash ties the ack to one body: an agent deletes up to ``seq`` only if its own row there is that
    body, so an ack recorded and replayed later (after a state restore re-used the seqs) deletes nothing.
    """

    seq: int
    sha256: str


class AckReject(msgspec.Struct, frozen=True):
    instrument: str
    seq: int
    sha256: str
    reason: str


class Ack(msgspec.Struct, frozen=True):
    """An acknowledgement body, signed with the collector's key; ``key`` lets an unpinned agent pin it."""

    agent: str
    at: int
    key: str
    acks: dict[str, AckEntry] = msgspec.field(default_factory=dict)
    rejects: list[AckReject] = msgspec.field(default_factory=list)
    v: int = VERSION
    kind: str = "ack"

    def body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": "ack",
            "agent": self.agent,
            "at": self.at,
            "key": self.key,
            "acks": {c: {"seq": e.seq, "sha256": e.sha256} for c, e in self.acks.items()},
            "rejects": [
                {"instrument": r.instrument, "seq": r.seq, "sha256": r.sha256, "reason": r.reason}
                for r in self.rejects
            ],
        }


_ack_decoder = msgspec.json.Decoder(Ack)


def _seq_ok(seq: int) -> bool:
    return 1 <= seq <= MAX_SEQ


def decode_ack(body_text: str) -> Ack:
    ack = _decode(_ack_decoder, body_text)
    if ack.v != VERSION or ack.kind != "ack":
        raise WireError("body is not a version-1 ack")
    if not ID_RE.match(ack.agent) or not 0 <= ack.at <= MAX_SEQ:
        raise WireError("ack needs an agent id and a time")
    for chain, e in ack.acks.items():
        if not CHAIN_RE.match(chain) or not _seq_ok(e.seq) or not SHA_RE.match(e.sha256):
            raise WireError(f"ack entry {chain!r} needs a chain name, 1 <= seq < 2^63 and a 64-hex sha256")
    for r in ack.rejects:
        if not CHAIN_RE.match(r.instrument) or not _seq_ok(r.seq) or not SHA_RE.match(r.sha256):
            raise WireError("reject entry needs a chain name, 1 <= seq < 2^63 and a 64-hex sha256")
    return ack


def seal_acks(
    key: signing.PrivateKey,
    agent: str,
    at: int,
    acks: dict[str, AckEntry],
    rejects: list[AckReject],
) -> list[bytes]:
    """Signed ack envelopes for one agent, split so that each fits ``MAX_PAYLOAD`` (an agent reads no more)."""
    pub = key.public_key()
    kid, key_text = signing.key_id(pub), signing.public_key_text(pub)
    # what an agent would refuse (a hostile body's seq beyond 64 bits) must not spoil the rest of its ack
    rejects = [
        AckReject(r.instrument, r.seq, r.sha256, r.reason[:MAX_REASON])
        for r in rejects
        if CHAIN_RE.match(r.instrument) and _seq_ok(r.seq) and SHA_RE.match(r.sha256)
    ]
    acks = {c: e for c, e in acks.items() if CHAIN_RE.match(c) and _seq_ok(e.seq) and SHA_RE.match(e.sha256)}
    if not acks and not rejects:
        return []

    def pack(items: list[AckReject | tuple[str, AckEntry]]) -> list[bytes]:
        entries = dict(i for i in items if isinstance(i, tuple))
        rej = [i for i in items if isinstance(i, AckReject)]
        payload = seal(key, kid, dump_body(Ack(agent, at, key_text, entries, rej).body()))
        if len(payload) <= MAX_PAYLOAD or len(items) <= 1:
            return [payload]
        half = len(items) // 2
        return pack(items[:half]) + pack(items[half:])

    # rejects first: an agent must dead-letter a rejected row before an ack covering its seq deletes it
    return pack([*rejects, *acks.items()])


def is_legacy_ack(payload: bytes) -> bool:
    """An unsigned ack as collectors before the signed control path sent it (``{"v":1,"acks":...}``)."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    return isinstance(obj, dict) and "acks" in obj and "body" not in obj


MAX_GONE = 64
"""Chains one status may speak for in ``gone`` (an agent with more rotates them through its heartbeats)."""


class AgentStatus(msgspec.Struct, frozen=True):
    """A signed heartbeat. ``conn`` names the agent's broker connection (it only grows), so the order
    (conn, offline after online, at) tells which of two statuses is newer; a replayed older one loses.

    ``gone`` maps a chain to ``[first, upto]``: its current chain began at seq ``first``, and this
    agent holds no link at or below ``upto`` (pending or dead) and will never send one again: they
    were acknowledged and deleted, or re-sent under new seqs. A collector whose ledger lacks some of
    them (restored from an older backup) records them as a hole instead of waiting for ever. The
    statement only grows truer with time, so a replayed one is harmless.
    """

    agent: str
    status: str
    at: int
    conn: int
    pending: int = 0
    version: str = ""
    gone: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    v: int = VERSION
    kind: str = "status"

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": VERSION,
            "kind": "status",
            "agent": self.agent,
            "status": self.status,
            "at": self.at,
            "conn": self.conn,
            "pending": self.pending,
            "version": self.version,
        }
        if self.gone:
            body["gone"] = {c: [first, upto] for c, (first, upto) in self.gone.items()}
        return body

    @property
    def online(self) -> bool:
        return self.status == "online"

    def order(self) -> tuple[int, int, int]:
        return (self.conn, 0 if self.online else 1, self.at)


_status_decoder = msgspec.json.Decoder(AgentStatus)


def decode_status(body_text: str) -> AgentStatus:
    st = _decode(_status_decoder, body_text)
    if st.v != VERSION or st.kind != "status":
        raise WireError("body is not a version-1 status")
    if st.status not in STATUSES:
        raise WireError(f"status {st.status[:20]!r} is not one of {', '.join(STATUSES)}")
    if not ID_RE.match(st.agent) or len(st.version) > 32:
        raise WireError("status needs an agent id and a version of at most 32 characters")
    if not all(0 <= n <= MAX_SEQ for n in (st.at, st.conn, st.pending)):
        raise WireError("status times and counts must be within 0 .. 2^63-1")
    if len(st.gone) > MAX_GONE:
        raise WireError(f"status speaks for {len(st.gone)} chains in gone, more than {MAX_GONE}")
    for chain, (first, upto) in st.gone.items():
        if not CHAIN_RE.match(chain) or not _seq_ok(first) or not 0 <= upto <= MAX_SEQ:
            raise WireError(
                f"gone entry {chain[:70]!r} needs a chain name, 1 <= first < 2^63, 0 <= upto < 2^63"
            )
    return st


def seal_status(key: signing.PrivateKey, kid: str, st: AgentStatus) -> bytes:
    return seal(key, kid, dump_body(st.body()))


# Power telemetry: per-window mean/min/max watts, for live views and the time-series store -------------
# Signed like everything else, but QoS 0 and never through the outbox: power is telemetry, never hours.

POWER_WINDOW_MS = 60_000
MAX_POWER_WINDOW_MS = 600_000
MAX_POWER_W = 10_000_000.0  # 10 MW: far above any instrument, far below what breaks a float sum
MAX_ENERGY_WH = 1e12  # a meter's energy counter beyond this (a billion kWh) is a misread


def max_window_energy_wh(window_ms: int) -> float:
    """The most energy a power window can hold: MAX_POWER_W for its whole length."""
    return MAX_POWER_W * window_ms / 3_600_000


MAX_POWER_SAMPLES = 100_000


def power_topic(agent: str, instrument: str) -> str:
    return f"{ROOT}/{agent}/{instrument}/power"


def is_power_topic(topic: str) -> bool:
    return topic.startswith(f"{ROOT}/") and topic.endswith("/power") and topic.count("/") == 4


class Power(msgspec.Struct, frozen=True):
    """Power over ``[start, end)``: ``n`` readings, their mean, min and max in watts; ``energy_wh`` is the
    energy used in the window (from the meter's counter where it has one, else power integrated between
    reads), absent where it could not be measured."""

    agent: str
    instrument: str
    start: int
    end: int
    n: int
    mean_w: float
    min_w: float
    max_w: float
    energy_wh: float | None = None
    v: int = VERSION
    kind: str = "power"

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": VERSION,
            "kind": "power",
            "agent": self.agent,
            "instrument": self.instrument,
            "start": self.start,
            "end": self.end,
            "n": self.n,
            "mean_w": self.mean_w,
            "min_w": self.min_w,
            "max_w": self.max_w,
        }
        if self.energy_wh is not None:
            out["energy_wh"] = self.energy_wh
        return out


_power_decoder = msgspec.json.Decoder(Power)


def decode_power(body_text: str) -> Power:
    """A checked power body: ids, a window of at most ten minutes, finite watts in order, a sane count."""
    p = _decode(_power_decoder, body_text)
    if p.v != VERSION or p.kind != "power":
        raise WireError("body is not a version-1 power")
    if not ID_RE.match(p.agent) or not ID_RE.match(p.instrument):
        raise WireError("power needs an agent id and an instrument id")
    if not 0 <= p.start < p.end <= MAX_SEQ or p.end - p.start > MAX_POWER_WINDOW_MS:
        raise WireError(f"power window needs 0 <= start < end, at most {MAX_POWER_WINDOW_MS} ms long")
    if not 1 <= p.n <= MAX_POWER_SAMPLES:
        raise WireError(f"power sample count out of range: {p.n} (1 .. {MAX_POWER_SAMPLES})")
    watts = (p.min_w, p.mean_w, p.max_w)
    if not all(math.isfinite(w) and abs(w) <= MAX_POWER_W for w in watts):
        raise WireError(f"power values must be finite and within +-{MAX_POWER_W:.0f} W")
    slack = 1e-6 * max(1.0, abs(p.max_w))
    if not p.min_w <= p.max_w or not p.min_w - slack <= p.mean_w <= p.max_w + slack:
        raise WireError("power needs min_w <= mean_w <= max_w")
    if p.energy_wh is not None:
        check_energy("power", p.energy_wh, p.end - p.start)
    return p


def seal_power(key: signing.PrivateKey, kid: str, p: Power) -> bytes:
    return seal(key, kid, dump_body(p.body()))
