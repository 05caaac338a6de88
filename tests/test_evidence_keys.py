"""The evidence format's key handling on its own: the published key list and what `verify` accepts as
trust (a key list, fingerprints, whole keys), and the exact manifest text the collector signs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labmeter import evidence, signing

COLLECTOR = signing.PrivateKey.generate().public_key()
A = signing.PrivateKey.generate().public_key()
B = signing.PrivateKey.generate().public_key()


def test_the_key_list_names_what_it_was_given_and_nothing_else() -> None:
    agents = [("b1", signing.public_key_text(B), ["I9", "I2"]), ("a1", signing.public_key_text(A), ["I1"])]
    doc = evidence.keys_document(COLLECTOR, agents, 1_780_000_000_000, ledger_id="L-1")
    assert doc["format"] == evidence.KEYS_FORMAT
    assert doc["generated_at"] == "2026-05-28T20:26:40+00:00"
    assert doc["ledger_id"] == "L-1"
    assert doc["collector"] == {
        "key": signing.public_key_text(COLLECTOR),
        "fingerprint": signing.key_id(COLLECTOR),
    }
    assert [a["id"] for a in doc["agents"]] == ["a1", "b1"]
    assert doc["agents"][1]["instruments"] == ["I2", "I9"]
    assert doc["agents"][0]["fingerprint"] == signing.key_id(A)
    bare = evidence.keys_document(None, [], 1_780_000_000_000)
    assert "ledger_id" not in bare and "collector" not in bare and bare["agents"] == []


def test_a_key_list_round_trips_into_trust(tmp_path: Path) -> None:
    doc = evidence.keys_document(COLLECTOR, [("a1", signing.public_key_text(A), ["I1", "I2"])], 0)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(doc))
    trust = evidence.load_trust(path)
    assert trust.collector == signing.public_key_text(COLLECTOR)
    assert trust.agents["a1"].fingerprint == signing.key_id(A)
    assert trust.agents["a1"].instruments == frozenset({"I1", "I2"})
    assert trust.sources == [f"key list {path}"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format=3), "'format' must be a str"),
        (lambda d: d.update(format="labmeter-keys/2"), "is not 'labmeter-keys/1'"),
        (lambda d: d["agents"][0].update(instruments=["I1", 7]), "list of instrument codes"),
        (lambda d: d["agents"][0].update(instruments="I1"), "'instruments' must be a list"),
        (lambda d: d["agents"][0].pop("key"), "missing 'key'"),
        (lambda d: d["collector"].update(key="ed25519:short"), "collector"),
    ],
)
def test_a_bad_key_list_is_refused_naming_the_entry(tmp_path: Path, change: object, message: str) -> None:
    doc = evidence.keys_document(COLLECTOR, [("a1", signing.public_key_text(A), ["I1"])], 0)
    change(doc)  # type: ignore[operator]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(evidence.TrustError, match=str(path)) as e:
        evidence.load_trust(path)
    assert message in str(e.value)


def test_fingerprints_and_whole_keys_are_accepted_and_anything_else_refused() -> None:
    fp = signing.key_id(A)
    trust = evidence.add_fingerprints([fp.upper(), "  " + signing.public_key_text(B) + " "])
    assert trust.fingerprints == {fp, signing.key_id(B)}
    assert trust.sources == ["2 --key fingerprint(s)"]
    assert evidence.add_fingerprints([]).sources == []
    for bad in (fp[:15], "g" * 16, fp + "0"):
        with pytest.raises(evidence.TrustError, match="16 hex digits"):
            evidence.add_fingerprints([bad])


def test_the_manifest_text_is_canonical_json_with_the_text_as_written() -> None:
    bundle = {
        "format": evidence.FORMAT,
        "instrument": "X射线衍射仪",
        "from_ms": 1,
        "to_ms": 2,
        "claimed": {"b": 1, "a": 2},
    }
    files = {name: name.encode() for name in evidence.COUNTERSIGNED}
    body = evidence.manifest_body(bundle, files)
    assert "X射线衍射仪" in body  # UTF-8 as is: the signed text is what an evaluator reads
    assert ", " not in body and ": " not in body
    assert body.index('"claimed"') < body.index('"files"') < body.index('"format"') < body.index('"from_ms"')
    assert body.index('"a"') < body.index('"b"')
    assert json.loads(body)["files"] == {n: evidence.file_hash(n.encode()) for n in evidence.COUNTERSIGNED}
    assert evidence.countersigned("labmeter-evidence/unknown") == (evidence.BUNDLE, evidence.INTERVALS)
