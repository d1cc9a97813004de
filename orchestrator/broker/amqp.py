"""`AMQPBroker`: the `Broker` seam on RabbitMQ.

One robust connection (aio-pika restores channels, queues, bindings and consumers after the
broker drops it; given a cluster's nodes, it moves to the next node when its own goes:
`_failover`); one publishing channel with publisher confirms; one channel per consumer, whose
prefetch is its number of concurrent handlers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from aio_pika.exceptions import CONNECTION_EXCEPTIONS, AMQPError, ChannelNotFoundEntity

from orchestrator.broker import _dlq, _streams
from orchestrator.broker._consumer import Consumer
from orchestrator.broker._failover import FailoverConnection, connect_failover
from orchestrator.broker._publish import Publisher, outgoing
from orchestrator.broker._rpc import ReplyQueue
from orchestrator.broker.base import BrokerHealth, finish_handlers
from orchestrator.broker.topology import ExchangeSpec, QueueSpec, Topology, declare
from orchestrator.core.codec import decode
from orchestrator.errors import (
    BrokerError,
    BrokerUnavailableError,
    PoisonMessageError,
    RequestTimeoutError,
    TopologyError,
    UnroutableError,
)
from orchestrator.settings import AMQPSettings

if TYPE_CHECKING:
    from datetime import timedelta
    from types import TracebackType

    from aio_pika import Message
    from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, FieldValue
    from pydantic import BaseModel, TypeAdapter

    from orchestrator.broker.base import (
        DeadLetter,
        Handler,
        IncomingMeta,
        StreamOffset,
        StreamRecord,
    )

T = TypeVar("T")
log = logging.getLogger("parjobs.broker")


def _name(target: str | ExchangeSpec | QueueSpec) -> str:
    return target if isinstance(target, str) else target.name


class AMQPBroker:
    """RabbitMQ for parjobs: publish, consume, request/reply, streams, dead letters.

    Use as `async with AMQPBroker(settings, name="parjobs-storage") as broker:`; `name` is the
    connection name RabbitMQ shows. Names of exchanges and queues come from `broker.topology`.
    """

    def __init__(self, settings: AMQPSettings | None = None, *, name: str = "parjobs") -> None:
        self.settings = settings if settings is not None else AMQPSettings()
        self.topology = Topology(self.settings.prefix, self.settings.delivery_limit)
        self.name = name
        self.username = self.settings.username
        """The broker user this connection is: the `user_id` of everything it publishes."""
        self._connection: FailoverConnection | None = None
        self._publisher: Publisher | None = None
        self._setup_channel: AbstractRobustChannel | None = None
        self._consumers: list[Consumer[Any]] = []
        self._replies: ReplyQueue | None = None
        self._replies_lock = asyncio.Lock()
        self.reconnections = 0
        """Times the connection was lost and restored (channels, queues, consumers with it)."""
        self._reconnect_callbacks: list[Callable[[], object]] = []

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the first node that answers (BrokerUnavailableError if none does) and open
        the publisher; when that node goes, the connection moves to the next (`_failover`)."""
        connection = await connect_failover(self.settings, name=self.name)
        self._connection = connection
        connection.reconnect_callbacks.add(self._on_reconnect)

        async def open_channel() -> AbstractRobustChannel:
            channel = connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.initialize()
            return channel

        self._publisher = Publisher(
            open_channel, timeout=self.settings.publish_timeout, user_id=self.settings.username
        )
        await self._publisher.start()

    def _on_reconnect(self, connection: AbstractRobustConnection | None) -> None:
        # aio-pika calls this once every channel (its queues, bindings, consumers) is restored.
        self.reconnections += 1
        node = connection.node if isinstance(connection, FailoverConnection) else "RabbitMQ"
        log.warning("reconnected to %s; channels and consumers restored", node)
        for callback in self._reconnect_callbacks:
            try:
                callback()
            except Exception:
                log.exception("a reconnect callback failed")

    def on_reconnect(self, callback: Callable[[], object]) -> None:
        """Call `callback` after each reconnection, once channels, queues, bindings and
        consumers are restored on the new connection; it must not block."""
        self._reconnect_callbacks.append(callback)

    @property
    def node(self) -> str | None:
        """The node URL (password masked) the connection is on or tries next; None if closed."""
        return None if self._connection is None else self._connection.node

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - the grace period is the API
        """Stop consuming, let in-flight handlers finish for up to `timeout` seconds, then cancel
        the rest (their messages go back to their queues). True if every handler finished."""
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.cancel()
        finished = await finish_handlers(
            set().union(*(consumer.in_flight for consumer in consumers)), timeout
        )
        for consumer in consumers:
            await consumer.close()
        return finished

    async def close(self) -> None:
        """Close everything at once: handlers still running are cancelled (`drain` first for a
        graceful stop), requests still waiting fail."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        await self.drain(0)
        if self._replies is not None:
            await self._replies.close()
            self._replies = None
        self._publisher = None
        self._setup_channel = None
        await connection.close()

    @property
    def is_connected(self) -> bool:
        """Connected now (False while the robust connection is reconnecting)."""
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    async def check(self) -> BrokerHealth:
        """A round trip to RabbitMQ through a fresh channel; raises if it cannot be made."""
        connection = self._require()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with (
                asyncio.timeout(self.settings.connect_timeout),
                connection.channel(publisher_confirms=False) as channel,
            ):
                dlq = await channel.declare_queue(
                    self.topology.dead_letter_queue.name, passive=True, robust=False
                )
        except ChannelNotFoundEntity as exc:
            raise TopologyError("the dead-letter queue is missing: declare the topology") from exc
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            raise BrokerUnavailableError(
                f"RabbitMQ at {self.settings.display_url} does not answer: {exc}"
            ) from exc
        return BrokerHealth(
            round_trip_seconds=loop.time() - started,
            dead_letters=dlq.declaration_result.message_count or 0,
            reconnections=self.reconnections,
        )

    def _require(self) -> FailoverConnection:
        if self._connection is None:
            raise BrokerError("the broker is not connected: use `async with AMQPBroker(...)`")
        return self._connection

    def _require_publisher(self) -> Publisher:
        self._require()
        assert self._publisher is not None
        return self._publisher

    # --- topology and publishing ---------------------------------------------------------------

    async def declare(self, *queues: QueueSpec, shared: bool = True) -> None:
        """Declare the shared topology (unless not `shared`) and `queues` (idempotent; restored
        after reconnection)."""
        if self._setup_channel is None:
            self._setup_channel = self._require().channel(publisher_confirms=False)
            await self._setup_channel.initialize()
        await declare(self._setup_channel, self.topology, queues, shared=shared)

    async def publish(
        self,
        exchange: str | ExchangeSpec,
        routing_key: str,
        message: BaseModel,
        *,
        headers: Mapping[str, FieldValue] | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        message_id: str | None = None,
        expiration: timedelta | None = None,
    ) -> str:
        """Publish `message` as persistent JSON and wait for the broker's confirm; its message id.

        Raises UnroutableError if no queue is bound for the routing key, PublishNackedError if
        the broker refuses it, BrokerUnavailableError if the connection stays down too long.
        """
        amqp_message = outgoing(
            message,
            app_id=self.name,
            headers=headers,
            correlation_id=correlation_id,
            reply_to=reply_to,
            message_id=message_id,
            expiration=expiration,
        )
        await self._require_publisher().send(_name(exchange), routing_key, amqp_message)
        assert amqp_message.message_id is not None
        return amqp_message.message_id

    async def _send_dead_letter(self, message: Message) -> None:
        await self._require_publisher().send(
            self.topology.dead_letter_exchange.name, self.topology.dead_letter_routing_key, message
        )

    # --- consuming ------------------------------------------------------------------------------

    async def consume(
        self,
        queue: str | QueueSpec,
        adapter: TypeAdapter[T],
        handler: Handler[T],
        *,
        prefetch: int | None = None,
    ) -> Consumer[T]:
        """Run `handler` on each message of `queue`, at most `prefetch` at once (default: the
        settings'); ack after it returns. See `orchestrator.broker._consumer` for every outcome."""
        consumer = Consumer(
            _name(queue),
            adapter,
            handler,
            self._send_dead_letter,
            retry_delay=self.settings.retry_delay,
            spec=queue if isinstance(queue, QueueSpec) else None,
        )
        await consumer.start(self._require(), prefetch or self.settings.prefetch)
        self._consumers.append(consumer)
        return consumer

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in each consumed queue: a passive declare of each, on a channel of its
        own (a missing queue closes the channel it is asked about on)."""
        depths: dict[str, int] = {}
        for queue in dict.fromkeys(consumer.queue for consumer in self._consumers):
            try:
                async with (
                    asyncio.timeout(self.settings.connect_timeout),
                    self._require().channel(publisher_confirms=False) as channel,
                ):
                    declared = await channel.declare_queue(queue, passive=True, robust=False)
            except ChannelNotFoundEntity:
                continue
            except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
                raise BrokerUnavailableError(
                    f"RabbitMQ at {self.settings.display_url} does not answer: {exc}"
                ) from exc
            depths[queue] = declared.declaration_result.message_count or 0
        return depths

    async def lost_consumers(self, *, redeclare: bool = False) -> list[str]:
        """The queues whose consumer the broker cancelled and that are not consumed again yet.

        The robust channel consumes again once the queue exists; with `redeclare`, each lost
        queue given as a `QueueSpec` is declared again (alone: `shared=False`) so it does."""
        lost = [consumer for consumer in self._consumers if not await consumer.active()]
        for consumer in lost:
            if redeclare and consumer.spec is not None:
                try:  # on a channel of its own: a refusal closes the channel it comes on
                    async with self._require().channel(publisher_confirms=False) as channel:
                        await declare(channel, self.topology, [consumer.spec], shared=False)
                except (BrokerError, AMQPError, *CONNECTION_EXCEPTIONS) as exc:
                    log.warning("cannot declare %s again yet: %s", consumer.queue, exc)
        return [consumer.queue for consumer in lost]

    # --- request / reply ------------------------------------------------------------------------

    async def _reply_queue(self) -> ReplyQueue:
        async with self._replies_lock:
            if self._replies is None:
                replies = ReplyQueue(
                    self.topology.reply_queue(uuid.uuid4().hex), self._require_publisher()
                )
                await replies.start(self._require())
                self._replies = replies
            return self._replies

    async def request(
        self,
        exchange: str | ExchangeSpec,
        routing_key: str,
        message: BaseModel,
        adapter: TypeAdapter[T],
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - it becomes RequestTimeoutError
    ) -> T:
        """Send a request and wait for its reply, validated (RequestTimeoutError after
        `timeout` seconds; InvalidMessageError if the reply does not validate)."""
        replies = await self._reply_queue()
        try:
            async with asyncio.timeout(timeout):
                reply = await replies.call(
                    _name(exchange), routing_key, outgoing(message, app_id=self.name)
                )
        except TimeoutError as exc:
            raise RequestTimeoutError(
                f"no reply within {timeout:g}s to the request sent to {_name(exchange)!r} "
                f"with routing key {routing_key!r}"
            ) from exc
        return decode(adapter, reply.body)

    async def reply(self, meta: IncomingMeta, message: BaseModel) -> bool:
        """Answer the request `meta` describes; False if the requester is gone (logged)."""
        if not meta.reply_to:
            raise PoisonMessageError(f"request {meta.message_id} has no reply_to: cannot answer")
        try:
            await self._require_publisher().send(
                "",
                meta.reply_to,
                outgoing(message, app_id=self.name, correlation_id=meta.correlation_id),
            )
        except UnroutableError:
            log.warning("the requester of %s is gone; reply dropped", meta.message_id)
            return False
        return True

    # --- streams --------------------------------------------------------------------------------

    def read_stream(
        self,
        stream: str | QueueSpec,
        adapter: TypeAdapter[T],
        *,
        offset: StreamOffset = "first",
        until: Callable[[StreamRecord[T]], bool] | None = None,
        follow: bool = False,
        prefetch: int = 256,
        idle_timeout: float = 2.0,
        skip_invalid: bool = False,
    ) -> AsyncIterator[StreamRecord[T]]:
        """Validated records of `stream` from `offset`, in order.

        Stops after a record for which `until` is true, or (unless `follow`) after the record at
        the stream's tail as of the call. An empty stream costs `idle_timeout` seconds to notice;
        a read that stalls that long before reaching the tail raises StreamStalledError. A record
        that does not validate raises InvalidMessageError naming its offset, or with
        `skip_invalid` is logged and passed over (an audit should not stop at one bad record).
        """
        return _streams.read_stream(
            self._require(),
            _name(stream),
            adapter,
            offset=offset,
            until=until,
            follow=follow,
            prefetch=prefetch,
            idle_timeout=idle_timeout,
            skip_invalid=skip_invalid,
        )

    # --- dead letters ---------------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first; they stay in the dead-letter queue."""
        async with self._require().channel(publisher_confirms=False) as channel:
            return await _dlq.peek(channel, self.topology.dead_letter_queue.name, limit)

    async def redrive(self, message_ids: Collection[str] | Literal["all"]) -> int:
        """Send dead letters (those ids, or "all") back to their original queues; how many."""
        async with self._require().channel(publisher_confirms=False) as channel:
            return await _dlq.redrive(
                channel,
                self._require_publisher(),
                self.topology.dead_letter_queue.name,
                message_ids,
            )
