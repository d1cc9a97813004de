"""MemoryBroker: the broker contract in memory, then what only the twin has (a shared server,
a simulated connection loss) and the topic matching it routes by."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from orchestrator.broker._memory import topic_matches
from orchestrator.broker.base import Broker, IncomingMeta
from orchestrator.broker.memory import MemoryBroker, MemoryServer
from orchestrator.broker.topology import QueueSpec, QuorumQueueArgs
from orchestrator.errors import BrokerError, PublishNackedError, TopologyError, UnroutableError
from tests.contract.broker import (
    MESSAGES,
    PONG,
    BrokerContract,
    Inbox,
    Outside,
    Ping,
    Pong,
    work_queue,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from orchestrator.settings import AMQPSettings


class _ServerView:
    """`Outside` on a MemoryServer."""

    def __init__(self, server: MemoryServer) -> None:
        self._server = server

    async def publish_bytes(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        self._server.publish_bytes(exchange, routing_key, body, message_id=message_id)

    async def ready_count(self, queue: str) -> int:
        return self._server.ready_count(queue)

    async def close_connection(self, broker: Broker) -> None:
        assert isinstance(broker, MemoryBroker)
        broker.simulate_connection_loss()


@pytest.fixture
async def memory_broker(amqp_settings: AMQPSettings) -> AsyncIterator[MemoryBroker]:
    """A connected MemoryBroker with the shared topology declared."""
    async with MemoryBroker(amqp_settings, name="memory-test") as connected:
        await connected.declare()
        yield connected


@pytest.fixture
def broker(memory_broker: MemoryBroker) -> Broker:
    return memory_broker


@pytest.fixture
def outside(memory_broker: MemoryBroker) -> Outside:
    return _ServerView(memory_broker.server)


class TestMemoryBroker(BrokerContract):
    """The broker contract, on MemoryBroker."""


# --- routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "routing_key", "matches"),
    [
        ("job.submitted", "job.submitted", True),
        ("job.submitted", "job.started", False),
        ("job.*", "job.a", True),
        ("job.*", "job", False),
        ("job.*", "job.a.b", False),
        ("*.done", "job.done", True),
        ("job.#", "job", True),
        ("job.#", "job.a.b.c", True),
        ("#", "", True),
        ("#", "any.thing", True),
        ("*", "", False),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("#.z", "z", True),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b", True),
    ],
)
def test_topic_matching_is_rabbitmqs(pattern: str, routing_key: str, matches: bool) -> None:
    assert topic_matches(pattern, routing_key) is matches


# --- what only the twin has ----------------------------------------------------------------------


async def test_brokers_on_one_server_talk_to_each_other(amqp_settings: AMQPSettings) -> None:
    server = MemoryServer()
    async with (
        MemoryBroker(amqp_settings, name="service", server=server) as service,
        MemoryBroker(amqp_settings, name="client", server=server) as client,
    ):
        echo = service.topology.rpc_queue("echo")
        await service.declare(echo)

        async def answer(message: Ping | Pong, meta: IncomingMeta) -> None:
            await service.reply(meta, Pong(n=message.n))

        await service.consume(echo, MESSAGES, answer)
        routing_key = client.topology.rpc_routing_key("echo")
        assert await client.request(client.topology.commands, routing_key, Ping(n=3), PONG) == Pong(
            n=3
        )
        reply_queues = [name for name in server.queues if ".reply." in name]
        assert len(reply_queues) == 1
    assert not any(".reply." in name for name in server.queues)  # exclusive: gone with its owner


async def test_a_reply_to_a_requester_gone_is_dropped(memory_broker: MemoryBroker) -> None:
    meta = IncomingMeta(
        queue="q",
        message_id="m",
        correlation_id="c",
        reply_to=memory_broker.topology.reply_queue("gone").name,
        exchange="",
        routing_key="q",
        redelivered=False,
        delivery_count=0,
        headers={},
        timestamp=None,
    )
    assert await memory_broker.reply(meta, Pong(n=1)) is False


async def test_a_lost_connection_hands_deliveries_back_and_restores_consumers(
    memory_broker: MemoryBroker,
) -> None:
    spec = await work_queue(memory_broker)
    first_started = asyncio.Event()
    release = asyncio.Event()
    deliveries: list[IncomingMeta] = []

    async def handle(message: Ping | Pong, meta: IncomingMeta) -> None:
        deliveries.append(meta)
        if len(deliveries) == 1:
            first_started.set()
            await release.wait()  # still running when the connection goes

    await memory_broker.consume(spec, MESSAGES, handle)
    message_id = await memory_broker.publish(memory_broker.topology.events, "job.x", Ping(n=1))
    await asyncio.wait_for(first_started.wait(), 5)
    memory_broker.simulate_connection_loss()
    await asyncio.sleep(0)  # the restored consumer takes the handed-back delivery
    assert [(meta.message_id, meta.redelivered) for meta in deliveries] == [
        (message_id, False),
        (message_id, True),
    ]
    release.set()
    await asyncio.sleep(0.05)
    assert memory_broker.server.ready_count(spec.name) == 0
    health = await memory_broker.check()
    assert (health.reconnections, health.dead_letters) == (1, 0)
    await memory_broker.publish(memory_broker.topology.events, "job.x", Ping(n=2))
    await asyncio.sleep(0)
    assert len(deliveries) == 3  # consuming goes on


async def test_a_dropped_connection_loses_its_exclusive_queues_until_restored(
    amqp_settings: AMQPSettings,
) -> None:
    server = MemoryServer()
    async with (
        MemoryBroker(amqp_settings, server=server, name="client") as client,
        MemoryBroker(amqp_settings, server=server, name="service") as service,
    ):
        await service.declare()
        mine = client.topology.reply_queue("mine")
        await client.declare(mine, shared=False)
        inbox = Inbox()
        await client.consume(mine, MESSAGES, inbox)
        seen_on_reconnect: list[tuple[int, bool]] = []
        client.on_reconnect(
            lambda: seen_on_reconnect.append((client.reconnections, mine.name in server.queues))
        )
        client.drop_connection()
        with pytest.raises(UnroutableError):  # its exclusive queue went with it
            await service.publish("", mine.name, Ping(n=1))
        waiting = asyncio.create_task(client.publish("", mine.name, Ping(n=2)))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # a publish waits for the connection
        client.restore_connection()
        assert seen_on_reconnect == [(1, True)]  # called once the queue was back
        await waiting
        message, _ = await inbox.next()
        assert message == Ping(n=2)  # consumed again; the ping sent meanwhile is lost
        assert inbox.received.empty()


async def test_a_full_queue_refuses_the_publish(memory_broker: MemoryBroker) -> None:
    topology = memory_broker.topology
    bounded = QueueSpec(
        f"{topology.prefix}.bounded",
        QuorumQueueArgs(max_length=1),
        (topology.work_queue("x", events=["job.#"]).bindings[0],),
    )
    await memory_broker.declare(bounded)
    await memory_broker.publish(topology.events, "job.a", Ping(n=1))
    with pytest.raises(PublishNackedError, match="is full"):
        await memory_broker.publish(topology.events, "job.a", Ping(n=2))


async def test_a_queue_declared_again_with_other_arguments_is_refused(
    memory_broker: MemoryBroker,
) -> None:
    topology = memory_broker.topology
    await memory_broker.declare(topology.work_queue("x"))
    with pytest.raises(TopologyError, match="other arguments"):
        await memory_broker.declare(QueueSpec(f"{topology.prefix}.x", QuorumQueueArgs()))
    with pytest.raises(TopologyError, match="is a stream"):
        await memory_broker.consume(topology.events_stream, MESSAGES, Inbox())


async def test_a_closed_broker_refuses_work(amqp_settings: AMQPSettings) -> None:
    broker = MemoryBroker(amqp_settings)
    with pytest.raises(BrokerError, match="not connected"):
        await broker.publish(broker.topology.events, "job.a", Ping(n=1))
    async with broker:
        await broker.declare()
        assert broker.is_connected
    assert not broker.is_connected
    with pytest.raises(BrokerError, match="not connected"):
        await broker.check()


async def test_a_deleted_queue_loses_its_consumer_until_declared_again(
    memory_broker: MemoryBroker,
) -> None:
    spec = await work_queue(memory_broker)
    inbox = Inbox()
    await memory_broker.consume(spec, MESSAGES, inbox)
    memory_broker.server.delete_queue(spec.name)
    assert await memory_broker.lost_consumers() == [spec.name]
    assert await memory_broker.lost_consumers(redeclare=True) == []
    await memory_broker.publish(memory_broker.topology.events, "job.x", Ping(n=7))
    message, meta = await inbox.next()
    assert message == Ping(n=7)
    assert meta.user_id == memory_broker.username


async def test_each_connection_publishes_as_its_own_broker_user(
    amqp_settings: AMQPSettings,
) -> None:
    server = MemoryServer()
    async with (
        MemoryBroker(amqp_settings, server=server, username="role:access@x") as access,
        MemoryBroker(amqp_settings, server=server, username="user:alice@x") as alice,
    ):
        spec = await work_queue(access)
        inbox = Inbox()
        await access.consume(spec, MESSAGES, inbox)
        await alice.publish(alice.topology.events, "job.a", Ping(n=1))
        assert (await inbox.next())[1].user_id == "user:alice@x"
        assert MemoryBroker(amqp_settings).username == "guest"  # the URL's user, as aio-pika's
