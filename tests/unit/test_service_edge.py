"""The daemons at the edge, on the twins (MemoryBroker + MemoryObjectStore, no server): who may ask
what, signed replies, sealed events, ownership, stops as messages, readiness.

Each test runs the real daemon set-ups (`workers.daemons`) on one in-memory broker, connected as
their roles, with requests sent as a user's broker connection would send them: signed (or not,
or forged), with a reply queue in a namespace (theirs, or another's).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anyio
from pydantic import TypeAdapter

from orchestrator.broker.identities import Identities, Role
from orchestrator.broker.memory import MemoryBroker, MemoryServer
from orchestrator.core.chain import seal_event, verify_event
from orchestrator.core.keys import KeyPair
from orchestrator.core.layout import JobKeys
from orchestrator.core.message_signing import sign_message, verify_message
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import JobNotFoundError, ObjectStoreError, PARNotFoundError
from orchestrator.services.accounts import Accounts
from orchestrator.settings import AMQPSettings, ServiceSettings
from orchestrator.store.eventlog import EventLog
from orchestrator.store.memory import MemoryObjectStore
from schemas.events import JobEvent, JobRequest, JobState, Progress
from schemas.messages import (
    ACCESS_RESPONSES,
    Envelope,
    ErrorReply,
    EventPublished,
    GetJob,
    GetOutputs,
    GetPARState,
    JobReply,
    MessageBody,
    PARStateReply,
    SubmitJob,
)
from schemas.signing import SERVICE_ROLES, ServiceRole
from tests._forwarding import ForwardingStore
from tests._waiting import eventually
from workers.daemons import setup_access, setup_storage
from workers.runtime import ServiceContext, keep_consuming, readiness

KEYS = {role: KeyPair.generate(role) for role in SERVICE_ROLES}
SERVICE_KEYS = ServiceKeys({role: key.public for role, key in KEYS.items()})
SETTINGS = AMQPSettings(prefix="unit-edge")
ANY_ENVELOPE = TypeAdapter(Envelope)


@dataclass
class User:
    """A registered user's broker connection and key, sending requests as a client does."""

    name: str
    key: KeyPair
    broker: MemoryBroker
    ids: Identities
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def reply_queue(self) -> str:
        return self.ids.reply_queue(self.broker.username, self.instance).name

    async def connect(self) -> None:
        await self.broker.declare(
            self.ids.reply_queue(self.broker.username, self.instance), shared=False
        )

    def envelope(self, body: MessageBody, *, signer: KeyPair | None = None) -> Envelope[Any]:
        """`body` in an envelope signed by `signer` (the user's own key by default)."""
        key = signer or self.key
        envelope: Envelope[Any] = Envelope(sender=self.name, body=body)
        signature = sign_message(
            key,
            key.fingerprint,
            message_id=envelope.message_id,
            sent_at=envelope.sent_at,
            body=body,
        )
        return envelope.model_copy(update={"signature": signature})

    async def send(
        self, envelope: Envelope[Any], *, service: str = "access", reply_to: str | None = None
    ) -> str:
        topology = self.broker.topology
        await self.broker.publish(
            topology.commands,
            topology.rpc_routing_key(service),
            envelope,
            reply_to=reply_to or self.reply_queue,
            correlation_id=envelope.message_id,
        )
        return envelope.message_id

    async def ask(self, body: MessageBody, *, service: str = "access") -> Envelope[Any]:
        """Send `body`, signed, and wait for its reply."""
        await self.send(self.envelope(body), service=service)
        return await self.reply()

    async def reply(self) -> Envelope[Any]:
        queue = self.broker.server.queue(self.reply_queue)
        with anyio.fail_after(5):
            while not queue.ready:
                await anyio.sleep(0.01)
        message = queue.ready.popleft()
        reply: Envelope[Any] = ACCESS_RESPONSES.envelope.validate_json(message.body)
        assert message.user_id == self.ids.role_username(Role.ACCESS)
        return reply

    def replies_waiting(self) -> int:
        return len(self.broker.server.queue(self.reply_queue).ready)


@dataclass
class World:
    server: MemoryServer
    store: MemoryObjectStore
    ids: Identities
    contexts: dict[str, ServiceContext]
    accounts: Accounts

    def connect(self, username: str) -> MemoryBroker:
        return MemoryBroker(SETTINGS, server=self.server, username=username)

    async def user(self, name: str, *, registered: bool = True) -> User:
        key = KeyPair.generate(name)
        if registered:
            await self.accounts.add_user(name, key.public)
            await self.accounts.deposit(name, Decimal(100))
        broker = self.connect(self.ids.user_username(name))
        await broker.connect()
        user = User(name, key, broker, self.ids)
        await user.connect()
        return user

    async def submit(self, user: User, *, lifetime_s: int | None = None) -> JobReply:
        request = JobRequest(calculation="checksum")
        cheque = write_cheque(
            user.key,
            payer=user.name,
            recipient="access",
            max_spend=Decimal(5),
            resource=request_fingerprint(request),
            lifetime=timedelta(hours=1),
        )
        submit = SubmitJob(
            request=request,
            authorisation=sign_authorisation(user.key, request),
            cheque=cheque,
            lifetime_s=lifetime_s,
        )
        reply = (await user.ask(submit)).body
        assert isinstance(reply, JobReply), reply
        return reply

    def dead_letters(self) -> list[Any]:
        dlq = self.server.queue(self.contexts["access"].broker.topology.dead_letter_queue.name)
        return list(dlq.ready)


@asynccontextmanager
async def running_world() -> AsyncIterator[World]:
    """The topology declared by the operator, and access and storage running as their roles."""
    server = MemoryServer()
    store = MemoryObjectStore()
    ids = Identities(MemoryBroker(SETTINGS).topology)
    operator = MemoryBroker(SETTINGS, server=server, username=ids.role_username(Role.OPERATOR))
    async with operator:
        await operator.declare(*[q for qs in ids.service_queues().values() for q in qs])
        contexts: dict[str, ServiceContext] = {}
        roles: tuple[ServiceRole, ...] = ("access", "storage")
        for role in roles:
            broker = MemoryBroker(SETTINGS, server=server, username=ids.role_username(Role(role)))
            await broker.connect()
            contexts[role] = ServiceContext(
                role=role,
                settings=ServiceSettings(sweep_interval_s=60),
                store=store,
                broker=broker,
                keys=JobKeys(),
                key=KEYS[role],
                service_keys=SERVICE_KEYS,
            )
        world = World(server, store, ids, contexts, Accounts(store, JobKeys()))
        async with anyio.create_task_group() as group:
            await setup_access(contexts["access"], group)
            await setup_storage(contexts["storage"], group)
            yield world
            group.cancel_scope.cancel()
        for context in contexts.values():
            await context.broker.close()


def _error(reply: Envelope[Any]) -> ErrorReply:
    assert isinstance(reply.body, ErrorReply), reply.body
    return reply.body


# --- requests: who sent it, who signed it --------------------------------------------------------


async def test_a_signed_request_gets_a_reply_signed_by_the_role_it_asked() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        job = await world.submit(alice)
        reply = await alice.ask(GetJob(job_uid=job.sheet.job_uid))
        assert isinstance(reply.body, JobReply)
        assert reply.body.sheet.owner == "alice"
        signer = verify_message(
            reply.signature,
            message_id=reply.message_id,
            sent_at=reply.sent_at,
            body=reply.body,
            keys=SERVICE_KEYS.keys_for("access"),
            now=datetime.now(UTC),
            window=timedelta(seconds=30),
        )
        assert signer == "access"


async def test_unsigned_and_forged_requests_are_refused_with_their_own_errors() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        unsigned: Envelope[Any] = Envelope(sender="alice", body=GetJob(job_uid="a" * 32))
        await alice.send(unsigned)
        assert _error(await alice.reply()).code == "signature.missing"

        signed = alice.envelope(GetJob(job_uid="a" * 32))
        assert signed.signature is not None
        tampered = signed.signature.signature[:-1] + bytes([signed.signature.signature[-1] ^ 1])
        forged = signed.model_copy(
            update={"signature": signed.signature.model_copy(update={"signature": tampered})}
        )
        await alice.send(forged)
        assert _error(await alice.reply()).code == "signature.forged"

        stale = Envelope(
            sender="alice",
            body=GetJob(job_uid="a" * 32),
            sent_at=datetime.now(UTC) - timedelta(hours=1),
        )
        signature = sign_message(
            alice.key,
            alice.key.fingerprint,
            message_id=stale.message_id,
            sent_at=stale.sent_at,
            body=stale.body,
        )
        await alice.send(stale.model_copy(update={"signature": signature}))
        assert _error(await alice.reply()).code == "signature.stale"

        stranger = KeyPair.generate("stranger")  # a key nobody registered
        await alice.send(alice.envelope(GetJob(job_uid="a" * 32), signer=stranger))
        assert _error(await alice.reply()).code == "signature.unknown_signer"


async def test_a_request_signed_by_one_user_and_sent_by_another_is_refused() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        mallory = await world.user("mallory")
        job = await world.submit(alice)
        # Mallory replays a request alice signed, through her own broker connection.
        captured = alice.envelope(GetJob(job_uid=job.sheet.job_uid, with_events=True))
        await mallory.send(captured)
        error = _error(await mallory.reply())
        assert error.code == "auth.requester_mismatch"
        assert "alice" in error.message
        assert "mallory" in error.message


async def test_a_request_from_no_user_or_to_anothers_queue_is_not_answered() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        mallory = await world.user("mallory")
        # From a broker user who is no user at all (a service's own connection).
        storage = world.contexts["storage"].broker
        topology = storage.topology
        await storage.publish(
            topology.commands,
            topology.rpc_routing_key("access"),
            alice.envelope(GetJob(job_uid="a" * 32)),
            reply_to=alice.reply_queue,
        )
        # Asking for the reply to land in alice's queue.
        sent = await mallory.send(
            mallory.envelope(GetJob(job_uid="a" * 32)), reply_to=alice.reply_queue
        )

        async def both_dead_lettered() -> bool:
            return len(world.dead_letters()) == 2

        await eventually(both_dead_lettered, "both requests are dead-lettered", timeout=5)
        reasons = [letter.headers["x-parjobs-reason"] for letter in world.dead_letters()]
        assert "no registered user" in reasons[0]
        assert "not mallory's" in reasons[1]
        assert sent in reasons[1]
        assert (alice.replies_waiting(), mallory.replies_waiting()) == (0, 0)


async def test_a_broker_user_whose_key_is_not_registered_is_refused() -> None:
    async with running_world() as world:
        ghost = await world.user("ghost", registered=False)
        await ghost.send(ghost.envelope(GetJob(job_uid="a" * 32)))
        assert _error(await ghost.reply()).code == "signature.unknown_signer"


# --- ownership -----------------------------------------------------------------------------------


async def test_another_users_job_is_answered_exactly_as_a_missing_one() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        mallory = await world.user("mallory")
        job_uid = (await world.submit(alice)).sheet.job_uid
        missing_uid = "f" * 32
        for body in (GetJob, GetOutputs):
            foreign = _error(await mallory.ask(body(job_uid=job_uid)))
            absent = _error(await mallory.ask(body(job_uid=missing_uid)))
            assert foreign.code == absent.code == JobNotFoundError.code
            assert foreign.message == absent.message.replace(missing_uid, job_uid)
            assert foreign.details == absent.details
        # Alice still sees her own job.
        assert isinstance((await alice.ask(GetJob(job_uid=job_uid))).body, JobReply)


async def test_another_users_par_is_answered_exactly_as_an_unknown_one() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        mallory = await world.user("mallory")
        job_uid = (await world.submit(alice)).sheet.job_uid

        async def contracted() -> bool:
            sheet = await world.contexts["access"].log.load(job_uid)
            return sheet.state is JobState.STORAGE_CONTRACTED

        await eventually(contracted, "storage contracted the job", timeout=5)
        sheet = await world.contexts["access"].log.load(job_uid)
        assert sheet.upload_par is not None
        uid = sheet.upload_par.uid
        mine = (await alice.ask(GetPARState(uid=uid))).body
        assert isinstance(mine, PARStateReply)
        foreign = _error(await mallory.ask(GetPARState(uid=uid)))
        absent = _error(await mallory.ask(GetPARState(uid="e" * 32)))
        assert foreign.code == absent.code == PARNotFoundError.code
        assert foreign.message == absent.message.replace("e" * 32, uid)


async def test_a_submission_is_authorised_only_by_the_key_that_signs_the_request() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        mallory = await world.user("mallory")
        request = JobRequest(calculation="checksum")
        cheque = write_cheque(
            mallory.key,
            payer="mallory",
            recipient="access",
            max_spend=Decimal(5),
            resource=request_fingerprint(request),
            lifetime=timedelta(hours=1),
        )
        # Alice's authorisation, in a submission mallory signs and sends (and pays for).
        stolen = SubmitJob(
            request=request, authorisation=sign_authorisation(alice.key, request), cheque=cheque
        )
        assert _error(await mallory.ask(stolen)).code == "auth.requester_mismatch"
        assert await world.contexts["access"].log.job_uids() == []


# --- events: sealed, routed by owner, checked at consume ------------------------------------------


async def test_events_are_sealed_by_their_role_and_routed_by_their_owner() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        job_uid = (await world.submit(alice)).sheet.job_uid
        stream = world.server.stream(world.ids.topology.events_stream.name)

        async def two_events() -> bool:
            return len(stream.records) == 2

        await eventually(two_events, "submitted and storage_contracted are published", timeout=5)
        owner = world.ids.user_username("alice")
        for record, (kind, role) in zip(
            stream.records,
            [("submitted", "access"), ("storage_contracted", "storage")],
            strict=True,
        ):
            assert record.routing_key == world.ids.event_routing_key(owner, job_uid, kind)
            assert record.user_id == world.ids.role_username(Role(role))
            body = ANY_ENVELOPE.validate_json(record.body).body
            assert isinstance(body, EventPublished)
            assert verify_event(body.event, SERVICE_KEYS) == role


async def test_storage_forgets_a_job_it_has_contracted_and_published() -> None:
    """Its memory grows with the jobs it is contracting, not with every job it has seen."""
    async with running_world() as world:
        alice = await world.user("alice")
        job_uid = (await world.submit(alice)).sheet.job_uid
        stream = world.server.stream(world.ids.topology.events_stream.name)

        async def contracted() -> bool:
            return len(stream.records) == 2

        await eventually(contracted, "storage_contracted is published", timeout=5)
        await anyio.wait_all_tasks_blocked()
        assert world.contexts["storage"].log.remembered(job_uid) == []


async def test_a_forged_event_is_refused_by_its_consumer_and_acts_on_nothing() -> None:
    async with running_world() as world:
        alice = await world.user("alice")
        job_uid = (await world.submit(alice)).sheet.job_uid
        log = EventLog(world.store, JobKeys().jobs)
        events = await log.read(job_uid)

        async def contracted() -> bool:
            return len(await log.read(job_uid)) == 2

        await eventually(contracted, "storage contracted the job", timeout=5)
        logged = await log.read(job_uid)
        # A `progress` sealed with a key that is no role's, and one unsigned: neither is taken.
        mallory_key = KeyPair.generate("mallory")
        draft = JobEvent(job_uid=job_uid, seq=3, actor="compute", payload=Progress(message="x"))
        forged = seal_event(draft, logged[-1], mallory_key, "compute")
        submitted_again = events[0].model_copy(update={"signature": None, "signer": None})
        storage_queue = world.ids.service_queues()[Role.STORAGE][0].name
        for event in (forged, submitted_again):
            body = Envelope(sender="mallory", body=EventPublished(event=event))
            world.server.publish_bytes("", storage_queue, body.model_dump_json().encode())

        async def refused() -> bool:
            return len(world.dead_letters()) == 2

        await eventually(refused, "both events are dead-lettered", timeout=5)
        reasons = sorted(letter.headers["x-parjobs-reason"] for letter in world.dead_letters())
        assert "signature.forged" in reasons[0]
        assert "signature.missing" in reasons[1]
        assert await log.read(job_uid) == logged


# --- readiness -----------------------------------------------------------------------------------


async def test_readiness_reports_a_deleted_queue_until_its_consumer_is_back() -> None:
    async with running_world() as world:
        storage = world.contexts["storage"]
        assert (await readiness(storage.broker, world.store))["ready"] is True
        (queue,) = world.ids.service_queues()[Role.STORAGE]
        world.server.delete_queue(queue.name)  # as anyone allowed to delete it might
        lost = await readiness(storage.broker, world.store)
        assert lost["ready"] is False
        assert lost["problems"] == [f"not consuming {queue.name}"]
        async with anyio.create_task_group() as group:
            group.start_soon(keep_consuming, storage.broker)

            async def ready() -> bool:
                return (await readiness(storage.broker, world.store))["ready"] is True

            await eventually(ready, "the queue is declared again and consumed", timeout=5)
            group.cancel_scope.cancel()
        # The restored consumer works: a new job is contracted.
        alice = await world.user("alice")
        job_uid = (await world.submit(alice)).sheet.job_uid

        async def contracted() -> bool:
            sheet = await storage.log.load(job_uid)
            return sheet.state is JobState.STORAGE_CONTRACTED

        await eventually(contracted, "storage contracts the new job", timeout=5)


class _UnreachableStore(ForwardingStore):
    async def check(self) -> None:
        raise ObjectStoreError("S3 request for 'parjobs' failed: connection refused")


async def test_readiness_checks_the_object_store_too() -> None:
    async with running_world() as world:
        storage = world.contexts["storage"]
        answer = await readiness(storage.broker, _UnreachableStore(world.store))
        assert answer["ready"] is False
        assert answer["problems"] == [
            "the object store does not answer: S3 request for 'parjobs' failed: connection refused"
        ]
