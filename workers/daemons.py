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

import logging
from datetime import timedelta

import anyio
from anyio.abc import TaskGroup

from orchestrator.broker.base import IncomingMeta
from orchestrator.broker.identities import Role
from orchestrator.core.pricing import Pricing
from orchestrator.core.service_keys import is_service_role
from orchestrator.errors import ParjobsError
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
    JobReply,
    PARStateReply,
    StartRun,
    StopRun,
    SubmitJob,
)
from workers.calculations import CalculationRegistry
from workers.compute import ComputeWorker
from workers.middleware import bind_log_context, mark_answered, verified_requester
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

    async def handle(envelope: Envelope[AccessRequest], meta: IncomingMeta) -> None:
        with anyio.CancelScope(shield=True):  # what is appended is published
            result = await answer(envelope)
            events = [] if isinstance(result, PARStateReply) else result.events
            for event in events:
                await context.publish_event(event)
        reply = result if isinstance(result, PARStateReply) else result.reply
        if isinstance(reply, JobReply):  # a submission's job uid is known from here
            bind_log_context(job_uid=reply.sheet.job_uid)
        if reply is not None:
            await context.reply(meta, reply)

    async def sweep() -> None:
        while True:
            try:
                await service.sweep(context.publish_event)
            except ParjobsError:
                log.exception("expiry sweep failed; retrying at the next interval")
            await anyio.sleep(settings.sweep_interval_s)

    async def settle(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        # A redelivered end settles nothing twice: the ledger finds the job's settlement.
        event = envelope.body.event
        await service.settle(event.job_uid, ending=event)

    requests, endings = context.identities.service_queues()[Role.ACCESS]
    await context.consume(requests, handle)
    await context.consume(endings, settle)
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
        with anyio.CancelScope(shield=True):  # what is appended is published
            contracted = await worker.on_submitted(
                envelope.body.event, redelivered=meta.redelivered
            )
            if contracted is not None:
                await context.publish_event(contracted)

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

    # Start messages being handled here, by message id. A second delivery of one while the first
    # runs (a publisher's resend after a lost confirm) waits for it to end, then its claim finds
    # the job ended, so it starts no second run (or resumes the job if the first was cancelled).
    starting: dict[str, anyio.Lock] = {}

    async def on_start(envelope: Envelope[StartRun], meta: IncomingMeta) -> None:
        lock = starting.setdefault(envelope.message_id, anyio.Lock())
        try:
            async with lock:
                await start(envelope, meta)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                starting.pop(envelope.message_id, None)

    async def start(envelope: Envelope[StartRun], meta: IncomingMeta) -> None:
        # The message stays unacked for the whole run: if this daemon dies, the broker hands it
        # to the next one, whose claim recognises the same message and runs the job again.
        with worker.watching(envelope.body.job_uid) as handle:
            with anyio.CancelScope(shield=True):  # what is appended is published
                sheet, _, started = await worker.claim(
                    envelope.body,
                    requester=verified_requester().fingerprint,
                    message_id=envelope.message_id,
                )
                await context.publish_event(started)
            if meta.redelivered:
                mark_answered()  # by the first delivery; what fails in the run below is retried
                # The daemon that had it died: what it appended may never have been published
                # (a progress, say). Publish the job's log again; subscribers de-duplicate.
                for event in await context.log.read(sheet.job_uid):
                    await context.publish_event(event)
            else:
                await context.reply(meta, worker.started_reply(sheet))
            await worker.run(sheet, handle, context.publish_event)

    identities = context.identities
    contracts, control, runs = identities.service_queues()[Role.COMPUTE]
    # This daemon's own copy of every stop (a `cancelled` event): it goes with its connection.
    stops = identities.stops_queue(context.instance)
    await context.broker.declare(stops, shared=False)
    await context.consume(stops, on_cancelled)
    await context.consume(contracts, on_contract)
    await context.consume(control, on_control)
    await context.consume(runs, on_start, prefetch=settings.max_runs)


async def run_daemon(role: str) -> None:
    setups = {"access": setup_access, "storage": setup_storage, "compute": setup_compute}
    if not is_service_role(role):
        raise ValueError(f"no daemon {role!r}: one of {', '.join(setups)}")
    await serve(role, setups[role])
