"""The three daemons: which queues each consumes and what it does with each message.

The logic lives in `AccessService`, `StorageWorker` and `ComputeWorker`; here it is wired to the
broker: act, publish the appended events, reply, and ack (by returning). Each queue takes its own
message union, so a handler sees only the bodies its queue takes. The middleware around every
handler (`workers.middleware`) answers refusals with error replies and puts the delivery on every
log line.
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta

import aio_pika
import anyio
from anyio.abc import TaskGroup

from orchestrator.broker.base import IncomingMeta
from orchestrator.broker.topology import QueueSpec, Topology
from orchestrator.core.pricing import Pricing
from orchestrator.errors import ParjobsError
from orchestrator.par.issuer import PARIssuer
from orchestrator.services.access import AccessService, Outcome
from orchestrator.settings import AMQPSettings
from schemas.messages import (
    JOB_EVENTS,
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


def service_queues(topology: Topology) -> dict[str, tuple[QueueSpec, ...]]:
    """The queues each daemon consumes (declared by it; deleted by `delete_topology`), each with
    the messages it takes: its RPC requests (`RPC_REQUESTS`), or job events."""
    ended = [f"job.*.{state}" for state in ("completed", "failed", "cancelled", "expired")]
    return {
        "access": (
            topology.rpc_queue("access"),
            topology.work_queue("access", events=ended, accepts=JOB_EVENTS),
        ),
        "storage": (
            topology.work_queue("storage", events=["job.*.submitted"], accepts=JOB_EVENTS),
        ),
        "compute": (
            topology.work_queue("compute", events=["job.*.storage_contracted"], accepts=JOB_EVENTS),
            topology.rpc_queue("compute"),
            topology.rpc_queue("runs"),
        ),
    }


async def delete_topology(settings: AMQPSettings) -> None:
    """Delete every queue and exchange of `settings.prefix` (reply queues go with connections).

    For throwaway prefixes (the demo, tests); a deployment keeps its queues.
    """
    topology = Topology(settings.prefix, settings.delivery_limit)
    queues = [*topology.shared_queues, *itertools.chain(*service_queues(topology).values())]
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection, connection.channel() as channel:
        for queue in queues:
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange.name)


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
        match envelope.body:
            case SubmitJob() as submit:
                return await service.submit(submit, message_id=envelope.message_id)
            case GetJob() as query:
                return await service.get(query)
            case GetOutputs() as query:
                return await service.outputs(query)
            case ClosePAR(uid=uid, proof=proof):
                await registry.close(uid, proof)
                return PARStateReply(uid=uid, state=await registry.state(uid))
            case GetPARState(uid=uid):
                return PARStateReply(uid=uid, state=await registry.state(uid))

    async def handle(envelope: Envelope[AccessRequest], meta: IncomingMeta) -> None:
        result = await answer(envelope)
        if isinstance(result, PARStateReply):
            await context.reply(meta, result)
            return
        if isinstance(result.reply, JobReply):  # a submission's job uid is known from here
            bind_log_context(job_uid=result.reply.sheet.job_uid)
        for event in result.events:
            await context.publish_event(event)
        if result.reply is not None:
            await context.reply(meta, result.reply)

    async def sweep() -> None:
        while True:
            try:
                for event in await service.sweep():
                    await context.publish_event(event)
            except ParjobsError:
                log.exception("expiry sweep failed; retrying at the next interval")
            await anyio.sleep(settings.sweep_interval_s)

    async def settle(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        # A redelivered end settles nothing twice: the ledger finds the job's settlement.
        await service.settle(envelope.body.event.job_uid)

    requests, endings = service_queues(context.broker.topology)["access"]
    await context.broker.declare(requests, endings)
    await context.consume(requests, handle)
    await context.consume(endings, settle)
    group.start_soon(sweep)


# --- storage --------------------------------------------------------------------------------------


async def setup_storage(context: ServiceContext, group: TaskGroup) -> None:
    compute_key = context.settings.service_keys().current("compute")
    worker = StorageWorker(
        context.log,
        PARIssuer(context.store, context.registry, name="storage"),
        compute_key,
        context.keys,
    )

    async def handle(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        contracted = await worker.on_submitted(envelope.body.event)
        if contracted is not None:
            await context.publish_event(contracted)

    (queue,) = service_queues(context.broker.topology)["storage"]
    await context.broker.declare(queue)
    await context.consume(queue, handle)


# --- compute --------------------------------------------------------------------------------------


async def setup_compute(context: ServiceContext, group: TaskGroup) -> None:
    settings = context.settings
    key = settings.role_key("compute")
    worker = ComputeWorker(
        context.store,
        context.log,
        PARIssuer(context.store, context.registry, name="compute"),
        context.registry,
        CalculationRegistry.from_entry_points(),
        context.keys,
        key,
        time_limit_s=settings.time_limit_s,
        memory_limit_bytes=settings.memory_limit_bytes,
        sandbox=settings.sandbox,
    )
    await worker.check_sandbox()  # refuse to start rather than run calculations unconfined
    topology = context.broker.topology

    async def on_contract(envelope: Envelope[EventPublished], meta: IncomingMeta) -> None:
        contracted = await worker.on_storage_contracted(envelope.body.event)
        if contracted is not None:
            await context.publish_event(contracted)

    async def on_control(envelope: Envelope[ComputeRequest], meta: IncomingMeta) -> None:
        requester = verified_requester().fingerprint
        match envelope.body:
            case StopRun() as stop:
                reply, event = await worker.stop(stop, requester=requester)
                if event is not None:
                    await context.publish_event(event)
            case GetRunStatus() as status:
                reply = await worker.status(status, requester=requester)
        await context.reply(meta, reply)

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
            sheet, _, started = await worker.claim(
                envelope.body,
                requester=verified_requester().fingerprint,
                message_id=envelope.message_id,
            )
            await context.publish_event(started)
            if meta.redelivered:
                mark_answered()  # by the first delivery; what fails in the run below is retried
            else:
                await context.reply(meta, worker.started_reply(sheet))
            await worker.run(sheet, handle, context.publish_event)

    contracts, control, runs = service_queues(topology)["compute"]
    await context.broker.declare(contracts, control, runs)
    await context.consume(contracts, on_contract)
    await context.consume(control, on_control)
    await context.consume(runs, on_start, prefetch=settings.max_runs)


async def run_daemon(role: str) -> None:
    setups = {"access": setup_access, "storage": setup_storage, "compute": setup_compute}
    await serve(role, setups[role])
