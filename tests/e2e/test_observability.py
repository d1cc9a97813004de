"""Observability end to end, the three daemons as processes: after a job, each one's /metrics is
scraped and parsed with prometheus-client's own parser, and says what the daemon did; and the job,
submitted and started under one client span, is one trace through access, storage and compute, as
the daemons export it over OTLP/HTTP to a receiver the test runs."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import httpx
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from orchestrator.settings import ServiceSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobState
from schemas.messages import EventPublished
from tests._waiting import eventually
from tests.e2e.test_e2e import ENVELOPE, HAPPY_PATH, Harness, open_cluster, payload
from workers.cluster import ROLES

pytestmark = pytest.mark.integration

MAX_RUNS = 3


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: str
    name: str
    attributes: dict[str, str]


class OTLPReceiver:
    """An OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf): keeps every span sent."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = _text_attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(
                    ReceivedSpan(
                        service=resource["service.name"],
                        trace_id=span.trace_id.hex(),
                        name=span.name,
                        attributes=_text_attributes(span.attributes),
                    )
                    for span in scope_spans.spans
                )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]


def _text_attributes(attributes: Iterable[KeyValue]) -> dict[str, str]:
    return {item.key: item.value.string_value for item in attributes if item.value.string_value}


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[tuple[OTLPReceiver, str]]:
    """The receiver, and the URL the daemons export to."""
    received = OTLPReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", received.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    (host, port, *_) = runner.addresses[0]
    try:
        yield received, f"http://{host}:{port}/v1/traces"
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
async def harness(
    seaweed: LocalSeaweed, store: ObjectStore, receiver: tuple[OTLPReceiver, str]
) -> AsyncIterator[Harness]:
    overrides = {
        "PARJOBS_MAX_RUNS": str(MAX_RUNS),
        "PARJOBS_SWEEP_INTERVAL_S": "3600",  # no sweep re-publishing a job's end, out of its trace
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver[1],
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: export spans soon after they end
    }
    async with open_cluster(seaweed, store, overrides) as opened:
        yield opened


async def scrape(harness: Harness, role: str) -> list[Sample]:
    """Every sample `role`'s /metrics serves, as prometheus-client parses it."""
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(harness.health_url(role, "/metrics"))
    assert response.status_code == 200, response.text
    return [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_each_daemon_serves_metrics_of_what_it_did_for_a_job(harness: Harness) -> None:
    data = payload(5000, "observed")
    sheet = await harness.run_job(data)
    assert sheet.state is JobState.COMPLETED, sheet.reason
    scraped = {role: await scrape(harness, role) for role in ROLES}

    transitions = {
        kind: sum(
            total(samples, "parjobs_job_transitions_total", type=kind)
            for samples in scraped.values()
        )
        for kind in HAPPY_PATH
    }
    assert all(count >= 1 for count in transitions.values()), transitions
    assert total(scraped["access"], "parjobs_job_transitions_total", type="submitted") >= 1
    assert total(scraped["compute"], "parjobs_job_transitions_total", type="completed") >= 1
    for role in ROLES:
        samples = scraped[role]
        assert total(samples, "parjobs_messages_consumed_total", outcome="ok") >= 1, role
        assert total(samples, "parjobs_messages_consumed_total", outcome="failed") == 0, role
        assert total(samples, "parjobs_handler_seconds_count") >= 1, role
        assert total(samples, "parjobs_messages_published_total") >= 1, role
        # Every role appends at least one event of the job: a conditional create.
        operation = "put_object_if_absent"
        assert total(samples, "parjobs_s3_request_seconds_count", operation=operation) >= 1, role
        assert total(samples, "parjobs_dead_letter_queue_depth") == 0, role
    # Access holds the job's price and settles it: two ledger appends at least.
    assert total(scraped["access"], "parjobs_ledger_appends_total") >= 2
    runs = harness.topology.rpc_queue("runs").name
    # Compute holds up to PARJOBS_MAX_QUEUED_RUNS starts; MAX_RUNS of them run at once.
    queued_runs = ServiceSettings().max_queued_runs
    assert total(scraped["compute"], "parjobs_handler_slots", queue=runs) == queued_runs
    assert total(scraped["compute"], "parjobs_handlers_in_flight", queue=runs) == 0
    assert total(scraped["compute"], "parjobs_run_slots") == MAX_RUNS
    assert total(scraped["compute"], "parjobs_run_slots_in_use") == 0
    assert total(scraped["compute"], "parjobs_runs_queued") == 0
    assert total(scraped["compute"], "parjobs_handler_seconds_count", queue=runs) >= 1
    depths = {
        sample.labels["queue"]: sample.value
        for sample in scraped["compute"]
        if sample.name == "parjobs_queue_depth"
    }
    assert depths.get(runs) == 0, depths


async def test_one_job_is_one_trace_through_the_three_daemons(
    harness: Harness, receiver: tuple[OTLPReceiver, str]
) -> None:
    received, _ = receiver
    # The client's tracer: what the test's broker connection publishes under its span carries
    # the span's trace (nothing needs exporting from this side).
    provider = TracerProvider()
    client_tracer = provider.get_tracer("e2e-client")
    data = payload(4000, "traced")
    with client_tracer.start_as_current_span("a user's job") as root:
        sheet = await harness.run_job(data)
    assert sheet.state is JobState.COMPLETED, sheet.reason
    trace_id = trace.format_trace_id(root.get_span_context().trace_id)

    def spans_of(service: str) -> list[ReceivedSpan]:
        return [span for span in received.of_trace(trace_id) if span.service == service]

    async def compute_has_exported_the_run() -> bool:
        return any(span.name == "process start_run" for span in spans_of("parjobs-compute"))

    await eventually(compute_has_exported_the_run, "compute exports the run's span", timeout=15)
    for role in ROLES:
        names = {span.name for span in spans_of(f"parjobs-{role}")}
        assert any(name.startswith("process ") for name in names), (role, names)
        assert any(name.startswith("S3 ") for name in names), (role, names)
    # Every span any daemon made about this job is in the client's trace: one job, one trace.
    about_the_job = [
        s for s in received.spans if s.attributes.get("parjobs.job_uid") == sheet.job_uid
    ]
    assert {span.trace_id for span in about_the_job} == {trace_id}
    assert {span.service for span in about_the_job} == {f"parjobs-{role}" for role in ROLES}
    # ...and back: every event of the job on the events stream carries the trace.
    traces_on_stream: set[str | None] = set()
    async for record in harness.operator.read_stream(harness.topology.events_stream, ENVELOPE):
        body = record.value.body
        if isinstance(body, EventPublished) and body.event.job_uid == sheet.job_uid:
            traces_on_stream.add(_trace_of(record.headers.get("traceparent")))
    assert traces_on_stream == {trace_id}
    # The run's log lines (compute's transfers) name the job and its trace.
    log = harness.cluster.log_path("compute").read_text().splitlines()
    lines = [json.loads(line) for line in log if line.startswith("{")]
    assert any(
        line.get("trace_id") == trace_id and line.get("job_uid") == sheet.job_uid for line in lines
    ), log[-20:]


def _trace_of(traceparent: object) -> str | None:
    """The trace id of a W3C `traceparent` header (version-traceid-spanid-flags)."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode()
    return traceparent.split("-")[1] if isinstance(traceparent, str) else None
