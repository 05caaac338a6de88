"""Evidence is checked against keys from outside the bundle: forged, re-signed and malformed bundles fail.

Each case in testcases/evidence/<case>/case.toml takes a genuine, countersigned bundle, applies the
edits an attacker (or a broken disk) would, and states what `labmeter verify` must say with the
published key list (--trust) and without any trust source.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from labmeter import evidence, signing, wire
from labmeter.cli import app
from labmeter.cli.verify import VERIFY_UNTRUSTED
from labmeter.collector.ledger import Ledger
from labmeter.collector.reports.evidence import export_keys, write_bundle
from labmeter.verify import BundleError, verify_bundle
from tests.lab import store_schedule

T0 = 1_772_409_600_000  # 2026-03-02T00:00:00Z
M = 60_000
H = 60 * M
INSTRUMENT = "CZ-XRD-001"
DAY = [(0, 480, "OFF"), (480, 500, "STANDBY"), (500, 620, "RUNNING"), (620, 700, "STANDBY"), (700, 760, "RUNNING"), (760, 1440, "OFF")]  # fmt: skip
CASES = sorted((Path(__file__).parent / "testcases" / "evidence").iterdir())


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two days signed by lab-pc, bundled over both days and countersigned; and the published key list."""
    tmp = tmp_path_factory.mktemp("genuine")
    ledger = Ledger(tmp / "ledger.sqlite")
    spans = [(T0 + d * 1440 * M + a * M, T0 + d * 1440 * M + b * M, st) for d in (0, 1) for a, b, st in DAY]
    store_schedule(tmp, ledger, "lab-pc", INSTRUMENT, spans)
    collector = signing.generate_key_file(tmp / "collector.key")
    write_bundle(ledger, INSTRUMENT, T0, T0 + 48 * H, 900, 600, tmp / "bundle", collector)
    keys = tmp / "keys.json"
    keys.write_text(json.dumps(export_keys(ledger, collector.public_key(), T0 + 49 * H)))
    ledger.close()
    return tmp / "bundle", keys


# an attacker's (or a broken disk's) edits -------------------------------------
def envelopes(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / evidence.INTERVALS).read_text().splitlines() if x.strip()]


def write_envelopes(folder: Path, envs: list[dict[str, Any]]) -> None:
    (folder / evidence.INTERVALS).write_text(
        "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in envs)
    )


def load(folder: Path, name: str = evidence.BUNDLE) -> dict[str, Any]:
    return dict(json.loads((folder / name).read_text()))


def save(folder: Path, doc: dict[str, Any], name: str = evidence.BUNDLE) -> None:
    (folder / name).write_text(json.dumps(doc, indent=2))


def sealed(key: signing.PrivateKey, body: dict[str, Any]) -> dict[str, Any]:
    text = wire.dump_body(body)
    return {"kid": signing.key_id(key.public_key()), "body": text, "sig": signing.sign(key, text.encode())}


def rechain(key: signing.PrivateKey, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sign bodies with ``key``, each ``prev`` the hash of the one before (the first keeps its own)."""
    out: list[dict[str, Any]] = []
    for body in bodies:
        if out:
            body["prev"] = wire.body_hash(out[-1]["body"])
        out.append(sealed(key, body))
    return out


def op_resign(folder: Path, invent_running_h: float) -> None:
    """A new key for lab-pc, OFF turned into RUNNING (whole intervals) until the invented hours are reached,
    all re-signed."""
    key = signing.PrivateKey.generate()
    budget = invent_running_h * H
    bodies = [json.loads(e["body"]) for e in envelopes(folder)]
    for body in bodies:
        if body["state"] == "OFF" and budget > 0:
            budget -= body["end"] - body["start"]
            body["state"] = "RUNNING"
    assert budget <= 0, "the case asks for more invented time than there is OFF time"
    write_envelopes(folder, rechain(key, bodies))
    doc = load(folder)
    doc["agents"]["lab-pc"] = signing.public_key_text(key.public_key())
    save(folder, doc)


def op_add_agent(folder: Path, agent: str, running_h: float) -> None:
    """A second agent with its own key claims RUNNING over lab-pc's OFF intervals, starting 1 ms before each.

    Starting earlier wins the overlap in the hour rules; clock_step_ms hides the jumps in its chain.
    """
    key = signing.PrivateKey.generate()
    budget, bodies, prev_end = running_h * H, [], None
    for e in envelopes(folder):
        body = json.loads(e["body"])
        if body["state"] != "OFF" or body["end"] - body["start"] > budget:
            continue
        budget -= body["end"] - body["start"]
        start = body["start"] - 1
        bodies.append(
            {
                **body,
                "agent": agent,
                "seq": len(bodies) + 1,
                "prev": wire.GENESIS,
                "start": start,
                "state": "RUNNING",
                "clock_step_ms": 0 if prev_end is None else start - prev_end,
            }
        )
        prev_end = body["end"]
    write_envelopes(folder, envelopes(folder) + rechain(key, bodies))
    doc = load(folder)
    doc["agents"][agent] = signing.public_key_text(key.public_key())
    save(folder, doc)


def op_drop_last(folder: Path, n: int) -> None:
    write_envelopes(folder, envelopes(folder)[:-n])


def op_recount(folder: Path, gaps: bool = False) -> None:
    """Claims (and, if asked, the declared gaps) recomputed from what the bundle now holds."""
    res = verify_bundle(folder)
    doc = load(folder)
    doc["claimed"] = res.recomputed
    doc["intervals"] = res.checked
    if gaps:
        doc["gaps"] = [list(g) for g in res.gaps]
    save(folder, doc)


def op_recountersign(folder: Path) -> None:
    """A new manifest over the edited files, signed with the forger's own 'collector' key."""
    doc = load(folder)
    files = {name: (folder / name).read_bytes() for name in evidence.COUNTERSIGNED}
    save(folder, evidence.countersign(signing.PrivateKey.generate(), evidence.manifest_body(doc, files)), evidence.MANIFEST)  # fmt: skip


def op_set(folder: Path, key: str, value: Any, file: str = evidence.BUNDLE) -> None:
    doc = load(folder, file)
    doc[key] = value
    save(folder, doc, file)


def op_add_claim(folder: Path, key: str, hours: float) -> None:
    doc = load(folder)
    doc["claimed"][key] += int(hours * H)
    save(folder, doc)


def op_unset(folder: Path, key: str, file: str = evidence.BUNDLE) -> None:
    doc = load(folder, file)
    del doc[key]
    save(folder, doc, file)


def op_delete(folder: Path, file: str) -> None:
    (folder / file).unlink()


def op_write(folder: Path, file: str, text: str) -> None:
    (folder / file).write_text(text)


def op_cut_line(folder: Path, line: int, keep: int, file: str = evidence.INTERVALS) -> None:
    lines = (folder / file).read_text().splitlines()
    lines[line - 1] = lines[line - 1][:keep]
    (folder / file).write_text("\n".join(lines) + "\n")


def op_forge_signature(folder: Path, line: int) -> None:
    envs = envelopes(folder)
    envs[line - 1]["sig"] = base64.b64encode(b"\0" * 64).decode()
    write_envelopes(folder, envs)


OPS: dict[str, Callable[..., None]] = {
    name.removeprefix("op_"): fn for name, fn in globals().items() if name.startswith("op_")
}


def run_verify(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["verify", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.stdout + res.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tampered_bundle(case: Path, genuine: tuple[Path, Path], tmp_path: Path) -> None:
    spec = tomllib.loads((case / "case.toml").read_text())
    folder, keys = genuine
    bad = tmp_path / "bundle"
    shutil.copytree(folder, bad)
    for edit in spec["edits"]:
        args = dict(edit)
        OPS[args.pop("op")](bad, **args)
    for mode, extra in (("with_trust", ["--trust", str(keys)]), ("without_trust", [])):
        want = spec.get(mode) or spec["both"]
        code, out = run_verify(str(bad), *extra)
        shown = out.replace(str(bad), "BUNDLE")
        assert code == want["status"], f"{mode}: exit {code}\n{shown}"
        for text in want["output"]:
            assert text in shown, f"{mode}: {text!r} not in\n{shown}"
        assert "Traceback" not in out


# the genuine bundle ------------------------------------------------------------
def test_genuine_bundle_verifies_with_trust_file_and_with_fingerprints(genuine: tuple[Path, Path]) -> None:
    folder, keys = genuine
    agent_fp = signing.key_id(signing.load_private_key(folder.parent / "lab-pc.key").public_key())
    collector_fp = signing.key_id(signing.load_private_key(folder.parent / "collector.key").public_key())
    n = len((folder / evidence.INTERVALS).read_text().splitlines())
    code, out = run_verify(str(folder), "--trust", str(keys))
    assert code == 0, out
    for text in (
        f"instrument  {INSTRUMENT}",
        "period      2026-03-02T00:00:00Z to 2026-03-04T00:00:00Z (48.000 h)",
        f"key         agent lab-pc: {agent_fp} trusted",
        f"key         collector: {collector_fp} trusted",
        f"countersig  valid, by collector key {collector_fp} (trusted)",
        f"intervals   lab-pc: {n} in the bundle, {n} with a valid signature",
        f"run: claimed {6.0:10.3f} h, recomputed {6.0:10.3f} h",
        f"OK: {n} signed interval(s) check out",
    ):
        assert text in out, out
    assert "DISCREPANCY" not in out and "WARNING" not in out
    code, out = run_verify(str(folder), "--key", agent_fp, "--key", collector_fp.upper())
    assert code == 0 and f"key         agent lab-pc: {agent_fp} trusted" in out, out
    # a fingerprint list that leaves out the collector does not vouch for the countersignature
    code, out = run_verify(str(folder), "--key", agent_fp)
    assert code == 1 and f"DISCREPANCY manifest.json: collector key {collector_fp} is not in" in out, out
    code, out = run_verify(str(folder))
    assert code == VERIFY_UNTRUSTED and "WARNING: keys were NOT checked" in out, out
    assert f"key         agent lab-pc: {agent_fp} NOT CHECKED" in out


def test_key_list_names_agents_fingerprints_and_instruments(genuine: tuple[Path, Path]) -> None:
    folder, keys = genuine
    doc = json.loads(keys.read_text())
    pub = signing.load_private_key(folder.parent / "lab-pc.key").public_key()
    assert doc["format"] == evidence.KEYS_FORMAT and doc["generated_at"] == "2026-03-04T01:00:00+00:00"
    assert doc["agents"] == [
        {
            "id": "lab-pc",
            "key": signing.public_key_text(pub),
            "fingerprint": signing.key_id(pub),
            "instruments": [INSTRUMENT],
        }
    ]
    assert doc["collector"]["fingerprint"] == signing.key_id(
        signing.load_private_key(folder.parent / "collector.key").public_key()
    )


def test_agent_enrolled_elsewhere_in_the_key_list_is_a_discrepancy(
    genuine: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, keys = genuine
    doc = json.loads(keys.read_text())
    doc["agents"][0]["instruments"] = ["CZ-OTHER"]
    (tmp_path / "keys.json").write_text(json.dumps(doc))
    code, out = run_verify(str(folder), "--trust", str(tmp_path / "keys.json"))
    assert code == 1 and f"agent lab-pc is not enrolled for {INSTRUMENT} in the trust source" in out, out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{", "keys.json:1: not JSON"),
        ('{"format": "labmeter-keys/1"}', "keys.json: missing 'agents'"),
        ('{"format": "other"}', "keys.json: format 'other' is not 'labmeter-keys/1'"),
        (
            '{"format": "labmeter-keys/1", "agents": [{"id": "a", "key": "ed25519:xx", "instruments": []}]}',
            "keys.json: agents[0] (a): public key 'ed25519:xx'",
        ),
    ],
)
def test_bad_trust_file_is_named(
    genuine: tuple[Path, Path], tmp_path: Path, content: str, expected: str
) -> None:
    (tmp_path / "keys.json").write_text(content)
    code, out = run_verify(str(genuine[0]), "--trust", str(tmp_path / "keys.json"))
    assert code == 2 and expected in out and "Traceback" not in out, out


def test_bad_fingerprint_is_named(genuine: tuple[Path, Path]) -> None:
    code, out = run_verify(str(genuine[0]), "--key", "nothex")
    assert code == 2 and "--key 'nothex': expected a fingerprint of 16 hex digits" in out, out


def test_format_1_bundle_verifies_with_a_note(genuine: tuple[Path, Path], tmp_path: Path) -> None:
    """A bundle written before countersignatures (no manifest, no gaps) still verifies, and says it carries none."""
    folder, keys = genuine
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / evidence.MANIFEST).unlink()
    (old / evidence.SERVICES).unlink()
    doc = load(old)
    doc["format"] = evidence.FORMAT_V1
    del doc["gaps"], doc["services"]
    for key in evidence.SERVICE_CLAIMS:
        del doc["claimed"][key]
    save(old, doc)
    code, out = run_verify(str(old), "--trust", str(keys))
    assert code == 0, out
    assert "countersig  none (format 1 bundle)" in out
    assert "note        format 1 bundle: it carries no countersignature by the collector" in out


def test_declared_gap_is_not_a_discrepancy(tmp_path: Path) -> None:
    """Time the agent did not report is declared by the collector and verifies; undeclared, it would not."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store_schedule(tmp_path, ledger, "lab-pc", INSTRUMENT, [(T0 + 60 * M, T0 + 600 * M, "RUNNING")])
    key = signing.PrivateKey.generate()
    bundle = write_bundle(ledger, INSTRUMENT, T0, T0 + 720 * M, 900, 600, tmp_path / "b", key)
    ledger.close()
    assert bundle["gaps"] == [[T0, T0 + 60 * M], [T0 + 600 * M, T0 + 720 * M]]
    res = verify_bundle(tmp_path / "b")
    assert res.ok, [str(f) for f in res.findings]
    assert res.recomputed["uncovered_ms"] == 180 * M == sum(e - s for s, e in res.gaps)


def test_verify_runs_without_the_collector_installed(genuine: tuple[Path, Path]) -> None:
    """An evaluator installs labmeter's core only: verify must not import labmeter.collector."""
    folder, keys = genuine
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'labmeter.collector' or name.startswith('labmeter.collector.'):\n"
        "            raise ImportError('collector not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from labmeter.cli import main\n"
        f"sys.argv = ['labmeter', 'verify', {str(folder)!r}, '--trust', {str(keys)!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK:" in proc.stdout, proc.stdout + proc.stderr


def test_bundle_from_each_ledger_backend_verifies_against_its_key_list(
    any_ledger: Ledger, tmp_path: Path
) -> None:
    """The writer reads envelopes and keys through the ledger, so PostgreSQL bundles are the same evidence."""
    spans = [(T0 + a * M, T0 + b * M, st) for a, b, st in DAY]
    store_schedule(tmp_path, any_ledger, "lab-pc", INSTRUMENT, spans)
    collector = signing.PrivateKey.generate()
    write_bundle(any_ledger, INSTRUMENT, T0 + 360 * M, T0 + 1080 * M, 900, 600, tmp_path / "b", collector)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(export_keys(any_ledger, collector.public_key(), T0)))
    code, out = run_verify(str(tmp_path / "b"), "--trust", str(keys))
    assert code == 0, out
    assert f"run: claimed {3.0:10.3f} h, recomputed {3.0:10.3f} h" in out


HOSTILE = [None, True, "x", -1, 1.5, 10**30, [], {}, [[1, "a"]], {"lab-pc": 1}]


def test_no_hostile_value_in_any_field_gives_a_traceback(genuine: tuple[Path, Path], tmp_path: Path) -> None:
    """Every field of bundle.json and manifest.json replaced by every hostile value: a discrepancy or a named
    error, never an exception and never OK."""
    folder, keys = genuine
    trust = evidence.load_trust(keys)
    seen = 0
    for name in (evidence.BUNDLE, evidence.MANIFEST):
        for key in load(folder, name):
            for value in HOSTILE:
                bad = tmp_path / f"{seen}"
                shutil.copytree(folder, bad)
                op_set(bad, key, value, name)
                try:
                    res = verify_bundle(bad, trust)
                except BundleError as exc:
                    assert name in str(exc), (key, value, exc)
                else:
                    assert not res.ok, (name, key, value)
                seen += 1
    assert seen >= 10 * len(HOSTILE)


def test_every_cut_of_an_envelope_line_is_named(genuine: tuple[Path, Path], tmp_path: Path) -> None:
    folder, keys = genuine
    trust = evidence.load_trust(keys)
    line = (folder / evidence.INTERVALS).read_text().splitlines()[2]
    for keep in range(0, len(line), 7):
        bad = tmp_path / f"cut{keep}"
        shutil.copytree(folder, bad)
        op_cut_line(bad, 3, keep)
        try:
            res = verify_bundle(bad, trust)
        except BundleError as exc:
            assert "intervals.jsonl:3: not a signed interval" in str(exc)
        else:  # an empty line is skipped: then the missing link is named
            assert keep == 0 and any("missing: the chain breaks here" in f.problem for f in res.findings)


def test_export_keys_to_stdout_creates_the_collector_key_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    store_schedule(tmp_path, ledger, "lab-pc", INSTRUMENT, [(T0, T0 + H, "RUNNING")])
    ledger.close()
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'[collector]\ndata_dir = "{tmp_path}"\n')
    first = CliRunner().invoke(app, ["collector", "export-keys", "-c", str(cfg)])
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert [a["id"] for a in doc["agents"]] == ["lab-pc"]
    key = signing.load_private_key(tmp_path / "collector.key")
    assert doc["collector"]["key"] == signing.public_key_text(key.public_key())
    again = json.loads(CliRunner().invoke(app, ["collector", "export-keys", "-c", str(cfg)]).stdout)
    assert again["collector"] == doc["collector"]
