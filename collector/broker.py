"""The built-in MQTT broker (amqtt) for the single-node default.

It keeps no persistent sessions; correctness comes from the end-to-end
acknowledgement, not from the broker.

The listening socket and the client connections are ours, handed to amqtt as an
"external" listener. amqtt's shutdown waits for each client's reader task to
end, and on Python 3.11 that task can swallow its cancellation (``wait_for``
loses a cancel that races a completed read), so a graceful shutdown may never
return while a client stays connected. Owning the transports lets ``stop``
drop the remaining connections, which ends those readers, instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker

from labmeter.netutil import is_loopback, split_listen

log = logging.getLogger("labmeter.broker")

LISTENER = "default"
GRACEFUL_STOP_S = 3.0
"""How long amqtt gets to close its sessions before the connections are dropped."""


class EmbeddedBroker:
    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.host, self.port = split_listen(listen)
        config: dict[str, Any] = {
            "listeners": {LISTENER: {"type": "external"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self.broker = Broker(config)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    async def start(self) -> None:
        await self.broker.start()
        self._server = await asyncio.start_server(self._connected, self.host, self.port)
        log.info("built-in MQTT broker listening on %s", self.listen)
        if not is_loopback(self.host):
            log.warning(
                "the built-in broker on %s has no TLS or accounts: signatures keep anyone on that network from "
                "forging hours, not from reading readings or flooding the broker; see docs/deploy.md for Mosquitto",
                self.listen,
            )

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            await self.broker.external_connected(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), LISTENER
            )
        except Exception:
            log.exception("built-in broker: a client connection failed")
        finally:
            self._clients.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        shutdown = asyncio.create_task(self.broker.shutdown())
        done, _ = await asyncio.wait({shutdown}, timeout=GRACEFUL_STOP_S)
        if not done:
            log.warning(
                "built-in broker: %d client(s) still connected after %.0f s; dropping them",
                len(self._clients),
                GRACEFUL_STOP_S,
            )
            self.drop_clients()
            done, _ = await asyncio.wait({shutdown}, timeout=GRACEFUL_STOP_S)
        if not done:
            log.error("built-in broker: shutdown did not finish; leaving it")
            shutdown.cancel()
        elif not shutdown.cancelled() and (exc := shutdown.exception()):
            log.error("built-in broker: shutdown failed: %s", exc)
        self.drop_clients()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def drop_clients(self) -> None:
        for writer in list(self._clients):
            writer.transport.abort()
