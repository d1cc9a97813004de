"""The compute worker's logic on the in-memory store (no RabbitMQ): contract, start, run, stop."""

from __future__ import annotations

import json
import uuid

import anyio
import httpx
import pytest
from pydantic import JsonValue

from orchestrator import PAR, BucketReader, ObjectWriter, PARPermissionError
from orchestrator.errors import PARClosedError, RunRefusedError, UnknownCalculationError
from orchestrator.store.base import ObjectStore
from schemas.events import Completed, ComputeContracted, Failed, JobEvent, JobState
from schemas.messages import GetOutputs, OutputsReply
from tests.unit.test_services import Services
from workers.calculations import CalculationRegistry


@pytest.fixture
async def services(store: ObjectStore, prefix: str, http: httpx.AsyncClient) -> Services:
    ready = Services(store, prefix, http)
    await ready.onboard()
    return ready


async def _ready_job(
    services: Services,
    calculation: str = "checksum",
    parameters: dict[str, JsonValue] | None = None,
) -> tuple[str, PAR, PAR]:
    """Submit and contract a job; returns (job uid, upload PAR, run PAR)."""
    command = services.submit_command(calculation=calculation, parameters=parameters)
    submitted = (await services.access.submit(command, message_id=uuid.uuid4().hex)).events[0]
    contracted = await services.storage.on_submitted(submitted)
    assert contracted is not None
    ready = await services.compute.on_storage_contracted(contracted)
    assert ready is not None
    assert isinstance(ready.payload, ComputeContracted)
    sheet = await services.log.load(submitted.job_uid)
    assert sheet.state is JobState.READY
    assert sheet.upload_par is not None
    return submitted.job_uid, PAR(sheet.upload_par), PAR(ready.payload.run_par)


async def _collect(events: list[JobEvent], event: JobEvent) -> None:
    events.append(event)


async def test_whole_job_through_the_services(services: Services) -> None:
    job_uid, upload, run_par = await _ready_job(services)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(
        b"hello\nworld\n"
    )
    run_url = run_par.execute(services.user, control=services.registry).run_url
    sheet, par_uid, started = await services.compute.claim(run_url, message_id="m1")
    assert sheet.state is JobState.RUNNING
    published: list[JobEvent] = []
    final = await services.compute.run(sheet, par_uid, lambda e: _collect(published, e))
    assert isinstance(final.payload, Completed)
    assert [o.key for o in final.payload.outputs] == ["summary.json"]
    assert published[-1] == final
    # The user reads the outputs through a read PAR from access.
    reply = (await services.access.outputs(GetOutputs(job_uid=job_uid))).reply
    assert isinstance(reply, OutputsReply)
    reader = BucketReader(PAR(reply.read_par), services.user, transport=services.transport)
    summary = json.loads(await reader.get_object("summary.json"))
    assert summary["size_bytes"] == 12
    assert summary["lines"] == 2
    assert started.seq == 4


async def test_run_par_starts_one_run_only(services: Services) -> None:
    _, upload, run_par = await _ready_job(services)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    run_url = run_par.execute(services.user, control=services.registry).run_url
    await services.compute.claim(run_url, message_id="first")
    # A redelivery of the same start message may resume (after a crash) ...
    await services.compute.claim(run_url, message_id="first")
    # ... a second start through the same PAR may not.
    with pytest.raises(RunRefusedError, match="already used"):
        await services.compute.claim(run_url, message_id="second")


async def test_start_before_upload_is_refused_without_using_the_par(services: Services) -> None:
    _, upload, run_par = await _ready_job(services)
    run_url = run_par.execute(services.user, control=services.registry).run_url
    with pytest.raises(RunRefusedError, match="upload it first"):
        await services.compute.claim(run_url, message_id="early")
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    sheet, _, _ = await services.compute.claim(run_url, message_id="later")
    assert sheet.state is JobState.RUNNING


async def test_forged_or_closed_run_capability_is_refused(services: Services) -> None:
    _, _, run_par = await _ready_job(services)
    run_url = run_par.execute(services.user, control=services.registry).run_url
    forged = run_url[:-4] + "AAAA"
    with pytest.raises(PARPermissionError, match="proof of possession"):
        await services.compute.claim(forged, message_id="m")
    with pytest.raises(PARPermissionError, match="not a parjobs run capability"):
        await services.compute.claim("https://evil.example/run", message_id="m")
    await run_par.close(services.user, control=services.registry)
    with pytest.raises(PARClosedError):
        await services.compute.claim(run_url, message_id="m")


async def test_stop_before_start_cancels(services: Services) -> None:
    job_uid, _, run_par = await _ready_job(services)
    run_url = run_par.execute(services.user, control=services.registry).run_url
    reply, event = await services.compute.stop(run_url)
    assert reply.state == "cancelled"
    assert event is not None
    assert (await services.log.load(job_uid)).state is JobState.CANCELLED


async def test_stop_during_run_cancels_it(services: Services) -> None:
    job_uid, upload, run_par = await _ready_job(services, "sleep", {"seconds": 30})
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    run_url = run_par.execute(services.user, control=services.registry).run_url
    sheet, par_uid, _ = await services.compute.claim(run_url, message_id="m")
    published: list[JobEvent] = []
    async with anyio.create_task_group() as group:
        group.start_soon(services.compute.run, sheet, par_uid, lambda e: _collect(published, e))
        await anyio.sleep(1.5)
        reply, _ = await services.compute.stop(run_url)
        assert reply.detail == "stopping"
    final = await services.log.load(job_uid)
    assert final.state is JobState.CANCELLED
    assert any(e.payload.type == "progress" for e in published)


async def test_failing_calculation_ends_failed(services: Services) -> None:
    _, upload, run_par = await _ready_job(services, "sleep", {"seconds": 0, "exit_code": 3})
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    run_url = run_par.execute(services.user, control=services.registry).run_url
    sheet, par_uid, _ = await services.compute.claim(run_url, message_id="m")
    final = await services.compute.run(sheet, par_uid, lambda e: _collect([], e))
    assert isinstance(final.payload, Failed)
    assert "3" in final.payload.reason


async def test_unknown_calculation_is_rejected_at_contract(services: Services) -> None:
    # Access refuses it first (it cannot price it) ...
    with pytest.raises(UnknownCalculationError):
        await services.access.submit(
            services.submit_command(calculation="no-such-thing"), message_id=uuid.uuid4().hex
        )
    # ... and a compute daemon whose registry lacks a calculation refuses it too.
    submitted = (
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    ).events[0]
    services.compute._calculations = CalculationRegistry()  # a compute with no calculations
    contracted = await services.storage.on_submitted(submitted)
    assert contracted is not None
    rejected = await services.compute.on_storage_contracted(contracted)
    assert rejected is not None
    assert isinstance(rejected.payload, Failed)
    assert "checksum" in rejected.payload.reason
    # Redelivered: the same event, nothing appended.
    assert await services.compute.on_storage_contracted(contracted) == rejected
