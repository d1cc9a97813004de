"""`parjobs broker setup` on the real RabbitMQ: each role gets a broker user of its own, the
operator declares the topology, and the URLs printed are the ones each party connects with."""

from __future__ import annotations

import re
import uuid

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused
from typer.testing import CliRunner

from orchestrator.broker.admin import BrokerAdmin, vhost_of
from orchestrator.broker.deployment import delete_topology, remove_users
from orchestrator.broker.identities import Identities, Role
from orchestrator.broker.topology import Topology
from orchestrator.cli._app import app
from orchestrator.settings import AMQPSettings, ManagementSettings

pytestmark = pytest.mark.integration


async def _cleanup(amqp: AMQPSettings) -> None:
    await delete_topology(amqp)
    url = amqp.amqp_url.get_secret_value()
    async with BrokerAdmin(ManagementSettings(), vhost=vhost_of(url)) as admin:
        await remove_users(admin, amqp)


async def _ack(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def _check(urls: dict[str, str], ids: Identities) -> None:
    queues = ids.service_queues()
    # The operator's connection sees the whole topology it declared.
    async with await aio_pika.connect(urls["operator"]) as operator:
        channel = await operator.channel()
        for spec in (*ids.topology.shared_queues, *(q for qs in queues.values() for q in qs)):
            await channel.declare_queue(spec.name, passive=True)
    # Each service consumes its own queues as its own broker user, and no other's.
    async with await aio_pika.connect(urls["storage"]) as storage:
        channel = await storage.channel()
        (own,) = queues[Role.STORAGE]
        queue = await channel.declare_queue(own.name, passive=True)
        await queue.consume(_ack)
        runs = queues[Role.COMPUTE][2]
        other = await (await storage.channel()).declare_queue(runs.name, passive=True)
        with pytest.raises(ChannelAccessRefused):
            await other.consume(_ack)


def test_broker_setup_provisions_every_role_and_declares_the_topology(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    amqp = AMQPSettings(prefix=f"setup-{uuid.uuid4().hex[:10]}")
    ids = Identities(Topology(amqp.prefix, amqp.delivery_limit))
    monkeypatch.setenv("PARJOBS_PREFIX", amqp.prefix)
    try:
        result = CliRunner().invoke(app, ["broker", "setup"])
        assert result.exit_code == 0, result.output
        urls = dict(re.findall(r"^(\w+): (amqps?://\S+)$", result.output, re.MULTILINE))
        assert set(urls) == {role.value for role in Role}, result.output
        for role in Role:
            username = ids.role_username(role).replace(":", "%3A").replace("@", "%40")
            assert urls[role.value].startswith(f"amqp://{username}:"), urls[role.value]
        anyio.run(_check, urls, ids)
    finally:
        anyio.run(_cleanup, amqp)
