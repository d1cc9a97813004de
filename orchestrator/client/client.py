"""`ParjobsClient`: a registered user's connection to the parjobs services over RabbitMQ.

It submits jobs, asks about them, fetches output PARs, and is the `RunService` a calculation PAR's
`RunControl` uses to start and stop runs. `run` does a job's steps in one call and hands back a
`Job` (`orchestrator.client.job`) to follow it, wait for its result and fetch its outputs. It
connects as the user's own broker user and signs every request with the user's key; it uses a
reply only once it verifies as signed by the service role it asked (`Inbox`), and an
`ErrorReply` is raised as the very error the service raised (`ParjobsError.from_reply`).

It listens rather than polls: waiting on a job means following the job's events on the client's
own events queue (subscribed when the client starts), after one GetJob to catch up with what came
before; each event is verified and applied in seq order (`JobTracker`). The client goes on
following a job it waited on until the job ends, so the next wait on it (`RunControl.wait` after
`request_services`) needs no catch-up, and no answer from access. A gap in the seqs (an event not
come yet, or lost) is filled by one more GetJob, asked for because an event showed it; so is
what a lost connection took with its events queue (every live job followed catches up once the
connection is restored, `Inbox`). A run's progress comes the same way, as `ProgressReport`s
compute signs and never logs (`updates`, `watch`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
from pydantic import BaseModel, JsonValue

from orchestrator import errors
from orchestrator.broker.base import Broker
from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import RPC_REQUESTS, Topology
from orchestrator.client.inbox import Inbox
from orchestrator.client.job import Job
from orchestrator.client.tracking import JobTracker, with_progress
from orchestrator.core.jobstate import is_terminal
from orchestrator.core.keys import KeyPair
from orchestrator.core.ledger_rules import ACCESS, user_account
from orchestrator.core.message_signing import sign_message
from orchestrator.core.run_commands import run_command
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import ParjobsError
from orchestrator.par.io import BucketReader, ObjectWriter
from orchestrator.par.par import PAR
from orchestrator.par.transfer import PARTransport
from orchestrator.settings import ServiceSettings
from schemas.auth import Authorisation, Cheque
from schemas.events import Completed, JobEvent, JobRequest, JobSheetState, JobState
from schemas.messages import (
    ClosePAR,
    Envelope,
    ErrorReply,
    GetJob,
    GetOutputs,
    GetPARState,
    JobReply,
    MessageUnion,
    OutputsReply,
    PARStateReply,
    ProgressReport,
    RunAction,
    RunReply,
    SubmitJob,
)
from schemas.par import PARState
from schemas.signing import ServiceRole

R = TypeVar("R", bound=BaseModel)
CHEQUE_LIFETIME = timedelta(hours=1)
ENDED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
# A start goes to the run queue (its worker holds it for the run); the rest to compute's RPC
# queue, which is never blocked behind long runs. Compute answers on both.
_RUN_QUEUES: dict[RunAction, str] = {"start": "runs", "stop": "compute", "status": "compute"}
_ROLES: dict[str, ServiceRole] = {"access": "access", "compute": "compute", "runs": "compute"}
"""Each RPC queue -> the service role whose signature its replies must carry."""
SENDS = 3
"""How many times a request in `RESENT` is sent (the same message each time) before the client
gives up waiting for its answer."""
SUBMITTED_KEPT = 4096
"""Jobs submitted and not followed yet that `_submitted` remembers (the most recent)."""
RESENT = frozenset(
    {"submit_job", "get_job", "get_outputs", "get_par_state", "start_run", "get_run_status"}
)
"""Requests a service takes the same however often they come: reads, and those it recognises by
message id (a submission's job derives from it; a start's claim holds it). A stop or a close is
sent once: sent again after it took effect, it would be refused."""


def raise_error_reply(reply: ErrorReply) -> None:
    """Raise the parjobs error `reply` describes (a ParjobsError carrying its code if unknown)."""
    raise ParjobsError.from_reply(reply)


def _replies(service: str) -> MessageUnion[Any]:
    requests = RPC_REQUESTS.get(service)
    if requests is None or requests.replies is None:
        raise errors.ConfigurationError(f"parjobs has no RPC service {service!r}")
    return requests.replies


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at `path`, read in chunks: it may be larger than memory."""
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def registered_user(username: str, topology: Topology) -> str:
    """The registered user behind broker user `username`, or ConfigurationError: a client
    connects as its user's own broker user, whose name the services read as the requester."""
    user = Identities(topology).user_of(username)
    if user is None:
        raise errors.ConfigurationError(
            f"broker user {username!r} is no registered user of deployment {topology.prefix!r}: "
            "connect with the AMQP URL `parjobs users add` printed for you (PARJOBS_AMQP_URL)"
        )
    return user


class ParjobsClient:
    """A user's client of access (jobs, PARs) and compute (runs); also usable as a PAR's control.

    `broker` must be connected as the user's broker user (the AMQP URL `parjobs users add`
    printed); `user` is their key pair, which signs every request. `service_keys` are the
    operator's (default: the PARJOBS_SERVICE_KEYS_FILE). Use as `async with ParjobsClient(...)`,
    or let it start on first use and `aclose()` it.
    """

    def __init__(
        self,
        broker: Broker,
        user: KeyPair,
        *,
        service_keys: ServiceKeys | None = None,
        timeout: float = 60.0,
        sender: str = "client",
    ) -> None:
        self.owner = registered_user(broker.username, broker.topology)
        """The registered user's name the broker connection is."""
        self.user = user
        self._broker = broker
        keys = service_keys if service_keys is not None else ServiceSettings().service_keys()
        self._inbox = Inbox(broker, keys, catch_up=self._catch_up)
        self._started = False
        self._starting = anyio.Lock()
        self._sender = sender
        self._timeout = timeout
        self._submitted: OrderedDict[str, int] = OrderedDict()
        """Jobs this client submitted and has not followed yet, with the connection (its count
        of reconnections) their events queue had before: none of their events was missed."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Declare and consume the client's reply and events queues (once; idempotent)."""
        async with self._starting:
            if not self._started:
                await self._inbox.start()
                self._started = True

    async def aclose(self) -> None:
        """Stop listening; requests still waiting fail."""
        async with self._starting:
            if self._started:
                await self._inbox.close()
                self._started = False

    async def _call(self, service: str, body: BaseModel, expected: type[R]) -> R:
        return await self._send(service, self._signed(body), expected)

    def _signed(self, body: BaseModel) -> Envelope[Any]:
        """`body` as a request signed by the user (its message id fixed from here on)."""
        request = Envelope(sender=self._sender, body=body)
        signature = sign_message(
            self.user,
            self.user.fingerprint,
            message_id=request.message_id,
            sent_at=request.sent_at,
            body=body,
        )
        return request.model_copy(update={"signature": signature})

    async def _send(self, service: str, request: Envelope[Any], expected: type[R]) -> R:
        """`request`'s reply from `service`: sent again as the same message while unanswered,
        if it is one a service takes the same however often it comes (`RESENT`)."""
        await self.start()
        reply = await self._inbox.call(
            service,
            _ROLES[service],
            request,
            _replies(service).envelope,
            timeout=self._timeout,
            sends=SENDS if request.body.type in RESENT else 1,
        )
        if isinstance(reply.body, ErrorReply):
            raise_error_reply(reply.body)
        if not isinstance(reply.body, expected):
            raise ParjobsError(f"{service} answered {reply.body.type}, not {expected.__name__}")
        return reply.body

    # --- jobs -------------------------------------------------------------------------------------

    async def submit(
        self,
        request: JobRequest,
        authorisation: Authorisation,
        cheque: Cheque,
        *,
        lifetime_s: int | None = None,
    ) -> JobSheetState:
        """Submit a job signed for by `authorisation` and paid for by `cheque`."""
        command = SubmitJob(
            request=request, authorisation=authorisation, cheque=cheque, lifetime_s=lifetime_s
        )
        await self.start()  # the events queue consumes from before the job exists
        connection = self._broker.reconnections
        sheet = (await self._call("access", command, JobReply)).sheet
        if sheet.seq == 1:  # created by this submission (or a resend of it), not found older
            self._submitted[sheet.job_uid] = connection
            while len(self._submitted) > SUBMITTED_KEPT:
                self._submitted.popitem(last=False)
        return sheet

    async def submit_paid(
        self,
        request: JobRequest,
        *,
        account: str,
        max_spend: Decimal,
        lifetime_s: int | None = None,
    ) -> JobSheetState:
        """Sign for `request` with the user's key and pay from `account` (which they own)."""
        cheque = write_cheque(
            self.user,
            payer=account,
            recipient=ACCESS,
            max_spend=max_spend,
            resource=request_fingerprint(request),
            lifetime=CHEQUE_LIFETIME,
        )
        authorisation = sign_authorisation(self.user, request)
        return await self.submit(request, authorisation, cheque, lifetime_s=lifetime_s)

    async def job(
        self, job_uid: str, *, with_events: bool = False, with_progress: bool = False
    ) -> JobReply:
        """The job's sheet; its events and its run's latest progress snapshot if asked for."""
        query = GetJob(job_uid=job_uid, with_events=with_events, with_progress=with_progress)
        return await self._call("access", query, JobReply)

    # --- a job's events --------------------------------------------------------------------------

    async def events(self, job_uid: str) -> list[JobEvent]:
        """The job's log as access has it (one GetJob), each event verified and chained to the
        one before; one that fails is logged and left out, and so is all that follows it."""
        tracker = JobTracker(job_uid, self._inbox.keys)
        await self._catch_up(tracker)
        return tracker.events

    async def _catch_up(self, tracker: JobTracker) -> None:
        """Offer the tracker the job's whole log as access has it (one GetJob)."""
        connection = self._broker.reconnections  # as of before the ask: events after it queue up
        for event in (await self.job(tracker.job_uid, with_events=True)).events:
            tracker.offer(event, source="GetJob")
        tracker.caught_up_on = connection

    async def _follow(
        self, job_uid: str, *, progress: bool = False
    ) -> AsyncGenerator[list[tuple[JobEvent | ProgressReport, JobSheetState]], None]:
        """The job's events, each with its state after it, in seq order, in batches as they come
        (a catch-up brings many at once), until the one that ends it. Subscribed first, it catches
        up with one GetJob, unless the client has followed the job since it last caught up on
        this connection, or the job has ended (its log is whole), or this client submitted it on
        this connection (its every event came on the events queue).

        With `progress`, also the run's latest progress report whenever a newer one came (once the
        event it follows is applied), and every state from then on shows it (`with_progress`)."""
        await self.start()
        with self._inbox.following(job_uid) as tracker:
            connection = self._broker.reconnections
            created_on = self._submitted.pop(job_uid, None)
            if not tracker.ended and tracker.caught_up_on != connection:
                if created_on == connection and self._inbox.kept_every_event(job_uid):
                    # Created while this connection's events queue was consuming: every event
                    # of the job came (or comes) there, and is here.
                    tracker.caught_up_on = connection
                else:
                    await self._catch_up(tracker)
            shown, filled_at = 0, -1
            reported: ProgressReport | None = None
            while True:
                report = tracker.progress if progress else None
                if shown < len(tracker.sheets):
                    batch: list[tuple[JobEvent | ProgressReport, JobSheetState]] = [
                        (event, with_progress(sheet, reported))
                        for event, sheet in zip(
                            tracker.events[shown:], tracker.sheets[shown:], strict=True
                        )
                    ]
                    shown = len(tracker.sheets)
                    yield batch
                    if is_terminal(batch[-1][1].state):
                        return
                elif report is not None and report is not reported and report.seq <= shown:
                    reported = report
                    yield [(report, with_progress(tracker.sheets[-1], report))]
                elif tracker.has_gap and filled_at != len(tracker.events):
                    # An event came before the one it follows: ask once for what is missing.
                    filled_at = len(tracker.events)
                    await self._catch_up(tracker)
                else:
                    await tracker.changed()

    async def follow(self, job_uid: str) -> AsyncGenerator[JobEvent, None]:
        """The job's events, each verified and chained, in seq order, from its first to the one
        that ends it; then the generator ends. Follows the job's events: no polling."""
        async with aclosing(self._follow(job_uid)) as batches:
            async for batch in batches:
                for event, _ in batch:
                    if isinstance(event, JobEvent):
                        yield event

    async def updates(self, job_uid: str) -> AsyncGenerator[JobEvent | ProgressReport, None]:
        """The job's events as `follow` gives them and, between them, its run's progress as it
        comes: each a `ProgressReport` signed by compute, after the event it follows (`seq`);
        a reader slower than the reports gets the latest of them."""
        async with aclosing(self._follow(job_uid, progress=True)) as batches:
            async for batch in batches:
                for update, _ in batch:
                    yield update

    async def watch(self, job_uid: str) -> AsyncGenerator[JobSheetState, None]:
        """The job's state after each of its events and each progress report of its run (its
        `progress` and `fraction` the latest report's), in order, from its first event to the one
        that ends it; then the generator ends. Follows the job's events: no polling."""
        async with aclosing(self._follow(job_uid, progress=True)) as batches:
            async for batch in batches:
                for _, sheet in batch:
                    yield sheet

    async def wait_until(
        self,
        job_uid: str,
        states: frozenset[JobState],
        *,
        timeout: float = 120,  # noqa: ASYNC109 - a deadline for the whole wait
    ) -> JobSheetState:
        """The job's state when it first reached one of `states`, or its end if it has ended
        (an end wins over a state the job already left); TimeoutError if neither comes within
        `timeout` seconds. Follows the job's events: no polling (`_follow`)."""
        with anyio.fail_after(timeout):
            async with aclosing(self._follow(job_uid)) as batches:
                async for batch in batches:
                    if is_terminal(batch[-1][1].state):
                        return batch[-1][1]
                    if reached := [sheet for _, sheet in batch if sheet.state in states]:
                        return reached[0]
        raise errors.JobError(f"job {job_uid}: its events stopped before it ended")

    async def request_services(
        self,
        request: JobRequest,
        *,
        account: str,
        max_spend: Decimal,
        lifetime_s: int | None = None,
    ) -> tuple[str, PAR, PAR, datetime]:
        """The seed's `JobSheet.request_services`: (job uid, upload PAR, run PAR, expiry).

        Submits the signed and paid job, then waits until storage and compute have contracted.
        """
        submitted = await self.submit_paid(
            request, account=account, max_spend=max_spend, lifetime_s=lifetime_s
        )
        sheet, upload, run = await self.wait_ready(submitted.job_uid)
        return sheet.job_uid, upload, run, sheet.expires_at

    async def wait_ready(self, job_uid: str) -> tuple[JobSheetState, PAR, PAR]:
        """The job's state once it is contracted, with its upload and run PARs; JobError if it
        ended before."""
        sheet = await self.wait_until(job_uid, frozenset({JobState.READY}))
        if sheet.state is not JobState.READY or sheet.upload_par is None or sheet.run_par is None:
            raise errors.JobError(
                f"job {job_uid} ended {sheet.state.value} before it was ready: {sheet.reason or ''}"
            )
        return sheet, PAR(sheet.upload_par), PAR(sheet.run_par)

    async def outputs(self, job_uid: str) -> PAR:
        """A bucket read PAR over the completed job's outputs, sealed for the job's user."""
        return PAR((await self._call("access", GetOutputs(job_uid=job_uid), OutputsReply)).read_par)

    async def fetch(
        self, job_uid: str, directory: str | Path, *, transport: PARTransport | None = None
    ) -> list[Path]:
        """Download every output of the completed job into `directory` through a read PAR, each
        checked against the SHA-256 its `completed` event recorded; the paths written.

        The read PAR is the one the `completed` event hands over while it has time left, else
        one access mints (`outputs`)."""
        completed = [
            e.payload for e in await self.events(job_uid) if isinstance(e.payload, Completed)
        ]
        expected = {o.key: o.sha256 for o in completed[-1].outputs} if completed else {}
        handed = completed[-1].read_par if completed else None
        read_par = PAR(handed) if handed is not None else None
        if read_par is None or read_par.seconds_remaining() <= 0:
            read_par = await self.outputs(job_uid)
        reader = BucketReader(read_par, self.user, transport=transport)
        target = Path(directory)
        await anyio.Path(target).mkdir(parents=True, exist_ok=True)
        written = []
        for name in reader.list_keys():
            if name not in expected:
                raise errors.IntegrityError(f"output {name!r} is not among those the job recorded")
            path = target / name
            await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
            await reader.get_object_as_file(name, path, expected_sha256=expected[name])
            written.append(path)
        return written

    # --- the two-line form ------------------------------------------------------------------------

    async def run(
        self,
        calculation: str,
        input_data: str | Path | bytes,
        params: Mapping[str, JsonValue] | None = None,
        *,
        max_spend: Decimal,
        account: str | None = None,
        lifetime_s: int | None = None,
        transport: PARTransport | None = None,
    ) -> Job:
        """Submit a job of `calculation` on `input_data` (a file's path, or the bytes themselves),
        paid from `account` (default: the user's own) up to `max_spend`; upload the input through
        the job's upload PAR and start it through its run PAR. Returns as soon as compute has
        accepted the start (`Job.accepted`: `queued` with its place while every run slot is
        taken, else `running`); the `Job` follows it from there.

        `transport` is the HTTP the PARs' transfers use (default: one per transfer).
        """
        if isinstance(input_data, bytes):
            digest = hashlib.sha256(input_data).hexdigest()
        else:
            digest = await anyio.to_thread.run_sync(file_sha256, Path(input_data))
        request = JobRequest(
            calculation=calculation, parameters=dict(params or {}), input_sha256=digest
        )
        job_uid, upload, run, expires_at = await self.request_services(
            request,
            account=user_account(self.owner) if account is None else account,
            max_spend=max_spend,
            lifetime_s=lifetime_s,
        )
        writer = ObjectWriter(upload, self.user, transport=transport)
        if isinstance(input_data, bytes):
            await writer.set_object(input_data)
        else:
            await writer.set_object_from_file(input_data)
        control = run.execute(self.user, control=self)
        accepted = await control.start()
        return Job(
            self,
            job_uid,
            control=control,
            expires_at=expires_at,
            accepted=accepted,
            transport=transport,
        )

    # --- PARControl and RunService ---------------------------------------------------------------

    async def close(self, uid: str, proof: str) -> None:
        await self._call("access", ClosePAR(uid=uid, proof=proof), PARStateReply)

    async def state(self, uid: str) -> PARState:
        return (await self._call("access", GetPARState(uid=uid), PARStateReply)).state

    async def run_command(self, action: RunAction, job_uid: str, run_url: str) -> RunReply:
        """`action` on job `job_uid`'s run, the capability `run_url` sealed for compute and bound
        to the action, the job and this user's key (`orchestrator.core.run_commands`)."""
        command = run_command(
            action,
            run_url,
            job_uid=job_uid,
            requester=self.user.fingerprint,
            compute=self._inbox.keys.current("compute"),
        )
        if action == "start":
            return await self._start(job_uid, self._signed(command))
        return await self._call(_RUN_QUEUES[action], command, RunReply)

    async def _start(self, job_uid: str, request: Envelope[Any]) -> RunReply:
        """Compute's answer to the start `request`: accepted (`queued` with its place, or
        `running`), or refused. Unanswered, it is sent again as the same message, which compute
        never takes for a second start (it finds the claim that message made and answers with
        the job as it is). Still unanswered, the job's log says whether it was accepted all the
        same: its claim names this message."""
        try:
            return await self._send("runs", request, RunReply)
        except errors.RequestTimeoutError:
            sheet = (await self.job(job_uid)).sheet
            if sheet.start_message_id != request.message_id:
                raise
            return RunReply(
                job_uid=job_uid, state=sheet.state.value, accepted=True, place=sheet.place
            )
