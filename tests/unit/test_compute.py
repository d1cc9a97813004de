"""The compute worker's logic on the in-memory store (no RabbitMQ): contract, start, run, stop."""

from __future__ import annotations

import json
import time
import uuid
from itertools import pairwise

import anyio
import httpx
import pytest
from pydantic import JsonValue

from orchestrator import PAR, BucketReader, KeyPair, ObjectWriter, PARPermissionError, PARState
from orchestrator.core.run_commands import run_command
from orchestrator.errors import (
    JobNotFoundError,
    PARClosedError,
    RunRefusedError,
    UnknownCalculationError,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.progress import ProgressSnapshots
from orchestrator.store.registry import PARRegistry
from schemas.events import (
    Completed,
    ComputeContracted,
    Failed,
    JobEvent,
    JobSheetState,
    JobState,
    Progress,
    RunStarted,
)
from schemas.messages import (
    GetJob,
    GetOutputs,
    GetRunStatus,
    JobReply,
    OutputsReply,
    RunAction,
    RunCommand,
    StartRun,
    StopRun,
)
from tests._forwarding import CountingStore
from tests._ticker import Ticker, last_line
from tests.unit.test_services import Services
from workers.calculations import CalculationRegistry
from workers.compute import ComputeWorker


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


def _start(services: Services, run_par: PAR) -> StartRun:
    command = services.run_command("start", run_par)
    assert isinstance(command, StartRun)
    return command


def _stop(services: Services, run_par: PAR) -> StopRun:
    command = services.run_command("stop", run_par)
    assert isinstance(command, StopRun)
    return command


async def _claim(services: Services, command: StartRun, message_id: str) -> JobSheetState:
    sheet, _, _ = await services.compute.claim(
        command, requester=services.user.fingerprint, message_id=message_id
    )
    return sheet


async def test_whole_job_through_the_services(services: Services, store: ObjectStore) -> None:
    job_uid, upload, run_par = await _ready_job(services)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(
        b"hello\nworld\n"
    )
    start = _start(services, run_par)
    with services.compute.watching(job_uid) as handle:
        sheet, _, started = await services.compute.claim(
            start, requester=services.user.fingerprint, message_id="m1"
        )
        assert sheet.state is JobState.RUNNING
        published: list[JobEvent] = []
        final = await services.compute.run(
            sheet, handle, lambda e: _collect(published, e), services.report
        )
    assert isinstance(final.payload, Completed)
    assert [o.key for o in final.payload.outputs] == ["summary.json"]
    assert published[-1] == final
    # The completed event hands the user a read PAR over the outputs ...
    assert final.payload.read_par is not None
    handed = PAR(final.payload.read_par)
    reader = BucketReader(handed, services.user, transport=services.transport)
    assert json.loads(await reader.get_object("summary.json"))["lines"] == 2
    # ... recorded in the event, as every PAR of the job: minting them wrote no record object.
    assert await store.list(services.keys.registry) == []
    assert await services.registry.state(handed.uid) is PARState.OPEN
    # A user without it asks access for one.
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
    start = _start(services, run_par)
    await _claim(services, start, "first")
    # A redelivery of the same start message may resume (after a crash) ...
    await _claim(services, start, "first")
    # ... a second start through the same PAR may not.
    with pytest.raises(RunRefusedError, match="already used"):
        await _claim(services, start, "second")


async def test_start_before_upload_is_refused_without_using_the_par(services: Services) -> None:
    _, upload, run_par = await _ready_job(services)
    start = _start(services, run_par)
    with pytest.raises(RunRefusedError, match="upload it first"):
        await _claim(services, start, "early")
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    assert (await _claim(services, start, "later")).state is JobState.RUNNING


def _sealed(services: Services, action: RunAction, run_url: str, job_uid: str) -> RunCommand:
    return run_command(
        action,
        run_url,
        job_uid=job_uid,
        requester=services.user.fingerprint,
        compute=services.compute_key.public,
    )


async def test_forged_or_closed_run_capability_is_refused(services: Services) -> None:
    job_uid, _, run_par = await _ready_job(services)
    run_url = run_par.execute(services.user, control=services.registry).run_url
    forged = _sealed(services, "start", run_url[:-4] + "AAAA", job_uid)
    assert isinstance(forged, StartRun)
    with pytest.raises(PARPermissionError, match="proof of possession"):
        await _claim(services, forged, "m")
    elsewhere = _sealed(services, "start", "https://evil.example/run", job_uid)
    assert isinstance(elsewhere, StartRun)
    with pytest.raises(PARPermissionError, match="not a parjobs run capability"):
        await _claim(services, elsewhere, "m")
    await run_par.close(services.user, control=services.registry)
    with pytest.raises(PARClosedError):
        await _claim(services, _start(services, run_par), "m")


async def test_a_sealed_command_opens_only_for_its_job_requester_and_action(
    services: Services,
) -> None:
    job_uid, upload, run_par = await _ready_job(services)
    other_uid, _, other_run_par = await _ready_job(services)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    start = _start(services, run_par)
    assert b"token" not in start.model_dump_json().encode()  # nothing of it in the clear
    # Copied into a request about another job, or made another action, it does not open.
    with pytest.raises(PARPermissionError, match="does not open"):
        await _claim(services, start.model_copy(update={"job_uid": other_uid}), "m")
    status = GetRunStatus(job_uid=job_uid, sealed=start.sealed)
    with pytest.raises(PARPermissionError, match="does not open"):
        await services.compute.status(status, requester=services.user.fingerprint)
    # Sent by someone else (another requester), it does not open either.
    with pytest.raises(PARPermissionError, match="does not open"):
        await services.compute.claim(start, requester="e" * 64, message_id="m")
    # A capability of one job, sealed as a command about another: refused.
    own_capability = other_run_par.execute(services.user, control=services.registry).run_url
    crossed = _sealed(services, "start", own_capability, job_uid)
    assert isinstance(crossed, StartRun)
    with pytest.raises(PARPermissionError, match="not job"):
        await _claim(services, crossed, "m")
    assert (await services.log.load(job_uid)).state is JobState.READY


async def test_another_users_run_capability_answers_as_no_such_job(services: Services) -> None:
    job_uid, _, run_par = await _ready_job(services)
    mallory = KeyPair.generate("mallory")
    # Mallory somehow holds alice's run capability: sealed by her, it still opens, but the job
    # is not hers, and compute answers exactly as for a job that does not exist.
    capability = run_par.execute(services.user, control=services.registry).run_url
    command = run_command(
        "status",
        capability,
        job_uid=job_uid,
        requester=mallory.fingerprint,
        compute=services.compute_key.public,
    )
    assert isinstance(command, GetRunStatus)
    with pytest.raises(JobNotFoundError) as refused:
        await services.compute.status(command, requester=mallory.fingerprint)
    with pytest.raises(JobNotFoundError) as absent:
        await services.log.load("0" * 32)
    assert str(refused.value) == str(absent.value).replace("0" * 32, job_uid)


async def test_stop_before_start_cancels(services: Services) -> None:
    job_uid, _, run_par = await _ready_job(services)
    reply, event = await services.compute.stop(
        _stop(services, run_par), requester=services.user.fingerprint
    )
    assert reply.state == "cancelled"
    assert event.payload.type == "cancelled"
    assert (await services.log.load(job_uid)).state is JobState.CANCELLED
    # The same stop redelivered returns the same event, to publish again ...
    again = await services.compute.stop(
        _stop(services, run_par), requester=services.user.fingerprint, redelivered=True
    )
    assert again == (reply, event)
    # ... a new stop of the ended job is refused.
    with pytest.raises(RunRefusedError, match="nothing to stop"):
        await services.compute.stop(_stop(services, run_par), requester=services.user.fingerprint)


async def test_a_stop_reaches_the_run_as_its_cancelled_event(
    services: Services, store: ObjectStore
) -> None:
    job_uid, upload, run_par = await _ready_job(services, "sleep", {"seconds": 30})
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    published: list[JobEvent] = []
    with services.compute.watching(job_uid) as handle:
        sheet = await _claim(services, _start(services, run_par), "m")
        async with anyio.create_task_group() as group:
            group.start_soon(
                services.compute.run,
                sheet,
                handle,
                lambda e: _collect(published, e),
                services.report,
            )
            await anyio.sleep(1.5)
            reply, cancelled = await services.compute.stop(
                _stop(services, run_par), requester=services.user.fingerprint
            )
            assert reply.state == "cancelled"
            # The event, delivered to every compute daemon's stops queue, stops the run here.
            assert services.compute.on_cancelled(cancelled)
    final = await services.log.load(job_uid)
    assert final.state is JobState.CANCELLED
    assert services.reported  # its progress, live to its owner
    assert not services.compute.on_cancelled(cancelled)  # nothing runs any more
    # The stop went by the event, not through the store: no stop request was written there.
    assert [info.key for info in await store.list(services.keys.root) if "stop" in info.key] == []


async def test_failing_calculation_ends_failed(services: Services) -> None:
    _, upload, run_par = await _ready_job(services, "sleep", {"seconds": 0, "exit_code": 3})
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    final = await services.run(run_par, lambda e: _collect([], e))
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


class TimedPuts(CountingStore):
    """Also records when each plain PUT happened (monotonic seconds)."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store)
        self.put_at: list[tuple[float, str]] = []

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        self.put_at.append((time.monotonic(), key))
        return await super().put(key, data, content_type=content_type)


async def test_a_run_printing_many_lines_reports_them_live_and_snapshots_them_seldom(
    store: ObjectStore, prefix: str, http: httpx.AsyncClient
) -> None:
    interval = 1.0
    timed = TimedPuts(store)
    services = Services(timed, prefix, http, progress_snapshot_s=interval)
    await services.onboard()
    services.calculations.register(Ticker())
    lines = 50  # one every 0.05 s: 2.5 s of run
    params: dict[str, JsonValue] = {"lines": lines, "every_s": 0.05}
    job_uid, upload, run_par = await _ready_job(services, "ticker", params)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    final = await services.run(run_par, lambda e: _collect([], e))
    assert isinstance(final.payload, Completed)
    # The log holds the job's changes of state, not its lines.
    assert [event.payload.type for event in await services.log.read(job_uid)] == [
        "submitted",
        "storage_contracted",
        "compute_contracted",
        "run_started",
        "completed",
    ]
    # Each report went to the job's owner, coalesced (at most one per PROGRESS_INTERVAL), in order.
    owners = {owner for owner, _ in services.reported}
    reports = [report for _, report in services.reported]
    assert owners == {"user"}
    assert 3 <= len(reports) < lines / 4
    assert all(report.job_uid == job_uid and report.seq == 4 for report in reports)
    ticks = [int(report.payload.message.split()[-1].split("/")[0]) for report in reports]
    assert ticks == sorted(ticks)
    # The snapshot: one object, overwritten at most once per interval, and once as the run ended.
    key = services.keys.progress(job_uid)
    saved = [at for at, put in timed.put_at if put == key]
    assert 2 <= len(saved) <= len(reports)
    assert all(later - earlier >= interval * 0.95 for earlier, later in pairwise(saved[:-1]))
    assert timed.creates.count(key) == 0
    snapshot = await ProgressSnapshots(store, services.keys).load(job_uid)
    assert snapshot is not None
    assert snapshot.payload.message == last_line(lines)  # kept after the job ended
    # GetRunStatus shows it.
    status = services.run_command("status", run_par)
    assert isinstance(status, GetRunStatus)
    reply = await services.compute.status(status, requester=services.user.fingerprint)
    assert (reply.state, reply.detail) == ("completed", last_line(lines))
    # ... and so does GetJob, when asked.
    asked = (await services.access.get(GetJob(job_uid=job_uid, with_progress=True))).reply
    assert isinstance(asked, JobReply)
    assert asked.progress == snapshot
    assert asked.sheet.progress is None  # the fold knows no progress: it is not in the log
    plain = (await services.access.get(GetJob(job_uid=job_uid))).reply
    assert isinstance(plain, JobReply)
    assert plain.progress is None


async def test_a_log_with_progress_events_still_folds_and_shows_them(services: Services) -> None:
    """Logs written before progress left the log: their `progress` events still fold."""
    job_uid, _, run_par = await _ready_job(services)
    await services.log.transition(job_uid, "compute", RunStarted())
    await services.log.transition(job_uid, "compute", Progress(message="old", fraction=0.5))
    sheet = await services.log.load(job_uid)
    assert (sheet.progress, sheet.fraction) == ("old", 0.5)
    status = services.run_command("status", run_par)
    assert isinstance(status, GetRunStatus)
    reply = await services.compute.status(status, requester=services.user.fingerprint)
    assert reply.detail == "old"  # no snapshot: the log's last progress


async def test_compute_remembers_the_submission_and_contracts_reading_nothing(
    services: Services, store: ObjectStore, http: httpx.AsyncClient
) -> None:
    command = services.submit_command()
    submitted = (await services.access.submit(command, message_id=uuid.uuid4().hex)).events[0]
    contracted = await services.storage.on_submitted(submitted)
    assert contracted is not None
    # A compute daemon of its own: its log knows only what its queue hands it.
    async with CountingStore(store) as counting:
        log = EventLog(counting, services.keys.jobs)
        registry = PARRegistry(counting, root=services.keys.registry, log=log)
        compute = ComputeWorker(
            counting,
            log,
            PARIssuer(counting, registry, name="compute"),
            registry,
            services.calculations,
            services.keys,
            services.compute_key,
            http=http,
        )
        assert await compute.on_storage_contracted(submitted) is None
        ready = await compute.on_storage_contracted(contracted)
    assert ready is not None
    assert isinstance(ready.payload, ComputeContracted)
    assert (counting.lists, counting.gets) == ([], [])
    assert counting.creates == [log.event_key(submitted.job_uid, 3)]  # the event, no record
