"""The broker seam: what services, daemons, the client and the CLI may ask of a message broker.

`Broker` is a protocol with two implementations: `AMQPBroker` (RabbitMQ, `amqp.py`) and
`MemoryBroker` (in memory, `memory.py`, for tests without a server). Both take their names from
the same `Topology` and pass the same contract suite (`tests/contract/broker.py`). The value
types every caller sees (what a handler is told, a dead letter, a stream record) live here, free of
any client library.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, Self, TypeVar

if TYPE_CHECKING:
    from types import TracebackType

    from pydantic import BaseModel, TypeAdapter

    from orchestrator.broker.topology import ExchangeSpec, QueueSpec, Topology
    from orchestrator.settings import AMQPSettings

T = TypeVar("T")
log = logging.getLogger("parjobs.broker")


@dataclass(frozen=True)
class IncomingMeta:
    """What a handler may need to know about the delivery besides the message itself."""

    queue: str
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    exchange: str
    routing_key: str
    redelivered: bool
    delivery_count: int
    """Earlier deliveries that ended without an ack (quorum queues' `x-delivery-count`)."""
    headers: Mapping[str, Any]
    timestamp: datetime | None
    user_id: str | None = None
    """The publisher's broker user, as RabbitMQ validated it (None: the publisher set none)."""


Handler = Callable[[T, IncomingMeta], Awaitable[None]]
"""Handles one validated message; returning acks it, raising hands it back (see `consume`)."""

_MAX_RETRY_DELAY = 30.0


def retry_pause(retry_delay: float, delivery_count: int) -> float:
    """How long a consumer holds a failed delivery before handing it back: `retry_delay`,
    doubling with each earlier failed delivery, at most 30 s. (Held meanwhile, as a prefetch
    slot, so a brief outage does not burn through the delivery limit in milliseconds.)"""
    return float(min(retry_delay * 2**delivery_count, _MAX_RETRY_DELAY))


async def finish_handlers(
    in_flight: set[asyncio.Task[None]],
    timeout: float,  # noqa: ASYNC109 - drain's grace period
) -> bool:
    """Let the handlers `in_flight` finish for up to `timeout` seconds, then cancel the rest (a
    cancelled handler hands its message back); True if every handler finished (`drain`)."""
    if not in_flight:
        return True
    _, pending = await asyncio.wait(in_flight, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        log.warning("%d handlers cancelled after %gs; requeued", len(pending), timeout)
    return not pending


class Subscription(Protocol):
    """What `Broker.consume` returns: one queue's consumer."""

    @property
    def queue(self) -> str:
        """The queue consumed."""
        ...

    async def cancel(self) -> None:
        """Stop receiving; handlers in flight go on (`Broker.drain` waits for them)."""
        ...


StreamOffset = Literal["first", "last", "next"] | int | datetime
"""Where to start: the first retained message, the last chunk, only new messages, an absolute
offset, or the first chunk written at or after a time."""


@dataclass(frozen=True)
class StreamRecord(Generic[T]):
    """One message read from a stream."""

    value: T
    offset: int
    routing_key: str
    message_id: str | None
    timestamp: datetime | None
    headers: Mapping[str, Any]


class DeadLetterReason(StrEnum):
    """Why a message is in the dead-letter queue."""

    UNDECODABLE = "undecodable"
    INVALID = "invalid"
    UNKNOWN_TYPE = "unknown-type"
    POISON = "poison"
    """Its handler raised PoisonMessageError."""
    DELIVERY_LIMIT = "delivery-limit"
    """Its handler kept failing; the broker dead-lettered it after the queue's delivery limit."""
    REJECTED = "rejected"
    EXPIRED = "expired"
    MAX_LENGTH = "max-length"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DeadLetter:
    """One message in the dead-letter queue, with where it came from and why it is here."""

    message_id: str | None
    code: DeadLetterReason
    reason: str
    original_queue: str | None
    """Where a re-drive sends it; None when the letter does not say (it cannot be re-driven)."""
    original_exchange: str | None
    original_routing_key: str | None
    dead_lettered_at: datetime | None
    body: bytes
    headers: dict[str, Any]
    """The message's own headers, without the dead-letter bookkeeping."""


@dataclass(frozen=True)
class BrokerHealth:
    """The answer of a successful `Broker.check()`."""

    round_trip_seconds: float
    dead_letters: int
    """Messages waiting in the dead-letter queue (RabbitMQ updates this count lazily): non-zero
    wants an operator's look."""
    reconnections: int
    """Times the connection was lost and restored since `connect`."""


class Broker(Protocol):
    """Publish, consume, request/reply, streams and dead letters, on names from `topology`.

    Use as `async with AMQPBroker(settings, name="parjobs-storage") as broker:` (or
    `MemoryBroker(...)` in tests); code that only uses a broker takes a `Broker`.
    """

    settings: AMQPSettings
    topology: Topology
    name: str
    """The connection name (RabbitMQ shows it; it is the `app_id` of what this broker sends)."""
    username: str
    """The broker user it connects as: the `user_id` of every message it publishes."""
    reconnections: int
    """Times the connection was lost and restored (channels, queues, consumers with it)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def connect(self) -> None:
        """Connect (BrokerUnavailableError if the server does not answer)."""
        ...

    async def close(self) -> None:
        """Close everything at once: handlers still running are cancelled (`drain` first for a
        graceful stop), requests still waiting fail."""
        ...

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - the grace period is the API
        """Stop consuming, let in-flight handlers finish for up to `timeout` seconds, then cancel
        the rest (their messages go back to their queues). True if every handler finished."""
        ...

    @property
    def is_connected(self) -> bool:
        """Connected now (False while reconnecting)."""
        ...

    def on_reconnect(self, callback: Callable[[], object]) -> None:
        """Call `callback` after each reconnection, once the queues, bindings and consumers are
        restored on the new connection (what is published from then on reaches them). What was
        published to an exclusive queue while it was gone is lost: the callback is where a
        consumer of one asks again. It must not block (start a task for the work)."""
        ...

    async def check(self) -> BrokerHealth:
        """A round trip to the server; raises if it cannot be made (TopologyError if the
        dead-letter queue is missing)."""
        ...

    async def declare(self, *queues: QueueSpec, shared: bool = True) -> None:
        """Declare the shared topology and `queues` (idempotent); a queue that exists with other
        arguments raises TopologyError. With `shared=False`, only `queues`: what a service or a
        user may declare (the operator declares the exchanges and shared queues)."""
        ...

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
        """Publish `message` as persistent JSON once the broker has taken it; its message id.

        Header values are what AMQP tables carry: str, int, bool, bytes, datetime, and lists and
        tables of them. `expiration`: the message's own TTL (whole milliseconds, at least 0) in
        a classic queue; once it runs out at the head of the queue, the message is dead-lettered
        (reason `expired`) or dropped.

        Raises UnroutableError if no queue is bound for the routing key (or the exchange does
        not exist), PublishNackedError if the broker refuses it.
        """
        ...

    async def consume(
        self,
        queue: str | QueueSpec,
        adapter: TypeAdapter[T],
        handler: Handler[T],
        *,
        prefetch: int | None = None,
    ) -> Subscription:
        """Run `handler` on each message of `queue`, at most `prefetch` at once (default: the
        settings'), acking after it returns.

        A body that does not validate, or a handler raising PoisonMessageError, sends a copy to
        the dead-letter queue with the reason (`x-parjobs-*` headers) and acks the original; any
        other exception requeues it after a pause, until the queue's delivery limit dead-letters
        it. TopologyError if the queue does not exist.
        """
        ...

    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting (ready, not yet delivered) in each queue this connection consumes,
        as the broker counts them now; a queue that does not exist now is left out."""
        ...

    async def lost_consumers(self, *, redeclare: bool = False) -> list[str]:
        """The queues whose consumer the broker cancelled (queue deleted, node lost) and that are
        not consumed again yet; with `redeclare`, each one `consume` was given as a `QueueSpec`
        is declared again (alone), after which its consumer comes back by itself."""
        ...

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
        ...

    async def reply(self, meta: IncomingMeta, message: BaseModel) -> bool:
        """Answer the request `meta` describes; False if the requester is gone."""
        ...

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
        the stream's tail as of the call. A record that does not validate raises
        InvalidMessageError naming its offset, or with `skip_invalid` is passed over.
        """
        ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first; they stay in the dead-letter queue."""
        ...

    async def redrive(self, message_ids: Collection[str] | Literal["all"]) -> int:
        """Send dead letters (those ids, or "all") back to their original queues; how many."""
        ...
