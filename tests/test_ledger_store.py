"""The ledger's store path on its own: what a batch leaves behind for the watermark, the reports and the
rejection counts (SQLite in process; tests/test_ledger_backends.py runs shared promises on PostgreSQL too)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labmeter import signing, wire
from labmeter.collector import ledger as ledger_mod
from labmeter.collector.ledger import Ledger, Rejection, StoredInterval

H = 3_600_000
T0 = 1_780_000_000_000 // H * H


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    db = Ledger(tmp_path / "ledger.sqlite")
    yield db
    db.close()


KEY = signing.PrivateKey.generate()
KID = signing.key_id(KEY.public_key())


def link(
    seq: int, prev: str, start: int, end: int, state: str = "RUNNING", instrument: str = "I1"
) -> StoredInterval:
    iv = wire.Interval("a1", instrument, seq, prev, start, end, state)
    body = wire.dump_body(iv.body())
    return StoredInterval.of(iv, wire.body_hash(body), wire.seal(KEY, KID, body))


def chain(n: int, minutes: int = 10, first: int = 1) -> list[StoredInterval]:
    out, prev = [], wire.GENESIS
    for i in range(n):
        s = link(first + i, prev, T0 + i * minutes * 60_000, T0 + (i + 1) * minutes * 60_000)
        prev = s.sha
        out.append(s)
    return out


def authentic(iv: StoredInterval, reason: str = "state is not one of") -> Rejection:
    return Rejection(
        reason, wire.interval_topic(iv.agent, iv.instrument), iv.envelope, iv.agent, iv.instrument, iv.seq,
        True, iv.sha, iv.prev == wire.GENESIS, iv.instrument, True,
    )  # fmt: skip


def test_stored_interval_keeps_every_field_of_its_body() -> None:
    iv = wire.Interval("a1", "I1", 7, "3" * 64, T0, T0 + H, "STANDBY", None, -250)
    s = StoredInterval.of(iv, "f" * 64, b"env")
    assert (s.agent, s.instrument, s.seq, s.prev, s.start_ms, s.end_ms, s.state) == (
        "a1", "I1", 7, "3" * 64, T0, T0 + H, "STANDBY",
    )  # fmt: skip
    assert (s.sha, s.clock_step_ms, s.envelope) == ("f" * 64, -250, b"env")


def test_handled_seqs_are_stored_and_authentically_rejected_links_only(ledger: Ledger) -> None:
    links = chain(4)
    ledger.store([(links[0], None), (links[1], None)], [])
    forged = Rejection("bad signature", wire.interval_topic("a1", "I1"), links[3].envelope, "a1", "I1", 4)
    ledger.store([], [authentic(links[2]), forged])
    assert ledger.handled_seqs("a1", "I1") == [(1, True), (2, False), (3, False)]
    assert ledger.handled_seqs("a1", "I1", above=1) == [(2, False), (3, False)]
    assert ledger.handled_seqs("a1", "I2") == [] and ledger.handled_seqs("b1", "I1") == []


def test_a_signin_chain_counts_its_own_rows_and_rejections(ledger: Ledger) -> None:
    def signin(seq: int, prev: str) -> tuple[str, str, int, int, str, str, bytes]:
        body = wire.dump_body(wire.SignIn("a1", "I1", seq, prev, T0, "ab" * 16).body())
        return ("a1", "I1", seq, T0, "ab" * 16, wire.body_hash(body), wire.seal(KEY, KID, body))

    first = signin(1, wire.GENESIS)
    ledger.store([], [], [first, signin(2, first[5])])
    assert ledger.handled_seqs("a1", "I1@signin") == [(1, True), (2, False)]
    assert ledger.handled_seqs("a1", "I1") == []


def test_a_duplicate_is_harmless_and_a_different_body_is_an_authentic_conflict(ledger: Ledger) -> None:
    links = chain(2)
    assert ledger.store([(s, None) for s in links], []) == []
    assert ledger.store([(links[1], None)], []) == []  # the same body again: no conflict
    other = link(2, links[0].sha, links[1].start_ms, links[1].end_ms, "OFF")
    (c,) = ledger.store([(other, None)], [])
    assert (c.seq, c.authentic, c.body_sha, c.chain, c.instrument, c.agent) == (
        2,
        True,
        other.sha,
        "I1",
        "I1",
        "a1",
    )
    assert c.reason == wire.conflict_reason(2) and c.topic == wire.interval_topic("a1", "I1")
    assert ledger.db.execute("SELECT state FROM intervals WHERE seq = 2").fetchone()[0] == "RUNNING"
    kept = ledger.db.execute("SELECT seq, authentic, chain, sha FROM rejections").fetchall()
    assert kept == [(2, 1, "I1", other.sha)]


def test_the_longest_interval_only_grows_and_survives_a_reopen(ledger: Ledger, tmp_path: Path) -> None:
    ledger.store([(link(1, wire.GENESIS, T0, T0 + 2 * H), None)], [])
    ledger.store([(link(2, "1" * 64, T0 + 2 * H, T0 + 2 * H + 60_000), None)], [])
    assert ledger.longest_interval_ms() == 2 * H
    ledger.store([(link(3, "2" * 64, T0 + 3 * H, T0 + 6 * H), None)], [])
    assert ledger.longest_interval_ms() == 3 * H
    again = Ledger(tmp_path / "ledger.sqlite")
    assert again.longest_interval_ms() == 3 * H
    again.close()


def test_a_stored_instrument_is_listed_once(ledger: Ledger) -> None:
    ledger.store([(s, None) for s in chain(2)], [])
    ledger.store([(link(9, wire.GENESIS, T0, T0 + H, instrument="I2"), None)], [])
    codes = [r[0] for r in ledger.db.execute("SELECT code FROM instruments ORDER BY code")]
    assert codes == ["I1", "I2"]


def stepped_chain() -> list[StoredInterval]:
    """Seqs 1-4 of 10 min each; the wall clock steps back an hour between seq 2 and seq 3, so seq 3 and 4
    lie before seq 2 in time (a clock step is recorded in the link, never stretched into an interval)."""
    m, out, prev, start = 600_000, [], wire.GENESIS, T0
    for seq in range(1, 5):
        step = -H if seq == 3 else 0
        start += step
        iv = wire.Interval("a1", "I1", seq, prev, start, start + m, "RUNNING", clock_step_ms=step)
        body = wire.dump_body(iv.body())
        out.append(StoredInterval.of(iv, wire.body_hash(body), wire.seal(KEY, KID, body)))
        prev, start = out[-1].sha, start + m
    return out


# (seqs stored first, the late batch, the seq whose span the late batch must mark): a successor stored
# before its predecessor turns from unverified to verified, so its rollups are stale too
LATE_PREDECESSORS = {
    "one_late_link": ("chain", [3], [2], 3),
    "a_run_of_late_links": ("chain", [4], [2, 3], 4),  # only the run's end has an outside successor
    "successor_between_two_late_links": ("chain", [3], [2, 4], 3),
    "successor_outside_the_stretch_after_a_clock_step": ("stepped", [3], [2, 4], 3),
}


@pytest.mark.parametrize(
    ("kind", "first", "late", "successor"), LATE_PREDECESSORS.values(), ids=LATE_PREDECESSORS
)
def test_a_late_predecessor_marks_its_successor_for_the_rollups(
    ledger: Ledger, kind: str, first: list[int], late: list[int], successor: int
) -> None:
    links = {s.seq: s for s in (chain(4) if kind == "chain" else stepped_chain())}
    ledger.store([(links[n], None) for n in first], [])
    with ledger.transaction() as cur:
        ledger.clear_dirty(cur, [d[0] for d in ledger.dirty(cur, 100)])
    ledger.store([(links[n], None) for n in late], [])
    with ledger.transaction() as cur:
        spans = [(d[2], d[3]) for d in ledger.dirty(cur, 100)]
    for n in (*late, successor):
        s = links[n]
        assert any(a <= s.start_ms and s.end_ms <= b for a, b in spans), (n, spans)


def test_unauthenticated_rejections_are_counted_not_kept(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_mod, "REJECTION_KEYS", 4)
    junk = [Rejection(f"reason {i}", f"t/{i}", b"x" * 100) for i in range(6)]
    ledger.store([], [*junk, junk[0]])
    assert ledger.db.execute("SELECT count(*) FROM rejections").fetchone()[0] == 0
    counts = {(r, t): n for r, t, n, _ in ledger.rejection_summary()}
    assert counts[("reason 0", "t/0")] == 2
    assert sum(counts.values()) == 7
    assert len(counts) == 4 and counts[ledger_mod.REJECTION_OTHER] == 3  # the cap: the rest as "other"
    ledger.store([], [junk[5], Rejection("new", "t/new", b"")])
    counts = {(r, t): n for r, t, n, _ in ledger.rejection_summary()}
    assert counts[ledger_mod.REJECTION_OTHER] == 5 and len(counts) == 4


def test_a_ledger_without_intervals_assumes_the_longest_one_and_stamps_the_time_received(
    ledger: Ledger,
) -> None:
    before = int(time.time() * 1000)
    ledger.store([], [Rejection("bad signature", "t/x", b"")])
    assert ledger.longest_interval_ms() == wire.MAX_INTERVAL_MS  # no interval yet: any may reach back a day
    ledger.store(
        [(link(1, wire.GENESIS, T0, T0 + H), None)], [authentic(link(2, "1" * 64, T0 + H, T0 + 2 * H))]
    )
    after = int(time.time() * 1000)
    (received,) = ledger.db.execute("SELECT received_ms FROM intervals").fetchone()
    (at,) = ledger.db.execute("SELECT at_ms FROM rejections").fetchone()
    assert before <= received <= after and before <= at <= after


@pytest.mark.parametrize("limit", [1, 3, 4, 100])
def test_a_sinks_catch_up_reads_pages_that_never_split_a_millisecond(tmp_path: Path, limit: int) -> None:
    """A sink's first catch-up reads the whole history a page at a time (one query held the collector's loop
    for a second at 200 instruments x 60 days); a batch stores thousands of rows in one millisecond, so a
    page ends on a whole millisecond or a row would be skipped or sent twice."""
    from tests.lab import store_schedule

    db = Ledger(tmp_path / "ledger.sqlite")
    try:
        store_schedule(tmp_path, db, "pc-1", "CZ-A", [(T0, T0 + 9 * H, "RUNNING")])
        starts = [r[0] for r in db.db.execute("SELECT start_ms FROM intervals ORDER BY start_ms")]
        stored_at = [100, 100, 100, 100, 100, 101, 102, 102, 103]  # five rows in one millisecond
        for start, at in zip(starts, stored_at, strict=True):
            db.db.execute("UPDATE intervals SET received_ms=? WHERE start_ms=?", (at, start))
        seen: list[int] = []
        cursor, pages = 0, 0
        while cursor < 103:
            rows, upto = db.received_between(cursor, 103, limit)
            assert upto > cursor, "no progress"
            seen += [r[2] for r in rows]
            assert all(r[0] == "CZ-A" and r[4] == "RUNNING" for r in rows)
            cursor, pages = upto, pages + 1
        assert sorted(seen) == starts  # each row once, none skipped
        assert pages > 1 or limit >= len(starts)
        everything, upto = db.received_between(0, 103)  # without a limit: all of it, up to the end asked
        assert sorted(r[2] for r in everything) == starts and upto == 103
    finally:
        db.close()
