"""Failover on a RabbitMQ cluster of three nodes of the module's own (`tests/_rabbit_cluster.py`).

A broker given every node's URL goes on publishing and consuming while its node is killed
(SIGKILL). Then the three daemons as processes and a user's client, all given every node's URL in
the same order (the client with a dead node second, so its own move takes seconds), and a stream
of jobs while the node they are connected to is killed, then — once that one is back — the node
most of the daemons moved to. Every job completes exactly once as the client sees it, within its
timeout (the client catches up after each move of its own connection), is charged once, and
nothing is dead-lettered.

A quorum queue needs a majority of its members: with three nodes, one may be down at a time,
which is why the first killed node is started again before the second kill.

Slow (a cluster to start, three failovers): about two minutes on a 2-core machine.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal

import anyio
import pytest
from pydantic import SecretStr
from yarl import URL

from orchestrator import KeyPair
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import IncomingMeta
from orchestrator.client.client import ParjobsClient
from orchestrator.core.layout import JobKeys
from orchestrator.services.accounts import Accounts
from orchestrator.settings import AMQPSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobState
from tests._rabbit_cluster import RabbitCluster
from tests._waiting import eventually
from tests.contract.broker import MESSAGES, Ping, Pong
from tests.e2e.test_e2e import ACCOUNT, Harness, payload
from workers.cluster import ROLES, LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOBS_AT_LEAST = 10
JOBS_AT_MOST = 30
JOB_INTERVAL_S = 0.75
"""A job starts every so often until both failovers are over: jobs are in flight at each."""
JOB_TIMEOUT_S = 90
"""How long the client waits for each job to end: a job whose last event its connection lost
while moving would wait that long, and fail the test, were it not caught up at the move."""
CLIENT_RECONNECT_S = 3.0
"""The client's pause after a failed attempt: with a dead node second in its list, its connection
is down about that long after its first node is killed, and events of several jobs are lost."""


@pytest.fixture(scope="module")
async def rabbit() -> AsyncIterator[RabbitCluster]:
    """The module's cluster; each test starts again any node an earlier one left down."""
    cluster = RabbitCluster()
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


async def test_client_connects_past_a_node_that_is_down(amqp_settings: AMQPSettings) -> None:
    """The shared server as a 'cluster' whose first node refuses: the connection takes the next."""
    closed = amqp_settings.urls[0].replace(":5672/", ":9/")
    settings = amqp_settings.model_copy(
        update={"amqp_url": SecretStr(f"{closed},{amqp_settings.urls[0]}")}
    )
    async with AMQPBroker(settings, name=f"cluster-{uuid.uuid4().hex[:8]}") as broker:
        assert broker.node is not None
        assert broker.node.endswith(":5672/")
        assert broker.is_connected


async def test_publishing_and_consuming_go_on_through_the_loss_of_the_node(
    rabbit: RabbitCluster,
) -> None:
    """Publishes in flight when the node dies are confirmed on another (none fails, none is
    lost); the consumer is restored there and gets every message."""
    await rabbit.heal()
    prefix = f"cluster-{uuid.uuid4().hex[:10]}"
    settings = AMQPSettings(
        amqp_url=SecretStr(rabbit.amqp_urls()), prefix=prefix, reconnect_interval=0.3
    )
    async with AMQPBroker(settings, name=f"{prefix}-broker") as broker:
        queue = broker.topology.work_queue("work", events=["job.#"])
        await broker.declare(queue)
        seen: set[int] = set()

        async def record(message: Ping | Pong, meta: IncomingMeta) -> None:
            seen.add(message.n)

        await broker.consume(queue, MESSAGES, record)

        async def publish_steadily(count: int) -> None:
            for n in range(count):
                await broker.publish(broker.topology.events, "job.x", Ping(n=n))
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as group:
            group.start_soon(publish_steadily, 300)
            await anyio.sleep(0.5)
            [(node_name, _)] = await rabbit.connection_nodes(f"{prefix}-broker")
            node = rabbit.node_named(node_name)
            assert node is rabbit.nodes[0]  # the first URL
            await rabbit.kill(node)

        async def moved() -> bool:
            # At least once: RabbitMQ 3.10 may close a fresh connection once more (541,
            # INTERNAL_ERROR) while a quorum queue elects its leader; it moves on again.
            where = broker.node
            return (
                broker.reconnections >= 1
                and broker.is_connected
                and where is not None
                and f":{node.amqp_port}/" not in where
            )

        await eventually(moved, "the connection restored on another node")

        async def all_seen() -> bool:
            return seen == set(range(300))

        await eventually(all_seen, "all 300 seen (duplicates allowed)")
        assert (await broker.check()).dead_letters == 0
        print(f"reconnections: {broker.reconnections}")
        await rabbit.restart(node)


async def test_jobs_complete_exactly_once_while_the_daemons_node_is_killed_then_another(
    rabbit: RabbitCluster,
    seaweed: LocalSeaweed,
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await rabbit.heal()
    # The operator's set-up (LocalCluster) reads PARJOBS_AMQP_URL: every node, the first first.
    monkeypatch.setenv("PARJOBS_AMQP_URL", rabbit.amqp_urls())
    tag = uuid.uuid4().hex[:10]
    root = f"cluster-{tag}/"
    daemons = LocalCluster(
        seaweed.settings,
        prefix=f"cluster-{tag}",
        overrides={"PARJOBS_DATA_ROOT": root, "PARJOBS_MAX_RUNS": "4"},
        management=rabbit.management,
        ready_timeout=60,
    )
    user = KeyPair.generate("cluster-user")
    started = time.monotonic()
    try:
        await daemons.start()
        print(f"daemons ready in {time.monotonic() - started:.1f}s")
        user_amqp = await daemons.add_user(ACCOUNT, user.public)
        await Accounts(store, JobKeys(root)).deposit(ACCOUNT, Decimal(10_000))
        # The user's client tries the nodes in the daemons' order, with a dead one second: its
        # node is killed with theirs, and its reply and events queues are gone for seconds
        # while jobs run and end.
        async with (
            AMQPBroker(with_a_dead_node_second(user_amqp), name=f"cluster-client-{tag}") as broker,
            AMQPBroker(daemons.operator_amqp, name=f"cluster-operator-{tag}") as operator,
            ParjobsClient(broker, user, service_keys=daemons.service_keys) as client,
        ):
            harness = Harness(daemons, broker, operator, client, store, root, user)
            await _jobs_through_two_node_losses(harness, rabbit)
    finally:
        await daemons.stop()
        await store.delete_prefix(root)


async def _daemon_nodes(rabbit: RabbitCluster, daemons: LocalCluster) -> dict[str, str | None]:
    """The node each daemon's connection is on, by role (None: it has none right now); each
    daemon names its connection after its pid."""
    connections = await rabbit.connection_nodes('{"connection_name","parjobs-')
    where: dict[str, str | None] = {}
    for role in ROLES:
        marker = f'{{"connection_name","parjobs-{role}-{daemons.pid(role)}"}}'
        found = [node for node, properties in connections if marker in properties]
        assert len(found) <= 1, f"{role} has {len(found)} connections: {found}"
        where[role] = found[0] if found else None
    return where


def with_a_dead_node_second(settings: AMQPSettings) -> AMQPSettings:
    """`settings` with a node that never answers second in the list, and `CLIENT_RECONNECT_S`
    between attempts."""
    urls = settings.urls
    dead = str(URL(urls[0]).with_port(9))
    return settings.model_copy(
        update={
            "amqp_url": SecretStr(",".join([urls[0], dead, *urls[1:]])),
            "reconnect_interval": CLIENT_RECONNECT_S,
        }
    )


async def _client_node(rabbit: RabbitCluster, harness: Harness) -> str | None:
    """The node the client's connection is on (None: it has none right now)."""
    name = harness.broker.name
    found = await rabbit.connection_nodes(f'{{"connection_name","{name}"}}')
    return found[0][0] if found else None


async def _moved_away(harness: Harness, rabbit: RabbitCluster, lost: str) -> bool:
    """Every daemon is ready, connected to a node other than `lost`."""
    for role in ROLES:
        if (await harness.health(role))["status"] != 200:
            return False
    where = await _daemon_nodes(rabbit, harness.cluster)
    return all(node is not None and node != lost for node in where.values())


async def _jobs_through_two_node_losses(harness: Harness, rabbit: RabbitCluster) -> None:
    inputs: dict[str, bytes] = {}
    finished: dict[str, str] = {}  # name -> job uid
    chaos_done = anyio.Event()
    timings: list[str] = []
    started = time.monotonic()

    async def one(name: str) -> None:
        data = payload(500 + 37 * len(inputs), name)
        inputs[name] = data
        sheet = await harness.run_job(data, timeout=JOB_TIMEOUT_S)
        assert sheet.state is JobState.COMPLETED, f"{name}: {sheet.state} {sheet.reason}"
        finished[name] = sheet.job_uid

    async def chaos() -> None:
        await anyio.sleep(2)  # jobs in flight
        for kill in (1, 2):
            where = await _daemon_nodes(rabbit, harness.cluster)
            if kill == 1:  # the daemons and the client were all given the nodes in one order
                assert set(where.values()) == {rabbit.nodes[0].name}, where
                assert await _client_node(rabbit, harness) == rabbit.nodes[0].name
            # A failover may spread them (a node that refuses a restore is passed over too):
            # the node most of them are on.
            [(name, _)] = Counter(node for node in where.values() if node).most_common(1)
            node = rabbit.node_named(name)
            await rabbit.kill(node)
            at = time.monotonic()
            await eventually(
                functools.partial(_moved_away, harness, rabbit, node.name),
                f"every daemon ready on another node than {node.name}",
                timeout=60,
                interval=0.5,
            )
            ready_in = time.monotonic() - at
            client_on = await _client_node(rabbit, harness)
            timings.append(
                f"kill {kill} at {at - started:.1f}s, ready again in {ready_in:.1f}s, "
                f"client on {client_on}"
            )
            if kill == 1:
                await rabbit.restart(node)  # back in the cluster: a majority survives kill 2
        chaos_done.set()

    with anyio.fail_after(240):
        async with anyio.create_task_group() as group:
            group.start_soon(chaos)
            n = 0
            while n < JOBS_AT_MOST and (n < JOBS_AT_LEAST or not chaos_done.is_set()):
                group.start_soon(one, f"job-{n}")
                n += 1
                await anyio.sleep(JOB_INTERVAL_S)

    timings.append(f"{n} jobs, done at {time.monotonic() - started:.1f}s")
    timings.append(f"client reconnections: {harness.broker.reconnections}")
    print("; ".join(timings))
    assert len(finished) == n
    assert len(set(finished.values())) == n
    assert harness.broker.reconnections >= 1  # the client's connection moved too

    # Exactly once: one of each step per job in its log, and the checksum of its own input.
    for name, job_uid in finished.items():
        await harness.check_checksum_job(job_uid, inputs[name])

    # Charged once: one hold and one settlement per job in the whole ledger; the books balance.
    accounts = Accounts(harness.store, JobKeys(harness.root))
    per_job = Counter((tx.job_uid, tx.kind) for tx in await accounts.ledger.read() if tx.job_uid)
    for job_uid in finished.values():
        assert (per_job[(job_uid, "hold")], per_job[(job_uid, "settle")]) == (1, 1), job_uid
    assert await accounts.verify_books() == []

    # Nothing dead-lettered.
    assert await harness.operator.dead_letters() == []
    print(f"checked at {time.monotonic() - started:.1f}s")
