"""Each check of `labmeter verify` on its own, on bundles built here by hand, not by the collector.

tests/test_evidence_trust.py tampers with a genuine bundle the way an attacker would, so most edits
are caught by the first check they meet (usually the countersignature). Here a bundle is written as a
collector would write it, with the edit already made, and countersigned by the *trusted* collector
key: the check under test is the only one that can catch it. Each case states what verify must say;
the genuine variants (formats 1 to 3, no allowances, new chains, a clock step, blank lines) must verify.
The claims a draft carries come from labmeter.machine_hours and labmeter.energy directly, never from
verify itself, so a broken recomputation in verify cannot agree with its own claims.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labmeter import energy, evidence, signing, wire
from labmeter.machine_hours import compute, uncovered
from labmeter.verify import MAX_NAMED, BundleError, KeyCheck, Result, iso, verify_bundle

T0 = 1_772_409_600_000  # 2026-03-02T00:00:00Z
M = 60_000
H = 60 * M
INSTRUMENT = "CZ-XRD-001"
AGENT = signing.PrivateKey.generate()
OTHER = signing.PrivateKey.generate()
COLLECTOR = signing.PrivateKey.generate()
# minutes after T0: OFF, STANDBY, RUNNING 2 h, STANDBY, RUNNING 1 h, OFF; the period is the whole day
DAY = [
    (0, 480, "OFF"),
    (480, 500, "STANDBY"),
    (500, 620, "RUNNING"),
    (620, 700, "STANDBY"),
    (700, 760, "RUNNING"),
    (760, 1440, "OFF"),
]


def key_text(key: signing.PrivateKey) -> str:
    return signing.public_key_text(key.public_key())


def fingerprint(key: signing.PrivateKey) -> str:
    return signing.key_id(key.public_key())


def trust(
    agent_key: signing.PrivateKey = AGENT, collector: signing.PrivateKey | None = COLLECTOR
) -> evidence.Trust:
    """The published key list: lab-pc enrolled for the instrument, and the collector's key."""
    return evidence.Trust(
        agents={
            "lab-pc": evidence.TrustedAgent(
                key_text(agent_key), fingerprint(agent_key), frozenset({INSTRUMENT})
            )
        },
        collector=key_text(collector) if collector is not None else None,
        sources=["the test's key list"],
    )


def chain(
    spans: list[tuple[int, int, str]],
    agent: str = "lab-pc",
    first: int = 1,
    prev: str = wire.GENESIS,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Interval bodies over ``spans`` (minutes after T0), each ``prev`` the hash of the one before."""
    out: list[dict[str, Any]] = []
    for i, (a, b, state) in enumerate(spans):
        iv = wire.Interval(agent, INSTRUMENT, first + i, prev, T0 + a * M, T0 + b * M, state, **extra)
        out.append(iv.body())
        prev = wire.body_hash(wire.dump_body(out[-1]))
    return out


def relink(bodies: list[dict[str, Any]], start: int = 1) -> list[dict[str, Any]]:
    """Each body's ``prev`` from ``start`` on made the hash of the one before again, after an edit."""
    for i in range(max(start, 1), len(bodies)):
        bodies[i]["prev"] = wire.body_hash(wire.dump_body(bodies[i - 1]))
    return bodies


@dataclass
class Draft:
    """A bundle before it is written: edit any part, then ``write`` it (claims and gaps recomputed from
    the hour rules unless set, countersigned by ``collector`` unless None)."""

    bodies: list[dict[str, Any]] = field(default_factory=lambda: chain(DAY))
    signers: dict[str, signing.PrivateKey] = field(default_factory=lambda: {"lab-pc": AGENT})
    services: list[dict[str, Any]] = field(default_factory=list)
    fmt: str = evidence.FORMAT
    from_ms: int = T0
    to_ms: int = T0 + 1440 * M
    prep_s: int = 900
    post_s: int = 600
    claimed: dict[str, int] | None = None
    gaps: list[list[int]] | None = None
    collector: signing.PrivateKey | None = COLLECTOR
    extra: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    lines: list[bytes] | None = None
    service_lines: list[bytes] | None = None

    def rows(self) -> list[tuple[int, int, str, bool]]:
        """As verify reads them when every chain is intact: a link is linked unless it is a bundle's first
        link that does not begin a chain."""
        first: dict[str, int] = {}
        for body in self.bodies:
            first[body["agent"]] = min(first.get(body["agent"], body["seq"]), body["seq"])
        return [
            (b["start"], b["end"], b["state"], b["prev"] == wire.GENESIS or b["seq"] != first[b["agent"]])
            for b in self.bodies
        ]

    def claims(self) -> dict[str, int]:
        """What the collector would claim: the hour rules and energy over the bodies as drafted."""
        windows = [(s["start_ms"], s["end_ms"], s["service_type"] == 130) for s in self.services]
        h = compute(self.rows(), self.from_ms, self.to_ms, self.prep_s * 1000, self.post_s * 1000, windows)
        rows = [(b["start"], b["end"], energy.to_mwh(b.get("energy_wh"))) for b in self.bodies]
        mwh, known = energy.energy_in(rows, self.from_ms, self.to_ms)
        claimed = {**h.totals(), "energy_mwh": mwh, "energy_ms": known}
        if evidence.VERSIONS[self.fmt] >= 3:
            claimed.update(service_ms=h.service_ms, external_ms=h.external_ms)
        return claimed

    def write(self, folder: Path) -> Path:
        version = evidence.VERSIONS[self.fmt]
        claimed = self.claims()
        doc: dict[str, Any] = {
            "format": self.fmt,
            "instrument": INSTRUMENT,
            "from_ms": self.from_ms,
            "to_ms": self.to_ms,
            "prep_allowance_s": self.prep_s,
            "post_allowance_s": self.post_s,
            "agents": {a: key_text(k) for a, k in self.signers.items()},
            "claimed": claimed if self.claimed is None else self.claimed,
            "intervals": len(self.bodies),
        }
        if version >= 2:
            gaps = uncovered(self.rows(), self.from_ms, self.to_ms)
            doc["gaps"] = [list(g) for g in gaps] if self.gaps is None else self.gaps
        if version >= 3:
            doc["services"] = len(self.services)
        doc.update(self.extra)
        for key in self.drop:
            del doc[key]
        lines = self.lines
        if lines is None:
            lines = [wire.seal(self.signers[b["agent"]], "kid", wire.dump_body(b)) for b in self.bodies]
        files = {
            evidence.BUNDLE: json.dumps(doc, indent=2).encode(),
            evidence.INTERVALS: b"".join(x + b"\n" for x in lines),
        }
        if version >= 3:
            slines = self.service_lines
            if slines is None:
                slines = [json.dumps(s, sort_keys=True).encode() for s in self.services]
            files[evidence.SERVICES] = b"".join(x + b"\n" for x in slines)
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        if self.collector is not None:
            signed = {**doc, "claimed": doc.get("claimed")}
            manifest = evidence.countersign(self.collector, evidence.manifest_body(signed, files))
            (folder / evidence.MANIFEST).write_text(json.dumps(manifest))
        return folder


def service(a: int, b: int, external: bool = False, n: int = 1) -> dict[str, Any]:
    """A service record over minutes [a, b) after T0."""
    return {
        "id": n,
        "start_ms": T0 + a * M,
        "end_ms": T0 + b * M,
        "service_type": 130 if external else 120,
        "direction": "test",
        "applicant_unit": "unit",
        "amount": 0,
    }


def problems(res: Result) -> list[str]:
    return [str(f) for f in res.findings]


# genuine variants: each must verify against the key list ----------------------------------------------
def draft(**fields: Any) -> Callable[[Draft], None]:
    """An edit setting fields of the draft (a copy of each list or dict: cases share nothing)."""

    def edit(d: Draft) -> None:
        for name, value in fields.items():
            setattr(d, name, copy.deepcopy(value) if isinstance(value, list | dict) else value)

    return edit


def _a_clock_step_recorded_in_the_link(d: Draft) -> None:
    """The clock stepped 5 min forward before seq 4: its start is the previous end plus the recorded step."""
    d.bodies = relink(
        [
            *chain(DAY[:3]),
            *chain([(625, 700, "STANDBY")], first=4, clock_step_ms=5 * M),
            *chain(DAY[4:], first=5),
        ]
    )


def _a_blank_line_in_each_file(d: Draft) -> None:
    d.lines = [wire.seal(AGENT, "kid", wire.dump_body(b)) for b in d.bodies] + [b"  "]
    d.services = [service(500, 560)]
    d.service_lines = [b"", json.dumps(service(500, 560)).encode()]


GENUINE: dict[str, Callable[[Draft], None]] = {
    "as_the_collector_writes_it": draft(),
    "no_allowances": draft(prep_s=0, post_s=0),
    "format_1": draft(fmt=evidence.FORMAT_V1, collector=None),
    "format_2_with_a_declared_gap": draft(
        fmt=evidence.FORMAT_V2, bodies=chain(DAY[1:])
    ),  # nothing before 08:00
    "no_interval_count_in_bundle_json": draft(drop=("intervals",)),
    "a_new_chain_after_a_declared_gap": draft(bodies=chain(DAY[:3]) + chain(DAY[4:], first=1000)),
    "a_new_chain_at_the_second_link": draft(bodies=chain(DAY[:1]) + chain(DAY[1:], first=1000)),
    "service_records_internal_and_external": draft(
        services=[service(500, 560, n=1), service(700, 730, external=True, n=2)]
    ),
    "the_first_link_continues_a_chain_outside_the_bundle": draft(bodies=chain(DAY, first=5, prev="ab" * 32)),
    "a_clock_step_recorded_in_the_link": _a_clock_step_recorded_in_the_link,
    "a_blank_line_in_each_file": _a_blank_line_in_each_file,
}


@pytest.mark.parametrize("edit", GENUINE.values(), ids=GENUINE)
def test_a_genuine_bundle_verifies(edit: Callable[[Draft], None], tmp_path: Path) -> None:
    d = Draft()
    edit(d)
    res = verify_bundle(d.write(tmp_path / "b"), trust())
    assert res.ok, problems(res)
    assert res.keys_checked
    new_chains = [b for b in d.bodies if b["prev"] == wire.GENESIS][1:]
    assert res.restarts == [
        f"lab-pc seq {b['seq']}: a new chain begins at {iso(b['start'])}" for b in new_chains
    ]


# keys: what each key is reported as, and what an untrusted one costs ----------------------------------
def _signed_by_other(d: Draft) -> None:
    d.signers = {"lab-pc": OTHER}


def _an_agent_without_a_key(d: Draft) -> None:
    """A second agent's signed interval in the file, its key missing from bundle.json."""
    d.signers = {"lab-pc": AGENT, "lab-pc2": OTHER}
    d.bodies += chain([(0, 10, "RUNNING")], agent="lab-pc2")
    d.extra = {"agents": {"lab-pc": key_text(AGENT)}}


A, C, X = fingerprint(AGENT), fingerprint(COLLECTOR), fingerprint(OTHER)
KEYS: dict[
    str,
    tuple[
        Callable[[Draft], None], Callable[[], evidence.Trust | None], list[tuple[str, str, bool]], list[str]
    ],
] = {
    # (edit, trust, keys as (who, status, trusted), findings that must be among the problems)
    "no_trust_source": (
        lambda d: None,
        lambda: None,
        [("agent lab-pc", "NOT CHECKED", False), ("collector", "NOT CHECKED", False)],
        [],
    ),
    "key_list": (
        lambda d: None,
        trust,
        [("agent lab-pc", "trusted", True), ("collector", "trusted", True)],
        [],
    ),
    "fingerprints": (
        lambda d: None,
        lambda: evidence.add_fingerprints([A, C]),
        [("agent lab-pc", "trusted", True), ("collector", "trusted", True)],
        [],
    ),
    "agent_key_replaced_in_the_bundle": (
        _signed_by_other,
        trust,
        [("agent lab-pc", f"DIFFERS from trusted {A}", False), ("collector", "trusted", True)],
        [f"key of agent lab-pc: {X} in the bundle is not the trusted key {A}"],
    ),
    "agent_not_enrolled_for_this_instrument": (
        lambda d: None,
        lambda: evidence.Trust(
            agents={"lab-pc": evidence.TrustedAgent(key_text(AGENT), A, frozenset({"CZ-OTHER"}))},
            collector=key_text(COLLECTOR),
            sources=["k"],
        ),
        [("agent lab-pc", "trusted", True), ("collector", "trusted", True)],
        [f"key of agent lab-pc: agent lab-pc is not enrolled for {INSTRUMENT} in the trust source"],
    ),
    "agent_fingerprint_not_listed": (
        lambda d: None,
        lambda: evidence.add_fingerprints([C]),
        [("agent lab-pc", "NOT TRUSTED", False), ("collector", "trusted", True)],
        [
            f"key of agent lab-pc: {A} is not in the trust source",
            "agent lab-pc: 6 interval(s) not counted: its key is not trusted",
        ],
    ),
    "collector_key_differs_from_the_list": (
        draft(collector=OTHER),
        trust,
        [("agent lab-pc", "trusted", True), ("collector", f"DIFFERS from trusted {C}", False)],
        [f"manifest.json: countersigned by {X}, not by the trusted collector key {C}"],
    ),
    "collector_fingerprint_not_listed": (
        lambda d: None,
        lambda: evidence.add_fingerprints([A]),
        [("agent lab-pc", "trusted", True), ("collector", "NOT TRUSTED", False)],
        [f"manifest.json: collector key {C} is not in the trust source"],
    ),
    "an_agent_without_a_key_in_the_bundle": (
        _an_agent_without_a_key,
        trust,
        [("agent lab-pc", "trusted", True), ("collector", "trusted", True)],
        ["agent lab-pc2: 1 interval(s) not counted: no public key in bundle.json"],
    ),
}


@pytest.mark.parametrize(("edit", "source", "keys", "found"), KEYS.values(), ids=KEYS)
def test_each_key_is_reported_with_what_the_trust_source_says(
    edit: Callable[[Draft], None],
    source: Callable[[], evidence.Trust | None],
    keys: list[tuple[str, str, bool]],
    found: list[str],
    tmp_path: Path,
) -> None:
    d = Draft()
    edit(d)
    t = source()
    res = verify_bundle(d.write(tmp_path / "b"), t)
    fps = {
        "agent lab-pc": A if d.signers["lab-pc"] is AGENT else X,
        "collector": X if d.collector is OTHER else C,
    }
    assert res.keys == [KeyCheck(who, fps[who], status, ok) for who, status, ok in keys]
    got = problems(res)
    for text in found:
        assert any(p.startswith(text) for p in got), (text, got)
    assert res.ok is (not found)
    assert res.keys_checked is (t is not None and all(ok for _, _, ok in keys))


def test_keys_are_checked_only_with_a_trust_source_and_every_key_in_it() -> None:
    """The CLI's OK (rather than UNCHECKED) rests on this: any untrusted key, or no trust source, is not OK."""
    trusted, untrusted = (
        KeyCheck("agent a", A, "trusted", True),
        KeyCheck("collector", C, "NOT TRUSTED", False),
    )
    assert Result(trust="k", keys=[trusted]).keys_checked
    assert not Result(trust="k", keys=[trusted, untrusted]).keys_checked
    assert not Result(trust=None, keys=[trusted]).keys_checked
    assert not Result(trust=None, keys=[]).keys_checked


# signatures and instruments ---------------------------------------------------------------------------
def test_an_interval_of_another_instrument_is_named_and_not_counted(tmp_path: Path) -> None:
    """Genuinely signed RUNNING hours of another instrument, linked into this one's chain, count for nothing."""
    d = Draft(bodies=chain(DAY[:5]))
    other = wire.Interval(
        "lab-pc",
        "CZ-OTHER",
        6,
        wire.body_hash(wire.dump_body(d.bodies[-1])),
        T0 + 760 * M,
        T0 + 1440 * M,
        "RUNNING",
    )
    d.bodies.append(other.body())
    res = verify_bundle(d.write(tmp_path / "b"), trust())
    assert "intervals.jsonl:6 (lab-pc seq 6): belongs to instrument 'CZ-OTHER', not 'CZ-XRD-001'" in problems(
        res
    )
    assert res.recomputed["run_ms"] == 180 * M and res.recomputed["uncovered_ms"] == 680 * M
    assert res.claimed["run_ms"] == (180 + 680) * M and not res.ok
    assert res.counts == {"lab-pc": (6, 5)}


@pytest.mark.parametrize(
    "forged", [1, MAX_NAMED, MAX_NAMED + 1, MAX_NAMED + 3], ids=["one", "the_cap", "one_more", "three_more"]
)
def test_forged_signatures_are_named_up_to_the_cap_and_the_rest_counted(forged: int, tmp_path: Path) -> None:
    spans = [(i * 10, (i + 1) * 10, "RUNNING" if i % 2 else "OFF") for i in range(144)]
    d = Draft(bodies=chain(spans))
    d.lines = [
        wire.seal(OTHER if i < forged else AGENT, "kid", wire.dump_body(b)) for i, b in enumerate(d.bodies)
    ]
    res = verify_bundle(d.write(tmp_path / "b"), trust())
    named = [p for p in problems(res) if p.endswith("signature does not match the body (edited or forged)")]
    assert named == [
        f"intervals.jsonl:{n} (lab-pc seq {n}): signature does not match the body (edited or forged)"
        for n in range(1, min(forged, MAX_NAMED) + 1)
    ]
    more = [p for p in problems(res) if "more interval(s) whose signature does not match" in p]
    assert more == (
        [f"agent lab-pc: {forged - MAX_NAMED} more interval(s) whose signature does not match"]
        if forged > MAX_NAMED
        else []
    )
    assert res.counts == {"lab-pc": (144, 144 - forged)}
    assert res.recomputed["uncovered_ms"] == forged * 10 * M


# unreadable bundles: a named error, never a traceback and never a verdict -----------------------------
def _bundle_json(text: str) -> Callable[[Draft, Path], None]:
    def edit(d: Draft, folder: Path) -> None:
        (folder / evidence.BUNDLE).write_text(text)

    return edit


def _services_line(line: bytes) -> Callable[[Draft, Path], None]:
    def edit(d: Draft, folder: Path) -> None:
        (folder / evidence.SERVICES).write_bytes(
            json.dumps(service(500, 560)).encode() + b"\n" + line + b"\n"
        )

    return edit


def _drop(key: str) -> Callable[[Draft, Path], None]:
    def edit(d: Draft, folder: Path) -> None:
        doc = json.loads((folder / evidence.BUNDLE).read_text())
        del doc[key]
        (folder / evidence.BUNDLE).write_text(json.dumps(doc))

    return edit


def _set(**values: Any) -> Callable[[Draft, Path], None]:
    def edit(d: Draft, folder: Path) -> None:
        doc = json.loads((folder / evidence.BUNDLE).read_text())
        doc.update(values)
        (folder / evidence.BUNDLE).write_text(json.dumps(doc))

    return edit


def _unreadable_intervals(d: Draft, folder: Path) -> None:
    (folder / evidence.INTERVALS).unlink()
    (folder / evidence.INTERVALS).mkdir()


BAD = {
    name: (edit, text)
    for name, edit, text in [
        ("intervals_unreadable", _unreadable_intervals, "intervals.jsonl: cannot read (Is a directory)"),
        (
            "bundle_json_not_utf8",
            lambda d, f: (f / evidence.BUNDLE).write_bytes(b'{"format": "\xff"}'),
            "bundle.json: not UTF-8 text",
        ),
        ("not_an_object", _bundle_json("[1, 2]"), "bundle.json: not a JSON object"),
        *[
            (f"no_{k}", _drop(k), f"bundle.json: missing {k!r}")
            for k in (
                "format",
                "instrument",
                "from_ms",
                "to_ms",
                "prep_allowance_s",
                "post_allowance_s",
                "agents",
                "gaps",
            )
        ],
        ("empty_period", _set(to_ms=T0), "bundle.json: 'to_ms' is not after 'from_ms'"),
        ("reversed_period", _set(to_ms=T0 - 1), "bundle.json: 'to_ms' is not after 'from_ms'"),
        (
            "negative_allowance",
            _set(post_allowance_s=-1),
            "bundle.json: 'post_allowance_s' must be an integer >= 0",
        ),
        ("service_not_an_object", _services_line(b"[1]"), "services.jsonl:2: not a JSON object"),
        (
            "service_without_times",
            _services_line(b'{"service_type": 120}'),
            "services.jsonl:2: start_ms and end_ms must be integers",
        ),
        (
            "service_with_one_time",
            _services_line(json.dumps({**service(500, 560), "end_ms": "x"}).encode()),
            "services.jsonl:2: start_ms and end_ms",
        ),
        (
            "service_of_no_time",
            _services_line(json.dumps(service(500, 500)).encode()),
            "services.jsonl:2: start_ms and end_ms",
        ),
        (
            "service_ending_before_it_starts",
            _services_line(json.dumps(service(560, 500)).encode()),
            "services.jsonl:2: start_ms and end_ms",
        ),
        (
            "service_of_another_type",
            _services_line(json.dumps({**service(500, 560), "service_type": 121}).encode()),
            "services.jsonl:2: service_type must be 120 or 130, not 121",
        ),
    ]
}


@pytest.mark.parametrize(("edit", "text"), BAD.values(), ids=BAD)
def test_an_unreadable_bundle_is_a_named_error(
    edit: Callable[[Draft, Path], None], text: str, tmp_path: Path
) -> None:
    d = Draft(services=[service(500, 560)])
    folder = d.write(tmp_path / "b")
    edit(d, folder)
    with pytest.raises(BundleError) as exc:
        verify_bundle(folder, trust())
    assert str(exc.value).replace(f"{folder}/", "").startswith(text), str(exc.value)


# chains: every break is named, and what follows it counts as unverified ------------------------------
def _without(*seqs: int) -> Callable[[Draft], None]:
    def edit(d: Draft) -> None:
        d.bodies = [b for b in d.bodies if b["seq"] not in seqs]

    return edit


def _wrong_prev(d: Draft) -> None:
    d.bodies[3]["prev"] = "ab" * 32
    relink(d.bodies, 4)


def _moved_start(minutes: int) -> Callable[[Draft], None]:
    def edit(d: Draft) -> None:
        d.bodies[3]["start"] += minutes * M
        relink(d.bodies, 4)

    return edit


CHAINS = {
    # (edit, the finding, unverified minutes recomputed)
    "one_link_missing": (_without(3), "lab-pc seq 3: missing: the chain breaks here", 80),
    "two_links_missing": (_without(3, 4), "lab-pc seq 3-4: missing: the chain breaks here", 60),
    "prev_is_not_the_hash_before": (_wrong_prev, "lab-pc seq 4: prev does not match the previous body's hash", 80),
    "a_gap_between_links": (_moved_start(10), f"lab-pc seq 4: starts at {T0 + 630 * M}, previous ends at {T0 + 620 * M}", 70),
    "an_overlap_between_links": (_moved_start(-10), f"lab-pc seq 4: starts at {T0 + 610 * M}, previous ends at {T0 + 620 * M}", 80),
}  # fmt: skip


@pytest.mark.parametrize(("edit", "finding", "unverified"), CHAINS.values(), ids=CHAINS)
def test_a_broken_chain_is_named_and_the_link_after_it_unverified(
    edit: Callable[[Draft], None], finding: str, unverified: int, tmp_path: Path
) -> None:
    d = Draft()
    edit(d)
    res = verify_bundle(d.write(tmp_path / "b"), trust())
    chain_problems = [p for p in problems(res) if p.startswith("lab-pc seq")]
    assert chain_problems == [finding]
    assert res.recomputed["unverified_ms"] == unverified * M


# the countersignature: by the trusted collector, over exactly these claims and files -----------------
def _manifest(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / evidence.MANIFEST).read_text()))


def _resign(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """The manifest body edited, then signed again by the trusted collector key."""
    body = json.loads(_manifest(folder)["body"])
    edit(body)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    (folder / evidence.MANIFEST).write_text(json.dumps(evidence.countersign(COLLECTOR, text)))


def _signed(key: str, value: Any) -> Callable[[Path], None]:
    return lambda folder: _resign(folder, lambda body: body.__setitem__(key, value))


def _signed_file_hash(name: str) -> Callable[[Path], None]:
    return lambda folder: _resign(folder, lambda body: body["files"].__setitem__(name, "0" * 64))


def _manifest_field(key: str, value: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        m = _manifest(folder)
        m[key] = value
        (folder / evidence.MANIFEST).write_text(json.dumps(m))

    return edit


COUNTERSIGNATURES = {
    # (edit of the written bundle, findings about the manifest, countersignature status)
    "stripped": (lambda f: (f / evidence.MANIFEST).unlink(), ["manifest.json: missing: a format 2 bundle is countersigned by the collector"], "MISSING"),
    "kid_of_another_key": (_manifest_field("kid", "0123456789abcdef"), [f"manifest.json: kid '0123456789abcdef' is not the fingerprint of its key ({C})"], f"valid, by collector key {C} (trusted)"),
    "signature_of_another_body": (_manifest_field("body", "{}"), ["manifest.json: the countersignature does not match the manifest (edited or forged)"], f"BROKEN (key {C})"),
    "signed_another_format": (_signed("format", evidence.FORMAT_V2), [f'manifest.json: the collector signed format "{evidence.FORMAT_V2}", bundle.json says "{evidence.FORMAT}"'], f"valid, by collector key {C} (trusted)"),
    "signed_another_instrument": (_signed("instrument", "CZ-OTHER"), ['manifest.json: the collector signed instrument "CZ-OTHER", bundle.json says "CZ-XRD-001"'], f"valid, by collector key {C} (trusted)"),
    "signed_another_start": (_signed("from_ms", T0 + M), [f"manifest.json: the collector signed from_ms {T0 + M}, bundle.json says {T0}"], f"valid, by collector key {C} (trusted)"),
    "signed_another_end": (_signed("to_ms", T0 + M), [f"manifest.json: the collector signed to_ms {T0 + M}, bundle.json says {T0 + 1440 * M}"], f"valid, by collector key {C} (trusted)"),
    "signed_fewer_run_hours": (
        lambda f: _resign(f, lambda body: body["claimed"].__setitem__("run_ms", body["claimed"]["run_ms"] - H)),
        ["manifest.json: the collector signed other claims: run_ms 2.000 h, bundle.json says 3.000 h"],
        f"valid, by collector key {C} (trusted)",
    ),
    "signed_no_energy_claim": (
        lambda f: _resign(f, lambda body: body["claimed"].__setitem__("energy_mwh", 1_500_000)),
        ["manifest.json: the collector signed other claims: energy_mwh 1.500000 kWh, bundle.json says 0.000000 kWh"],
        f"valid, by collector key {C} (trusted)",
    ),
    **{
        f"{name.split('.')[0]}_changed_after_signing": (_signed_file_hash(name), [f"manifest.json: {name} changed after the collector signed it (SHA-256 differs)"], f"valid, by collector key {C} (trusted)")
        for name in evidence.COUNTERSIGNED
    },
    "signed_without_the_energy_claim": (
        lambda f: _resign(f, lambda body: body["claimed"].pop("energy_mwh")),
        ["manifest.json: the collector signed other claims: energy_mwh none, bundle.json says 0.000000 kWh"],
        f"valid, by collector key {C} (trusted)",
    ),
    "signed_a_claim_the_bundle_drops": (
        lambda f: _resign(f, lambda body: body["claimed"].__setitem__("bogus_ms", H)),
        ["manifest.json: the collector signed other claims: bogus_ms 1.000 h, bundle.json says none"],
        f"valid, by collector key {C} (trusted)",
    ),
    "file_hashes_not_an_object": (_signed("files", []), [f"manifest.json: {n} changed after the collector signed it (SHA-256 differs)" for n in evidence.COUNTERSIGNED], f"valid, by collector key {C} (trusted)"),
}  # fmt: skip


@pytest.mark.parametrize(("edit", "found", "status"), COUNTERSIGNATURES.values(), ids=COUNTERSIGNATURES)
def test_the_countersignature_covers_the_claims_and_every_file(
    edit: Callable[[Path], None], found: list[str], status: str, tmp_path: Path
) -> None:
    folder = Draft(services=[service(500, 560)]).write(tmp_path / "b")
    edit(folder)
    res = verify_bundle(folder, trust())
    assert [p for p in problems(res) if p.startswith("manifest.json")] == found
    assert res.countersignature == status
    assert not res.ok


@pytest.mark.parametrize("body", ["not json", "[]", '{"files": {}}', '{"format": 1}'])
def test_a_countersigned_body_that_is_no_manifest_is_a_named_error(body: str, tmp_path: Path) -> None:
    folder = Draft().write(tmp_path / "b")
    (folder / evidence.MANIFEST).write_text(json.dumps(evidence.countersign(COLLECTOR, body)))
    with pytest.raises(BundleError, match=r"manifest\.json: body is not a manifest"):
        verify_bundle(folder, trust())


# coverage: every span without an interval is a gap the collector declared ------------------------------
def _spans_with_holes(n: int) -> list[dict[str, Any]]:
    """``n`` holes of 10 min, each after 50 min of intervals, every interval beginning a new chain."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        out += chain([(i * 60, i * 60 + 50, "RUNNING")], first=1 + 10 * i)
    return out + chain([(n * 60, 1440, "OFF")], first=1 + 10 * n)


def _at(minute: int) -> str:
    return iso(T0 + minute * M)


UNDECLARED = ", and the bundle does not declare it as a gap"
COVERAGE = {
    # (bodies, declared gaps in minutes, format, coverage findings)
    "nothing_covers_the_period": ([], [], evidence.FORMAT, [f"no interval covers any of the period{UNDECLARED}"]),
    "the_first_interval_starts_late": (chain(DAY[1:]), [], evidence.FORMAT, [f"the first interval starts at {_at(480)}, after the period start{UNDECLARED}"]),
    "the_last_interval_ends_early": (chain(DAY[:5]), [], evidence.FORMAT, [f"the last interval ends at {_at(760)}, before the period end{UNDECLARED}"]),
    "a_hole_in_the_middle": (chain(DAY[:3]) + chain(DAY[4:], first=9), [], evidence.FORMAT, [f"no interval covers {_at(620)} to {_at(700)} (1.333 h){UNDECLARED}"]),
    "a_hole_declared_in_part": (chain(DAY[:3]) + chain(DAY[4:], first=9), [(620, 650)], evidence.FORMAT, [f"no interval covers {_at(650)} to {_at(700)} (0.833 h){UNDECLARED}"]),
    "a_hole_declared_in_two_parts_around_a_gap": (chain(DAY[:3]) + chain(DAY[4:], first=9), [(620, 640), (660, 700)], evidence.FORMAT, [f"no interval covers {_at(640)} to {_at(660)} (0.333 h){UNDECLARED}"]),
    "a_declared_gap_that_intervals_cover": (chain(DAY), [(100, 200)], evidence.FORMAT, [f"declared gap {_at(100)} to {_at(200)} is covered by intervals in the bundle"]),
    "a_declared_gap_reaching_into_intervals": (chain(DAY[:3]) + chain(DAY[4:], first=9), [(600, 700)], evidence.FORMAT, [f"declared gap {_at(600)} to {_at(620)} is covered by intervals in the bundle"]),
    "holes_up_to_the_cap": (_spans_with_holes(MAX_NAMED), [], evidence.FORMAT, [f"no interval covers {_at(i * 60 + 50)} to {_at(i * 60 + 60)} (0.167 h){UNDECLARED}" for i in range(MAX_NAMED)]),
    "holes_beyond_the_cap": (_spans_with_holes(MAX_NAMED + 2), [], evidence.FORMAT, [*(f"no interval covers {_at(i * 60 + 50)} to {_at(i * 60 + 60)} (0.167 h){UNDECLARED}" for i in range(MAX_NAMED)), "2 more span(s) like these"]),
    "format_1_declares_no_gaps": (chain(DAY[1:]), None, evidence.FORMAT_V1, [f"the first interval starts at {_at(480)}, after the period start{UNDECLARED}"]),
}  # fmt: skip


@pytest.mark.parametrize(("bodies", "declared", "fmt", "found"), COVERAGE.values(), ids=COVERAGE)
def test_every_span_without_an_interval_must_be_a_declared_gap(
    bodies: list[dict[str, Any]],
    declared: list[tuple[int, int]] | None,
    fmt: str,
    found: list[str],
    tmp_path: Path,
) -> None:
    gaps = None if declared is None else [[T0 + a * M, T0 + b * M] for a, b in declared]
    d = Draft(bodies=bodies, gaps=gaps, fmt=fmt, collector=None if fmt == evidence.FORMAT_V1 else COLLECTOR)
    res = verify_bundle(d.write(tmp_path / "b"), trust())
    assert [str(f.problem) for f in res.findings if f.where == "coverage"] == found
    assert res.gaps == uncovered(d.rows(), d.from_ms, d.to_ms)
    note = "format 1 bundles declare no gaps: every uncovered span is a discrepancy"
    assert (note in res.notes) is (fmt == evidence.FORMAT_V1)


def test_a_format_1_bundle_without_uncovered_time_has_no_note_about_gaps(tmp_path: Path) -> None:
    res = verify_bundle(Draft(fmt=evidence.FORMAT_V1, collector=None).write(tmp_path / "b"), trust())
    assert res.ok and res.notes == ["format 1 bundle: it carries no countersignature by the collector"]
    assert res.countersignature == "none (format 1 bundle)"


# claims: each one recomputed from the signed intervals and service records --------------------------
def _claims(**changes: int | None) -> Callable[[Draft], None]:
    """The collector's claims with some changed (None: left out)."""

    def edit(d: Draft) -> None:
        claimed = {**d.claims(), **changes}
        d.claimed = {k: v for k, v in claimed.items() if v is not None}

    return edit


def _metered(d: Draft) -> None:
    d.bodies = chain(DAY[:2]) + chain(DAY[2:], first=3, prev=wire.GENESIS, energy_wh=250.0)
    d.services = [service(500, 560, n=1), service(700, 760, external=True, n=2)]


def _then(*edits: Callable[[Draft], None]) -> Callable[[Draft], None]:
    def edit(d: Draft) -> None:
        for e in edits:
            e(d)

    return edit


CLAIMS = {
    # (edit, findings about claims, hours or energy)
    "no_claims": (draft(drop=("claimed",)), ["claims: bundle.json claims no hours ('claimed' is missing or empty)"]),
    "empty_claims": (draft(claimed={}), ["claims: bundle.json claims no hours ('claimed' is missing or empty)"]),
    "run_hours_not_claimed": (_claims(run_ms=None), ["claims: no claim for run_ms"]),
    "service_hours_not_claimed": (_claims(service_ms=None, external_ms=None), ["claims: no claim for service_ms, external_ms"]),
    "a_quantity_labmeter_does_not_count": (_claims(bogus_ms=5), ["claims: 'bogus_ms' is not a quantity labmeter counts"]),
    "an_hour_more_running": (_claims(run_ms=4 * H), ["hours run: claimed 4.000 h, recomputed 3.000 h"]),
    "effective_hours_edited": (_claims(effective_ms=0), ["hours effective: claimed 0.000 h, recomputed 3.667 h"]),
    "service_hours_edited": (_then(_metered, _claims(service_ms=3 * H)), ["hours service: claimed 3.000 h, recomputed 2.000 h"]),
    "external_hours_edited": (_then(_metered, _claims(external_ms=0)), ["hours external: claimed 0.000 h, recomputed 1.000 h"]),
    "energy_edited": (_then(_metered, _claims(energy_mwh=2_000_000)), ["energy: claimed 2.000000 kWh, recomputed 1.000000 kWh"]),
    "metered_time_edited": (_then(_metered, _claims(energy_ms=H)), ["hours energy: claimed 1.000 h, recomputed 15.667 h"]),
}  # fmt: skip


@pytest.mark.parametrize(("edit", "found"), CLAIMS.values(), ids=CLAIMS)
def test_every_claim_is_recomputed_and_a_changed_one_named(
    edit: Callable[[Draft], None], found: list[str], tmp_path: Path
) -> None:
    d = Draft()
    edit(d)
    res = verify_bundle(d.write(tmp_path / "b"), trust())
    assert [
        p for p in problems(res) if p.split(":")[0] in ("claims", "energy") or p.startswith("hours ")
    ] == found


def test_service_records_and_energy_are_recomputed_from_the_bundle(tmp_path: Path) -> None:
    d = Draft()
    _metered(d)
    res = verify_bundle(d.write(tmp_path / "b"), trust())
    assert res.ok, problems(res)
    assert res.services == 2
    assert (res.recomputed["service_ms"], res.recomputed["external_ms"]) == (
        2 * H,
        H,
    )  # both, the external one
    # four intervals of 250 Wh from 08:20 on, metered until midnight
    assert (res.recomputed["energy_mwh"], res.recomputed["energy_ms"]) == (1_000_000, (1440 - 500) * M)
    old = verify_bundle(Draft(fmt=evidence.FORMAT_V2).write(tmp_path / "v2"), trust())
    assert old.ok and old.services is None and "service_ms" not in old.recomputed


def test_a_format_2_bundle_without_its_countersignature_is_a_discrepancy(tmp_path: Path) -> None:
    folder = Draft(fmt=evidence.FORMAT_V2).write(tmp_path / "b")
    (folder / evidence.MANIFEST).unlink()
    res = verify_bundle(folder, trust())
    assert problems(res) == ["manifest.json: missing: a format 2 bundle is countersigned by the collector"]
    assert res.countersignature == "MISSING"
