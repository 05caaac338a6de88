"""The one MQTT client wrapper: paho's network loop on its own thread, callbacks handed to asyncio.

Used by the agent, the collector, the plug drivers and the simulators, so TLS,
credentials and reconnect behave the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as paho

from labmeter.config import BrokerConfig

log = logging.getLogger("labmeter.mqtt")

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


def _read_secret(path: object) -> str:
    from pathlib import Path

    p = Path(str(path))
    try:
        return p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise OSError(f"{p}: cannot read password file ({exc.strerror})") from None


class MqttLink:
    """One broker connection. ``on_message`` runs on paho's thread: keep it short and thread-safe."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        clean_session: bool = True,
        will: Will | None = None,
        on_message: MessageHandler | None = None,
        subscriptions: tuple[tuple[str, int], ...] = (),
        max_inflight: int = 100,
    ) -> None:
        self.broker = broker
        url = urlparse(broker.url)
        self.host = url.hostname or "127.0.0.1"
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        self.subscriptions = subscriptions
        self.connected = False
        self._stopping = False
        self._on_connect_cbs: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected_event: asyncio.Event | None = None
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=8)
        if broker.username:
            password = _read_secret(broker.password_file) if broker.password_file else None
            c.username_pw_set(broker.username, password)
        if self.tls:
            c.tls_set(
                ca_certs=str(broker.ca_file) if broker.ca_file else None,
                certfile=str(broker.cert_file) if broker.cert_file else None,
                keyfile=str(broker.key_file) if broker.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if will:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        if on_message is not None:
            handler = on_message
            c.on_message = lambda _c, _u, m: handler(m.topic, bytes(m.payload))
        self.client = c

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the event loop after every (re)connect."""
        self._on_connect_cbs.append(callback)

    def _handle_connect(
        self, client: paho.Client, _u: object, _f: object, rc: paho.ReasonCode, _p: object
    ) -> None:
        if rc.is_failure:
            log.error("broker %s:%s refused the connection: %s", self.host, self.port, rc)
            return
        for topic, qos in self.subscriptions:
            client.subscribe(topic, qos)
        self.connected = True
        log.info("connected to broker %s:%s", self.host, self.port)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._after_connect)

    def _after_connect(self) -> None:
        if self._connected_event is not None:
            self._connected_event.set()
        for cb in self._on_connect_cbs:
            try:
                cb()
            except Exception:
                log.exception("on_connect callback failed")

    def _handle_disconnect(
        self, _c: paho.Client, _u: object, _f: object, rc: paho.ReasonCode, _p: object
    ) -> None:
        if self.connected and not self._stopping:
            log.warning("lost broker %s:%s (%s); reconnecting", self.host, self.port, rc)
        self.connected = False
        if self._loop is not None and self._connected_event is not None:
            self._loop.call_soon_threadsafe(self._connected_event.clear)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._connected_event = asyncio.Event()
        self.client.connect_async(self.host, self.port, keepalive=self.broker.keepalive_s)
        self.client.loop_start()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        assert self._connected_event is not None, "start() first"
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a publish; False when not connected (the caller keeps the message)."""
        if not self.connected:
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    async def stop(self) -> None:
        self._stopping = True
        try:
            self.client.disconnect()
        finally:
            await asyncio.to_thread(self.client.loop_stop)
