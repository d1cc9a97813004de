"""The broker contract: what every `Broker` does, written once.

`BrokerContract` is run by subclassing it next to fixtures that provide:
- `broker`: a connected `Broker` with the shared topology declared, whose settings have a delivery
  limit of 2 and a short retry delay (the `amqp_settings` fixture's);
- `outside`: an `Outside`, the view of a client that is not the broker under test.

`tests/unit/test_memory_broker.py` runs it on `MemoryBroker`, `tests/integration/test_broker.py`
on `AMQPBroker` and the real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Annotated, Literal, Protocol

import pytest
from pydantic import Field, TypeAdapter

from orchestrator.broker.base import Broker, DeadLetter, DeadLetterReason, IncomingMeta
from orchestrator.broker.topology import Binding, ClassicQueueArgs, QueueSpec
from orchestrator.errors import (
    InvalidMessageError,
    PoisonMessageError,
    RequestTimeoutError,
    TopologyError,
    UnroutableError,
)
from schemas._base import WireModel
from tests._waiting import eventually


class Ping(WireModel):
    type: Literal["ping"] = "ping"
    n: int


class Pong(WireModel):
    type: Literal["pong"] = "pong"
    n: int


MESSAGES: TypeAdapter[Ping | Pong] = TypeAdapter(
    Annotated[Ping | Pong, Field(discriminator="type")]
)
PONG = TypeAdapter(Pong)
QUICK = 0.05  # the polling interval: the memory broker answers at once


class Outside(Protocol):
    """What a test sees from outside the broker under test."""

    async def publish_bytes(
        self, exchange: str, routing_key: str, body: bytes, *, message_id: str | None = None
    ) -> None:
        """Publish `body` as it is, as a foreign publisher might."""
        ...

    async def ready_count(self, queue: str) -> int:
        """Messages waiting in `queue`."""
        ...

    async def close_connection(self, broker: Broker) -> None:
        """Close `broker`'s connection from the server's side (it reconnects by itself)."""
        ...


class Inbox:
    """A handler that records what it receives; a negative ping is poison, and it can be told
    to fail."""

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


async def work_queue(broker: Broker, role: str = "storage", *events: str) -> QueueSpec:
    """A declared work queue bound to `events` (default: `job.#`)."""
    spec = broker.topology.work_queue(role, events=events or ["job.#"])
    await broker.declare(spec)
    return spec


async def letters(broker: Broker, count: int) -> list[DeadLetter]:
    """The dead letters, once there are `count` of them."""

    async def arrived() -> bool:
        return len(await broker.dead_letters()) >= count

    await eventually(arrived, f"{count} dead letter(s)", timeout=15, interval=QUICK)
    return await broker.dead_letters()


class BrokerContract:
    """Every test here runs on each `Broker` implementation."""

    # --- a lost connection ----------------------------------------------------------------------

    async def test_on_reconnect_runs_once_the_exclusive_queues_are_consumed_again(
        self, broker: Broker, outside: Outside
    ) -> None:
        events = QueueSpec(
            broker.topology.reply_queue(uuid.uuid4().hex).name,
            ClassicQueueArgs(),
            (Binding(broker.topology.events.name, "job.reconnect.#"),),
            exclusive=True,
        )
        await broker.declare(events, shared=False)
        inbox = Inbox()
        await broker.consume(events, MESSAGES, inbox)
        reconnected: list[int] = []
        publishing: list[asyncio.Task[None]] = []
        sent = asyncio.Event()
        body = Ping(n=2).model_dump_json().encode()

        async def publish_from_outside() -> None:
            await outside.publish_bytes(broker.topology.events.name, "job.reconnect.x", body)
            sent.set()

        def on_reconnect() -> None:
            reconnected.append(broker.reconnections)
            # Not mandatory: were the queue or its consumer not back yet, the ping would be lost.
            publishing.append(asyncio.get_running_loop().create_task(publish_from_outside()))

        broker.on_reconnect(on_reconnect)
        await outside.close_connection(broker)
        message, _ = await inbox.next()
        assert message == Ping(n=2)
        assert reconnected == [1]
        await asyncio.wait_for(sent.wait(), 5)

    # --- delays: a message's own TTL, then its queue's dead-letter route ------------------------

    async def test_a_message_whose_ttl_runs_out_goes_on_by_its_dead_letter_route(
        self, broker: Broker
    ) -> None:
        topology = broker.topology
        delay = topology.delay_queue(timedelta(seconds=1))
        await broker.declare(topology.deadlines, delay)
        inbox = Inbox()
        await broker.consume(topology.deadlines, MESSAGES, inbox)
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        message_id = await broker.publish(
            "", delay.name, Ping(n=1), expiration=timedelta(seconds=0.3)
        )
        message, meta = await inbox.next()
        assert message == Ping(n=1)
        assert loop.time() - sent_at >= 0.3  # not before its TTL ran out
        assert meta.message_id == message_id
        assert meta.user_id == broker.username  # still the publisher's: who sent it is known
        (death,) = meta.headers["x-death"]
        assert death["reason"] == "expired"
        assert death["queue"] == delay.name

    async def test_a_ttl_runs_out_only_at_the_head_of_the_queue(self, broker: Broker) -> None:
        # RabbitMQ expires only a queue's head: a shorter TTL behind a longer one waits for it.
        # (Why deadlines go to one delay queue per bucket of TTLs.)
        topology = broker.topology
        delay = topology.delay_queue(timedelta(seconds=1))
        await broker.declare(topology.deadlines, delay)
        inbox = Inbox()
        await broker.consume(topology.deadlines, MESSAGES, inbox)
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        await broker.publish("", delay.name, Ping(n=1), expiration=timedelta(seconds=0.8))
        await broker.publish("", delay.name, Ping(n=2), expiration=timedelta(seconds=0.05))
        first, _ = await inbox.next()
        second, _ = await inbox.next()
        assert (first, second) == (Ping(n=1), Ping(n=2))
        assert loop.time() - sent_at >= 0.8

    # --- publishing and routing -----------------------------------------------------------------

    async def test_publish_consume_round_trip(self, broker: Broker) -> None:
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
        assert meta.timestamp is not None
        # Every publish carries the connection's broker user, as the broker checked it.
        assert meta.user_id == broker.username

    async def test_a_confirmed_publish_is_in_its_queue(
        self, broker: Broker, outside: Outside
    ) -> None:
        spec = await work_queue(broker)
        first = await broker.publish(broker.topology.events, "job.a", Ping(n=1))
        second = await broker.publish(broker.topology.events, "job.a", Ping(n=2), message_id="m-2")
        assert await outside.ready_count(spec.name) == 2  # taken by the time publish returned
        assert len({first, second}) == 2
        assert second == "m-2"

    async def test_routing_follows_the_bindings(self, broker: Broker, outside: Outside) -> None:
        one_word = await work_queue(broker, "alpha", "job.*", "audit.#.done")
        any_words = await work_queue(broker, "beta", "job.#")
        commanded = broker.topology.rpc_queue("gamma")
        await broker.declare(commanded)
        events = broker.topology.events
        for key in ("job.a", "job.a.b", "job", "audit.done", "audit.x.y.done", "audit.x.y"):
            await broker.publish(events, key, Ping(n=0))
        await broker.publish(
            broker.topology.commands, broker.topology.rpc_routing_key("gamma"), Ping(n=0)
        )
        await broker.publish("", any_words.name, Ping(n=0))  # the default exchange: by name
        # `*` is one word, `#` zero or more; a direct exchange wants the exact key
        assert await outside.ready_count(one_word.name) == 3  # job.a, audit.done, audit.x.y.done
        assert await outside.ready_count(any_words.name) == 4  # job.a, job.a.b, job, direct
        assert await outside.ready_count(commanded.name) == 1
        with pytest.raises(UnroutableError):
            await broker.publish(broker.topology.commands, "rpc", Ping(n=0))

    async def test_unroutable_publish_is_an_error(self, broker: Broker) -> None:
        # nothing is bound to this command: the broker returns it (mandatory), never drops it
        with pytest.raises(UnroutableError, match="no queue is bound"):
            await broker.publish(broker.topology.commands, "nobody.listens", Ping(n=1))
        with pytest.raises(UnroutableError, match="no exchange"):
            await broker.publish(f"{broker.settings.prefix}.missing", "k", Ping(n=1))
        with pytest.raises(UnroutableError, match="no queue is bound"):
            await broker.publish("", f"{broker.settings.prefix}.no-such-queue", Ping(n=1))
        # the broker is still fine
        await broker.publish(broker.topology.events, "job.fine", Ping(n=1))

    async def test_consuming_or_reading_what_does_not_exist_is_a_topology_error(
        self, broker: Broker
    ) -> None:
        with pytest.raises(TopologyError, match="does not exist"):
            await broker.consume(f"{broker.settings.prefix}.nowhere", MESSAGES, Inbox())
        with pytest.raises(TopologyError, match="does not exist"):
            [
                record
                async for record in broker.read_stream(
                    f"{broker.settings.prefix}.nothing", MESSAGES
                )
            ]
        await broker.publish(broker.topology.events, "job.x", Ping(n=1))
        assert (await broker.check()).dead_letters == 0

    # --- consuming ------------------------------------------------------------------------------

    async def test_prefetch_bounds_concurrent_handlers(self, broker: Broker) -> None:
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

        await eventually(two_running, "two handlers running", interval=QUICK)
        await asyncio.sleep(0.3)  # time for a third delivery, were the bound not kept
        assert peak == 2
        release.set()

        async def all_done() -> bool:
            return done == 6

        await eventually(all_done, "six messages handled", interval=QUICK)
        assert peak == 2

    async def test_a_failed_delivery_comes_again(self, broker: Broker) -> None:
        spec = await work_queue(broker)
        seen: list[IncomingMeta] = []
        handled = asyncio.Event()

        async def fails_once(message: Ping | Pong, meta: IncomingMeta) -> None:
            seen.append(meta)
            if len(seen) == 1:
                raise RuntimeError("the object store is down")
            handled.set()

        await broker.consume(spec, MESSAGES, fails_once)
        message_id = await broker.publish(broker.topology.events, "job.x", Ping(n=1))
        await asyncio.wait_for(handled.wait(), 10)
        assert [meta.message_id for meta in seen] == [message_id, message_id]
        assert [(meta.redelivered, meta.delivery_count) for meta in seen] == [(False, 0), (True, 1)]
        assert await broker.dead_letters() == []

    async def test_a_failing_handler_is_redelivered_then_dead_lettered(
        self, broker: Broker
    ) -> None:
        spec = await work_queue(broker)  # delivery limit 2
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

    async def test_undecodable_and_unknown_messages_are_dead_lettered_once(
        self, broker: Broker, outside: Outside
    ) -> None:
        spec = await work_queue(broker)
        inbox = Inbox()
        await broker.consume(spec, MESSAGES, inbox)
        events = broker.topology.events.name
        await outside.publish_bytes(events, "job.submitted", b"\x00not json", message_id="garbage")
        await outside.publish_bytes(
            events, "job.submitted", b'{"type": "launch"}', message_id="alien"
        )
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
        assert await outside.ready_count(spec.name) == 0

    async def test_a_poison_message_is_dead_lettered_once_with_its_reason(
        self, broker: Broker, outside: Outside
    ) -> None:
        spec = await work_queue(broker)
        await broker.consume(spec, MESSAGES, Inbox())
        message_id = await broker.publish(
            broker.topology.events, "job.bad", Ping(n=-1), headers={"x-trace": "t"}
        )
        [letter] = await letters(broker, 1)
        assert (letter.message_id, letter.code) == (message_id, DeadLetterReason.POISON)
        assert letter.reason == "negative ping -1"
        assert (letter.original_queue, letter.original_routing_key) == (spec.name, "job.bad")
        assert letter.original_exchange == broker.topology.events.name
        assert letter.headers == {"x-trace": "t"}  # its own headers, without the bookkeeping
        await asyncio.sleep(0.3)
        assert len(await broker.dead_letters()) == 1
        assert await outside.ready_count(spec.name) == 0  # acked

    # --- dead letters ---------------------------------------------------------------------------

    async def test_dead_letters_are_listed_without_loss_and_re_driven(self, broker: Broker) -> None:
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
        assert "x-parjobs-redriven-at" in meta.headers
        assert not any(key.startswith(("x-death", "x-parjobs-reason")) for key in meta.headers)
        assert [letter.message_id for letter in await broker.dead_letters()] == [first]
        assert await broker.redrive("all") == 1
        assert (await inbox.next())[1].message_id == first
        assert await broker.dead_letters() == []
        with pytest.raises(ValueError, match="collection of ids"):
            await broker.redrive("some-id")  # a str is a collection of str: refused

    async def test_a_broker_dead_letter_can_be_re_driven(self, broker: Broker) -> None:
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

    async def test_consumers_are_not_lost_while_their_queues_exist(self, broker: Broker) -> None:
        spec = await work_queue(broker)
        await broker.consume(spec, MESSAGES, Inbox())
        assert await broker.lost_consumers() == []
        assert await broker.lost_consumers(redeclare=True) == []

    async def test_queue_depths_count_what_waits_in_each_consumed_queue(
        self, broker: Broker
    ) -> None:
        spec = await work_queue(broker)
        assert await broker.queue_depths() == {}  # nothing consumed yet
        release = asyncio.Event()

        async def held(message: Ping | Pong, meta: IncomingMeta) -> None:
            await release.wait()

        for n in range(3):
            await broker.publish(broker.topology.events, "job.x", Ping(n=n))
        await broker.consume(spec, MESSAGES, held, prefetch=1)

        async def depth_is(expected: int) -> bool:
            return await broker.queue_depths() == {spec.name: expected}

        # One delivery in the handler, two waiting; then none.
        await eventually(lambda: depth_is(2), "two messages wait", timeout=15, interval=QUICK)
        release.set()
        await eventually(lambda: depth_is(0), "none waits", timeout=15, interval=QUICK)

    async def test_health_check(self, broker: Broker) -> None:
        assert broker.is_connected
        health = await broker.check()
        assert (health.dead_letters, health.reconnections) == (0, 0)
        assert 0 <= health.round_trip_seconds < 5

    # --- request / reply ------------------------------------------------------------------------

    async def test_request_reply_and_timeout(self, broker: Broker) -> None:
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

    async def test_a_request_without_reply_to_is_poison(self, broker: Broker) -> None:
        spec = await work_queue(broker)

        async def answer(message: Ping | Pong, meta: IncomingMeta) -> None:
            await broker.reply(meta, Pong(n=message.n))

        await broker.consume(spec, MESSAGES, answer)
        message_id = await broker.publish(broker.topology.events, "job.ask", Ping(n=1))
        [letter] = await letters(broker, 1)
        assert (letter.message_id, letter.code) == (message_id, DeadLetterReason.POISON)
        assert "no reply_to" in letter.reason

    # --- streams --------------------------------------------------------------------------------

    async def test_stream_reads_every_event_from_the_first_in_order(self, broker: Broker) -> None:
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
        assert records[4].message_id is not None

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
            record.value
            async for record in broker.read_stream(stream, MESSAGES, offset=offsets[45])
        ]
        assert tail == [Ping(n=n) for n in range(45, 50)]
        past = [
            record async for record in broker.read_stream(stream, MESSAGES, offset=offsets[-1] + 1)
        ]
        assert past == []

    async def test_stream_invalid_record_stops_a_read_unless_skipped(
        self, broker: Broker, outside: Outside
    ) -> None:
        stream = broker.topology.events_stream
        await broker.publish(broker.topology.events, "job.a", Ping(n=1))
        await outside.publish_bytes(broker.topology.events.name, "job.a", b"not json")
        await broker.publish(broker.topology.events, "job.a", Ping(n=2))
        with pytest.raises(InvalidMessageError, match="resume from offset"):
            _ = [record async for record in broker.read_stream(stream, MESSAGES)]
        skipped = [
            record.value async for record in broker.read_stream(stream, MESSAGES, skip_invalid=True)
        ]
        assert skipped == [Ping(n=1), Ping(n=2)]

    async def test_stream_follow_sees_new_events(self, broker: Broker) -> None:
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

    # --- lifecycle ------------------------------------------------------------------------------

    async def test_drain_lets_in_flight_handlers_finish(
        self, broker: Broker, outside: Outside
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
        assert await outside.ready_count(spec.name) == 0  # acked, not requeued
        # stopped: a new message waits in the queue
        await broker.publish(broker.topology.events, "job.x", Ping(n=2))
        await asyncio.sleep(0.3)
        assert finished == [1]
        assert await outside.ready_count(spec.name) == 1

    async def test_drain_past_its_deadline_hands_the_message_back(self, broker: Broker) -> None:
        spec = await work_queue(broker)
        started = asyncio.Event()

        async def stuck(message: Ping | Pong, meta: IncomingMeta) -> None:
            started.set()
            await asyncio.sleep(60)

        await broker.consume(spec, MESSAGES, stuck)
        message_id = await broker.publish(broker.topology.events, "job.x", Ping(n=1))
        await asyncio.wait_for(started.wait(), 10)
        assert await broker.drain(timeout=0.2) is False
        inbox = Inbox()
        await broker.consume(spec, MESSAGES, inbox)
        message, meta = await inbox.next()
        assert (message, meta.message_id, meta.redelivered) == (Ping(n=1), message_id, True)
