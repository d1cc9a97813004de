"""Tracing: a delivery is handled in a consumer span continuing the W3C trace context of its
`traceparent` header, which every message published meanwhile carries on, and which the log
lines name."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Tracer

from orchestrator.broker._publish import outgoing
from orchestrator.broker.base import IncomingMeta
from schemas.messages import Envelope, GetJob
from workers.middleware import LogContext, Tracing, wrap
from workers.runtime import _JsonLines

JOB_UID = "0123456789abcdef" * 2
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


def _meta(headers: Mapping[str, Any]) -> IncomingMeta:
    return IncomingMeta(
        queue="p.rpc.access",
        message_id="amqp-id",
        correlation_id="corr",
        reply_to="p.reply.caller",
        exchange="p.commands",
        routing_key="rpc.access",
        redelivered=False,
        delivery_count=0,
        headers=headers,
        timestamp=None,
    )


def _get_job() -> Envelope[GetJob]:
    return Envelope(sender="test", body=GetJob(job_uid=JOB_UID))


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exported: InMemorySpanExporter) -> Iterator[Tracer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    yield provider.get_tracer("test")
    provider.shutdown()


class Seen:
    """A handler that logs a line and publishes a message, and keeps both."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.published_headers: list[Mapping[str, Any]] = []
        self._format = _JsonLines("access")

    async def __call__(self, envelope: Envelope[Any], meta: IncomingMeta) -> None:
        record = logging.LogRecord("parjobs.service", logging.INFO, __file__, 1, "hi", (), None)
        self.lines.append(json.loads(self._format.format(record)))
        message = outgoing(envelope.body, app_id="test")
        self.published_headers.append(message.headers)


@pytest.mark.parametrize(
    "header", [TRACEPARENT, TRACEPARENT.encode()], ids=["text header", "bytes header"]
)
async def test_a_delivery_continues_its_trace_in_a_consumer_span(
    tracer: Tracer, exported: InMemorySpanExporter, header: str | bytes
) -> None:
    seen = Seen()
    await wrap(seen, [Tracing(tracer), LogContext()])(_get_job(), _meta({"traceparent": header}))

    (span,) = exported.get_finished_spans()
    assert span.kind is SpanKind.CONSUMER
    assert span.name == "process get_job"
    assert span.context is not None
    assert trace.format_trace_id(span.context.trace_id) == TRACE_ID
    assert span.parent is not None
    assert trace.format_span_id(span.parent.span_id) == PARENT_SPAN_ID
    assert span.attributes is not None
    assert span.attributes["parjobs.job_uid"] == JOB_UID
    assert span.attributes["messaging.destination.name"] == "p.rpc.access"
    # What the handler publishes is a child of its span; its log lines name the trace.
    own_span = trace.format_span_id(span.context.span_id)
    assert seen.published_headers == [{"traceparent": f"00-{TRACE_ID}-{own_span}-01"}]
    assert seen.lines[0]["trace_id"] == TRACE_ID
    assert seen.lines[0]["job_uid"] == JOB_UID


async def test_a_delivery_without_a_trace_starts_one(
    tracer: Tracer, exported: InMemorySpanExporter
) -> None:
    seen = Seen()
    await wrap(seen, [Tracing(tracer), LogContext()])(_get_job(), _meta({}))
    (span,) = exported.get_finished_spans()
    assert span.parent is None
    assert span.context is not None
    trace_id = trace.format_trace_id(span.context.trace_id)
    assert seen.lines[0]["trace_id"] == trace_id
    assert seen.published_headers[0]["traceparent"].split("-")[1] == trace_id


async def test_with_tracing_off_the_incoming_trace_is_still_passed_on() -> None:
    """No tracer provider (the API's no-op tracer): nothing is recorded, but what the handler
    publishes and logs still names the trace the delivery came with."""
    seen = Seen()
    chain = wrap(seen, [Tracing(trace.NoOpTracer()), LogContext()])
    await chain(_get_job(), _meta({"traceparent": TRACEPARENT}))
    assert seen.published_headers[0]["traceparent"].split("-")[1] == TRACE_ID
    assert seen.lines[0]["trace_id"] == TRACE_ID


async def test_without_any_trace_nothing_is_invented() -> None:
    seen = Seen()
    await wrap(seen, [Tracing(trace.NoOpTracer()), LogContext()])(_get_job(), _meta({}))
    assert seen.published_headers == [{}]
    assert "trace_id" not in seen.lines[0]
