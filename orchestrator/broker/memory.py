"""`MemoryBroker`: the `Broker` seam in memory, to test consumers and services without a server.

    from orchestrator.broker.memory import MemoryBroker

    async with MemoryBroker() as broker:
        queue = broker.topology.work_queue("storage", events=["job.#"])
        await broker.declare(queue)
        await broker.consume(queue, MY_MESSAGES, handle)
        await broker.publish(broker.topology.events, "job.submitted", message)

It keeps the semantics of `AMQPBroker` on RabbitMQ (both pass `tests/contract/broker.py`):
routing by the same `Topology`, mandatory publishing (UnroutableError), a publish that returns
once the message is enqueued, prefetch as the number of concurrent handlers, ack when the handler
returns, requeue after the settings' retry pause when it raises, dead-lettering past the queue's
delivery limit, PoisonMessageError and invalid bodies copied once to the dead-letter queue with
their reason, a message's own TTL (`expiration`) running out at the head of its queue into the
queue's dead-letter route, request/reply with correlation ids, streams read from an offset,
re-drive.

What it does not model: persistence across processes, a chunk for the stream offset "last" (it is
the last message), a consumer on a stream, and lost connections other than by `drop_connection`
and `restore_connection` (both at once: `simulate_connection_loss`). Several brokers share a
server with `MemoryBroker(server=...)`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar

from orchestrator.broker._dlq import dead_letter_headers, read_letter, redriven_headers
from orchestrator.broker._memory import MemoryQueue, MemoryServer, StoredMessage
from orchestrator.broker.base import (
    BrokerHealth,
    IncomingMeta,
    StreamRecord,
    finish_handlers,
    retry_pause,
)
from orchestrator.broker.topology import Topology
from orchestrator.core.codec import decode, encode
from orchestrator.errors import (
    BrokerError,
    InvalidMessageError,
    PoisonMessageError,
    PublishError,
    RequestTimeoutError,
    TopologyError,
    UnroutableError,
)
from orchestrator.settings import AMQPSettings

if TYPE_CHECKING:
    from types import TracebackType

    from pydantic import BaseModel, TypeAdapter

    from orchestrator.broker.base import DeadLetter, Handler, StreamOffset, Subscription
    from orchestrator.broker.topology import ExchangeSpec, QueueSpec

__all__ = ["MemoryBroker", "MemoryServer"]

T = TypeVar("T")
log = logging.getLogger("parjobs.broker")


def _name(target: str | ExchangeSpec | QueueSpec) -> str:
    return target if isinstance(target, str) else target.name


class _MemoryConsumer(Generic[T]):
    """One queue's consumer: at most `prefetch` handlers at once, each settling its delivery as
    `orchestrator.broker._consumer` does on RabbitMQ."""

    def __init__(
        self,
        broker: MemoryBroker,
        queue: MemoryQueue,
        adapter: TypeAdapter[T],
        handler: Handler[T],
        prefetch: int,
        spec: QueueSpec | None,
    ) -> None:
        self._broker = broker
        self._queue = queue
        self.spec = spec
        """The queue as declared, to declare it again if it is deleted under the consumer."""
        self._adapter = adapter
        self._handler = handler
        self._prefetch = prefetch
        self._deliveries: dict[asyncio.Task[None], StoredMessage] = {}
        """Deliveries not yet settled, on the current connection."""
        self.in_flight: set[asyncio.Task[None]] = set()
        """Handlers running, including those whose delivery a lost connection handed back."""
        self._cancelled = False

    @property
    def queue(self) -> str:
        """The queue consumed."""
        return self._queue.name

    @property
    def has_room(self) -> bool:
        """Fewer unsettled deliveries than its prefetch."""
        return len(self._deliveries) < self._prefetch

    def deliver(self, message: StoredMessage) -> None:
        """Run the handler on `message` in a task of its own."""
        task = asyncio.get_running_loop().create_task(self._process(message))
        self._deliveries[task] = message
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    @property
    def active(self) -> bool:
        """Consuming now: False once its queue was deleted (`MemoryServer.delete_queue`)."""
        return self._broker.server.queues.get(self.queue) is self._queue

    def resume(self) -> bool:
        """Consume the queue again if it exists again (as a robust channel does); whether it
        does now."""
        queue = self._broker.server.queues.get(self.queue)
        if self._cancelled or not isinstance(queue, MemoryQueue):
            return False
        if queue is not self._queue:
            self._queue = queue
            queue.consumers.append(self)
            queue.dispatch()
        return True

    async def cancel(self) -> None:
        """Stop receiving; handlers in flight go on."""
        self._cancelled = True
        if self in self._queue.consumers:
            self._queue.consumers.remove(self)

    def forget_deliveries(self) -> list[tuple[MemoryQueue, StoredMessage]]:
        """The connection dropped: the unsettled deliveries, which this consumer can no longer
        settle (its handlers may still be running)."""
        deliveries, self._deliveries = self._deliveries, {}
        return [(self._queue, message) for message in deliveries.values()]

    def _settle(self, task: asyncio.Task[None]) -> StoredMessage | None:
        message = self._deliveries.pop(task, None)
        if message is None:
            log.warning("could not settle a delivery from %s; it was handed back", self.queue)
        return message

    async def _process(self, message: StoredMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        meta = _meta(self.queue, message)
        try:
            try:
                value = decode(self._adapter, message.body)
                await self._handler(value, meta)
            except PoisonMessageError as exc:
                self._poisoned(task, meta, message, exc)
            except Exception:
                pause = retry_pause(self._broker.settings.retry_delay, meta.delivery_count)
                log.exception(
                    "handler failed on %s from %s (delivery %d); requeued in %gs",
                    meta.message_id,
                    self.queue,
                    meta.delivery_count + 1,
                    pause,
                )
                await asyncio.sleep(pause)
                if (held := self._settle(task)) is not None:
                    self._broker.server.hand_back(self._queue, held, failed=True)
            else:
                self._settle(task)
        except asyncio.CancelledError:
            if (held := self._settle(task)) is not None:
                self._broker.server.hand_back(self._queue, held, failed=False)
            raise
        finally:
            self._queue.dispatch()

    def _poisoned(
        self,
        task: asyncio.Task[None],
        meta: IncomingMeta,
        message: StoredMessage,
        exc: PoisonMessageError,
    ) -> None:
        reason = exc.dead_letter_reason
        log.warning("dead-lettering %s from %s: %s: %s", meta.message_id, self.queue, reason, exc)
        topology = self._broker.topology
        copy = StoredMessage(
            message.body,
            topology.dead_letter_exchange.name,
            topology.dead_letter_routing_key,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers=dead_letter_headers(
                message.headers,
                queue=self.queue,
                exchange=message.exchange,
                routing_key=message.routing_key,
                code=reason,
                reason=str(exc),
            ),
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
            content_type=message.content_type,
            user_id=self._broker.username,
        )
        if (held := self._settle(task)) is None:
            return
        try:
            self._broker.server.publish(copy)
        except PublishError:
            # Not in the DLQ, so not acked: back to the queue, whose delivery limit will
            # dead-letter it if this keeps failing.
            log.exception("could not dead-letter %s; requeued", meta.message_id)
            self._broker.server.hand_back(self._queue, held, failed=True)


def _meta(queue: str, message: StoredMessage) -> IncomingMeta:
    headers = dict(message.headers)
    if message.delivery_count:
        headers["x-delivery-count"] = message.delivery_count
    return IncomingMeta(
        queue=queue,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        exchange=message.exchange,
        routing_key=message.routing_key,
        redelivered=message.redelivered,
        delivery_count=message.delivery_count,
        headers=headers,
        timestamp=message.timestamp,
        user_id=message.user_id,
    )


class MemoryBroker:
    """A `Broker` in memory, on a `MemoryServer` of its own unless given one to share.

    Use as `async with MemoryBroker() as broker:`; settings (prefix, delivery limit, prefetch,
    retry delay) as for `AMQPBroker`. `username` is the broker user it connects as (by default
    the settings URL's), stamped as `user_id` on everything it publishes, as RabbitMQ validates.
    """

    def __init__(
        self,
        settings: AMQPSettings | None = None,
        *,
        name: str = "parjobs",
        server: MemoryServer | None = None,
        username: str | None = None,
    ) -> None:
        self.settings = settings if settings is not None else AMQPSettings()
        self.topology = Topology(self.settings.prefix, self.settings.delivery_limit)
        self.name = name
        self.username = username if username is not None else self.settings.username
        """The broker user this connection is: the `user_id` of everything it publishes."""
        self.server = server if server is not None else MemoryServer()
        self.reconnections = 0
        """Times the connection was dropped and restored (`drop_connection`)."""
        self._connected = False
        self._up = asyncio.Event()
        """Set while the connection is up: a publish waits for it, as on a robust connection."""
        self._up.set()
        self._lost_queues: list[QueueSpec] = []
        """The exclusive queues the dropped connection took with it, declared again on restore."""
        self._reconnect_callbacks: list[Callable[[], object]] = []
        self._consumers: list[_MemoryConsumer[Any]] = []
        self._reply_queue: str | None = None
        self._pending: dict[str, asyncio.Future[StoredMessage]] = {}

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
        """Connect to the server (in memory, that cannot fail)."""
        self._connected = True

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - the grace period is the API
        """Stop consuming, let in-flight handlers finish for up to `timeout` seconds, then cancel
        the rest (their messages go back to their queues). True if every handler finished."""
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            await consumer.cancel()
        return await finish_handlers(
            set().union(*(consumer.in_flight for consumer in consumers)), timeout
        )

    async def close(self) -> None:
        """Close at once: handlers still running are cancelled (`drain` first for a graceful
        stop), requests still waiting fail, exclusive queues go."""
        if not self._connected:
            return
        await self.drain(0)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrokerError("the broker connection was closed"))
        self._pending.clear()
        self.server.delete_queues_of(self)
        self._reply_queue = None
        self._connected = False

    @property
    def is_connected(self) -> bool:
        """Connected now."""
        return self._connected

    async def check(self) -> BrokerHealth:
        """The server's answer, at once: TopologyError if the dead-letter queue is missing."""
        self._require()
        if self.topology.dead_letter_queue.name not in self.server.queues:
            raise TopologyError("the dead-letter queue is missing: declare the topology")
        return BrokerHealth(
            round_trip_seconds=0.0,
            dead_letters=len(self._dead_letter_queue().ready),
            reconnections=self.reconnections,
        )

    def on_reconnect(self, callback: Callable[[], object]) -> None:
        """Call `callback` after each reconnection (`restore_connection`), once the exclusive
        queues are declared again and consumed; it must not block."""
        self._reconnect_callbacks.append(callback)

    def simulate_connection_loss(self) -> None:
        """Drop the connection and restore it at once (`drop_connection`, `restore_connection`)."""
        self.drop_connection()
        self.restore_connection()

    def drop_connection(self) -> None:
        """Lose the connection, as when the server (or its node) closed it: unsettled deliveries
        go back to their queues (handlers still running can no longer settle them), the
        exclusive queues go with what is in them, and what is published to them meanwhile is
        lost (or unroutable); publishes through this broker wait until `restore_connection`."""
        self._require()
        if not self._up.is_set():
            return
        dropped = [delivery for each in self._consumers for delivery in each.forget_deliveries()]
        for queue, message in dropped:  # failed, as a quorum queue counts a consumer lost
            self.server.hand_back(queue, message, failed=True)
        self._lost_queues = [
            queue.spec
            for queue in self.server.queues.values()
            if isinstance(queue, MemoryQueue) and queue.owner is self
        ]
        self.server.delete_queues_of(self)
        self._up.clear()
        log.warning("connection %s lost", self.name)

    def restore_connection(self) -> None:
        """Reconnect, as a robust connection does: the exclusive queues are declared again
        (empty), the consumers resume, then the `on_reconnect` callbacks run."""
        self._require()
        if self._up.is_set():
            return
        for spec in self._lost_queues:
            queue = self.server.declare_queue(spec, owner=self)
            if spec.name == self._reply_queue:
                assert isinstance(queue, MemoryQueue)
                queue.sink = self._on_reply
        self._lost_queues = []
        for consumer in self._consumers:
            consumer.resume()
        self.reconnections += 1
        self._up.set()
        log.warning("connection %s restored; queues and consumers restored", self.name)
        for callback in self._reconnect_callbacks:
            try:
                callback()
            except Exception:
                log.exception("a reconnect callback failed")

    def _require(self) -> None:
        if not self._connected:
            raise BrokerError("the broker is not connected: use `async with MemoryBroker(...)`")

    # --- topology and publishing ---------------------------------------------------------------

    async def declare(self, *queues: QueueSpec, shared: bool = True) -> None:
        """Declare the shared topology (unless not `shared`) and `queues` (idempotent)."""
        self._require()
        if shared:
            for exchange in self.topology.exchanges:
                self.server.declare_exchange(exchange)
        for spec in (*(self.topology.shared_queues if shared else ()), *queues):
            self.server.declare_queue(spec, owner=self)

    async def publish(
        self,
        exchange: str | ExchangeSpec,
        routing_key: str,
        message: BaseModel,
        *,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        message_id: str | None = None,
        expiration: timedelta | None = None,
    ) -> str:
        """Enqueue `message` as JSON in every queue it routes to; its message id (once the
        connection is up, if it was dropped).

        Raises UnroutableError if no queue is bound for the routing key (or there is no such
        exchange), PublishNackedError if a full queue refuses it.
        """
        self._require()
        await self._up.wait()
        stored = self._outgoing(
            _name(exchange),
            routing_key,
            message,
            headers=headers,
            correlation_id=correlation_id,
            reply_to=reply_to,
            message_id=message_id,
        )
        if expiration is not None:
            stored = replace(stored, expiration=max(expiration, timedelta(0)))
        self.server.publish(stored)
        assert stored.message_id is not None
        return stored.message_id

    def _outgoing(
        self,
        exchange: str,
        routing_key: str,
        message: BaseModel,
        *,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        message_id: str | None = None,
    ) -> StoredMessage:
        return StoredMessage(
            encode(message),
            exchange,
            routing_key,
            message_id=message_id or uuid.uuid4().hex,
            correlation_id=correlation_id,
            reply_to=reply_to,
            headers=dict(headers or {}),
            timestamp=datetime.now(UTC),
            type=type(message).__name__,
            app_id=self.name,
            user_id=self.username,
        )

    # --- consuming ------------------------------------------------------------------------------

    async def consume(
        self,
        queue: str | QueueSpec,
        adapter: TypeAdapter[T],
        handler: Handler[T],
        *,
        prefetch: int | None = None,
    ) -> Subscription:
        """Run `handler` on each message of `queue`, at most `prefetch` at once (default: the
        settings'); ack after it returns. Outcomes as for `AMQPBroker.consume`."""
        self._require()
        target = self.server.queue(_name(queue))
        consumer = _MemoryConsumer(
            self,
            target,
            adapter,
            handler,
            prefetch or self.settings.prefetch,
            queue if not isinstance(queue, str) else None,
        )
        self._consumers.append(consumer)
        target.consumers.append(consumer)
        target.dispatch()
        return consumer

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in each consumed queue that exists."""
        self._require()
        queues = (self.server.queues.get(consumer.queue) for consumer in self._consumers)
        return {queue.name: len(queue.ready) for queue in queues if isinstance(queue, MemoryQueue)}

    async def lost_consumers(self, *, redeclare: bool = False) -> list[str]:
        """The queues whose consumer lost its queue (`MemoryServer.delete_queue`) and that are
        not consumed again yet; with `redeclare`, each lost queue given as a `QueueSpec` is
        declared again (alone), and consumed again, as on RabbitMQ."""
        self._require()
        lost = []
        for consumer in self._consumers:
            if consumer.active:
                continue
            if redeclare and consumer.spec is not None:
                await self.declare(consumer.spec, shared=False)
            if not consumer.resume():
                lost.append(consumer.queue)
        return lost

    # --- request / reply ------------------------------------------------------------------------

    def _replies(self) -> str:
        if self._reply_queue is None:
            spec = self.topology.reply_queue(uuid.uuid4().hex)
            reply_queue = self.server.declare_queue(spec, owner=self)
            assert isinstance(reply_queue, MemoryQueue)
            reply_queue.sink = self._on_reply
            self._reply_queue = spec.name
        return self._reply_queue

    def _on_reply(self, message: StoredMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is None or future.done():
            log.debug("dropping a reply nobody waits for (%s)", message.correlation_id)
            return
        future.set_result(message)

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
        self._require()
        correlation_id = uuid.uuid4().hex
        request = self._outgoing(
            _name(exchange),
            routing_key,
            message,
            correlation_id=correlation_id,
            reply_to=self._replies(),
        )
        future: asyncio.Future[StoredMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            self.server.publish(request)
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError as exc:
            raise RequestTimeoutError(
                f"no reply within {timeout:g}s to the request sent to {_name(exchange)!r} "
                f"with routing key {routing_key!r}"
            ) from exc
        finally:
            self._pending.pop(correlation_id, None)
        return decode(adapter, reply.body)

    async def reply(self, meta: IncomingMeta, message: BaseModel) -> bool:
        """Answer the request `meta` describes; False if the requester is gone (logged)."""
        if not meta.reply_to:
            raise PoisonMessageError(f"request {meta.message_id} has no reply_to: cannot answer")
        self._require()
        answer = self._outgoing("", meta.reply_to, message, correlation_id=meta.correlation_id)
        try:
            self.server.publish(answer)
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
        """Validated records of `stream` from `offset`, in order, as `AMQPBroker.read_stream`
        reads them (`prefetch` and `idle_timeout` do not apply: nothing here is slow)."""
        del prefetch, idle_timeout
        return self._read_stream(_name(stream), adapter, offset, until, follow, skip_invalid)

    async def _read_stream(
        self,
        name: str,
        adapter: TypeAdapter[T],
        offset: StreamOffset,
        until: Callable[[StreamRecord[T]], bool] | None,
        follow: bool,
        skip_invalid: bool,
    ) -> AsyncIterator[StreamRecord[T]]:
        self._require()
        stream = self.server.stream(name)
        records = stream.records
        at = _start(records, offset)
        tail = None if follow else len(records) - 1
        while tail is None or at <= tail:
            await stream.wait_for(at)
            message = records[at]
            try:
                value = decode(adapter, message.body)
            except InvalidMessageError as exc:
                where = f"stream {name}, offset {at}: {exc}"
                if not skip_invalid:
                    raise InvalidMessageError(
                        f"{where} (resume from offset {at + 1})",
                        dead_letter_reason=exc.dead_letter_reason,
                    ) from exc
                log.warning("skipped an invalid record: %s", where)
                at += 1
                continue
            record = StreamRecord(
                value=value,
                offset=at,
                routing_key=message.routing_key,
                message_id=message.message_id,
                timestamp=message.timestamp,
                headers={**message.headers, "x-stream-offset": at},
            )
            yield record
            if until is not None and until(record):
                return
            at += 1

    # --- dead letters ---------------------------------------------------------------------------

    def _dead_letter_queue(self) -> MemoryQueue:
        self._require()
        return self.server.queue(self.topology.dead_letter_queue.name)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first; they stay in the dead-letter queue."""
        held = list(self._dead_letter_queue().ready)[:limit]
        return [read_letter(message.message_id, message.body, message.headers) for message in held]

    async def redrive(self, message_ids: Collection[str] | Literal["all"]) -> int:
        """Send dead letters (those ids, or "all") back to their original queues; how many.

        As on RabbitMQ: each goes to its original queue through the default exchange; one without
        an origin, or whose queue is gone, stays (logged); a message id is sent once per call.
        """
        if isinstance(message_ids, str) and message_ids != "all":
            raise ValueError('message_ids must be a collection of ids, or "all"')
        dlq = self._dead_letter_queue()
        sent: set[str] = set()
        for message in list(dlq.ready):
            letter = read_letter(message.message_id, message.body, message.headers)
            key = letter.message_id or hashlib.sha256(letter.body).hexdigest()
            chosen = message_ids == "all" or letter.message_id in message_ids
            if not chosen or key in sent:
                continue
            if letter.original_queue is None:
                log.warning("dead letter %s has no origin; left in %s", letter.message_id, dlq.name)
                continue
            try:
                self.server.publish(
                    StoredMessage(
                        message.body,
                        "",
                        letter.original_queue,
                        message_id=message.message_id,
                        correlation_id=message.correlation_id,
                        reply_to=message.reply_to,
                        headers=redriven_headers(letter),
                        timestamp=message.timestamp,
                        type=message.type,
                        app_id=message.app_id,
                        content_type=message.content_type,
                        user_id=self.username,
                    )
                )
            except PublishError as exc:
                log.warning("dead letter %s not re-driven: %s", letter.message_id, exc)
                continue
            dlq.ready.remove(message)
            sent.add(key)
            log.info("re-drove %s to %s", letter.message_id, letter.original_queue)
        return len(sent)


def _start(records: list[StoredMessage], offset: StreamOffset) -> int:
    """The index a read from `offset` starts at."""
    if offset == "first":
        return 0
    if offset == "last":
        return max(len(records) - 1, 0)
    if offset == "next":
        return len(records)
    if isinstance(offset, datetime):
        return next(
            (
                at
                for at, message in enumerate(records)
                if message.timestamp is not None and message.timestamp >= offset
            ),
            len(records),
        )
    return offset
