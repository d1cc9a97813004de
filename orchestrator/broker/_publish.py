"""Publishing the broker has taken responsibility for: confirmed, mandatory, reconnect-proof."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from aio_pika import DeliveryMode, Message
from aio_pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ChannelClosed,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
)
from aio_pika.exceptions import PublishError as ReturnedError
from opentelemetry import propagate

from orchestrator.core.codec import CONTENT_TYPE, encode
from orchestrator.errors import (
    BrokerUnavailableError,
    PublishError,
    PublishNackedError,
    UnroutableError,
)

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel, FieldValue
    from pydantic import BaseModel

log = logging.getLogger("parjobs.broker")

# The connection went away under the publish: wait for the robust connection to restore the
# channel, then publish again. (A channel closed by the broker for this publish is not transient.)
_TRANSIENT = (AMQPConnectionError, ChannelInvalidStateError, ConnectionError)
_RETRY_PAUSE = 0.2
_MAX_NACK_PAUSE = 2.0


def outgoing(
    message: BaseModel,
    *,
    app_id: str,
    headers: Mapping[str, FieldValue] | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    message_id: str | None = None,
    expiration: timedelta | None = None,
) -> Message:
    """`message` as a persistent JSON AMQP message, with a fresh id unless one is given, and the
    current W3C trace context (`traceparent`) in its headers when there is one."""
    with_trace: dict[str, FieldValue] = dict(headers or {})
    propagate.inject(with_trace)
    return Message(
        encode(message),
        headers=with_trace,
        content_type=CONTENT_TYPE,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message_id or uuid.uuid4().hex,
        correlation_id=correlation_id,
        reply_to=reply_to,
        timestamp=datetime.now(UTC),
        type=type(message).__name__,
        app_id=app_id,
        expiration=None if expiration is None else max(expiration, timedelta(0)),
    )


class Publisher:
    """Publishes on one channel opened with publisher confirms and `on_return_raises`, as the
    connection's broker user: every message carries `user_id`, which RabbitMQ checks against the
    connection's user, so consumers know who published it.

    A publish returns once the broker confirmed it; an unroutable message (mandatory) raises
    UnroutableError. A publish interrupted by a lost connection is sent again once the connection
    is back (on another node of a cluster), until `timeout`: a confirm lost with the connection
    may thus yield a duplicate, with the same message id, for consumers to drop.

    A negative confirm is sent again too, on a fresh channel, after a pause that doubles (2 s at
    most), and raises PublishNackedError only once `timeout` is spent. RabbitMQ nacks what a
    quorum queue cannot take for now: full (`reject-publish`: back-pressure), or its leader lost
    with a node — and a channel that was publishing to that leader (RabbitMQ 3.10) goes on being
    nacked after a new leader is elected, where a new channel is not. A queue that did take the
    nacked message then holds a duplicate, dropped by id like the others.
    """

    def __init__(
        self,
        open_channel: Callable[[], Awaitable[AbstractRobustChannel]],
        *,
        timeout: float,
        user_id: str,
    ) -> None:
        self._open_channel = open_channel
        self._channel: AbstractRobustChannel | None = None
        self._changing = asyncio.Lock()
        self._sending: dict[AbstractRobustChannel, int] = {}
        """Sends under way on each channel: a channel given up is closed once it has none (closing
        it earlier would fail their confirms with a cancellation)."""
        self._timeout = timeout
        self._user_id = user_id

    async def start(self) -> None:
        """Open the publishing channel."""
        self._channel = await self._open_channel()

    async def _renew(self, nacked: AbstractRobustChannel) -> None:
        """Publish on a new channel from now on (once, whichever send saw the nack first)."""
        async with self._changing:
            if self._channel is nacked:
                self._channel = await self._open_channel()

    @contextlib.asynccontextmanager
    async def _current(self) -> AsyncIterator[AbstractRobustChannel]:
        """The channel to send on; one given up meanwhile is closed after its last send."""
        channel = self._channel
        assert channel is not None, "start() the publisher first"
        self._sending[channel] = self._sending.get(channel, 0) + 1
        try:
            yield channel
        finally:
            self._sending[channel] -= 1
            if not self._sending[channel]:
                del self._sending[channel]
                if channel is not self._channel:
                    with contextlib.suppress(AMQPError, ChannelInvalidStateError):
                        await channel.close()

    async def send(self, exchange: str, routing_key: str, message: Message) -> None:
        """Publish `message` as this connection's user and wait for the broker's confirm."""
        # Set here, on every message, so dead-letter copies and re-drives carry it too.
        message.user_id = self._user_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        where = f"exchange {exchange or '(default)'!r} with routing key {routing_key!r}"
        nack_pause = _RETRY_PAUSE
        while True:
            try:
                async with asyncio.timeout_at(deadline), self._current() as channel:
                    await channel.ready()
                    target = await channel.get_exchange(exchange, ensure=False)
                    try:
                        await target.publish(message, routing_key, mandatory=True)
                    except ReturnedError:
                        raise
                    except DeliveryError:  # a nack: the next attempt goes on a new channel
                        await self._renew(channel)
                        raise
                return
            except ReturnedError as exc:
                raise UnroutableError(
                    f"no queue is bound to {where}: the message was returned ({exc})",
                    exchange=exchange,
                    routing_key=routing_key,
                ) from exc
            except DeliveryError as exc:
                if loop.time() + nack_pause >= deadline:
                    raise PublishNackedError(
                        f"the broker refused the message for {where} for {self._timeout:g}s "
                        f"({exc})",
                        exchange=exchange,
                        routing_key=routing_key,
                    ) from exc
                log.warning("publish to %s nacked; sent again in %gs", where, nack_pause)
                await asyncio.sleep(nack_pause)
                nack_pause = min(2 * nack_pause, _MAX_NACK_PAUSE)
            except ChannelNotFoundEntity as exc:  # the channel reopens by itself
                raise UnroutableError(
                    f"cannot publish to {where}: {exc}", exchange=exchange, routing_key=routing_key
                ) from exc
            except ChannelClosed as exc:
                raise PublishError(
                    f"RabbitMQ refused the publish to {where}: {exc}",
                    exchange=exchange,
                    routing_key=routing_key,
                ) from exc
            except TimeoutError as exc:
                raise BrokerUnavailableError(
                    f"no confirm from RabbitMQ within {self._timeout:g}s for {where}"
                ) from exc
            except _TRANSIENT as exc:
                log.warning(
                    "publish to %s interrupted (%s); retrying after reconnection", where, exc
                )
                if loop.time() + _RETRY_PAUSE >= deadline:
                    raise BrokerUnavailableError(
                        f"RabbitMQ unavailable for {self._timeout:g}s while publishing to {where}"
                    ) from exc
                await asyncio.sleep(_RETRY_PAUSE)
