"""``labmeter verify DIR``: re-check an evidence bundle without the ledger.

Checks every signature against the agents' public keys, the chain (each ``prev`` is
the SHA-256 of the previous body, no seq missing) and contiguity (each interval starts
where the previous one ended), then recomputes the hours and compares them with what
the collector claimed. Every discrepancy is named. A link with ``prev = GENESIS``
begins a new chain (an agent that lost its state); it is listed, not a discrepancy,
and the time before it, with no interval, counts as no data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labmeter import signing, wire
from labmeter.collector.hours import compute

H = 3_600_000


@dataclass
class Finding:
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class Result:
    findings: list[Finding] = field(default_factory=list)
    recomputed: dict[str, int] = field(default_factory=dict)
    claimed: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    restarts: list[str] = field(default_factory=list)
    """Where an agent began a new chain (prev = GENESIS), e.g. after losing its state directory."""

    @property
    def ok(self) -> bool:
        return not self.findings


class BundleError(Exception):
    pass


def verify_bundle(folder: Path) -> Result:
    try:
        bundle: dict[str, Any] = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
        lines = (folder / "intervals.jsonl").read_bytes().splitlines()
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder}: not an evidence bundle ({exc})") from None
    res = Result(claimed={k: int(v) for k, v in bundle.get("claimed", {}).items()})
    keys = {a: signing.SignatureChecker(signing.parse_public_key(k)) for a, k in bundle["agents"].items()}
    instrument = bundle["instrument"]
    good: dict[str, dict[int, tuple[wire.Interval, str]]] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        res.checked += 1
        where = f"intervals.jsonl:{n}"
        try:
            env = wire.open_envelope(line)
            iv = wire.parse_interval(wire.load_body(env.body))
        except wire.WireError as exc:
            res.findings.append(Finding(where, f"unreadable: {exc}"))
            continue
        where = f"{where} ({iv.agent} seq {iv.seq})"
        if iv.instrument != instrument:
            res.findings.append(
                Finding(where, f"belongs to instrument {iv.instrument!r}, not {instrument!r}")
            )
            continue
        check = keys.get(iv.agent)
        if check is None:
            res.findings.append(Finding(where, f"no public key for agent {iv.agent!r} in bundle.json"))
            continue
        if not check(env.body.encode(), env.sig):
            res.findings.append(Finding(where, "signature does not match the body (edited or forged)"))
            continue
        good.setdefault(iv.agent, {})[iv.seq] = (iv, wire.body_hash(env.body))

    rows: list[tuple[int, int, str, bool]] = []
    for agent, chain in sorted(good.items()):
        seqs = sorted(chain)
        for i, seq in enumerate(seqs):
            iv, _sha = chain[seq]
            linked = True
            if wire.starts_chain(iv.prev):
                if i > 0:
                    at = datetime.fromtimestamp(iv.start / 1000, UTC).isoformat(timespec="seconds")
                    res.restarts.append(f"{agent} seq {seq}: a new chain begins at {at}")
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
    a, b = int(bundle["from_ms"]), int(bundle["to_ms"])
    h = compute(rows, a, b, int(bundle["prep_allowance_s"]) * 1000, int(bundle["post_allowance_s"]) * 1000)
    res.recomputed = h.totals()
    for key, claimed in res.claimed.items():
        got = res.recomputed.get(key)
        if got is not None and got != claimed:
            res.findings.append(
                Finding(
                    f"hours {key.removesuffix('_ms')}",
                    f"claimed {claimed / H:.3f} h, recomputed {got / H:.3f} h",
                )
            )
    return res
