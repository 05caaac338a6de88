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
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labmeter.collector.broker import EmbeddedBroker
from labmeter.collector.ledger import Ledger, Rejection
from labmeter.collector.rollup import Rollups
from labmeter.collector.verify import Accepted, AcceptedSignIn, Pending, Rejected, Status, Verifier
from labmeter.collector.web import LiveView

if TYPE_CHECKING:
    from labmeter.collector.sink_influx import InfluxSink

from labmeter import config, wire
from labmeter.clock import Clock
from labmeter.config import CollectorConfig
from labmeter.mqtt import MqttLink

log = logging.getLogger("labmeter.collector")

BATCH = 2000
ROLLUP_EVERY_S = 2.0
ROLLUP_DEFER_S = 30.0


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

    def add(self, agent: str, instrument: str, seq: int, starts_chain: bool = False) -> int:
        key = (agent, instrument)
        if key not in self.upto:
            self.upto[key] = 0
            for s, start in self.ledger.handled_seqs(agent, instrument):
                self._push(key, s, start)
        self._push(key, seq, starts_chain)
        if starts_chain and self.lowest[key] < seq and (agent, instrument, seq) not in self._reported:
            self._reported.add((agent, instrument, seq))
            self.restarts.append((agent, instrument, seq))
        return self.upto[key]

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
        self._wake = asyncio.Event()
        self._idle = True
        self._last_log: dict[str, float] = {}
        self.broker: EmbeddedBroker | None = None
        self.link: MqttLink | None = None
        self.web: LiveView | None = None
        self.sink: InfluxSink | None = None
        self.ready = asyncio.Event()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="verify")

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.inbox.append((topic, payload))
        if self._idle:
            self._idle = False
            self._wake.set()

    async def process(self, batch: list[tuple[str, bytes]]) -> None:
        """Verify and store one batch, then acknowledge. Never raises for a bad message."""
        accepted: list[Accepted] = []
        rejected: list[Rejection] = []
        pending: list[Pending] = []
        signins: list[AcceptedSignIn] = []
        for topic, payload in batch:
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
                self.live.agents[result.agent] = {
                    "online": result.online,
                    "received": self.clock.wall_ms(),
                    **result.body,
                }
                self._publish("agent", {"agent": result.agent, "online": result.online})
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
                live = {**done.body, "received": self.clock.wall_ms()}
                self.live.instruments[done.body["instrument"]] = live
                self._publish("state", live)
        # provisional ``open`` messages are counted when rejected, not kept: they never carry hours
        kept = [r for r in rejected if not r.topic.endswith("/open")]
        conflicts = self.ledger.store([(a.interval, a.note) for a in accepted], kept)
        if signins:
            self.ledger.store_signins(
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
                    for x in signins
                ]
            )
            self.stats["signins"] += len(signins)
        rejected += conflicts
        self.stats["stored"] += len(accepted) - len(conflicts)
        self.stats["rejected"] += len(rejected)
        self._acknowledge(accepted, rejected, signins)
        for r in rejected:
            self.rejections[r.reason.split(":")[0]] += 1
            self._log_rejection(r)

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

    def _acknowledge(
        self,
        accepted: list[Accepted],
        rejected: list[Rejection],
        signins: list[AcceptedSignIn] = (),  # type: ignore[assignment]
    ) -> None:
        acks: dict[str, dict[str, int]] = defaultdict(dict)
        rejects: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in accepted:
            iv = a.interval
            acks[iv.agent][iv.instrument] = self.watermarks.add(
                iv.agent, iv.instrument, iv.seq, wire.starts_chain(iv.prev)
            )
        for x in signins:
            key = wire.signin_chain(x.signin.instrument)
            acks[x.signin.agent][key] = self.watermarks.add(
                x.signin.agent, key, x.signin.seq, wire.starts_chain(x.signin.prev)
            )
        for r in rejected:
            if r.agent is None or r.instrument is None or r.seq is None or r.body_sha is None:
                continue
            if r.authentic:
                acks[r.agent][r.instrument] = self.watermarks.add(r.agent, r.instrument, r.seq, r.chain_start)
            rejects[r.agent].append(
                {"instrument": r.instrument, "seq": r.seq, "sha256": r.body_sha, "reason": r.reason}
            )
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
        if self.link is None:
            return
        for agent in set(acks) | set(rejects):
            if wire.ID_RE.match(agent):
                self.link.publish(
                    wire.ack_topic(agent), wire.ack_payload(acks.get(agent, {}), rejects.get(agent, []))
                )

    def _log_rejection(self, r: Rejection) -> None:
        key = f"{r.agent}:{r.reason}"
        now = time.monotonic()
        if now - self._last_log.get(key, -1e9) > 60:
            self._last_log[key] = now
            log.warning("rejected message on %s: %s", r.topic, r.reason)

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
            batch = [self.inbox.popleft() for _ in range(min(BATCH, len(self.inbox)))]
            try:
                await self.process(batch)
            except Exception:
                log.exception("storing a batch of %d message(s) failed; retrying", len(batch))
                self.inbox.extendleft(reversed(batch))
                await asyncio.sleep(1.0)
            await asyncio.sleep(0)

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
                except Exception:
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
            on_message=self._on_message,
            subscriptions=self.subscriptions(),
        )
        await self.link.start()
        sink_task = None
        if self.cfg.influxdb is not None:
            from labmeter.collector.sink_influx import InfluxSink

            self.sink = InfluxSink(self.cfg.influxdb, self.ledger, self.cfg.policy)
            sink_task = asyncio.create_task(self.sink.run(), name="influx-sink")
        if self.cfg.web is not None:
            token = (
                self.cfg.web.token_file.read_text(encoding="utf-8").strip()
                if self.cfg.web.token_file
                else None
            )
            web_cfg = self.cfg.web
            self.web = LiveView(
                self, web_cfg.listen, web_cfg.timezone, token, web_cfg.public, web_cfg.public_power
            )
            await self.web.start()
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
            for task in (ingest, rollup_task):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if sink_task is not None and self.sink is not None:
                sink_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sink_task
                await self.sink.close()
            if self.inbox:
                await self.process(list(self.inbox))
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
