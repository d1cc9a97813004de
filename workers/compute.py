"""The compute worker's logic: contract the run PAR, then start, stop and run calculations.

On `storage_contracted` it checks the calculation and its parameters, mints the run PAR (execute,
sealed for the user) and appends `compute_contracted`, which carries the PAR's record. A run
command (start, stop, status) holds the run capability sealed for compute and bound to its job
and requester (`orchestrator.core.run_commands`): it is opened, checked against the issuer's
record (the capability's proof, not expired, not closed) and against the job's user. A start is
answered as soon as it is claimed: the claim is the job's next event (`queued` if every run slot
is taken, else `run_started`), a conditional create holding the start message's id, so a run PAR
starts at most one run; queued starts wait their turn in the worker's `RunQueue`. The run happens
in a sandboxed subprocess (`workers.calculations`; `check_sandbox` at start makes sure one can be
made); its latest output line goes live to the job's owner as a signed `ProgressReport` (never an
event of the log) and is kept as the job's progress snapshot, overwritten at most every
`progress_snapshot_s`; its files are written through the job's bucket-write PAR, and the job ends
completed (with a read PAR over its outputs, sealed for the user), failed or cancelled. A stop
appends `cancelled`; the event reaches every compute daemon (`on_cancelled`), and the one holding
the job drops it from its queue or kills the run.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx

from orchestrator.core.jobstate import fold, is_terminal
from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.core.par_rules import capability_proof
from orchestrator.core.run_commands import open_run_command
from orchestrator.errors import (
    CalculationError,
    IllegalTransitionError,
    JobNotFoundError,
    PARExpiredError,
    ParjobsError,
    PARPermissionError,
    RunRefusedError,
)
from orchestrator.par.io import BucketWriter
from orchestrator.par.issuer import MAX_MANIFEST_OBJECTS, JobPARs, PARIssuer
from orchestrator.par.par import PAR
from orchestrator.par.transfer import PARTransport
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog, step_event_id
from orchestrator.store.progress import ProgressSnapshots
from orchestrator.store.registry import PARRegistry
from schemas.events import (
    Cancelled,
    Completed,
    ComputeContracted,
    EventPayload,
    Failed,
    JobEvent,
    JobSheetState,
    JobState,
    OutputFile,
    Progress,
    Queued,
    RunStarted,
    StorageContracted,
    Submitted,
)
from schemas.messages import (
    GetRunStatus,
    ProgressReport,
    RunCommand,
    RunReply,
    StartRun,
    StopRun,
)
from schemas.par import Capability
from workers.calculations import (
    CalculationRegistry,
    Invocation,
    RunHandle,
    RunOutcome,
    SandboxMode,
    SandboxPool,
    Stream,
    Workspace,
    check_sandbox,
    run_calculation,
)
from workers.runqueue import RunQueue
from workers.steps import due_step

_RUN_URL = re.compile(r"^parjobs-run://[^/]+/(?P<uid>[0-9a-f]{32})\?token=[A-Za-z0-9_-]+$")
PROGRESS_INTERVAL = 0.5  # seconds: output lines are coalesced into one report at most this often
STOPPED = "stopped through the run PAR"
log = logging.getLogger("parjobs.compute")

_STOPPABLE = {
    JobState.READY: "stopped before it started",
    JobState.QUEUED: "stopped while it waited for a run slot",
    JobState.RUNNING: STOPPED,
}
"""The states a stop cancels a job in, and the reason it gives."""

Publish = Callable[[JobEvent], Awaitable[None]]
Answer = Callable[[RunReply], Awaitable[None]]
ReportProgress = Callable[[str, ProgressReport], Awaitable[None]]
"""Publish a progress report, signed by compute, to the job's owner (their registered name)."""


@dataclass(frozen=True)
class Claim:
    """A start's claim on the run PAR: the job after it, and the claiming event (`queued` or
    `run_started`) if this start appended it now (None: this same start message claimed it
    before, so this is a redelivery or a resend of it)."""

    sheet: JobSheetState
    event: JobEvent | None


class ComputeWorker:
    def __init__(
        self,
        store: ObjectStore,
        log: EventLog,
        issuer: PARIssuer,
        registry: PARRegistry,
        calculations: CalculationRegistry,
        keys: JobKeys,
        compute_key: KeyPair,
        *,
        actor: str = "compute",
        time_limit_s: float = 600,
        memory_limit_bytes: int = 2**30,
        http: httpx.AsyncClient | None = None,
        sandbox: SandboxMode = "bwrap",
        progress_snapshot_s: float = 30.0,
        max_runs: int = 2,
        warm_sandboxes: int = 0,
    ) -> None:
        self._store = store
        self._log = log
        self._issuer = issuer
        self._registry = registry
        self._calculations = calculations
        self._keys = keys
        self._compute_key = compute_key
        self._actor = actor
        self._time_limit_s = time_limit_s
        self._memory_limit_bytes = memory_limit_bytes
        self._http = http  # for presigned URLs; None: a client of each run's own
        self._sandbox: SandboxMode = sandbox
        self._snapshots = ProgressSnapshots(store, keys)
        self._progress_snapshot_s = progress_snapshot_s
        # Spawned ahead while `sandboxes.serve` runs (the daemon starts it); one job each.
        self.sandboxes = SandboxPool(
            sandbox, size=warm_sandboxes, memory_limit_bytes=memory_limit_bytes
        )
        self._running: dict[str, list[RunHandle]] = {}  # job uid -> its runs here
        self.queue = RunQueue(max_runs)  # the starts waiting for one of this worker's run slots

    async def check_sandbox(self) -> None:
        """At start: ConfigurationError (naming the fix) if this worker's calculations cannot be
        sandboxed as configured; with sandbox `none`, a loud warning instead."""
        await check_sandbox(self._sandbox)

    # --- contracting -----------------------------------------------------------------------------

    async def on_storage_contracted(
        self, event: JobEvent, *, redelivered: bool = False
    ) -> JobEvent | None:
        """Mint the run PAR once per job (a redelivery returns the logged event). A `submitted`
        is only remembered, so that contracting its job reads nothing."""
        if isinstance(event.payload, Submitted):
            await self._log.through(event)
        if not isinstance(event.payload, StorageContracted):
            return None
        job_uid = event.job_uid
        expected, steps = JobState.STORAGE_CONTRACTED, ("compute_contracted", "rejected")
        step = await due_step(self._log, event, expected, *steps, redelivered=redelivered)
        if step.done is not None or step.sheet is None:
            return step.done
        sheet = step.sheet
        try:
            self._calculations.validate(sheet.request.calculation, sheet.request.parameters)
        except CalculationError as exc:
            failed = Failed(reason=f"rejected by compute: {exc}")
            return await self._append(job_uid, failed, step_event_id(job_uid, "rejected"))
        user = PublicKeys.from_wire(sheet.user_key)
        minted = JobPARs(job_uid)
        run_par = await self._issuer.calculation_par(
            job_uid, user, lifetime=step.remaining, job=minted
        )
        contracted = ComputeContracted(run_par=run_par.data, proofs=minted.proofs)
        return await self._append(job_uid, contracted, step_event_id(job_uid, "compute_contracted"))

    # --- the run PAR's commands -----------------------------------------------------------------

    async def authorise(
        self, command: RunCommand, *, requester: str, fresh: bool = True
    ) -> tuple[JobSheetState, str]:
        """(the job, run PAR uid) if `command` opens for `requester` (the verified signer of the
        request) and holds a live run capability issued here for its job, owned by `requester`.

        Not `fresh`: the job as this worker remembers it, read only if it remembers nothing (for
        a start, whose `run_started` append loses to anything appended since and judges again).
        Another user's job is answered as one that does not exist: no existence leak.
        """
        run_url = open_run_command(command, requester=requester, key=self._compute_key)
        match = _RUN_URL.match(run_url)
        if match is None:
            raise PARPermissionError("not a parjobs run capability")
        par_uid = match["uid"]
        record = await self._registry.verify(par_uid, capability_proof(Capability(run_url=run_url)))
        if record.expires_at <= datetime.now(UTC):
            raise PARExpiredError(f"run PAR {par_uid} expired at {record.expires_at.isoformat()}")
        if record.driver_details.get("resource") != command.job_uid:
            raise PARPermissionError(f"run PAR {par_uid} is not job {command.job_uid}'s")
        job_uid = command.job_uid
        events = await (self._log.read(job_uid) if fresh else self._log.read_through(job_uid, 1))
        if not events or (sheet := fold(events)).user != requester:
            raise JobNotFoundError(f"no job {job_uid}: its log has no events")
        return sheet, par_uid

    async def status(self, command: GetRunStatus, *, requester: str) -> RunReply:
        sheet, _ = await self.authorise(command, requester=requester)
        detail = sheet.progress or ""  # a log from before progress left it
        if sheet.state not in (JobState.READY, JobState.QUEUED):
            snapshot = await self._snapshots.load(sheet.job_uid)
            detail = detail if snapshot is None else snapshot.payload.message
        return self.run_reply(sheet, detail=detail)

    def run_reply(self, sheet: JobSheetState, *, detail: str = "") -> RunReply:
        """The job's run as a reply; while queued, its place now (in this worker's queue, else as
        logged when it joined one)."""
        place = None
        if sheet.state is JobState.QUEUED:
            place = self.queue.place(sheet.job_uid) or sheet.place
        return RunReply(
            job_uid=sheet.job_uid,
            state=sheet.state.value,
            accepted=True,
            detail=detail,
            place=place,
        )

    async def stop(
        self, command: StopRun, *, requester: str, redelivered: bool = False
    ) -> tuple[RunReply, JobEvent]:
        """Cancel the job: before its start, while it waits in a run queue or while it runs (the
        `cancelled` event, published, reaches the compute daemon holding it, which drops it from
        its queue or kills the run). A `redelivered` stop whose `cancelled` is logged already
        returns that event, to publish again; any other stop of an ended job is refused."""
        sheet, _ = await self.authorise(command, requester=requester)
        job_uid = sheet.job_uid
        step = step_event_id(job_uid, "cancelled")
        if sheet.state in _STOPPABLE:
            reason = _STOPPABLE[sheet.state]
            try:
                event = await self._append(job_uid, Cancelled(reason=reason), step)
            except IllegalTransitionError:
                return await self.stop(command, requester=requester, redelivered=redelivered)
        elif redelivered and (logged := (await self._log.read(job_uid))[-1]).event_id == step:
            event = logged
        else:
            raise RunRefusedError(f"job {job_uid} is {sheet.state.value}: there is nothing to stop")
        return RunReply(job_uid=job_uid, state="cancelled", accepted=True), event

    async def claim(
        self, command: StartRun, *, requester: str, message_id: str, place: int | None = None
    ) -> Claim:
        """Check a start and claim the run PAR for it: the job's next event, `queued` at `place`
        (every run slot taken) or, with `place` None, `run_started`, each holding the start
        message's id. The log's conditional append is the claim: a start of another message finds
        it and is refused; this same message, delivered again, finds its own and resumes (a
        `Claim` with no event). A start that claimed a job which has ended since is answered with
        the end (no error: the start was accepted); any other start of an ended job is refused.
        """
        sheet, par_uid = await self.authorise(command, requester=requester, fresh=False)
        job_uid = sheet.job_uid
        if sheet.state is JobState.READY:
            if await self._store.head(self._keys.input(job_uid)) is None:
                raise RunRefusedError(f"job {job_uid} has no input yet: upload it first")
            claim: Queued | RunStarted = (
                RunStarted(start_message_id=message_id)
                if place is None
                else Queued(start_message_id=message_id, place=place)
            )
            try:
                event = await self._append(job_uid, claim, _claim_event_id(job_uid, claim))
            except IllegalTransitionError:
                sheet = await self._log.load(job_uid)  # another start, or a stop, came first
            else:
                return Claim(fold(await self._log.read_through(job_uid, event.seq)), event)
        if sheet.start_message_id == message_id:
            return Claim(sheet, None)
        if sheet.state in (JobState.QUEUED, JobState.RUNNING) or sheet.start_message_id:
            raise RunRefusedError(f"run PAR {par_uid} was already used to start job {job_uid}")
        raise RunRefusedError(f"job {job_uid} is {sheet.state.value}: it cannot start")

    async def begin(self, sheet: JobSheetState) -> tuple[JobSheetState, JobEvent]:
        """A queued job's turn came: append its `run_started` (the claim's message carried on);
        IllegalTransitionError if it was stopped while it waited."""
        started = RunStarted(start_message_id=sheet.start_message_id)
        job_uid = sheet.job_uid
        event = await self._append(job_uid, started, _claim_event_id(job_uid, started))
        return fold(await self._log.read_through(job_uid, event.seq)), event

    async def start(
        self,
        command: StartRun,
        *,
        requester: str,
        message_id: str,
        redelivered: bool,
        answer: Answer,
        publish: Publish,
        report: ReportProgress,
    ) -> JobEvent | None:
        """Handle start message `message_id` from its claim to the end of its run: claim the run
        PAR, `answer` at once (`queued` with its place, or `running`), wait for a run slot, run.
        Returns the event that ended the job, or None if nothing ran here: a start of this same
        message handled before (a resend, answered with the job as it is; a `redelivered` one
        resumes the run, its handler having died), a job ended already, or a job stopped while it
        waited.
        """
        job_uid = command.job_uid
        with self.watching(job_uid) as handle, self.queue.ticket(job_uid) as ticket:
            with anyio.CancelScope(shield=True):  # what is appended is published
                claim = await self.claim(
                    command, requester=requester, message_id=message_id, place=ticket.place
                )
                if claim.event is not None:
                    await publish(claim.event)
            await answer(self.run_reply(claim.sheet))
            sheet = claim.sheet
            if is_terminal(sheet.state) or not (claim.event or redelivered):
                return None
            if not await ticket.wait():
                return None  # stopped while it waited: its `cancelled` ends it
            if sheet.state is JobState.QUEUED:
                try:
                    with anyio.CancelScope(shield=True):
                        sheet, started = await self.begin(sheet)
                        await publish(started)
                except IllegalTransitionError:
                    return None  # stopped (or failed) as its turn came
            return await self.run(sheet, handle, publish, report)

    # --- running ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def watching(self, job_uid: str) -> Iterator[RunHandle]:
        """A handle to the run about to start for `job_uid`, which `on_cancelled` stops while
        this block lasts. Entered before the start is checked, so a `cancelled` appended after
        that check finds it (one appended before makes the check refuse the start)."""
        handle = RunHandle()
        handles = self._running.setdefault(job_uid, [])
        handles.append(handle)
        try:
            yield handle
        finally:
            handles.remove(handle)
            if not handles:
                del self._running[job_uid]

    def on_cancelled(self, event: JobEvent) -> bool:
        """A job was cancelled: stop its run if it runs here, drop it if it waits here for a run
        slot; whether it did either."""
        if not isinstance(event.payload, Cancelled):
            return False
        dropped = self.queue.drop(event.job_uid)
        handles = self._running.get(event.job_uid, [])
        for handle in handles:
            handle.request_stop()
        return dropped or bool(handles)

    async def run(
        self, sheet: JobSheetState, handle: RunHandle, publish: Publish, report: ReportProgress
    ) -> JobEvent:
        """Run the job's calculation to its end; returns the final event (already published).
        Its progress goes to `report` as it comes.

        A stop (`on_cancelled`) has already ended the job: its `cancelled` event is the end.
        """
        job_uid = sheet.job_uid
        async with self.sandboxes.workspace() as space:
            # Named by its job: which job a sandbox runs shows from outside (ps, the e2e tests).
            input_path, output_dir = space.input_dir / job_uid, space.output_dir
            url = await self._store.presign_get(self._keys.input(job_uid), 300)
            async with PARTransport(self._http) as transport:
                await transport.download_to_file(
                    url, input_path, expected_sha256=sheet.request.input_sha256
                )
            invocation = self._calculations.invocation(
                sheet.request.calculation,
                sheet.request.parameters,
                input_path=input_path,
                output_dir=output_dir,
            )
            outcome = await self._run_watched(
                sheet, invocation, space, input_path, output_dir, handle, report
            )
            final = (
                None if outcome.stopped else await self._final_payload(sheet, outcome, output_dir)
            )
        if final is None:
            return await self._ending(job_uid)
        try:
            return await self._append_and_publish(
                job_uid, final, step_event_id(job_uid, "ended"), publish
            )
        except IllegalTransitionError:
            return await self._ending(job_uid)  # stopped as it ended: the stop's event stands

    async def _ending(self, job_uid: str) -> JobEvent:
        """The event that ended the job (a stop's `cancelled`, published by the stop)."""
        return (await self._log.read(job_uid))[-1]

    async def _run_watched(
        self,
        sheet: JobSheetState,
        invocation: Invocation,
        space: Workspace,
        input_path: Path,
        output_dir: Path,
        handle: RunHandle,
        report: ReportProgress,
    ) -> RunOutcome:
        """Run while reporting its latest output line, live to the job's owner at most every
        PROGRESS_INTERVAL, and as the job's snapshot at most every `progress_snapshot_s` and once
        as it ends; `handle` stops it. Progress is advisory: a report or a snapshot that fails is
        logged, and the run goes on."""
        latest: list[str] = []
        printed = anyio.Event()  # a line came since the last report: a silent run never wakes us
        saved_at = -float("inf")  # monotonic time of the last snapshot
        unsaved: ProgressReport | None = None

        async def on_output(stream: Stream, line: str) -> None:
            latest.append(f"{stream}: {line}"[:500])
            printed.set()

        def take_latest() -> ProgressReport | None:
            if not latest:
                return None
            message, latest[:] = latest[-1], []
            return ProgressReport(
                job_uid=sheet.job_uid,
                seq=sheet.seq,
                time=datetime.now(UTC),
                payload=Progress(message=message),
            )

        async def save() -> None:
            nonlocal saved_at, unsaved
            if unsaved is None:
                return
            saved_at = time.monotonic()
            try:
                await self._snapshots.save(unsaved)
            except ParjobsError as exc:
                log.warning("job %s: progress snapshot not saved: %s", sheet.job_uid, exc)
            unsaved = None  # (a save cut short as the run ends is left to the last one)

        async def report_progress() -> None:
            nonlocal unsaved, printed
            while True:
                await printed.wait()
                await anyio.sleep(PROGRESS_INTERVAL)  # the lines meanwhile coalesce into one
                printed = anyio.Event()
                if (taken := take_latest()) is None:
                    continue
                unsaved = taken
                try:
                    await report(sheet.owner, taken)
                except ParjobsError as exc:
                    log.warning("job %s: progress not reported: %s", sheet.job_uid, exc)
                if time.monotonic() - saved_at >= self._progress_snapshot_s:
                    await save()

        async with anyio.create_task_group() as group:
            group.start_soon(report_progress)
            outcome = await run_calculation(
                list(invocation.argv),
                workdir=space.workdir,
                output_dir=output_dir,
                inputs=(input_path,),
                sandbox=space.sandbox,
                time_limit_s=self._time_limit_s,
                memory_limit_bytes=self._memory_limit_bytes,
                on_output=on_output,
                env=invocation.env,
                handle=handle,
            )
            group.cancel_scope.cancel()
        # The run's last line, whatever the interval, is the snapshot it leaves.
        unsaved = take_latest() or unsaved
        await save()
        return outcome

    async def _final_payload(
        self, sheet: JobSheetState, outcome: RunOutcome, output_dir: Path
    ) -> EventPayload:
        if outcome.reason is not None:
            return Failed(reason=outcome.reason)
        if sheet.output_par is None:
            return Failed(reason="no bucket-write PAR was contracted for the outputs")
        outputs = []
        async with PARTransport(self._http) as transport:
            writer = BucketWriter(PAR(sheet.output_par), self._compute_key, transport=transport)
            # Only what the runner listed: regular files, never a symlink out of the sandbox.
            for key in outcome.outputs:
                sent = await writer.set_object_from_file(key, output_dir / key)
                outputs.append(OutputFile(key=key, size=sent.size, sha256=sent.sha256))
        minted = JobPARs(sheet.job_uid)
        read_par = None
        if len(outputs) <= MAX_MANIFEST_OBJECTS:  # else the user asks access for one per prefix
            read_par = await self._issuer.bucket_read_par(
                self._keys.output_prefix(sheet.job_uid),
                PublicKeys.from_wire(sheet.user_key),
                objects=[output.key for output in outputs],  # just written: nothing to list
                job=minted,
            )
        return Completed(
            outputs=tuple(outputs),
            summary=f"{len(outputs)} output file(s)",
            cpu_seconds=outcome.cpu_seconds,
            read_par=None if read_par is None else read_par.data,
            proofs=minted.proofs,
        )

    async def _append(self, job_uid: str, payload: EventPayload, event_id: str | None) -> JobEvent:
        return await self._log.transition(job_uid, self._actor, payload, event_id=event_id)

    async def _append_and_publish(
        self, job_uid: str, payload: EventPayload, event_id: str | None, publish: Publish
    ) -> JobEvent:
        """Append and publish as one: a cancellation (a stop, the run's task group ending) cannot
        come between them and leave an event in the log that nobody saw."""
        with anyio.CancelScope(shield=True):
            event = await self._append(job_uid, payload, event_id)
            await publish(event)
        return event


def _claim_event_id(job_uid: str, claim: Queued | RunStarted) -> str:
    """The id of a start's `queued` or `run_started`: one per start message, so a redelivery
    finds its own event, and another start's append, which finds none, is judged (refused)."""
    return step_event_id(job_uid, f"{claim.type}|{claim.start_message_id}")
