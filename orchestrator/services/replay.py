"""Replay: rebuild every JobSheet from the events stream and from the stored log, and compare.

The stored log is the truth; the stream is what subscribers saw. A divergence names what the
stream lacks (an event appended but never published: a crash between the two, which the next
delivery of the triggering message normally repairs) or holds that the log does not.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from orchestrator.broker.base import Broker
from orchestrator.core.jobstate import fold
from orchestrator.errors import JobError
from orchestrator.store.eventlog import EventLog
from schemas.events import JobEvent, JobSheetState
from schemas.messages import Envelope, EventPublished

_ENVELOPE = TypeAdapter(Envelope)


@dataclass(frozen=True)
class ReplayResult:
    job_uid: str
    stored: JobSheetState | None
    streamed: JobSheetState | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _fold_or_problem(
    events: list[JobEvent], source: str, problems: list[str]
) -> JobSheetState | None:
    if not events:
        return None
    try:
        return fold(events)
    except JobError as exc:
        problems.append(f"the {source} does not fold: {exc}")
        return None


def compare(job_uid: str, stored: list[JobEvent], streamed: Iterable[JobEvent]) -> ReplayResult:
    """Fold both histories of one job and say how they differ (pure)."""
    problems: list[str] = []
    unique: dict[str, JobEvent] = {}
    for event in streamed:  # a republished event arrives again with the same id
        unique.setdefault(event.event_id, event)
    stream = sorted(unique.values(), key=lambda event: event.seq)
    stored_ids = {event.event_id for event in stored}
    stream_ids = set(unique)
    if missing := [e.seq for e in stored if e.event_id not in stream_ids]:
        problems.append(f"the stream lacks event(s) {missing} of the stored log")
    if extra := [e.seq for e in stream if e.event_id not in stored_ids]:
        problems.append(f"the stream has event(s) {extra} that the stored log does not")
    if not stored:
        problems.append("no stored log")
    stored_sheet = _fold_or_problem(stored, "stored log", problems)
    stream_sheet = _fold_or_problem(stream, "stream", problems) if not missing else None
    if stored_sheet and stream_sheet and stored_sheet != stream_sheet:
        problems.append(
            f"stored state {stored_sheet.state.value}@{stored_sheet.seq} differs from streamed "
            f"{stream_sheet.state.value}@{stream_sheet.seq}"
        )
    return ReplayResult(job_uid, stored_sheet, stream_sheet, problems)


async def streamed_events(broker: Broker) -> dict[str, list[JobEvent]]:
    """Every job event on the stream, from its first offset to its current tail, by job."""
    by_job: dict[str, list[JobEvent]] = defaultdict(list)
    stream = broker.topology.events_stream
    async for record in broker.read_stream(stream, _ENVELOPE, skip_invalid=True):
        if isinstance(record.value.body, EventPublished):
            event = record.value.body.event
            by_job[event.job_uid].append(event)
    return by_job


async def replay(log: EventLog, broker: Broker) -> list[ReplayResult]:
    """Compare every job's stored log with its streamed history."""
    streamed = await streamed_events(broker)
    results = []
    for job_uid in sorted(set(streamed) | set(await log.job_uids())):
        stored = await log.read(job_uid)
        results.append(compare(job_uid, stored, streamed.get(job_uid, [])))
    return results
