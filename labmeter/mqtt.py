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
        self.failure: str | None = None  # why the last connection attempt failed, in words
        self.refused = False  # ... because the broker refused the login
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
        self.failure, self.refused = None, False
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
                from gmqtt.mqtt.handler import MQTTConnectError

                where = f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
                self.failure = _connect_problem(exc, self.broker, where)
                self.refused = (
                    isinstance(exc, MQTTConnectError) and bool(exc.args) and exc.args[0] in REFUSED_LOGIN
                )
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


REFUSED_LOGIN = {4, 5, 134, 135}
"""CONNACK codes for a refused login: 3.1.1 bad user name or password / not authorised, and MQTT 5's."""

DENIED = 0x87
"""MQTT 5 reason code "not authorized", which Mosquitto puts in the PUBACK of a publish its ACL denies."""


@dataclass
class Access:
    """What ``check_access`` found: one line per step; ``problem`` is the first step that failed."""

    lines: list[str]
    problem: str | None = None
    unverified: list[str] | None = None


def _connect_problem(exc: BaseException, broker: BrokerConfig, where: str) -> str:
    from gmqtt.mqtt.handler import MQTTConnectError

    if isinstance(exc, MQTTConnectError):
        code = exc.args[0] if exc.args else None
        if code in REFUSED_LOGIN:
            if not broker.username:
                return f"{where} refused a login without a user name: set [broker] username and password_file"
            return (
                f"{where} refused the login as {broker.username!r} (not authorised): the password in "
                f"{broker.password_file} is not the one the broker has for {broker.username!r}, or the "
                "broker has no such account"
            )
        return f"{where} refused the connection: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"{where}: the broker's TLS certificate is not trusted ({exc.verify_message}): ca_file "
            f"({broker.ca_file or 'none: the system CAs'}) must be the CA that signed it, and the url's "
            "host must be a name in the certificate"
        )
    if isinstance(exc, ssl.SSLError):
        return f"{where}: TLS handshake failed ({exc.reason or exc}): is this a TLS port (mqtts://, usually 8883)?"
    if isinstance(exc, TimeoutError):
        return (
            f"{where} accepted the connection but sent no MQTT answer: a TLS port reached with mqtt:// "
            "(use mqtts://), or not an MQTT broker"
        )
    if isinstance(exc, OSError):
        return (
            f"nothing accepts connections at {where} ({exc.strerror or exc}): is the broker running, the "
            "port right (1883 plain, 8883 TLS), a firewall between?"
        )
    return f"{where}: {type(exc).__name__}: {exc}"


async def check_access(
    broker: BrokerConfig, client_id: str, writes: tuple[str, ...], read: str | None, wait_s: float = 5.0
) -> Access:
    """Log in as ``broker`` says, and find whether the broker lets this account publish on each of
    ``writes`` and receive ``read``.

    Publish permission comes from MQTT 5's PUBACK reason code (Mosquitto 2 answers a publish its ACL
    denies with 0x87; under MQTT 3.1.1 it acknowledges and drops it silently). Mosquitto grants every
    subscription and checks read permission per message, so ``read`` is tested by publishing an empty
    message there and seeing it come back. Empty payloads are what the collector and the agent ignore.
    Where the broker speaks only 3.1.1 (gmqtt then downgrades), a write topic is tested the same way
    when this account may read it, else it is listed in ``unverified``."""
    from gmqtt.mqtt.constants import MQTTv50

    url = urlparse(broker.url)
    tls = url.scheme == "mqtts"
    host, port = url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883)
    where = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
    lines: list[str] = []
    password = None
    if broker.username and broker.password_file:
        try:
            password = read_secret(broker.password_file, "password file")
        except Exception as exc:
            return Access(
                lines,
                f"{exc}: the agent cannot log in to the broker until it has its password (on the broker's "
                f"machine `labmeter collector add-agent ... --mosquitto-dir DIR` writes DIR/secrets/"
                f"{broker.username}.pass: copy it to {broker.password_file}, mode 0600)",
            )
    try:
        ctx = tls_context(broker) if tls else False
    except (OSError, ssl.SSLError) as exc:
        return Access(lines, f"cannot set up TLS ({exc}): check ca_file, cert_file and key_file")
    arrived: set[str] = set()
    acks: asyncio.Queue[int] = asyncio.Queue()
    c = Client(client_id, clean_session=True, logger=_quiet)
    c.set_config({"reconnect_retries": 0, "reconnect_delay": 1})
    if broker.username:
        c.set_auth_credentials(broker.username, password)

    def on_message(_c: Client, topic: str, _payload: bytes, _qos: int, _props: Any) -> int:
        arrived.add(topic)
        return 0

    c.on_message = on_message
    handler = getattr(c, "_package_handler", c)
    plain_puback = getattr(handler, "_handle_puback_packet", None)

    def puback(cmd: int, packet: bytes) -> None:
        acks.put_nowait(packet[2] if len(packet) > 2 else 0)
        if plain_puback is not None:
            plain_puback(cmd, packet)

    if plain_puback is not None:
        handler._handle_puback_packet = puback
    try:
        try:
            async with asyncio.timeout(wait_s):
                await c.connect(host, port, ssl=ctx, keepalive=broker.keepalive_s, version=MQTTv50)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Access(lines, _connect_problem(exc, broker, where))
        v5 = getattr(getattr(c, "_connection_state", None), "protocol_version", None) == MQTTv50
        v5 = v5 and plain_puback is not None
        who = f"as {broker.username!r}" if broker.username else "without a user name"
        lines.append(
            f"connected to {where} {who}{' over TLS' if tls else ''} (MQTT {'5' if v5 else '3.1.1'})"
        )
        topics = ((read,) if read else ()) + (() if v5 else writes)
        for t in topics:
            c.subscribe(t, qos=1)
        await asyncio.sleep(0.2)
        unverified: list[str] = []
        denied: list[str] = []

        async def send(topic: str) -> int | None:
            """Publish an empty message; MQTT 5's PUBACK reason code, or None."""
            while not acks.empty():
                acks.get_nowait()
            c.publish(topic, b"", qos=1)
            try:
                async with asyncio.timeout(wait_s):
                    return await acks.get()
            except TimeoutError:
                return None

        async def came_back(topic: str) -> bool:
            deadline = asyncio.get_running_loop().time() + wait_s
            while topic not in arrived and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            return topic in arrived

        for t in writes:
            code = await send(t)
            if v5 and code is not None and code >= 0x80:
                denied.append(t)
            elif not v5 and not await came_back(t):
                unverified.append(t)
        if denied:
            return Access(
                lines,
                f"the broker's ACL does not let {broker.username or 'this client'} publish on "
                f"{', '.join(denied)}: what the agent sends there is dropped; the broker's ACL needs "
                f"`topic write` for these topics under `user {broker.username}`",
            )
        lines.append(
            f"may publish on {len(writes)} topic(s)"
            + ("" if v5 else f" ({len(unverified)} not testable over 3.1.1)")
        )
        if read:
            code = await send(read)
            if v5 and code is not None and code >= 0x80:
                unverified.append(read)
                lines.append(
                    f"{read}: not testable here (this account may not write it, and the broker checks reading "
                    "only when a message is delivered)"
                )
            elif await came_back(read):
                lines.append(f"receives {read}")
            else:
                return Access(
                    lines,
                    f"the broker does not deliver {read} to {broker.username or 'this client'}: its ACL lacks "
                    f"`topic read {read}`, so acknowledgements never arrive and nothing is ever deleted "
                    "from the outbox",
                )
        return Access(lines, None, unverified or None)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await c.disconnect()
