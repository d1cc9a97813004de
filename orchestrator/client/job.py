"""`Job`: one running job, as `ParjobsClient.run` hands it back.

    job = await client.run("csv-summary", "data.csv", {"column": "rain_mm"}, max_spend=Decimal(2))
    job.accepted                              # the start's answer: queued (place 3), or running
    async for event in job.events(): ...      # optional: each verified event and progress report
    sheet = await job.result()                # the completed job, or JobFailedError & co.
    paths = await job.fetch("out/")           # its outputs, each checked against its SHA-256

Everything goes through the client that made it: the events it follows (no polling), the read
PAR over the outputs (handed over by the `completed` event), and the run PAR's control to cancel.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import errors
from schemas.events import JobEvent, JobSheetState, JobState
from schemas.messages import ProgressReport

if TYPE_CHECKING:
    from orchestrator.client.client import ParjobsClient
    from orchestrator.par.par import RunControl
    from orchestrator.par.transfer import PARTransport
    from schemas.messages import RunReply

ENDED_WITHOUT_COMPLETING: dict[JobState, type[errors.JobEndedError]] = {
    JobState.FAILED: errors.JobFailedError,
    JobState.CANCELLED: errors.JobCancelledError,
    JobState.EXPIRED: errors.JobExpiredError,
}
"""How `Job.result()` raises each end that is not `completed`."""


def raise_unless_completed(sheet: JobSheetState) -> JobSheetState:
    """`sheet` if its job completed; else the `JobEndedError` subclass of how it ended."""
    error = ENDED_WITHOUT_COMPLETING.get(sheet.state)
    if error is not None:
        why = f": {sheet.reason}" if sheet.reason else ""
        message = f"job {sheet.job_uid} {sheet.state.value}{why}"
        raise error(message, job_uid=sheet.job_uid, reason=sheet.reason)
    return sheet


def describe_run(reply: RunReply) -> str:
    """A run's state as a person reads it: `queued (place 3)`, `running`..."""
    return reply.state if reply.place is None else f"{reply.state} (place {reply.place})"


class Job:
    """A job submitted, its input uploaded and its run started (`ParjobsClient.run`)."""

    def __init__(
        self,
        client: ParjobsClient,
        uid: str,
        *,
        control: RunControl,
        expires_at: datetime,
        accepted: RunReply,
        transport: PARTransport | None = None,
    ) -> None:
        self.uid = uid
        self.expires_at = expires_at
        """When the job's PARs, and the job if it has not ended by then, expire."""
        self.accepted = accepted
        """Compute's answer to the start: `queued` with its `place` (1: next to run) while every
        run slot was taken, else `running` (or the job's end, if it came first)."""
        self._client = client
        self._control = control
        self._transport = transport

    def __repr__(self) -> str:
        return f"Job({self.uid}, {describe_run(self.accepted)})"

    async def events(self) -> AsyncIterator[JobEvent | ProgressReport]:
        """The job's events, each verified and chained, in seq order from its first to the one
        that ends it (those already past come first, at once); then the iteration ends.

        Between them come the run's progress reports, as they come: a `ProgressReport` (signed by
        compute, never in the log) is no `JobEvent`, but reads like one where it matters: its
        `seq` is the event it follows, its `payload` a `Progress` (`message`, `fraction`), so
        `event.payload.type` is `"progress"` and `isinstance(event.payload, Progress)` finds it.
        """
        async with aclosing(self._client.updates(self.uid)) as events:
            async for event in events:
                yield event

    async def result(self, *, timeout: float | None = None) -> JobSheetState:  # noqa: ASYNC109
        """The job's final state once it completed. A job that ended otherwise raises
        `JobFailedError`, `JobCancelledError` or `JobExpiredError` (each a `JobEndedError`, with
        its `reason`); TimeoutError if it has not ended within `timeout` seconds (None: wait)."""
        limit = math.inf if timeout is None else timeout
        return raise_unless_completed(
            await self._client.wait_until(self.uid, frozenset(), timeout=limit)
        )

    async def fetch(self, directory: str | Path) -> list[Path]:
        """Download the completed job's outputs into `directory` through a read PAR (the one
        its `completed` event hands over, while it has time left; else one access mints), each
        checked against its recorded SHA-256; the paths written. JobNotCompletedError before it
        completed.
        """
        return await self._client.fetch(self.uid, directory, transport=self._transport)

    async def status(self) -> RunReply:
        """The run as compute has it now: its state, its place while queued, its last progress
        message."""
        return await self._control.status()

    async def cancel(self) -> RunReply:
        """Stop the run through the run PAR (or take it out of the run queue while it waits);
        the job then ends cancelled."""
        return await self._control.stop()
