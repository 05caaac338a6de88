"""The publish loop gives way: a lost link stops it at once, and other loops run while a backlog drains."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import MethodType, SimpleNamespace

from labmeter import signing
from labmeter.agent.outbox import AgentStore, Signer
from labmeter.agent.runtime import PUBLISH_CHUNK, Agent
from labmeter.agent.timeline import Span
from labmeter.wire import State


class Link:
    """A link that accepts ``up_for`` publishes and then reports the socket gone, as gmqtt's transport does."""

    def __init__(self, up_for: int) -> None:
        self.up_for = up_for
        self.sent: list[str] = []

    @property
    def connected(self) -> bool:
        return len(self.sent) < self.up_for

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        if not self.connected:
            return False
        self.sent.append(topic)
        return True

    def write_buffer_size(self) -> int:
        return 0

    def inflight(self) -> int:
        return 0


def backlog(tmp_path: Path, n: int) -> AgentStore:
    key = signing.generate_key_file(tmp_path / "agent.key")
    store = AgentStore(tmp_path / "agent.db")
    store.emit(
        Signer("a1", key, signing.key_id(key.public_key())),
        "I1",
        [Span(i, i + 1, State.OFF) for i in range(n)],
        None,
    )
    return store


def test_a_lost_link_stops_the_batch_at_once_and_what_went_out_is_marked(tmp_path: Path) -> None:
    store = backlog(tmp_path, 1000)
    link = Link(up_for=250)
    agent = SimpleNamespace(store=store, link=link, stopping=False)
    agent._wait_for_network = MethodType(Agent._wait_for_network, agent)
    more = asyncio.run(Agent._publish_batch(agent, 1e18))  # type: ignore[arg-type]
    assert more is False
    assert len(link.sent) == 250  # no publish was tried on the dead link after the first refusal
    assert len(store.unsent(100.0)) == 750  # the 250 sent wait for their ack or the resend timeout


def test_other_loops_run_while_a_backlog_drains(tmp_path: Path) -> None:
    store = backlog(tmp_path, 1000)
    link = Link(up_for=10**9)
    agent = SimpleNamespace(store=store, link=link, stopping=False)
    agent._wait_for_network = MethodType(Agent._wait_for_network, agent)
    ticks: list[int] = []

    async def main() -> bool:
        async def other() -> None:
            while True:
                ticks.append(len(link.sent))
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        more = await Agent._publish_batch(agent, 1e18)  # type: ignore[arg-type]
        task.cancel()
        return more

    assert asyncio.run(main()) is True  # a full batch: more may wait
    during = sorted({t for t in ticks if 0 < t < 1000})
    assert during == list(range(PUBLISH_CHUNK, 1000, PUBLISH_CHUNK)), during  # a turn after every chunk
