"""The one MQTT client wrapper (gmqtt, asyncio-native): used by the agent, the collector,
the plug drivers and the simulators, so TLS, credentials and reconnects behave the same.

Callbacks run on the event loop. gmqtt reconnects by itself once a first connection
has been made; until then ``start`` keeps trying in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from gmqtt import Client, Message
from gmqtt.mqtt.constants import UNLIMITED_RECONNECTS, MQTTv311

from labmeter.config import BrokerConfig, read_secret

log = logging.getLogger("labmeter.mqtt")
_quiet = logging.getLogger("labmeter.mqtt.gmqtt")
_quiet.setLevel(logging.ERROR)

MessageHandler = Callable[[str, bytes], None]
RetainAwareHandler = Callable[[str, bytes, bool], None]
"""(topic, payload, retain): ``retain`` set for a retained message the broker replays on subscribing."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


def tls_context(broker: BrokerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(broker.ca_file) if broker.ca_file else None)
    if broker.cert_file:
        ctx.load_cert_chain(str(broker.cert_file), str(broker.key_file) if broker.key_file else None)
    return ctx


class MqttLink:
    """One broker connection; ``on_message`` is called on the event loop for every message."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        clean_session: bool = True,
        will: Will | None = None,
        on_message: MessageHandler | None = None,
        on_message_retain: RetainAwareHandler | None = None,
        subscriptions: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.broker = broker
        url = urlparse(broker.url)
        self.host = url.hostname or "127.0.0.1"
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        self.subscriptions = subscriptions
        self._up = False
        self._stopping = False
        self._on_connect_cbs: list[Callable[[], None]] = []
        self._connected_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        c = Client(
            client_id,
            clean_session=clean_session,
            will_message=Message(will.topic, will.payload, qos=will.qos, retain=will.retain)
            if will
            else None,
            logger=_quiet,
        )
        c.set_config({"reconnect_retries": UNLIMITED_RECONNECTS, "reconnect_delay": 1})
        if broker.username:
            password = read_secret(broker.password_file, "password file") if broker.password_file else None
            c.set_auth_credentials(broker.username, password)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        handler = on_message
        retain_handler = on_message_retain

        def _on_message(_c: Client, topic: str, payload: bytes, _qos: int, props: Any) -> int:
            if retain_handler is not None:
                retained = bool(props.get("retain")) if isinstance(props, dict) else False
                retain_handler(topic, payload, retained)
            elif handler is not None:
                handler(topic, payload)
            return 0

        c.on_message = _on_message
        self.client = c

    def set_will(self, will: Will) -> None:
        """The last will for the next (re)connect; the broker keeps the one sent with the current one."""
        self.client._will_message = Message(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after every (re)connect."""
        self._on_connect_cbs.append(callback)

    def _handle_connect(self, client: Client, _flags: Any, rc: int, _props: Any) -> None:
        client.subscriptions.clear()
        for topic, qos in self.subscriptions:
            client.subscribe(topic, qos=qos)
        self._up = True
        self._connected_event.set()
        log.info("connected to broker %s:%s", self.host, self.port)
        for cb in self._on_connect_cbs:
            try:
                cb()
            except Exception:
                log.exception("on_connect callback failed")

    def _handle_disconnect(self, _client: Client, _packet: Any, exc: Any = None) -> None:
        if self._up and not self._stopping:
            log.warning("lost broker %s:%s; reconnecting", self.host, self.port)
        self._up = False
        self._connected_event.clear()

    async def _first_connect(self) -> None:
        delay = 0.5
        warned = False
        while not self._stopping:
            try:
                await self.client.connect(
                    self.host,
                    self.port,
                    ssl=tls_context(self.broker) if self.tls else False,
                    keepalive=self.broker.keepalive_s,
                    version=MQTTv311,
                )
                return
            except Exception as exc:
                if not warned:
                    log.warning("cannot reach broker %s:%s (%s); retrying", self.host, self.port, exc)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._first_connect(), name=f"mqtt-connect-{self.host}:{self.port}")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._connected_event.wait()
        except TimeoutError:
            return False
        return True

    @property
    def connected(self) -> bool:
        """Connected now, asked of the socket itself.

        gmqtt learns of a lost socket at once (the transport is closing) but tells us
        only through a callback the event loop runs later; a loop that publishes
        without yielding would never see that callback and spin on a dead link.
        """
        return self._up and self.client.is_connected

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a publish; False when not connected (the caller keeps the message)."""
        if not self.connected:
            return False
        try:
            self.client.publish(topic, payload, qos=qos, retain=retain)
        except OverflowError:  # gmqtt's 65,535 packet ids are all in flight
            return False
        return True

    def inflight(self) -> int:
        """QoS 1 publishes sent and not yet acknowledged by the broker (gmqtt keeps them to replay)."""
        storage = getattr(self.client, "_persistent_storage", None)
        return len(getattr(storage, "_messages", ()))

    def write_buffer_size(self) -> int:
        """Bytes queued in the socket's write buffer: how far publishing runs ahead of the network."""
        conn = getattr(self.client, "_connection", None)
        transport = getattr(conn, "_transport", None)
        try:
            return int(transport.get_write_buffer_size()) if transport is not None else 0
        except (AttributeError, RuntimeError):
            return 0

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.client.disconnect()
        self._up = False
