"""`labmeter verify`: the auditor's check of an evidence bundle; it needs neither the collector nor its ledger."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from labmeter.cli.common import fail

VERIFY_UNTRUSTED = 3
"""Exit status of a bundle that is consistent but whose keys were not checked against a trust source."""


@click.command("verify")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--trust",
    "trust_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Key list from `labmeter collector export-keys`, as published by the owner or the bureau.",
)
@click.option(
    "--key",
    "fingerprints",
    multiple=True,
    help="A trusted key's fingerprint (16 hex digits) or ed25519:... text (repeat; agents and collector).",
)
def verify(folder: Path, trust_file: Path | None, fingerprints: tuple[str, ...]) -> None:
    """Re-check an evidence bundle: keys against a trust source, signatures, chain, coverage, hours, countersignature.

    Exit status: 0 all checks pass and every key is in the trust source; 1 discrepancies; 2 the bundle
    or trust file cannot be read; 3 no discrepancy, but keys were not checked (no --trust or --key).
    """
    from labmeter import evidence
    from labmeter.verify import BundleError, H, iso, verify_bundle

    trust = None
    try:
        if trust_file is not None:
            trust = evidence.load_trust(trust_file)
        if fingerprints:
            trust = evidence.add_fingerprints(fingerprints, trust)
        res = verify_bundle(folder, trust)
    except (BundleError, evidence.TrustError) as exc:
        fail(str(exc))
    click.echo(f"bundle      {folder} (format {res.version})")
    click.echo(f"instrument  {res.instrument}")
    click.echo(f"period      {iso(res.from_ms)} to {iso(res.to_ms)} ({(res.to_ms - res.from_ms) / H:.3f} h)")
    for k in res.keys:
        click.echo(f"key         {k.who}: {k.fingerprint} {k.status}")
    click.echo(f"countersig  {res.countersignature}")
    for agent, (n, good) in res.counts.items():
        click.echo(f"intervals   {agent}: {n} in the bundle, {good} with a valid signature")
    click.echo(f"intervals   {res.checked} in all")
    if res.services is not None:
        click.echo(f"services    {res.services} service record(s)")
    for s, e in res.gaps:
        click.echo(f"gap         {iso(s)} to {iso(e)} ({(e - s) / H:.3f} h, no interval)")
    for r in res.restarts:
        click.echo(f"new chain   {r}")
    for note in res.notes:
        click.echo(f"note        {note}")
    for f in res.findings:
        click.echo(f"DISCREPANCY {f}")
    shown = ("run_ms", "effective_ms", "unknown_ms", "unverified_ms", "uncovered_ms")
    for key in (*shown, *(k for k in evidence.SERVICE_CLAIMS if k in res.recomputed)):
        claimed = f"{res.claimed[key] / H:10.3f} h" if key in res.claimed else "      none"
        click.echo(
            f"{key.removesuffix('_ms'):>11}: claimed {claimed}, recomputed {res.recomputed.get(key, 0) / H:10.3f} h"
        )
    if "energy_mwh" in res.claimed or res.recomputed.get("energy_ms"):
        claimed = (
            f"{res.claimed['energy_mwh'] / 1e6:10.3f} kWh" if "energy_mwh" in res.claimed else "      none"
        )
        click.echo(
            f"     energy: claimed {claimed}, recomputed {res.recomputed['energy_mwh'] / 1e6:10.3f} kWh"
        )
    if not res.ok:
        click.echo(f"FAILED: {len(res.findings)} discrepancy(ies) in {res.checked} interval(s)")
        sys.exit(1)
    if not res.keys_checked:
        click.echo(
            "WARNING: keys were NOT checked: the bundle's own keys were used, and anyone can re-sign a "
            "bundle with keys of their own. Check against the published key list: "
            f"labmeter verify {folder} --trust KEYS.json (or --key FINGERPRINT for every key above)"
        )
        click.echo(
            f"UNCHECKED: {res.checked} signed interval(s) are consistent, but their keys were not checked"
        )
        sys.exit(VERIFY_UNTRUSTED)
    click.echo(
        f"OK: {res.checked} signed interval(s) check out, the hours match, and every key is in {res.trust}"
    )
