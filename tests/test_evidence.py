"""Evidence bundles re-check without the ledger; every kind of tampering is named and changes the totals."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labmeter import signing, wire
from labmeter.collector.ledger import Ledger
from labmeter.collector.reports.evidence import write_bundle
from labmeter.verify import H, verify_bundle
from labmeter.wire import State
from tests.lab import store_schedule

COLLECTOR = signing.PrivateKey.generate()
T0 = 1_772_409_600_000  # 2026-03-02T00:00:00Z
M = 60_000
# one day: OFF, STANDBY, RUNNING 2 h, STANDBY, RUNNING 1 h, OFF
DAY = [
    (0, 480, State.OFF),
    (480, 500, State.STANDBY),
    (500, 620, State.RUNNING),
    (620, 700, State.STANDBY),
    (700, 760, State.RUNNING),
    (760, 1440, State.OFF),
]


def build(tmp: Path) -> tuple[Ledger, list[int]]:
    """The day signed by an agent (cut at hours) and stored; returns the seqs of the RUNNING intervals."""
    ledger = Ledger(tmp / "ledger.sqlite")
    store_schedule(
        tmp, ledger, "lab-pc", "CZ-XRD-001", [(T0 + a * M, T0 + b * M, st.value) for a, b, st in DAY]
    )
    running_seqs = [
        r[0] for r in ledger.db.execute("SELECT seq FROM intervals WHERE state='RUNNING' ORDER BY seq")
    ]
    return ledger, running_seqs


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, list[int]]:
    ledger, running = build(tmp_path)
    out = tmp_path / "bundle"
    # the period is 06:00-18:00, so the first interval in it has a predecessor to link to
    write_bundle(ledger, "CZ-XRD-001", T0 + 360 * M, T0 + 1080 * M, 900, 600, out, COLLECTOR)
    ledger.close()
    return out, running


def lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "intervals.jsonl").read_text().splitlines()]


def seq_of(env: dict) -> int:
    return int(json.loads(env["body"])["seq"])


def rewrite(folder: Path, envs: list[dict]) -> None:
    (folder / "intervals.jsonl").write_text(
        "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in envs)
    )


def test_untouched_bundle_verifies(bundle: tuple[Path, list[int]]) -> None:
    folder, _ = bundle
    res = verify_bundle(folder)
    assert res.ok, [str(f) for f in res.findings]
    assert res.recomputed["run_ms"] == 180 * M
    # 15 min of the 20-min standby before the first run (prep cap), 10 + 15 of the 80 min between the runs
    assert res.recomputed["effective_ms"] == (180 + 15 + 10 + 15) * M
    assert res.claimed == res.recomputed


def test_edited_hours_are_named(bundle: tuple[Path, list[int]], tmp_path: Path) -> None:
    folder, running = bundle
    bad = tmp_path / "edited"
    shutil.copytree(folder, bad)
    envs = lines(bad)
    target = running[0]
    for e in envs:
        if seq_of(e) == target:
            body = json.loads(e["body"])
            body["end"] += 30 * M  # claim half an hour more running
            e["body"] = wire.dump_body(body)
    rewrite(bad, envs)
    res = verify_bundle(bad)
    where = [f.where for f in res.findings]
    assert any(f"seq {target})" in w for w in where), where
    assert any("signature" in f.problem for f in res.findings)
    # the forged 40-min interval no longer counts, and the 60-min one after it is unverified (no link)
    assert res.recomputed["run_ms"] == (180 - 40 - 60) * M
    assert res.recomputed["unverified_ms"] == 60 * M


def test_dropped_interval_is_named(bundle: tuple[Path, list[int]], tmp_path: Path) -> None:
    folder, running = bundle
    bad = tmp_path / "dropped"
    shutil.copytree(folder, bad)
    target = running[1]
    rewrite(bad, [e for e in lines(bad) if seq_of(e) != target])
    res = verify_bundle(bad)
    assert [str(f) for f in res.findings if "missing" in f.problem] == [
        f"lab-pc seq {target}: missing: the chain breaks here"
    ]
    # the dropped hour is uncovered; the 20 min after the break are unverified
    assert res.recomputed["run_ms"] == (180 - 60 - 20) * M
    assert res.recomputed["uncovered_ms"] == 60 * M
    assert res.recomputed["unverified_ms"] == 20 * M
    assert any(f.where == "hours run" for f in res.findings)


def test_changed_signature_is_named(bundle: tuple[Path, list[int]], tmp_path: Path) -> None:
    folder, running = bundle
    bad = tmp_path / "resigned"
    shutil.copytree(folder, bad)
    other = signing.PrivateKey.generate()
    envs = lines(bad)
    target = running[2]
    for e in envs:
        if seq_of(e) == target:
            e["sig"] = base64.b64encode(other.sign(e["body"].encode())).decode()
    rewrite(bad, envs)
    res = verify_bundle(bad)
    named = [str(f) for f in res.findings if "signature" in f.problem]
    assert len(named) == 1 and f"seq {target})" in named[0]
    assert res.recomputed["run_ms"] < res.claimed["run_ms"]


def test_cli_evidence_export_keys_and_verify(tmp_path: Path) -> None:
    """The owner's path: bundle and key list from the CLI; the evaluator's: verify against the key list."""
    ledger, _ = build(tmp_path)
    n = ledger.db.execute("SELECT COUNT(*) FROM intervals").fetchone()[0]
    ledger.close()
    (tmp_path / "collector.toml").write_text(
        f'[collector]\ndata_dir = "{tmp_path}"\nledger = "sqlite:///{tmp_path / "ledger.sqlite"}"\n'
    )
    run = [sys.executable, "-m", "labmeter"]
    cfg = ["-c", str(tmp_path / "collector.toml")]
    period = ["--from", "2026-03-02", "--to", "2026-03-02", "--tz", "UTC"]
    out = subprocess.run(
        [*run, "report", "evidence", "--instrument", "CZ-XRD-001", *period, "-o", str(tmp_path / "ev"), *cfg],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    collector_fp = signing.key_id(signing.load_private_key(tmp_path / "collector.key").public_key())
    assert f"countersigned by collector key {collector_fp}" in out.stdout
    keys = subprocess.run(
        [*run, "collector", "export-keys", "-o", str(tmp_path / "keys.json"), *cfg],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert keys.returncode == 0, keys.stderr
    assert f"1 agent key(s) and the collector key {collector_fp} written to" in keys.stderr
    ok = subprocess.run(
        [*run, "verify", str(tmp_path / "ev"), "--trust", str(tmp_path / "keys.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "OK:" in ok.stdout, ok.stdout
    run_h = sum(b - a for a, b, st in DAY if st is State.RUNNING) * M / H
    assert f"        run: claimed {run_h:10.3f} h, recomputed {run_h:10.3f} h" in ok.stdout, ok.stdout
    assert f"intervals   lab-pc: {n} in the bundle, {n} with a valid signature" in ok.stdout
    envs = lines(tmp_path / "ev")
    rewrite(tmp_path / "ev", envs[:5] + envs[6:])
    bad = subprocess.run(
        [*run, "verify", str(tmp_path / "ev"), "--trust", str(tmp_path / "keys.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert f"DISCREPANCY lab-pc seq {seq_of(envs[5])}: missing: the chain breaks here" in bad.stdout


def test_new_chain_after_lost_state_verifies(tmp_path: Path) -> None:
    """An agent that lost its state directory (but not its key) begins a new chain: verified, listed, and
    the time it was down counts as no data."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    before = [(T0, T0 + 600 * M, "OFF"), (T0 + 600 * M, T0 + 660 * M, "RUNNING")]
    store_schedule(tmp_path, ledger, "lab-pc", "CZ-XRD-001", before)
    for f in tmp_path.glob("lab-pc.db*"):
        f.unlink()
    time.sleep(0.05)  # the new chain begins later than one ms per link of the old one
    after = [(T0 + 690 * M, T0 + 750 * M, "RUNNING"), (T0 + 750 * M, T0 + 1440 * M, "OFF")]
    store_schedule(tmp_path, ledger, "lab-pc", "CZ-XRD-001", after)
    assert ledger.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0
    out = tmp_path / "bundle"
    claimed = write_bundle(ledger, "CZ-XRD-001", T0 + 360 * M, T0 + 1080 * M, 900, 600, out, COLLECTOR)[
        "claimed"
    ]
    ledger.close()
    res = verify_bundle(out)
    assert res.ok, res.findings
    assert len(res.restarts) == 1 and "2026-03-02T11:30:00Z" in res.restarts[0]
    assert claimed["run_ms"] == res.recomputed["run_ms"] == 120 * M
    assert claimed["uncovered_ms"] == 30 * M and claimed["unverified_ms"] == 0
    # the half hour it was down is a gap the collector declared, so it is no discrepancy
    assert res.gaps == [(T0 + 660 * M, T0 + 690 * M)]
