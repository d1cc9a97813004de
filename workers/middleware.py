"""Middleware: what every daemon handler needs, written once and wrapped around each handler.

A middleware is one layer around a handler (as Dramatiq's middleware and FastStream's middlewares
are): it gets the validated envelope, the delivery's metadata and `call_next`, the rest of the
chain, and may act before it, after it, or on what it raises. `wrap` builds the chain once, when a
consumer starts. The layers, outermost first:

- `Metrics` counts every delivery by outcome, times its handler and records its queue lag
  (`orchestrator.metrics`);
- `Tracing` handles the delivery in a consumer span continuing the W3C trace context its
  `traceparent` header carries (`workers.tracing`);
- `LogContext` binds the delivery's message id, queue, body type, trace id (when there is a
  trace) and job uid (when the body names one; a handler adds one it learns with
  `bind_log_context`) to every log line of the handler;
- `RefusalReplies` turns a refusal (`ParjobsError.refusal`) raised while answering a request into
  the request's `ErrorReply`, after which the message is done (acked); anything else propagates,
  so the broker delivers the message again (or the consumer dead-letters a poison message);
- `VerifyRequests` lets a request through only if the broker-verified sender (its `user_id`) is
  a registered user, its reply queue is theirs, and it is signed by that very user's key
  (`verified_requester()` then names them to the handler); `VerifyEvents` lets an event through
  only if a role allowed to emit it sealed it; `VerifyDeadlines` lets a job's deadline through
  only if access published and signed it.

Why here, in `workers`, and not under `orchestrator/broker`: the broker seam is generic (any
`TypeAdapter`, any handler) and knows nothing of parjobs' envelopes, errors or logs, while these
layers are the services' policy over exactly those. A wrapped handler is still just a handler to
the broker, so any broker (the real one, a twin in tests) runs them the same.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Protocol

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Tracer

from orchestrator.broker.base import IncomingMeta
from orchestrator.broker.identities import Identities, Role
from orchestrator.core.chain import verify_event
from orchestrator.core.keys import PublicKeys
from orchestrator.core.message_signing import verify_message
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import (
    ParjobsError,
    PoisonMessageError,
    RequesterMismatchError,
    SignatureError,
    UnknownUserError,
    UnsignedError,
)
from orchestrator.metrics import (
    HANDLER_SECONDS,
    HANDLERS_IN_FLIGHT,
    MESSAGE_LAG_SECONDS,
    MESSAGES_CONSUMED,
    MESSAGES_REDELIVERED,
    MESSAGES_REFUSED,
)
from orchestrator.store.users import UserRegistry
from schemas.auth import UserRecord
from schemas.messages import (
    Envelope,
    ErrorReply,
    EventPublished,
    GetJob,
    GetOutputs,
    GetRunStatus,
    JobDeadline,
    StartRun,
    StopRun,
)

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
        case (
            GetJob(job_uid=job_uid)
            | GetOutputs(job_uid=job_uid)
            | StartRun(job_uid=job_uid)
            | StopRun(job_uid=job_uid)
            | GetRunStatus(job_uid=job_uid)
        ):
            return job_uid
    return None


class LogContext:
    """Binds the delivery's message id, queue, body type and (when known) trace id and job uid
    to every log line of the handler."""

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
        if (span := trace.get_current_span().get_span_context()).is_valid:
            fields["trace_id"] = trace.format_trace_id(span.trace_id)
        with bound_log_context(**fields):
            await call_next(envelope, meta)


# --- metrics -------------------------------------------------------------------------------------


class Metrics:
    """Counts every delivery by queue, type and outcome, times its handler, and records how
    long it waited in its queue and how many of the queue's deliveries are in flight (see
    `orchestrator.metrics`). Outermost, so it sees the whole chain's outcome."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        message_type = str(envelope.body.type)
        if meta.timestamp is not None:
            lag = (self._clock() - meta.timestamp).total_seconds()
            MESSAGE_LAG_SECONDS.labels(meta.queue).observe(max(lag, 0.0))
        if meta.redelivered:
            MESSAGES_REDELIVERED.labels(meta.queue, message_type).inc()
        outcome = "failed"  # unless the chain returns, or marks the message poison
        with (
            HANDLERS_IN_FLIGHT.labels(meta.queue).track_inprogress(),
            HANDLER_SECONDS.labels(meta.queue, message_type).time(),
        ):
            try:
                await call_next(envelope, meta)
                outcome = "ok"
            except PoisonMessageError:
                outcome = "poison"
                raise
            finally:
                MESSAGES_CONSUMED.labels(meta.queue, message_type, outcome).inc()


# --- tracing -------------------------------------------------------------------------------------

_tracer = trace.get_tracer("parjobs.service")


def _trace_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """The headers a W3C propagator reads, as text (AMQP may hand a string header over as bytes)."""
    return {
        name: value.decode(errors="replace") if isinstance(value, bytes) else value
        for name, value in headers.items()
        if isinstance(value, str | bytes)
    }


class Tracing:
    """Handles the delivery in a consumer span: a child of the trace its `traceparent` header
    carries (a new trace if none), current while the handler runs, so what the handler publishes
    and the S3 calls it makes belong to it. With tracing off, the incoming trace context is still
    current, and passed on."""

    def __init__(self, tracer: Tracer | None = None) -> None:
        self._tracer = tracer or _tracer

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": meta.queue,
            "messaging.message.id": envelope.message_id,
            "parjobs.message_type": str(envelope.body.type),
        }
        if (job_uid := _job_uid(envelope.body)) is not None:
            attributes["parjobs.job_uid"] = job_uid
        with self._tracer.start_as_current_span(
            f"process {envelope.body.type}",
            context=propagate.extract(_trace_headers(meta.headers)),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ):
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
            MESSAGES_REFUSED.labels(str(envelope.body.type), exc.code).inc()
            await self._send_reply(meta, exc.to_reply())
        finally:
            _answer.reset(token)


# --- who sent a request, and whether they signed it -----------------------------------------------


@dataclass(frozen=True)
class Requester:
    """The registered user a request came from: the broker vouches for `username`, the request's
    signature for `fingerprint`, and the user registry that both are `name`'s."""

    name: str
    fingerprint: str
    username: str


_requester: ContextVar[Requester | None] = ContextVar("parjobs_requester", default=None)


def verified_requester() -> Requester:
    """The user whose request is being handled, as `VerifyRequests` verified them; a handler
    reached without that check refuses (UnsignedError) rather than act for nobody."""
    requester = _requester.get()
    if requester is None:
        raise UnsignedError("this request was not verified: no signed requester is known")
    return requester


_CACHED_USERS = 4096


class VerifyRequests:
    """Lets a request through only from a registered user who signed it, to a reply queue of
    theirs; binds them for `verified_requester()`.

    In order: the broker-verified sender (`meta.user_id`, through `Identities.requester`) must be
    a registered user's broker user, and the reply queue in their namespace (else the request is
    dead-lettered: there is nobody to answer, and no one else's queue is answered); then the
    signature must verify against the key registered under the fingerprint it names, within
    `window` of this clock (a `SignatureError` refusal), and that key's user must be the sender
    (`RequesterMismatchError`): a request captured from one user and sent by another is refused.
    Events and deadlines pass untouched (`VerifyEvents` and `VerifyDeadlines` check those).
    """

    def __init__(
        self,
        users: UserRegistry,
        identities: Identities,
        *,
        window: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._users = users
        self._identities = identities
        self._window = window
        self._clock = clock
        # A registered key is its user's for good (one name, one key): safe to remember.
        self._by_fingerprint: OrderedDict[str, UserRecord] = OrderedDict()

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        if isinstance(envelope.body, EventPublished | JobDeadline):
            await call_next(envelope, meta)
            return
        requester = self._identities.requester(meta.user_id, meta.headers)
        if requester is None or meta.user_id is None:
            raise PoisonMessageError(
                f"request {envelope.message_id} was sent by broker user {meta.user_id!r}, who is "
                "no registered user of this deployment: not answered"
            )
        if not meta.reply_to or not self._identities.owns(meta.user_id, meta.reply_to):
            raise PoisonMessageError(
                f"request {envelope.message_id} from {requester} asks for its reply on "
                f"{meta.reply_to!r}, which is not {requester}'s: not answered"
            )
        # The broker delivering a request again (its handler died) is no one sending it anew:
        # judged by its time now, a redelivery after the window would strand what its first
        # delivery began (a hold of the user's money, say).
        window = timedelta.max if meta.redelivered else self._window
        signer = await self._signer(envelope, window)
        if signer.name != requester:
            raise RequesterMismatchError(
                f"request {envelope.message_id} is signed by user {signer.name!r} but was sent by "
                f"user {requester!r}: a user sends only requests they signed themselves"
            )
        key = PublicKeys.from_wire(signer.public_key)
        token = _requester.set(Requester(signer.name, key.fingerprint, meta.user_id))
        try:
            await call_next(envelope, meta)
        finally:
            _requester.reset(token)

    async def _signer(self, envelope: Envelope[Any], window: timedelta) -> UserRecord:
        """The registered user whose key signed `envelope` (a SignatureError if none did)."""
        signature = envelope.signature
        record = None if signature is None else await self._user(signature.signer)
        keys = [] if record is None else [PublicKeys.from_wire(record.public_key)]
        verify_message(
            signature,
            message_id=envelope.message_id,
            sent_at=envelope.sent_at,
            body=envelope.body,
            keys=keys,
            now=self._clock(),
            window=window,
        )
        assert record is not None  # verify_message refuses a signer with no key
        return record

    async def _user(self, fingerprint: str) -> UserRecord | None:
        record = self._by_fingerprint.get(fingerprint)
        if record is None:
            try:
                record = await self._users.by_fingerprint(fingerprint)
            except UnknownUserError:
                return None
            self._by_fingerprint[fingerprint] = record
            while len(self._by_fingerprint) > _CACHED_USERS:
                self._by_fingerprint.popitem(last=False)
        return record


class VerifyEvents:
    """Lets an event through only if it is sealed by a service role allowed to emit it; anything
    else is dead-lettered with the reason, never acted on. Requests pass untouched."""

    def __init__(self, keys: ServiceKeys) -> None:
        self._keys = keys

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        if isinstance(envelope.body, EventPublished):
            try:
                verify_event(envelope.body.event, self._keys)
            except SignatureError as exc:
                raise PoisonMessageError(f"event refused ({exc.code}): {exc}") from exc
        await call_next(envelope, meta)


class VerifyDeadlines:
    """Lets a job's deadline through only if access's broker user published it (the `user_id`
    RabbitMQ validated) and an access key signed it; anything else is dead-lettered, never acted
    on. Its time is not judged (a deadline waits out the job's lifetime in a delay queue by
    design), nor need it be: the handler judges the job by its own log, so a deadline replayed
    or sent early expires nothing before its time. Other messages pass untouched."""

    def __init__(self, keys: ServiceKeys, identities: Identities) -> None:
        self._keys = keys
        self._identities = identities

    async def __call__(
        self, envelope: Envelope[Any], meta: IncomingMeta, call_next: EnvelopeHandler
    ) -> None:
        if isinstance(envelope.body, JobDeadline):
            if self._identities.role_of(meta.user_id or "") is not Role.ACCESS:
                raise PoisonMessageError(
                    f"deadline {envelope.message_id} was published by broker user "
                    f"{meta.user_id!r}, not by access: refused"
                )
            try:
                verify_message(
                    envelope.signature,
                    message_id=envelope.message_id,
                    sent_at=envelope.sent_at,
                    body=envelope.body,
                    keys=self._keys.keys_for(Role.ACCESS),
                    now=datetime.now(UTC),
                    window=timedelta.max,
                )
            except SignatureError as exc:
                raise PoisonMessageError(f"deadline refused ({exc.code}): {exc}") from exc
        await call_next(envelope, meta)
