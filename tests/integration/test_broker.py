"""The broker on RabbitMQ: settings and codec without a server, the broker contract on the real
server, then what only a real server shows (the wire format, a server-side close)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import aio_pika
import pytest
from pydantic import SecretStr, ValidationError

from orchestrator.broker._dlq import (
    CODE_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
)
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker, IncomingMeta
from orchestrator.core.codec import decode
from orchestrator.errors import (
    BrokerUnavailableError,
    InvalidMessageError,
    PoisonMessageError,
)
from orchestrator.settings import AMQPSettings
from tests._waiting import eventually
from tests.contract.broker import (
    MESSAGES,
    PONG,
    BrokerContract,
    Inbox,
    Outside,
    Ping,
    Pong,
    letters,
    work_queue,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from aio_pika.abc import AbstractChannel

    from tests.conftest import RabbitMQCtl


@pytest.fixture
async def raw_channel(amqp_settings: AMQPSettings) -> AsyncIterator[AbstractChannel]:
    """A plain aio-pika channel: a foreign publisher, or a look at the queues from outside."""
    connection = await aio_pika.connect(amqp_settings.amqp_url.get_secret_value())
    async with connection, connection.channel() as channel:
        yield channel


class _ChannelView:
    """`Outside` on a plain aio-pika channel (and the server's `rabbitmqctl`)."""

    def __init__(self, channel: AbstractChannel, rabbitmqctl: RabbitMQCtl) -> None:
        self._channel = channel
        self._rabbitmqctl = rabbitmqctl

    async def publish_bytes(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        target = await self._channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(body, message_id=message_id), routing_key)

    async def ready_count(self, queue: str) -> int:
        declared = await self._channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0

    async def close_connection(self, broker: Broker) -> None:
        closed = await self._rabbitmqctl.close_connections(broker.name, "test: server-side close")
        assert closed == 1


@pytest.fixture
def outside(raw_channel: AbstractChannel, rabbitmqctl: RabbitMQCtl) -> Outside:
    return _ChannelView(raw_channel, rabbitmqctl)


@pytest.mark.integration
class TestAMQPBroker(BrokerContract):
    """The broker contract, on AMQPBroker and the real RabbitMQ."""


# --- settings and codec (no server) -------------------------------------------------------------


def test_amqp_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARJOBS_AMQP_URL", "amqps://svc:s3cret@mq.internal:5671/jobs")
    monkeypatch.setenv("PARJOBS_PREFIX", "acme.prod")
    monkeypatch.setenv("PARJOBS_PREFETCH", "4")
    monkeypatch.setenv("PARJOBS_DELIVERY_LIMIT", "7")
    settings = AMQPSettings()
    assert settings.amqp_url.get_secret_value() == "amqps://svc:s3cret@mq.internal:5671/jobs"
    assert settings.display_url == "amqps://svc:***@mq.internal:5671/jobs"
    assert "s3cret" not in repr(settings)
    assert (settings.prefix, settings.prefetch, settings.delivery_limit) == ("acme.prod", 4, 7)


def test_amqp_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AMQPSettings.model_fields:
        monkeypatch.delenv(f"PARJOBS_{name.upper()}", raising=False)
    settings = AMQPSettings()
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert (settings.prefix, settings.prefetch, settings.delivery_limit) == ("parjobs", 16, 5)
    assert AMQPBroker(settings).topology.events.name == "parjobs.events"


@pytest.mark.parametrize(
    "field",
    [
        {"amqp_url": SecretStr("http://127.0.0.1:5672/")},
        {"prefix": "amq.mine"},
        {"prefix": "has space"},
        {"prefetch": 0},
        {"delivery_limit": 0},
    ],
)
def test_amqp_settings_refuse_bad_values(field: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AMQPSettings(**field)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "undecodable"),
        (b'{"type": "launch", "n": 1}', "unknown-type"),
        (b'{"n": 1}', "unknown-type"),
        (b'{"type": "ping", "n": "many"}', "invalid"),
        (b'{"type": "ping", "n": 1, "extra": true}', "invalid"),
    ],
)
def test_decode_classifies_what_it_refuses(body: bytes, code: str) -> None:
    with pytest.raises(InvalidMessageError) as refused:
        decode(MESSAGES, body)
    assert refused.value.dead_letter_reason == code
    assert isinstance(refused.value, PoisonMessageError)


def test_decode_accepts_a_valid_body() -> None:
    assert decode(MESSAGES, b'{"type": "pong", "n": 3}') == Pong(n=3)


async def test_an_unreachable_broker_is_a_clear_error() -> None:
    settings = AMQPSettings(amqp_url=SecretStr("amqp://guest:guest@127.0.0.1:1/"), prefix="x")
    with pytest.raises(
        BrokerUnavailableError, match=r"RabbitMQ not reachable at amqp://guest:\*\*\*@"
    ):
        await AMQPBroker(settings).connect()


# --- what only a real server shows ---------------------------------------------------------------


@pytest.mark.integration
async def test_messages_are_persistent_json(broker: Broker, raw_channel: AbstractChannel) -> None:
    spec = await work_queue(broker)
    await broker.publish(broker.topology.events, "job.submitted", Ping(n=2))
    queue = await raw_channel.declare_queue(spec.name, passive=True)
    got = await queue.get(no_ack=True, timeout=5)
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert got.content_type == "application/json"
    assert json.loads(got.body) == {"type": "ping", "n": 2}


@pytest.mark.integration
async def test_reason_headers_on_a_poison_message(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    spec = await work_queue(broker)
    await broker.consume(spec, MESSAGES, Inbox())
    await broker.publish(broker.topology.events, "job.bad", Ping(n=-1), headers={"x-trace": "t"})
    await letters(broker, 1)
    dlq = await raw_channel.declare_queue(broker.topology.dead_letter_queue.name, passive=True)
    raw = await dlq.get(timeout=5)
    headers = raw.headers
    assert headers[CODE_HEADER] == "poison"
    assert headers[REASON_HEADER] == "negative ping -1"
    assert (headers[QUEUE_HEADER], headers[ROUTING_KEY_HEADER]) == (spec.name, "job.bad")
    assert headers["x-trace"] == "t"  # the message's own headers travel along
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    await raw.nack(requeue=True)


@pytest.mark.integration
async def test_consumers_and_publishing_survive_a_server_side_close(
    broker: Broker, rabbitmqctl: RabbitMQCtl
) -> None:
    spec = await work_queue(broker)
    seen: set[int] = set()

    async def record(message: Ping | Pong, meta: IncomingMeta) -> None:
        seen.add(message.n)

    await broker.consume(spec, MESSAGES, record)

    async def publish_steadily(count: int) -> None:
        for n in range(count):
            await broker.publish(broker.topology.events, "job.x", Ping(n=n))
            await asyncio.sleep(0.005)

    # publishes go on while the server closes the connection: none may fail or be lost
    publishing = asyncio.create_task(publish_steadily(300))
    await asyncio.sleep(0.2)
    assert await rabbitmqctl.close_connections(broker.name, "test: server-side close") == 1
    await publishing

    async def reconnected() -> bool:
        return broker.reconnections == 1

    await eventually(reconnected, "the connection restored")

    async def all_seen() -> bool:
        return seen == set(range(300))

    await eventually(
        all_seen, "all 300 seen"
    )  # the restored consumer received everything (duplicates allowed)
    await broker.publish(broker.topology.events, "job.x", Ping(n=1000))

    async def new_one_seen() -> bool:
        return 1000 in seen

    await eventually(new_one_seen, "the message after the close seen")
    health = await broker.check()
    assert (health.reconnections, health.dead_letters) == (1, 0)
    assert broker.is_connected


@pytest.mark.integration
async def test_request_reply_survives_a_server_side_close(
    broker: Broker, rabbitmqctl: RabbitMQCtl
) -> None:
    echo = broker.topology.rpc_queue("echo")
    await broker.declare(echo)

    async def answer(message: Ping | Pong, meta: IncomingMeta) -> None:
        await broker.reply(meta, Pong(n=message.n))

    await broker.consume(echo, MESSAGES, answer)
    routing_key = broker.topology.rpc_routing_key("echo")
    assert await broker.request(broker.topology.commands, routing_key, Ping(n=1), PONG) == Pong(n=1)
    # the exclusive reply queue dies with the connection; the restore declares it again
    assert await rabbitmqctl.close_connections(broker.name, "test: server-side close") == 1

    async def reconnected() -> bool:
        return broker.reconnections == 1

    await eventually(reconnected, "the connection restored")
    assert await broker.request(broker.topology.commands, routing_key, Ping(n=2), PONG) == Pong(n=2)
