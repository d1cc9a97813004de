"""The broker's topology as data: every exchange, queue and stream name, and their arguments.

Kept apart from runtime behaviour (as FastStream keeps its AsyncAPI description apart): this
module says *what* exists on RabbitMQ, and `declare` is the one function that makes it so. Every
name derives from a prefix, so deployments and test runs sharing one broker never collide. A queue
also says which messages it takes (`QueueSpec.accepts`, a union from `schemas.messages`).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from orchestrator.errors import TopologyError
from schemas.messages import ACCESS_REQUESTS, COMPUTE_REQUESTS, DEADLINES, RUN_STARTS, MessageUnion

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aio_pika.abc import AbstractChannel

_NAME_PART = r"[A-Za-z0-9][A-Za-z0-9_-]*"
_PREFIX = re.compile(rf"{_NAME_PART}(?:\.{_NAME_PART})*")
_ROLE = re.compile(_NAME_PART)
_MAX_AGE = re.compile(r"[1-9][0-9]*[YMDhms]")
MAX_PREFIX_LENGTH = 200
"""Names are at most 255 bytes; the longest suffix added is `.reply.` + 32 hex digits."""
_RESERVED_ROLES = frozenset(
    {"events", "commands", "dlx", "dlq", "rpc", "reply", "deadlines", "delay"}
)
DELAY_BUCKETS_S = (0, *(2**power for power in range(4, 20)))
"""The delay queues' lower bounds in seconds: `<prefix>.delay.<bound>` holds the deadlines due
from `bound` seconds after their publish to the next bound (the last one, 2**19 s, to any later
time: a job lives at most 7 days). Each deadline goes out once with its exact TTL; one can wait
behind a longer one ahead of it in its queue (RabbitMQ expires only the head), at most by its
queue's width, i.e. at most as long again as its own TTL (under 16 s in the first queue). So
lifetimes that differ by less than a factor of two share a queue; equal lifetimes, the common
case, fire in order and on time; and the access sweep bounds any lateness by its interval."""


def check_prefix(prefix: str) -> str:
    """`prefix` if it can start every name (dot-separated words of letters, digits, `_`, `-`)."""
    if len(prefix) > MAX_PREFIX_LENGTH or not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"prefix {prefix!r} must be dot-separated words of letters, digits, '_' and '-', "
            f"at most {MAX_PREFIX_LENGTH} characters"
        )
    if prefix.split(".", 1)[0] == "amq":
        raise ValueError("names starting with 'amq.' are reserved by RabbitMQ")
    return prefix


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")


# --- queue arguments, typed per queue type ------------------------------------------------------


@dataclass(frozen=True)
class QuorumQueueArgs:
    """A replicated, durable quorum queue: where work waits for a worker."""

    delivery_limit: int | None = None
    """Failed deliveries (rejects, lost consumers) before the broker dead-letters the message."""
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    """None keeps the message's own routing key when dead-lettering."""
    max_length: int | None = None
    """Messages the queue holds before publishers get a nack (reject-publish): back-pressure."""

    def __post_init__(self) -> None:
        _positive("delivery_limit", self.delivery_limit)
        _positive("max_length", self.max_length)
        if self.dead_letter_routing_key is not None and self.dead_letter_exchange is None:
            raise ValueError("a dead-letter routing key needs a dead-letter exchange")

    def to_arguments(self) -> dict[str, Any]:
        """The `x-` queue arguments RabbitMQ reads."""
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if self.delivery_limit is not None:
            arguments["x-delivery-limit"] = self.delivery_limit
        if self.dead_letter_exchange is not None:
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
            if self.dead_letter_routing_key is not None:
                arguments["x-dead-letter-routing-key"] = self.dead_letter_routing_key
            # At-least-once: the source queue keeps a dead letter until the target queue has
            # confirmed it. RabbitMQ (3.10+) silently falls back to at-most-once unless the
            # overflow behaviour is reject-publish.
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
        elif self.max_length is not None:
            arguments["x-overflow"] = "reject-publish"
        if self.max_length is not None:
            arguments["x-max-length"] = self.max_length
        return arguments


@dataclass(frozen=True)
class StreamQueueArgs:
    """An append-only stream: read from any offset, any number of times (None: keep forever)."""

    max_age: str | None = None
    """Retention by age, RabbitMQ's syntax: a number and one of Y M D h m s (`7D`, `12h`)."""
    max_length_bytes: int | None = None
    max_segment_size_bytes: int | None = None
    """Retention works in whole segments (RabbitMQ's default: 500 MB each)."""

    def __post_init__(self) -> None:
        if self.max_age is not None and not _MAX_AGE.fullmatch(self.max_age):
            raise ValueError(
                f"max_age {self.max_age!r} is not like 7D, 12h, 30m (units Y M D h m s)"
            )
        _positive("max_length_bytes", self.max_length_bytes)
        _positive("max_segment_size_bytes", self.max_segment_size_bytes)

    def to_arguments(self) -> dict[str, Any]:
        """The `x-` queue arguments RabbitMQ reads."""
        arguments: dict[str, Any] = {"x-queue-type": "stream"}
        if self.max_age is not None:
            arguments["x-max-age"] = self.max_age
        if self.max_length_bytes is not None:
            arguments["x-max-length-bytes"] = self.max_length_bytes
        if self.max_segment_size_bytes is not None:
            arguments["x-stream-max-segment-size-bytes"] = self.max_segment_size_bytes
        return arguments


@dataclass(frozen=True)
class ClassicQueueArgs:
    """A classic queue: per-connection reply queues (quorum queues cannot be exclusive), and the
    delay queues (quorum queues in RabbitMQ 3.10 ignore a message's own TTL, `expiration`).

    With a dead-letter exchange, a message whose TTL runs out at the head of the queue goes there
    (RabbitMQ expires messages only at the head: one with a longer TTL ahead holds back a shorter
    one behind it). Classic dead-lettering is at most once: nothing confirms the copy.
    """

    dead_letter_exchange: str | None = None
    """"" is the default exchange: the routing key then names the target queue."""
    dead_letter_routing_key: str | None = None

    def __post_init__(self) -> None:
        if self.dead_letter_routing_key is not None and self.dead_letter_exchange is None:
            raise ValueError("a dead-letter routing key needs a dead-letter exchange")
        if self.dead_letter_exchange == "" and not self.dead_letter_routing_key:
            raise ValueError("dead-lettering to the default exchange needs a routing key")

    def to_arguments(self) -> dict[str, Any]:
        """The `x-` queue arguments RabbitMQ reads."""
        arguments: dict[str, Any] = {"x-queue-type": "classic"}
        if self.dead_letter_exchange is not None:
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
            if self.dead_letter_routing_key is not None:
                arguments["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        return arguments


QueueArgs = QuorumQueueArgs | StreamQueueArgs | ClassicQueueArgs


# --- exchanges, queues, bindings -----------------------------------------------------------------


class ExchangeKind(StrEnum):
    """The exchange types parjobs uses."""

    DIRECT = "direct"
    TOPIC = "topic"


@dataclass(frozen=True)
class ExchangeSpec:
    """A durable exchange."""

    name: str
    kind: ExchangeKind


@dataclass(frozen=True)
class Binding:
    """Messages published to `exchange` with a matching routing key reach the queue."""

    exchange: str
    routing_key: str

    def __post_init__(self) -> None:
        if len(self.routing_key.encode()) > 255:
            raise ValueError("a routing key is at most 255 bytes")


@dataclass(frozen=True)
class QueueSpec:
    """A queue (or stream), its arguments and its bindings."""

    name: str
    args: QueueArgs
    bindings: tuple[Binding, ...] = ()
    exclusive: bool = False
    """Owned by one connection and deleted with it (reply queues); otherwise durable."""
    accepts: MessageUnion[Any] | None = None
    """The messages its consumer takes; any other is dead-lettered. None where the queue holds
    whatever reaches it (the dead-letter queue, the stream) or answers to one request each (reply
    queues: the caller decodes with the union of the service it asked)."""

    @property
    def durable(self) -> bool:
        """Survives a broker restart (everything but exclusive reply queues)."""
        return not self.exclusive

    def arguments(self) -> dict[str, Any]:
        """The `x-` queue arguments to declare it with."""
        return self.args.to_arguments()


RPC_REQUESTS: Mapping[str, MessageUnion[Any]] = {
    "access": ACCESS_REQUESTS,
    "compute": COMPUTE_REQUESTS,
    "runs": RUN_STARTS,
}
"""parjobs' RPC services and the requests each takes (each union's `replies`: what it answers)."""


@dataclass(frozen=True)
class Topology:
    """Every name parjobs uses on the broker, derived from `prefix`.

    - `<prefix>.events` (topic): every job event; `<prefix>.events.stream` keeps all of them.
    - `<prefix>.commands` (direct): commands and RPC requests addressed to one service.
    - `<prefix>.dlx` (direct) routes to `<prefix>.dlq`, the one dead-letter queue.
    - `<prefix>.<role>` (quorum): a service's work queue, e.g. access, storage, compute.
    - `<prefix>.delay.<seconds>` (classic) hold each job's deadline until its TTL runs out, then
      dead-letter it to `<prefix>.deadlines` (quorum), which access consumes.
    """

    prefix: str = "parjobs"
    delivery_limit: int = 5
    stream_retention: StreamQueueArgs = field(default_factory=StreamQueueArgs)

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        _positive("delivery_limit", self.delivery_limit)

    def _name(self, *parts: str) -> str:
        return ".".join((self.prefix, *parts))

    @property
    def events(self) -> ExchangeSpec:
        """Where every job event is published; routing keys are chosen by the services."""
        return ExchangeSpec(self._name("events"), ExchangeKind.TOPIC)

    @property
    def commands(self) -> ExchangeSpec:
        """Where commands and RPC requests for one service are published."""
        return ExchangeSpec(self._name("commands"), ExchangeKind.DIRECT)

    @property
    def dead_letter_exchange(self) -> ExchangeSpec:
        """Where the broker and the consumers send what can never be processed."""
        return ExchangeSpec(self._name("dlx"), ExchangeKind.DIRECT)

    @property
    def dead_letter_routing_key(self) -> str:
        """The key that routes a dead letter from the dead-letter exchange to the queue."""
        return self._name("dlq")

    @property
    def dead_letter_queue(self) -> QueueSpec:
        """The one dead-letter queue; no delivery limit, so inspecting it never loses a letter."""
        return QueueSpec(
            self._name("dlq"),
            QuorumQueueArgs(),
            (Binding(self.dead_letter_exchange.name, self.dead_letter_routing_key),),
        )

    @property
    def events_stream(self) -> QueueSpec:
        """Every event ever published (subject to `stream_retention`), readable from the start."""
        return QueueSpec(
            self._name("events", "stream"),
            self.stream_retention,
            (Binding(self.events.name, "#"),),
        )

    @property
    def deadlines(self) -> QueueSpec:
        """`<prefix>.deadlines`: where each job's deadline arrives once its delay ran out (from a
        delay queue, through the default exchange); access consumes it."""
        return QueueSpec(self._name("deadlines"), self._quorum_args(), accepts=DEADLINES)

    @property
    def delay_queues(self) -> tuple[QueueSpec, ...]:
        """The classic delay queues, one per bucket of `DELAY_BUCKETS_S`: no consumer, no
        binding (published to through the default exchange); a message whose TTL runs out goes
        on to `deadlines`."""
        args = ClassicQueueArgs(
            dead_letter_exchange="", dead_letter_routing_key=self.deadlines.name
        )
        return tuple(
            QueueSpec(self._name("delay", str(bound)), args, accepts=DEADLINES)
            for bound in DELAY_BUCKETS_S
        )

    def delay_queue(self, delay: timedelta) -> QueueSpec:
        """The delay queue for a message due `delay` from now (see `DELAY_BUCKETS_S`)."""
        index = bisect.bisect_right(DELAY_BUCKETS_S, delay.total_seconds()) - 1
        return self.delay_queues[max(index, 0)]

    @property
    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        """All exchanges, declared before any queue."""
        return (self.events, self.commands, self.dead_letter_exchange)

    @property
    def shared_queues(self) -> tuple[QueueSpec, ...]:
        """The queues every service relies on: the dead-letter queue and the events stream."""
        return (self.dead_letter_queue, self.events_stream)

    def _quorum_args(self) -> QuorumQueueArgs:
        return QuorumQueueArgs(
            delivery_limit=self.delivery_limit,
            dead_letter_exchange=self.dead_letter_exchange.name,
            dead_letter_routing_key=self.dead_letter_routing_key,
        )

    def work_queue(
        self,
        role: str,
        *,
        events: Iterable[str] = (),
        commands: Iterable[str] = (),
        accepts: MessageUnion[Any] | None = None,
    ) -> QueueSpec:
        """The quorum work queue `<prefix>.<role>`, bound to the event routing keys (topic
        patterns) and command routing keys the service asks for, taking `accepts`."""
        if not _ROLE.fullmatch(role) or role in _RESERVED_ROLES:
            raise ValueError(f"{role!r} cannot name a work queue")
        bindings = tuple(Binding(self.events.name, key) for key in events) + tuple(
            Binding(self.commands.name, key) for key in commands
        )
        return QueueSpec(self._name(role), self._quorum_args(), bindings, accepts=accepts)

    def rpc_routing_key(self, service: str) -> str:
        """The command routing key of `service`'s requests."""
        return f"rpc.{service}"

    def rpc_queue(self, service: str, *, accepts: MessageUnion[Any] | None = None) -> QueueSpec:
        """The quorum queue `<prefix>.rpc.<service>` where `service` takes its requests: those of
        `accepts`, by default what `RPC_REQUESTS` says a parjobs service takes."""
        if not _ROLE.fullmatch(service):
            raise ValueError(f"{service!r} cannot name an RPC service")
        return QueueSpec(
            self._name("rpc", service),
            self._quorum_args(),
            (Binding(self.commands.name, self.rpc_routing_key(service)),),
            accepts=accepts if accepts is not None else RPC_REQUESTS.get(service),
        )

    def reply_queue(self, instance: str) -> QueueSpec:
        """The exclusive queue `<prefix>.reply.<instance>` where one connection gets its replies."""
        if not _ROLE.fullmatch(instance):
            raise ValueError(f"{instance!r} cannot name a reply queue")
        return QueueSpec(self._name("reply", instance), ClassicQueueArgs(), exclusive=True)


async def declare(
    channel: AbstractChannel,
    topology: Topology,
    queues: Iterable[QueueSpec] = (),
    *,
    shared: bool = True,
) -> None:
    """Declare the exchanges, the shared queues and `queues`, with their bindings; with
    `shared=False` only `queues` (what a service or a user may declare: the operator declares the
    exchanges and shared queues).

    Idempotent: what exists with the same arguments is left alone. A queue that exists with other
    arguments raises TopologyError (RabbitMQ never changes a queue's arguments in place).
    """
    if shared:
        for exchange in topology.exchanges:
            await channel.declare_exchange(exchange.name, exchange.kind, durable=True)
    for spec in (*(topology.shared_queues if shared else ()), *queues):
        try:
            queue = await channel.declare_queue(
                spec.name,
                durable=spec.durable,
                exclusive=spec.exclusive,
                arguments=spec.arguments(),
            )
            for binding in spec.bindings:
                await queue.bind(binding.exchange, binding.routing_key)
        except ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"queue {spec.name} exists with other arguments ({exc}); delete it, or choose "
                "another PARJOBS_PREFIX"
            ) from exc
        except ChannelNotFoundEntity as exc:
            raise TopologyError(f"cannot declare {spec.name}: {exc}") from exc
