"""Middleware: what every daemon handler needs, written once and wrapped around each handler.

A middleware is one layer around a handler (as Dramatiq's middleware and FastStream's middlewares
are): it gets the validated envelope, the delivery's metadata and `call_next`, the rest of the
chain, and may act before it, after it, or on what it raises. `wrap` builds the chain once, when a
consumer starts. Two layers exist now:

- `LogContext` binds the delivery's message id, queue, body type and job uid (when the body names
  one; a handler adds one it learns with `bind_log_context`) to every log line of the handler;
- `RefusalReplies` turns a refusal (`ParjobsError.refusal`) raised while answering a request into
  the request's `ErrorReply`, after which the message is done (acked); anything else propagates,
  so the broker delivers the message again (or the consumer dead-letters a poison message).

Signature checks, metrics and tracing are further layers of the same shape.

Why here, in `workers`, and not under `orchestrator/broker`: the broker seam is generic (any
`TypeAdapter`, any handler) and knows nothing of parjobs' envelopes, errors or logs, while these
layers are the services' policy over exactly those. A wrapped handler is still just a handler to
the broker, so any broker (the real one, a twin in tests) runs them the same.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from orchestrator.broker.base import IncomingMeta
from orchestrator.errors import ParjobsError
from schemas.messages import Envelope, ErrorReply, EventPublished, GetJob, GetOutputs

log = logging.getLogger("parjobs.service")

EnvelopeHandler = Callable[[Envelope[Any], IncomingMeta], Awaitable[None]]
SendReply = Callable[[IncomingMeta, ErrorReply], Awaitable[None]]


class Middleware(Protocol):
    """One layer around every handler of a daemon."""

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        """Handle the delivery, calling `call_next(envelope, meta)` to go on down the chain."""


def wrap(handler: EnvelopeHandler, middlewares: Sequence[Middleware]) -> EnvelopeHandler:
    """`handler` inside `middlewares`, the first one outermost."""
    for middleware in reversed(middlewares):
        handler = _layer(middleware, handler)
    return handler


def _layer(middleware: Middleware, call_next: EnvelopeHandler) -> EnvelopeHandler:
    async def handle(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        await middleware(envelope, meta, call_next)

    return handle


# --- log context ---------------------------------------------------------------------------------

_log_context: ContextVar[Mapping[str, str]] = ContextVar(
    "parjobs_log_context", default=MappingProxyType({})
)


def log_context() -> Mapping[str, str]:
    """The fields bound to the log lines of the current task (the delivery being handled)."""
    return _log_context.get()


def bind_log_context(**fields: str) -> None:
    """Add `fields` to the log lines from here to the end of the delivery being handled (and of
    the tasks it starts from here on)."""
    _log_context.set(MappingProxyType({**_log_context.get(), **fields}))


@contextmanager
def bound_log_context(**fields: str) -> Iterator[None]:
    """`fields` on every log line inside the block; what was bound before, after it."""
    token = _log_context.set(MappingProxyType({**_log_context.get(), **fields}))
    try:
        yield
    finally:
        _log_context.reset(token)


def _job_uid(body: object) -> str | None:
    """The job a body is about, when it says so itself."""
    match body:
        case EventPublished(event=event):
            return event.job_uid
        case GetJob(job_uid=job_uid) | GetOutputs(job_uid=job_uid):
            return job_uid
    return None


class LogContext:
    """Binds the delivery's message id, queue, body type and (when known) job uid to every log
    line of the handler."""

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        fields = {
            "message_id": envelope.message_id,
            "queue": meta.queue,
            "message_type": envelope.body.type,
        }
        if (job_uid := _job_uid(envelope.body)) is not None:
            fields["job_uid"] = job_uid
        with bound_log_context(**fields):
            await call_next(envelope, meta)


# --- refusals ------------------------------------------------------------------------------------


@dataclass
class _Answer:
    given: bool = False


_answer: ContextVar[_Answer | None] = ContextVar("parjobs_request_answer", default=None)


def mark_answered() -> None:
    """The request being handled has its answer (sent now, or by an earlier delivery): from here
    on a refusal is a failure of the work that follows, and the broker delivers it again."""
    answer = _answer.get()
    if answer is not None:
        answer.given = True


class RefusalReplies:
    """A refusal raised while answering a request becomes the request's `ErrorReply`, and the
    message is done. A refusal after the answer, or in a message nobody waits on (an event),
    propagates like any other failure: the broker delivers the message again."""

    def __init__(self, send_reply: SendReply) -> None:
        self._send_reply = send_reply

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        answer = _Answer()
        token = _answer.set(answer)
        try:
            await call_next(envelope, meta)
        except ParjobsError as exc:
            if not exc.refusal or answer.given or not meta.reply_to:
                raise
            log.info("refused (%s): %s", exc.code, exc)
            await self._send_reply(meta, exc.to_reply())
        finally:
            _answer.reset(token)
