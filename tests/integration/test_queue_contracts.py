"""A daemon's queue on the real RabbitMQ takes only its own message union: a well-formed message of
another queue's union is dead-lettered once, with its reason; the queue's own requests are
answered, and a refusal comes back to the client as the very error the handler raised."""

from __future__ import annotations

import pytest

from orchestrator.broker.base import Broker, DeadLetter, DeadLetterReason, IncomingMeta
from orchestrator.core.layout import JobKeys
from orchestrator.errors import ParjobsError, RunRefusedError
from orchestrator.settings import ServiceSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.registry import PARRegistry
from schemas.messages import (
    COMPUTE_RESPONSES,
    ComputeRequest,
    Envelope,
    ErrorReply,
    GetJob,
    GetRunStatus,
    RunReply,
    StopRun,
)
from tests._waiting import eventually
from workers.runtime import ServiceContext

pytestmark = pytest.mark.integration

JOB_UID = "0123456789abcdef" * 2
SEALED = bytes(64)  # the handler here never opens it


async def _ask(broker: Broker, body: ComputeRequest) -> RunReply:
    topology = broker.topology
    reply = await broker.request(
        topology.commands,
        topology.rpc_routing_key("compute"),
        Envelope(sender="test", body=body),
        COMPUTE_RESPONSES.envelope,
        timeout=15,
    )
    if isinstance(reply.body, ErrorReply):
        raise ParjobsError.from_reply(reply.body)
    assert isinstance(reply.body, RunReply)
    return reply.body


async def test_a_message_its_queue_does_not_take_is_dead_lettered_with_its_reason(
    broker: Broker, store: ObjectStore, prefix: str
) -> None:
    keys = JobKeys(prefix)
    context = ServiceContext(
        role="compute",
        settings=ServiceSettings(),
        store=store,
        broker=broker,
        keys=keys,
        log=EventLog(store, keys.jobs),
        registry=PARRegistry(store, root=keys.registry),
    )
    control = broker.topology.rpc_queue("compute")
    await broker.declare(control)
    handled: list[str] = []

    async def on_control(envelope: Envelope[ComputeRequest], meta: IncomingMeta) -> None:
        handled.append(envelope.body.type)
        if isinstance(envelope.body, StopRun):
            raise RunRefusedError(f"job {JOB_UID} is completed: there is nothing to stop")
        await context.reply(meta, RunReply(job_uid=JOB_UID, state="running", accepted=True))

    await context.consume(control, on_control)

    # An access request, valid in every field, sent to compute's queue.
    stray = Envelope(sender="test", body=GetJob(job_uid=JOB_UID))
    stray_id = await broker.publish(
        broker.topology.commands, broker.topology.rpc_routing_key("compute"), stray
    )
    status = await _ask(broker, GetRunStatus(job_uid=JOB_UID, sealed=SEALED))
    assert (status.job_uid, status.state) == (JOB_UID, "running")
    with pytest.raises(RunRefusedError, match="nothing to stop") as refused:
        await _ask(broker, StopRun(job_uid=JOB_UID, sealed=SEALED))
    assert refused.value.code == "job.run_refused"

    async def stray_letters() -> list[DeadLetter]:
        return [letter for letter in await broker.dead_letters() if letter.message_id == stray_id]

    async def dead_lettered() -> bool:
        return bool(await stray_letters())

    await eventually(dead_lettered, "the stray request reaches the dead-letter queue")
    [letter] = await stray_letters()
    assert letter.code is DeadLetterReason.UNKNOWN_TYPE
    assert letter.original_queue == control.name
    assert "get_job" in letter.reason
    assert Envelope.model_validate_json(letter.body).body == stray.body
    # The handler never saw it; what it saw were the queue's own requests, each answered.
    assert sorted(handled) == ["get_run_status", "stop_run"]
    assert len(await broker.dead_letters()) == 1  # once: a refusal is an answer, not a letter
