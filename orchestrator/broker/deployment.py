"""A deployment on the broker: its roles' broker users, its topology, and taking both down.

The operator's set-up, in order: `provision_roles` (through the management API, as an
administrator) gives the operator and each service role a broker user with its grant; then
`declare_topology`, connected as the operator, declares the exchanges, the shared queues and every
service queue. The services then only consume their queues; users declare their own.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import SecretStr

from orchestrator.broker._failover import connect_failover
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.identities import Identities, Role
from orchestrator.broker.topology import Topology
from orchestrator.settings import AMQPSettings

if TYPE_CHECKING:
    from orchestrator.broker.admin import BrokerAdmin, Credentials


@dataclass(frozen=True)
class Deployment:
    """The broker users of one deployment (`amqp.prefix`) and how each connects."""

    amqp: AMQPSettings
    """The deployment's settings, with the URL of the server (its credentials are not used)."""
    roles: dict[Role, Credentials]
    users: dict[str, Credentials] = field(default_factory=dict)
    """By registered user name, those provisioned through `provision_user`."""

    @property
    def identities(self) -> Identities:
        return Identities(Topology(self.amqp.prefix, self.amqp.delivery_limit))

    def role_settings(self, role: Role) -> AMQPSettings:
        """`amqp` as `role` connects: its own broker user."""
        return self._as(self.roles[role])

    def user_settings(self, name: str) -> AMQPSettings:
        """`amqp` as the registered user `name` connects: their own broker user."""
        return self._as(self.users[name])

    def _as(self, credentials: Credentials) -> AMQPSettings:
        url: SecretStr = credentials.amqp_url(self.amqp.amqp_url)
        return self.amqp.model_copy(update={"amqp_url": url})


async def provision_roles(admin: BrokerAdmin, amqp: AMQPSettings) -> Deployment:
    """Give the operator and each service role of `amqp.prefix` a broker user with its grant
    (fresh passwords: the URLs are shown once, never stored)."""
    identities = Identities(Topology(amqp.prefix, amqp.delivery_limit))
    roles = {role: await admin.provision(grant) for role, grant in identities.role_grants().items()}
    return Deployment(amqp, roles)


async def provision_user(admin: BrokerAdmin, deployment: Deployment, name: str) -> Credentials:
    """Give the registered user `name` a broker user with the user grant (a fresh password)."""
    credentials = await admin.provision(deployment.identities.user_grant(name))
    deployment.users[name] = credentials
    return credentials


async def declare_topology(operator: AMQPSettings) -> None:
    """As the operator: the exchanges, the shared queues and every service's queues."""
    identities = Identities(Topology(operator.prefix, operator.delivery_limit))
    async with AMQPBroker(operator, name=f"{operator.prefix}-operator-setup") as broker:
        await broker.declare(*itertools.chain(*identities.service_queues().values()))


async def delete_topology(settings: AMQPSettings) -> None:
    """Delete every queue and exchange of `settings.prefix` (exclusive queues go with their
    connections), as the operator or an administrator.

    For throwaway prefixes (the demo, tests); a deployment keeps its queues.
    """
    topology = Topology(settings.prefix, settings.delivery_limit)
    service_queues = Identities(topology).service_queues().values()
    queues = [*topology.shared_queues, *itertools.chain(*service_queues)]
    connection = await connect_failover(settings, name=f"{settings.prefix}-teardown")
    async with connection, connection.channel() as channel:
        for queue in queues:
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)


async def remove_users(admin: BrokerAdmin, amqp: AMQPSettings) -> list[str]:
    """Delete every broker user of the deployment `amqp.prefix` (roles and users); their names."""
    identities = Identities(Topology(amqp.prefix, amqp.delivery_limit))
    removed = await admin.usernames(identities.domain)
    for username in removed:
        await admin.delete_user(username)
    return removed
