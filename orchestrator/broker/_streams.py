"""Reading a RabbitMQ stream from an offset, up to its tail or for as long as asked.

"Caught up" is decided by offset, not by silence: before reading, a short probe attaches at the
stream's last chunk (`x-stream-offset: last`) and takes the highest offset it delivers as the
tail; the read stops after the message at that offset. A pause in delivery (a slow disk, a busy
broker) therefore never ends a read early and quietly: one longer than `idle_timeout` raises
StreamStalledError. Silence means "nothing more" only where offsets cannot answer: an empty stream
(the probe receives nothing within `idle_timeout`), and a start given as a timestamp, which may lie
after the last message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from aio_pika.exceptions import ChannelNotFoundEntity

from orchestrator.broker.base import StreamOffset, StreamRecord
from orchestrator.core.codec import decode
from orchestrator.errors import (
    BrokerUnavailableError,
    InvalidMessageError,
    StreamStalledError,
    TopologyError,
)

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractRobustChannel,
        AbstractRobustConnection,
    )
    from pydantic import TypeAdapter

log = logging.getLogger("parjobs.broker")
T = TypeVar("T")
_TAIL_QUIET = 0.1  # the last chunk arrives in one burst; this much silence means it is all here


class _Subscription:
    """A stream consumer on a channel of its own, feeding an asyncio queue in delivery order."""

    def __init__(self, channel: AbstractRobustChannel) -> None:
        self.channel = channel
        self.inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        # None marks a closed channel: the read cannot go on (a robust reconnection would
        # restore the channel, but not this consumer, which is deliberately not robust).
        channel.close_callbacks.add(lambda *_: self.inbox.put_nowait(None))

    async def start(self, stream: str, offset: StreamOffset, prefetch: int) -> None:
        await self.channel.set_qos(prefetch_count=prefetch)  # streams refuse unlimited prefetch
        try:
            queue = await self.channel.declare_queue(stream, passive=True, robust=False)
        except ChannelNotFoundEntity as exc:
            raise TopologyError(f"stream {stream} does not exist") from exc
        await queue.consume(self._deliver, arguments={"x-stream-offset": offset}, robust=False)

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self.inbox.put_nowait(message)

    async def next(self, wait: float | None) -> tuple[AbstractIncomingMessage, int] | None:
        """The next message and its offset (acked: for a stream an ack is only credit), or None
        after `wait` seconds without one (None: wait as long as it takes)."""
        try:
            async with asyncio.timeout(wait):
                message = await self.inbox.get()
        except TimeoutError:
            return None
        if message is None:
            raise BrokerUnavailableError("the connection to RabbitMQ was lost during a stream read")
        await message.ack()
        offset = (message.headers or {}).get("x-stream-offset")
        if not isinstance(offset, int):
            raise BrokerUnavailableError("a stream delivery came without its x-stream-offset")
        return message, offset


async def _probe_tail(
    connection: AbstractRobustConnection, stream: str, idle_timeout: float
) -> int | None:
    """The stream's last offset now, or None if it is empty."""
    async with connection.channel(publisher_confirms=False) as channel:
        probe = _Subscription(channel)
        await probe.start(stream, "last", prefetch=1000)
        tail: int | None = None
        deadline = asyncio.get_running_loop().time() + idle_timeout
        while (got := await probe.next(idle_timeout if tail is None else _TAIL_QUIET)) is not None:
            tail = got[1] if tail is None else max(tail, got[1])
            if asyncio.get_running_loop().time() > deadline:
                break  # a busy stream keeps growing; the tail as of now is enough
        return tail


async def read_stream(
    connection: AbstractRobustConnection,
    stream: str,
    adapter: TypeAdapter[T],
    *,
    offset: StreamOffset,
    until: Callable[[StreamRecord[T]], bool] | None,
    follow: bool,
    prefetch: int,
    idle_timeout: float,
    skip_invalid: bool = False,
) -> AsyncIterator[StreamRecord[T]]:
    """Validated records from `offset` on; see `AMQPBroker.read_stream`."""
    tail: int | None = None
    if not follow:
        tail = await _probe_tail(connection, stream, idle_timeout)
        if tail is None or offset == "next" or (isinstance(offset, int) and offset > tail):
            return
    # Past the probe, messages up to the tail are known to exist, unless the start is a time.
    must_reach_tail = tail is not None and not isinstance(offset, datetime)
    async with connection.channel(publisher_confirms=False) as channel:
        reader = _Subscription(channel)
        await reader.start(stream, offset, prefetch)
        resume_from = offset
        while True:
            try:
                got = await reader.next(None if follow else idle_timeout)
            except BrokerUnavailableError as exc:
                raise BrokerUnavailableError(f"{exc} (resume from offset {resume_from!r})") from exc
            if got is None:
                if must_reach_tail:
                    raise StreamStalledError(
                        f"stream {stream}: nothing delivered for {idle_timeout:g}s before "
                        f"reaching offset {tail}"
                    )
                return
            message, at = got
            resume_from = at + 1
            try:
                value = decode(adapter, message.body)
            except InvalidMessageError as exc:
                where = f"stream {stream}, offset {at}: {exc}"
                if not skip_invalid:
                    raise InvalidMessageError(
                        f"{where} (resume from offset {at + 1})",
                        dead_letter_reason=exc.dead_letter_reason,
                    ) from exc
                log.warning("skipped an invalid record: %s", where)
                if tail is not None and at >= tail:
                    return
                continue
            record = StreamRecord(
                value=value,
                offset=at,
                routing_key=message.routing_key or "",
                message_id=message.message_id,
                timestamp=message.timestamp,
                headers=dict(message.headers or {}),
            )
            yield record
            if (until is not None and until(record)) or (tail is not None and at >= tail):
                return
