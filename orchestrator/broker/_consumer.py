"""One queue's consumer: validate each delivery, run the handler, ack only after it returns.

Outcomes of a delivery:
- the handler returns: ack (its effect is durable by then);
- the body is not JSON, fails validation, has an unknown type, or the handler raises
  PoisonMessageError: a copy goes to the dead-letter queue with the reason (confirmed), then the
  original is acked, so it is dead-lettered once and never loops;
- the handler raises anything else: after a pause that doubles with each failed delivery, reject
  with requeue; the quorum queue counts the attempt and dead-letters the message after its
  delivery limit (reject, not nack: from RabbitMQ 4.3 a nack no longer counts);
- the handler is cancelled (drain deadline, lost connection): nack with requeue, or nothing if
  the channel is gone (the broker requeues unacked deliveries of a closed channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aiormq
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from orchestrator.broker._dlq import dead_letter_copy
from orchestrator.broker.base import Handler, IncomingMeta, retry_pause
from orchestrator.core.codec import decode
from orchestrator.errors import PoisonMessageError, TopologyError
from orchestrator.metrics import MESSAGES_DEAD_LETTERED

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractQueue,
        AbstractRobustChannel,
        AbstractRobustConnection,
    )
    from aio_pika.message import Message
    from pydantic import TypeAdapter

    from orchestrator.broker.topology import QueueSpec

T = TypeVar("T")
log = logging.getLogger("parjobs.broker")


def incoming_meta(queue: str, message: AbstractIncomingMessage) -> IncomingMeta:
    """The metadata of `message`, delivered from `queue`."""
    headers = dict(message.headers or {})
    count = headers.get("x-delivery-count")
    return IncomingMeta(
        queue=queue,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        exchange=message.exchange or "",
        routing_key=message.routing_key or "",
        redelivered=bool(message.redelivered),
        delivery_count=count if isinstance(count, int) else 0,
        headers=headers,
        timestamp=message.timestamp,
        user_id=message.user_id,
    )


SendDeadLetter = Callable[["Message"], Awaitable[None]]
"""Publishes a dead-letter copy to the dead-letter exchange and waits for the confirm."""


async def _settle(action: Coroutine[Any, Any, None], what: str, message_id: str | None) -> None:
    try:
        await action
    except (ChannelInvalidStateError, AMQPError) as exc:
        # The channel died with the connection: the broker requeues the delivery by itself and
        # will deliver it again (handlers are idempotent).
        log.warning("could not %s %s (%s); the broker will redeliver it", what, message_id, exc)


class Consumer(Generic[T]):
    """A subscription to one queue on a channel of its own (its prefetch is its concurrency)."""

    def __init__(
        self,
        queue: str,
        adapter: TypeAdapter[T],
        handler: Handler[T],
        send_dead_letter: SendDeadLetter,
        *,
        retry_delay: float,
        spec: QueueSpec | None = None,
    ) -> None:
        self.queue = queue
        self.spec = spec
        """The queue as declared, to declare it again if it is deleted under the consumer."""
        self._retry_delay = retry_delay
        self._adapter = adapter
        self._handler = handler
        self._send_dead_letter = send_dead_letter
        self._channel: AbstractRobustChannel | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._tag: str | None = None
        self.in_flight: set[asyncio.Task[None]] = set()

    async def start(self, connection: AbstractRobustConnection, prefetch: int) -> None:
        """Open the channel and start consuming; the queue must exist already."""
        channel = connection.channel(publisher_confirms=False)
        await channel.initialize()
        self._channel = channel
        await channel.set_qos(prefetch_count=prefetch)
        try:
            self._amqp_queue = await channel.declare_queue(self.queue, passive=True)
        except ChannelNotFoundEntity as exc:
            await channel.close()
            raise TopologyError(f"queue {self.queue} does not exist: declare it first") from exc
        self._tag = await self._amqp_queue.consume(self._on_message)

    async def active(self) -> bool:
        """Consuming now: False while the broker has cancelled this consumer (its queue was
        deleted, its node lost) and the robust channel has not restored it yet."""
        if self._tag is None or self._channel is None or self._channel.is_closed:
            return False
        try:
            underlay = await self._channel.get_underlay_channel()
        except (ChannelInvalidStateError, AMQPError):
            return False
        return isinstance(underlay, aiormq.Channel) and self._tag in underlay.consumers

    async def cancel(self) -> None:
        """Stop receiving (the broker sends nothing more); handlers in flight go on."""
        if self._amqp_queue is not None and self._tag is not None:
            tag, self._tag = self._tag, None
            # The robust queue forgets the consumer first, so a reconnection cannot revive it.
            with contextlib.suppress(ChannelInvalidStateError, AMQPError):
                await self._amqp_queue.cancel(tag)

    async def close(self) -> None:
        """Close the channel; deliveries not acked by now go back to the queue."""
        await self.cancel()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None  # aiormq runs each delivery in a task of its own
        self.in_flight.add(task)
        try:
            await self._process(message)
        finally:
            self.in_flight.discard(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        meta = incoming_meta(self.queue, message)
        try:
            try:
                value = decode(self._adapter, message.body)
                await self._handler(value, meta)
            except PoisonMessageError as exc:
                await self._poisoned(message, exc)
            except Exception:
                pause = retry_pause(self._retry_delay, meta.delivery_count)
                log.exception(
                    "handler failed on %s from %s (delivery %d); requeued in %gs",
                    meta.message_id,
                    self.queue,
                    meta.delivery_count + 1,
                    pause,
                )
                await asyncio.sleep(pause)
                await _settle(message.reject(requeue=True), "requeue", meta.message_id)
            else:
                await _settle(message.ack(), "ack", meta.message_id)
        except asyncio.CancelledError:
            if not message.processed:
                await _settle(message.nack(requeue=True), "hand back", meta.message_id)
            raise

    async def _poisoned(self, message: AbstractIncomingMessage, exc: PoisonMessageError) -> None:
        log.warning(
            "dead-lettering %s from %s: %s: %s",
            message.message_id,
            self.queue,
            exc.dead_letter_reason,
            exc,
        )
        try:
            await self._send_dead_letter(
                dead_letter_copy(message, self.queue, exc.dead_letter_reason, str(exc))
            )
        except Exception:
            # Not in the DLQ, so not acked: back to the queue, whose delivery limit will
            # dead-letter it through the broker if this keeps failing.
            log.exception("could not dead-letter %s; requeued", message.message_id)
            await _settle(message.reject(requeue=True), "requeue", message.message_id)
            return
        MESSAGES_DEAD_LETTERED.labels(self.queue, exc.dead_letter_reason).inc()
        await _settle(message.ack(), "ack", message.message_id)
