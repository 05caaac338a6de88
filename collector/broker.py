"""The built-in MQTT broker (amqtt) for the single-node default.

It keeps no persistent sessions; correctness comes from the end-to-end
acknowledgement, not from the broker.
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import Broker

log = logging.getLogger("labmeter.broker")


class EmbeddedBroker:
    def __init__(self, listen: str) -> None:
        self.listen = listen
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": listen}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self.broker = Broker(config)

    @property
    def url(self) -> str:
        host, _, port = self.listen.rpartition(":")
        return f"mqtt://{host or '127.0.0.1'}:{port}"

    async def start(self) -> None:
        await self.broker.start()
        log.info("built-in MQTT broker listening on %s", self.listen)

    async def stop(self) -> None:
        await self.broker.shutdown()
