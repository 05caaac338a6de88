"""Evidence bundles carry the instrument's service records: `verify` recomputes service and external
service hours from them, names a changed or dropped record, and older (format 2) bundles still verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from labmeter import evidence, signing
from labmeter.collector.ledger import Ledger
from labmeter.collector.reports.evidence import export_keys, write_bundle
from labmeter.verify import BundleError, H, verify_bundle
from tests.lab import store_schedule

COLLECTOR = signing.PrivateKey.generate()
T0 = 1_772_409_600_000  # 2026-03-02T00:00:00Z
M = 60_000
INSTRUMENT = "CZ-XRD-001"
SCHEDULE = [(0, 480, "OFF"), (480, 500, "STANDBY"), (500, 620, "RUNNING"), (620, 700, "STANDBY"), (700, 760, "RUNNING"), (760, 1440, "OFF")]  # fmt: skip
SERVICES = [  # (start, end minutes, type): an internal booking over the first run, an external one over the second
    (490, 630, 120),
    (690, 770, 130),
]


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, Path, Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store_schedule(
        tmp_path, ledger, "lab-pc", INSTRUMENT, [(T0 + a * M, T0 + b * M, st) for a, b, st in SCHEDULE]
    )
    ledger.add_service_records(
        [
            {
                "instrument": INSTRUMENT,
                "start_ms": T0 + a * M,
                "end_ms": T0 + b * M,
                "service_type": t,
                "applicant": f"u{a}",
            }
            for a, b, t in SERVICES
        ]
    )
    out = tmp_path / "bundle"
    write_bundle(ledger, INSTRUMENT, T0 + 360 * M, T0 + 1080 * M, 900, 600, out, COLLECTOR)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(export_keys(ledger, COLLECTOR.public_key(), 0)))
    return out, keys, ledger


def load(folder: Path, name: str = evidence.BUNDLE) -> dict:
    return json.loads((folder / name).read_text())


def services(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / evidence.SERVICES).read_text().splitlines() if x.strip()]


def write_services(folder: Path, recs: list[dict]) -> None:
    (folder / evidence.SERVICES).write_text("".join(json.dumps(r) + "\n" for r in recs))


def findings(folder: Path, keys: Path) -> list[str]:
    return [str(f) for f in verify_bundle(folder, evidence.load_trust(keys)).findings]


def test_bundle_claims_service_hours_that_verify_and_match_the_report(
    bundle: tuple[Path, Path, Ledger],
) -> None:
    from labmeter.collector.reports.hours import hours_report
    from labmeter.config import PolicyConfig

    folder, keys, ledger = bundle
    doc = load(folder)
    assert doc["format"] == evidence.FORMAT and doc["services"] == 2
    assert len(services(folder)) == 2 and "applicant" not in services(folder)[0]
    res = verify_bundle(folder, evidence.load_trust(keys))
    assert res.ok, [str(f) for f in res.findings]
    # internal booking 08:10-10:30 holds the 08:20-10:20 run and 10 min of post allowance (standby
    # 08:05-08:20 before it is the prep allowance, inside the booking from 08:10: 10 min)
    assert res.recomputed["service_ms"] == doc["claimed"]["service_ms"] > res.recomputed["external_ms"] > 0
    report = {
        r.key: r
        for r in hours_report(
            ledger, T0 + 360 * M, T0 + 1080 * M, PolicyConfig(timezone="UTC"), now_ms=T0 + 2000 * M
        )
    }
    assert report[INSTRUMENT].hours.service_ms == res.recomputed["service_ms"]
    assert report[INSTRUMENT].hours.external_ms == res.recomputed["external_ms"]


def test_changed_service_record_is_named(bundle: tuple[Path, Path, Ledger]) -> None:
    """The internal booking relabelled external, to raise the scored external service hours."""
    folder, keys, _ = bundle
    recs = services(folder)
    claimed = load(folder)["claimed"]
    recs[0]["service_type"] = 130
    write_services(folder, recs)
    got = findings(folder, keys)
    assert "manifest.json: services.jsonl changed after the collector signed it (SHA-256 differs)" in got
    assert (
        f"hours external: claimed {claimed['external_ms'] / H:.3f} h, recomputed {claimed['service_ms'] / H:.3f} h"
        in got
    ), got


def test_changed_claim_and_record_under_a_forged_countersignature_are_caught(
    bundle: tuple[Path, Path, Ledger],
) -> None:
    folder, keys, _ = bundle
    recs = services(folder)
    recs[0]["service_type"] = 130
    write_services(folder, recs)
    doc = load(folder)
    doc["claimed"]["external_ms"] = doc["claimed"]["service_ms"]
    (folder / evidence.BUNDLE).write_text(json.dumps(doc))
    files = {name: (folder / name).read_bytes() for name in evidence.COUNTERSIGNED}
    forged = evidence.countersign(signing.PrivateKey.generate(), evidence.manifest_body(doc, files))
    (folder / evidence.MANIFEST).write_text(json.dumps(forged))
    got = findings(folder, keys)
    assert any("not by the trusted collector key" in f for f in got), got


def test_dropped_service_record_is_named(bundle: tuple[Path, Path, Ledger]) -> None:
    folder, keys, _ = bundle
    write_services(folder, services(folder)[:1])
    got = findings(folder, keys)
    assert any(f.startswith("hours external: claimed") and "recomputed 0.000 h" in f for f in got), got
    assert any(f.startswith("hours service: claimed") for f in got), got


def test_malformed_service_line_names_file_and_line(bundle: tuple[Path, Path, Ledger]) -> None:
    folder, _keys, _ = bundle
    recs = services(folder)
    recs[1]["service_type"] = "external"
    write_services(folder, recs)
    with pytest.raises(BundleError, match=r"services.jsonl:2: service_type must be 120 or 130"):
        verify_bundle(folder)
    (folder / evidence.SERVICES).unlink()
    with pytest.raises(BundleError, match=r"services.jsonl: missing"):
        verify_bundle(folder)


def test_format_2_bundle_without_service_records_still_verifies(
    bundle: tuple[Path, Path, Ledger], tmp_path: Path
) -> None:
    """A bundle written before service records were carried: format 2, countersigned over two files."""
    folder, keys, _ = bundle
    old = tmp_path / "v2"
    shutil.copytree(folder, old)
    (old / evidence.SERVICES).unlink()
    doc = load(old)
    doc["format"] = evidence.FORMAT_V2
    del doc["services"]
    for key in evidence.SERVICE_CLAIMS:
        del doc["claimed"][key]
    text = (json.dumps(doc, indent=2) + "\n").encode()
    (old / evidence.BUNDLE).write_bytes(text)
    files = {evidence.BUNDLE: text, evidence.INTERVALS: (old / evidence.INTERVALS).read_bytes()}
    (old / evidence.MANIFEST).write_text(
        json.dumps(evidence.countersign(COLLECTOR, evidence.manifest_body(doc, files)))
    )
    assert set(json.loads(json.loads((old / evidence.MANIFEST).read_text())["body"])["files"]) == {
        evidence.BUNDLE,
        evidence.INTERVALS,
    }
    res = verify_bundle(old, evidence.load_trust(keys))
    assert res.ok, [str(f) for f in res.findings]
    assert res.version == 2 and res.services is None and "service_ms" not in res.recomputed
