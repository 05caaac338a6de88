"""The running collector: MQTT in, verify, ledger commit, then acknowledgements out.

Ingest is batched: messages pile up in a deque while the previous batch is being
verified; signature checks run on two helper threads (libsodium releases the GIL)
while the event loop keeps receiving. A batch is committed in one transaction and
only then acknowledged to the agents (cumulative per instrument), so an agent
deletes nothing the ledger does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labmeter.collector.broker import EmbeddedBroker
from labmeter.collector.identity import collector_key
from labmeter.collector.ledger import Ledger, Rejection
from labmeter.collector.ledger.rollup import Rollups
from labmeter.collector.live.web import LiveView
from labmeter.collector.verify import Accepted, AcceptedSignIn, Pending, Rejected, Status, Verifier

if TYPE_CHECKING:
    from labmeter.collector.alerts import Alerter
    from labmeter.collector.sink_influx import InfluxSink

from labmeter import config, signing, wire
from labmeter.clock import Clock
from labmeter.config import CollectorConfig
from labmeter.mqtt import MqttLink

log = logging.getLogger("labmeter.collector")

BATCH = 2000
MAX_INBOX = 100_000
MAX_INBOX_BYTES = 64 * 1024 * 1024
"""Beyond either bound a message is dropped on arrival: agents resend whatever is not acknowledged."""
MAX_REASON_KEYS = 200
MAX_GATHER_S = 0.25
"""The longest a batch waits for more messages before its commit (group commit, see ``_ingest``)."""
ROLLUP_EVERY_S = 2.0
ROLLUP_DEFER_S = 30.0
STATUS_FRESH_MS = 600_000
"""A signed "online" older than this (by the agent's clock) is a replay or a stuck clock: shown as offline."""


class LedgerUnavailable(Exception):
    """The ledger takes no write at all (disk full, database down): the batch waits, nothing is lost."""


SQLITE_FULL = 13
PG_DISK_FULL = "53100"


def disk_full(exc: BaseException) -> bool:
    """Whether an error, or one it was raised from, is the ledger's file system being full."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(seen):
            return True
        if getattr(seen, "sqlstate", None) == PG_DISK_FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def topic_of(item: Accepted | AcceptedSignIn | Rejection) -> str:
    if isinstance(item, Accepted):
        return wire.interval_topic(item.interval.agent, item.interval.instrument)
    if isinstance(item, AcceptedSignIn):
        return wire.signin_topic(item.signin.agent, item.signin.instrument)
    return item.topic[:200]


class Watermarks:
    """Highest contiguous handled seq per (agent, instrument); rebuilt from the ledger on first use.

    A chain's first link (prev = GENESIS) has no predecessor to wait for: the
    watermark moves up to it. That is how an agent that lost its state and began
    a new chain, far above its old seqs, gets acknowledged.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.upto: dict[tuple[str, str], int] = {}
        self.above: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.lowest: dict[tuple[str, str], int] = {}
        self.restarts: list[tuple[str, str, int]] = []
        """(agent, chain, seq) of chains begun above an older one, for the collector to report once."""
        self._reported: set[tuple[str, str, int]] = set()

    def _load(self, key: tuple[str, str]) -> None:
        if key in self.upto:
            return
        self.upto[key] = 0
        for s, start in self.ledger.handled_seqs(*key):
            self._push(key, s, start)
        for *_, last, _ in self.ledger.holes(*key):  # each recorded on the agent's word for all below it
            self._cover(key, last)

    def add(self, agent: str, instrument: str, seq: int, starts_chain: bool = False) -> int:
        key = (agent, instrument)
        self._load(key)
        self._push(key, seq, starts_chain)
        if starts_chain and self.lowest[key] < seq and (agent, instrument, seq) not in self._reported:
            self._reported.add((agent, instrument, seq))
            self.restarts.append((agent, instrument, seq))
        return self.upto[key]

    def gone(self, agent: str, chain: str, first: int, upto: int, statement: bytes) -> list[tuple[int, int]]:
        """The agent's signed status says it holds nothing of ``chain`` at or below ``upto`` and will send none
        of it again (its current chain began at ``first``): the watermark stops waiting for those seqs.

        The links of the current chain the ledger lacks there (it was restored from an older backup,
        or reset) are recorded as holes with the statement, before the watermark moves; below
        ``first`` the agent's older chains ended somewhere, as when a new chain's first link
        arrives. Returns the holes recorded. Raises whatever the ledger raises: nothing moves then.
        """
        key = (agent, chain)
        self._load(key)
        if upto <= self.upto[key]:
            return []
        runs: list[tuple[int, int]] = []
        lo = max(self.upto[key] + 1, first)
        if lo <= upto:
            runs = self.ledger.record_holes(agent, chain, lo, upto, statement)
        self._cover(key, upto)
        return runs

    def _cover(self, key: tuple[str, str], last: int) -> None:
        """Nothing at or below ``last`` will come any more: move the watermark over it."""
        upto = self.upto[key]
        if last <= upto:
            return
        above = self.above[key]
        above.difference_update([s for s in above if s <= last])
        upto = last
        while upto + 1 in above:
            upto += 1
            above.discard(upto)
        self.upto[key] = upto

    def fill_gaps(self, agent: str, instrument: str) -> int:
        """Look in the ledger for seqs missing above the watermark (with a shared subscription another
        collector stores them); only a stream with a gap pays for the query."""
        key = (agent, instrument)
        if self.above[key]:
            for s, start in self.ledger.handled_seqs(agent, instrument, above=self.upto[key]):
                self._push(key, s, start)
        return self.upto[key]

    def _push(self, key: tuple[str, str], seq: int, starts_chain: bool) -> None:
        self.lowest[key] = min(self.lowest.get(key, seq), seq)
        upto = self.upto[key]
        if seq <= upto:
            return
        above = self.above[key]
        if starts_chain and seq > upto + 1:
            # a newer chain began: what lies below it went with the agent's old state, nobody resends it
            upto = seq - 1
            above.difference_update([s for s in above if s <= upto])
        above.add(seq)
        while upto + 1 in above:
            upto += 1
            above.discard(upto)
        self.upto[key] = upto


@dataclass
class LiveState:
    """What is happening now; rebuilt from messages, never a source of hours."""

    instruments: dict[str, dict[str, Any]] = field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    power: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Last verified power window per instrument."""


class Collector:
    def __init__(self, cfg: CollectorConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or Clock()
        self.ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir, quick_check=True)
        self.verifier = Verifier(self.ledger, self.clock, cfg.collector.max_future_s)
        self.watermarks = Watermarks(self.ledger)
        self.live = LiveState()
        self.stats: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.inbox: deque[tuple[str, bytes]] = deque()
        self._inbox_bytes = 0
        self._wake = asyncio.Event()
        self._idle = True
        self._last_log: dict[str, float] = {}
        self._full = False
        self._commit_s = 0.0
        """How long the last batch took to process and commit (the group-commit wait, see _ingest)."""
        """The ledger's disk is full (said once; "space again" when a batch commits)."""
        self.broker: EmbeddedBroker | None = None
        self.link: MqttLink | None = None
        self.web: LiveView | None = None
        self.sink: InfluxSink | None = None
        self.alerts: Alerter | None = None
        self.live_hooks: list[Callable[[str, dict[str, Any]], None]] = []
        """Called with every live change after the web view (the time-series sink subscribes); must not block."""
        self.ready = asyncio.Event()
        self.key: signing.PrivateKey | None = None
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="verify")

    def _on_message(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a message. Retained ones on interval/open/signin topics are someone else's leftovers (an
        agent never retains them): ignored, and cleared where the broker lets us."""
        if not payload:  # a cleared retained message, or `agent probe` testing publish permission
            self.stats["empty"] += 1
            return
        if not topic.endswith("/status") and retain:
            self.stats["retained"] += 1
            if self.link is not None:
                self.link.publish(topic, b"", qos=1, retain=True)
            self._log_limited("retained", "ignored a retained message on %s (and cleared it)", topic[:200])
            return
        if len(self.inbox) >= MAX_INBOX or self._inbox_bytes + len(payload) > MAX_INBOX_BYTES:
            self.stats["dropped_inbox"] += 1
            self._log_limited(
                "inbox", "inbox full (%d messages): dropping what arrives until it drains", len(self.inbox)
            )
            return
        self.inbox.append((topic, payload))
        self._inbox_bytes += len(payload)
        if self._idle:
            self._idle = False
            self._wake.set()

    def _log_limited(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log.get(key, -1e9) > 60:
            if len(self._last_log) > 1000:
                self._last_log.clear()
            self._last_log[key] = now
            log.warning(msg, *args)

    async def process(self, batch: list[tuple[str, bytes]]) -> None:
        """Verify and store one batch, then acknowledge. Never raises for a bad message."""
        accepted: list[Accepted] = []
        rejected: list[Rejection] = []
        pending: list[Pending] = []
        signins: list[AcceptedSignIn] = []
        for topic, payload in batch:
            if wire.is_power_topic(topic):
                self._power(topic, payload)
                continue
            try:
                result = self.verifier.prepare(topic, payload)
            except Rejected as exc:
                rejected.append(exc.rejection)
                continue
            except Exception as exc:
                log.exception("verifying a message on %s failed", topic)
                rejected.append(Rejection(f"internal error: {type(exc).__name__}", topic, payload))
                continue
            if isinstance(result, Status):
                self._agent_status(result, payload)
            else:
                pending.append(result)
        for p, ok in zip(pending, await self._check_signatures(pending), strict=True):
            try:
                done = self.verifier.finish(p, ok)
            except Rejected as exc:
                rejected.append(exc.rejection)
                continue
            except Exception as exc:
                log.exception("verifying a message on %s failed", p.topic)
                rejected.append(Rejection(f"internal error: {type(exc).__name__}", p.topic, p.payload))
                continue
            if isinstance(done, Accepted):
                accepted.append(done)
            elif isinstance(done, AcceptedSignIn):
                signins.append(done)
            else:
                # verified: signed by the agent, for an instrument enrolled to it, with one of the states
                live = {**done.body, "received": self.clock.wall_ms()}
                self.live.instruments[done.body["instrument"]] = live
                self._publish("state", live)
        # provisional ``open`` messages are counted when rejected, not kept: they never carry hours
        kept = [r for r in rejected if not r.topic.endswith("/open")]
        conflicts, refused = self._store(accepted, kept, signins)
        if refused:  # what the ledger did not take is neither acknowledged nor counted for a chain
            accepted = [a for a in accepted if id(a) not in refused]
            signins = [x for x in signins if id(x) not in refused]
            rejected = [r for r in rejected if id(r) not in refused]
            rejected += [r for r in refused.values() if r is not None]
        self.stats["signins"] += len(signins)
        rejected += conflicts
        self.stats["stored"] += len(accepted) - len(conflicts)
        self.stats["rejected"] += len(rejected)
        self._acknowledge(accepted, rejected, signins)
        for r in rejected:
            reason = r.reason.split(":")[0]
            if reason not in self.rejections and len(self.rejections) >= MAX_REASON_KEYS:
                reason = "other"
            self.rejections[reason] += 1
            self._log_rejection(r)

    def _store(
        self, accepted: list[Accepted], rejected: list[Rejection], signins: list[AcceptedSignIn]
    ) -> tuple[list[Rejection], dict[int, Rejection | None]]:
        """Store a batch in one transaction. If that fails and the ledger still takes writes, the batch is
        halved until each message that cannot be stored stands alone; that one is recorded as an
        unauthenticated rejection instead, or if even that fails counted and dropped. Returns the
        conflicts and, by ``id()`` of each refused item, the unauthenticated rejection recorded in its place
        (None: dropped). Raises
        LedgerUnavailable when the ledger takes no write at all: the batch is then retried whole."""
        items: list[Accepted | AcceptedSignIn | Rejection] = [*accepted, *signins, *rejected]
        conflicts: list[Rejection] = []
        failed: list[tuple[Accepted | AcceptedSignIn | Rejection, Exception]] = []
        self._store_part(items, conflicts, failed, top=True)
        refused: dict[int, Rejection | None] = {}
        r: Rejection | None
        for item, exc in failed:
            why = f"the ledger cannot store this message ({type(exc).__name__})"
            if isinstance(item, Accepted):
                iv = item.interval
                topic = wire.interval_topic(iv.agent, iv.instrument)
                r = Rejection(why, topic, iv.envelope, iv.agent, iv.instrument)
            elif isinstance(item, AcceptedSignIn):
                si = item.signin
                r = Rejection(why, wire.signin_topic(si.agent, si.instrument), item.envelope, si.agent)
            else:
                r = Rejection(f"{why}: {item.reason}"[:200], item.topic[:200], b"")
            try:
                self.ledger.store([], [r])
            except Exception:
                r = None
                self.stats["dropped"] += 1
                self._log_limited(
                    "dropped", "a message on %s could not be stored nor recorded: dropped", topic_of(item)
                )
            refused[id(item)] = r
        return conflicts, refused

    def _store_part(
        self,
        items: list[Accepted | AcceptedSignIn | Rejection],
        conflicts: list[Rejection],
        failed: list[tuple[Accepted | AcceptedSignIn | Rejection, Exception]],
        top: bool = False,
    ) -> None:
        if not items:
            return
        try:
            conflicts += self.ledger.store(
                [(a.interval, a.note) for a in items if isinstance(a, Accepted)],
                [r for r in items if isinstance(r, Rejection)],
                [
                    (
                        x.signin.agent,
                        x.signin.instrument,
                        x.signin.seq,
                        x.signin.at,
                        x.signin.user,
                        x.sha,
                        x.envelope,
                    )
                    for x in items
                    if isinstance(x, AcceptedSignIn)
                ],
            )
            return
        except Exception as exc:
            if (top or len(items) == 1) and not self.ledger.writable():
                raise LedgerUnavailable(str(exc)) from exc
            if len(items) == 1:
                failed.append((items[0], exc))
                return
        half = len(items) // 2
        self._store_part(items[:half], conflicts, failed)
        self._store_part(items[half:], conflicts, failed)

    def _agent_status(self, s: Status, payload: bytes = b"") -> None:
        """Live agent state, from registered agents' signed status only, newest by the agent's own order.

        An unsigned or invalid status never counts as online; from a registered agent that has sent no valid
        one it shows that agent as "status unverified" (an agent from before signed status). Only typed,
        bounded fields are kept, so nothing a sender wrote reaches the API as it was sent.
        """
        now = self.clock.wall_ms()
        known = self.live.agents.get(s.agent)
        r = s.report
        if r is None:
            self.stats["status_ignored"] += 1
            self._log_limited(
                f"status:{s.problem.split(':')[0]}"[:200],
                "ignored status on %s: %s",
                wire.status_topic(s.agent),
                s.problem[:200],
            )
            if s.registered and (known is None or not known.get("verified")):
                self.live.agents[s.agent] = {
                    "online": False,
                    "verified": False,
                    "received": now,
                    "at": None,
                    "pending": None,
                    "version": None,
                    "order": None,
                }
            return
        if r.gone:  # true whenever it was signed: even a replayed or older status may say it
            self._gone(s.agent, r.gone, payload)
        if known is not None and known.get("order") is not None and r.order() <= known["order"]:
            self.stats["status_ignored"] += 1  # a replayed or older status
            return
        fresh = r.at >= now - STATUS_FRESH_MS * max(1.0, self.clock.scale)
        self.live.agents[s.agent] = {
            "online": r.online and fresh,
            "verified": True,
            "received": now,
            "at": r.at,
            "pending": r.pending,
            "version": r.version,
            "order": r.order(),
        }
        self._publish("agent", {"agent": s.agent, "online": r.online and fresh})

    def _gone(self, agent: str, gone: dict[str, tuple[int, int]], statement: bytes) -> None:
        """An agent's signed word that it will never send some seqs again: stop waiting for them, and
        acknowledge what is stored above (see ``Watermarks.gone``). Only enrolled chains count."""
        entries: dict[str, wire.AckEntry] = {}
        for chain, (first, upto) in gone.items():
            if (agent, chain.removesuffix("@signin")) not in self.verifier.enrolled:
                continue
            key = (agent, chain)
            try:
                before = self.watermarks.upto.get(key)
                runs = self.watermarks.gone(agent, chain, first, upto, statement)
                after = self.watermarks.upto[key]
                sha = self.ledger.body_sha(agent, chain, after) if after != before else None
            except Exception as exc:  # no write: nothing moved; the next status says it again
                self._log_limited("gone", "cannot record the seqs agent %s no longer holds: %s", agent, exc)
                continue
            if runs:
                self.stats["holes"] += len(runs)
                log.warning(
                    "agent %s %s: seq(s) %s are in no ledger and its signed status says it holds them no "
                    "more (the ledger was restored from an older backup, or reset): recorded as a hole, "
                    "reported as no data",
                    agent,
                    chain,
                    ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:5])
                    + (f" and {len(runs) - 5} more run(s)" if len(runs) > 5 else ""),
                )
            if sha is not None:
                entries[chain] = wire.AckEntry(after, sha)
        if entries and self.link is not None and self.key is not None:
            for out in wire.seal_acks(self.key, agent, self.clock.wall_ms(), entries, []):
                self.link.publish(wire.ack_topic(agent), out)

    async def _check_signatures(self, pending: list[Pending]) -> list[bool]:
        """Two helper threads check the batch while the event loop goes on receiving."""
        if len(pending) < 32:
            return [p.signature_ok() for p in pending]
        loop = asyncio.get_running_loop()
        half = len(pending) // 2
        parts = await asyncio.gather(
            loop.run_in_executor(self._pool, _check, pending[:half]),
            loop.run_in_executor(self._pool, _check, pending[half:]),
        )
        return parts[0] + parts[1]

    def _publish(self, kind: str, data: dict[str, Any]) -> None:
        if self.web is not None:
            self.web.publish(kind, data)
        for hook in self.live_hooks:
            hook(kind, data)

    def _power(self, topic: str, payload: bytes) -> None:
        """A power window: verified, then live state and hooks; a rejection is counted, never stored."""
        try:
            p = self.verifier.check_power(topic, payload)
        except Rejected as exc:
            # counted under the reason's fixed part only: a flood of made-up names grows nothing
            r, kind = exc.rejection, f"power: {exc.rejection.reason.split(':')[0]}"
            self.stats["rejected"] += 1
            self.rejections[kind] += 1
            if time.monotonic() - self._last_log.get(kind, -1e9) > 60:
                self._last_log[kind] = time.monotonic()
                log.warning("rejected power message on %s: %s", r.topic[:200], r.reason[:200])
            return
        except Exception:  # never let one message stall the batch it came in
            self.stats["rejected"] += 1
            self.rejections["power: internal error"] += 1
            log.exception("checking a power message on %s failed", topic[:200])
            return
        data = {**p.body(), "received": self.clock.wall_ms()}
        self.live.power[p.instrument] = data
        for hook in self.live_hooks:  # not to the page's event stream: a public page must not get power
            hook("power", data)

    def _acknowledge(
        self,
        accepted: list[Accepted],
        rejected: list[Rejection],
        signins: list[AcceptedSignIn] = (),  # type: ignore[assignment]
    ) -> None:
        acks: dict[str, dict[str, int]] = defaultdict(dict)
        rejects: dict[str, list[wire.AckReject]] = defaultdict(list)
        # the body hash at each seq handled now: an ack names the body at the seq it acknowledges
        known: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
        for a in accepted:
            iv = a.interval
            known[(iv.agent, iv.instrument)][iv.seq] = iv.sha
            acks[iv.agent][iv.instrument] = self.watermarks.add(
                iv.agent, iv.instrument, iv.seq, wire.starts_chain(iv.prev)
            )
        for x in signins:
            key = wire.signin_chain(x.signin.instrument)
            known[(x.signin.agent, key)][x.signin.seq] = x.sha
            acks[x.signin.agent][key] = self.watermarks.add(
                x.signin.agent, key, x.signin.seq, wire.starts_chain(x.signin.prev)
            )
        for r in rejected:
            if r.agent is None or r.instrument is None or r.seq is None or r.body_sha is None:
                continue
            if r.authentic:
                chain = r.chain or r.instrument  # a sign-in's rejection counts for its own chain
                known[(r.agent, chain)][r.seq] = r.body_sha
                acks[r.agent][chain] = self.watermarks.add(r.agent, chain, r.seq, r.chain_start)
            if r.authentic or r.answer:  # only the sender's own message: a forged one could name its hash
                rejects[r.agent].append(wire.AckReject(r.instrument, r.seq, r.body_sha, r.reason))
        for agent, chain, seq in self.watermarks.restarts:
            log.warning(
                "agent %s began a new chain for %s at seq %d: its state directory was reset or replaced; "
                "the time since its last interval is no data",
                agent,
                chain,
                seq,
            )
        self.watermarks.restarts.clear()
        if self.cfg.broker.shared_group:
            for agent, chains in acks.items():
                for chain in chains:
                    chains[chain] = self.watermarks.fill_gaps(agent, chain)
        if self.link is None or self.key is None:
            return
        now = self.clock.wall_ms()
        for agent in set(acks) | set(rejects):
            if not wire.ID_RE.match(agent):
                continue
            entries = {}
            for chain, upto in acks.get(agent, {}).items():
                entry = _ack_entry(known.get((agent, chain), {}), upto)
                if entry is not None:
                    entries[chain] = entry
            for payload in wire.seal_acks(self.key, agent, now, entries, rejects.get(agent, [])):
                self.link.publish(wire.ack_topic(agent), payload)

    def _log_rejection(self, r: Rejection) -> None:
        self._log_limited(
            f"{r.agent}:{r.reason}"[:200], "rejected message on %s: %s", r.topic[:200], r.reason[:200]
        )

    async def _ingest(self) -> None:
        while True:
            self._idle = True
            if not self.inbox:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                self._wake.clear()
                continue
            self._idle = False
            if len(self.inbox) < BATCH and self._commit_s > 0.002:
                # group commit: a commit holds the event loop for its fsync, and the built-in broker runs on
                # this loop (amqtt drops a delivery not acknowledged within 5 s). Gathering for as long as
                # the last commit took keeps committing to at most about half the loop's time, however
                # slowly messages trickle in (docs/performance.md, "Built-in broker drain").
                await asyncio.sleep(min(self._commit_s, MAX_GATHER_S))
            batch = [self.inbox.popleft() for _ in range(min(BATCH, len(self.inbox)))]
            self._inbox_bytes -= sum(len(p) for _, p in batch)
            try:
                started = time.perf_counter()
                await self.process(batch)
                self._commit_s = time.perf_counter() - started
                if self._full:
                    self._full = False
                    log.warning("ledger has space again: %s; storing what waited", self.ledger.name)
            except LedgerUnavailable as exc:
                if disk_full(exc):
                    self._ledger_full()
                else:
                    self._log_limited(
                        "ledger", "the ledger takes no writes (%s); retrying %d message(s)", exc, len(batch)
                    )
                self.inbox.extendleft(reversed(batch))
                self._inbox_bytes += sum(len(p) for _, p in batch)
                await asyncio.sleep(1.0)
            except Exception:
                # not the ledger (that is LedgerUnavailable) and not one message (process splits those off):
                # a bug. Retrying the same batch would stall ingest for ever; agents resend it.
                log.exception(
                    "processing a batch of %d message(s) failed; dropped, agents resend it", len(batch)
                )
                self.stats["dropped"] += len(batch)
            await asyncio.sleep(0)

    def _ledger_full(self) -> None:
        """Say once per episode that the ledger's disk is full (a batch is retried every second)."""
        if not self._full:
            self._full = True
            log.error(
                "disk full: %s; acknowledging nothing until space returns (agents keep and resend what "
                "is not acknowledged)",
                self.ledger.name,
            )

    async def _rollups(self) -> None:
        """Keep report rollups current between reports, a short transaction at a time. During a burst of
        ingest this waits (up to ROLLUP_DEFER_S): reports refresh for themselves, so nothing reads stale."""
        rollups = Rollups(self.ledger, self.cfg.policy)
        last = time.monotonic()
        while True:
            if self._idle or time.monotonic() - last > ROLLUP_DEFER_S:
                try:
                    while rollups.refresh(steps=1, wait=False):
                        await asyncio.sleep(0)
                except Exception as exc:
                    if disk_full(exc):  # reports refresh for themselves meanwhile
                        self._ledger_full()
                    else:
                        log.exception("refreshing rollups failed; retrying")
                last = time.monotonic()
            await asyncio.sleep(ROLLUP_EVERY_S)

    def subscriptions(self) -> tuple[tuple[str, int], ...]:
        """With a shared group, what goes to the ledger is split between collectors; live state goes to all."""
        group = self.cfg.broker.shared_group
        return tuple(
            ((f"$share/{group}/{t}" if group and t in wire.LEDGER_TOPICS else t), 1)
            for t in wire.SUBSCRIPTIONS
        )

    async def run(self, stop: asyncio.Event) -> None:
        self.key = collector_key(self.cfg.collector)
        log.info("collector key %s signs the acknowledgements", signing.key_id(self.key.public_key()))
        broker_cfg = self.cfg.broker
        if broker_cfg.embedded:
            self.broker = EmbeddedBroker(broker_cfg.listen)
            await self.broker.start()
            broker_cfg = config.replace(broker_cfg, url=self.broker.url)
        self.link = MqttLink(
            broker_cfg,
            broker_cfg.client_id or "labmeter-collector",
            # A shared group's member keeps no session: the broker must not queue a dead member's share for it.
            # Nothing in flight is lost either way, since agents resend whatever is not acknowledged.
            clean_session=bool(broker_cfg.shared_group),
            on_message_retain=self._on_message,
            subscriptions=self.subscriptions(),
        )
        await self.link.start()
        sink_task = None
        if self.cfg.influxdb is not None:
            from labmeter.collector.sink_influx import InfluxSink

            self.sink = InfluxSink(
                self.cfg.influxdb,
                self.ledger,
                self.cfg.policy,
                now_ms=self.clock.wall_ms,
                holder=f"{socket.gethostname()}:{self.cfg.collector.data_dir}",
            )
            self.live_hooks.append(self.sink.on_live)
            sink_task = asyncio.create_task(self.sink.run(), name="influx-sink")
        if self.cfg.web is not None:
            token = (
                config.read_secret(self.cfg.web.token_file, "web token file")
                if self.cfg.web.token_file
                else None
            )
            web_cfg = self.cfg.web
            self.web = LiveView(
                self, web_cfg.listen, web_cfg.timezone, token, web_cfg.public, web_cfg.public_power
            )
            await self.web.start()
        alert_task = None
        if self.cfg.alerts is not None:
            from labmeter.collector.alerts import Alerter

            self.alerts = Alerter(
                self.cfg.alerts,
                self.ledger,
                self.live,
                self.cfg.policy,
                self.clock,
                lambda: self.stats["stored"],
            )
            alert_task = asyncio.create_task(self.alerts.run(), name="alerts")
        # Ingest allocates many short-lived objects and no cycles worth chasing: keep the start-up heap out
        # of the collector's way and let generation 0 grow, instead of a full scan every few hundred messages.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        ingest = asyncio.create_task(self._ingest(), name="ingest")
        rollup_task = asyncio.create_task(self._rollups(), name="rollups")
        self.ready.set()
        log.info("collector running; ledger %s", self.ledger.name)
        try:
            await stop.wait()
        finally:
            for task in (ingest, rollup_task, *([alert_task] if alert_task else [])):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if sink_task is not None and self.sink is not None:
                sink_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sink_task
                await self.sink.close()
            if self.inbox:
                try:
                    await self.process(list(self.inbox))
                except LedgerUnavailable as exc:
                    log.error(
                        "the ledger takes no writes (%s): %d message(s) not stored; agents resend them",
                        exc,
                        len(self.inbox),
                    )
                self.inbox.clear()
            await self.link.stop()
            if self.web is not None:
                await self.web.stop()
            if self.broker is not None:
                await self.broker.stop()
            self._pool.shutdown()
            self.ledger.close()
            log.info(
                "collector stopped: stored %d interval(s) and %d sign-in(s), rejected %d message(s)",
                self.stats["stored"],
                self.stats["signins"],
                self.stats["rejected"],
            )


def _check(pending: list[Pending]) -> list[bool]:
    return [p.signature_ok() for p in pending]


def _ack_entry(known: dict[int, str], upto: int) -> wire.AckEntry | None:
    """The ack for a chain: up to ``upto`` if this batch holds that body, else up to the newest body it holds
    below (acknowledging less is safe: the agent resends the rest, and the resend names its own body)."""
    if upto in known:
        return wire.AckEntry(upto, known[upto])
    below = [s for s in known if s <= upto]
    return wire.AckEntry(max(below), known[max(below)]) if below else None
