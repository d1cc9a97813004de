"""The compute worker's logic: contract the run PAR, then start, stop and run calculations.

On `storage_contracted` it checks the calculation and its parameters, mints the run PAR (execute,
sealed for the user) and appends `compute_contracted`. A run command (start, stop, status) holds
the run capability sealed for compute and bound to its job and requester
(`orchestrator.core.run_commands`): it is opened, checked against the issuer's registry (the
capability's proof, not expired, not closed) and against the job's user. A start is claimed once
with a conditional create, so a run PAR starts at most one run. The run happens in a sandboxed
subprocess (`workers.calculations`; `check_sandbox` at start makes sure one can be made); its
output lines become `progress` events, its files are written through the job's bucket-write PAR,
and the job ends completed, failed or cancelled. A stop appends `cancelled`; the event reaches
every compute daemon (`on_cancelled`), and the one running the job kills the run.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx

from orchestrator.core.jobstate import fold
from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.core.par_rules import capability_proof
from orchestrator.core.run_commands import open_run_command
from orchestrator.errors import (
    CalculationError,
    IllegalTransitionError,
    JobNotFoundError,
    ObjectExistsError,
    PARExpiredError,
    PARPermissionError,
    RunRefusedError,
)
from orchestrator.par.io import BucketWriter
from orchestrator.par.issuer import PARIssuer
from orchestrator.par.par import PAR
from orchestrator.par.transfer import PARTransport
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog, step_event_id
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
    RunStarted,
    StorageContracted,
)
from schemas.messages import GetRunStatus, RunCommand, RunReply, StartRun, StopRun
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
from workers.steps import due_step

_RUN_URL = re.compile(r"^parjobs-run://[^/]+/(?P<uid>[0-9a-f]{32})\?token=[A-Za-z0-9_-]+$")
PROGRESS_INTERVAL = 0.5  # seconds: output lines are coalesced so the log is not flooded
STOPPED = "stopped through the run PAR"

Publish = Callable[[JobEvent], Awaitable[None]]


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
        # Spawned ahead while `sandboxes.serve` runs (the daemon starts it); one job each.
        self.sandboxes = SandboxPool(
            sandbox, size=warm_sandboxes, memory_limit_bytes=memory_limit_bytes
        )
        self._running: dict[str, list[RunHandle]] = {}  # job uid -> its runs here

    async def check_sandbox(self) -> None:
        """At start: ConfigurationError (naming the fix) if this worker's calculations cannot be
        sandboxed as configured; with sandbox `none`, a loud warning instead."""
        await check_sandbox(self._sandbox)

    # --- contracting -----------------------------------------------------------------------------

    async def on_storage_contracted(
        self, event: JobEvent, *, redelivered: bool = False
    ) -> JobEvent | None:
        """Mint the run PAR once per job (a redelivery returns the logged event)."""
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
        run_par = await self._issuer.calculation_par(job_uid, user, lifetime=step.remaining)
        contracted = ComputeContracted(run_par=run_par.data)
        return await self._append(job_uid, contracted, step_event_id(job_uid, "compute_contracted"))

    # --- the run PAR's commands -----------------------------------------------------------------

    async def authorise(self, command: RunCommand, *, requester: str) -> tuple[JobSheetState, str]:
        """(the job, run PAR uid) if `command` opens for `requester` (the verified signer of the
        request) and holds a live run capability issued here for its job, owned by `requester`.

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
        sheet = await self._log.load(command.job_uid)
        if sheet.user != requester:
            raise JobNotFoundError(f"no job {command.job_uid}: its log has no events")
        return sheet, par_uid

    async def status(self, command: GetRunStatus, *, requester: str) -> RunReply:
        sheet, _ = await self.authorise(command, requester=requester)
        return RunReply(
            job_uid=sheet.job_uid,
            state=sheet.state.value,
            accepted=True,
            detail=sheet.progress or "",
        )

    async def stop(
        self, command: StopRun, *, requester: str, redelivered: bool = False
    ) -> tuple[RunReply, JobEvent]:
        """Cancel the job: before its start, or while it runs (the `cancelled` event, published,
        reaches the compute daemon running it, which kills the run). A `redelivered` stop whose
        `cancelled` is logged already returns that event, to publish again; any other stop of an
        ended job is refused."""
        sheet, _ = await self.authorise(command, requester=requester)
        job_uid = sheet.job_uid
        step = step_event_id(job_uid, "cancelled")
        if sheet.state in (JobState.READY, JobState.RUNNING):
            reason = STOPPED if sheet.state is JobState.RUNNING else "stopped before it started"
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
        self, command: StartRun, *, requester: str, message_id: str
    ) -> tuple[JobSheetState, str, JobEvent]:
        """Check a start and claim the run PAR for it; returns (sheet, run PAR uid, run_started).

        A run PAR starts one run: the claim is a conditional create holding the start message's
        id, so only a redelivery of that same message (after a crash) may resume it.
        """
        sheet, par_uid = await self.authorise(command, requester=requester)
        job_uid = sheet.job_uid
        claimed_by: str | None = None  # whose claim it is, once known
        if sheet.state is JobState.READY:
            if await self._store.head(self._keys.input(job_uid)) is None:
                raise RunRefusedError(f"job {job_uid} has no input yet: upload it first")
            with contextlib.suppress(ObjectExistsError):  # someone's claim: read below
                await self._store.put_if_absent(self._keys.run_claim(par_uid), message_id.encode())
                claimed_by = message_id
        elif sheet.state is not JobState.RUNNING:
            raise RunRefusedError(f"job {job_uid} is {sheet.state.value}: it cannot start")
        if claimed_by is None:
            claimed_by = (await self._store.get(self._keys.run_claim(par_uid))).decode()
        if claimed_by != message_id:
            raise RunRefusedError(f"run PAR {par_uid} was already used to start job {job_uid}")
        started = await self._append(job_uid, RunStarted(), step_event_id(job_uid, "run_started"))
        return fold(await self._log.read_through(job_uid, started.seq)), par_uid, started

    @staticmethod
    def started_reply(sheet: JobSheetState) -> RunReply:
        return RunReply(job_uid=sheet.job_uid, state=sheet.state.value, accepted=True)

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
        """A job was cancelled: stop its run if it runs here; whether one did."""
        if not isinstance(event.payload, Cancelled):
            return False
        handles = self._running.get(event.job_uid, [])
        for handle in handles:
            handle.request_stop()
        return bool(handles)

    async def run(self, sheet: JobSheetState, handle: RunHandle, publish: Publish) -> JobEvent:
        """Run the job's calculation to its end; returns the final event (already published).

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
                job_uid, invocation, space, input_path, output_dir, handle, publish
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
        job_uid: str,
        invocation: Invocation,
        space: Workspace,
        input_path: Path,
        output_dir: Path,
        handle: RunHandle,
        publish: Publish,
    ) -> RunOutcome:
        """Run while coalescing output lines into progress events; `handle` stops it."""
        latest: list[str] = []

        async def on_output(stream: Stream, line: str) -> None:
            latest.append(f"{stream}: {line}"[:500])

        async def report_progress() -> None:
            while True:
                await anyio.sleep(PROGRESS_INTERVAL)
                if latest:
                    message, latest[:] = latest[-1], []
                    try:
                        await self._append_and_publish(
                            job_uid, Progress(message=message), None, publish
                        )
                    except IllegalTransitionError:
                        return  # a stop ended the job; the run is being stopped

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
        return Completed(
            outputs=tuple(outputs),
            summary=f"{len(outputs)} output file(s)",
            cpu_seconds=outcome.cpu_seconds,
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
