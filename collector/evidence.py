"""Evidence bundles: the signed envelopes behind a report and the agents' public keys.

A bundle lets anyone re-check the hours with ``labmeter verify`` without trusting
the collector or its ledger. Layout of the folder:

- ``bundle.json``: instrument, period, allowances, agents' public keys, and the hours
  the collector claims for that period;
- ``intervals.jsonl``: one signed envelope per line, exactly as the agent sent it,
  ordered by agent and seq. The interval just before the period is included too, so
  the first link of the chain can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labmeter.collector.hours import compute
from labmeter.collector.ledger import Ledger

FORMAT = "labmeter-evidence/1"


def write_bundle(
    ledger: Ledger, instrument: str, a: int, b: int, prep_s: int, post_s: int, out: Path
) -> dict[str, Any]:
    pad = max(prep_s, post_s) * 1000
    rows = ledger.intervals_between(a - pad, b + pad, instrument)
    agents = sorted({r[1] for r in rows})
    envelopes: list[bytes] = []
    for agent in agents:
        seqs = [r[2] for r in rows if r[1] == agent]
        first, last = min(seqs), max(seqs)
        envelopes += [
            bytes(e[0])
            for e in ledger.db.execute(
                "SELECT envelope FROM intervals WHERE agent=? AND instrument=? AND seq BETWEEN ? AND ? ORDER BY seq",
                (agent, instrument, max(1, first - 1), last),
            )
        ]
    keys = {a_: k for a_, (k, _kid) in ledger.agent_keys().items() if a_ in agents}
    bundle = {
        "format": FORMAT,
        "instrument": instrument,
        "from_ms": a,
        "to_ms": b,
        "prep_allowance_s": prep_s,
        "post_allowance_s": post_s,
        "agents": keys,
        "claimed": compute(
            [(r[3], r[4], r[5], bool(r[6])) for r in rows], a, b, prep_s * 1000, post_s * 1000
        ).totals(),
        "intervals": len(envelopes),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bundle.json").write_text(
        json.dumps(bundle, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    with (out / "intervals.jsonl").open("wb") as fh:
        for env in envelopes:
            fh.write(env.rstrip(b"\n") + b"\n")
    return bundle
