"""The client on the twins (MemoryBroker): it signs every request, uses only replies and events that
verify, and waits on its own events queue instead of polling.

The services here are stand-ins that answer as access and compute do (replies signed by their
role's key, events sealed and published under the job owner's routing key): what the client does
with what comes, forged or genuine, is what is under test.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from orchestrator.broker.base import IncomingMeta
from orchestrator.broker.identities import Identities, Role
from orchestrator.broker.memory import MemoryBroker, MemoryServer
from orchestrator.client.client import SENDS, ParjobsClient
from orchestrator.client.jobsheet import JobSheet
from orchestrator.core.chain import seal_event
from orchestrator.core.jobstate import fold
from orchestrator.core.keys import KeyPair
from orchestrator.core.message_signing import sign_message, verify_message
from orchestrator.core.run_commands import open_run_command
from orchestrator.core.signing import sign_authorisation, write_cheque
from orchestrator.errors import (
    ConfigurationError,
    IntegrityError,
    JobCancelledError,
    JobEndedError,
    JobExpiredError,
    JobFailedError,
    JobNotFoundError,
    RequestTimeoutError,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.par.par import PAR
from orchestrator.par.transfer import PARTransport
from orchestrator.settings import AMQPSettings
from orchestrator.store.memory import MemoryObjectStore
from orchestrator.store.registry import PARRegistry
from schemas.events import (
    Completed,
    EventPayload,
    Failed,
    JobEvent,
    JobRequest,
    JobSheetState,
    JobState,
    OutputFile,
    Progress,
    Queued,
    StorageContracted,
    Submitted,
)
from schemas.messages import (
    ACCESS_REQUESTS,
    COMPUTE_REQUESTS,
    RUN_STARTS,
    Envelope,
    EventPublished,
    GetJob,
    GetOutputs,
    GetRunStatus,
    JobReply,
    OutputsReply,
    ProgressReport,
    RunReply,
    StartRun,
    StopRun,
    SubmitJob,
)
from schemas.par import Capability, PARData, PARKind
from schemas.signing import ServiceRole
from tests.unit.test_chain import APPENDED_BY, KEYS, SERVICE_KEYS
from tests.unit.test_jobstate import SAMPLES, SUBMITTED, T0

JOB = "0123456789abcdef" * 2
ALICE = KeyPair.generate("alice")
RUN_URL = f"parjobs-run://compute/{'e' * 32}?token=secret-run-token"
CHECKSUM = JobRequest(calculation="checksum")
READY = frozenset({JobState.READY})


def run_par() -> PAR:
    """A run PAR of job JOB sealed for alice, as compute mints it."""
    return PAR.seal(
        Capability(run_url=RUN_URL),
        kind=PARKind.CALCULATION,
        recipient=ALICE.public,
        issuer="compute",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        is_executable=True,
        resource=JOB,
    )


def sealed(
    types: list[str],
    *,
    after: list[JobEvent] | None = None,
    run: PARData | None = None,
    payloads: Mapping[str, EventPayload] | None = None,
) -> list[JobEvent]:
    """Job JOB's log as the services append it (alice's job; compute_contracted holds `run`):
    `types` sealed one onto the other, continuing the log `after`; each event's payload is the
    sample of its type, or the one `payloads` gives for it."""
    log = list(after or [])
    for seq, name in enumerate(types, start=len(log) + 1):
        payload = (payloads or {}).get(name, SAMPLES[name])
        if isinstance(payload, Submitted):
            payload = payload.model_copy(update={"owner": "alice", "user": ALICE.fingerprint})
        if name == "compute_contracted" and run is not None:
            payload = payload.model_copy(update={"run_par": run})
        role = APPENDED_BY[name]
        unsealed = JobEvent(
            job_uid=JOB, seq=seq, time=T0 + timedelta(seconds=seq), actor=role, payload=payload
        )
        log.append(seal_event(unsealed, log[-1] if log else None, KEYS[role], role))
    return log


def signed_reply(role: ServiceRole, body: BaseModel, key: KeyPair | None = None) -> Envelope:
    """A reply as `role` signs it (with `key` instead of the role's, to forge one)."""
    envelope = Envelope(sender=role, body=body)
    signature = sign_message(
        key or KEYS[role], role, message_id=envelope.message_id, sent_at=envelope.sent_at, body=body
    )
    return envelope.model_copy(update={"signature": signature})


Forge = Callable[[IncomingMeta], Awaitable[None]]


@dataclass
class Services:
    """Access and compute as a client sees them, on the twins."""

    ids: Identities
    access: MemoryBroker
    compute: MemoryBroker
    logs: dict[str, list[JobEvent]] = field(default_factory=dict)
    """What access has stored, by job."""
    requests: list[tuple[Envelope, IncomingMeta]] = field(default_factory=list)
    forge: Forge | None = None
    """Sent before each genuine reply: what a forger slips in with the request's correlation id."""
    on_submit: list[str] = field(default_factory=list)
    """The log a submission makes (appended and published at once)."""
    run: PARData | None = None
    access_answers: bool = True
    """False: access takes requests and answers none (a stopped daemon, as far as a client sees)."""
    payloads: dict[str, EventPayload] = field(default_factory=dict)
    """Payloads the log takes instead of the samples (real PARs, the outputs made), by type."""
    read_par: PARData | None = None
    """What access answers a GetOutputs with."""
    start_reply: RunReply | None = None
    """What compute answers a start with (None: running)."""
    lost_start_replies: int = 0
    """Deliveries of starts whose answers are lost (the first ones): the client hears nothing."""
    claim_lost_starts: bool = False
    """Whether compute claims the run for a start whose answer is lost (logs `queued` for it)."""

    @property
    def kinds(self) -> Counter[str]:
        return Counter(envelope.body.type for envelope, _ in self.requests)

    async def publish(self, event: JobEvent) -> None:
        """Publish `event` as its role does: to the events exchange, under alice's routing key."""
        broker = self.access if event.signer == "access" else self.compute
        key = self.ids.event_routing_key(
            self.ids.user_username("alice"), event.job_uid, event.payload.type
        )
        await broker.publish(
            broker.topology.events, key, Envelope(sender="svc", body=EventPublished(event=event))
        )

    async def _answer(
        self, broker: MemoryBroker, role: ServiceRole, meta: IncomingMeta, body: BaseModel
    ) -> None:
        if self.forge is not None:
            await self.forge(meta)
        await broker.reply(meta, signed_reply(role, body))

    async def on_access(self, envelope: Envelope[Any], meta: IncomingMeta) -> None:
        self.requests.append((envelope, meta))
        if not self.access_answers:
            return
        match envelope.body:
            case GetJob(job_uid=job_uid, with_events=with_events) if job_uid in self.logs:
                log = self.logs[job_uid]
                events = tuple(log) if with_events else ()
                await self._answer(
                    self.access, "access", meta, JobReply(sheet=fold(log), events=events)
                )
            case GetJob(job_uid=job_uid):
                error = JobNotFoundError(f"no job {job_uid} is known here")
                await self._answer(self.access, "access", meta, error.to_reply())
            case GetOutputs() if self.read_par is not None:
                await self._answer(
                    self.access, "access", meta, OutputsReply(read_par=self.read_par)
                )
            case SubmitJob():
                log = self.logs[JOB] = sealed(self.on_submit, run=self.run, payloads=self.payloads)
                await self._answer(self.access, "access", meta, JobReply(sheet=fold(log[:1])))
                for event in log:
                    await self.publish(event)

    async def on_compute(self, envelope: Envelope[Any], meta: IncomingMeta) -> None:
        self.requests.append((envelope, meta))
        if isinstance(envelope.body, StartRun) and self.lost_start_replies:
            self.lost_start_replies -= 1
            if self.claim_lost_starts and self.logs[JOB][-1].payload.type != "queued":
                claim = Queued(start_message_id=envelope.message_id, place=4)
                self.payloads["queued"] = claim
                await self.extend("queued")
            return
        state = "running" if isinstance(envelope.body, StartRun | GetRunStatus) else "cancelled"
        body = RunReply(job_uid=envelope.body.job_uid, state=state, accepted=True)
        if isinstance(envelope.body, StartRun) and self.start_reply is not None:
            body = self.start_reply
        await self._answer(self.compute, "compute", meta, body)

    async def extend(self, *types: str) -> None:
        """Append `types` to JOB's log and publish them."""
        known = len(self.logs[JOB])
        self.logs[JOB] = sealed(
            list(types), after=self.logs[JOB], run=self.run, payloads=self.payloads
        )
        for event in self.logs[JOB][known:]:
            await self.publish(event)


@pytest.fixture
async def world() -> AsyncIterator[tuple[Services, MemoryBroker]]:
    """The services (access, compute) and alice's broker connection, on one MemoryServer."""
    server = MemoryServer()
    settings = AMQPSettings(prefix="unit-client")
    ids = Identities(MemoryBroker(settings).topology)

    def connect(username: str) -> MemoryBroker:
        return MemoryBroker(settings, server=server, username=username)

    async with (
        connect(ids.role_username(Role.OPERATOR)) as operator,
        connect(ids.role_username(Role.ACCESS)) as access,
        connect(ids.role_username(Role.COMPUTE)) as compute,
        connect(ids.user_username("alice")) as alice,
    ):
        topology = operator.topology
        rpc = {name: topology.rpc_queue(name) for name in ("access", "compute", "runs")}
        await operator.declare(*rpc.values())
        services = Services(ids, access, compute, run=run_par().data)
        await access.consume(rpc["access"], ACCESS_REQUESTS.envelope, services.on_access)
        await compute.consume(rpc["compute"], COMPUTE_REQUESTS.envelope, services.on_compute)
        await compute.consume(rpc["runs"], RUN_STARTS.envelope, services.on_compute)
        yield services, alice


@pytest.fixture
async def client(world: tuple[Services, MemoryBroker]) -> AsyncIterator[ParjobsClient]:
    async with ParjobsClient(world[1], ALICE, service_keys=SERVICE_KEYS, timeout=2) as alice:
        yield alice


@pytest.fixture
def services(world: tuple[Services, MemoryBroker]) -> Services:
    return world[0]


# --- requests ------------------------------------------------------------------------------------


async def test_every_request_is_signed_by_the_user_and_answered_to_her_own_queue(
    services: Services, client: ParjobsClient
) -> None:
    services.logs[JOB] = sealed(["submitted"])
    await client.job(JOB)
    await client.run_command("status", JOB, RUN_URL)
    assert services.kinds == Counter({"get_job": 1, "get_run_status": 1})
    for envelope, meta in services.requests:
        signer = verify_message(
            envelope.signature,
            message_id=envelope.message_id,
            sent_at=envelope.sent_at,
            body=envelope.body,
            keys=[ALICE.public],
            now=datetime.now(UTC),
            window=timedelta(seconds=30),
        )
        assert signer == ALICE.fingerprint
        assert meta.user_id == services.ids.user_username("alice")
        assert meta.reply_to is not None
        assert services.ids.owns(services.ids.user_username("alice"), meta.reply_to)


async def test_a_run_command_carries_the_capability_only_sealed_for_compute(
    services: Services, client: ParjobsClient
) -> None:
    control = run_par().execute(ALICE, control=client)
    assert (await control.start()).state == "running"
    assert (await control.stop()).state == "cancelled"
    assert [envelope.body.type for envelope, _ in services.requests] == ["start_run", "stop_run"]
    for envelope, _ in services.requests:
        assert "secret-run-token" not in envelope.model_dump_json()
        assert isinstance(envelope.body, StartRun | StopRun)
        assert envelope.body.job_uid == JOB
        opened = open_run_command(envelope.body, requester=ALICE.fingerprint, key=KEYS["compute"])
        assert opened == RUN_URL


async def test_an_error_reply_is_raised_as_the_services_error(client: ParjobsClient) -> None:
    with pytest.raises(JobNotFoundError, match="no job"):
        await client.job("f" * 32)


def _signed_by_alice(role: ServiceRole, body: BaseModel) -> Envelope:
    envelope = Envelope(sender=role, body=body)
    signature = sign_message(
        ALICE,
        ALICE.fingerprint,
        message_id=envelope.message_id,
        sent_at=envelope.sent_at,
        body=body,
    )
    return envelope.model_copy(update={"signature": signature})


STRANGER = KeyPair.generate("compute")
FORGERIES: dict[str, Callable[[ServiceRole, BaseModel], Envelope]] = {
    "unsigned": lambda role, body: Envelope(sender=role, body=body),
    "signed by a key not the role's": lambda role, body: signed_reply(role, body, STRANGER),
    "signed by another role": lambda role, body: signed_reply("access", body),
    "signed by the user's key": _signed_by_alice,
    "edited after signing": lambda role, body: signed_reply(
        role, RunReply(job_uid=JOB, state="running", accepted=True)
    ).model_copy(update={"body": body}),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_a_forged_reply_is_dropped_and_the_request_waits_for_the_genuine_one(
    services: Services,
    client: ParjobsClient,
    forgery: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    forged_done = RunReply(job_uid=JOB, state="completed", accepted=True)

    async def slip_in(meta: IncomingMeta) -> None:
        await services.compute.reply(meta, FORGERIES[forgery]("compute", forged_done))

    services.forge = slip_in
    reply = await client.run_command("status", JOB, RUN_URL)
    assert reply.state == "running"
    assert "dropped a reply" in caplog.text


async def test_a_request_answered_only_by_forgeries_times_out(
    services: Services, client: ParjobsClient
) -> None:
    async def only_forgeries(meta: IncomingMeta) -> None:
        forged = Envelope(
            sender="compute", body=RunReply(job_uid=JOB, state="completed", accepted=True)
        )
        await services.compute.reply(meta, forged)
        raise anyio.get_cancelled_exc_class()  # the genuine reply never comes

    services.forge = only_forgeries
    with pytest.raises(RequestTimeoutError, match="no reply signed by compute"):
        await client.run_command("status", JOB, RUN_URL)


# --- waiting on events ---------------------------------------------------------------------------


async def test_wait_until_follows_events_after_one_catch_up(
    services: Services, client: ParjobsClient
) -> None:
    services.logs[JOB] = sealed(["submitted"])
    async with anyio.create_task_group() as group:
        result: list[JobState] = []

        async def wait() -> None:
            result.append((await client.wait_until(JOB, READY, timeout=5)).state)

        group.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        await services.extend("storage_contracted")
        await anyio.wait_all_tasks_blocked()
        assert result == []
        await services.extend("compute_contracted")
    assert result == [JobState.READY]
    assert services.kinds == Counter({"get_job": 1})  # the catch-up; then events alone


async def test_watch_yields_each_state_once_in_order_through_copies_and_reordering(
    services: Services, client: ParjobsClient
) -> None:
    services.logs[JOB] = sealed(["submitted"])
    seen: list[tuple[int, JobState]] = []

    async def watch() -> None:
        async for sheet in client.watch(JOB):
            seen.append((sheet.seq, sheet.state))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            await anyio.wait_all_tasks_blocked()
            later = ["storage_contracted", "compute_contracted", "run_started", "progress"]
            full = sealed([*later, "completed"], after=services.logs[JOB])
            services.logs[JOB] = full[:5]
            for event in (full[0], full[1], full[1], full[2], full[4]):  # a copy; 4 after 5
                await services.publish(event)
                await anyio.wait_all_tasks_blocked()
            await services.publish(full[3])
            services.logs[JOB] = full
            await services.publish(full[5])
            await services.publish(full[5])
    assert [seq for seq, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1][1] is JobState.COMPLETED
    # The catch-up, and one more when event 5 came before event 4.
    assert services.kinds == Counter({"get_job": 2})


async def test_a_forged_event_does_not_end_a_wait(
    services: Services, client: ParjobsClient, caplog: pytest.LogCaptureFixture
) -> None:
    services.logs[JOB] = sealed(
        ["submitted", "storage_contracted", "compute_contracted", "run_started"]
    )
    stranger = KeyPair.generate("compute")
    claim = JobEvent(job_uid=JOB, seq=5, actor="compute", payload=Completed(summary="forged"))
    forged = seal_event(claim, services.logs[JOB][-1], stranger, "compute")
    control = run_par().execute(ALICE, control=client)
    async with anyio.create_task_group() as group:
        final: list[RunReply] = []

        async def wait() -> None:
            final.append(await control.wait(timeout=5))

        group.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        await services.publish(forged)
        await anyio.wait_all_tasks_blocked()
        assert final == []
        await services.extend("progress", "failed")
    failed = SAMPLES["failed"]
    assert isinstance(failed, Failed)
    assert [(reply.state, reply.detail) for reply in final] == [("failed", failed.reason)]
    assert "does not verify" in caplog.text
    assert services.kinds == Counter({"get_job": 1})  # no run status polls


async def test_a_job_followed_since_it_was_ready_needs_no_access_to_be_waited_on(
    services: Services, client: ParjobsClient
) -> None:
    services.on_submit = ["submitted", "storage_contracted", "compute_contracted"]
    _, _, run, _ = await client.request_services(CHECKSUM, account="alice", max_spend=Decimal(1))
    services.access_answers = False
    control = run.execute(ALICE, control=client)
    await control.start()
    await services.extend("run_started", "progress", "completed")
    assert (await control.wait(timeout=5)).state == "completed"
    # Submitted on this connection, its every event came on the events queue: no catch-up.
    assert services.kinds == Counter({"submit_job": 1, "start_run": 1})


async def test_after_a_reconnection_a_live_job_is_caught_up_again_an_ended_one_never(
    world: tuple[Services, MemoryBroker], client: ParjobsClient
) -> None:
    services, alice = world
    services.on_submit = ["submitted", "storage_contracted", "compute_contracted"]
    await client.request_services(CHECKSUM, account="alice", max_spend=Decimal(1))
    alice.simulate_connection_loss()  # what was published meanwhile may be lost: ask again
    await anyio.wait_all_tasks_blocked()
    assert services.kinds["get_job"] == 1  # at once, for the job kept followed
    await client.wait_until(JOB, READY, timeout=5)
    assert services.kinds["get_job"] == 1
    await services.extend("expired")
    assert (await client.wait_until(JOB, frozenset(), timeout=5)).state is JobState.EXPIRED
    alice.simulate_connection_loss()
    services.access_answers = False
    # Ended, its log is whole: every state, from the tracker the client kept.
    assert [sheet.state async for sheet in client.watch(JOB)] == [
        JobState.SUBMITTED,
        JobState.STORAGE_CONTRACTED,
        JobState.READY,
        JobState.EXPIRED,
    ]
    assert (await client.wait_until(JOB, READY, timeout=5)).state is JobState.EXPIRED
    assert services.kinds["get_job"] == 1


async def test_a_job_whose_last_event_came_while_the_connection_was_down_ends_at_the_reconnection(
    world: tuple[Services, MemoryBroker],
    minted: Services,
    client: ParjobsClient,
    par_transport: PARTransport,
) -> None:
    alice = world[1]
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    await minted.extend("run_started", "progress")
    results: list[JobSheetState] = []
    async with anyio.create_task_group() as group:

        async def wait() -> None:
            results.append(await job.result(timeout=5))

        group.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        alice.drop_connection()
        await minted.extend("completed")  # lost with alice's events queue
        await anyio.wait_all_tasks_blocked()
        assert results == []
        restored = anyio.current_time()
        alice.restore_connection()
    assert [sheet.state for sheet in results] == [JobState.COMPLETED]
    assert anyio.current_time() - restored < 1  # at the reconnection, not at the timeout
    assert minted.kinds["get_job"] == 1  # one catch-up, for the reconnection


async def test_a_catch_up_that_fails_after_a_reconnection_is_logged_and_the_wait_goes_on(
    world: tuple[Services, MemoryBroker],
    impatient: ParjobsClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    services, alice = world
    services.logs[JOB] = sealed(["submitted"])
    results: list[JobSheetState] = []
    async with anyio.create_task_group() as group:

        async def wait() -> None:
            results.append(await impatient.wait_until(JOB, READY, timeout=10))

        group.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        services.access_answers = False
        alice.simulate_connection_loss()
        with anyio.fail_after(5):
            while "not caught up after the reconnection" not in caplog.text:
                await anyio.sleep(0.05)
        assert results == []
        services.access_answers = True
        await services.extend("storage_contracted", "compute_contracted")
    assert [sheet.state for sheet in results] == [JobState.READY]
    assert services.kinds["get_job"] == 1 + SENDS  # the follow's, then the failed catch-up's


async def test_a_reply_lost_while_the_connection_was_down_is_answered_when_it_is_restored(
    world: tuple[Services, MemoryBroker], client: ParjobsClient
) -> None:
    services, alice = world
    services.logs[JOB] = sealed(["submitted"])
    lost: list[IncomingMeta] = []

    async def lose_the_first_reply(meta: IncomingMeta) -> None:
        if not lost:  # the connection goes before the reply comes, and comes back soon after
            lost.append(meta)
            alice.drop_connection()
            asyncio.get_running_loop().call_later(0.1, alice.restore_connection)

    services.forge = lose_the_first_reply
    started = anyio.current_time()
    reply = await client.job(JOB)
    assert reply.sheet.state is JobState.SUBMITTED
    assert anyio.current_time() - started < 1  # the client's timeout is 2 s
    gets = [(envelope, meta) for envelope, meta in services.requests]
    assert len(gets) == 2  # sent again at the reconnection, as the same message
    assert len({envelope.message_id for envelope, _ in gets}) == 1
    assert len({meta.correlation_id for _, meta in gets}) == 1


async def test_a_closed_client_does_not_catch_up_after_a_reconnection(
    world: tuple[Services, MemoryBroker], client: ParjobsClient
) -> None:
    services, alice = world
    services.on_submit = ["submitted", "storage_contracted", "compute_contracted"]
    await client.request_services(CHECKSUM, account="alice", max_spend=Decimal(1))
    await client.aclose()
    await client.start()
    await client.aclose()  # started twice: hooked to the broker once
    alice.simulate_connection_loss()
    await anyio.wait_all_tasks_blocked()
    assert services.kinds["get_job"] == 0
    await client.start()
    alice.simulate_connection_loss()
    await anyio.wait_all_tasks_blocked()
    assert services.kinds["get_job"] == 1  # the job it kept following, once


async def test_a_wait_with_no_events_times_out(services: Services, client: ParjobsClient) -> None:
    services.logs[JOB] = sealed(["submitted"])
    with pytest.raises(TimeoutError):
        await client.wait_until(JOB, READY, timeout=0.3)


async def test_request_services_returns_the_pars_once_contracted(
    services: Services, client: ParjobsClient
) -> None:
    services.on_submit = ["submitted", "storage_contracted", "compute_contracted"]
    job_uid, upload, run, expires = await client.request_services(
        CHECKSUM, account="alice", max_spend=Decimal(1)
    )
    assert job_uid == JOB
    assert services.run is not None
    assert run.uid == services.run.uid
    assert upload.kind is PARKind.OBJECT
    assert expires == SUBMITTED.expires_at
    assert services.kinds == Counter({"submit_job": 1})  # its events came on the events queue


async def test_a_job_submitted_whose_early_events_were_not_all_kept_is_caught_up(
    services: Services, client: ParjobsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("orchestrator.client.inbox.EARLY_EVENTS", 1)
    services.on_submit = ["submitted", "storage_contracted", "compute_contracted"]
    job_uid, *_ = await client.request_services(CHECKSUM, account="alice", max_spend=Decimal(1))
    assert job_uid == JOB
    assert services.kinds == Counter({"submit_job": 1, "get_job": 1})


async def test_jobsheet_request_services_waits_on_events(
    services: Services, client: ParjobsClient
) -> None:
    services.on_submit = ["submitted", "storage_contracted", "compute_contracted"]
    sheet = JobSheet(CHECKSUM, sign_authorisation(ALICE, CHECKSUM))
    cheque = write_cheque(
        ALICE,
        payer="alice",
        recipient="access",
        max_spend=Decimal(1),
        resource="0" * 64,
        lifetime=timedelta(hours=1),
    )
    sheet.set_payment(cheque)
    upload, run, _ = await sheet.request_services(client)
    assert sheet.uid() == JOB
    state = sheet.state()
    assert state is not None
    assert state.state is JobState.READY
    assert run.is_executable
    assert upload.is_writeable


async def test_a_client_must_connect_as_a_registered_users_broker_user() -> None:
    async with MemoryBroker(AMQPSettings(prefix="unit-client")) as guest:
        with pytest.raises(ConfigurationError, match="parjobs users add"):
            ParjobsClient(guest, ALICE, service_keys=SERVICE_KEYS)


# --- the two-line form: client.run and its Job ---------------------------------------------------

INPUT = b"city,rain_mm\nOslo,2.5\n"
OUTPUT_PREFIX = f"jobs/{JOB}/outputs/"
MADE = {"summary.json": b'{"rows": 1}', "deep/rain.csv": b"Oslo,2.5\n"}


@pytest.fixture
async def minted(services: Services, memory_store: MemoryObjectStore) -> Services:
    """The services' log holds real PARs on the in-memory store: the input's upload PAR, and
    (answering GetOutputs) a read PAR over the outputs the `completed` event records."""
    issuer = PARIssuer(memory_store, PARRegistry(memory_store), name="storage")
    upload = await issuer.object_par(
        f"jobs/{JOB}/input", ALICE.public, readable=False, writeable=True
    )
    contracted = SAMPLES["storage_contracted"]
    assert isinstance(contracted, StorageContracted)
    services.payloads["storage_contracted"] = contracted.model_copy(
        update={"upload_par": upload.data}
    )
    for key, data in MADE.items():
        await memory_store.put(OUTPUT_PREFIX + key, data)
    services.payloads["completed"] = Completed(
        outputs=tuple(
            OutputFile(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())
            for key, data in MADE.items()
        )
    )
    services.read_par = (await issuer.bucket_read_par(OUTPUT_PREFIX, ALICE.public)).data
    services.on_submit = ["submitted", "storage_contracted", "compute_contracted"]
    return services


async def test_run_uploads_the_input_through_the_upload_par_and_starts_the_run(
    minted: Services,
    client: ParjobsClient,
    memory_store: MemoryObjectStore,
    par_transport: PARTransport,
) -> None:
    job = await client.run(
        "checksum", INPUT, {"algo": "sha256"}, max_spend=Decimal(2), transport=par_transport
    )
    assert job.uid == JOB
    assert await memory_store.get(f"jobs/{JOB}/input") == INPUT
    assert minted.kinds == Counter({"submit_job": 1, "start_run": 1})
    submitted = minted.requests[0][0].body
    assert isinstance(submitted, SubmitJob)
    assert submitted.request.input_sha256 == hashlib.sha256(INPUT).hexdigest()
    assert submitted.request.parameters == {"algo": "sha256"}
    assert submitted.cheque.payer == "alice"  # the user's own account by default
    assert submitted.cheque.max_spend == Decimal(2)


async def test_run_streams_an_input_file(
    minted: Services,
    client: ParjobsClient,
    memory_store: MemoryObjectStore,
    par_transport: PARTransport,
    tmp_path: Path,
) -> None:
    (tmp_path / "data.csv").write_bytes(INPUT)
    await client.run(
        "checksum", tmp_path / "data.csv", max_spend=Decimal(1), transport=par_transport
    )
    assert await memory_store.get(f"jobs/{JOB}/input") == INPUT


async def test_a_job_yields_its_events_as_they_come_then_its_result_then_its_outputs(
    minted: Services, client: ParjobsClient, par_transport: PARTransport, tmp_path: Path
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    seen: list[str] = []

    async def follow() -> None:
        async for event in job.events():
            seen.append(event.payload.type)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            await anyio.wait_all_tasks_blocked()
            assert seen == ["submitted", "storage_contracted", "compute_contracted"]
            await minted.extend("run_started", "progress")
            await anyio.wait_all_tasks_blocked()
            assert seen[-1] == "progress"
            await minted.extend("completed")
    assert seen[3:] == ["run_started", "progress", "completed"]
    sheet = await job.result(timeout=5)
    assert sheet.state is JobState.COMPLETED
    written = await job.fetch(tmp_path / "out")
    assert sorted(path.relative_to(tmp_path / "out").as_posix() for path in written) == sorted(MADE)
    for key, data in MADE.items():
        assert (tmp_path / "out" / key).read_bytes() == data
    assert minted.kinds["get_job"] == 1  # fetch's read of the log (no catch-up: see above)
    assert minted.kinds["get_outputs"] == 1  # the event handed no read PAR: access mints one


@pytest.mark.parametrize("lifetime", [timedelta(hours=1), timedelta(seconds=20)])
async def test_fetch_uses_the_read_par_the_completed_event_hands_over_while_it_lasts(
    minted: Services,
    client: ParjobsClient,
    memory_store: MemoryObjectStore,
    par_transport: PARTransport,
    tmp_path: Path,
    lifetime: timedelta,
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    issuer = PARIssuer(memory_store, PARRegistry(memory_store), name="compute")
    handed = await issuer.bucket_read_par(OUTPUT_PREFIX, ALICE.public, lifetime=lifetime)
    completed = minted.payloads["completed"]
    assert isinstance(completed, Completed)
    minted.payloads["completed"] = completed.model_copy(update={"read_par": handed.data})
    await minted.extend("run_started", "completed")
    await job.result(timeout=5)
    written = await job.fetch(tmp_path / "out")
    assert sorted(path.relative_to(tmp_path / "out").as_posix() for path in written) == sorted(MADE)
    # Within 30 s of its expiry it is not used: access mints another.
    assert minted.kinds["get_outputs"] == (0 if lifetime > timedelta(minutes=1) else 1)


async def test_fetch_refuses_an_output_that_is_not_what_the_job_recorded(
    minted: Services, client: ParjobsClient, par_transport: PARTransport, tmp_path: Path
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    minted.payloads["completed"] = Completed(
        outputs=(OutputFile(key="summary.json", size=3, sha256="0" * 64),)
    )
    await minted.extend("run_started", "completed")
    await job.result(timeout=5)
    with pytest.raises(IntegrityError):
        await job.fetch(tmp_path / "out")


@pytest.mark.parametrize(
    ("end", "error"),
    [("failed", JobFailedError), ("cancelled", JobCancelledError), ("expired", JobExpiredError)],
)
async def test_a_job_that_ended_without_completing_raises_how_it_ended(
    minted: Services,
    client: ParjobsClient,
    par_transport: PARTransport,
    end: str,
    error: type[JobEndedError],
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    await minted.extend(end)
    with pytest.raises(error) as raised:
        await job.result(timeout=5)
    assert raised.value.job_uid == JOB
    assert raised.value.reason == getattr(SAMPLES[end], "reason", None)
    assert isinstance(raised.value, JobEndedError)


async def test_a_result_not_come_within_its_timeout_is_a_timeout(
    minted: Services, client: ParjobsClient, par_transport: PARTransport
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.2)


async def test_cancel_stops_the_run_through_the_run_par(
    minted: Services, client: ParjobsClient, par_transport: PARTransport
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    assert (await job.cancel()).state == "cancelled"
    assert minted.kinds["stop_run"] == 1


# --- a run's progress: signed reports over the broker, never in the log --------------------------


def progress(message: str, *, seq: int = 4) -> ProgressReport:
    """A progress report of JOB's run, as compute makes it."""
    return ProgressReport(
        job_uid=JOB, seq=seq, time=datetime.now(UTC), payload=Progress(message=message)
    )


async def report(
    services: Services,
    body: ProgressReport,
    *,
    signer: ServiceRole = "compute",
    key: KeyPair | None = None,
) -> None:
    """Publish `body` as compute does (signed by `signer`, with `key` to forge), to alice."""
    broker = services.compute
    routing_key = services.ids.event_routing_key(
        services.ids.user_username("alice"), body.job_uid, "progress"
    )
    await broker.publish(broker.topology.events, routing_key, signed_reply(signer, body, key))


async def test_job_events_interleave_the_runs_progress_and_watch_shows_it(
    minted: Services, client: ParjobsClient, par_transport: PARTransport
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    seen: list[JobEvent | ProgressReport] = []
    watched: list[JobSheetState] = []

    async def follow() -> None:
        async for event in job.events():
            seen.append(event)

    async def watch() -> None:
        async for sheet in client.watch(JOB):
            watched.append(sheet)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            group.start_soon(watch)
            await anyio.wait_all_tasks_blocked()
            await report(minted, progress("early"))  # before run_started came: held till then
            await anyio.wait_all_tasks_blocked()
            assert [event.payload.type for event in seen][-1] == "compute_contracted"
            await minted.extend("run_started")
            await anyio.wait_all_tasks_blocked()
            await report(minted, progress("half way"))
            await anyio.wait_all_tasks_blocked()
            await report(minted, progress("nearly"))
            await anyio.wait_all_tasks_blocked()
            await minted.extend("completed")
            await report(minted, progress("after the end"))  # dropped: the job has ended
    assert [event.payload.type for event in seen] == [
        "submitted",
        "storage_contracted",
        "compute_contracted",
        "run_started",
        "progress",
        "progress",
        "progress",
        "completed",
    ]
    reports = [event for event in seen if isinstance(event, ProgressReport)]
    messages = [(r.seq, r.payload.message) for r in reports]
    assert messages == [(4, "early"), (4, "half way"), (4, "nearly")]
    assert all(isinstance(event.payload, Progress) for event in reports)  # as old code matched
    # watch: a state for each report, which it shows; the end keeps the last one.
    assert [(sheet.state, sheet.progress) for sheet in watched[3:]] == [
        (JobState.RUNNING, None),
        (JobState.RUNNING, "early"),
        (JobState.RUNNING, "half way"),
        (JobState.RUNNING, "nearly"),
        (JobState.COMPLETED, "nearly"),
    ]
    assert (await job.result(timeout=5)).state is JobState.COMPLETED
    assert minted.kinds["get_job"] == 0  # progress asks nothing of access (nor a catch-up)


@pytest.mark.parametrize(
    ("signer", "key", "why"),
    [
        ("compute", KeyPair.generate("compute"), "does not verify"),  # a stranger's key
        ("access", None, "against the key of access"),  # a service, not the one that runs jobs
    ],
    ids=["forged", "not-compute"],
)
async def test_a_progress_report_not_signed_by_compute_is_dropped(
    minted: Services,
    client: ParjobsClient,
    par_transport: PARTransport,
    caplog: pytest.LogCaptureFixture,
    signer: ServiceRole,
    key: KeyPair | None,
    why: str,
) -> None:
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    await minted.extend("run_started")
    seen: list[str] = []

    async def follow() -> None:
        async for event in job.events():
            seen.append(event.payload.type)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(follow)
            await anyio.wait_all_tasks_blocked()
            await report(minted, progress("forged"), signer=signer, key=key)
            unsigned = Envelope(sender="compute", body=progress("unsigned"))
            routing_key = minted.ids.event_routing_key(
                minted.ids.user_username("alice"), JOB, "progress"
            )
            await minted.compute.publish(minted.compute.topology.events, routing_key, unsigned)
            await anyio.wait_all_tasks_blocked()
            await minted.extend("completed")
    assert "progress" not in seen
    assert why in caplog.text
    assert "is not signed" in caplog.text


async def test_another_users_client_gets_none_of_a_jobs_progress(
    world: tuple[Services, MemoryBroker], client: ParjobsClient
) -> None:
    services, alice = world
    services.logs[JOB] = sealed(
        ["submitted", "storage_contracted", "compute_contracted", "run_started"]
    )
    bob_key = KeyPair.generate("bob")
    bob_seen: list[JobEvent | ProgressReport] = []
    alice_seen: list[JobEvent | ProgressReport] = []
    async with (
        MemoryBroker(
            alice.settings, server=alice.server, username=services.ids.user_username("bob")
        ) as bob_broker,
        ParjobsClient(bob_broker, bob_key, service_keys=SERVICE_KEYS, timeout=2) as bob,
    ):

        async def follow(who: ParjobsClient, seen: list[JobEvent | ProgressReport]) -> None:
            async for event in who.updates(JOB):
                seen.append(event)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(follow, client, alice_seen)
                group.start_soon(follow, bob, bob_seen)  # (the stand-in answers him GetJob)
                await anyio.wait_all_tasks_blocked()
                await report(services, progress("alice's only"))
                await anyio.wait_all_tasks_blocked()
                group.cancel_scope.cancel()
    assert [e.payload.message for e in alice_seen if isinstance(e, ProgressReport)] == [
        "alice's only"
    ]
    assert len(bob_seen) == 4  # the log the stand-in gave him; no progress reached him
    assert not any(isinstance(event, ProgressReport) for event in bob_seen)


# --- queued runs: accepted at once, never an error for an accepted start --------------------------


async def test_run_returns_once_the_start_is_accepted_and_the_job_shows_its_place(
    minted: Services, client: ParjobsClient, par_transport: PARTransport
) -> None:
    minted.start_reply = RunReply(job_uid=JOB, state="queued", accepted=True, place=3)
    job = await client.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    assert (job.accepted.state, job.accepted.place) == ("queued", 3)
    assert repr(job) == f"Job({JOB}, queued (place 3))"
    await minted.extend("queued", "run_started", "completed")
    with anyio.fail_after(5):
        seen = [event.payload.type async for event in job.events()]
    assert seen[3:] == ["queued", "run_started", "completed"]
    assert (await job.result(timeout=5)).state is JobState.COMPLETED


@pytest.fixture
async def impatient(world: tuple[Services, MemoryBroker]) -> AsyncIterator[ParjobsClient]:
    """Alice's client, waiting only 0.3 s for each reply."""
    async with ParjobsClient(world[1], ALICE, service_keys=SERVICE_KEYS, timeout=0.3) as alice:
        yield alice


async def test_an_unanswered_start_is_sent_again_as_the_same_message_and_any_answer_counts(
    minted: Services, impatient: ParjobsClient, par_transport: PARTransport
) -> None:
    minted.lost_start_replies = SENDS - 1
    job = await impatient.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    assert job.accepted.state == "running"
    starts = [(e, meta) for e, meta in minted.requests if isinstance(e.body, StartRun)]
    assert len(starts) == SENDS
    assert len({envelope.message_id for envelope, _ in starts}) == 1  # one start, sent again
    assert len({meta.correlation_id for _, meta in starts}) == 1  # any answer is its answer


async def test_a_start_never_answered_but_claimed_is_accepted_not_an_error(
    minted: Services, impatient: ParjobsClient, par_transport: PARTransport
) -> None:
    minted.lost_start_replies, minted.claim_lost_starts = SENDS, True
    job = await impatient.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
    assert (job.accepted.state, job.accepted.place) == ("queued", 4)
    assert minted.kinds["start_run"] == SENDS


async def test_a_start_never_answered_nor_claimed_is_a_timeout(
    minted: Services, impatient: ParjobsClient, par_transport: PARTransport
) -> None:
    minted.lost_start_replies = SENDS
    with pytest.raises(RequestTimeoutError, match="start_run"):
        await impatient.run("checksum", INPUT, max_spend=Decimal(1), transport=par_transport)
