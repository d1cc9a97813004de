"""Expiry through the broker, on the twins: each job's deadline goes round a delay queue to
access, which judges the job by its own log; the sweep is the net for what that missed.

The access logic alone (`on_deadline`, `sweep`) on the in-memory store, then the access daemon on
the in-memory broker: the deadline going round, a forged one refused, an early one delayed again.
"""

from __future__ import annotations

import builtins
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest

from orchestrator import PAR, ObjectWriter
from orchestrator.broker.memory import MemoryBroker
from orchestrator.broker.topology import DELAY_BUCKETS_S, Topology
from orchestrator.core.keys import KeyPair
from orchestrator.core.ledger_rules import settle_tx_id
from orchestrator.core.message_signing import sign_message
from orchestrator.core.pricing import Pricing
from orchestrator.par.issuer import PARIssuer
from orchestrator.services.access import AccessService
from orchestrator.store.base import ObjectInfo, ObjectStore
from orchestrator.store.eventlog import EventLog
from schemas.events import JobEvent, JobState
from schemas.messages import DEADLINES, Envelope, JobDeadline
from tests._forwarding import ForwardingStore
from tests._waiting import eventually
from tests.unit.test_compute import _claim, _start
from tests.unit.test_service_edge import KEYS, World, running_world
from tests.unit.test_services import TIME_LIMIT_S, Services


@pytest.fixture
async def services(store: ObjectStore, prefix: str, http: httpx.AsyncClient) -> Services:
    ready = Services(store, prefix, http)
    await ready.onboard()
    return ready


# --- where a deadline waits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "queue"),
    [
        (timedelta(seconds=-5), "p.delay.0"),  # overdue: at once
        (timedelta(seconds=15.9), "p.delay.0"),
        (timedelta(seconds=16), "p.delay.16"),
        (timedelta(seconds=31.9), "p.delay.16"),
        (timedelta(hours=1), "p.delay.2048"),
        (timedelta(days=7), "p.delay.524288"),
    ],
)
def test_a_deadline_waits_in_the_delay_queue_of_its_bucket(delay: timedelta, queue: str) -> None:
    assert Topology("p").delay_queue(delay).name == queue


def test_every_delay_queue_is_classic_and_dead_letters_to_the_deadlines_queue() -> None:
    topology = Topology("p")
    assert len(topology.delay_queues) == len(DELAY_BUCKETS_S) == 17
    for queue in topology.delay_queues:
        assert queue.arguments() == {
            "x-queue-type": "classic",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "p.deadlines",
        }
        assert queue.bindings == ()
        assert queue.durable


# --- the access logic -----------------------------------------------------------------------------


def _collecting(into: list[JobEvent]) -> Any:
    async def publish(event: JobEvent) -> None:
        into.append(event)

    return publish


async def _submitted(services: Services, lifetime_s: int | None = None) -> JobEvent:
    command = services.submit_command(lifetime_s)
    return (await services.access.submit(command, message_id=uuid.uuid4().hex)).events[0]


async def _past(deadline: datetime) -> None:
    await anyio.sleep(max((deadline - datetime.now(UTC)).total_seconds(), 0) + 0.05)


async def test_a_deadline_expires_a_waiting_job_once(services: Services) -> None:
    submitted = await _submitted(services, lifetime_s=1)
    await _past(submitted.payload.expires_at)  # type: ignore[union-attr]
    published: list[JobEvent] = []
    assert await services.access.on_deadline(submitted.job_uid, _collecting(published)) is None
    assert [event.payload.type for event in published] == ["expired"]
    # The same deadline again (a redelivery, a duplicate publish): nothing more.
    assert await services.access.on_deadline(submitted.job_uid, _collecting(published)) is None
    events = await services.log.read(submitted.job_uid)
    assert [event.payload.type for event in events] == ["submitted", "expired"]
    assert len(published) == 1


async def test_an_early_deadline_asks_to_be_delayed_again(services: Services) -> None:
    submitted = await _submitted(services)  # an hour to live
    published: list[JobEvent] = []
    due = await services.access.on_deadline(submitted.job_uid, _collecting(published))
    assert due == submitted.payload.expires_at  # type: ignore[union-attr]
    assert published == []
    assert (await services.log.load(submitted.job_uid)).state is JobState.SUBMITTED


async def test_a_deadline_for_a_job_never_created_does_nothing(services: Services) -> None:
    published: list[JobEvent] = []
    assert await services.access.on_deadline("f" * 32, _collecting(published)) is None
    assert published == []


async def test_a_deadline_for_a_started_or_ended_job_expires_nothing(services: Services) -> None:
    # (An hour to live: the PARs refuse to open within 30 s of their expiry. Neither the deadline
    # nor how early it came matters once a job has started.)
    submitted = await _submitted(services)
    contracted = await services.storage.on_submitted(submitted)
    assert contracted is not None
    ready = await services.compute.on_storage_contracted(contracted)
    assert ready is not None
    sheet = await services.log.load(submitted.job_uid)
    assert sheet.upload_par is not None
    assert sheet.run_par is not None
    await ObjectWriter(
        PAR(sheet.upload_par), services.user, transport=services.transport
    ).set_object(b"hello\n")
    start = _start(services, PAR(sheet.run_par))
    with services.compute.watching(submitted.job_uid) as handle:
        running = await _claim(services, start, uuid.uuid4().hex)
        assert running.state is JobState.RUNNING
        published: list[JobEvent] = []
        # Started: its calculation's time limit bounds it, not its deadline.
        assert await services.access.on_deadline(submitted.job_uid, _collecting(published)) is None
        assert published == []
        await services.compute.run(running, handle, _collecting([]), services.report)
    assert (await services.log.load(submitted.job_uid)).state is JobState.COMPLETED
    assert not services.access.ledger.holds(settle_tx_id(submitted.job_uid))  # end not settled
    # Ended, and nobody settled it (its end's settlement was lost): settled, nothing published.
    assert await services.access.on_deadline(submitted.job_uid, _collecting(published)) is None
    assert published == []
    assert services.access.ledger.holds(settle_tx_id(submitted.job_uid))
    assert (await services.log.load(submitted.job_uid)).state is JobState.COMPLETED


class _Reads(ForwardingStore):
    """Counts the GETs and LISTs made under the jobs' folder."""

    def __init__(self, inner: ObjectStore, jobs: str) -> None:
        super().__init__(inner)
        self.jobs = jobs
        self.count = 0

    async def get(self, key: str) -> bytes:
        self.count += key.startswith(self.jobs)
        return await self.inner.get(key)

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> builtins.list[ObjectInfo]:
        self.count += prefix.startswith(self.jobs)
        return await self.inner.list(prefix, start_after=start_after)


def _restarted(services: Services, store: ObjectStore) -> AccessService:
    """Another access service on the same store: it remembers nothing (a restart, a replica)."""
    return AccessService(
        store,
        EventLog(store, services.keys.jobs),
        PARIssuer(store, services.registry, name="access"),
        services.keys,
        Pricing(services.calculations, TIME_LIMIT_S),
    )


async def test_the_sweep_expires_a_job_whose_deadline_message_was_lost(
    services: Services, store: ObjectStore
) -> None:
    lost = await _submitted(services, lifetime_s=1)  # no broker here: its deadline never goes
    waiting = await _submitted(services)
    counted = _Reads(store, services.keys.jobs)
    access = _restarted(services, counted)
    await _past(lost.payload.expires_at)  # type: ignore[union-attr]
    published: list[JobEvent] = []
    expired = await access.sweep(_collecting(published))
    assert [event.job_uid for event in expired] == [lost.job_uid]
    assert published == expired
    # It knew neither job: one GET each for its deadline, then the lost one's log (LIST).
    reads = counted.count
    assert reads <= 4
    # Its end was never settled (no `endings` consumer here): the next sweep settles it.
    assert await access.sweep(_collecting(published)) == []
    assert access.ledger.holds(settle_tx_id(lost.job_uid))
    assert published == expired
    # From now on a sweep reads no job's log: the waiting job's deadline is known and to come.
    counted.count = 0
    assert await access.sweep(_collecting(published)) == []
    assert counted.count == 0
    assert (await services.log.load(waiting.job_uid)).state is JobState.SUBMITTED


# --- the access daemon on the broker --------------------------------------------------------------


def _deadlines_queue(world: World) -> str:
    return world.contexts["access"].broker.topology.deadlines.name


def _delay_queue(world: World, delay: timedelta) -> str:
    return world.contexts["access"].broker.topology.delay_queue(delay).name


async def _state(world: World, job_uid: str) -> JobState:
    return (await EventLog(world.store, world.contexts["access"].keys.jobs).load(job_uid)).state


def _deadline(job_uid: str, *, key: KeyPair, signer: str) -> Envelope[Any]:
    body = JobDeadline(job_uid=job_uid, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    envelope: Envelope[Any] = Envelope(sender=signer, body=body)
    signature = sign_message(
        key, signer, message_id=envelope.message_id, sent_at=envelope.sent_at, body=body
    )
    return envelope.model_copy(update={"signature": signature})


async def test_a_deadline_goes_round_the_broker_and_expires_the_job_once() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        job_uid = (await world.submit(alice, lifetime_s=1)).sheet.job_uid

        async def settled() -> bool:
            events = await world.contexts["access"].log.read(job_uid)
            return events[-1].payload.type == "expired" and (
                settle_tx_id(job_uid) in (await world.accounts.ledger.state()).tx_ids
            )

        await eventually(settled, "the job expired and settled", timeout=5, interval=0.05)
        events = await EventLog(world.store, world.contexts["access"].keys.jobs).read(job_uid)
        assert [event.payload.type for event in events].count("expired") == 1
        assert world.server.ready_count(_delay_queue(world, timedelta(seconds=1))) == 0
        assert world.dead_letters() == []


@pytest.mark.parametrize("forgery", ["unsigned", "signed by the user", "access's key, user's"])
async def test_a_forged_deadline_is_refused_and_expires_nothing(forgery: str) -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        job_uid = (await world.submit(alice, lifetime_s=1)).sheet.job_uid
        world.server.queue(_delay_queue(world, timedelta(seconds=1))).ready.clear()  # lost
        await anyio.sleep(1.1)  # past its deadline: a deadline let through would expire it
        # (RabbitMQ lets no user publish there at all: tests/integration/
        # test_broker_permissions.py. The twin does not check permissions, so the checks of
        # the message itself are tested here.)
        sender: MemoryBroker = alice.broker
        if forgery == "unsigned":  # even from access's own broker user
            forged: Envelope[Any] = Envelope(
                sender="access",
                body=JobDeadline(job_uid=job_uid, expires_at=datetime.now(UTC)),
            )
            sender = world.contexts["access"].broker  # type: ignore[assignment]
        elif forgery == "signed by the user":
            forged = _deadline(job_uid, key=alice.key, signer=alice.key.fingerprint)
        else:  # signed with access's key, but sent by a user's broker user
            forged = _deadline(job_uid, key=KEYS["access"], signer="access")
        await sender.publish("", _deadlines_queue(world), forged)

        async def refused() -> bool:
            return len(world.dead_letters()) == 1

        await eventually(refused, "the forged deadline dead-lettered", timeout=5, interval=0.05)
        assert await _state(world, job_uid) is JobState.SUBMITTED
        # The genuine one, from access, does what the forged one could not.
        genuine = _deadline(job_uid, key=KEYS["access"], signer="access")
        await world.contexts["access"].broker.publish("", _deadlines_queue(world), genuine)

        async def expired() -> bool:
            return await _state(world, job_uid) is JobState.EXPIRED

        await eventually(expired, "the job expired", timeout=5, interval=0.05)


async def test_an_early_deadline_is_delayed_again() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        job = (await world.submit(alice)).sheet  # an hour to live
        delay = _delay_queue(world, job.expires_at - datetime.now(UTC))
        assert world.server.ready_count(delay) == 1  # the deadline its admission sent
        early = _deadline(job.job_uid, key=KEYS["access"], signer="access")
        await world.contexts["access"].broker.publish("", _deadlines_queue(world), early)

        async def delayed() -> bool:
            return world.server.ready_count(delay) == 2

        await eventually(delayed, "the deadline delayed again", timeout=5, interval=0.05)
        again = DEADLINES.envelope.validate_json(world.server.queue(delay).ready[-1].body).body
        assert again.expires_at == job.expires_at  # due as the job's own log says
        assert await _state(world, job.job_uid) is not JobState.EXPIRED
        assert world.dead_letters() == []
