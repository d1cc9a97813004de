"""Replay: check every job's stored log, then rebuild its JobSheet from the log and the stream.

The stored log is the truth, if it holds: each job's log is checked first (`verify_log`: every
event sealed by a role allowed to emit it, chained to the one before), and a stored event that was
edited, forged or removed behind the services' back is named, by key and seq.

The events stream is what subscribers saw, and anyone who may publish to the events exchange can
put a record there for good. So a stream record counts only if it is sealed by a role allowed to
emit it and continues the job's chain (its `prev_hash` is the hash of the stored event before it,
or of another such record). Anything else is *rejected*: listed, never a divergence, never a
failure. What remains is compared with the stored log: the stream lacking a stored event (an
append whose publish a crash lost, normally repaired by the next delivery), the stream holding a
sealed event the store lacks (lost from the store), or another sealed version of a stored event.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio
from pydantic import TypeAdapter

from orchestrator.broker.base import Broker
from orchestrator.core.chain import ChainFault, ChainProblem, check_log, check_seal, event_hash
from orchestrator.core.jobstate import fold
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import EventLogCorruptError, JobError
from orchestrator.store.eventlog import EventLog
from schemas.events import JobEvent, JobSheetState
from schemas.messages import Envelope, EventPublished

_ENVELOPE = TypeAdapter(Envelope)
JOBS_AT_ONCE = 32  # logs fetched concurrently (each up to 16 GETs; the S3 client pools 10)
_SEAL_FAULTS = frozenset({ChainFault.UNSIGNED, ChainFault.FORGED, ChainFault.FORBIDDEN_SIGNER})


@dataclass(frozen=True, slots=True)
class StreamedEvent:
    """A job event as a stream record carried it."""

    event: JobEvent
    offset: int | None = None  # where in the stream, to find the record again


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A stream record replay did not take as the job's event, and why."""

    record: StreamedEvent
    fault: ChainFault
    detail: str

    def __str__(self) -> str:
        event = self.record.event
        where = "" if self.record.offset is None else f" at offset {self.record.offset}"
        return (
            f"stream record{where}, event {event.seq} ({event.event_id}): "
            f"{self.fault.value}: {self.detail}"
        )


@dataclass(frozen=True)
class ReplayResult:
    job_uid: str
    stored: JobSheetState | None
    streamed: JobSheetState | None
    problems: list[str] = field(default_factory=list)
    """What fails the replay: the stored log's own problems, then the divergences."""
    tampered: list[ChainProblem] = field(default_factory=list)
    """The stored events that were edited, forged or removed."""
    rejected: list[RejectedRecord] = field(default_factory=list)
    """Stream records that do not count: forged, foreign or off the chain. Never a problem."""

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


@dataclass(frozen=True, slots=True)
class _StoredEvent:
    """A stored event as the stream is judged against it."""

    json: str  # its JSON: a stream record with the same JSON is the same event, seal and hash
    hash: str
    sealed: bool  # whether its own seal holds


def _accept_stream(
    stored: dict[int, _StoredEvent], streamed: Iterable[StreamedEvent], keys: ServiceKeys
) -> tuple[dict[int, dict[str, JobEvent]], list[RejectedRecord]]:
    """The stream's sealed, chained events by seq and hash (duplicates merged), and the rest.

    `stored` are the stored log's events by seq, which stream records may continue. A record
    that is a sealed stored event byte for byte is neither canonicalized nor verified again.
    """
    chained: dict[int, dict[str, JobEvent]] = defaultdict(dict)  # seq -> hash -> event
    rejected = []
    # By seq, so that a record's predecessor on the stream is judged before it.
    for record in sorted(streamed, key=lambda record: record.event.seq):
        event = record.event
        twin = stored.get(event.seq)
        if twin is not None and twin.sealed and event.model_dump_json() == twin.json:
            hash_ = twin.hash
        elif (seal := check_seal(event, keys)) is not None:
            rejected.append(RejectedRecord(record, seal.fault, seal.detail))
            continue
        else:
            hash_ = event_hash(event)
        known_before = set(chained.get(event.seq - 1, {}))
        if event.seq - 1 in stored:
            known_before.add(stored[event.seq - 1].hash)
        follows = event.prev_hash is None if event.seq == 1 else event.prev_hash in known_before
        if not follows:
            detail = (
                f"it does not continue the job's chain: no event {event.seq - 1} known has the "
                "hash it names"
                if event.seq > 1
                else "the job's first event names a previous one"
            )
            rejected.append(RejectedRecord(record, ChainFault.BROKEN_LINK, detail))
            continue
        chained[event.seq][hash_] = event
    return chained, rejected


def compare(
    job_uid: str,
    stored: list[JobEvent],
    streamed: Iterable[StreamedEvent],
    keys: ServiceKeys,
    *,
    event_key: Callable[[int], str] | None = None,
) -> ReplayResult:
    """Check one job's stored log, sort its stream records, and say how the two differ (pure).

    `stored` is the job's log in seq order; `event_key` names a stored event's object (by seq).
    """
    tampered, hashes = check_log(stored, keys)
    problems = [
        f"stored event {problem.seq} ({event_key(problem.seq) if event_key else problem.event_id})"
        f" {problem.fault.value}: {problem.detail}"
        for problem in tampered
    ]
    unsealed = {problem.seq for problem in tampered if problem.fault in _SEAL_FAULTS}
    by_seq = {
        event.seq: _StoredEvent(event.model_dump_json(), hash_, event.seq not in unsealed)
        for event, hash_ in zip(stored, hashes, strict=True)
    }
    stored_hashes = {seq: twin.hash for seq, twin in by_seq.items()}
    chained, rejected = _accept_stream(by_seq, streamed, keys)
    if missing := [seq for seq in stored_hashes if seq not in chained]:
        problems.append(f"the stream lacks event(s) {missing} of the stored log")
    if other := [seq for seq, h in stored_hashes.items() if set(chained.get(seq, {})) - {h}]:
        problems.append(f"the stream has other sealed versions of stored event(s) {other}")
    if lost := sorted(seq for seq in chained if seq not in stored_hashes):
        problems.append(
            f"the stream has sealed event(s) {lost} that the stored log does not: "
            "the store lost them"
        )
    if chained and not stored:
        problems.append("no stored log")
    stored_sheet = _fold_or_problem(stored, "stored log", problems)
    stream_sheet = None
    if not missing and all(len(versions) == 1 for versions in chained.values()):
        stream = [next(iter(chained[seq].values())) for seq in sorted(chained)]
        stream_sheet = _fold_or_problem(stream, "stream", problems)
    if stored_sheet and stream_sheet and stored_sheet != stream_sheet:
        problems.append(
            f"stored state {stored_sheet.state.value}@{stored_sheet.seq} differs from streamed "
            f"{stream_sheet.state.value}@{stream_sheet.seq}"
        )
    return ReplayResult(job_uid, stored_sheet, stream_sheet, problems, tampered, rejected)


async def streamed_events(broker: Broker) -> dict[str, list[StreamedEvent]]:
    """Every job event on the stream, from its first offset to its current tail, by job."""
    by_job: dict[str, list[StreamedEvent]] = defaultdict(list)
    stream = broker.topology.events_stream
    async for record in broker.read_stream(stream, _ENVELOPE, skip_invalid=True):
        if isinstance(record.value.body, EventPublished):
            event = record.value.body.event
            by_job[event.job_uid].append(StreamedEvent(event, record.offset))
    return by_job


async def replay(
    log: EventLog, broker: Broker, keys: ServiceKeys, *, jobs_at_once: int = JOBS_AT_ONCE
) -> list[ReplayResult]:
    """Check every job's stored log, and compare it with the job's streamed history.

    The root is listed once, not each log; `jobs_at_once` logs are fetched concurrently, each
    checked as soon as its events are in. Results come sorted by job uid.
    """
    streamed = await streamed_events(broker)
    listed = await log.listed_logs()
    results: dict[str, ReplayResult] = {}
    limit = anyio.CapacityLimiter(jobs_at_once)

    async def replay_one(job_uid: str) -> None:
        async with limit:
            try:
                stored = (
                    await log.read_listed(job_uid, listed[job_uid]) if job_uid in listed else []
                )
            except EventLogCorruptError as exc:
                problem = f"the stored log cannot be read: {exc}"
                results[job_uid] = ReplayResult(job_uid, None, None, [problem])
                return
        results[job_uid] = compare(
            job_uid,
            stored,
            streamed.get(job_uid, []),
            keys,
            event_key=functools.partial(log.event_key, job_uid),
        )

    async with anyio.create_task_group() as tasks:
        for job_uid in set(streamed) | set(listed):
            tasks.start_soon(replay_one, job_uid)
    return [results[job_uid] for job_uid in sorted(results)]
