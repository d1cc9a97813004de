"""A daemon's queue on the real RabbitMQ takes only its own message union: a well-formed message of
another queue's union is dead-lettered once, with its reason; the queue's own requests, sent
signed by a registered user as their own broker user, are answered with signed replies, and a
refusal comes back to the client as the very error the handler raised."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from orchestrator.broker.admin import BrokerAdmin, vhost_of
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker, DeadLetter, DeadLetterReason, IncomingMeta
from orchestrator.broker.identities import Identities
from orchestrator.core.keys import KeyPair
from orchestrator.core.layout import JobKeys
from orchestrator.core.message_signing import sign_message, verify_message
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import ParjobsError, RunRefusedError
from orchestrator.settings import ManagementSettings, ServiceSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.users import UserRegistry
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
from schemas.signing import SERVICE_ROLES
from tests._waiting import eventually
from workers.runtime import ServiceContext

pytestmark = pytest.mark.integration

JOB_UID = "0123456789abcdef" * 2
SEALED = bytes(64)  # the handler here never opens it
KEYS = {role: KeyPair.generate(role) for role in SERVICE_ROLES}
SERVICE_KEYS = ServiceKeys({role: key.public for role, key in KEYS.items()})


class UserSession:
    """A registered user, connected as their own broker user, asking compute."""

    def __init__(self, broker: Broker, key: KeyPair) -> None:
        self.broker = broker
        self.key = key
        ids = Identities(broker.topology)
        self.reply_queue = ids.reply_queue(broker.username, uuid.uuid4().hex)
        self._sent, self._replies = anyio.create_memory_object_stream[Envelope[Any]](8)

    async def start(self) -> None:
        await self.broker.declare(self.reply_queue, shared=False)
        await self.broker.consume(self.reply_queue, COMPUTE_RESPONSES.envelope, self._on_reply)

    async def _on_reply(self, envelope: Envelope[Any], meta: IncomingMeta) -> None:
        await self._sent.send(envelope)

    async def ask(self, body: ComputeRequest) -> RunReply:
        request: Envelope[Any] = Envelope(sender="tester", body=body)
        signature = sign_message(
            self.key,
            self.key.fingerprint,
            message_id=request.message_id,
            sent_at=request.sent_at,
            body=body,
        )
        topology = self.broker.topology
        await self.broker.publish(
            topology.commands,
            topology.rpc_routing_key("compute"),
            request.model_copy(update={"signature": signature}),
            reply_to=self.reply_queue.name,
        )
        with anyio.fail_after(15):
            reply = await self._replies.receive()
        verify_message(  # signed by the role asked
            reply.signature,
            message_id=reply.message_id,
            sent_at=reply.sent_at,
            body=reply.body,
            keys=SERVICE_KEYS.keys_for("compute"),
            now=datetime.now(UTC),
            window=timedelta(seconds=30),
        )
        if isinstance(reply.body, ErrorReply):
            raise ParjobsError.from_reply(reply.body)
        assert isinstance(reply.body, RunReply)
        return reply.body


@asynccontextmanager
async def registered_tester(
    broker: Broker, store: ObjectStore, keys: JobKeys
) -> AsyncIterator[UserSession]:
    """A user registered in the store and given a broker user (deleted afterwards)."""
    ids = Identities(broker.topology)
    key = KeyPair.generate("tester")
    await UserRegistry(store, keys.users).add("tester", key.public)
    base = broker.settings.amqp_url
    async with BrokerAdmin(ManagementSettings(), vhost=vhost_of(base.get_secret_value())) as admin:
        credentials = await admin.provision(ids.user_grant("tester"))
        try:
            settings = broker.settings.model_copy(update={"amqp_url": credentials.amqp_url(base)})
            async with AMQPBroker(settings, name=f"{broker.topology.prefix}-tester") as connected:
                tester = UserSession(connected, key)
                await tester.start()
                yield tester
        finally:
            await admin.delete_user(credentials.username)


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
        key=KEYS["compute"],
        service_keys=SERVICE_KEYS,
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
    async with registered_tester(broker, store, keys) as tester:
        status = await tester.ask(GetRunStatus(job_uid=JOB_UID, sealed=SEALED))
        assert (status.job_uid, status.state) == (JOB_UID, "running")
        with pytest.raises(RunRefusedError, match="nothing to stop") as refused:
            await tester.ask(StopRun(job_uid=JOB_UID, sealed=SEALED))
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
