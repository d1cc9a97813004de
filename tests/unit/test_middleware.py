"""The middleware around every daemon handler: the chain, refusals as error replies, log context."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import pytest

from orchestrator.broker.base import IncomingMeta
from orchestrator.errors import (
    AppendConflictError,
    BrokerUnavailableError,
    InsufficientChequeError,
    ParjobsError,
    PoisonMessageError,
    RunRefusedError,
)
from schemas.messages import Envelope, ErrorReply, GetJob, GetPARState, GetRunStatus
from workers.middleware import (
    EnvelopeHandler,
    LogContext,
    RefusalReplies,
    bind_log_context,
    log_context,
    mark_answered,
    wrap,
)
from workers.runtime import _JsonLines

JOB_UID = "0123456789abcdef" * 2


def _meta(*, reply_to: str | None = "p.reply.caller") -> IncomingMeta:
    return IncomingMeta(
        queue="p.rpc.access",
        message_id="amqp-id",
        correlation_id="corr",
        reply_to=reply_to,
        exchange="p.commands",
        routing_key="rpc.access",
        redelivered=False,
        delivery_count=0,
        headers={},
        timestamp=None,
    )


def _get_job() -> Envelope[GetJob]:
    return Envelope(sender="test", body=GetJob(job_uid=JOB_UID))


class Replies:
    """Stands in for `ServiceContext.reply`: records each error reply sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[IncomingMeta, ErrorReply]] = []

    async def __call__(self, meta: IncomingMeta, reply: ErrorReply) -> None:
        self.sent.append((meta, reply))


def _raising(error: BaseException, *, answer_first: bool = False) -> EnvelopeHandler:
    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        if answer_first:
            mark_answered()
        raise error

    return handler


# --- the chain ------------------------------------------------------------------------------------


async def test_the_first_middleware_is_outermost_and_each_wraps_once() -> None:
    calls: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        async def __call__(
            self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
        ) -> None:
            calls.append(f"{self.name} before")
            await call_next(envelope, meta)
            calls.append(f"{self.name} after")

    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        calls.append("handler")

    await wrap(handler, [Named("outer"), Named("inner")])(_get_job(), _meta())
    assert calls == ["outer before", "inner before", "handler", "inner after", "outer after"]


async def test_no_middleware_is_the_handler_itself() -> None:
    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        pass

    assert wrap(handler, []) is handler


# --- refusals -----------------------------------------------------------------------------------


async def test_a_refusal_answers_the_request_and_the_message_is_done() -> None:
    replies = Replies()
    refusal = InsufficientChequeError(
        "costs 2, cheque allows 1", price=Decimal(2), limit=Decimal(1)
    )
    meta = _meta()
    await RefusalReplies(replies)(_get_job(), meta, _raising(refusal))  # returns: acked
    assert replies.sent == [(meta, refusal.to_reply())]
    (_, reply), *_ = replies.sent
    assert reply.code == "cheque.insufficient"
    assert reply.details == {"price": "2", "limit": "1"}
    assert not reply.retriable


@pytest.mark.parametrize(
    "failure",
    [
        AppendConflictError("lost the race"),  # retriable: the broker delivers it again
        BrokerUnavailableError("down"),
        ParjobsError("something unexpected"),
        PoisonMessageError("never"),  # the consumer dead-letters it
        RuntimeError("a bug"),
    ],
    ids=type,
)
async def test_anything_but_a_refusal_propagates_unanswered(failure: BaseException) -> None:
    replies = Replies()
    with pytest.raises(type(failure)):
        await RefusalReplies(replies)(_get_job(), _meta(), _raising(failure))
    assert replies.sent == []


async def test_a_refusal_after_the_answer_is_a_failure_of_the_work() -> None:
    replies = Replies()
    late = RunRefusedError("the run cannot go on")
    with pytest.raises(RunRefusedError):
        await RefusalReplies(replies)(_get_job(), _meta(), _raising(late, answer_first=True))
    assert replies.sent == []


async def test_a_refusal_nobody_waits_for_propagates() -> None:
    replies = Replies()
    with pytest.raises(RunRefusedError):
        await RefusalReplies(replies)(
            _get_job(), _meta(reply_to=None), _raising(RunRefusedError("an event"))
        )
    assert replies.sent == []


async def test_being_answered_is_per_delivery() -> None:
    replies = Replies()
    middleware = RefusalReplies(replies)
    with pytest.raises(RunRefusedError):
        await middleware(_get_job(), _meta(), _raising(RunRefusedError("late"), answer_first=True))
    await middleware(_get_job(), _meta(), _raising(RunRefusedError("now")))
    assert [reply.message for _, reply in replies.sent] == ["now"]


# --- log context --------------------------------------------------------------------------------


async def test_the_log_context_names_the_delivery_while_it_is_handled() -> None:
    seen: list[dict[str, str]] = []

    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        seen.append(dict(log_context()))
        bind_log_context(calculation="sleep")
        seen.append(dict(log_context()))

    envelope = _get_job()
    await LogContext()(envelope, _meta(), handler)
    delivery = {
        "message_id": envelope.message_id,
        "queue": "p.rpc.access",
        "message_type": "get_job",
        "job_uid": JOB_UID,
    }
    assert seen == [delivery, {**delivery, "calculation": "sleep"}]
    assert log_context() == {}


async def test_a_body_that_names_no_job_binds_no_job_uid() -> None:
    seen: list[dict[str, str]] = []

    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        seen.append(dict(log_context()))

    await LogContext()(Envelope(sender="t", body=GetPARState(uid=JOB_UID)), _meta(), handler)
    assert "job_uid" not in seen[0]
    assert seen[0]["message_type"] == "get_par_state"


async def test_a_run_command_binds_the_job_it_names() -> None:
    seen: list[dict[str, str]] = []

    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        seen.append(dict(log_context()))

    status = GetRunStatus(job_uid=JOB_UID, sealed=bytes(64))
    await LogContext()(Envelope(sender="t", body=status), _meta(), handler)
    assert seen[0]["job_uid"] == JOB_UID


async def test_every_json_log_line_of_a_handler_carries_its_context() -> None:
    formatter = _JsonLines("access")
    lines: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    logger = logging.getLogger("parjobs.test.middleware")
    capture = Capture()
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    replies = Replies()

    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        logger.info("working on it")
        raise RunRefusedError("no input yet")

    envelope = _get_job()
    try:
        await wrap(handler, [LogContext(), RefusalReplies(replies)])(envelope, _meta())
        logger.info("between deliveries")
    finally:
        logger.removeHandler(capture)

    working, between = lines
    assert working["message"] == "working on it"
    assert working["service"] == "access"
    assert (working["message_id"], working["queue"], working["job_uid"]) == (
        envelope.message_id,
        "p.rpc.access",
        JOB_UID,
    )
    assert "job_uid" not in between
    assert "message_id" not in between
    assert [reply.code for _, reply in replies.sent] == ["job.run_refused"]
