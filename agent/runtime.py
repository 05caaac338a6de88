"""The running agent: one poll loop per instrument, one publisher, one heartbeat, one checkpointer."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from labmeter import __version__, signing, winsys, wire
from labmeter.agent.classifier import Classifier
from labmeter.agent.control import AckGate, Pin, load_pin, pin_path
from labmeter.agent.outbox import AgentStore, Checkpoint, DiskFull, Signer
from labmeter.agent.power import IntervalEnergy, PowerDownsampler
from labmeter.agent.power import publish as publish_power
from labmeter.agent.timeline import Span, Timeline, split
from labmeter.clock import Clock, clock_from_env
from labmeter.config import AgentConfig, InstrumentConfig
from labmeter.drivers import registry
from labmeter.drivers.base import Capability, Cause, Driver, Reading, Sample
from labmeter.mqtt import MqttLink, Will
from labmeter.wire import State

log = logging.getLogger("labmeter.agent")

CLOCK_STEP_TOLERANCE_MS = 2000
PUBLISH_CHUNK = 200  # rows published between two yields to the event loop
WRITE_BUFFER_HIGH = 1 << 20  # socket bytes queued before publishing waits for the network
MAX_INFLIGHT = 5000  # publishes the broker has not acknowledged before publishing waits (ids end at 65,535)
MAX_UNACKED = 2000
"""Rows sent and not yet acknowledged by the collector (within resend_after_s) before publishing waits for
acks: end-to-end flow control. A broker's PUBACK says nothing about its deliveries to the collector;
the built-in broker gives each delivery 5 s and then drops it, so a burst larger than the collector
stores in that time was mostly lost (docs/performance.md, "Built-in broker drain")."""
MAX_UNWRITTEN = 10_000  # intervals and sign-ins held in memory while the state disk is full (~7 MB)


def pseudonym(salt: bytes, card: str) -> str:
    """A stable user id for a card, useless without the agent's salt."""
    return hashlib.sha256(salt + card.strip().encode()).hexdigest()[:32]


def load_or_create_salt(path: Path) -> bytes:
    """The sign-in salt; on Windows its ACL is set before it is written and checked when it is read
    (a salt others can read is still used, so no sign-in is lost, but logged with the fix)."""
    if path.exists():
        problem = winsys.secret_problem(path)
        if problem:
            log.error("sign-in salt %s", problem)
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if winsys.WINDOWS:
            winsys.protect(path)
        os.write(fd, salt)
    finally:
        os.close(fd)
    return salt


class TimeBase:
    """Timeline time: UTC wall time taken once, then advanced by the monotonic clock.

    A wall-clock step (NTP correction, manual change) does not stretch or shrink
    an interval; it is detected, logged and written into the next interval.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.reanchor()

    def reanchor(self) -> None:
        self.wall0 = self.clock.wall_ms()
        self.mono0 = self.clock.mono()

    def now_ms(self) -> int:
        return self.wall0 + int((self.clock.mono() - self.mono0) * 1000)

    def check_step(self) -> tuple[int, int] | None:
        expected, wall = self.now_ms(), self.clock.wall_ms()
        if abs(wall - expected) > CLOCK_STEP_TOLERANCE_MS:
            self.reanchor()
            return expected, wall
        return None


class InstrumentRunner:
    def __init__(self, cfg: InstrumentConfig, driver: Driver, agent: Agent) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.driver = driver
        self.agent = agent
        self.classifier = Classifier(cfg.thresholds)
        self.timeline = Timeline(agent.bucket_ms, 0)
        self.last: Reading | None = None
        self._open_sent_at = -1e18
        self.power = PowerDownsampler(max_gap_ms=round(3 * cfg.poll_s * 1000))
        self.energy = IntervalEnergy(max_gap_ms=round(3 * cfg.poll_s * 1000))
        self._failing_since: float | None = None  # the current episode of failed reads, for the log
        self._failed = 0
        self._errors_seen: set[str] = set()
        self._startup = False

    def recover(self, now_ms: int) -> None:
        """Close what the last run left open; the time the agent was down becomes UNKNOWN."""
        cp = self.agent.store.load_checkpoint(self.id)
        spans: list[Span] = []
        start = now_ms
        if cp is not None:
            spans += split(cp.start_ms, cp.at_ms, cp.state, self.agent.bucket_ms)
            start = max(now_ms, cp.at_ms)
            spans += split(cp.at_ms, start, State.UNKNOWN, self.agent.bucket_ms, note=wire.NOTE_AGENT_DOWN)
            if spans and cp.clock_step_ms:  # a step the open interval carried when the agent stopped
                spans[0] = replace(spans[0], clock_step_ms=cp.clock_step_ms)
            if spans:
                log.info("%s: agent was down %.0f s; recorded as UNKNOWN", self.id, (start - cp.at_ms) / 1000)
        self.timeline = Timeline(self.agent.bucket_ms, start, State.UNKNOWN)
        self.agent.emit(self.id, spans, Checkpoint(start, State.UNKNOWN, start))

    def with_energy(self, spans: list[Span]) -> list[Span]:
        """Closed spans with the energy measured in each (recovered and down time carry none)."""
        return [replace(s, energy_wh=self.energy.take(s.start, s.end)) for s in spans]

    def checkpoint(self, now_ms: int) -> Checkpoint:
        t = self.timeline
        return Checkpoint(t.start, t.state, max(now_ms, t.start), t.clock_step_ms)

    async def read(self) -> Sample:
        try:
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that races the
            # read's completion, and then the poll loop outlives the agent's shutdown
            async with asyncio.timeout(max(5.0, self.cfg.poll_s * 2)):
                return await self.driver.read()
        except TimeoutError:
            return Sample(error="read timed out")
        except Exception as exc:
            # the traceback once per episode of failures (the error itself is logged by step)
            log.log(
                logging.DEBUG if self._failing_since else logging.ERROR,
                "%s: driver failed",
                self.id,
                exc_info=True,
            )
            return Sample(error=f"driver error: {type(exc).__name__}: {exc}")

    def _log_episode(self, reading: Reading) -> None:
        """A line when reads start failing, one per new kind of error while they fail (a few at most), and
        one when they work again: a meter silent for hours is three lines, not one per poll."""
        if reading.error:
            if self._failing_since is None:
                self._failing_since, self._failed, self._errors_seen = self.agent.clock.mono(), 0, set()
                self._startup = self.last is None and reading.cause is Cause.NO_MESSAGE
            self._failed += 1
            if reading.error not in self._errors_seen and len(self._errors_seen) < 4:
                self._errors_seen.add(reading.error)
                log.log(logging.INFO if self._startup else logging.WARNING, "%s: %s", self.id, reading.error)
            return
        if self._failing_since is not None:
            after = self.agent.clock.mono() - self._failing_since
            if self._startup:
                log.info("%s: first reading after %.0f s", self.id, after)
            else:
                log.info("%s: reading again after %.0f s (%d failed reads)", self.id, after, self._failed)
            self._failing_since = None

    def step(self, sample: Sample) -> None:
        tb = self.agent.timebase
        now_ms = tb.now_ms()
        reading = Reading.of(sample, self.agent.clock.mono(), now_ms)
        self._log_episode(reading)
        self.last = reading
        publish_power(self.agent, self.id, self.power.feed(now_ms, reading.power_w, reading.energy_wh))
        self.energy.feed(now_ms, reading.power_w, reading.energy_wh)
        if reading.cause is Cause.STALE and reading.age_s is not None:
            # the polls since the feed's last message read its held value again: none of it was measured
            self.energy.withdraw(now_ms - round(reading.age_s * 1000))
        before = self.timeline.state
        change = self.classifier.update(reading)
        spans = self.with_energy(self.timeline.advance(now_ms, change.state, change.since_ms))
        if spans:
            self.agent.emit(self.id, spans, self.checkpoint(now_ms))
        cards = self.driver.take_signins() if Capability.SIGNINS in self.driver.capabilities else []
        while cards:
            at_ms, card = cards.pop(0)
            self.agent.sign_in(self.id, at_ms, card)
        if (
            change.state is not before
            or now_ms - self._open_sent_at >= self.agent.cfg.agent.open_every_s * 1000
        ):
            self._open_sent_at = now_ms
            self.agent.publish_open(self, now_ms)

    async def run(self) -> None:
        clock = self.agent.clock
        next_t = clock.mono()
        while not self.agent.stopping:
            self.step(await self.read())
            next_t += self.cfg.poll_s
            now = clock.mono()
            if next_t < now:
                next_t = now
            await clock.sleep(next_t - now)


class Agent:
    def __init__(self, cfg: AgentConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or Clock()
        self.id = cfg.agent.id
        self.bucket_ms = cfg.agent.bucket_s * 1000
        key = signing.load_private_key(cfg.agent.key_file)
        self.signer = Signer(self.id, key, signing.key_id(key.public_key()))
        self.store = AgentStore(cfg.agent.state_dir / "agent.db")
        self.timebase = TimeBase(self.clock)
        self.gate = AckGate(cfg.agent, self._pin())
        self.kick = asyncio.Event()
        self.runners: list[InstrumentRunner] = []
        # each broker connection has a number; its last will, signed in advance, says "offline" for it
        self._conn = 0
        self._gone_turn = 0
        self._will_conn = self.store.next_connection(self.timebase.now_ms())
        self.link = MqttLink(
            cfg.broker,
            cfg.broker.client_id or f"labmeter-agent-{self.id}",
            will=self._will(),
            on_message=self._on_ack,
            subscriptions=((wire.ack_topic(self.id), 1),),
        )
        self.link.on_connect(self._on_connected)
        self.acked = 0
        self.stopping = False
        self._signin_salt: bytes | None = None
        self._unwritten: deque[tuple[Callable[[], object], int]] = deque()
        self._held = self._given_up = self._written_late = 0
        self._full = False

    def _pin(self) -> Pin | None:
        pin = load_pin(self.cfg.agent)
        if pin is None:
            log.warning(
                "no collector key pinned: the first validly signed acknowledgement will pin one; pin it "
                'explicitly with [agent] collector_key = "ed25519:..." (`labmeter collector key` prints it)'
            )
            return None
        saved = pin_path(self.cfg.agent)
        if self.cfg.agent.collector_key and saved.exists():
            log.warning(
                "[agent] collector_key is set, so the key pinned on first use in %s is not used", saved
            )
        log.info("collector key %s pinned from %s", pin.fingerprint, pin.source)
        return pin

    def _status(self, status: str, conn: int, at: int | None = None) -> bytes:
        st = wire.AgentStatus(
            self.id,
            status,
            self.timebase.now_ms() if at is None else at,
            conn,
            self.store.pending_count(),
            __version__[:32],
            self._gone(),
        )
        return wire.seal_status(self.signer.key, self.signer.kid, st)

    def _gone(self) -> dict[str, tuple[int, int]]:
        """What this agent will never send again, per chain (see ``AgentStore.gone``); with more chains than
        one status may name, each status names the next ones in turn."""
        gone = self.store.gone()
        if len(gone) <= wire.MAX_GONE:
            return gone
        chains = sorted(gone)
        self._gone_turn = (self._gone_turn + wire.MAX_GONE) % len(chains)
        picked = (chains[self._gone_turn :] + chains[: self._gone_turn])[: wire.MAX_GONE]
        return {c: gone[c] for c in picked}

    def _will(self) -> Will:
        return Will(wire.status_topic(self.id), self._status("offline", self._will_conn))

    def emit(self, instrument: str, spans: list[Span], cp: Checkpoint | None) -> None:
        if not spans and cp is None:
            return
        self._write(lambda: self.store.emit(self.signer, instrument, spans, cp), len(spans))
        if spans:
            self.kick.set()

    def sign_in(self, instrument: str, at_ms: int, card: str) -> None:
        """Queue a sign-in under a pseudonym: the card number itself never leaves this machine."""
        self._write(
            lambda: self.store.emit_signin(self.signer, instrument, at_ms, pseudonym(self._salt(), card)), 1
        )
        self.kick.set()

    def _write(self, write: Callable[[], object], count: int) -> None:
        """Write to the state directory now, or, while its disk is full, hold the write in memory in order.

        Held writes go out oldest first once space returns (:meth:`_flush_unwritten`); beyond
        ``MAX_UNWRITTEN`` intervals the oldest are given up (that time becomes no data), so a
        disk that never frees cannot exhaust memory.
        """
        if not self._unwritten:
            try:
                write()
                return
            except DiskFull as exc:
                self._disk_full(exc)
            except OSError as exc:  # a file beside the database (the sign-in salt) on the same disk
                if exc.errno != errno.ENOSPC:
                    raise
                self._disk_full(DiskFull(Path(exc.filename or self.store.path)))
        self._unwritten.append((write, count))
        self._held += count
        while self._held > MAX_UNWRITTEN and len(self._unwritten) > 1:
            _, n = self._unwritten.popleft()
            self._held -= n
            self._given_up += n
            if self._given_up == n or self._given_up % 1000 < n:
                log.error(
                    "disk full: %s; %d interval(s) held in memory, %d oldest given up",
                    self.store.path,
                    self._held,
                    self._given_up,
                )

    def _flush_unwritten(self) -> bool:
        """Write what the full disk held back; True when nothing is held any more."""
        while self._unwritten:
            write, n = self._unwritten[0]
            try:
                write()
            except DiskFull:
                return False
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return False
            self._unwritten.popleft()
            self._held -= n
            self._written_late += n
        return True

    def _space_again(self) -> None:
        """A write after a full disk went through: say so once, with what was held meanwhile."""
        if self._full:
            log.warning(
                "disk has space again: %s; wrote %d interval(s) held in memory, %d given up",
                self.store.path,
                self._written_late,
                self._given_up,
            )
            self._full, self._written_late, self._given_up = False, 0, 0

    def _disk_full(self, exc: DiskFull) -> None:
        if not self._full:
            log.error(
                "%s; metering goes on, holding up to %d interval(s) in memory until space returns",
                exc,
                MAX_UNWRITTEN,
            )
        self._full = True

    def _salt(self) -> bytes:
        if self._signin_salt is None:
            self._signin_salt = load_or_create_salt(self.cfg.agent.state_dir / "signin.salt")
        return self._signin_salt

    def publish_open(self, runner: InstrumentRunner, now_ms: int) -> None:
        """Provisional current state for live views; may be dropped, never counted."""
        body: dict[str, Any] = {
            "v": wire.VERSION,
            "kind": "open",
            "agent": self.id,
            "instrument": runner.id,
            "start": runner.timeline.start,
            "state": runner.timeline.state.value,
            "at": now_ms,
        }
        if runner.last is not None:
            if runner.last.power_w is not None:
                body["power_w"] = round(runner.last.power_w, 1)
            if runner.last.error:
                body["error"] = runner.last.error[:200]
        payload = wire.seal(self.signer.key, self.signer.kid, wire.dump_body(body))
        self.link.publish(wire.open_topic(self.id, runner.id), payload, qos=0)

    def _status_payload(self) -> bytes:
        return self._status("online", self._conn)

    def _on_connected(self) -> None:
        """This connection carries the will signed for ``_will_conn``; sign the next connection's now."""
        self._conn = self._will_conn
        try:
            self._will_conn = self.store.next_connection(self.timebase.now_ms())
            self.store.mark_all_unsent()
        except DiskFull as exc:  # what was sent before goes out again at its resend time instead
            self._disk_full(exc)
        self.link.set_will(self._will())
        self.link.publish(wire.status_topic(self.id), self._status_payload(), qos=1, retain=True)
        self.kick.set()

    def _on_ack(self, _topic: str, payload: bytes) -> None:
        """Only a signed ack from the pinned collector, about bodies this agent holds, deletes anything."""
        if not payload:  # `agent probe` testing that the broker delivers this topic
            return
        ack = self.gate.open(payload)
        if ack is None:
            return
        try:
            for r in ack.rejects:
                self._rejected(r.instrument, r.seq, r.sha256, r.reason)
            for chain, entry in ack.acks.items():
                n = self.store.ack_matching(chain, entry.seq, entry.sha256)
                if n is None:
                    self.gate.ignore(
                        "stale",
                        "ignoring an acknowledgement of %s seq %d: this agent holds no such body there "
                        "(replayed, or its state was restored from a backup)",
                        chain,
                        entry.seq,
                    )
                else:
                    self.acked += n
                    if n:
                        self.kick.set()  # room for more under MAX_UNACKED
        except DiskFull as exc:  # the collector sends it again when we resend
            self._disk_full(exc)

    def _rejected(self, chain: str, seq: int, body_sha: str, reason: str) -> None:
        """A conflict begins a new chain with the link and its successors; other rejects are dead letters."""
        if wire.is_conflict(reason):
            moved = self.store.rechain(self.signer, chain, seq, body_sha)
            if moved:
                log.warning(
                    "%s seq %d is already taken in the ledger by another body (this state directory was "
                    "restored from a backup, or is shared with a cloned agent); %d interval(s) sent again "
                    "as seq %d-%d",
                    chain,
                    seq,
                    len(moved),
                    moved[0].seq,
                    moved[-1].seq,
                )
                self.kick.set()
        elif self.store.reject(chain, seq, body_sha, reason):
            log.error("collector rejected %s seq %s: %s", chain, seq, reason)

    async def _publisher(self) -> None:
        """Send unacknowledged rows oldest first; resend after ``resend_after_s`` without an ack."""
        resend = self.cfg.agent.resend_after_s
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.kick.wait()
            self.kick.clear()
            if self.link.connected:
                try:
                    if await self._publish_batch(time.time() - resend):
                        self.kick.set()
                except DiskFull as exc:  # rows not marked sent would go out again at once: wait instead
                    self._disk_full(exc)
                    await asyncio.sleep(min(resend, 5.0))
            await asyncio.sleep(0)  # a set kick returns at once: give the other loops their turn

    async def _publish_batch(self, resend_before: float, limit: int = 1000) -> bool:
        """Publish one batch, yielding between chunks; stops at once when the link goes. True: more wait."""
        room = MAX_UNACKED - self.store.outstanding(resend_before)
        if room <= 0:
            return False  # an ack kicks the publisher again
        limit = min(limit, room)
        rows = self.store.unsent(resend_before, limit)
        now = time.time()
        sent: list[int] = []
        try:
            for i in range(0, len(rows), PUBLISH_CHUNK):
                for r in rows[i : i + PUBLISH_CHUNK]:
                    if self.stopping or not self.link.publish(r.topic, r.payload, qos=1):
                        return False
                    sent.append(r.id)
                await asyncio.sleep(0)
                await self._wait_for_network()
        finally:
            self.store.mark_sent(sent, now)
        return len(rows) == limit

    async def _wait_for_network(self, most_s: float = 5.0) -> None:
        """Let the socket buffer and the broker's acknowledgements catch up, for ``most_s`` at most.

        Bounded, because publishes lost with an old connection may never be acknowledged
        (gmqtt replays them on a reconnect, which may not come); a full id space then only
        refuses the next publish, which ends the batch.
        """
        deadline = time.monotonic() + most_s
        while (
            self.link.connected
            and time.monotonic() < deadline
            and (self.link.write_buffer_size() > WRITE_BUFFER_HIGH or self.link.inflight() > MAX_INFLIGHT)
        ):
            await asyncio.sleep(0.01)

    async def _heartbeat(self) -> None:
        while not self.stopping:
            await self.clock.sleep(self.cfg.agent.heartbeat_s)
            self.link.publish(wire.status_topic(self.id), self._status_payload(), qos=1, retain=True)

    async def _checkpointer(self) -> None:
        while not self.stopping:
            await self.clock.sleep(self.cfg.agent.checkpoint_s)
            step = self.timebase.check_step()
            if step is not None:
                self._clock_stepped(*step)
            if not self._flush_unwritten():
                continue  # a checkpoint ahead of held intervals would skip them after a crash
            now = self.timebase.now_ms()
            try:
                self.store.checkpoint({r.id: r.checkpoint(now) for r in self.runners})
            except DiskFull as exc:
                self._disk_full(exc)
            else:
                self._space_again()

    def _clock_stepped(self, expected_ms: int, wall_ms: int) -> None:
        delta = wall_ms - expected_ms
        log.warning(
            "wall clock stepped by %+d ms; intervals close at the old time and resume at the new", delta
        )
        for r in self.runners:
            self.emit(r.id, r.with_energy(r.timeline.step(expected_ms, wall_ms)), r.checkpoint(wall_ms))
            r.energy.reset()

    async def run(self, stop: asyncio.Event) -> None:
        now = self.timebase.now_ms()
        for inst in self.cfg.instrument:
            driver = registry.build(inst, self.id, self.cfg.broker, self.clock, self.cfg.profiles_dir)
            runner = InstrumentRunner(inst, driver, self)
            runner.recover(now)
            self.runners.append(runner)
        await self.link.start()
        for r in self.runners:
            try:
                await r.driver.start()
            except Exception as exc:
                log.warning("%s: driver start failed (%s); will keep trying", r.id, exc)
        tasks = [asyncio.create_task(r.run(), name=f"poll-{r.id}") for r in self.runners]
        tasks += [
            asyncio.create_task(self._publisher(), name="publisher"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._checkpointer(), name="checkpoint"),
        ]
        log.info("agent %s running %d instrument(s)", self.id, len(self.runners))
        try:
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopped and t.exception():
                    log.error("task %s died: %r", t.get_name(), t.exception())
        finally:
            self.stopping = True
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=5.0)
            for t in stuck:
                log.error("task %s did not stop when cancelled; shutting down without it", t.get_name())
            await self._shutdown()

    async def _shutdown(self) -> None:
        now = self.timebase.now_ms()
        for r in self.runners:
            spans = r.with_energy(r.timeline.close(now))
            at = max(now, r.timeline.start)  # never behind what is stored (a clock stepped back)
            self.emit(r.id, spans, Checkpoint(at, State.UNKNOWN, at, r.timeline.clock_step_ms))
        if not self._flush_unwritten():
            log.error("disk full: %s; %d interval(s) held in memory are lost", self.store.path, self._held)
        if self.link.connected:
            self.kick.set()
            rows = self.store.unsent(time.time() + 1)
            for row in rows:
                self.link.publish(row.topic, row.payload, qos=1)
            # wait for the acks while they keep coming (a slow collector or machine), at most 5 s, and
            # 2 s after the last one: a collector that answers nothing costs no more than before
            deadline, quiet = time.monotonic() + 5.0, time.monotonic() + 2.0
            left = self.store.pending_count()
            while left and time.monotonic() < min(deadline, quiet):
                await asyncio.sleep(0.05)
                now_left = self.store.pending_count()
                if now_left < left:
                    left, quiet = now_left, time.monotonic() + 2.0
            self.link.publish(
                wire.status_topic(self.id), self._status("offline", self._conn), qos=1, retain=True
            )
            await asyncio.sleep(0.1)
        await self.link.stop()
        for r in self.runners:
            with contextlib.suppress(Exception):
                await r.driver.close()
        left = self.store.pending_count()
        self.store.close()
        log.info("agent %s stopped; %d message(s) wait in the outbox", self.id, left)


async def run_agent(cfg: AgentConfig, stop: asyncio.Event) -> None:
    """The agent until ``stop`` is set, from a console (`agent run`) or the Windows service."""
    warned = False
    while True:
        try:
            agent = Agent(cfg, clock_from_env())
            break
        except DiskFull as exc:  # waiting here, not exiting: a restart would only meet the same disk
            if not warned:
                log.error("%s; waiting for space before starting", exc)
                warned = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await stop.wait()
            if stop.is_set():
                return
    await agent.run(stop)
