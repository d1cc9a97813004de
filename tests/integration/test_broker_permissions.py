"""Least privilege enforced by RabbitMQ itself: each party connects as its own broker user.

One deployment under a prefix of this module's own: the operator, the three service roles and two
users (alice, and mallory who tries what a hostile user would) are provisioned through the
management API, the operator declares the real topology with orchestrator's `declare`, and every
refusal asserted is the broker's own (ACCESS_REFUSED: the channel closed with 403, or the 406 of a
forged `user_id`). Users and queues are deleted afterwards, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    FieldValue,
)
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ProbableAuthenticationError,
)
from pydantic import BaseModel, SecretStr, TypeAdapter

from orchestrator.broker.admin import BrokerAdmin, Credentials, vhost_of
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.identities import Identities, Role
from orchestrator.broker.topology import QueueSpec, Topology, declare
from orchestrator.errors import ConfigurationError
from orchestrator.settings import AMQPSettings, ManagementSettings

if TYPE_CHECKING:
    from tests.conftest import RabbitMQCtl

pytestmark = pytest.mark.integration

USERS = ("alice", "mallory")
SERVICES = (Role.ACCESS, Role.STORAGE, Role.COMPUTE)
JOB = "a" * 32
Action = Callable[[AbstractChannel], Awaitable[object]]


@dataclass(frozen=True)
class Deployment:
    """The provisioned broker users of one prefix, and how to connect as each."""

    topology: Topology
    ids: Identities
    queues: Mapping[Role, tuple[QueueSpec, ...]]
    amqp_url: SecretStr
    vhost: str
    credentials: Mapping[str, Credentials]
    """By party: "operator", "access", "storage", "compute", "alice", "mallory"."""

    def username(self, party: str) -> str:
        return self.credentials[party].username

    def queue(self, name: str) -> QueueSpec:
        """A service queue or shared queue by its name after the prefix (e.g. "rpc.runs")."""
        specs = itertools.chain(*self.queues.values(), self.topology.shared_queues)
        return next(s for s in specs if s.name == f"{self.topology.prefix}.{name}")

    @asynccontextmanager
    async def connect(self, party: str) -> AsyncIterator[Session]:
        """Connected as `party`'s broker user."""
        url = self.credentials[party].amqp_url(self.amqp_url).get_secret_value()
        connection = await aio_pika.connect(
            url, client_properties={"connection_name": f"{self.topology.prefix}-{party}"}
        )
        async with connection:
            yield Session(self.username(party), self.vhost, connection)


@dataclass(frozen=True)
class Session:
    """One party's connection, and what the broker does with what it tries."""

    username: str
    vhost: str
    connection: AbstractConnection

    async def do(self, action: Action) -> None:
        """`action` on a fresh channel, publishes confirmed; the broker allowed it."""
        await action(await self.connection.channel(publisher_confirms=True))

    async def assert_refused(self, action: Action, *, what: str) -> None:
        """`action` on a fresh channel is refused by the broker itself: 403, naming `what`."""
        with pytest.raises(ChannelAccessRefused) as refusal:
            await self.do(action)
        assert (
            f"ACCESS_REFUSED - access to {what} in vhost '{self.vhost}' refused for user "
            f"'{self.username}'"
        ) in str(refusal.value)


async def _delete_everything(
    rabbitmqctl: RabbitMQCtl, amqp_url: str, vhost: str, prefix: str
) -> None:
    """Delete every queue and exchange named `<prefix>.…`, whoever declared it."""
    names: dict[str, list[str]] = {}
    for kind in ("queues", "exchanges"):
        listing = await rabbitmqctl.run(f"list_{kind}", "-p", vhost, "--no-table-headers", "name")
        names[kind] = [name for name in listing.splitlines() if name.startswith(f"{prefix}.")]
    connection = await aio_pika.connect(amqp_url)  # the operator's set-up user (guest)
    async with connection, connection.channel() as channel:
        for queue in names["queues"]:
            await channel.queue_delete(queue)
        for exchange in names["exchanges"]:
            await channel.exchange_delete(exchange)


@pytest.fixture(scope="module")
async def deployment(rabbitmqctl: RabbitMQCtl) -> AsyncIterator[Deployment]:
    amqp = AMQPSettings(prefix=f"perm-{uuid.uuid4().hex[:10]}")
    topology = Topology(amqp.prefix, amqp.delivery_limit)
    ids = Identities(topology)
    queues = ids.service_queues()
    queues_of_services = list(itertools.chain(*queues.values()))
    admin = BrokerAdmin(ManagementSettings(), vhost=vhost_of(amqp.amqp_url.get_secret_value()))
    off: str | None = None
    try:
        await admin.check()
    except ConfigurationError as exc:
        off = str(exc)
    if off is not None:  # outside the except: the report shows only the fix
        await admin.aclose()
        pytest.fail(off, pytrace=False)
    try:
        grants = ids.role_grants()
        credentials = {
            "operator": await admin.provision(grants[Role.OPERATOR]),
            **{role.value: await admin.provision(grants[role]) for role in SERVICES},
            **{name: await admin.provision(ids.user_grant(name)) for name in USERS},
        }
        deployed = Deployment(topology, ids, queues, amqp.amqp_url, admin.vhost, credentials)
        async with deployed.connect("operator") as operator:
            await operator.do(lambda channel: declare(channel, topology, queues_of_services))
        yield deployed
    finally:
        try:
            for username in await admin.usernames(ids.domain):
                await admin.delete_user(username)
            await _delete_everything(
                rabbitmqctl, amqp.amqp_url.get_secret_value(), admin.vhost, amqp.prefix
            )
        finally:
            await admin.aclose()


# --- what the parties try ---------------------------------------------------------------------


def publish(
    exchange: str, routing_key: str, *, user_id: str | None = None, reply_to: str | None = None
) -> Action:
    """Publish a message ("" for the default exchange)."""

    async def action(channel: AbstractChannel) -> object:
        target = await channel.get_exchange(exchange, ensure=False) if exchange else None
        message = aio_pika.Message(b"{}", user_id=user_id, reply_to=reply_to)
        return await (target or channel.default_exchange).publish(message, routing_key)

    return action


async def _declare_queue(channel: AbstractChannel, spec: QueueSpec) -> None:
    """Declare one queue as `orchestrator.broker.topology.declare` does, with its bindings."""
    queue = await channel.declare_queue(
        spec.name, durable=spec.durable, exclusive=spec.exclusive, arguments=spec.arguments()
    )
    for binding in spec.bindings:
        await queue.bind(binding.exchange, binding.routing_key)


def declare_queue(spec: QueueSpec) -> Action:
    return lambda channel: _declare_queue(channel, spec)


def delete_queue(name: str) -> Action:
    return lambda channel: channel.queue_delete(name)


def purge_queue(name: str) -> Action:
    async def action(channel: AbstractChannel) -> object:
        return await (await channel.get_queue(name, ensure=False)).purge()

    return action


def consume_queue(name: str, inbox: Inbox | None = None) -> Action:
    async def action(channel: AbstractChannel) -> object:
        return await (await channel.get_queue(name, ensure=False)).consume(inbox or Inbox())

    return action


def bind_queue(queue: str, exchange: str, routing_key: str) -> Action:
    async def action(channel: AbstractChannel) -> object:
        return await (await channel.get_queue(queue, ensure=False)).bind(exchange, routing_key)

    return action


def declare_trap(deployment: Deployment, owner: str, arguments: dict[str, FieldValue]) -> Action:
    """Declare a queue in `owner`'s namespace, bound to her jobs' events, with `arguments`."""
    name = f"{deployment.ids.client_namespace(owner)}.trap"

    async def action(channel: AbstractChannel) -> object:
        queue = await channel.declare_queue(name, exclusive=True, arguments=arguments)
        events = deployment.topology.events.name
        return await queue.bind(events, deployment.ids.events_of_owner(owner))

    return action


class Inbox:
    """Messages a consumer received (acked), and a way to wait for them."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        await self.messages.put(message)

    async def next(self) -> AbstractIncomingMessage:
        return await asyncio.wait_for(self.messages.get(), timeout=10)


# --- the users ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """A user connected as a client is: their own reply queue and events queue, consumed."""

    session: Session
    reply_queue: QueueSpec
    events_queue: QueueSpec
    replies: Inbox
    events: Inbox

    @property
    def username(self) -> str:
        return self.session.username


@asynccontextmanager
async def client(deployment: Deployment, user: str) -> AsyncIterator[Client]:
    instance = uuid.uuid4().hex
    async with deployment.connect(user) as session:
        ids = deployment.ids
        connected = Client(
            session,
            ids.reply_queue(session.username, instance),
            ids.events_queue(session.username, instance),
            replies=Inbox(),
            events=Inbox(),
        )
        channel = await session.connection.channel()
        for spec, inbox in (
            (connected.reply_queue, connected.replies),
            (connected.events_queue, connected.events),
        ):
            await _declare_queue(channel, spec)
            await consume_queue(spec.name, inbox)(channel)
        yield connected


@pytest.fixture
async def alice(deployment: Deployment) -> AsyncIterator[Client]:
    async with client(deployment, "alice") as connected:
        yield connected


@pytest.fixture
async def mallory(deployment: Deployment) -> AsyncIterator[Client]:
    async with client(deployment, "mallory") as connected:
        yield connected


# --- what mallory cannot do -----------------------------------------------------------------------


async def test_mallory_cannot_publish_an_event(deployment: Deployment, mallory: Client) -> None:
    events = deployment.topology.events.name
    for owner in (deployment.username("alice"), mallory.username):
        key = deployment.ids.event_routing_key(owner, JOB, "completed")
        await mallory.session.assert_refused(publish(events, key), what=f"exchange '{events}'")


async def test_mallory_cannot_publish_straight_into_a_queue(
    deployment: Deployment, alice: Client, mallory: Client
) -> None:
    topology = deployment.topology
    for queue in (
        alice.reply_queue,
        *deployment.queues[Role.COMPUTE],
        topology.deadlines,  # a forged deadline, due at once
        *topology.delay_queues,
    ):
        await mallory.session.assert_refused(publish("", queue.name), what="exchange 'amq.default'")


OTHERS_QUEUES = [
    "storage",
    "compute",
    "access",
    "rpc.runs",
    "rpc.compute",
    "rpc.access",
    "dlq",
    "events.stream",
    "deadlines",
    "delay.0",
    "delay.2048",
    "alice's replies",
    "alice's events",
]


@pytest.mark.parametrize("which", OTHERS_QUEUES)
async def test_mallory_cannot_touch_anyone_elses_queue(
    deployment: Deployment, alice: Client, mallory: Client, which: str
) -> None:
    spec = {
        "alice's replies": alice.reply_queue,
        "alice's events": alice.events_queue,
    }.get(which) or deployment.queue(which)
    for action in (
        declare_queue(spec),
        delete_queue(spec.name),
        purge_queue(spec.name),
        consume_queue(spec.name),
    ):
        await mallory.session.assert_refused(action, what=f"queue '{spec.name}'")


@pytest.mark.parametrize("pattern", ["{alice}", "job.{alice}.#", "job.*.#", "job.#", "#"])
async def test_mallory_cannot_bind_to_events_not_her_own(
    deployment: Deployment, alice: Client, mallory: Client, pattern: str
) -> None:
    key = pattern.format(alice=alice.username)
    events = deployment.topology.events.name

    async def bind_through_an_exchange_of_hers(channel: AbstractChannel) -> object:
        name = f"{deployment.ids.client_namespace(mallory.username)}.relay"
        relay = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        return await relay.bind(events, key)

    for action in (
        bind_queue(mallory.events_queue.name, events, key),
        bind_through_an_exchange_of_hers,
    ):
        await mallory.session.assert_refused(action, what=f"topic '{key}' in exchange '{events}'")


async def test_mallory_cannot_listen_to_requests(deployment: Deployment, mallory: Client) -> None:
    commands = deployment.topology.commands.name
    runs = deployment.topology.rpc_routing_key("runs")
    await mallory.session.assert_refused(
        bind_queue(mallory.events_queue.name, commands, runs), what=f"exchange '{commands}'"
    )


@pytest.mark.parametrize("impersonated", ["alice", "access", "compute"])
async def test_mallory_cannot_publish_as_anyone_else(
    deployment: Deployment, mallory: Client, impersonated: str
) -> None:
    someone = deployment.username(impersonated)
    topology = deployment.topology
    forged = publish(topology.commands.name, topology.rpc_routing_key("access"), user_id=someone)
    with pytest.raises(ChannelPreconditionFailed) as refusal:
        await mallory.session.do(forged)
    assert (
        f"PRECONDITION_FAILED - user_id property set to '{someone}' but authenticated user was "
        f"'{mallory.username}'"
    ) in str(refusal.value)


async def test_mallory_cannot_declare_outside_her_namespace(
    deployment: Deployment, alice: Client, mallory: Client
) -> None:
    ids, topology = deployment.ids, deployment.topology
    outside = [
        ids.reply_queue(alice.username, "mine"),
        ids.events_queue(alice.username, "mine"),
        topology.reply_queue("mine"),  # the reply queues of today's clients
        topology.work_queue("mallory"),
        QueueSpec(ids.client_namespace(mallory.username), topology.reply_queue("x").args),
    ]
    for spec in outside:
        await mallory.session.assert_refused(declare_queue(spec), what=f"queue '{spec.name}'")
    with pytest.raises(ChannelAccessRefused, match=r"access to queue 'amq\.gen-"):
        await mallory.session.do(lambda channel: channel.declare_queue(exclusive=True))


async def test_mallory_cannot_route_dead_letters_into_events_or_dlx(
    deployment: Deployment, mallory: Client
) -> None:
    # Declaring a queue with a dead-letter exchange needs write on that exchange.
    topology = deployment.topology
    for exchange in (topology.events.name, topology.dead_letter_exchange.name):
        trap = declare_trap(deployment, mallory.username, {"x-dead-letter-exchange": exchange})
        await mallory.session.assert_refused(trap, what=f"exchange '{exchange}'")


async def test_mallory_cannot_route_dead_letters_into_access_deadlines(
    deployment: Deployment, mallory: Client
) -> None:
    # Dead letters keep their first publisher's user_id: access's events, expired from a queue of
    # hers into the deadlines queue, would arrive as access's. Only the default exchange leads
    # there, and she may not write to it.
    trap: dict[str, FieldValue] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": deployment.topology.deadlines.name,
        "x-message-ttl": 0,
    }
    await mallory.session.assert_refused(
        declare_trap(deployment, mallory.username, trap), what="exchange 'amq.default'"
    )


async def test_access_sends_itself_a_deadline_through_a_delay_queue(
    deployment: Deployment,
) -> None:
    topology = deployment.topology
    deadlines = Inbox()
    async with deployment.connect("access") as access:
        await access.do(consume_queue(topology.deadlines.name, deadlines))
        delay = topology.delay_queue(timedelta(seconds=1))

        async def delayed(channel: AbstractChannel) -> object:
            message = aio_pika.Message(b"{}", user_id=access.username, expiration=0.2)
            return await channel.default_exchange.publish(message, delay.name)

        await access.do(delayed)
        arrived = await deadlines.next()
    assert arrived.user_id == access.username  # the broker vouches access sent it
    deaths = arrived.headers["x-death"]
    assert isinstance(deaths, list)
    assert [death["reason"] for death in deaths if isinstance(death, dict)] == ["expired"]


async def test_a_service_message_mallory_reroutes_as_a_request_names_no_requester(
    deployment: Deployment, mallory: Client
) -> None:
    # She may write to the commands exchange, so she may dead-letter into it: her queue of her
    # own events expires them at once into access's requests. They arrive with access's own
    # validated user_id, which is why a request's sender is `requester`, not `user_id` alone.
    topology, ids = deployment.topology, deployment.ids
    rpc_access = topology.rpc_routing_key("access")
    trap: dict[str, FieldValue] = {
        "x-dead-letter-exchange": topology.commands.name,
        "x-dead-letter-routing-key": rpc_access,
        "x-message-ttl": 0,
    }
    await mallory.session.do(declare_trap(deployment, mallory.username, trap))
    requests = Inbox()
    async with deployment.connect("access") as access:
        await access.do(consume_queue(deployment.queue("rpc.access").name, requests))
        key = ids.event_routing_key(mallory.username, JOB, "submitted")
        await access.do(publish(topology.events.name, key, user_id=access.username))
        rerouted = await requests.next()
        await mallory.session.do(
            publish(topology.commands.name, rpc_access, user_id=mallory.username)
        )
        direct = await requests.next()
    assert (rerouted.exchange, rerouted.user_id) == (topology.commands.name, access.username)
    assert ids.requester(rerouted.user_id, rerouted.headers) is None
    assert ids.requester(direct.user_id, direct.headers) == "mallory"


# --- what a user can do ---------------------------------------------------------------------------


async def test_a_user_asks_a_service_and_hears_only_her_own_jobs_events(
    deployment: Deployment, alice: Client, mallory: Client
) -> None:
    topology, ids = deployment.topology, deployment.ids
    requests = Inbox()
    async with deployment.connect("access") as access:
        await access.do(consume_queue(deployment.queue("rpc.access").name, requests))
        await mallory.session.do(
            publish(
                topology.commands.name,
                topology.rpc_routing_key("access"),
                user_id=mallory.username,
                reply_to=mallory.reply_queue.name,
            )
        )
        request = await requests.next()
        assert ids.requester(request.user_id, request.headers) == "mallory"
        assert request.reply_to is not None
        assert ids.owns(mallory.username, request.reply_to)
        # the service replies through the default exchange and publishes her job's event
        await access.do(publish("", request.reply_to, user_id=access.username))
        key = ids.event_routing_key(mallory.username, JOB, "submitted")
        await access.do(publish(topology.events.name, key, user_id=access.username))

    reply = await mallory.replies.next()
    assert ids.role_of(reply.user_id or "") is Role.ACCESS
    event = await mallory.events.next()
    assert (event.routing_key, event.user_id) == (key, access.username)
    await asyncio.sleep(0.2)  # alice's queue would have it by now
    assert alice.events.messages.empty()
    assert alice.replies.messages.empty()


# --- what the services can do ---------------------------------------------------------------------


@pytest.mark.parametrize("role", SERVICES)
async def test_a_service_declares_its_queues_and_publishes_as_itself(
    deployment: Deployment, role: Role
) -> None:
    topology = deployment.topology
    key = deployment.ids.event_routing_key(deployment.username("alice"), JOB, "progress")
    async with deployment.connect(role) as service:
        for spec in deployment.queues[role]:  # as the daemon declares them today
            await service.do(declare_queue(spec))
            await service.do(consume_queue(spec.name))
        await service.do(publish(topology.events.name, key, user_id=service.username))
        dead_letters = topology.dead_letter_exchange.name
        await service.do(
            publish(dead_letters, topology.dead_letter_routing_key, user_id=service.username)
        )
        malformed = "job.not-an-event-key"
        await service.assert_refused(
            publish(topology.events.name, malformed, user_id=service.username),
            what=f"topic '{malformed}' in exchange '{topology.events.name}'",
        )
        dlq = topology.dead_letter_queue
        await service.assert_refused(declare_queue(dlq), what=f"queue '{dlq.name}'")
    async with deployment.connect("operator") as operator:  # the DLQ as it was
        await operator.do(purge_queue(topology.dead_letter_queue.name))


async def test_each_compute_daemon_keeps_a_stops_queue_of_its_own(
    deployment: Deployment, mallory: Client
) -> None:
    """Compute declares, binds (to every job's `cancelled`) and consumes a queue per daemon; no
    other service and no user may."""
    stops = deployment.ids.stops_queue(uuid.uuid4().hex)
    async with deployment.connect("compute") as compute:
        channel = await compute.connection.channel()
        queue = await channel.declare_queue(stops.name, exclusive=True)
        (binding,) = stops.bindings
        await queue.bind(binding.exchange, binding.routing_key)
        await queue.consume(_drop)
        async with deployment.connect("storage") as storage:
            other = deployment.ids.stops_queue(uuid.uuid4().hex)
            await storage.assert_refused(declare_queue(other), what=f"queue '{other.name}'")
    await mallory.session.assert_refused(declare_queue(stops), what=f"queue '{stops.name}'")


async def _drop(message: AbstractIncomingMessage) -> None:
    await message.ack()


@pytest.mark.parametrize("role", [Role.ACCESS, Role.COMPUTE])
async def test_a_service_that_takes_requests_replies_through_the_default_exchange(
    deployment: Deployment, alice: Client, role: Role
) -> None:
    async with deployment.connect(role) as service:
        await service.do(publish("", alice.reply_queue.name, user_id=service.username))
    assert (await alice.replies.next()).user_id == service.username


async def test_storage_neither_replies_nor_reads_the_run_queue(
    deployment: Deployment, alice: Client
) -> None:
    runs = deployment.queue("rpc.runs").name
    async with deployment.connect("storage") as storage:
        await storage.assert_refused(
            publish("", alice.reply_queue.name, user_id=storage.username),
            what="exchange 'amq.default'",
        )
        for action in (consume_queue(runs), delete_queue(runs)):
            await storage.assert_refused(action, what=f"queue '{runs}'")


class Note(BaseModel):
    text: str


async def test_the_operator_runs_parjobs_own_broker_over_the_whole_topology(
    deployment: Deployment,
) -> None:
    settings = AMQPSettings(
        amqp_url=deployment.credentials["operator"].amqp_url(deployment.amqp_url),
        prefix=deployment.topology.prefix,
    )
    async with AMQPBroker(settings, name=f"{settings.prefix}-operator") as broker:
        await broker.declare(*itertools.chain(*deployment.queues.values()))
        owner = deployment.username("alice")
        key = deployment.ids.event_routing_key(owner, JOB, "progress")
        sent = await broker.publish(broker.topology.events, key, Note(text="by the operator"))
        records = broker.read_stream(
            broker.topology.events_stream,
            TypeAdapter(dict[str, object]),
            until=lambda record: record.message_id == sent,
        )
        assert [record.routing_key async for record in records][-1] == key
        assert await broker.dead_letters() == []
        assert (await broker.check()).dead_letters == 0


# --- provisioning ---------------------------------------------------------------------------------


async def test_the_grants_on_the_broker_are_the_grants_as_data(deployment: Deployment) -> None:
    async with BrokerAdmin(ManagementSettings(), vhost=deployment.vhost) as admin:
        grant = deployment.ids.user_grant("alice")
        assert await admin.permissions(grant.username) == {
            "configure": grant.permissions.configure,
            "write": grant.permissions.write,
            "read": grant.permissions.read,
        }
        (topic,) = grant.topic_permissions
        assert await admin.topic_permissions(grant.username) == {
            topic.exchange: (topic.write, topic.read)
        }
        expected = sorted(credentials.username for credentials in deployment.credentials.values())
        assert await admin.usernames(deployment.ids.domain) == expected


async def test_provisioning_again_keeps_the_grant_and_changes_the_password(
    deployment: Deployment,
) -> None:
    grant = deployment.ids.user_grant("carol")
    async with BrokerAdmin(ManagementSettings(), vhost=deployment.vhost) as admin:
        first = await admin.provision(grant)
        second = await admin.provision(grant)
        assert second.password != first.password
        (topic,) = grant.topic_permissions
        assert await admin.topic_permissions(grant.username) == {
            topic.exchange: (topic.write, topic.read)
        }
        connection = await aio_pika.connect(second.amqp_url(deployment.amqp_url).get_secret_value())
        await connection.close()
        stale = first.amqp_url(deployment.amqp_url).get_secret_value()
        with pytest.raises(ProbableAuthenticationError, match="ACCESS_REFUSED - Login was refused"):
            await aio_pika.connect(stale)
        assert await admin.delete_user(grant.username)
        assert not await admin.delete_user(grant.username)
