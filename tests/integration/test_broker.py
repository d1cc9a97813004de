"""The broker seam: settings and codec without a server, then everything against real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Literal

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from pydantic import Field, SecretStr, TypeAdapter, ValidationError

from orchestrator.broker._dlq import (
    CODE_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    REDRIVEN_HEADER,
    ROUTING_KEY_HEADER,
)
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker, DeadLetter, DeadLetterReason, IncomingMeta
from orchestrator.broker.topology import QueueSpec
from orchestrator.core.codec import decode
from orchestrator.errors import (
    BrokerUnavailableError,
    InvalidMessageError,
    PoisonMessageError,
    RequestTimeoutError,
    TopologyError,
    UnroutableError,
)
from orchestrator.settings import AMQPSettings
from schemas._base import WireModel

if TYPE_CHECKING:
    from tests.conftest import RabbitMQCtl


class Ping(WireModel):
    type: Literal["ping"] = "ping"
    n: int


class Pong(WireModel):
    type: Literal["pong"] = "pong"
    n: int


Msg = Annotated[Ping | Pong, Field(discriminator="type")]
MESSAGES: TypeAdapter[Ping | Pong] = TypeAdapter(Msg)
PONG = TypeAdapter(Pong)


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    """Wait until `check()` is true, polling; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.05)


class Inbox:
    """A handler that records what it receives, and can be told to fail."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[Ping | Pong, IncomingMeta]] = asyncio.Queue()
        self.fail_with: Exception | None = None

    async def __call__(self, message: Ping | Pong, meta: IncomingMeta) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if isinstance(message, Ping) and message.n < 0:
            raise PoisonMessageError(f"negative ping {message.n}")
        await self.received.put((message, meta))

    async def next(self, within: float = 10.0) -> tuple[Ping | Pong, IncomingMeta]:
        async with asyncio.timeout(within):
            return await self.received.get()


@pytest.fixture
async def raw_channel(amqp_settings: AMQPSettings) -> AsyncIterator[AbstractChannel]:
    """A plain aio-pika channel: a foreign publisher, or a look at the queues from outside."""
    connection = await aio_pika.connect(amqp_settings.amqp_url.get_secret_value())
    async with connection, connection.channel() as channel:
        yield channel


async def work_queue(broker: Broker, role: str = "storage") -> QueueSpec:
    spec = broker.topology.work_queue(role, events=["job.#"])
    await broker.declare(spec)
    return spec


async def queue_depth(channel: AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


async def letters(broker: Broker, count: int) -> list[DeadLetter]:
    """The dead letters, once there are `count` of them."""

    async def arrived() -> bool:
        return len(await broker.dead_letters()) >= count

    await eventually(arrived)
    return await broker.dead_letters()


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
    assert refused.value.code == code
    assert isinstance(refused.value, PoisonMessageError)


def test_decode_accepts_a_valid_body() -> None:
    assert decode(MESSAGES, b'{"type": "pong", "n": 3}') == Pong(n=3)


async def test_an_unreachable_broker_is_a_clear_error() -> None:
    settings = AMQPSettings(amqp_url=SecretStr("amqp://guest:guest@127.0.0.1:1/"), prefix="x")
    with pytest.raises(
        BrokerUnavailableError, match=r"RabbitMQ not reachable at amqp://guest:\*\*\*@"
    ):
        await AMQPBroker(settings).connect()


# --- publish and consume ------------------------------------------------------------------------


@pytest.mark.integration
async def test_publish_confirm_consume_round_trip(broker: Broker) -> None:
    spec = await work_queue(broker)
    inbox = Inbox()
    await broker.consume(spec, MESSAGES, inbox)
    message_id = await broker.publish(
        broker.topology.events,
        "job.submitted",
        Ping(n=1),
        headers={"x-trace": "t-1"},
        correlation_id="c-1",
    )
    message, meta = await inbox.next()
    assert message == Ping(n=1)
    assert meta.message_id == message_id
    assert (meta.queue, meta.exchange, meta.routing_key) == (
        spec.name,
        broker.topology.events.name,
        "job.submitted",
    )
    assert (meta.correlation_id, meta.headers["x-trace"]) == ("c-1", "t-1")
    assert (meta.redelivered, meta.delivery_count) == (False, 0)


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
async def test_unroutable_publish_is_an_error(broker: Broker) -> None:
    # nothing is bound to this command: the broker returns it (mandatory) instead of dropping it
    with pytest.raises(UnroutableError, match="no queue is bound"):
        await broker.publish(broker.topology.commands, "nobody.listens", Ping(n=1))
    with pytest.raises(UnroutableError, match="no exchange"):
        await broker.publish(f"{broker.settings.prefix}.missing", "k", Ping(n=1))
    # the publishing channel survived both
    await broker.publish(broker.topology.events, "job.fine", Ping(n=1))


@pytest.mark.integration
async def test_prefetch_bounds_concurrent_handlers(broker: Broker) -> None:
    spec = await work_queue(broker)
    release = asyncio.Event()
    running = 0
    peak = 0
    done = 0

    async def slow(message: Ping | Pong, meta: IncomingMeta) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done += 1

    await broker.consume(spec, MESSAGES, slow, prefetch=2)
    for n in range(6):
        await broker.publish(broker.topology.events, "job.x", Ping(n=n))

    async def two_running() -> bool:
        return running == 2

    await eventually(two_running)
    await asyncio.sleep(0.3)  # time for a third delivery, were the bound not kept
    assert peak == 2
    release.set()

    async def all_done() -> bool:
        return done == 6

    await eventually(all_done)
    assert peak == 2


@pytest.mark.integration
async def test_consuming_or_reading_what_does_not_exist_is_a_topology_error(broker: Broker) -> None:
    with pytest.raises(TopologyError, match="does not exist"):
        await broker.consume(f"{broker.settings.prefix}.nowhere", MESSAGES, Inbox())
    with pytest.raises(TopologyError, match="does not exist"):
        [
            record
            async for record in broker.read_stream(f"{broker.settings.prefix}.nothing", MESSAGES)
        ]
    # the broker is still fine
    await broker.publish(broker.topology.events, "job.x", Ping(n=1))
    assert (await broker.check()).dead_letters == 0


# --- failures and the dead-letter queue ---------------------------------------------------------


@pytest.mark.integration
async def test_a_failing_handler_is_redelivered_then_dead_lettered_by_the_broker(
    broker: Broker,
) -> None:
    spec = await work_queue(broker)  # delivery limit 2 (amqp_settings)
    attempts: list[int] = []

    async def flaky(message: Ping | Pong, meta: IncomingMeta) -> None:
        attempts.append(meta.delivery_count)
        raise RuntimeError("the object store is down")

    await broker.consume(spec, MESSAGES, flaky)
    message_id = await broker.publish(broker.topology.events, "job.submitted", Ping(n=1))
    [letter] = await letters(broker, 1)
    assert attempts == [0, 1, 2]  # the first delivery and two redeliveries
    assert letter.message_id == message_id
    assert letter.code is DeadLetterReason.DELIVERY_LIMIT  # told apart from consumer verdicts
    assert (letter.original_queue, letter.original_routing_key) == (spec.name, "job.submitted")
    assert letter.original_exchange == broker.topology.events.name
    assert letter.dead_lettered_at is not None
    assert json.loads(letter.body) == {"type": "ping", "n": 1}


@pytest.mark.integration
async def test_undecodable_and_unknown_messages_are_dead_lettered_once(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    spec = await work_queue(broker)
    inbox = Inbox()
    await broker.consume(spec, MESSAGES, inbox)
    events = await raw_channel.get_exchange(broker.topology.events.name)
    for message_id, body in (("garbage", b"\x00not json"), ("alien", b'{"type": "launch"}')):
        await events.publish(aio_pika.Message(body, message_id=message_id), "job.submitted")
    await broker.publish(broker.topology.events, "job.submitted", Ping(n=7))

    good, _ = await inbox.next()  # the consumer went on to the next message
    assert good == Ping(n=7)
    dead = {letter.message_id: letter for letter in await letters(broker, 2)}
    assert dead["garbage"].code is DeadLetterReason.UNDECODABLE
    assert dead["alien"].code is DeadLetterReason.UNKNOWN_TYPE
    for letter in dead.values():
        assert letter.original_queue == spec.name
        assert letter.original_routing_key == "job.submitted"
        assert letter.reason
    await asyncio.sleep(0.5)  # once: nothing loops back or piles up
    assert len(await broker.dead_letters()) == 2
    assert await queue_depth(raw_channel, spec.name) == 0


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
async def test_dead_letters_are_listed_without_loss_and_re_driven(broker: Broker) -> None:
    spec = await work_queue(broker)
    inbox = Inbox()
    await broker.consume(spec, MESSAGES, inbox)
    first = await broker.publish(broker.topology.events, "job.a", Ping(n=-1))
    second = await broker.publish(broker.topology.events, "job.b", Ping(n=-2))
    listed = await letters(broker, 2)
    assert [letter.message_id for letter in listed] == [first, second]  # oldest first
    assert [letter.message_id for letter in await broker.dead_letters(limit=1)] == [first]
    assert len(await broker.dead_letters()) == 2  # looking took nothing away

    async def accept(message: Ping | Pong, meta: IncomingMeta) -> None:
        await inbox.received.put((message, meta))

    await broker.drain(1)
    await broker.consume(spec, MESSAGES, accept)  # the handler was fixed
    assert await broker.redrive(["no-such-id"]) == 0
    assert await broker.redrive([second]) == 1
    message, meta = await inbox.next()
    assert (message, meta.message_id, meta.queue) == (Ping(n=-2), second, spec.name)
    assert REDRIVEN_HEADER in meta.headers
    assert not any(key.startswith(("x-death", "x-parjobs-reason")) for key in meta.headers)
    assert [letter.message_id for letter in await broker.dead_letters()] == [first]
    assert await broker.redrive("all") == 1
    assert (await inbox.next())[1].message_id == first
    assert await broker.dead_letters() == []


@pytest.mark.integration
async def test_a_broker_dead_letter_can_be_re_driven(broker: Broker) -> None:
    spec = await work_queue(broker)
    inbox = Inbox()
    inbox.fail_with = RuntimeError("down")
    await broker.consume(spec, MESSAGES, inbox)
    message_id = await broker.publish(broker.topology.events, "job.x", Ping(n=5))
    await letters(broker, 1)
    inbox.fail_with = None
    assert await broker.redrive("all") == 1
    message, meta = await inbox.next()
    assert (message, meta.message_id, meta.delivery_count) == (Ping(n=5), message_id, 0)


@pytest.mark.integration
async def test_health_check(broker: Broker) -> None:
    assert broker.is_connected
    health = await broker.check()
    assert health.dead_letters == 0
    assert 0 <= health.round_trip_seconds < 5


# --- request / reply ----------------------------------------------------------------------------


@pytest.mark.integration
async def test_request_reply_and_timeout(broker: Broker) -> None:
    echo = broker.topology.rpc_queue("echo")
    idle = broker.topology.rpc_queue("idle")
    await broker.declare(echo, idle)

    async def answer(message: Ping | Pong, meta: IncomingMeta) -> None:
        assert await broker.reply(meta, Pong(n=message.n * 2))

    await broker.consume(echo, MESSAGES, answer)
    commands = broker.topology.commands
    replies = await asyncio.gather(
        *(
            broker.request(commands, broker.topology.rpc_routing_key("echo"), Ping(n=n), PONG)
            for n in range(5)
        )
    )
    assert replies == [Pong(n=2 * n) for n in range(5)]  # each to its own correlation id

    with pytest.raises(RequestTimeoutError, match=r"no reply within 0\.5s"):
        await broker.request(
            commands, broker.topology.rpc_routing_key("idle"), Ping(n=1), PONG, timeout=0.5
        )
    with pytest.raises(UnroutableError):
        await broker.request(commands, "rpc.nobody", Ping(n=1), PONG)


# --- streams ------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_stream_reads_every_event_from_the_first_in_order(broker: Broker) -> None:
    stream = broker.topology.events_stream
    empty = [record async for record in broker.read_stream(stream, MESSAGES, idle_timeout=0.5)]
    assert empty == []
    for n in range(50):
        await broker.publish(broker.topology.events, f"job.{n % 3}", Ping(n=n))

    records = [record async for record in broker.read_stream(stream, MESSAGES)]
    assert [record.value for record in records] == [Ping(n=n) for n in range(50)]
    offsets = [record.offset for record in records]
    assert offsets == sorted(set(offsets))  # increasing, no repeats
    assert records[4].routing_key == "job.1"

    # again, from the start: a stream is not consumed by reading it
    again = [record async for record in broker.read_stream(stream, MESSAGES)]
    assert len(again) == 50
    # `until` stops after the record it accepts; an offset resumes mid-stream
    upto = [
        record.value
        async for record in broker.read_stream(
            stream, MESSAGES, until=lambda record: record.value.n == 9
        )
    ]
    assert upto == [Ping(n=n) for n in range(10)]
    tail = [
        record.value async for record in broker.read_stream(stream, MESSAGES, offset=offsets[45])
    ]
    assert tail == [Ping(n=n) for n in range(45, 50)]


@pytest.mark.integration
async def test_stream_invalid_record_stops_a_read_unless_skipped(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    stream = broker.topology.events_stream
    await broker.publish(broker.topology.events, "job.a", Ping(n=1))
    events = await raw_channel.get_exchange(broker.topology.events.name)
    await events.publish(aio_pika.Message(b"not json"), routing_key="job.a")
    await broker.publish(broker.topology.events, "job.a", Ping(n=2))
    with pytest.raises(InvalidMessageError, match="resume from offset"):
        _ = [record async for record in broker.read_stream(stream, MESSAGES)]
    skipped = [
        record.value async for record in broker.read_stream(stream, MESSAGES, skip_invalid=True)
    ]
    assert skipped == [Ping(n=1), Ping(n=2)]


@pytest.mark.integration
async def test_stream_follow_sees_new_events(broker: Broker) -> None:
    stream = broker.topology.events_stream
    await broker.publish(broker.topology.events, "job.a", Ping(n=0))

    async def follow() -> list[int]:
        return [
            record.value.n
            async for record in broker.read_stream(
                stream, MESSAGES, follow=True, until=lambda record: record.value.n == 3
            )
        ]

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    for n in (1, 2, 3, 4):
        await broker.publish(broker.topology.events, "job.a", Ping(n=n))
    async with asyncio.timeout(10):
        assert await reader == [0, 1, 2, 3]


# --- lifecycle ----------------------------------------------------------------------------------


@pytest.mark.integration
async def test_drain_lets_in_flight_handlers_finish(
    broker: Broker, raw_channel: AbstractChannel
) -> None:
    spec = await work_queue(broker)
    started = asyncio.Event()
    finished: list[int] = []

    async def slow(message: Ping | Pong, meta: IncomingMeta) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(message.n)

    await broker.consume(spec, MESSAGES, slow)
    await broker.publish(broker.topology.events, "job.x", Ping(n=1))
    await asyncio.wait_for(started.wait(), 10)
    assert await broker.drain(timeout=5) is True
    assert finished == [1]
    assert await queue_depth(raw_channel, spec.name) == 0  # acked, not requeued
    # stopped: a new message waits in the queue
    await broker.publish(broker.topology.events, "job.x", Ping(n=2))
    await asyncio.sleep(0.3)
    assert finished == [1]
    assert await queue_depth(raw_channel, spec.name) == 1


@pytest.mark.integration
async def test_drain_past_its_deadline_hands_the_message_back(
    broker: Broker, amqp_settings: AMQPSettings
) -> None:
    spec = await work_queue(broker)
    started = asyncio.Event()

    async def stuck(message: Ping | Pong, meta: IncomingMeta) -> None:
        started.set()
        await asyncio.sleep(60)

    await broker.consume(spec, MESSAGES, stuck)
    message_id = await broker.publish(broker.topology.events, "job.x", Ping(n=1))
    await asyncio.wait_for(started.wait(), 10)
    assert await broker.drain(timeout=0.2) is False
    async with AMQPBroker(amqp_settings, name=f"{broker.name}-2") as other:
        inbox = Inbox()
        await other.consume(spec, MESSAGES, inbox)
        message, meta = await inbox.next()
        assert (message, meta.message_id, meta.redelivered) == (Ping(n=1), message_id, True)


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

    await eventually(reconnected)

    async def all_seen() -> bool:
        return seen == set(range(300))

    await eventually(all_seen)  # the restored consumer received everything (duplicates allowed)
    await broker.publish(broker.topology.events, "job.x", Ping(n=1000))

    async def new_one_seen() -> bool:
        return 1000 in seen

    await eventually(new_one_seen)
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

    await eventually(reconnected)
    assert await broker.request(broker.topology.commands, routing_key, Ping(n=2), PONG) == Pong(n=2)
