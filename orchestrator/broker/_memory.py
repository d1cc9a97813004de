"""What RabbitMQ keeps, kept in memory: exchanges, queues, streams, bindings, and routing.

`MemoryServer` plays the server that one or more `MemoryBroker`s connect to; it knows nothing of
handlers (that is the broker's side). Routing follows RabbitMQ: the default exchange delivers to
the queue named by the routing key, a direct exchange to queues bound with that exact key, a topic
exchange to queues whose binding pattern matches (`*` one word, `#` zero or more). A quorum queue
counts failed deliveries and, past its delivery limit, dead-letters the message through its
dead-letter exchange with an `x-death` record, as RabbitMQ does. A message published with an
`expiration` is dead-lettered (reason `expired`) once its TTL has run out and it is at the head of
its queue: like RabbitMQ, a queue expires only its head, so a longer TTL ahead holds back a
shorter one behind it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from orchestrator.broker.topology import (
    Binding,
    ClassicQueueArgs,
    ExchangeKind,
    ExchangeSpec,
    QueueSpec,
    QuorumQueueArgs,
    StreamQueueArgs,
)
from orchestrator.core.codec import CONTENT_TYPE
from orchestrator.errors import PublishNackedError, TopologyError, UnroutableError

log = logging.getLogger("parjobs.broker")


@dataclass(frozen=True)
class StoredMessage:
    """A message as a queue holds it: the body and properties, where it was published, and how
    many of its deliveries failed."""

    body: bytes
    exchange: str
    routing_key: str
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    type: str | None = None
    app_id: str | None = None
    content_type: str | None = CONTENT_TYPE
    user_id: str | None = None
    """The publishing broker user (a `MemoryBroker`'s username), as RabbitMQ validates it."""
    delivery_count: int = 0
    """Failed deliveries so far (`x-delivery-count`)."""
    redelivered: bool = False
    expiration: timedelta | None = None
    """The message's own TTL, from when a queue takes it."""
    expires: float | None = None
    """When its TTL runs out in the queue holding it (the event loop's clock)."""


@functools.cache
def _topic_match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[skip:]) for skip in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_match(rest, words[1:])


def _words(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if key else ()


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding `pattern` matches `routing_key`, as RabbitMQ decides it."""
    return _topic_match(_words(pattern), _words(routing_key))


class Receiver(Protocol):
    """A consumer as a queue sees it."""

    @property
    def has_room(self) -> bool:
        """Takes another delivery now (fewer unsettled than its prefetch)."""
        ...

    def deliver(self, message: StoredMessage) -> None:
        """Start handling `message`."""
        ...


class MemoryQueue:
    """A quorum or classic queue: ready messages in order, handed to its consumers in turn."""

    def __init__(
        self,
        spec: QueueSpec,
        owner: object | None,
        expired: Callable[[MemoryQueue, StoredMessage], None],
    ) -> None:
        self.spec = spec
        self.owner = owner
        """The connection an exclusive queue belongs to (None: durable)."""
        self._expired = expired
        """Takes each message whose TTL ran out at the head of the queue."""
        self.bindings: set[Binding] = set()
        self.ready: deque[StoredMessage] = deque()
        self.consumers: list[Receiver] = []
        self.sink: Callable[[StoredMessage], None] | None = None
        """Takes every message instead of the queue (a reply queue consumed without acks)."""

    @property
    def name(self) -> str:
        """The queue's name."""
        return self.spec.name

    def put(self, message: StoredMessage, *, front: bool = False) -> None:
        """Enqueue `message` (`front`: where a returned delivery goes back, ahead of new ones)."""
        if self.sink is not None:
            self.sink(message)
            return
        args = self.spec.args
        if (
            not front
            and isinstance(args, QuorumQueueArgs)
            and args.max_length is not None
            and len(self.ready) >= args.max_length
        ):
            raise PublishNackedError(
                f"queue {self.name} is full ({args.max_length} messages): the publish was refused",
                exchange=message.exchange,
                routing_key=message.routing_key,
            )
        if message.expiration is not None and message.expires is None:
            loop = asyncio.get_running_loop()
            expires = loop.time() + max(message.expiration.total_seconds(), 0.0)
            message = replace(message, expires=expires)
            loop.call_at(expires, self.dispatch)
        if front:
            self.ready.appendleft(message)
        else:
            self.ready.append(message)
        self.dispatch()

    def _expire_head(self) -> None:
        """Take the messages at the head whose TTL has run out out of the queue (only at the
        head, as RabbitMQ does)."""
        if not self.ready:
            return
        now = asyncio.get_running_loop().time()
        while self.ready and (expires := self.ready[0].expires) is not None and expires <= now:
            self._expired(self, self.ready.popleft())

    def dispatch(self) -> None:
        """Hand ready messages to the consumers with room, in turn (round robin), once the
        expired ones at the head are gone."""
        self._expire_head()
        while self.ready:
            receiver = next((each for each in self.consumers if each.has_room), None)
            if receiver is None:
                return
            self.consumers.remove(receiver)
            self.consumers.append(receiver)
            receiver.deliver(self.ready.popleft())


class MemoryStream:
    """An append-only stream: every message kept at its offset, readable any number of times."""

    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec
        self.owner: object | None = None
        self.bindings: set[Binding] = set()
        self.records: list[StoredMessage] = []
        self._appended = asyncio.Event()

    @property
    def name(self) -> str:
        """The stream's name."""
        return self.spec.name

    def put(self, message: StoredMessage) -> None:
        """Append `message` at the next offset."""
        self.records.append(message)
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()

    async def wait_for(self, offset: int) -> None:
        """Return once the stream holds a record at `offset`."""
        while len(self.records) <= offset:
            await self._appended.wait()


AnyQueue = MemoryQueue | MemoryStream


class MemoryServer:
    """The state a RabbitMQ server would keep, for `MemoryBroker`s to share.

    One `MemoryBroker` makes a server of its own; give several the same `server=` to let them
    talk to each other (a client and a service, say), as processes sharing one RabbitMQ do.
    """

    def __init__(self) -> None:
        self.exchanges: dict[str, ExchangeKind] = {}
        self.queues: dict[str, AnyQueue] = {}

    # --- topology ------------------------------------------------------------------------------

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        """Declare `spec` (idempotent; another kind under the same name is a TopologyError)."""
        kind = self.exchanges.setdefault(spec.name, spec.kind)
        if kind is not spec.kind:
            raise TopologyError(f"exchange {spec.name} exists as {kind.value}, not {spec.kind}")

    def declare_queue(self, spec: QueueSpec, owner: object) -> AnyQueue:
        """Declare `spec` and bind it (idempotent); an exclusive queue belongs to `owner`."""
        queue = self.queues.get(spec.name)
        if queue is None:
            queue = (
                MemoryStream(spec)
                if isinstance(spec.args, StreamQueueArgs)
                else MemoryQueue(spec, owner if spec.exclusive else None, self._expired)
            )
        elif queue.spec.arguments() != spec.arguments() or queue.spec.exclusive != spec.exclusive:
            raise TopologyError(
                f"queue {spec.name} exists with other arguments; delete it, or choose another "
                "PARJOBS_PREFIX"
            )
        elif queue.owner is not None and queue.owner is not owner:
            raise TopologyError(f"queue {spec.name} is exclusive to another connection")
        for binding in spec.bindings:
            if binding.exchange not in self.exchanges:
                raise TopologyError(
                    f"cannot declare {spec.name}: no exchange {binding.exchange!r} to bind to"
                )
        self.queues[spec.name] = queue
        queue.bindings.update(spec.bindings)
        return queue

    def delete_queue(self, name: str) -> None:
        """Delete queue `name` as anyone allowed to might: its messages go, and the broker
        cancels its consumers (they consume again only once it is declared again)."""
        queue = self.queues.pop(name, None)
        if isinstance(queue, MemoryQueue):
            queue.consumers.clear()
            queue.ready.clear()

    def delete_queues_of(self, owner: object) -> None:
        """Delete the exclusive queues of `owner` (its connection closed)."""
        for name in [name for name, queue in self.queues.items() if queue.owner is owner]:
            del self.queues[name]

    def queue(self, name: str) -> MemoryQueue:
        """The queue `name` (TopologyError if it does not exist or is a stream)."""
        queue = self.queues.get(name)
        if queue is None:
            raise TopologyError(f"queue {name} does not exist: declare it first")
        if isinstance(queue, MemoryStream):
            raise TopologyError(f"{name} is a stream: read it with read_stream")
        return queue

    def stream(self, name: str) -> MemoryStream:
        """The stream `name` (TopologyError if it does not exist or is no stream)."""
        stream = self.queues.get(name)
        if not isinstance(stream, MemoryStream):
            raise TopologyError(f"stream {name} does not exist")
        return stream

    # --- routing -------------------------------------------------------------------------------

    def _bound(self, exchange: str, routing_key: str) -> Iterator[AnyQueue]:
        if exchange == "":
            if (queue := self.queues.get(routing_key)) is not None:
                yield queue
            return
        topic = self.exchanges[exchange] is ExchangeKind.TOPIC
        for queue in self.queues.values():
            if any(
                binding.exchange == exchange
                and (
                    topic_matches(binding.routing_key, routing_key)
                    if topic
                    else binding.routing_key == routing_key
                )
                for binding in queue.bindings
            ):
                yield queue

    def publish(self, message: StoredMessage, *, mandatory: bool = True) -> None:
        """Route `message` by its exchange and routing key to every matching queue.

        Mandatory (the default), a message no queue takes raises UnroutableError; an exchange
        that does not exist always does. PublishNackedError if a full queue refused it.
        """
        exchange, routing_key = message.exchange, message.routing_key
        where = f"exchange {exchange or '(default)'!r} with routing key {routing_key!r}"
        if exchange and exchange not in self.exchanges:
            raise UnroutableError(
                f"cannot publish to {where}: no exchange {exchange!r}",
                exchange=exchange,
                routing_key=routing_key,
            )
        targets = list(self._bound(exchange, routing_key))
        if not targets:
            if mandatory:
                raise UnroutableError(
                    f"no queue is bound to {where}: the message was returned",
                    exchange=exchange,
                    routing_key=routing_key,
                )
            log.warning("dropped an unroutable message for %s", where)
        refused: PublishNackedError | None = None
        for queue in targets:
            try:
                queue.put(message)
            except PublishNackedError as exc:
                refused = exc
        if refused is not None:
            raise refused

    def publish_bytes(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        reply_to: str | None = None,
    ) -> str:
        """Publish `body` as it is, as a foreign publisher might (to test how consumers take a
        body that is not JSON, or not valid, or forged by broker user `user_id`); its message
        id."""
        message_id = message_id or uuid.uuid4().hex
        self.publish(
            StoredMessage(
                body,
                exchange,
                routing_key,
                message_id=message_id,
                headers=dict(headers or {}),
                timestamp=datetime.now(UTC),
                content_type=None,
                user_id=user_id,
                reply_to=reply_to,
            )
        )
        return message_id

    def ready_count(self, queue: str) -> int:
        """Messages waiting in `queue` (not those delivered and not yet acked)."""
        return len(self.queue(queue).ready)

    # --- failed deliveries ---------------------------------------------------------------------

    def hand_back(self, queue: MemoryQueue, message: StoredMessage, *, failed: bool) -> None:
        """A delivery of `message` from `queue` ended without an ack: it goes back to the front
        of the queue, or, if it `failed` once too often, to the queue's dead-letter exchange."""
        count = message.delivery_count + 1 if failed else message.delivery_count
        args = queue.spec.args
        if (
            isinstance(args, QuorumQueueArgs)
            and args.delivery_limit is not None
            and count > args.delivery_limit
        ):
            self._dead_letter(queue, args, message, "delivery_limit")
            return
        queue.put(replace(message, delivery_count=count, redelivered=True), front=True)

    def _expired(self, queue: MemoryQueue, message: StoredMessage) -> None:
        """`message`'s TTL ran out at the head of `queue`: to the dead-letter exchange, if any."""
        args = queue.spec.args
        assert isinstance(args, QuorumQueueArgs | ClassicQueueArgs)  # a queue, not a stream
        self._dead_letter(queue, args, message, "expired")

    def _dead_letter(
        self,
        queue: MemoryQueue,
        args: QuorumQueueArgs | ClassicQueueArgs,
        message: StoredMessage,
        reason: str,
    ) -> None:
        if args.dead_letter_exchange is None:
            log.warning("%s dropped %s: %s", queue.name, message.message_id, reason)
            return
        death = {
            "reason": reason,
            "queue": queue.name,
            "exchange": message.exchange,
            "routing-keys": [message.routing_key],
            "time": datetime.now(UTC),
            "count": 1,
        }
        headers = {
            **{key: value for key, value in message.headers.items() if key != "x-delivery-count"},
            "x-death": [death],
        }
        letter = replace(
            message,
            exchange=args.dead_letter_exchange,
            routing_key=args.dead_letter_routing_key or message.routing_key,
            headers=headers,
            delivery_count=0,
            redelivered=False,
            expiration=None,  # as RabbitMQ drops it: a dead letter does not expire again
            expires=None,
        )
        self.publish(letter, mandatory=False)
