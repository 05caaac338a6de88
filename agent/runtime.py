"""The running agent: one poll loop per instrument, one publisher, one heartbeat, one checkpointer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from labmeter import __version__, signing, wire
from labmeter.agent.classifier import Classifier
from labmeter.agent.control import AckGate, Pin, load_pin, pin_path
from labmeter.agent.outbox import AgentStore, Checkpoint, Signer
from labmeter.agent.timeline import Span, Timeline, split
from labmeter.clock import Clock
from labmeter.config import AgentConfig, InstrumentConfig
from labmeter.drivers import registry
from labmeter.drivers.base import Capability, Driver, Reading, Sample
from labmeter.mqtt import MqttLink, Will
from labmeter.wire import State

log = logging.getLogger("labmeter.agent")

CLOCK_STEP_TOLERANCE_MS = 2000


def pseudonym(salt: bytes, card: str) -> str:
    """A stable user id for a card, useless without the agent's salt."""
    return hashlib.sha256(salt + card.strip().encode()).hexdigest()[:32]


def load_or_create_salt(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
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
        self.clock_step_ms = 0
        self._open_sent_at = -1e18
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
            spans += split(cp.at_ms, start, State.UNKNOWN, self.agent.bucket_ms, note="agent_down")
            if spans:
                log.info("%s: agent was down %.0f s; recorded as UNKNOWN", self.id, (start - cp.at_ms) / 1000)
        self.timeline = Timeline(self.agent.bucket_ms, start, State.UNKNOWN)
        self.agent.emit(self.id, spans, Checkpoint(start, State.UNKNOWN, start))

    def checkpoint(self, now_ms: int) -> Checkpoint:
        return Checkpoint(self.timeline.start, self.timeline.state, max(now_ms, self.timeline.start))

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
                self._startup = self.last is None and "no message yet" in reading.error
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
        before = self.timeline.state
        change = self.classifier.update(reading)
        spans = self.timeline.advance(now_ms, change.state, change.since_ms)
        if spans:
            self.agent.emit(self.id, spans, self.checkpoint(now_ms), self.clock_step_ms)
            self.clock_step_ms = 0
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
        )
        return wire.seal_status(self.signer.key, self.signer.kid, st)

    def _will(self) -> Will:
        return Will(wire.status_topic(self.id), self._status("offline", self._will_conn))

    def emit(self, instrument: str, spans: list[Span], cp: Checkpoint | None, clock_step_ms: int = 0) -> None:
        if not spans and cp is None:
            return
        self.store.emit(self.signer, instrument, spans, cp, clock_step_ms)
        if spans:
            self.kick.set()

    def sign_in(self, instrument: str, at_ms: int, card: str) -> None:
        """Queue a sign-in under a pseudonym: the card number itself never leaves this machine."""
        self.store.emit_signin(self.signer, instrument, at_ms, pseudonym(self._salt(), card))
        self.kick.set()

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
        self._will_conn = self.store.next_connection(self.timebase.now_ms())
        self.link.set_will(self._will())
        self.store.mark_all_unsent()
        self.link.publish(wire.status_topic(self.id), self._status_payload(), qos=1, retain=True)
        self.kick.set()

    def _on_ack(self, _topic: str, payload: bytes) -> None:
        """Only a signed ack from the pinned collector, about bodies this agent holds, deletes anything."""
        ack = self.gate.open(payload)
        if ack is None:
            return
        for rej in ack.rejects:
            if self.store.reject(rej.instrument, rej.seq, rej.sha256, rej.reason):
                log.error("collector rejected %s seq %s: %s", rej.instrument, rej.seq, rej.reason)
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

    async def _publisher(self) -> None:
        """Send unacknowledged rows oldest first; resend after ``resend_after_s`` without an ack."""
        resend = self.cfg.agent.resend_after_s
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.kick.wait()
            self.kick.clear()
            if not self.link.connected:
                continue
            now = time.time()
            rows = self.store.unsent(now - resend)
            sent = [r.id for r in rows if self.link.publish(r.topic, r.payload, qos=1)]
            self.store.mark_sent(sent, now)
            if len(rows) == 1000:
                self.kick.set()

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
            now = self.timebase.now_ms()
            self.store.checkpoint({r.id: r.checkpoint(now) for r in self.runners})

    def _clock_stepped(self, expected_ms: int, wall_ms: int) -> None:
        delta = wall_ms - expected_ms
        log.warning(
            "wall clock stepped by %+d ms; intervals close at the old time and resume at the new", delta
        )
        for r in self.runners:
            spans = r.timeline.close(expected_ms)
            r.timeline = Timeline(self.bucket_ms, wall_ms, r.timeline.state)
            r.clock_step_ms = delta
            self.emit(r.id, spans, r.checkpoint(wall_ms))

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
            self.emit(r.id, r.timeline.close(now), Checkpoint(now, State.UNKNOWN, now))
        if self.link.connected:
            self.kick.set()
            rows = self.store.unsent(time.time() + 1)
            for row in rows:
                self.link.publish(row.topic, row.payload, qos=1)
            deadline = time.monotonic() + 2.0
            while self.store.pending_count() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
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
