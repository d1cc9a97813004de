"""The three daemons: which queues each consumes and what it does with each message.

The logic lives in `AccessService`, `StorageWorker` and `ComputeWorker`; here it is wired to the
broker: act, publish the appended events, reply, and ack (by returning). Each queue takes its own
message union, so a handler sees only the bodies its queue takes. The middleware around every
handler (`workers.middleware`) checks who sent a request and who sealed an event, answers
refusals with signed error replies, and puts the delivery on every log line. Each request is then
authorised against ownership: a user sees and acts on only their own jobs and PARs.

An event appended here is published in the same shielded step, so a cancellation (a drain, a
stop) cannot come between the two; a daemon that dies between them republishes on the trigger's
redelivery, which finds the step done and returns its event.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta

import anyio
from anyio.abc import TaskGroup

from orchestrator.broker.base import IncomingMeta
from orchestrator.broker.identities import Role
from orchestrator.core.pricing import Pricing
from orchestrator.core.service_keys import is_service_role
from orchestrator.errors import ParjobsError
from orchestrator.metrics import MESSAGES_PUBLISHED
from orchestrator.par.issuer import PARIssuer
from orchestrator.services.access import AccessService, Outcome
from schemas.messages import (
    AccessRequest,
    ClosePAR,
    ComputeRequest,
    Envelope,
    EventPublished,
    GetJob,
    GetOutputs,
    GetPARState,
    GetRunStatus,
    JobDeadline,
    JobReply,
    PARStateReply,
    RunReply,
    StartRun,
    StopRun,
    SubmitJob,
)
from workers.calculations import CalculationRegistry
from workers.compute import ComputeWorker
from workers.middleware import bind_log_context, verified_requester
from workers.runtime import ServiceContext, serve
from workers.storage import StorageWorker

log = logging.getLogger("parjobs.service")


# --- access ---------------------------------------------------------------------------------------


async def setup_access(context: ServiceContext, group: TaskGroup) -> None:
    settings = context.settings
    pricing = Pricing(CalculationRegistry.from_entry_points(), settings.time_limit_s)
    service = AccessService(
        context.store,
        context.log,
        PARIssuer(context.store, context.registry, name="access"),
        context.keys,
        pricing,
        default_lifetime=timedelta(seconds=settings.job_lifetime_s),
        auth_window=timedelta(seconds=settings.auth_window_s),
    )
    registry = context.registry

    async def answer(envelope: Envelope[AccessRequest]) -> Outcome | PARStateReply:
        requester = verified_requester()
        match envelope.body:
            case SubmitJob() as submit:
                return await service.submit(
                    submit, message_id=envelope.message_id, requester=requester.fingerprint
                )
            case GetJob() as query:
                return await service.get(query, owner=requester.name)
            case GetOutputs() as query:
                return await service.outputs(query, owner=requester.name)
            case ClosePAR(uid=uid, proof=proof):
                await registry.close(uid, proof, recipient=requester.fingerprint)
                return PARStateReply(uid=uid, state=await registry.state(uid))
            case GetPARState(uid=uid):
                state = await registry.state(uid, recipient=requester.fingerprint)
                return PARStateReply(uid=uid, state=state)

    async def delay(job_uid: str, expires_at: datetime) -> None:
        """Send the job's deadline to itself, due at `expires_at` (see `DELAY_BUCKETS_S`)."""
        ttl = expires_at - datetime.now(UTC)
        await context.broker.publish(
            "",  # the default exchange: no user may publish there
            context.broker.topology.delay_queue(ttl).name,
            context.signed(JobDeadline(job_uid=job_uid, expires_at=expires_at)),
            expiration=ttl,
        )
        MESSAGES_PUBLISHED.labels("deadline", "job_deadline").inc()

    async def handle(envelope: Envelope[AccessRequest], meta: IncomingMeta) -> None:
        with anyio.CancelScope(shield=True):  # what is appended is published
            result = await answer(envelope)
            events = [] if isinstance(result, PARStateReply) else result.events
            for event in events:
                await context.publish_event(event)
            if isinstance(envelope.body, SubmitJob) and isinstance(result, Outcome):
                assert isinstance(result.reply, JobReply)
                sheet = result.reply.sheet  # a redelivery sends it again: handled the same
                await delay(sheet.job_uid, sheet.expires_at)
        reply = result if isinstance(result, PARStateReply) else result.reply
        if isinstance(reply, JobReply):  # a submission's job uid is known from here
            bind_log_context(job_uid=reply.sheet.job_uid)
        if reply is not None:
            await context.reply(meta, reply)

    async def sweep() -> None:
        while True:
            await anyio.sleep(settings.sweep_interval_s)  # the deadlines come by message
            try:
                await service.sweep(context.publish_event)
            except ParjobsError:
                log.exception("expiry sweep failed; retrying at the next interval")

    async def on_deadline(envelope: Envelope[JobDeadline], meta: IncomingMeta) -> None:
        job_uid = envelope.body.job_uid
        with anyio.CancelScope(shield=True):  # what is appended is published
            early = await service.on_deadline(job_uid, context.publish_event)
        if early is not None:
            await delay(job_uid, early)

    async def settle(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        # An event before the end is only remembered (so settling the end reads nothing); a
        # redelivered end settles nothing twice: the ledger finds the job's settlement.
        event = envelope.body.event
        await service.settle(event.job_uid, ending=event)

    requests, endings, deadlines, *_delays = context.identities.service_queues()[Role.ACCESS]
    await context.consume(requests, handle)
    await context.consume(endings, settle)
    await context.consume(deadlines, on_deadline)
    group.start_soon(sweep)


# --- storage --------------------------------------------------------------------------------------


async def setup_storage(context: ServiceContext, group: TaskGroup) -> None:
    worker = StorageWorker(
        context.log,
        PARIssuer(context.store, context.registry, name="storage"),
        context.service_keys.current("compute"),  # the bucket-write PARs are sealed for it
        context.keys,
    )

    async def handle(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        job_uid = envelope.body.event.job_uid
        try:
            with anyio.CancelScope(shield=True):  # what is appended is published
                contracted = await worker.on_submitted(
                    envelope.body.event, redelivered=meta.redelivered
                )
                if contracted is not None:
                    await context.publish_event(contracted)
        finally:
            # Storage's part ends here: remembering the job would grow with every job it saw.
            context.log.forget(job_uid)

    (queue,) = context.identities.service_queues()[Role.STORAGE]
    await context.consume(queue, handle)


# --- compute --------------------------------------------------------------------------------------


async def setup_compute(context: ServiceContext, group: TaskGroup) -> None:
    settings, warm = context.settings, context.settings.warm_sandboxes
    worker = ComputeWorker(
        context.store,
        context.log,
        PARIssuer(context.store, context.registry, name="compute"),
        context.registry,
        CalculationRegistry.from_entry_points(),
        context.keys,
        context.key,
        time_limit_s=settings.time_limit_s,
        memory_limit_bytes=settings.memory_limit_bytes,
        http=context.http,
        sandbox=settings.sandbox,
        progress_snapshot_s=settings.progress_snapshot_s,
        max_runs=settings.max_runs,
        warm_sandboxes=settings.max_runs if warm is None else warm,
    )
    await worker.check_sandbox()  # refuse to start rather than run calculations unconfined
    await group.start(worker.sandboxes.serve)

    async def on_contract(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        with anyio.CancelScope(shield=True):  # what is appended is published
            contracted = await worker.on_storage_contracted(
                envelope.body.event, redelivered=meta.redelivered
            )
            if contracted is not None:
                await context.publish_event(contracted)

    async def on_control(envelope: Envelope[ComputeRequest], meta: IncomingMeta) -> None:
        requester = verified_requester().fingerprint
        match envelope.body:
            case StopRun() as stop:
                with anyio.CancelScope(shield=True):  # what is appended is published
                    reply, event = await worker.stop(
                        stop, requester=requester, redelivered=meta.redelivered
                    )
                    await context.publish_event(event)
            case GetRunStatus() as status:
                reply = await worker.status(status, requester=requester)
        await context.reply(meta, reply)

    async def on_cancelled(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        if worker.on_cancelled(envelope.body.event):
            log.info("stopping the run of job %s: it was cancelled", envelope.body.event.job_uid)

    # Start messages being handled here, by message id. A redelivery of one while the first
    # delivery is still handled here (its channel was lost) waits for it to end; then its claim
    # finds the job ended and runs nothing. Any other copy (a client's resend) never waits: its
    # claim is found made, and it is answered with the job as it is.
    starting: dict[str, anyio.Lock] = {}

    async def on_start(envelope: Envelope[StartRun], meta: IncomingMeta) -> None:
        lock = starting.setdefault(envelope.message_id, anyio.Lock())
        waits = meta.redelivered or not lock.locked()
        try:
            async with lock if waits else contextlib.nullcontext():
                await start(envelope, meta)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                starting.pop(envelope.message_id, None)

    async def start(envelope: Envelope[StartRun], meta: IncomingMeta) -> None:
        # The message stays unacked while the job waits for a run slot and runs: if this daemon
        # dies, the broker hands it to the next one, whose claim recognises the same message and
        # runs the job there, once.
        async def answer(reply: RunReply) -> None:
            if meta.redelivered:
                # The daemon that had it died: what it appended may never have been published (a
                # progress, say). Publish the job's log again; subscribers de-duplicate.
                for event in await context.log.read(envelope.body.job_uid):
                    await context.publish_event(event)
            # Answered again when redelivered: the first reply may never have gone out (its
            # daemon's node died first); a requester that has its answer drops a second one.
            # Answered, what fails in the run below is retried, not answered.
            await context.reply(meta, reply)

        await worker.start(
            envelope.body,
            requester=verified_requester().fingerprint,
            message_id=envelope.message_id,
            redelivered=meta.redelivered,
            answer=answer,
            publish=context.publish_event,
            report=context.publish_progress,
        )

    identities = context.identities
    contracts, control, runs = identities.service_queues()[Role.COMPUTE]
    # This daemon's own copy of every stop (a `cancelled` event): it goes with its connection.
    stops = identities.stops_queue(context.instance)
    await context.broker.declare(stops, shared=False)
    await context.consume(stops, on_cancelled)
    await context.consume(contracts, on_contract)
    await context.consume(control, on_control)
    # Every start waiting for a run slot is a delivery held here (answered, unacked), up to the
    # bound; the run queue lets `max_runs` of them run at once.
    await context.consume(runs, on_start, prefetch=settings.max_queued_runs)


async def run_daemon(role: str) -> None:
    setups = {"access": setup_access, "storage": setup_storage, "compute": setup_compute}
    if not is_service_role(role):
        raise ValueError(f"no daemon {role!r}: one of {', '.join(setups)}")
    await serve(role, setups[role])
