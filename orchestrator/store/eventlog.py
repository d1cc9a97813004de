"""The event store: each job's log in the object store, appended with conditional creates.

Event n of job U is `<root>U/events/<n, 10 digits>.json`, created with `If-None-Match: *`, so two
writers can never both write n: optimistic concurrency with no lock. A writer that loses reads the
events it missed, checks its transition again against the newer state, and tries the next seq.
Events are never rewritten, so whatever a reader has seen stays true.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import OrderedDict

import anyio
from pydantic import TypeAdapter, ValidationError

from orchestrator.core.jobstate import apply, fold
from orchestrator.core.par_rules import validate_prefix
from orchestrator.errors import (
    AppendConflictError,
    EventLogCorruptError,
    JobExistsError,
    JobNotFoundError,
    ObjectExistsError,
)
from orchestrator.store.base import ObjectStore
from schemas.events import EventPayload, JobEvent, JobSheetState, Submitted, new_event_id
from schemas.par import Uid

DEFAULT_MAX_ATTEMPTS = 20  # 8 writers hammering one job needed up to 12 on SeaweedFS
_BACKOFF_BASE = 0.01  # seconds: the first lost race waits up to this, doubling per loss
_BACKOFF_CAP = 0.5
_READ_CONCURRENCY = 16  # GETs in flight while reading one log
_CACHED_JOBS = 4096  # logs kept in memory (least recently read dropped first)
_EVENT_NAME = re.compile(r"(\d{10})\.json")
_UID = TypeAdapter(Uid)


class EventLog:
    """Every job's events under `root` of one object store."""

    def __init__(self, store: ObjectStore, root: str = "jobs/") -> None:
        self._store = store
        self._root = validate_prefix(root)
        self._cache: OrderedDict[str, list[JobEvent]] = OrderedDict()  # job uid -> events 1..n

    def events_prefix(self, job_uid: str) -> str:
        # Validated, so a job uid can never steer a key outside its own folder.
        return f"{self._root}{_UID.validate_python(job_uid)}/events/"

    def event_key(self, job_uid: str, seq: int) -> str:
        return f"{self.events_prefix(job_uid)}{seq:010d}.json"

    async def job_uids(self) -> list[str]:
        """Every job that has a log here, sorted."""
        found = set()
        for info in await self._store.list(self._root):
            uid, _, rest = info.key.removeprefix(self._root).partition("/")
            if rest.startswith("events/"):
                found.add(uid)
        return sorted(found)

    async def read(self, job_uid: str, *, after: int = 0) -> list[JobEvent]:
        """The job's events with seq > `after`, in seq order; [] if there are none.

        Events are never rewritten, so those already read (from seq 1 on) are kept in a bounded
        cache and only newer ones are listed and fetched: a poll costs one LIST, not a GET per
        event of the whole history.
        """
        known = self._cache.get(job_uid, [])
        fresh = await self._read_stored(job_uid, after=max(after, len(known)))
        if after <= len(known) and all(e.seq == len(known) + i for i, e in enumerate(fresh, 1)):
            known = known + fresh
            self._remember(job_uid, known)
            return known[after:]
        return fresh

    def _remember(self, job_uid: str, events: list[JobEvent]) -> None:
        self._cache[job_uid] = events
        self._cache.move_to_end(job_uid)
        while len(self._cache) > _CACHED_JOBS:
            self._cache.popitem(last=False)

    async def _read_stored(self, job_uid: str, *, after: int) -> list[JobEvent]:
        prefix = self.events_prefix(job_uid)
        start_after = self.event_key(job_uid, after) if after else None
        seqs: list[int] = []
        for info in await self._store.list(prefix, start_after=start_after):
            name = _EVENT_NAME.fullmatch(info.key.removeprefix(prefix))
            if name is None:
                raise EventLogCorruptError(f"{info.key!r} is in job {job_uid}'s log but no event")
            if int(name[1]) > after:
                seqs.append(int(name[1]))

        found: dict[int, JobEvent] = {}
        limit = anyio.Semaphore(_READ_CONCURRENCY)

        async def fetch(seq: int) -> None:
            async with limit:
                found[seq] = await self._get(job_uid, seq)

        try:
            async with anyio.create_task_group() as tasks:
                for seq in seqs:
                    tasks.start_soon(fetch, seq)
        except* Exception as failed:  # the first failed GET is the error, not a group of them
            raise failed.exceptions[0] from None
        return [found[seq] for seq in seqs]

    async def _get(self, job_uid: str, seq: int) -> JobEvent:
        key = self.event_key(job_uid, seq)
        try:
            event = JobEvent.model_validate_json(await self._store.get(key))
        except ValidationError as exc:
            raise EventLogCorruptError(f"{key!r} is not a valid event: {exc}") from exc
        if (event.job_uid, event.seq) != (job_uid, seq):
            raise EventLogCorruptError(
                f"{key!r} holds event {event.seq} of job {event.job_uid}, not {seq} of {job_uid}"
            )
        return event

    async def load(self, job_uid: str) -> JobSheetState:
        """The job as its whole log leaves it."""
        return fold(await self._read_existing(job_uid))

    async def _read_existing(self, job_uid: str) -> list[JobEvent]:
        events = await self.read(job_uid)
        if not events:
            raise JobNotFoundError(f"no job {job_uid}: its log has no events")
        return events

    async def append(self, event: JobEvent) -> None:
        """Write `event` at its seq unless something is there; no state check (see transition)."""
        try:
            await self._store.put_if_absent(
                self.event_key(event.job_uid, event.seq), event.model_dump_json().encode()
            )
        except ObjectExistsError as exc:
            raise AppendConflictError(
                f"job {event.job_uid}: event {event.seq} was already written by another writer"
            ) from exc

    async def create(
        self, job_uid: str, actor: str, payload: Submitted, *, event_id: str | None = None
    ) -> JobEvent:
        """Start job `job_uid`'s log with `payload` (seq 1).

        JobExistsError if the job already exists, unless its first event is `event_id` (a retry
        of this very create): then that event is returned.
        """
        event = JobEvent(
            event_id=event_id or new_event_id(),
            job_uid=job_uid,
            seq=1,
            actor=actor,
            payload=payload,
        )
        apply(None, event)  # only `submitted` may start a log
        try:
            await self.append(event)
        except AppendConflictError:
            first = await self._get(job_uid, 1)
            if first.event_id == event.event_id:
                return first
            raise JobExistsError(
                f"job {job_uid} already exists (submitted {first.time.isoformat()} by "
                f"{first.actor}); a new job needs a new uid"
            ) from None
        return event

    async def transition(
        self,
        job_uid: str,
        actor: str,
        payload: EventPayload,
        *,
        event_id: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> JobEvent:
        """Append `payload` as the job's next event if it is legal now; returns the event.

        A lost race reads the events it missed and checks again: another writer's event may make
        this one illegal (IllegalTransitionError, which no retry can fix, so none is made). If
        event `event_id` is already in the log (a redelivered message, or a write whose reply was
        lost) it is returned and nothing is appended.
        """
        event_id = event_id or new_event_id()
        unseen = await self._read_existing(job_uid)
        sheet: JobSheetState | None = None
        for attempt in range(max_attempts):
            for logged in unseen:
                if logged.event_id == event_id:
                    return logged
            sheet = fold(unseen, sheet)
            event = JobEvent(
                event_id=event_id,
                job_uid=job_uid,
                seq=sheet.seq + 1,
                actor=actor,
                payload=payload,
            )
            apply(sheet, event)  # refuses an illegal transition before anything is written
            try:
                await self.append(event)
            except AppendConflictError:
                # Losers that retry in lockstep collide again; a random pause spreads them out.
                pause = min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)
                await anyio.sleep(random.uniform(0, pause))  # noqa: S311 - jitter, not a secret
                unseen = await self.read(job_uid, after=sheet.seq)
                continue
            return event
        raise AppendConflictError(
            f"job {job_uid}: still losing the race to append after {max_attempts} attempts; "
            "too many writers at once, retry later"
        )


def step_event_id(job_uid: str, step: str) -> str:
    """The event id of a step that happens at most once per job (e.g. "storage_contracted").

    Derived, not random: a redelivered message that redoes the step appends nothing new, because
    `EventLog.transition` finds this id already in the log.
    """
    return hashlib.sha256(f"{job_uid}|{step}".encode()).hexdigest()[:32]
