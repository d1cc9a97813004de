"""The hostile user, end to end: mallory, a registered user with her own broker credentials and key,
tries every attack of issue 8 on alice, against the three daemons (LocalCluster), the real RabbitMQ
and SeaweedFS. Each attack is refused by the broker or by a service with a specific error, and
alice's job is unaffected.

1 reading alice's job; 2 reading or using her run commands; 3 forging a reply; 4 publishing an
event (and replay still agrees); 5 deleting a service queue; 6 paying with another's cheque;
8 replay after all of it; 9 alice learns of her job from events, never by polling (her requests,
counted); 10 listening to or forging her run's progress. 7 (escaping the calculation sandbox) is
tests/unit/test_sandbox.py's.

Where "an insider" forges (a reply, an event), it is the operator's broker user, the one party
besides the services RabbitMQ lets write into a user's queues and onto the events exchange: what
alice's client then does is checked against the operator's service keys, not the broker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused
from pydantic import BaseModel

from orchestrator import PAR, BucketReader, KeyPair, ObjectWriter
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import Topology
from orchestrator.client.client import ParjobsClient
from orchestrator.client.inbox import Inbox
from orchestrator.core.chain import seal_event
from orchestrator.core.layout import JobKeys
from orchestrator.core.message_signing import sign_message
from orchestrator.core.run_commands import run_command
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import (
    ChequePayerMismatchError,
    JobNotFoundError,
    PARPermissionError,
    RequesterMismatchError,
)
from orchestrator.par.par import RunControl
from orchestrator.services.accounts import Accounts
from orchestrator.services.replay import replay
from orchestrator.settings import AMQPSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.seaweed import LocalSeaweed
from schemas.auth import Cheque
from schemas.events import Completed, JobEvent, JobRequest, JobState, Progress
from schemas.messages import (
    COMPUTE_RESPONSES,
    Envelope,
    EventPublished,
    ProgressReport,
    RunReply,
)
from tests._waiting import eventually
from workers.cluster import LocalCluster, s3_environment

pytestmark = pytest.mark.integration

CHECKSUM = JobRequest(calculation="checksum")
SPEND = Decimal(2)
FUNDS = Decimal(100)
PASSPHRASE = "hostile test passphrase"
Action = Callable[[AbstractChannel], Awaitable[object]]


@dataclass(frozen=True)
class Party:
    """A registered user: their key, their broker user's settings, their client."""

    name: str
    key: KeyPair
    amqp: AMQPSettings
    broker: AMQPBroker
    client: ParjobsClient

    @property
    def username(self) -> str:
        return self.amqp.username


@dataclass
class Spy:
    """A copy of every request on the commands exchange (the operator may bind one): who sent
    it (its broker-validated user_id) and what it asked."""

    seen: list[tuple[str | None, str]] = field(default_factory=list)

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        self.seen.append((message.user_id, json.loads(message.body)["body"]["type"]))

    def of(self, username: str) -> Counter[str]:
        return Counter(kind for user_id, kind in self.seen if user_id == username)


@dataclass(frozen=True)
class World:
    cluster: LocalCluster
    store: ObjectStore
    root: str
    alice: Party
    mallory: Party
    operator: AMQPBroker
    spy: Spy

    @property
    def identities(self) -> Identities:
        return Identities(self.operator.topology)

    async def ready_job(self, calculation: str = "checksum", **parameters: Any) -> tuple[str, PAR]:
        """An alice job, contracted: (job uid, run PAR); its input (b"input") uploaded."""
        request = JobRequest(calculation=calculation, parameters=parameters)
        client = self.alice.client
        job_uid, upload, run, _ = await client.request_services(
            request, account="alice", max_spend=SPEND
        )
        await ObjectWriter(upload, self.alice.key).set_object(b"input\n")
        return job_uid, run

    async def running_job(self, seconds: float) -> tuple[str, RunControl]:
        """An alice `sleep` job, started."""
        job_uid, run = await self.ready_job("sleep", seconds=seconds)
        control = run.execute(self.alice.key, control=self.alice.client)
        assert (await control.start()).accepted
        return job_uid, control

    async def balances(self) -> tuple[Decimal, Decimal]:
        accounts = Accounts(self.store, JobKeys(self.root))
        return await accounts.balance("alice"), await accounts.balance("mallory")


@pytest.fixture(scope="module")
async def world(seaweed: LocalSeaweed, store: ObjectStore) -> AsyncIterator[World]:
    tag = uuid.uuid4().hex[:10]
    root = f"hostile-{tag}/"
    cluster = LocalCluster(
        seaweed.settings,
        prefix=f"hostile-{tag}",
        overrides={"PARJOBS_DATA_ROOT": root, "PARJOBS_SWEEP_INTERVAL_S": "3600"},
        delete_topology=True,  # stop() deletes the prefix's queues, exchanges and broker users
    )
    try:
        await cluster.start()
        async with AsyncExitStack() as stack:
            parties = {}
            for name in ("alice", "mallory"):
                key = KeyPair.generate(name)
                amqp = await cluster.add_user(name, key.public)
                await Accounts(store, JobKeys(root)).deposit(name, FUNDS)
                broker = AMQPBroker(amqp, name=f"hostile-{name}-{tag}")
                await stack.enter_async_context(broker)
                client = ParjobsClient(broker, key, service_keys=cluster.service_keys, timeout=30)
                await stack.enter_async_context(client)
                parties[name] = Party(name, key, amqp, broker, client)
            operator = AMQPBroker(cluster.operator_amqp, name=f"hostile-operator-{tag}")
            await stack.enter_async_context(operator)
            spy = Spy()
            await stack.enter_async_context(spying(cluster.operator_amqp, spy))
            yield World(cluster, store, root, parties["alice"], parties["mallory"], operator, spy)
    finally:
        await cluster.stop()
        await store.delete_prefix(root)


@asynccontextmanager
async def spying(operator: AMQPSettings, spy: Spy) -> AsyncIterator[None]:
    """`spy` takes a copy of every request, on a queue of the operator's bound to each RPC key."""
    topology = Topology(operator.prefix, operator.delivery_limit)
    connection = await aio_pika.connect(operator.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        name = f"{Identities(topology).client_namespace(operator.username)}.spy"
        queue = await channel.declare_queue(name, exclusive=True)
        for service in ("access", "compute", "runs"):
            await queue.bind(topology.commands.name, topology.rpc_routing_key(service))
        await queue.consume(spy, no_ack=True)
        yield


async def assert_refused(amqp: AMQPSettings, action: Action, *, what: str) -> None:
    """`action`, on a connection of `amqp`'s broker user, is refused by RabbitMQ itself (403)."""
    connection = await aio_pika.connect(amqp.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused) as refusal:
            await action(channel)
    assert f"ACCESS_REFUSED - access to {what}" in str(refusal.value)
    assert f"refused for user '{amqp.username}'" in str(refusal.value)


def publish(exchange: str, routing_key: str, body: BaseModel) -> Action:
    async def action(channel: AbstractChannel) -> object:
        target = (
            channel.default_exchange
            if not exchange
            else await channel.get_exchange(exchange, ensure=False)
        )
        message = aio_pika.Message(body.model_dump_json().encode())
        return await target.publish(message, routing_key, mandatory=False)

    return action


def signed_by(party: Party, body: BaseModel) -> Envelope:
    """An envelope of `body`, signed by `party`'s key, as her client signs a request."""
    envelope = Envelope(sender="client", body=body)
    signature = sign_message(
        party.key,
        party.key.fingerprint,
        message_id=envelope.message_id,
        sent_at=envelope.sent_at,
        body=body,
    )
    return envelope.model_copy(update={"signature": signature})


def same_refusal(about: Exception, job_uid: str, missing: Exception, other_uid: str) -> bool:
    """Whether two refusals say the same, the uids they name aside: no existence leak."""
    return str(about).replace(job_uid, "<uid>") == str(missing).replace(other_uid, "<uid>")


# --- 1: another's job is "not found" ----------------------------------------------------------


async def test_1_mallory_reads_alice_job_as_one_that_does_not_exist(world: World) -> None:
    job_uid, _ = await world.ready_job()
    nobodys = uuid.uuid4().hex
    mallory = world.mallory.client
    asks: list[Callable[[str], Awaitable[object]]] = [
        lambda uid: mallory.job(uid, with_events=True),
        mallory.outputs,
        mallory.events,
        lambda uid: mallory.wait_until(uid, frozenset({JobState.COMPLETED}), timeout=10),
    ]
    for ask in asks:
        with pytest.raises(JobNotFoundError) as about_alices:
            await ask(job_uid)
        with pytest.raises(JobNotFoundError) as about_none:
            await ask(nobodys)
        assert same_refusal(about_alices.value, job_uid, about_none.value, nobodys)
    # Nor may she listen to alice's events: RabbitMQ refuses the binding.
    alices_events = world.identities.events_of_owner(world.alice.username)
    events = world.operator.topology.events.name
    own = world.identities.events_queue(world.mallory.username, uuid.uuid4().hex)

    async def listen(channel: AbstractChannel) -> object:
        queue = await channel.declare_queue(own.name, exclusive=True)
        return await queue.bind(events, alices_events)

    await assert_refused(
        world.mallory.amqp, listen, what=f"topic '{alices_events}' in exchange '{events}'"
    )
    assert (await world.alice.client.job(job_uid)).sheet.state is JobState.READY


# --- 2: run commands: unreadable on the broker, sealed for compute and alice ---------------------


async def test_2_mallory_can_neither_read_nor_use_alice_run_commands(world: World) -> None:
    topology = world.operator.topology
    for queue in (topology.rpc_queue("runs").name, topology.rpc_queue("compute").name):

        async def take(channel: AbstractChannel, queue: str = queue) -> object:
            return await (await channel.get_queue(queue, ensure=False)).get(no_ack=True)

        await assert_refused(world.mallory.amqp, take, what=f"queue '{queue}'")
    own = world.identities.events_queue(world.mallory.username, uuid.uuid4().hex)
    commands = topology.commands.name

    async def overhear(channel: AbstractChannel) -> object:
        queue = await channel.declare_queue(own.name, exclusive=True)
        return await queue.bind(commands, topology.rpc_routing_key("runs"))

    await assert_refused(world.mallory.amqp, overhear, what=f"exchange '{commands}'")

    job_uid, control = await world.running_job(seconds=4)
    # Alice's stop as her client seals it, copied into a request of mallory's: it does not open.
    alices_stop = run_command(
        "stop",
        control.run_url,
        job_uid=job_uid,
        requester=world.alice.key.fingerprint,
        compute=world.cluster.service_keys.current("compute"),
    )
    inbox = Inbox(world.mallory.broker, world.cluster.service_keys)
    await inbox.start()
    try:
        reply = await inbox.call(
            "compute",
            "compute",
            signed_by(world.mallory, alices_stop),
            COMPUTE_RESPONSES.envelope,
            timeout=30,
        )
    finally:
        await inbox.close()
    assert reply.body.type == "error"
    assert reply.body.code == PARPermissionError.code
    # Even holding alice's run capability in the clear, sealed for herself: not her job.
    for action in ("stop", "status"):
        with pytest.raises(JobNotFoundError):
            await world.mallory.client.run_command(action, job_uid, control.run_url)
    final = await control.wait(timeout=60)
    assert (final.job_uid, final.state) == (job_uid, "completed")
    assert "cancelled" not in {
        event.payload.type for event in await world.alice.client.events(job_uid)
    }


# --- 3: a forged reply -----------------------------------------------------------------------


class Forging(AMQPBroker):
    """Alice's connection, where an insider slips a forged reply into her reply queue with the
    correlation id of each request, before the request itself is sent."""

    forge: Callable[[str, str], Awaitable[None]] | None = None

    async def publish(self, *args: Any, **kwargs: Any) -> str:
        if self.forge is not None and kwargs.get("correlation_id") and kwargs.get("reply_to"):
            await self.forge(kwargs["reply_to"], kwargs["correlation_id"])
        return await super().publish(*args, **kwargs)


async def test_3_a_forged_reply_is_refused_by_the_broker_and_ignored_by_alice(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    forged_done = RunReply(job_uid="0" * 32, state="completed", accepted=True)
    alices_replies = world.identities.reply_queue(world.alice.username, "x" * 32).name
    await assert_refused(
        world.mallory.amqp, publish("", alices_replies, forged_done), what="exchange 'amq.default'"
    )

    job_uid, control = await world.running_job(seconds=3)
    stranger = KeyPair.generate("compute")
    forgeries: list[Envelope] = []

    async def forge(reply_to: str, correlation_id: str) -> None:
        body = RunReply(job_uid=job_uid, state="completed", accepted=True)
        envelope = Envelope(sender="compute", body=body)
        signature = sign_message(
            stranger,
            "compute",
            message_id=envelope.message_id,
            sent_at=envelope.sent_at,
            body=body,
        )
        forged = envelope.model_copy(update={"signature": signature})
        forgeries.append(forged)
        await world.operator.publish("", reply_to, forged, correlation_id=correlation_id)

    async with (
        Forging(world.alice.amqp, name="hostile-alice-forged") as broker,
        ParjobsClient(broker, world.alice.key, service_keys=world.cluster.service_keys) as alice,
    ):
        broker.forge = forge
        with caplog.at_level(logging.WARNING, "parjobs.client"):
            status = await RunControl(control.par, control.run_url, alice).status()
    assert forgeries, "no forged reply was sent"
    assert (status.job_uid, status.state) == (job_uid, "running")
    assert "dropped a reply" in caplog.text
    assert (await control.wait(timeout=60)).state == "completed"


# --- 4: a published event --------------------------------------------------------------------


async def test_4_an_event_is_refused_by_the_broker_and_a_forged_one_is_ignored(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    job_uid, _ = await world.running_job(seconds=3)
    log = await world.alice.client.events(job_uid)
    claim = JobEvent(
        job_uid=job_uid, seq=log[-1].seq + 1, actor="compute", payload=Completed(summary="forged")
    )
    forged = seal_event(claim, log[-1], KeyPair.generate("compute"), "compute")
    key = world.identities.event_routing_key(world.alice.username, job_uid, "completed")
    events = world.operator.topology.events.name
    published = EventPublished(event=forged)
    await assert_refused(
        world.mallory.amqp,
        publish(events, key, Envelope(sender="x", body=published)),
        what=f"exchange '{events}'",
    )
    # An insider's forgery does reach alice's events queue (and the stream): it is not used.
    states: list[JobState] = []
    with caplog.at_level(logging.WARNING, "parjobs.client"):
        async with aclosing(world.alice.client.watch(job_uid)) as watched:
            async for sheet in watched:  # the first: caught up, and following the job
                if not states:
                    await world.operator.publish(events, key, Envelope(sender="x", body=published))
                states.append(sheet.state)
    assert states[-1] is JobState.COMPLETED
    assert JobState.CANCELLED not in states
    assert forged.event_id not in {
        event.event_id for event in await world.alice.client.events(job_uid)
    }
    assert "does not verify" in caplog.text
    results = await replay(
        EventLog(world.store, JobKeys(world.root).jobs), world.operator, world.cluster.service_keys
    )
    [result] = [result for result in results if result.job_uid == job_uid]
    assert result.ok, result.problems
    assert [rejected.record.event.event_id for rejected in result.rejected] == [forged.event_id]


# --- 5: a service's queue ------------------------------------------------------------------------


async def test_5_mallory_cannot_delete_a_service_queue(world: World) -> None:
    topology = world.operator.topology
    for queue in (topology.rpc_queue("access").name, f"{topology.prefix}.storage"):

        async def delete(channel: AbstractChannel, queue: str = queue) -> object:
            return await channel.queue_delete(queue)

        await assert_refused(world.mallory.amqp, delete, what=f"queue '{queue}'")
    async with httpx.AsyncClient(timeout=5) as http:
        for role in ("access", "storage", "compute"):
            port = world.cluster.health_ports[role]
            assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
    _, run = await world.ready_job()
    assert run.is_executable  # storage and compute still contract alice's jobs


# --- 6: cheques ------------------------------------------------------------------------------


def cheque(payer: Party, request: JobRequest) -> Cheque:
    return write_cheque(
        payer.key,
        payer=payer.name,
        recipient="access",
        max_spend=SPEND,
        resource=request_fingerprint(request),
        lifetime=timedelta(hours=1),
    )


async def test_6_a_cheque_pays_only_for_its_payers_own_job(world: World) -> None:
    before = await world.balances()
    request = JobRequest(calculation="checksum", input_sha256=uuid.uuid4().hex * 2)
    alice, mallory = world.alice, world.mallory
    with pytest.raises(ChequePayerMismatchError):  # mallory's job, alice's cheque
        await mallory.client.submit(
            request, sign_authorisation(mallory.key, request), cheque(alice, request)
        )
    with pytest.raises(ChequePayerMismatchError):  # alice's job, mallory's cheque
        await alice.client.submit(
            request, sign_authorisation(alice.key, request), cheque(mallory, request)
        )
    with pytest.raises(RequesterMismatchError):  # alice's whole submission, sent by mallory
        await mallory.client.submit(
            request, sign_authorisation(alice.key, request), cheque(alice, request)
        )
    assert await world.balances() == before


# --- 9: alice hears of her job's progress; she never polls ------------------------------------


async def test_9_alice_follows_her_job_on_events_without_polling(
    world: World, tmp_path: Path
) -> None:
    alice = world.alice
    world.spy.seen.clear()
    data = b"listen, do not poll\n"
    request = JobRequest(calculation="checksum", input_sha256=hashlib.sha256(data).hexdigest())
    job_uid, upload, run, _ = await alice.client.request_services(
        request, account="alice", max_spend=SPEND
    )
    await ObjectWriter(upload, alice.key).set_object(data)
    control = run.execute(alice.key, control=alice.client)
    await control.start()
    assert (await control.wait(timeout=60)).state == "completed"
    # One submission and one start: every event of a job the client submitted came on its
    # events queue, so it needs no catch-up, and it follows the job from then on.
    expected = Counter({"submit_job": 1, "start_run": 1})

    async def counted() -> bool:
        return world.spy.of(alice.username) == expected

    await eventually(counted, f"alice's requests are {expected}", timeout=10)
    reader = BucketReader(await alice.client.outputs(job_uid), alice.key)
    assert json.loads(await reader.get_object("summary.json"))["size_bytes"] == len(data)

    # The CLI likewise: `parjobs submit` follows the job's events to its end.
    world.spy.seen.clear()
    key_file, input_file = tmp_path / "alice.key", tmp_path / "input.txt"
    alice.key.save(key_file, PASSPHRASE)
    input_file.write_bytes(data)
    env = {
        **os.environ,
        **s3_environment(world.cluster.s3),
        "PARJOBS_PREFIX": world.cluster.prefix,
        "PARJOBS_AMQP_URL": alice.amqp.amqp_url.get_secret_value(),
        "PARJOBS_SERVICE_KEYS_FILE": str(world.cluster.service_keys_file),
        "PARJOBS_PASSPHRASE": PASSPHRASE,
    }
    command = [sys.executable, "-m", "orchestrator.cli", "submit", "checksum", str(input_file)]
    with anyio.fail_after(120):
        submitted = await anyio.run_process(
            [*command, "--key", str(key_file), "--account", "alice"], env=env, check=False
        )
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr).decode()
    assert b"completed" in submitted.stdout
    await eventually(counted, f"the CLI's requests are {expected}", timeout=10)


# --- 10: a run's progress is its owner's alone, and only compute's --------------------------------


async def test_10_progress_reaches_alice_alone_and_only_from_compute(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    job_uid, _ = await world.running_job(seconds=3)  # prints a line a second
    key = world.identities.event_routing_key(world.alice.username, job_uid, "progress")
    events = world.operator.topology.events.name
    own = world.identities.events_queue(world.mallory.username, uuid.uuid4().hex)

    async def listen(channel: AbstractChannel) -> object:
        queue = await channel.declare_queue(own.name, exclusive=True)
        return await queue.bind(events, key)

    # Mallory may neither listen to alice's progress nor publish any.
    await assert_refused(world.mallory.amqp, listen, what=f"topic '{key}' in exchange '{events}'")
    fake = ProgressReport(
        job_uid=job_uid, seq=4, time=datetime.now(UTC), payload=Progress(message="forged")
    )
    envelope = Envelope(sender="compute", body=fake)
    stranger = sign_message(
        KeyPair.generate("compute"),
        "compute",
        message_id=envelope.message_id,
        sent_at=envelope.sent_at,
        body=fake,
    )
    forged = envelope.model_copy(update={"signature": stranger})
    await assert_refused(
        world.mallory.amqp, publish(events, key, forged), what=f"exchange '{events}'"
    )
    # An insider's forgery reaches alice's events queue: it is not used. Compute's reports are.
    updates: list[JobEvent | ProgressReport] = []
    with caplog.at_level(logging.WARNING, "parjobs.client"):
        async with aclosing(world.alice.client.updates(job_uid)) as following:
            async for update in following:
                if not updates:
                    await world.operator.publish(events, key, forged)
                updates.append(update)
    reports = [update for update in updates if isinstance(update, ProgressReport)]
    assert reports, [update.payload.type for update in updates]
    assert all(report.payload.message.startswith("stdout: sleep") for report in reports)
    assert updates[-1].payload.type == "completed"
    assert "dropped a progress report" in caplog.text
    assert "progress" not in [
        event.payload.type for event in await world.alice.client.events(job_uid)
    ]


# --- 8: after every attack, replay agrees ------------------------------------------------------


async def test_8_after_every_attack_replay_finds_no_divergence(world: World) -> None:
    results = await replay(
        EventLog(world.store, JobKeys(world.root).jobs), world.operator, world.cluster.service_keys
    )
    assert results
    assert [result.job_uid for result in results if not result.ok] == []
