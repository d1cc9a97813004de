"""What every parjobs daemon shares: connections, consuming through the middleware, publishing
events, replies, logs, health, shutdown.

A daemon is a `setup` function that declares its queues and starts its consumers on a
`ServiceContext`; `serve` runs it until SIGTERM or SIGINT, then drains in-flight work within
`shutdown_grace_s` (what does not finish is requeued by the broker) and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskGroup

from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker, IncomingMeta
from orchestrator.broker.topology import QueueSpec
from orchestrator.core.layout import JobKeys
from orchestrator.errors import ConfigurationError
from orchestrator.settings import AMQPSettings, S3Settings, ServiceSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.registry import PARRegistry
from orchestrator.store.s3 import S3ObjectStore
from schemas.events import JobEvent
from schemas.messages import Envelope, EventPublished, MessageBody
from workers.middleware import (
    EnvelopeHandler,
    LogContext,
    Middleware,
    RefusalReplies,
    log_context,
    mark_answered,
    wrap,
)

log = logging.getLogger("parjobs.service")


@dataclass
class ServiceContext:
    role: str
    settings: ServiceSettings
    store: ObjectStore
    broker: Broker
    keys: JobKeys
    log: EventLog
    registry: PARRegistry
    middlewares: list[Middleware] = field(init=False)
    """Wrapped around every handler `consume` starts, the first outermost."""

    def __post_init__(self) -> None:
        self.middlewares = [LogContext(), RefusalReplies(self.reply)]

    @property
    def sender(self) -> str:
        return f"{self.role}@{socket.gethostname()}:{os.getpid()}"

    async def publish_event(self, event: JobEvent) -> None:
        """Publish an appended event: routing key `job.<uid>.<type>`, message id = event id."""
        await self.broker.publish(
            self.broker.topology.events,
            f"job.{event.job_uid}.{event.payload.type}",
            Envelope(sender=self.sender, body=EventPublished(event=event)),
            message_id=event.event_id,
        )

    async def reply(self, meta: IncomingMeta, body: MessageBody) -> None:
        """Answer the request being handled (after which a refusal no longer answers it)."""
        mark_answered()
        await self.broker.reply(meta, Envelope(sender=self.sender, body=body))

    async def consume(
        self, queue: QueueSpec, handler: EnvelopeHandler, *, prefetch: int | None = None
    ) -> None:
        """Run `handler`, inside the middlewares, on each message of `queue` that is one of the
        queue's own union (`queue.accepts`); any other message is dead-lettered."""
        if queue.accepts is None:
            raise ConfigurationError(f"queue {queue.name} does not say which messages it takes")
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


async def _health_server(broker: Broker, port: int, task_group: TaskGroup) -> None:
    """/healthz: the process answers. /readyz: the broker connection is up (503 otherwise)."""

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = (await stream.receive(1024)).decode(errors="replace")
            path = request.split(" ", 2)[1] if request.count(" ") >= 2 else "/"
            ready = broker.is_connected
            body: dict[str, object] = {"ready": ready, "reconnections": broker.reconnections}
            if path.startswith("/readyz"):
                status = "200 OK" if ready else "503 Service Unavailable"
            elif path.startswith("/healthz"):
                status = "200 OK"
            else:
                status, body = "404 Not Found", {"paths": ["/healthz", "/readyz"]}
            payload = json.dumps(body).encode()
            head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            await stream.send(head.encode() + payload)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    task_group.start_soon(listener.serve, answer)


async def serve(role: str, setup: Setup) -> None:
    """Run the daemon `role` until SIGTERM/SIGINT; then drain and exit."""
    configure_logging(role)
    settings = ServiceSettings()
    async with (
        S3ObjectStore(S3Settings()) as store,
        AMQPBroker(AMQPSettings(), name=f"parjobs-{role}-{os.getpid()}") as broker,
    ):
        await store.ensure_bucket()
        keys = JobKeys(settings.data_root)
        context = ServiceContext(
            role=role,
            settings=settings,
            store=store,
            broker=broker,
            keys=keys,
            log=EventLog(store, keys.jobs),
            registry=PARRegistry(store, root=keys.registry),
        )
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as group:
                await setup(context, group)
                if settings.health_port is not None:
                    await _health_server(broker, settings.health_port, group)
                log.info("%s ready (broker prefix %r)", role, broker.settings.prefix)
                async for received in signals:
                    log.info("%s stopping on %s", role, signal.Signals(received).name)
                    break
                drained = await broker.drain(settings.shutdown_grace_s)
                log.info("%s stopped (%s)", role, "drained" if drained else "work requeued")
                group.cancel_scope.cancel()
