"""``labmeter verify DIR``: re-check an evidence bundle without the ledger, and without the collector installed.

A bundle carries its own public keys, so on its own it proves only that it is consistent: anyone
can re-sign one end to end. What makes it evidence is a trust source from outside it (the key
list from ``labmeter collector export-keys``, or fingerprints): every agent key and the collector's
countersigning key must be in it. The checks, each a function below: keys against the trust
source; every signature; the chains (each ``prev`` is the SHA-256 of the previous body, no seq
missing) and contiguity; coverage (every span of the period no interval covers must be declared
as a gap); the claimed hours against a recomputation, service and external service hours (format 3)
from the bundle's service records, energy from the intervals' signed ``energy_wh``; the collector's countersignature over the claims and every file.
Every discrepancy is named.

A link with ``prev = GENESIS`` begins a new chain (an agent that lost its state); it is listed,
not a discrepancy, and the time before it, with no interval, counts as no data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labmeter import energy, evidence, signing, wire
from labmeter.machine_hours import HOUR_MS, Hours, compute, uncovered, union

H = HOUR_MS
MAX_NAMED = 10
"""Findings of one kind named one by one; the rest are counted (a re-signed bundle fails on every line)."""
CLAIMS = tuple(Hours().totals())


def iso(ms: int) -> str:
    """UTC time of a millisecond timestamp; one outside the calendar is shown as the number (a bundle is hostile)."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms"


@dataclass
class Finding:
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class KeyCheck:
    """One key in the bundle and what the trust source said about it."""

    who: str
    fingerprint: str
    status: str
    trusted: bool


@dataclass
class Result:
    instrument: str = ""
    from_ms: int = 0
    to_ms: int = 0
    version: int = 0
    findings: list[Finding] = field(default_factory=list)
    recomputed: dict[str, int] = field(default_factory=dict)
    claimed: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per agent: envelopes in the bundle, and how many of them carry a valid signature by a usable key."""
    keys: list[KeyCheck] = field(default_factory=list)
    countersignature: str = ""
    gaps: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    """Where an agent began a new chain (prev = GENESIS), e.g. after losing its state directory."""
    trust: str | None = None
    """The trust source the keys were checked against; None: they were not checked."""
    services: int | None = None
    """Service records in the bundle (format 3); None: the format carries none."""

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def keys_checked(self) -> bool:
        return self.trust is not None and all(k.trusted for k in self.keys)


class BundleError(Exception):
    """A bundle that cannot be read at all: the message names the file (and line)."""


@dataclass
class Line:
    """One envelope of intervals.jsonl, decoded, with its line number for findings."""

    n: int
    env: wire.Envelope
    iv: wire.Interval


@dataclass
class Bundle:
    """A bundle's files, read and type-checked, nothing yet verified."""

    folder: Path
    format: str
    version: int
    instrument: str
    from_ms: int
    to_ms: int
    prep_s: int
    post_s: int
    agents: dict[str, str]
    claimed: dict[str, int] | None
    gaps: list[tuple[int, int]] | None
    lines: list[Line]
    files: dict[str, bytes]
    manifest: dict[str, str] | None
    listed: int | None = None
    """How many intervals bundle.json says intervals.jsonl holds."""
    services: list[ServiceLine] | None = None
    """Format 3: the service records of services.jsonl."""


@dataclass
class ServiceLine:
    """One service record of services.jsonl, type-checked, with its line number for findings."""

    n: int
    id: Any
    start_ms: int
    end_ms: int
    external: bool


# reading ----------------------------------------------------------------------
def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (not an evidence bundle?)") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(doc: dict[str, Any], key: str, path: Path, check: Any, what: str) -> Any:
    if key not in doc:
        raise BundleError(f"{path}: missing {key!r}")
    if not check(doc[key]):
        raise BundleError(f"{path}: {key!r} must be {what}, not {json.dumps(doc[key])[:60]}")
    return doc[key]


def load_bundle(folder: Path) -> Bundle:
    """Read and type-check every file; anything unreadable is a BundleError naming the file and line."""
    path = folder / evidence.BUNDLE
    files = {evidence.BUNDLE: _read(path), evidence.INTERVALS: _read(folder / evidence.INTERVALS)}
    doc = _json(path, files[evidence.BUNDLE])
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: not a JSON object")
    fmt = _field(doc, "format", path, lambda v: isinstance(v, str), "a string")
    if fmt not in evidence.VERSIONS:
        raise BundleError(
            f"{path}: format {fmt!r} is not one this labmeter reads ({', '.join(evidence.VERSIONS)})"
        )
    version = evidence.VERSIONS[fmt]
    instrument = _field(doc, "instrument", path, lambda v: isinstance(v, str), "a string")
    ints = {k: _field(doc, k, path, _int, "an integer") for k in ("from_ms", "to_ms")}
    allow = {
        k: _field(doc, k, path, lambda v: _int(v) and v >= 0, "an integer >= 0")
        for k in ("prep_allowance_s", "post_allowance_s")
    }
    if ints["to_ms"] <= ints["from_ms"]:
        raise BundleError(f"{path}: 'to_ms' is not after 'from_ms'")
    agents = _field(
        doc,
        "agents",
        path,
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v.values()),
        "an object of agent id to public key",
    )
    claimed = None
    if "claimed" in doc:
        claimed = _field(
            doc,
            "claimed",
            path,
            lambda v: isinstance(v, dict) and all(_int(x) for x in v.values()),
            "an object of integer milliseconds",
        )
    gaps = None
    if version >= 2:
        gaps = [
            (int(g[0]), int(g[1]))
            for g in _field(
                doc,
                "gaps",
                path,
                lambda v: (
                    isinstance(v, list)
                    and all(isinstance(g, list) and len(g) == 2 and all(_int(x) for x in g) for g in v)
                ),
                "a list of [start_ms, end_ms] pairs",
            )
        ]
    services = None
    if version >= 3:
        files[evidence.SERVICES] = _read(folder / evidence.SERVICES)
        services = _services(folder / evidence.SERVICES, files[evidence.SERVICES])
    manifest = None
    mpath = folder / evidence.MANIFEST
    if mpath.exists():
        m = _json(mpath, _read(mpath))
        for key in ("key", "kid", "body", "sig"):
            if not isinstance(m, dict) or not isinstance(m.get(key), str):
                raise BundleError(f"{mpath}: needs string fields key, kid, body and sig (bad {key!r})")
        manifest = m
    return Bundle(
        folder,
        fmt,
        version,
        instrument,
        ints["from_ms"],
        ints["to_ms"],
        allow["prep_allowance_s"],
        allow["post_allowance_s"],
        agents,
        claimed,
        gaps,
        _lines(folder / evidence.INTERVALS, files[evidence.INTERVALS]),
        files,
        manifest,
        doc["intervals"] if _int(doc.get("intervals")) else None,
        services,
    )


def _services(path: Path, data: bytes) -> list[ServiceLine]:
    """services.jsonl: one object a line with integer times (end after start) and type 120 or 130."""
    out = []
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        rec = _json(Path(f"{path}:{n}"), raw)
        if not isinstance(rec, dict):
            raise BundleError(f"{path}:{n}: not a JSON object")
        start, end = rec.get("start_ms"), rec.get("end_ms")
        if not (_int(start) and _int(end) and end > start):  # type: ignore[operator]
            raise BundleError(f"{path}:{n}: start_ms and end_ms must be integers, end after start")
        if rec.get("service_type") not in (120, 130):
            raise BundleError(
                f"{path}:{n}: service_type must be 120 or 130, not {json.dumps(rec.get('service_type'))[:20]}"
            )
        out.append(ServiceLine(n, rec.get("id"), int(start), int(end), rec["service_type"] == 130))  # type: ignore[arg-type]
    return out


def _lines(path: Path, data: bytes) -> list[Line]:
    out = []
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            env = wire.open_envelope(raw)
            iv = wire.parse_interval(wire.load_body(env.body))
        except wire.WireError as exc:
            raise BundleError(f"{path}:{n}: not a signed interval ({exc})") from None
        out.append(Line(n, env, iv))
    return out


# checking ---------------------------------------------------------------------
def verify_bundle(folder: Path, trust: evidence.Trust | None = None) -> Result:
    """Every check over one bundle; ``trust`` None means the bundle's own keys are used and reported unchecked."""
    b = load_bundle(folder)
    res = Result(instrument=b.instrument, from_ms=b.from_ms, to_ms=b.to_ms, version=b.version)
    res.trust = trust.describe() if trust is not None else None
    res.claimed = dict(b.claimed or {})
    checkers = check_keys(b, trust, res)
    good = check_signatures(b, checkers, res)
    rows = check_chains(good, res)
    check_coverage(b, rows, res)
    check_claims(b, rows, res, energy_rows(good))
    check_countersignature(b, trust, res)
    return res


def check_keys(b: Bundle, trust: evidence.Trust | None, res: Result) -> dict[str, signing.SignatureChecker]:
    """The key each agent's signatures are checked with: the trusted one where the trust source has it."""
    out: dict[str, signing.SignatureChecker] = {}
    for agent, text in sorted(b.agents.items()):
        try:
            pub = signing.parse_public_key(text)
        except signing.KeyFileError as exc:
            raise BundleError(f"{b.folder / evidence.BUNDLE}: agents.{agent}: {exc}") from None
        fp = signing.key_id(pub)
        where = f"key of agent {agent}"
        if trust is None:
            res.keys.append(KeyCheck(f"agent {agent}", fp, "NOT CHECKED", False))
            out[agent] = signing.SignatureChecker(pub)
            continue
        known = trust.agents.get(agent)
        if known is not None:
            out[agent] = signing.SignatureChecker(signing.parse_public_key(known.key))
            if known.fingerprint != fp:
                res.keys.append(
                    KeyCheck(f"agent {agent}", fp, f"DIFFERS from trusted {known.fingerprint}", False)
                )
                res.findings.append(
                    Finding(where, f"{fp} in the bundle is not the trusted key {known.fingerprint}")
                )
                continue
            if b.instrument not in known.instruments:
                res.findings.append(
                    Finding(where, f"agent {agent} is not enrolled for {b.instrument} in the trust source")
                )
            res.keys.append(KeyCheck(f"agent {agent}", fp, "trusted", True))
        elif fp in trust.fingerprints:
            out[agent] = signing.SignatureChecker(pub)
            res.keys.append(KeyCheck(f"agent {agent}", fp, "trusted", True))
        else:
            res.keys.append(KeyCheck(f"agent {agent}", fp, "NOT TRUSTED", False))
            res.findings.append(Finding(where, f"{fp} is not in the trust source ({trust.describe()})"))
    return out


def check_signatures(
    b: Bundle, checkers: dict[str, signing.SignatureChecker], res: Result
) -> dict[str, dict[int, tuple[wire.Interval, str]]]:
    """The intervals with a valid signature by a usable key, per agent and seq."""
    good: dict[str, dict[int, tuple[wire.Interval, str]]] = {}
    unusable: dict[str, int] = {}
    total: dict[str, int] = {}
    forged: dict[str, int] = {}
    for ln in b.lines:
        iv = ln.iv
        res.checked += 1
        total[iv.agent] = total.get(iv.agent, 0) + 1
        where = f"{evidence.INTERVALS}:{ln.n} ({iv.agent} seq {iv.seq})"
        if iv.instrument != b.instrument:
            res.findings.append(
                Finding(where, f"belongs to instrument {iv.instrument!r}, not {b.instrument!r}")
            )
            continue
        check = checkers.get(iv.agent)
        if check is None:
            unusable[iv.agent] = unusable.get(iv.agent, 0) + 1
            continue
        if not check(ln.env.body.encode(), ln.env.sig):
            forged[iv.agent] = forged.get(iv.agent, 0) + 1
            if forged[iv.agent] <= MAX_NAMED:
                res.findings.append(Finding(where, "signature does not match the body (edited or forged)"))
            continue
        good.setdefault(iv.agent, {})[iv.seq] = (iv, wire.body_hash(ln.env.body))
    for agent, n in sorted(forged.items()):
        if n > MAX_NAMED:
            res.findings.append(
                Finding(f"agent {agent}", f"{n - MAX_NAMED} more interval(s) whose signature does not match")
            )
    for agent, n in sorted(unusable.items()):
        why = "no public key in bundle.json" if agent not in b.agents else "its key is not trusted"
        res.findings.append(Finding(f"agent {agent}", f"{n} interval(s) not counted: {why}"))
    res.counts = {a: (n, len(good.get(a, {}))) for a, n in sorted(total.items())}
    if b.listed is not None and b.listed != len(b.lines):
        res.findings.append(
            Finding(evidence.INTERVALS, f"holds {len(b.lines)} interval(s), bundle.json lists {b.listed}")
        )
    return good


def check_chains(
    good: dict[str, dict[int, tuple[wire.Interval, str]]], res: Result
) -> list[tuple[int, int, str, bool]]:
    """Rows for the hour rules: (start, end, state, linked), linked where prev and contiguity hold."""
    rows: list[tuple[int, int, str, bool]] = []
    for agent, chain in sorted(good.items()):
        seqs = sorted(chain)
        for i, seq in enumerate(seqs):
            iv, _sha = chain[seq]
            linked = True
            if wire.starts_chain(iv.prev):
                if i > 0:
                    res.restarts.append(f"{agent} seq {seq}: a new chain begins at {iso(iv.start)}")
            elif i == 0:
                # the bundle's first link: its predecessor lies outside the bundle, like the ledger's view of it
                linked = False
            else:
                prev_seq = seqs[i - 1]
                prev, prev_sha = chain[prev_seq]
                if prev_seq != seq - 1:
                    missing = (
                        f"seq {prev_seq + 1}" if seq - prev_seq == 2 else f"seq {prev_seq + 1}-{seq - 1}"
                    )
                    res.findings.append(Finding(f"{agent} {missing}", "missing: the chain breaks here"))
                    linked = False
                elif iv.prev != prev_sha:
                    res.findings.append(
                        Finding(f"{agent} seq {seq}", "prev does not match the previous body's hash")
                    )
                    linked = False
                elif prev.end + iv.clock_step_ms != iv.start:
                    res.findings.append(
                        Finding(f"{agent} seq {seq}", f"starts at {iv.start}, previous ends at {prev.end}")
                    )
                    linked = False
            rows.append((iv.start, iv.end, iv.state, linked))
    return rows


def check_coverage(b: Bundle, rows: list[tuple[int, int, str, bool]], res: Result) -> None:
    """Every span of the period without an interval must be one the collector declared as a gap."""
    found = uncovered(rows, b.from_ms, b.to_ms)
    declared = union(b.gaps or [])
    res.gaps = found
    if b.gaps is None and found:
        res.notes.append("format 1 bundles declare no gaps: every uncovered span is a discrepancy")
    problems = []
    for s, e in _minus(found, declared):
        if s == b.from_ms and e == b.to_ms:
            what = "no interval covers any of the period"
        elif s == b.from_ms:
            what = f"the first interval starts at {iso(e)}, after the period start"
        elif e == b.to_ms:
            what = f"the last interval ends at {iso(s)}, before the period end"
        else:
            what = f"no interval covers {iso(s)} to {iso(e)} ({(e - s) / H:.3f} h)"
        problems.append(f"{what}, and the bundle does not declare it as a gap")
    for s, e in _minus(declared, found):
        problems.append(f"declared gap {iso(s)} to {iso(e)} is covered by intervals in the bundle")
    res.findings += [Finding("coverage", p) for p in problems[:MAX_NAMED]]
    if len(problems) > MAX_NAMED:
        res.findings.append(Finding("coverage", f"{len(problems) - MAX_NAMED} more span(s) like these"))


def _minus(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of xs that ys do not cover; both sorted and disjoint, so one pass (a bundle is hostile)."""
    out, j = [], 0
    for s, e in xs:
        at = s
        while j < len(ys) and ys[j][1] <= at:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < e:
            if ys[k][0] > at:
                out.append((at, ys[k][0]))
            at = max(at, ys[k][1])
            k += 1
        if at < e:
            out.append((at, e))
    return out


def energy_rows(good: dict[str, dict[int, tuple[wire.Interval, str]]]) -> list[energy.Row]:
    """(start, end, mWh or None) of every interval with a valid signature: energy counts linked or not,
    as the collector's reports count it."""
    return [
        (iv.start, iv.end, energy.to_mwh(iv.energy_wh))
        for chain in good.values()
        for iv, _sha in chain.values()
    ]


def check_claims(
    b: Bundle,
    rows: list[tuple[int, int, str, bool]],
    res: Result,
    energy_of: list[energy.Row] | None = None,
) -> None:
    """The claimed hours against the hour rules applied to the verified intervals; missing claims count.

    Energy (``energy_mwh``, ``energy_ms``) is recomputed from the signed bodies; a bundle from before
    energy claims none, which is no discrepancy (its intervals carry no energy either)."""
    windows = [(x.start_ms, x.end_ms, x.external) for x in b.services or []]
    h = compute(rows, b.from_ms, b.to_ms, b.prep_s * 1000, b.post_s * 1000, windows)
    res.recomputed = h.totals()
    mwh, known = energy.energy_in(energy_of or [], b.from_ms, b.to_ms)
    res.recomputed.update(energy_mwh=mwh, energy_ms=known)
    claims: tuple[str, ...] = CLAIMS
    if b.services is not None:
        res.recomputed.update(service_ms=h.service_ms, external_ms=h.external_ms)
        claims += evidence.SERVICE_CLAIMS
        res.services = len(b.services)
    if not b.claimed:
        res.findings.append(Finding("claims", "bundle.json claims no hours ('claimed' is missing or empty)"))
        return
    missing = [k for k in claims if k not in b.claimed]
    if missing:
        res.findings.append(Finding("claims", f"no claim for {', '.join(missing)}"))
    for key, claimed in b.claimed.items():
        got = res.recomputed.get(key)
        if got is None:
            res.findings.append(Finding("claims", f"{key!r} is not a quantity labmeter counts"))
        elif key == "energy_mwh" and got != claimed:
            res.findings.append(
                Finding("energy", f"claimed {claimed / 1e6:.6f} kWh, recomputed {got / 1e6:.6f} kWh")
            )
        elif got != claimed:
            res.findings.append(
                Finding(
                    f"hours {key.removesuffix('_ms')}",
                    f"claimed {claimed / H:.3f} h, recomputed {got / H:.3f} h",
                )
            )


def check_countersignature(b: Bundle, trust: evidence.Trust | None, res: Result) -> None:
    """The collector's signature over the claims and every file, by a key the trust source names."""
    where = evidence.MANIFEST
    if b.manifest is None:
        if b.version >= 2:
            res.countersignature = "MISSING"
            res.findings.append(
                Finding(where, "missing: a format 2 bundle is countersigned by the collector")
            )
        else:
            res.countersignature = "none (format 1 bundle)"
            res.notes.append("format 1 bundle: it carries no countersignature by the collector")
        return
    m = b.manifest
    try:
        pub = signing.parse_public_key(m["key"])
    except signing.KeyFileError as exc:
        raise BundleError(f"{b.folder / where}: key: {exc}") from None
    fp = signing.key_id(pub)
    if m["kid"] != fp:
        res.findings.append(Finding(where, f"kid {m['kid'][:64]!r} is not the fingerprint of its key ({fp})"))
    status, trusted = "NOT CHECKED", False
    if trust is not None:
        if trust.collector is not None:
            trusted_fp = signing.key_id(signing.parse_public_key(trust.collector))
            if trusted_fp == fp:
                status, trusted = "trusted", True
            else:
                status = f"DIFFERS from trusted {trusted_fp}"
                res.findings.append(
                    Finding(where, f"countersigned by {fp}, not by the trusted collector key {trusted_fp}")
                )
        elif fp in trust.fingerprints:
            status, trusted = "trusted", True
        else:
            status = "NOT TRUSTED"
            res.findings.append(
                Finding(where, f"collector key {fp} is not in the trust source ({trust.describe()})")
            )
    res.keys.append(KeyCheck("collector", fp, status, trusted))
    if not signing.verify(pub, m["body"].encode(), m["sig"]):
        res.countersignature = f"BROKEN (key {fp})"
        res.findings.append(
            Finding(where, "the countersignature does not match the manifest (edited or forged)")
        )
        return
    res.countersignature = f"valid, by collector key {fp} ({status})"
    try:
        body = json.loads(m["body"])
        files = body["files"]
        signed = {k: body[k] for k in ("format", "instrument", "from_ms", "to_ms", "claimed")}
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{b.folder / where}: body is not a manifest ({exc})") from None
    actual = {
        "format": b.format,
        "instrument": b.instrument,
        "from_ms": b.from_ms,
        "to_ms": b.to_ms,
        "claimed": b.claimed,
    }
    for key, value in signed.items():
        if value != actual[key]:
            res.findings.append(
                Finding(where, f"the collector signed {_difference(key, value, actual[key])}")
            )
    for name in evidence.countersigned(b.format):
        if not isinstance(files, dict) or files.get(name) != evidence.file_hash(b.files[name]):
            res.findings.append(
                Finding(where, f"{name} changed after the collector signed it (SHA-256 differs)")
            )


def _difference(key: str, signed: Any, now: Any) -> str:
    """What differs between a signed manifest field and the bundle's, claims hour by hour."""
    if key == "claimed" and isinstance(signed, dict) and isinstance(now, dict):
        parts = [
            f"{k} {_quantity(k, signed.get(k))}, bundle.json says {_quantity(k, now.get(k))}"
            for k in sorted(set(signed) | set(now))
            if signed.get(k) != now.get(k)
        ]
        return "other claims: " + "; ".join(parts)
    return f"{key} {json.dumps(signed)}, bundle.json says {json.dumps(now)}"


def _quantity(key: str, value: Any) -> str:
    if key == "energy_mwh":
        return f"{value / 1e6:.6f} kWh" if _int(value) else "none"
    return _hours(value)


def _hours(ms: Any) -> str:
    return f"{ms / H:.3f} h" if _int(ms) else "none"
