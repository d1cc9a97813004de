"""Who is who on the broker, and what each may do there: names and permissions as data.

Every party has a broker user of its own, so RabbitMQ itself enforces least privilege and stamps
who published what (the validated `user_id` property):

- the service roles (`access`, `storage`, `compute`) and the operator: `role:<role>@<domain>`;
- each registered user: `user:<name>@<domain>` (dots of the name written as `:`).

`<domain>` is the topology's prefix with its dots written as `:`, so a username is one word of a
routing key (no dots) and names of two deployments sharing a broker never collide. Its
characters are letters, digits, `_`, `-`, `:` and `@`: none is special in a regular expression
or a topic pattern, and all are in the queue-name grammar aio-pika (pamqp) checks names against.

What a user may touch carries their username: their job's events are published with the routing
key `job.<owner>.<job uid>.<event type>`, and their queues are `<prefix>.client.<owner>.<suffix>`.
RabbitMQ's permissions (configure/write/read regexes over names) and topic permissions (regexes
over the routing keys of publishes and bindings on topic exchanges, with `{username}` expanded to
the connected user) then confine each to their own. Resource regexes are not expanded, so they
name each user literally.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from orchestrator.broker.topology import (
    Binding,
    ClassicQueueArgs,
    QueueSpec,
    QuorumQueueArgs,
    Topology,
)
from schemas.messages import JOB_EVENTS, JOB_UPDATES

USERNAME_CHARACTERS = "A-Za-z0-9_:@-"
"""Characters of a broker username: one routing-key word, literal in regexes and topic patterns."""
_USERNAME = re.compile(f"[{USERNAME_CHARACTERS}]+")
MAX_USER_NAME_LENGTH = 64
_USER_NAME = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_USER_NAME_LENGTH - 1}}}")
"""A registered user's name (as `schemas.ledger.AccountName`)."""
MAX_INSTANCE_LENGTH = 32
_INSTANCE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_INSTANCE_LENGTH}}}")
"""A client queue's last word: a connection's id (a uuid's 32 hex digits fit)."""
_EVENT_WORD = re.compile(r"[A-Za-z0-9_-]+")
_MAX_NAME_BYTES = 255
"""RabbitMQ's limit on queue names and routing keys (and AMQP's on `user_id`)."""
DEFAULT_EXCHANGE = "amq.default"
"""The name permission checks give the default exchange (publishing straight to a queue)."""
EVENT_ROUTING_KEY_PATTERN = r"^job\.[^.]+\.[^.]+\.[^.]+$"
"""Every event's routing key: `job.<owner>.<job uid>.<event type>`."""
OWN_EVENTS_PATTERN = r"^job\.{username}\."
"""Bindings a user may make on the events exchange: only to their own jobs' events."""
NOTHING = "^$"
"""The regex RabbitMQ reads as "no resource at all"."""
ENDED_EVENTS = ("completed", "failed", "cancelled", "expired")
"""The events that end a job (access settles its payment on each)."""
LEADING_TO_AN_END = ("storage_contracted", "compute_contracted", "run_started")
"""The events between a job's first and its end that access also takes, only to remember them:
settling the end then reads none of them from the store."""
DEATH_HEADER = "x-death"
"""What RabbitMQ adds to a message each time it dead-letters it."""


class Role(StrEnum):
    """The parties of a deployment that are not users: the three services and the operator."""

    ACCESS = "access"
    STORAGE = "storage"
    COMPUTE = "compute"
    OPERATOR = "operator"
    """Declares the topology, inspects and re-drives dead letters, replays the events stream."""


class Kind(StrEnum):
    """The first word of a username: a role of the deployment, or a registered user."""

    ROLE = "role"
    USER = "user"


@dataclass(frozen=True)
class Permissions:
    """A broker user's permissions in one virtual host: regexes over exchange and queue names.

    configure: declare and delete; write: publish to an exchange, bind a queue (as destination);
    read: consume, get and purge a queue, bind from an exchange (as source).
    """

    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermission:
    """The routing keys a broker user may publish with (write) and bind with (read) on one topic
    exchange. RabbitMQ checks them only on topic exchanges; `{username}` is expanded."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Grant:
    """Everything one broker user may do: what provisioning sets on the broker."""

    username: str
    permissions: Permissions
    topic_permissions: tuple[TopicPermission, ...] = ()


def check_username(username: str) -> str:
    """`username` if it is one routing-key word of the allowed characters, at most 255 bytes."""
    if len(username) > _MAX_NAME_BYTES or not _USERNAME.fullmatch(username):
        raise ValueError(
            f"broker username {username!r} must be 1 to {_MAX_NAME_BYTES} of "
            f"[{USERNAME_CHARACTERS}] (one routing-key word)"
        )
    return username


def _word(what: str, value: str, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match {pattern.pattern}")
    return value


def _matching(names: Iterable[str] = (), namespaces: Iterable[str] = ()) -> str:
    """A regex matching exactly `names`, and every name `<namespace>.<anything>`."""
    alternatives = sorted(
        {re.escape(name) for name in names}
        | {re.escape(namespace) + r"\..+" for namespace in namespaces}
    )
    if not alternatives:
        return NOTHING
    return f"^(?:{'|'.join(alternatives)})$"


@dataclass(frozen=True)
class Identities:
    """The broker usernames, event routing keys, client queues and grants of one `Topology`."""

    topology: Topology

    def __post_init__(self) -> None:
        longest_username = len(f"{Kind.USER}:@{self.domain}") + MAX_USER_NAME_LENGTH
        longest_queue = (
            len(f"{self.topology.prefix}.client..events.") + longest_username + MAX_INSTANCE_LENGTH
        )
        if longest_queue > _MAX_NAME_BYTES:
            raise ValueError(
                f"prefix {self.topology.prefix!r} is too long for per-user names: a user's events "
                f"queue could take {longest_queue} bytes, RabbitMQ allows {_MAX_NAME_BYTES}"
            )

    # --- usernames ------------------------------------------------------------------------------

    @property
    def domain(self) -> str:
        """What follows `@` in this deployment's usernames: the prefix, dots written as `:`."""
        return self.topology.prefix.replace(".", ":")

    def role_username(self, role: Role) -> str:
        """The broker user of a service role or of the operator: `role:<role>@<domain>`."""
        return check_username(f"{Kind.ROLE}:{Role(role)}@{self.domain}")

    def user_username(self, name: str) -> str:
        """The broker user of the registered user `name`: `user:<name>@<domain>`, the name's
        dots written as `:` (no registered name has a `:`, so no two users share one)."""
        _word("user name", name, _USER_NAME)
        return check_username(f"{Kind.USER}:{name.replace('.', ':')}@{self.domain}")

    def _parse(self, username: str) -> tuple[Kind, str] | None:
        head, at, domain = username.rpartition("@")
        kind, colon, name = head.partition(":")
        if not (at and colon and domain == self.domain and kind in set(Kind)):
            return None
        return Kind(kind), name

    def user_of(self, username: str) -> str | None:
        """The registered user's name behind `username` (a message's validated `user_id`), or
        None if it is not one of this deployment's users."""
        parsed = self._parse(username)
        if parsed is None or parsed[0] is not Kind.USER:
            return None
        name = parsed[1].replace(":", ".")
        return name if _USER_NAME.fullmatch(name) else None

    def role_of(self, username: str) -> Role | None:
        """The role behind `username`, or None if it is not one of this deployment's roles."""
        parsed = self._parse(username)
        if parsed is None or parsed[0] is not Kind.ROLE or parsed[1] not in set(Role):
            return None
        return Role(parsed[1])

    def requester(self, user_id: str | None, headers: Mapping[str, object]) -> str | None:
        """The registered user who sent a request: the name behind its broker-validated
        `user_id`, or None if it names no user of this deployment or was dead-lettered on its
        way. A user may give her own queues the commands exchange as dead-letter exchange (she may
        write to it), and what dies there keeps the `user_id` of its first publisher: a service's
        reply or event would reach a service as a request with the service's name on it."""
        if user_id is None or DEATH_HEADER in headers:
            return None
        return self.user_of(user_id)

    # --- event routing keys ---------------------------------------------------------------------

    def event_routing_key(self, owner: str, job_uid: str, event_type: str) -> str:
        """`job.<owner>.<job uid>.<event type>`, `owner` the job's user's broker username."""
        check_username(owner)
        _word("job uid", job_uid, _EVENT_WORD)
        _word("event type", event_type, _EVENT_WORD)
        return f"job.{owner}.{job_uid}.{event_type}"

    def events_of_type(self, event_type: str) -> str:
        """The binding key of one event type, whoever's job it is (services bind these)."""
        return f"job.*.*.{_word('event type', event_type, _EVENT_WORD)}"

    def events_of_owner(self, owner: str) -> str:
        """The binding key of every event of `owner`'s jobs (the only kind a user may bind)."""
        return f"job.{check_username(owner)}.#"

    # --- the services' queues -------------------------------------------------------------------

    def service_queues(self) -> dict[Role, tuple[QueueSpec, ...]]:
        """The durable queues each service consumes (the operator declares them), each with the
        messages it takes: its RPC requests (`RPC_REQUESTS`), or job events."""
        topology = self.topology
        followed = [self.events_of_type(t) for t in (*LEADING_TO_AN_END, *ENDED_EVENTS)]
        return {
            Role.ACCESS: (
                topology.rpc_queue("access"),
                topology.work_queue("access", events=followed, accepts=JOB_EVENTS),
                topology.deadlines,
                *topology.delay_queues,
            ),
            Role.STORAGE: (
                topology.work_queue(
                    "storage", events=[self.events_of_type("submitted")], accepts=JOB_EVENTS
                ),
            ),
            Role.COMPUTE: (
                topology.work_queue(
                    "compute",
                    # `submitted` only to remember it: contracting the job then reads nothing.
                    events=[self.events_of_type(t) for t in ("submitted", "storage_contracted")],
                    accepts=JOB_EVENTS,
                ),
                topology.rpc_queue("compute"),
                topology.rpc_queue("runs"),
            ),
        }

    def stops_queue(self, daemon: str) -> QueueSpec:
        """`<prefix>.stops.<daemon>`: one compute daemon's own copy of every `cancelled` event,
        so the daemon running a job hears its stop (deleted with the daemon's connection)."""
        name = f"{self.topology.prefix}.stops.{_word('daemon', daemon, _INSTANCE)}"
        binding = Binding(self.topology.events.name, self.events_of_type("cancelled"))
        return QueueSpec(name, ClassicQueueArgs(), (binding,), exclusive=True, accepts=JOB_EVENTS)

    # --- client queues --------------------------------------------------------------------------

    def client_namespace(self, username: str) -> str:
        """`<prefix>.client.<username>`: every queue `username` may declare starts with it."""
        return f"{self.topology.prefix}.client.{check_username(username)}"

    def owns(self, username: str, queue: str) -> bool:
        """Whether `queue` is in `username`'s namespace (e.g. a request's `reply_to`)."""
        return queue.startswith(self.client_namespace(username) + ".")

    def reply_queue(self, username: str, instance: str) -> QueueSpec:
        """`<prefix>.client.<username>.reply.<instance>`: one connection's replies."""
        name = f"{self.client_namespace(username)}.reply.{_word('instance', instance, _INSTANCE)}"
        return QueueSpec(name, ClassicQueueArgs(), exclusive=True)

    def events_queue(self, username: str, instance: str) -> QueueSpec:
        """`<prefix>.client.<username>.events.<instance>`: one connection's copy of the events
        of `username`'s jobs, as they happen, and of their runs' progress reports."""
        name = f"{self.client_namespace(username)}.events.{_word('instance', instance, _INSTANCE)}"
        binding = Binding(self.topology.events.name, self.events_of_owner(username))
        return QueueSpec(name, ClassicQueueArgs(), (binding,), exclusive=True, accepts=JOB_UPDATES)

    # --- grants ---------------------------------------------------------------------------------

    def user_grant(self, name: str) -> Grant:
        """A registered user: requests to the commands exchange; their own queues; bindings to
        their own jobs' events. No write on the events or the default exchange."""
        username = self.user_username(name)
        own = (self.client_namespace(username),)
        topology = self.topology
        return Grant(
            username,
            Permissions(
                configure=_matching(namespaces=own),
                write=_matching([topology.commands.name], own),
                read=_matching([topology.events.name], own),
            ),
            (TopicPermission(topology.events.name, write=NOTHING, read=OWN_EVENTS_PATTERN),),
        )

    def service_grant(
        self, role: Role, queues: Iterable[QueueSpec], *, per_daemon: Iterable[QueueSpec] = ()
    ) -> Grant:
        """A service that declares, binds and consumes `queues` (and nothing else), publishes
        events and dead letters, and replies through the default exchange if a queue of its
        takes requests (is bound to the commands exchange).

        `per_daemon` are queues each daemon of the role declares for itself, named
        `<namespace>.<daemon>` (as `stops_queue`): granted for every name of their namespace."""
        if Role(role) is Role.OPERATOR:
            raise ValueError("the operator is not a service: use operator_grant")
        specs = tuple(queues)
        instances = tuple(per_daemon)
        topology = self.topology
        own = {spec.name for spec in specs}
        namespaces = {spec.name.rpartition(".")[0] for spec in instances}
        bindings = [binding for spec in (*specs, *instances) for binding in spec.bindings]
        dead_letter_exchanges = {
            spec.args.dead_letter_exchange or DEFAULT_EXCHANGE
            for spec in specs
            if isinstance(spec.args, QuorumQueueArgs | ClassicQueueArgs)
            and spec.args.dead_letter_exchange is not None
        }
        replies = any(binding.exchange == topology.commands.name for binding in bindings)
        event_bindings = [b.routing_key for b in bindings if b.exchange == topology.events.name]
        write = {topology.events.name, topology.dead_letter_exchange.name, *dead_letter_exchanges}
        return Grant(
            self.role_username(role),
            Permissions(
                configure=_matching(own, namespaces),
                write=_matching(
                    own | write | ({DEFAULT_EXCHANGE} if replies else set()), namespaces
                ),
                read=_matching(own | {binding.exchange for binding in bindings}, namespaces),
            ),
            (
                TopicPermission(
                    topology.events.name,
                    write=EVENT_ROUTING_KEY_PATTERN,
                    read=_matching(event_bindings),
                ),
            ),
        )

    def role_grants(self) -> dict[Role, Grant]:
        """The grant of every role of the deployment: the operator's and each service's."""
        queues = self.service_queues()
        grants = {Role.OPERATOR: self.operator_grant(itertools.chain(*queues.values()))}
        for role, specs in queues.items():
            per_daemon = (self.stops_queue("daemon"),) if role is Role.COMPUTE else ()
            grants[role] = self.service_grant(role, specs, per_daemon=per_daemon)
        return grants

    def operator_grant(self, service_queues: Iterable[QueueSpec]) -> Grant:
        """The operator: declares and deletes the whole topology (exchanges, shared queues,
        `service_queues`, clients' leftovers), reads the dead letters and the events stream,
        re-drives dead letters through the default exchange. No topic restriction."""
        topology = self.topology
        names = {
            *(exchange.name for exchange in topology.exchanges),
            *(spec.name for spec in (*topology.shared_queues, *service_queues)),
        }
        clients = (f"{topology.prefix}.client",)
        return Grant(
            self.role_username(Role.OPERATOR),
            Permissions(
                configure=_matching(names, clients),
                write=_matching(names | {DEFAULT_EXCHANGE}, clients),
                read=_matching(names, clients),
            ),
        )
