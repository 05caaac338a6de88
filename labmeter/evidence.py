"""The evidence bundle format and the published key list: one place for both, shared by writer and checker.

A bundle is a folder:

- ``bundle.json``: format, instrument, period, allowances, the agents' public keys, the hours the
  collector claims and (format 2) the spans of the period no interval covers (``gaps``);
- ``intervals.jsonl``: one signed envelope per line, exactly as the agent sent it;
- ``services.jsonl`` (format 3): the instrument's service records overlapping the period, one JSON
  object a line (id, start_ms, end_ms, service_type 120/130, direction, applicant_unit, amount), so
  the service and external service hours (claimed as ``service_ms`` and ``external_ms``) can be
  recomputed: effective time inside any record, and inside an external one; the energy of the
  period (``energy_mwh``, whole mWh, and ``energy_ms``, the time covered by intervals that carry
  energy), recomputed from the intervals' signed ``energy_wh`` (labmeter.energy), claimed by bundles
  written since energy (older format 3 bundles claim none and verify as before);
- ``manifest.json`` (format 2 and 3): the collector's countersignature, an envelope
  ``{"key", "kid", "body", "sig"}`` whose ``body`` is the exact JSON text it signed: format,
  instrument, period, claims and the SHA-256 of every other file. Editing any file, or the claims,
  breaks it; only the collector's key can make a new one.

Format 2 bundles (no service records) verify as before; format 1 bundles (no gaps, no manifest) still
verify, with a note that nothing countersigns them.

The key list (``labmeter collector export-keys``) is what an evaluator trusts instead of the keys inside
a bundle, published by the owner or the bureau apart from any bundle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labmeter import signing

FORMAT_V1 = "labmeter-evidence/1"
FORMAT_V2 = "labmeter-evidence/2"
FORMAT = "labmeter-evidence/3"
VERSIONS = {FORMAT_V1: 1, FORMAT_V2: 2, FORMAT: 3}
BUNDLE, INTERVALS, SERVICES, MANIFEST = "bundle.json", "intervals.jsonl", "services.jsonl", "manifest.json"
COUNTERSIGNED = (BUNDLE, INTERVALS, SERVICES)
"""The files whose hashes the manifest of a current bundle carries."""
SERVICE_CLAIMS = ("service_ms", "external_ms")
"""Claims a format 3 bundle adds, recomputed from its service records."""
SERVICE_FIELDS = ("id", "start_ms", "end_ms", "service_type", "direction", "applicant_unit", "amount")
"""What a bundle carries of each service record (not the applicant's name: it is not needed to check hours)."""


def countersigned(fmt: str) -> tuple[str, ...]:
    """The files a bundle of format ``fmt`` has hashed in its manifest."""
    return COUNTERSIGNED if VERSIONS.get(fmt, 0) >= 3 else (BUNDLE, INTERVALS)


KEYS_FORMAT = "labmeter-keys/1"


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_body(bundle: dict[str, Any], files: dict[str, bytes]) -> str:
    """The exact text the collector signs: what an evaluator reads first, and a hash of every file."""
    return json.dumps(
        {
            "format": bundle["format"],
            "instrument": bundle["instrument"],
            "from_ms": bundle["from_ms"],
            "to_ms": bundle["to_ms"],
            "claimed": bundle["claimed"],
            "files": {name: file_hash(files[name]) for name in countersigned(bundle["format"])},
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def countersign(key: signing.PrivateKey, body: str) -> dict[str, str]:
    pub = key.public_key()
    return {
        "key": signing.public_key_text(pub),
        "kid": signing.key_id(pub),
        "body": body,
        "sig": signing.sign(key, body.encode()),
    }


def keys_document(
    collector: signing.PublicKey | None,
    agents: list[tuple[str, str, list[str]]],
    generated_ms: int,
    ledger_id: str | None = None,
) -> dict[str, Any]:
    """The published key list: (agent id, public key text, enrolled instruments) per agent."""
    doc: dict[str, Any] = {
        "format": KEYS_FORMAT,
        "generated_at": datetime.fromtimestamp(generated_ms / 1000, UTC).isoformat(timespec="seconds"),
    }
    if ledger_id is not None:
        doc["ledger_id"] = ledger_id
    if collector is not None:
        doc["collector"] = {
            "key": signing.public_key_text(collector),
            "fingerprint": signing.key_id(collector),
        }
    doc["agents"] = [
        {
            "id": agent,
            "key": key,
            "fingerprint": signing.key_id(signing.parse_public_key(key)),
            "instruments": sorted(instruments),
        }
        for agent, key, instruments in sorted(agents)
    ]
    return doc


class TrustError(Exception):
    """A trust file or --key value that cannot be used."""


@dataclass(frozen=True)
class TrustedAgent:
    key: str
    fingerprint: str
    instruments: frozenset[str]


@dataclass
class Trust:
    """Keys an evaluator accepts, from outside the bundle: a key list and/or bare fingerprints."""

    agents: dict[str, TrustedAgent] = field(default_factory=dict)
    collector: str | None = None
    fingerprints: set[str] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return " and ".join(self.sources)


def _need(doc: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise TrustError(f"{where}: missing {key!r}")
    value = doc[key]
    if not isinstance(value, kind):
        raise TrustError(f"{where}: {key!r} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _key_text(text: str, where: str) -> str:
    try:
        return signing.public_key_text(signing.parse_public_key(text))
    except signing.KeyFileError as exc:
        raise TrustError(f"{where}: {exc}") from None


def load_trust(path: Path, into: Trust | None = None) -> Trust:
    """Read a key list written by ``labmeter collector export-keys``; errors name the file and the entry."""
    trust = into or Trust()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrustError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise TrustError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise TrustError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    fmt = _need(doc, "format", str, str(path))
    if fmt != KEYS_FORMAT:
        raise TrustError(f"{path}: format {fmt!r} is not {KEYS_FORMAT!r} (a file from export-keys?)")
    if "collector" in doc:
        trust.collector = _key_text(
            _need(doc["collector"], "key", str, f"{path}: collector"), f"{path}: collector"
        )
    for n, entry in enumerate(_need(doc, "agents", list, str(path))):
        where = f"{path}: agents[{n}]"
        agent = _need(entry, "id", str, where)
        key = _key_text(_need(entry, "key", str, where), f"{where} ({agent})")
        instruments = _need(entry, "instruments", list, where)
        if not all(isinstance(i, str) for i in instruments):
            raise TrustError(f"{where} ({agent}): 'instruments' must be a list of instrument codes")
        fingerprint = signing.key_id(signing.parse_public_key(key))
        trust.agents[agent] = TrustedAgent(key, fingerprint, frozenset(instruments))
    trust.sources.append(f"key list {path}")
    return trust


def add_fingerprints(values: tuple[str, ...] | list[str], into: Trust | None = None) -> Trust:
    """``--key``: a fingerprint (16 hex digits, as verify and export-keys print) or a whole public key."""
    trust = into or Trust()
    for value in values:
        text = value.strip()
        if text.startswith(signing.KEY_PREFIX):
            trust.fingerprints.add(signing.key_id(signing.parse_public_key(_key_text(text, "--key"))))
        elif len(text) == 16 and all(c in "0123456789abcdef" for c in text.lower()):
            trust.fingerprints.add(text.lower())
        else:
            raise TrustError(
                f"--key {value!r}: expected a fingerprint of 16 hex digits or a key 'ed25519:<base64>'"
            )
    if values:
        trust.sources.append(f"{len(values)} --key fingerprint(s)")
    return trust
