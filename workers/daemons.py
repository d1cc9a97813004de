"""The three daemons: which queues each consumes and what it does with each message.

The logic lives in `AccessService`, `StorageWorker` and `ComputeWorker`; here it is wired to the
broker: validate, act, publish the appended events, reply, and ack (by returning).
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from pathlib import Path

import aio_pika
import anyio
from anyio.abc import TaskGroup

from orchestrator.broker.base import IncomingMeta
from orchestrator.broker.topology import QueueSpec, Topology
from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.core.pricing import Pricing
from orchestrator.errors import ConfigurationError, InvalidMessageError, ParjobsError
from orchestrator.par.issuer import PARIssuer
from orchestrator.services.access import AccessService, Outcome
from orchestrator.settings import AMQPSettings
from schemas.messages import (
    ClosePAR,
    Envelope,
    EventPublished,
    GetJob,
    GetOutputs,
    GetPARState,
    PARStateReply,
    RunCommand,
    SubmitJob,
)
from workers.calculations import CalculationRegistry
from workers.compute import ComputeWorker
from workers.runtime import ENVELOPE, ServiceContext, is_refusal, serve
from workers.storage import StorageWorker

log = logging.getLogger("parjobs.service")


def service_queues(topology: Topology) -> dict[str, tuple[QueueSpec, ...]]:
    """The queues each daemon consumes (declared by it; deleted by `delete_topology`)."""
    ended = [f"job.*.{state}" for state in ("completed", "failed", "cancelled", "expired")]
    return {
        "access": (topology.rpc_queue("access"), topology.work_queue("access", events=ended)),
        "storage": (topology.work_queue("storage", events=["job.*.submitted"]),),
        "compute": (
            topology.work_queue("compute", events=["job.*.storage_contracted"]),
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


def _compute_key_file(context: ServiceContext) -> Path:
    path = context.settings.compute_key_file
    if path is None:
        raise ConfigurationError(
            "set PARJOBS_COMPUTE_KEY_FILE to the compute service's key file (parjobs keys new)"
        )
    return path


def _event_of(envelope: Envelope) -> EventPublished:
    if not isinstance(envelope.body, EventPublished):
        raise InvalidMessageError(f"expected a job event, got a {envelope.body.type!r} message")
    return envelope.body


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

    async def answer(envelope: Envelope) -> Outcome | PARStateReply:
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
            case other:
                raise InvalidMessageError(f"access does not handle {other.type!r} messages")

    async def handle(envelope: Envelope, meta: IncomingMeta) -> None:
        try:
            result = await answer(envelope)
        except ParjobsError as exc:
            if not is_refusal(exc):
                raise
            await context.refuse(meta, exc)
            return
        if isinstance(result, PARStateReply):
            await context.reply(meta, result)
            return
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

    async def settle(envelope: Envelope, meta: IncomingMeta) -> None:
        # A redelivered end settles nothing twice: the ledger finds the job's settlement.
        await service.settle(_event_of(envelope).event.job_uid)

    requests, endings = service_queues(context.broker.topology)["access"]
    await context.broker.declare(requests, endings)
    await context.broker.consume(requests, ENVELOPE, handle)
    await context.broker.consume(endings, ENVELOPE, settle)
    group.start_soon(sweep)


# --- storage --------------------------------------------------------------------------------------


async def setup_storage(context: ServiceContext, group: TaskGroup) -> None:
    compute_key = PublicKeys.load(_compute_key_file(context))
    worker = StorageWorker(
        context.log,
        PARIssuer(context.store, context.registry, name="storage"),
        compute_key,
        context.keys,
    )

    async def handle(envelope: Envelope, meta: IncomingMeta) -> None:
        contracted = await worker.on_submitted(_event_of(envelope).event)
        if contracted is not None:
            await context.publish_event(contracted)

    (queue,) = service_queues(context.broker.topology)["storage"]
    await context.broker.declare(queue)
    await context.broker.consume(queue, ENVELOPE, handle)


# --- compute --------------------------------------------------------------------------------------


async def setup_compute(context: ServiceContext, group: TaskGroup) -> None:
    settings = context.settings
    if settings.key_passphrase is None:
        raise ConfigurationError("set PARJOBS_KEY_PASSPHRASE for the compute service's key file")
    key = KeyPair.load(_compute_key_file(context), settings.key_passphrase.get_secret_value())
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
    )
    topology = context.broker.topology

    async def on_contract(envelope: Envelope, meta: IncomingMeta) -> None:
        contracted = await worker.on_storage_contracted(_event_of(envelope).event)
        if contracted is not None:
            await context.publish_event(contracted)

    def run_command(envelope: Envelope) -> RunCommand:
        if not isinstance(envelope.body, RunCommand):
            raise InvalidMessageError(f"compute does not handle {envelope.body.type!r} messages")
        return envelope.body

    async def on_control(envelope: Envelope, meta: IncomingMeta) -> None:
        command = run_command(envelope)
        try:
            if command.action == "stop":
                reply, event = await worker.stop(command.run_url)
                if event is not None:
                    await context.publish_event(event)
            elif command.action == "status":
                reply = await worker.status(command.run_url)
            else:
                raise InvalidMessageError("a start goes to the run queue, not the control queue")
        except ParjobsError as exc:
            if not is_refusal(exc):
                raise
            await context.refuse(meta, exc)
            return
        await context.reply(meta, reply)

    # Start messages being handled here, by message id. A second delivery of one while the first
    # runs (a publisher's resend after a lost confirm) waits for it to end, then its claim finds
    # the job ended, so it starts no second run (or resumes the job if the first was cancelled).
    starting: dict[str, anyio.Lock] = {}

    async def on_start(envelope: Envelope, meta: IncomingMeta) -> None:
        lock = starting.setdefault(envelope.message_id, anyio.Lock())
        try:
            async with lock:
                await start(envelope, meta)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                starting.pop(envelope.message_id, None)

    async def start(envelope: Envelope, meta: IncomingMeta) -> None:
        # The message stays unacked for the whole run: if this daemon dies, the broker hands it
        # to the next one, whose claim recognises the same message and runs the job again.
        command = run_command(envelope)
        try:
            sheet, par_uid, started = await worker.claim(
                command.run_url, message_id=envelope.message_id
            )
        except ParjobsError as exc:
            if not is_refusal(exc):
                raise
            await context.refuse(meta, exc)
            return
        await context.publish_event(started)
        if not meta.redelivered:
            await context.reply(meta, worker.started_reply(sheet))
        await worker.run(sheet, par_uid, context.publish_event)

    contracts, control, runs = service_queues(topology)["compute"]
    await context.broker.declare(contracts, control, runs)
    await context.broker.consume(contracts, ENVELOPE, on_contract)
    await context.broker.consume(control, ENVELOPE, on_control)
    await context.broker.consume(runs, ENVELOPE, on_start, prefetch=settings.max_runs)


async def run_daemon(role: str) -> None:
    setups = {"access": setup_access, "storage": setup_storage, "compute": setup_compute}
    await serve(role, setups[role])
