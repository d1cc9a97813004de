"""The "once per job" pattern both workers follow when an event asks them to contract."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from orchestrator.core.jobstate import fold
from orchestrator.store.eventlog import EventLog, step_event_id
from schemas.events import JobEvent, JobSheetState, JobState


@dataclass(frozen=True)
class Step:
    done: JobEvent | None
    """The step's event, if an earlier delivery already did it (publish it again, do nothing)."""
    sheet: JobSheetState | None
    """The job, if the step is due now: in the expected state with at least a second left."""
    remaining: timedelta
    """Until the job's deadline, rounded down to whole seconds: PARs must not outlive it."""


async def due_step(
    log: EventLog, trigger: JobEvent, expected: JobState, *steps: str, redelivered: bool = False
) -> Step:
    """Whether one of `steps` (named for `step_event_id`) was done, or is due, for the job of
    `trigger`, the event that asks for it.

    The trigger carries the job's state as of its seq: the log fetches only the events before it
    that it does not know, and lists nothing; a step done after it is found when the step's
    append loses the race. A `redelivered` trigger (whose first handler may have died after the
    step) reads the whole log instead, so the step's PARs are not minted again.
    """
    job_uid = trigger.job_uid
    events = await (log.read(job_uid) if redelivered else log.through(trigger))
    done = {step_event_id(job_uid, step) for step in steps}
    for logged in events:
        if logged.event_id in done:
            return Step(logged, None, timedelta(0))
    sheet = fold(events)
    remaining = timedelta(seconds=int((sheet.expires_at - datetime.now(UTC)).total_seconds()))
    due = sheet.state is expected and remaining >= timedelta(seconds=1)
    return Step(None, sheet if due else None, remaining)
