"""Writing evidence bundles and the published key list (the format is ``labmeter.evidence``).

A bundle lets anyone re-check the hours with ``labmeter verify`` without trusting the
collector or its ledger; the collector countersigns it, so its claims and declared gaps
cannot be edited. The interval just before the period is included too, so the first
link of the chain can be checked, and so are the instrument's service records, so the
service and external service hours can be re-checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labmeter import evidence, signing
from labmeter.collector.ledger import Ledger
from labmeter.energy import energy_in
from labmeter.machine_hours import compute, uncovered


def write_bundle(
    ledger: Ledger,
    instrument: str,
    a: int,
    b: int,
    prep_s: int,
    post_s: int,
    out: Path,
    key: signing.PrivateKey,
) -> dict[str, Any]:
    """Write the bundle for ``instrument`` over [a, b), countersigned with the collector's ``key``."""
    pad = max(prep_s, post_s) * 1000
    rows = ledger.intervals_between(a - pad, b + pad, instrument)
    agents = sorted({r.agent for r in rows})
    envelopes: list[bytes] = []
    for agent in agents:
        seqs = [r.seq for r in rows if r.agent == agent]
        envelopes += ledger.envelopes(agent, instrument, max(1, min(seqs) - 1), max(seqs))
    keys = {a_: k for a_, (k, _kid) in ledger.agent_keys().items() if a_ in agents}
    spans = [r.span() for r in rows]
    services = ledger.service_records(a, b, instrument)
    windows = [(int(str(r["start_ms"])), int(str(r["end_ms"])), r["service_type"] == 130) for r in services]
    hours = compute(spans, a, b, prep_s * 1000, post_s * 1000, windows)
    mwh, known = energy_in([r.energy() for r in rows], a, b)
    claimed = {
        **hours.totals(),
        "service_ms": hours.service_ms,
        "external_ms": hours.external_ms,
        "energy_mwh": mwh,
        "energy_ms": known,
    }
    bundle = {
        "format": evidence.FORMAT,
        "instrument": instrument,
        "from_ms": a,
        "to_ms": b,
        "prep_allowance_s": prep_s,
        "post_allowance_s": post_s,
        "agents": keys,
        "claimed": claimed,
        "gaps": [list(g) for g in uncovered(spans, a, b)],
        "intervals": len(envelopes),
        "services": len(services),
    }
    # links lost with a restored ledger, each with the agent's signed word that it holds them no more
    holes = [
        {
            "agent": agent,
            "chain": instrument,
            "first_seq": f,
            "last_seq": last,
            "statement": st.decode("utf-8", "replace"),
        }
        for agent in agents
        for f, last, st in ledger.hole_statements(
            agent,
            instrument,
            min(r.seq for r in rows if r.agent == agent) - 1,
            max(r.seq for r in rows if r.agent == agent) + 1,
        )
    ]
    if holes:
        bundle["holes"] = holes
    files = {
        evidence.BUNDLE: (json.dumps(bundle, indent=2, ensure_ascii=False) + "\n").encode(),
        evidence.INTERVALS: b"".join(env.rstrip(b"\n") + b"\n" for env in envelopes),
        evidence.SERVICES: b"".join(
            json.dumps(
                {k: r[k] for k in evidence.SERVICE_FIELDS}, ensure_ascii=False, sort_keys=True
            ).encode()
            + b"\n"
            for r in services
        ),
    }
    manifest = evidence.countersign(key, evidence.manifest_body(bundle, files))
    files[evidence.MANIFEST] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return bundle


def export_keys(ledger: Ledger, collector: signing.PublicKey | None, now_ms: int) -> dict[str, Any]:
    """The registered agents' keys, fingerprints and enrolled instruments, and the collector's key."""
    enrolled: dict[str, list[str]] = {}
    for agent, instrument in ledger.enrolments():
        enrolled.setdefault(agent, []).append(instrument)
    agents = [(agent, key, enrolled.get(agent, [])) for agent, (key, _kid) in ledger.agent_keys().items()]
    return evidence.keys_document(collector, agents, now_ms)
