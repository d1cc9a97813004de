"""Tracing: each daemon's OpenTelemetry tracer provider, configured by the standard `OTEL_*`
variables and off unless `OTEL_TRACES_EXPORTER` names an exporter.

What is traced: the W3C trace context travels in every AMQP message's headers (`traceparent`,
injected by `orchestrator.broker._publish.outgoing`); each delivery is handled in a consumer span
that continues it (`workers.middleware.Tracing`), and each S3 request is a client span
(`orchestrator.store.s3`). So a job submitted and started under one client span is one trace
through access, storage and compute, and back in the replies and events.

Why not opentelemetry's aio-pika and botocore instrumentations: the aio-pika one supports
aio-pika below 10 (parjobs uses 10), and the botocore one times the synchronous botocore client,
not aiobotocore's. The propagation and spans here use only the OpenTelemetry API; the SDK is
configured only when an exporter is asked for.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from orchestrator.errors import ConfigurationError


def _exporter(name: str) -> SpanExporter:
    if name == "otlp":
        # Reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    raise ConfigurationError(
        f"OTEL_TRACES_EXPORTER={name!r}: parjobs exports traces with 'otlp' (OTLP over HTTP) "
        "or 'console', or not at all ('none', or unset)"
    )


def configure_tracing(role: str) -> TracerProvider | None:
    """Install a tracer provider for daemon `role` exporting to OTEL_TRACES_EXPORTER (batched,
    as OTEL_BSP_* say), or None when tracing is off (the exporter unset or 'none', or
    OTEL_SDK_DISABLED=true). Shut the provider down at exit: it flushes what is batched."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if name == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": f"parjobs-{role}"}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    return provider
