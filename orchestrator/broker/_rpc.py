"""Request/reply over the broker: one exclusive reply queue per connection, correlation ids.

Why a named exclusive queue rather than direct reply-to (`amq.rabbitmq.reply-to`): direct
reply-to must be consumed in no-ack mode on the very channel that publishes the requests, and
that pseudo-queue is not something a robust connection can re-declare. A queue named
`<prefix>.reply.<instance>` is re-declared and re-consumed with the same name after a
reconnection, requests go through the ordinary confirmed publisher, and a replier whose requester
is gone learns it (the mandatory reply comes back unroutable) instead of replying into the void.
It costs one queue per connection, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

from orchestrator.errors import BrokerError

if TYPE_CHECKING:
    from aio_pika import Message
    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractRobustChannel,
        AbstractRobustConnection,
    )

    from orchestrator.broker._publish import Publisher
    from orchestrator.broker.topology import QueueSpec

log = logging.getLogger("parjobs.broker")


class ReplyQueue:
    """The connection's reply queue and the requests waiting on it."""

    def __init__(self, spec: QueueSpec, publisher: Publisher) -> None:
        self.spec = spec
        self._publisher = publisher
        self._pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self._channel: AbstractRobustChannel | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Declare the queue and consume it (auto-ack: a reply nobody waits for is dropped)."""
        channel = connection.channel(publisher_confirms=False)
        await channel.initialize()
        self._channel = channel
        queue = await channel.declare_queue(
            self.spec.name,
            durable=self.spec.durable,
            exclusive=self.spec.exclusive,
            arguments=self.spec.arguments(),
        )
        await queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        """Fail the requests still waiting, and close the channel (the queue goes with it)."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrokerError("the broker connection was closed"))
        self._pending.clear()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def call(
        self, exchange: str, routing_key: str, request: Message
    ) -> AbstractIncomingMessage:
        """Publish `request` and wait for its reply (the caller bounds the wait)."""
        correlation_id = uuid.uuid4().hex
        request.correlation_id = correlation_id
        request.reply_to = self.spec.name
        future: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            await self._publisher.send(exchange, routing_key, request)
            return await future
        finally:
            self._pending.pop(correlation_id, None)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is None or future.done():
            log.debug("dropping a reply nobody waits for (%s)", message.correlation_id)
            return
        future.set_result(message)
