"""The built-in broker carries messages and always stops, even when amqtt's shutdown would hang."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import pytest
from amqtt.mqtt.protocol import handler as amqtt_handler

from labmeter.collector import broker as broker_mod
from labmeter.collector.broker import EmbeddedBroker
from labmeter.netutil import free_port, split_listen
from tests.conftest import LABMETER
from tests.lab import Publisher


class CancelLosingAsyncio:
    """``asyncio`` for amqtt's protocol handler, with Python 3.11's lost-cancel race made certain.

    On 3.11, ``asyncio.wait_for`` can swallow a cancel that arrives as the inner
    read completes; the reader loop then keeps reading and amqtt's shutdown waits
    for it for as long as the client stays connected. The race is too rare to hit
    on demand, so this stand-in loses every cancel while the read is pending.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(aw: Any, timeout: float | None) -> Any:
        read = asyncio.ensure_future(aw)
        while True:
            try:
                return await asyncio.shield(read)
            except asyncio.CancelledError:
                continue


async def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def connected_pair(port: int) -> tuple[Publisher, Publisher]:
    url = f"mqtt://127.0.0.1:{port}"
    sub = await asyncio.to_thread(Publisher, url, "sub")
    await asyncio.to_thread(sub.subscribe, "lab/#")
    pub = await asyncio.to_thread(Publisher, url, "pub")
    return sub, pub


def test_messages_pass_and_clients_see_the_stop() -> None:
    async def main() -> None:
        port = free_port()
        b = EmbeddedBroker(f"127.0.0.1:{port}")
        await b.start()
        sub, pub = await connected_pair(port)
        await asyncio.to_thread(pub.publish, "lab/x", b"on")
        await wait_until(lambda: ("lab/x", b"on") in sub.received)
        await asyncio.wait_for(b.stop(), 10)
        await wait_until(lambda: not sub.client.is_connected() and not pub.client.is_connected())
        for c in (sub, pub):
            c.close()

    asyncio.run(main())


def test_stop_drops_clients_whose_reader_ignores_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqtt_handler, "asyncio", CancelLosingAsyncio())
    monkeypatch.setattr(broker_mod, "GRACEFUL_STOP_S", 0.5)

    async def main() -> None:
        port = free_port()
        b = EmbeddedBroker(f"127.0.0.1:{port}")
        await b.start()
        sub, pub = await connected_pair(port)
        try:
            await asyncio.wait_for(b.stop(), 10)
        except TimeoutError:
            pytest.fail("the broker's stop hung on a reader that ignores cancellation")
        await wait_until(lambda: not sub.client.is_connected())
        for c in (sub, pub):
            c.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:1883", ("127.0.0.1", 1883)), ("[::1]:8080", ("::1", 8080)), (":1884", ("127.0.0.1", 1884))],
)
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert split_listen(listen) == expected


@pytest.mark.parametrize("listen", ["1883", "localhost", "127.0.0.1:port", "127.0.0.1:70000"])
def test_bad_listen_address_is_named(listen: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        split_listen(listen)


def test_broker_command_names_a_bad_listen_address() -> None:
    out = subprocess.run(
        [*LABMETER, "broker", "--listen", "1883"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "--listen: listen '1883' is not host:port" in out.stderr
