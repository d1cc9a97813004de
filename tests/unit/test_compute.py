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
    Cancelled,
    Completed,
    ComputeContracted,
    Failed,
    JobEvent,
    JobSheetState,
    JobState,
    Progress,
    Queued,
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
    RunReply,
    StartRun,
    StopRun,
)
from tests._forwarding import CountingStore
from tests._ticker import Ticker, last_line
from tests.unit.test_services import Services
from workers.calculations import CalculationRegistry
from workers.compute import ComputeWorker
from workers.runqueue import RunQueue


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


FIRST, SECOND = "1" * 32, "2" * 32  # two start messages' ids


async def _claim(services: Services, command: StartRun, message_id: str) -> JobSheetState:
    claim = await services.compute.claim(
        command, requester=services.user.fingerprint, message_id=message_id
    )
    return claim.sheet


async def test_whole_job_through_the_services(services: Services, store: ObjectStore) -> None:
    job_uid, upload, run_par = await _ready_job(services)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(
        b"hello\nworld\n"
    )
    start = _start(services, run_par)
    with services.compute.watching(job_uid) as handle:
        claim = await services.compute.claim(
            start, requester=services.user.fingerprint, message_id=FIRST
        )
        sheet, started = claim.sheet, claim.event
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
    assert started is not None
    assert started.seq == 4
    assert started.payload == RunStarted(start_message_id=FIRST)  # the claim is the event


async def test_run_par_starts_one_run_only(services: Services) -> None:
    _, upload, run_par = await _ready_job(services)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    start = _start(services, run_par)
    await _claim(services, start, FIRST)
    # A redelivery of the same start message may resume (after a crash) ...
    await _claim(services, start, FIRST)
    # ... a second start through the same PAR may not.
    with pytest.raises(RunRefusedError, match="already used"):
        await _claim(services, start, SECOND)


async def test_start_before_upload_is_refused_without_using_the_par(services: Services) -> None:
    _, upload, run_par = await _ready_job(services)
    start = _start(services, run_par)
    with pytest.raises(RunRefusedError, match="upload it first"):
        await _claim(services, start, FIRST)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    assert (await _claim(services, start, SECOND)).state is JobState.RUNNING


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
        await _claim(services, forged, FIRST)
    elsewhere = _sealed(services, "start", "https://evil.example/run", job_uid)
    assert isinstance(elsewhere, StartRun)
    with pytest.raises(PARPermissionError, match="not a parjobs run capability"):
        await _claim(services, elsewhere, FIRST)
    await run_par.close(services.user, control=services.registry)
    with pytest.raises(PARClosedError):
        await _claim(services, _start(services, run_par), FIRST)


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
        await _claim(services, start.model_copy(update={"job_uid": other_uid}), FIRST)
    status = GetRunStatus(job_uid=job_uid, sealed=start.sealed)
    with pytest.raises(PARPermissionError, match="does not open"):
        await services.compute.status(status, requester=services.user.fingerprint)
    # Sent by someone else (another requester), it does not open either.
    with pytest.raises(PARPermissionError, match="does not open"):
        await services.compute.claim(start, requester="e" * 64, message_id=FIRST)
    # A capability of one job, sealed as a command about another: refused.
    own_capability = other_run_par.execute(services.user, control=services.registry).run_url
    crossed = _sealed(services, "start", own_capability, job_uid)
    assert isinstance(crossed, StartRun)
    with pytest.raises(PARPermissionError, match="not job"):
        await _claim(services, crossed, FIRST)
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
        sheet = await _claim(services, _start(services, run_par), FIRST)
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


# --- the run queue: answered at once, run in turn ------------------------------------------------


class Starts:
    """Start messages handled as the compute daemon handles them (`ComputeWorker.start`), with
    the answers they give and the events they publish collected."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.published: list[JobEvent] = []
        self.ends: dict[str, JobEvent | None] = {}
        self._send, self._answers = anyio.create_memory_object_stream[RunReply](100)

    async def handle(
        self,
        run_par: PAR,
        message_id: str,
        *,
        redelivered: bool = False,
        worker: ComputeWorker | None = None,
    ) -> JobEvent | None:
        async def publish(event: JobEvent) -> None:
            self.published.append(event)

        end = await (worker or self.services.compute).start(
            _start(self.services, run_par),
            requester=self.services.user.fingerprint,
            message_id=message_id,
            redelivered=redelivered,
            answer=self._send.send,
            publish=publish,
            report=self.services.report,
        )
        self.ends[message_id] = end
        return end

    async def answer(self) -> tuple[str, int | None]:
        """The next answer given: (state, place)."""
        with anyio.fail_after(10):
            reply = await self._answers.receive()
        return reply.state, reply.place


async def _uploaded(
    services: Services,
    calculation: str = "checksum",
    parameters: dict[str, JsonValue] | None = None,
) -> tuple[str, PAR]:
    job_uid, upload, run_par = await _ready_job(services, calculation, parameters)
    await ObjectWriter(upload, services.user, transport=services.transport).set_object(b"x")
    return job_uid, run_par


async def _types(services: Services, job_uid: str) -> list[str]:
    return [event.payload.type for event in await services.log.read(job_uid)]


BUSY = "f" * 32  # a job holding the only run slot in the tests that need every slot taken


async def test_starts_beyond_the_slots_are_answered_queued_with_their_place_then_run_in_turn(
    services: Services,
) -> None:
    services.compute.queue = RunQueue(1)
    starts = Starts(services)
    first = await _uploaded(services, "sleep", {"seconds": 60})  # runs until it is stopped
    later = [await _uploaded(services) for _ in range(2)]
    ids = [uuid.uuid4().hex for _ in range(3)]
    async with anyio.create_task_group() as group:
        answers = []
        for (_, run_par), message_id in zip([first, *later], ids, strict=True):
            group.start_soon(starts.handle, run_par, message_id)
            answers.append(await starts.answer())
        # Each answered as it came: the first runs, the rest wait.
        assert answers == [("running", None), ("queued", 1), ("queued", 2)]
        status = services.run_command("status", later[1][1])
        assert isinstance(status, GetRunStatus)
        reply = await services.compute.status(status, requester=services.user.fingerprint)
        assert (reply.state, reply.place) == ("queued", 2)
        # The first run ends (stopped): the slot goes to the next in line, and so on.
        _, cancelled = await services.compute.stop(
            _stop(services, first[1]), requester=services.user.fingerprint
        )
        assert services.compute.on_cancelled(cancelled)
    # One after the other, in the order they came, each claimed by its own start message.
    started = [e for e in starts.published if isinstance(e.payload, RunStarted)]
    assert [e.job_uid for e in started] == [first[0], later[0][0], later[1][0]]
    assert [e.payload for e in started] == [RunStarted(start_message_id=i) for i in ids]
    for (job_uid, _), message_id, place in zip(later, ids[1:], (1, 2), strict=True):
        events = await services.log.read(job_uid)
        assert [e.payload.type for e in events][3:] == ["queued", "run_started", "completed"]
        assert events[3].payload == Queued(start_message_id=message_id, place=place)
    ends = [starts.ends[message_id] for message_id in ids]
    assert [type(end.payload) if end else None for end in ends] == [
        Cancelled,
        Completed,
        Completed,
    ]
    assert len(starts.ends) == 3
    assert (services.compute.queue.running, services.compute.queue.waiting) == (0, 0)


async def test_a_second_start_is_refused_and_a_resend_answered_without_a_second_run(
    services: Services,
) -> None:
    services.compute.queue = RunQueue(1)
    starts = Starts(services)
    job_uid, run_par = await _uploaded(services)
    async with anyio.create_task_group() as group:
        with services.compute.queue.ticket(BUSY):
            group.start_soon(starts.handle, run_par, FIRST)
            assert await starts.answer() == ("queued", 1)
            with pytest.raises(RunRefusedError, match=f"already used to start job {job_uid}"):
                await starts.handle(run_par, SECOND)
            # The client's resend of the same message: answered as the job is, run nothing.
            with anyio.fail_after(10):
                assert await starts.handle(run_par, FIRST) is None
            assert await starts.answer() == ("queued", 1)
            assert services.compute.queue.waiting == 1
    assert (await _types(services, job_uid))[3:] == ["queued", "run_started", "completed"]
    # Once it has ended, a resend is answered with its end, not refused: it was accepted.
    assert await starts.handle(run_par, FIRST) is None
    assert await starts.answer() == ("completed", None)
    with pytest.raises(RunRefusedError, match="already used"):
        await starts.handle(run_par, SECOND)


async def test_a_stop_while_queued_cancels_the_job_and_takes_it_out_of_the_queue(
    services: Services,
) -> None:
    services.compute.queue = RunQueue(1)
    starts = Starts(services)
    job_uid, run_par = await _uploaded(services)
    other_uid, other_par = await _uploaded(services)
    async with anyio.create_task_group() as group:
        with services.compute.queue.ticket(BUSY):
            group.start_soon(starts.handle, run_par, FIRST)
            assert await starts.answer() == ("queued", 1)
            group.start_soon(starts.handle, other_par, SECOND)
            assert await starts.answer() == ("queued", 2)
            reply, cancelled = await services.compute.stop(
                _stop(services, run_par), requester=services.user.fingerprint
            )
            assert (reply.state, cancelled.payload) == (
                "cancelled",
                Cancelled(reason="stopped while it waited for a run slot"),
            )
            # Its event reaches the daemon that holds the start: out of the queue it goes.
            assert services.compute.on_cancelled(cancelled)
            await anyio.wait_all_tasks_blocked()
            assert starts.ends == {FIRST: None}
            assert services.compute.queue.place(other_uid) == 1
    assert (await _types(services, job_uid))[3:] == ["queued", "cancelled"]
    assert (await _types(services, other_uid))[-1] == "completed"


async def test_a_crash_while_queued_hands_the_start_to_another_daemon_which_runs_it_once(
    services: Services, store: ObjectStore, http: httpx.AsyncClient
) -> None:
    services.compute.queue = RunQueue(1)
    starts = Starts(services)
    job_uid, run_par = await _uploaded(services)
    async with anyio.create_task_group() as group:
        with services.compute.queue.ticket(BUSY):
            group.start_soon(starts.handle, run_par, FIRST)
            assert await starts.answer() == ("queued", 1)
            group.cancel_scope.cancel()  # the daemon dies; its start message goes back unacked
    assert services.compute.queue.waiting == 0
    # The broker hands the same message to another daemon (its own log, nothing remembered).
    elsewhere = ComputeWorker(
        store,
        EventLog(store, services.keys.jobs),
        PARIssuer(store, services.registry, name="compute"),
        services.registry,
        services.calculations,
        services.keys,
        services.compute_key,
        http=http,
    )
    end = await starts.handle(run_par, FIRST, redelivered=True, worker=elsewhere)
    assert end is not None
    assert isinstance(end.payload, Completed)
    assert await starts.answer() == ("queued", 1)  # as it was logged; it ran at once
    events = await services.log.read(job_uid)
    assert [e.payload.type for e in events][3:] == ["queued", "run_started", "completed"]
    assert events[4].payload == RunStarted(start_message_id=FIRST)
    # Delivered yet again (that daemon died before its ack): the job has ended, nothing runs.
    assert await starts.handle(run_par, FIRST, redelivered=True, worker=elsewhere) is None
    assert len(await services.log.read(job_uid)) == len(events)
