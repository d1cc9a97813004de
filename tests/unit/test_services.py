"""The services' logic on the in-memory store, without RabbitMQ: submit, contract, expire,
outputs."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import anyio
import httpx
import pytest
from pydantic import JsonValue

from orchestrator import PAR, KeyPair
from orchestrator.core.layout import JobKeys
from orchestrator.core.ledger_rules import settle_tx_id
from orchestrator.core.pricing import Pricing
from orchestrator.core.run_commands import run_command
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import (
    JobNotCompletedError,
    JobNotFoundError,
    ReplayedAuthorisationError,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.par.transfer import PARTransport
from orchestrator.services.access import AccessService
from orchestrator.services.accounts import Accounts
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog, step_event_id
from orchestrator.store.registry import PARRegistry
from schemas.auth import Cheque
from schemas.events import JobEvent, JobRequest, JobState, StorageContracted
from schemas.messages import (
    GetJob,
    GetOutputs,
    JobReply,
    ProgressReport,
    RunAction,
    RunCommand,
    StartRun,
    SubmitJob,
)
from workers.calculations import CalculationRegistry, Price
from workers.compute import ComputeWorker, Publish
from workers.storage import StorageWorker

TIME_LIMIT_S = 20
FUNDS = Decimal(100)


class Services:
    """The three services' logic on one store, and a registered, funded user.

    `http` reaches the store's presigned URLs; `transport` is a `PARTransport` over it.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        http: httpx.AsyncClient,
        *,
        progress_snapshot_s: float = 30.0,
    ) -> None:
        self.keys = JobKeys(prefix)
        self.log = EventLog(store, self.keys.jobs)
        self.registry = registry = PARRegistry(store, root=self.keys.registry, log=self.log)
        self.transport = PARTransport(http)
        self.user = KeyPair.generate("user")
        self.compute_key = KeyPair.generate("compute")
        self.accounts = Accounts(store, self.keys)
        self.calculations = calculations = CalculationRegistry.from_entry_points()
        self.access = AccessService(
            store,
            self.log,
            PARIssuer(store, registry, name="access"),
            self.keys,
            Pricing(calculations, TIME_LIMIT_S),
        )
        self.storage = StorageWorker(
            self.log, PARIssuer(store, registry, name="storage"), self.compute_key.public, self.keys
        )
        self.compute = ComputeWorker(
            store,
            self.log,
            PARIssuer(store, registry, name="compute"),
            registry,
            calculations,
            self.keys,
            self.compute_key,
            time_limit_s=TIME_LIMIT_S,
            http=http,
            progress_snapshot_s=progress_snapshot_s,
        )
        self.reported: list[tuple[str, ProgressReport]] = []
        """The progress compute reported, with the owner it went to."""

    async def report(self, owner: str, progress: ProgressReport) -> None:
        """Compute's `ReportProgress`: kept in `reported`."""
        self.reported.append((owner, progress))

    def run_command(self, action: RunAction, run_par: PAR) -> RunCommand:
        """The user's `action` through `run_par`, sealed for compute as the client seals it."""
        return run_command(
            action,
            run_par.execute(self.user, control=self.registry).run_url,
            job_uid=run_par.data.resource or "",
            requester=self.user.fingerprint,
            compute=self.compute_key.public,
        )

    async def run(self, run_par: PAR, publish: Publish, *, message_id: str = "5" * 32) -> JobEvent:
        """Start the run through `run_par` and run it to its end; its final event."""
        start = self.run_command("start", run_par)
        assert isinstance(start, StartRun)
        with self.compute.watching(start.job_uid) as handle:
            claim = await self.compute.claim(
                start, requester=self.user.fingerprint, message_id=message_id
            )
            return await self.compute.run(claim.sheet, handle, publish, self.report)

    def access_job_uid(self, message_id: str) -> str:
        """The job uid access derives from a submit's message id."""
        return step_event_id(message_id, "job")

    def access_price(self, calculation: str) -> Price:
        return self.calculations.get(calculation).price

    async def onboard(self) -> None:
        await self.accounts.add_user("user", self.user.public)
        await self.accounts.deposit("user", FUNDS)

    def submit_command(
        self,
        lifetime_s: int | None = None,
        *,
        calculation: str = "checksum",
        parameters: dict[str, JsonValue] | None = None,
    ) -> SubmitJob:
        request = JobRequest(calculation=calculation, parameters=parameters or {})
        return SubmitJob(
            request=request,
            authorisation=sign_authorisation(self.user, request),
            cheque=self.cheque(request),
            lifetime_s=lifetime_s,
        )

    def cheque(self, request: JobRequest, max_spend: Decimal = Decimal(5)) -> Cheque:
        return write_cheque(
            self.user,
            payer="user",
            recipient="access",
            max_spend=max_spend,
            resource=request_fingerprint(request),
            lifetime=timedelta(hours=1),
        )


@pytest.fixture
async def services(store: ObjectStore, prefix: str, http: httpx.AsyncClient) -> Services:
    ready = Services(store, prefix, http)
    await ready.onboard()
    return ready


def _collecting(into: list[JobEvent]) -> Publish:
    async def publish(event: JobEvent) -> None:
        into.append(event)

    return publish


def _sheet(reply: object) -> JobReply:
    assert isinstance(reply, JobReply)
    return reply


async def test_submit_is_idempotent_per_message(services: Services) -> None:
    command, message_id = services.submit_command(), uuid.uuid4().hex
    first = await services.access.submit(command, message_id=message_id)
    again = await services.access.submit(command, message_id=message_id)
    assert _sheet(first.reply).sheet.job_uid == _sheet(again.reply).sheet.job_uid
    job_uid = _sheet(first.reply).sheet.job_uid
    assert len(await services.log.read(job_uid)) == 1
    assert first.events[0].event_id == again.events[0].event_id
    # The same signed submission in another message is a replay: refused, nothing created.
    with pytest.raises(ReplayedAuthorisationError):
        await services.access.submit(command, message_id=uuid.uuid4().hex)
    other = await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    assert _sheet(other.reply).sheet.job_uid != job_uid


async def test_storage_contracts_once_even_when_redelivered(services: Services) -> None:
    submitted = (
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    ).events[0]
    contracted = await services.storage.on_submitted(submitted)
    assert contracted is not None
    assert isinstance(contracted.payload, StorageContracted)
    again = await services.storage.on_submitted(submitted)
    assert again == contracted  # the same event, to publish again; no second PAR minted
    sheet = await services.log.load(submitted.job_uid)
    assert sheet.state is JobState.STORAGE_CONTRACTED
    assert sheet.upload_par is not None
    assert sheet.upload_par.recipient == services.user.fingerprint
    assert sheet.output_par is not None
    assert sheet.output_par.recipient == services.compute_key.fingerprint
    assert sheet.output_par.expires_at <= sheet.expires_at


async def test_a_redelivery_to_a_daemon_that_never_saw_the_job_mints_nothing(
    services: Services, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted = (
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    ).events[0]
    contracted = await services.storage.on_submitted(submitted)
    # A restarted storage daemon: its log remembers nothing, the trigger is flagged redelivered.
    issuer = PARIssuer(store, services.registry, name="storage")
    restarted = StorageWorker(
        EventLog(store, services.keys.jobs), issuer, services.compute_key.public, services.keys
    )

    async def mint(*args: object, **kwargs: object) -> PAR:
        raise AssertionError("a PAR was minted again")

    monkeypatch.setattr(issuer, "object_par", mint)
    monkeypatch.setattr(issuer, "bucket_write_par", mint)
    assert await restarted.on_submitted(submitted, redelivered=True) == contracted


async def test_get_job_and_unknown_job(services: Services) -> None:
    submitted = (
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    ).events[0]
    reply = _sheet(
        (await services.access.get(GetJob(job_uid=submitted.job_uid, with_events=True))).reply
    )
    assert reply.sheet.state is JobState.SUBMITTED
    assert [e.event_id for e in reply.events] == [submitted.event_id]
    with pytest.raises(JobNotFoundError):
        await services.access.get(GetJob(job_uid="0" * 32))


async def test_outputs_only_once_completed(services: Services) -> None:
    submitted = (
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    ).events[0]
    with pytest.raises(JobNotCompletedError, match="submitted"):
        await services.access.outputs(GetOutputs(job_uid=submitted.job_uid))


async def test_sweep_expires_waiting_jobs_past_their_deadline(services: Services) -> None:
    short = (
        await services.access.submit(
            services.submit_command(lifetime_s=3), message_id=uuid.uuid4().hex
        )
    ).events[0]
    long = (
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    ).events[0]
    contracted = await services.storage.on_submitted(short)
    assert contracted is not None
    await anyio.sleep(3.1)
    published: list[JobEvent] = []
    expired = await services.access.sweep(_collecting(published))
    assert [e.job_uid for e in expired] == [short.job_uid]
    assert published == expired  # each expiry is published as it is appended
    assert (await services.log.load(short.job_uid)).state is JobState.EXPIRED
    assert (await services.log.load(long.job_uid)).state is JobState.SUBMITTED
    # Nobody settled the end (no `endings` consumer here): the next sweep does, publishes
    # nothing again and expires nothing twice.
    assert await services.access.sweep(_collecting(published)) == []
    assert published == expired
    assert services.access.ledger.holds(settle_tx_id(short.job_uid))
    assert await services.access.sweep(_collecting(published)) == []
    assert published == expired
    # A redelivered `submitted` finds the old contract: nothing new is minted or appended.
    assert await services.storage.on_submitted(short) == contracted
    assert (await services.log.load(short.job_uid)).state is JobState.EXPIRED


async def test_no_contract_after_expiry(services: Services) -> None:
    submitted = (
        await services.access.submit(
            services.submit_command(lifetime_s=1), message_id=uuid.uuid4().hex
        )
    ).events[0]
    await anyio.sleep(1.1)
    await services.access.sweep(_collecting([]))
    assert await services.storage.on_submitted(submitted) is None


async def test_an_expiry_is_published_even_if_the_sweep_is_cancelled_as_it_publishes(
    services: Services,
) -> None:
    short = (
        await services.access.submit(
            services.submit_command(lifetime_s=1), message_id=uuid.uuid4().hex
        )
    ).events[0]
    await anyio.sleep(1.1)
    published: list[JobEvent] = []

    async def slow_publish(event: JobEvent) -> None:
        await anyio.sleep(0.3)  # the broker's confirm takes its time...
        published.append(event)

    with anyio.move_on_after(0.1):  # ...and the daemon is told to stop meanwhile
        await services.access.sweep(slow_publish)
    logged = await services.log.read(short.job_uid)
    assert logged[-1].payload.type == "expired"
    assert published == [logged[-1]]  # appended, and published all the same
