"""Test helpers: a collector in a background thread, signed messages, waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from labmeter import config, signing, wire
from labmeter.collector.ledger import Ledger
from labmeter.collector.service import Collector


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs: bound by us, never listening
    (port 1 or 9 may be open on some machine; a port merely free a moment ago may be taken by then)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def collector_config(tmp: Path, broker_url: str, **policy: int) -> config.CollectorConfig:
    text = f'[collector]\ndata_dir = "{tmp / "collector"}"\n[broker]\nurl = "{broker_url}"\n'
    if policy:
        text += "[policy]\n" + "".join(f"{k} = {v}\n" for k, v in policy.items())
    return config.parse(text, config.CollectorConfig)


class CollectorThread:
    """The real Collector service on its own event loop, so a test can drive it from outside."""

    def __init__(self, cfg: config.CollectorConfig) -> None:
        self.cfg = cfg
        self.collector: Collector | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self.loop_errors: list[str] = []
        self._loop.set_exception_handler(self._unhandled)

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception nobody awaited (a crashed background task) fails the test instead of a log line."""
        self.loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")
        loop.default_exception_handler(context)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self.collector = Collector(self.cfg)
            await self.collector.run(self._stop)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._loop.close()

    def __enter__(self) -> CollectorThread:
        self._thread.start()
        try:
            wait_for(
                lambda: (
                    self.error is not None
                    or (
                        self.collector is not None
                        and self.collector.link is not None
                        and self.collector.link.connected
                    )
                ),
                what="collector connected",
            )
        except AssertionError:
            self.__exit__(AssertionError)
            raise
        if self.error is not None:
            raise AssertionError(f"the collector failed to start: {self.error!r}") from self.error
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Stop the service and fail the test if it crashed or hung: shutdown is when the last inbox is
        stored, so an error there must not pass silently. A failure in the test body is not masked."""
        if self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended (the service crashed)
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        if exc_type is not None:
            return
        if self._thread.is_alive():
            raise AssertionError("the collector did not stop within 15 s of being asked to")
        if self.error is not None:
            raise AssertionError(f"the collector thread failed: {self.error!r}") from self.error
        if self.loop_errors:
            raise AssertionError("unhandled errors in the collector's loop: " + "; ".join(self.loop_errors))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self.loop_errors


@contextlib.contextmanager
def agent_process(cwd: Path, config_file: str = "agent.toml", log_name: str = "agent.log") -> Iterator[Any]:
    """``labmeter agent run`` as a separate process, logging to ``cwd/log_name``. On leaving the block it gets
    SIGTERM and must exit 0 within 20 s with no traceback in its log: a crash or hang fails the test."""
    import subprocess
    import sys

    log_path = cwd / log_name
    log = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "labmeter", "agent", "run", "-c", config_file],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    failed = True
    try:
        yield proc
        failed = False
    finally:
        exited = proc.poll()
        proc.terminate()
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            rc = None
        log.close()
        if not failed:
            text = log_path.read_text(errors="replace")
            assert exited is None, f"the agent had exited with {exited} before the end: {text[-3000:]}"
            assert rc == 0, (
                f"the agent {'hung on' if rc is None else f'exited {rc} on'} SIGTERM: {text[-3000:]}"
            )
            assert "Traceback" not in text, text[-3000:]


class Publisher:
    """A plain paho client standing in for an agent (or an attacker)."""

    def __init__(self, url: str, client_id: str = "test-pub") -> None:
        port = int(url.rsplit(":", 1)[1])
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.received: list[tuple[str, bytes]] = []
        self._subacks: set[int] = set()
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, m.payload))
        self.client.on_subscribe = lambda _c, _u, mid, _rc, _p: self._subacks.add(mid)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        """Subscribe and return once the broker's SUBACK has arrived (not after a guessed delay)."""
        rc, mid = self.client.subscribe(topic, 1)
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe {topic}: rc {rc}"
        wait_for(lambda: mid in self._subacks, timeout=10, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_agent_key(tmp: Path, name: str) -> tuple[Any, str, str]:
    key = signing.generate_key_file(tmp / f"{name}.key")
    pub = key.public_key()
    return key, signing.public_key_text(pub), signing.key_id(pub)


def interval_payload(
    key: Any, kid: str, agent: str, instrument: str, seq: int, prev: str, start: int, end: int, state: str
) -> tuple[bytes, str]:
    body = wire.dump_body(wire.Interval(agent, instrument, seq, prev, start, end, state).body())
    return wire.seal(key, kid, body), wire.body_hash(body)


def register(cfg: config.CollectorConfig, agent: str, pubkey: str, kid: str, instruments: list[str]) -> None:
    ledger = Ledger.open(cfg.collector.ledger, cfg.collector.data_dir)
    ledger.add_agent(agent, pubkey, kid, instruments)
    ledger.close()


def store_schedule(
    tmp: Path,
    ledger: Ledger,
    agent: str,
    instrument: str,
    spans: list[tuple[int, int, str]],
    bucket_ms: int = 3_600_000,
    energy: Callable[[int, int], float | None] | None = None,
) -> None:
    """Sign ``spans`` (start_ms, end_ms, state) as an agent would (cut at bucket boundaries) and store them;
    ``energy(start, end)`` gives each cut interval's energy_wh (None: none in the body)."""
    from labmeter.agent.outbox import AgentStore, Signer
    from labmeter.agent.timeline import split
    from labmeter.collector.ledger import StoredInterval
    from labmeter.wire import State

    key_file = tmp / f"{agent}.key"
    key = signing.load_private_key(key_file) if key_file.exists() else signing.generate_key_file(key_file)
    pub = key.public_key()
    signer = Signer(agent, key, signing.key_id(pub))
    store = AgentStore(tmp / f"{agent}.db")
    cut = [piece for s, e, st in spans for piece in split(s, e, State(st), bucket_ms)]
    if energy is not None:
        from dataclasses import replace

        cut = [replace(c, energy_wh=energy(c.start, c.end)) for c in cut]
    rows = store.emit(signer, instrument, cut, None)
    store.close()
    ledger.add_agent(agent, signing.public_key_text(pub), signing.key_id(pub), [instrument])
    stored = []
    for r in rows:
        env = wire.open_envelope(r.payload)
        iv = wire.parse_interval(wire.load_body(env.body))
        stored.append((StoredInterval.of(iv, wire.body_hash(env.body), r.payload), None))
    ledger.store(stored, [])


def ack_body(payload: bytes) -> dict[str, Any]:
    """An ack as an agent reads it (signed envelope, body as a dict); check the signer separately."""
    return wire.load_body(wire.open_envelope(payload).body)
