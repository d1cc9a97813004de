"""What every parjobs daemon shares: connections, consuming through the middleware, publishing
events, signed replies, logs, health, shutdown.

A daemon is a `setup` function that starts its consumers on a `ServiceContext`; `serve` runs it
until SIGTERM or SIGINT, then drains in-flight work within `shutdown_grace_s` (what does not
finish is requeued by the broker) and exits.

Each daemon is one service role: it connects to the broker as the role's own broker user (the
operator has declared the topology; `PARJOBS_AMQP_URL` carries the role's credentials), signs its
replies and seals the events it appends with the role's key (`PARJOBS_KEY_FILE`), and checks what
it consumes against the registered users' keys and the operator's service keys
(`PARJOBS_SERVICE_KEYS_FILE`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import httpx
from aiohttp import web
from anyio.abc import TaskGroup
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker, IncomingMeta
from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import QueueSpec
from orchestrator.core.keys import KeyPair
from orchestrator.core.layout import JobKeys
from orchestrator.core.message_signing import sign_message
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import (
    ConfigurationError,
    ObjectStoreError,
    ParjobsError,
    PoisonMessageError,
)
from orchestrator.metrics import (
    DEAD_LETTER_QUEUE_DEPTH,
    HANDLER_SLOTS,
    JOB_TRANSITIONS,
    MESSAGES_PUBLISHED,
    QUEUE_DEPTH,
)
from orchestrator.settings import AMQPSettings, S3Settings, ServiceSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog, EventSealer
from orchestrator.store.registry import PARRegistry
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.users import UserRegistry
from schemas.events import JobEvent
from schemas.messages import Envelope, EventPublished, MessageBody, ProgressReport
from schemas.signing import ServiceRole
from workers.middleware import (
    EnvelopeHandler,
    LogContext,
    Metrics,
    Middleware,
    RefusalReplies,
    Tracing,
    VerifyDeadlines,
    VerifyEvents,
    VerifyRequests,
    log_context,
    mark_answered,
    wrap,
)
from workers.tracing import configure_tracing

log = logging.getLogger("parjobs.service")
CONSUMER_CHECK_INTERVAL = 1.0
"""Seconds between checks that every consumer is still consuming (a local look, no round trip)."""


@dataclass
class ServiceContext:
    """One daemon's role, key, stores and broker, and what its handlers share."""

    role: ServiceRole
    settings: ServiceSettings
    store: ObjectStore
    broker: Broker
    keys: JobKeys
    key: KeyPair
    """The role's key pair: signs replies, seals appended events."""
    service_keys: ServiceKeys
    """Every role's public keys: what consumed events are checked against."""
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    """This daemon's own id (names the queues it declares for itself)."""
    http: httpx.AsyncClient | None = None
    """The daemon's one client for presigned transfers (its TLS context and connections made
    once); None: each transfer makes its own."""
    log: EventLog = field(init=False)
    registry: PARRegistry = field(init=False)
    identities: Identities = field(init=False)
    middlewares: list[Middleware] = field(init=False)
    """Wrapped around every handler `consume` starts, the first outermost."""

    def __post_init__(self) -> None:
        if self.key.public != self.service_keys.current(self.role):
            raise ConfigurationError(
                f"the {self.role} key file holds key {self.key.fingerprint[:16]}…, but the "
                f"service keys file names another as {self.role}'s current key: give the daemon "
                "its own key file, or the service keys file that lists it"
            )
        self.log = EventLog(
            self.store,
            self.keys.jobs,
            sealer=EventSealer(self.key, self.role),
            keys=self.service_keys,
        )
        self.registry = PARRegistry(self.store, root=self.keys.registry, log=self.log)
        self.identities = Identities(self.broker.topology)
        users = UserRegistry(self.store, self.keys.users)
        window = timedelta(seconds=self.settings.auth_window_s)
        self.middlewares = [
            Metrics(),
            Tracing(),
            LogContext(),
            RefusalReplies(self._reply),
            VerifyEvents(self.service_keys),
            VerifyDeadlines(self.service_keys, self.identities),
            VerifyRequests(users, self.identities, window=window),
        ]

    @property
    def sender(self) -> str:
        return f"{self.role}@{socket.gethostname()}:{os.getpid()}"

    async def publish_event(self, event: JobEvent) -> None:
        """Publish an appended event: routing key `job.<owner>.<job uid>.<type>` (the owner's
        broker username), message id = event id (consumers de-duplicate by it)."""
        owner = self.identities.user_username(await self.log.owner(event.job_uid))
        await self.broker.publish(
            self.broker.topology.events,
            self.identities.event_routing_key(owner, event.job_uid, event.payload.type),
            Envelope(sender=self.sender, body=EventPublished(event=event)),
            message_id=event.event_id,
        )
        MESSAGES_PUBLISHED.labels("event", event.payload.type).inc()
        JOB_TRANSITIONS.labels(event.payload.type).inc()

    async def publish_progress(self, owner: str, report: ProgressReport) -> None:
        """Publish a run's progress to the job's `owner` (a registered name) alone: under the
        job's routing key (`job.<owner>.<job uid>.progress`), signed by this role."""
        await self.broker.publish(
            self.broker.topology.events,
            self.identities.event_routing_key(
                self.identities.user_username(owner), report.job_uid, "progress"
            ),
            self.signed(report),
        )
        MESSAGES_PUBLISHED.labels("progress", report.type).inc()

    async def reply(self, meta: IncomingMeta, body: MessageBody) -> None:
        """Answer the request being handled, signed by this role (after which a refusal no
        longer answers it)."""
        mark_answered()
        await self._reply(meta, body)

    async def _reply(self, meta: IncomingMeta, body: MessageBody) -> None:
        # Only to a queue of the broker-verified requester's: never into anyone else's.
        if meta.user_id is None or not self.identities.owns(meta.user_id, meta.reply_to or ""):
            raise PoisonMessageError(
                f"request {meta.message_id} asks for its reply on {meta.reply_to!r}, which is "
                f"not its sender's ({meta.user_id!r}): not answered"
            )
        await self.broker.reply(meta, self.signed(body))
        MESSAGES_PUBLISHED.labels("reply", body.type).inc()

    def signed(self, body: MessageBody) -> Envelope[MessageBody]:
        """`body` in an envelope from this daemon, signed by its role."""
        envelope = Envelope(sender=self.sender, body=body)
        signature = sign_message(
            self.key,
            self.role,
            message_id=envelope.message_id,
            sent_at=envelope.sent_at,
            body=body,
        )
        return envelope.model_copy(update={"signature": signature})

    async def consume(
        self, queue: QueueSpec, handler: EnvelopeHandler, *, prefetch: int | None = None
    ) -> None:
        """Run `handler`, inside the middlewares, on each message of `queue` that is one of the
        queue's own union (`queue.accepts`) and passes the checks; any other message is
        dead-lettered."""
        if queue.accepts is None:
            raise ConfigurationError(f"queue {queue.name} does not say which messages it takes")
        HANDLER_SLOTS.labels(queue.name).set(prefetch or self.broker.settings.prefetch)
        await self.broker.consume(
            queue, queue.accepts.envelope, wrap(handler, self.middlewares), prefetch=prefetch
        )


Setup = Callable[[ServiceContext, TaskGroup], Awaitable[None]]


class _JsonLines(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self._role,
            "logger": record.name,
            "message": record.getMessage(),
            **log_context(),  # the delivery being handled, bound by the LogContext middleware
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(role: str) -> None:
    """Structured logs: one JSON object per line on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("PARJOBS_LOG_LEVEL", "INFO").upper())


async def readiness(broker: Broker, store: ObjectStore) -> dict[str, object]:
    """Whether the daemon can do its work now: the broker connection is up, every consumer is
    consuming (none cancelled by the broker and not yet restored), and the bucket answers."""
    problems: list[str] = []
    if not broker.is_connected:
        problems.append("the broker connection is down")
    elif lost := await broker.lost_consumers():
        problems.append(f"not consuming {', '.join(lost)}")
    try:
        with anyio.fail_after(5):
            await store.check()
    except (ObjectStoreError, TimeoutError) as exc:
        problems.append(f"the object store does not answer: {exc or 'timed out'}")
    return {"ready": not problems, "problems": problems, "reconnections": broker.reconnections}


async def keep_consuming(broker: Broker) -> None:
    """Declare again any queue deleted under a consumer, so the consumer comes back."""
    while True:
        await anyio.sleep(CONSUMER_CHECK_INTERVAL)
        if broker.is_connected and (lost := await broker.lost_consumers(redeclare=True)):
            log.warning("consumers of %s cancelled by the broker; declared again", lost)


_HEALTH_PATHS = ("/healthz", "/readyz", "/metrics")


def health_app(broker: Broker, store: ObjectStore) -> web.Application:
    """/healthz: the process answers. /readyz: `readiness` (503 unless ready). /metrics: the
    Prometheus metrics (`orchestrator.metrics`), the depths of the consumed queues and of the
    dead-letter queue asked of the broker at each scrape."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        body = await readiness(broker, store)
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def metrics(_: web.Request) -> web.Response:
        try:
            with anyio.fail_after(5):
                DEAD_LETTER_QUEUE_DEPTH.set((await broker.check()).dead_letters)
                for queue, depth in (await broker.queue_depths()).items():
                    QUEUE_DEPTH.labels(queue).set(depth)
        except (ParjobsError, TimeoutError) as exc:  # the rest still says what this daemon did
            log.warning("no queue depths for this scrape: %s", exc)
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(_: web.Request) -> web.Response:
        return web.json_response({"paths": list(_HEALTH_PATHS)}, status=404)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{anything:.*}", not_found)
    return app


@asynccontextmanager
async def health_server(
    broker: Broker, store: ObjectStore, host: str, port: int
) -> AsyncIterator[None]:
    """`health_app` served on `host`:`port` (aiohttp) while the block runs."""
    runner = web.AppRunner(health_app(broker, store), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield
    finally:
        with anyio.CancelScope(shield=True):  # it closes inside the daemon's cancelled group
            await runner.cleanup()


async def serve(role: ServiceRole, setup: Setup) -> None:
    """Run the daemon `role` until SIGTERM/SIGINT; then drain and exit."""
    configure_logging(role)
    tracing = configure_tracing(role)
    try:
        await _serve(role, setup)
    finally:
        if tracing is not None:
            tracing.shutdown()  # exports what is still batched


async def _serve(role: ServiceRole, setup: Setup) -> None:
    settings = ServiceSettings()
    key = settings.role_key(role)
    service_keys = settings.service_keys()
    async with (
        S3ObjectStore(S3Settings()) as store,
        AMQPBroker(AMQPSettings(), name=f"parjobs-{role}-{os.getpid()}") as broker,
        httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0)) as http,
    ):
        await store.ensure_bucket()
        context = ServiceContext(
            role=role,
            settings=settings,
            store=store,
            broker=broker,
            keys=JobKeys(settings.data_root),
            key=key,
            service_keys=service_keys,
            http=http,
        )
        async with AsyncExitStack() as stack:
            signals = stack.enter_context(anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
            group = await stack.enter_async_context(anyio.create_task_group())
            await setup(context, group)
            group.start_soon(keep_consuming, broker)
            if settings.health_port is not None:
                await stack.enter_async_context(
                    health_server(broker, store, settings.health_host, settings.health_port)
                )
            log.info(
                "%s ready (broker prefix %r, as %s)",
                role,
                broker.settings.prefix,
                broker.username,
            )
            async for received in signals:
                log.info("%s stopping on %s", role, signal.Signals(received).name)
                break
            drained = await broker.drain(settings.shutdown_grace_s)
            log.info("%s stopped (%s)", role, "drained" if drained else "work requeued")
            group.cancel_scope.cancel()
