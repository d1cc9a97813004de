"""The event store: each job's log in the object store, appended with conditional creates.

Event n of job U is `<root>U/events/<n, 10 digits>.json`: each job's log is an `AppendLog`, so
two writers can never both write n. A writer that loses reads the events it missed, checks its
transition again against the newer state, and tries the next seq.

What a log has read, written or been handed (`through`: the event that triggered a handler) it
remembers, so the usual step costs one conditional create and no read: a transition starts from
what is remembered and reads only when it loses the race (what it missed) or knows nothing of the
job; an ended job's log is complete, so reading it again lists nothing.

A service's log seals what it appends (`EventSealer`: the hash chain and its role's signature,
`orchestrator.core.chain`) and, given the operator's `ServiceKeys`, verifies every event it reads:
an event edited, forged or removed behind the services' back makes the job's log unreadable
(EventLogCorruptError naming it) rather than acted on. `parjobs replay` reads unverified and
checks the chain itself, to name every problem.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from pydantic import TypeAdapter, ValidationError

from orchestrator.core.chain import seal_event, verify_log
from orchestrator.core.jobstate import TERMINAL_STATES, TRANSITIONS, apply, fold
from orchestrator.core.keys import KeyPair
from orchestrator.core.par_rules import validate_prefix
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import (
    AppendConflictError,
    EventLogCorruptError,
    IllegalTransitionError,
    JobExistsError,
    JobNotFoundError,
)
from orchestrator.store.appendlog import AppendLog, until_won
from orchestrator.store.base import ObjectStore
from schemas.events import EventPayload, JobEvent, JobSheetState, Submitted, new_event_id
from schemas.par import Uid
from schemas.signing import ServiceRole

DEFAULT_MAX_ATTEMPTS = 20  # 8 writers hammering one job needed up to 12 on SeaweedFS
_CACHED_JOBS = 4096  # logs kept in memory (least recently read dropped first)
_CACHED_ENDED = 256  # of which ended: a daemon seldom needs an ended job's log again
_TRIM_EVERY = 128  # new logs between two drops of ended ones (a walk of every log kept)
_UID = TypeAdapter(Uid)


@dataclass(frozen=True)
class EventSealer:
    """What a service seals the events it appends with: its role and the role's key."""

    key: KeyPair
    role: ServiceRole

    def seal(self, event: JobEvent, prev: JobEvent | None) -> JobEvent:
        return seal_event(event, prev, self.key, self.role)


class _JobLog(AppendLog[JobEvent]):
    """One job's events, remembered once read (and, once verified, not verified again)."""

    model = JobEvent
    noun = "event"
    corrupt = EventLogCorruptError

    def __init__(self, store: ObjectStore, prefix: str, job_uid: str) -> None:
        super().__init__(store, prefix, digits=10, where=f"job {job_uid}'s log")
        self._job_uid = job_uid
        self.verified: list[JobEvent] = []  # events 1..n whose seals and links held

    @property
    def known(self) -> list[JobEvent]:
        """Events 1..n as read or written so far (no I/O)."""
        return self._known

    @property
    def ended(self) -> bool:
        """Whether the last event known ends the job: then no event can follow it."""
        return bool(self._known) and TRANSITIONS[self._known[-1].payload.type].target in (
            TERMINAL_STATES
        )

    def remember(self, seq: int, record: JobEvent) -> bool:
        # An event this log wrote (or verified before handing it here) needs no verifying.
        complete = len(self.verified) == len(self._known)
        kept = super().remember(seq, record)
        if kept and complete:
            self.verified = self._known
        return kept

    def verify(self, events: list[JobEvent], keys: ServiceKeys) -> None:
        """Check the seals and links of `events` (1..n) past those verified already."""
        done = len(self.verified)
        if len(events) <= done:
            return
        after = self.verified[-1] if self.verified else None
        if problems := verify_log(events[done:], keys, after=after):
            listed = "; ".join(str(problem) for problem in problems)
            raise EventLogCorruptError(
                f"job {self._job_uid}'s log fails its checks, so nothing acts on it: {listed}"
            )
        self.verified = events

    def misplaced(self, record: JobEvent, seq: int) -> str | None:
        if (record.job_uid, record.seq) == (self._job_uid, seq):
            return None
        return f"event {record.seq} of job {record.job_uid}, not {seq} of {self._job_uid}"


class EventLog:
    """Every job's events under `root` of one object store."""

    def __init__(
        self,
        store: ObjectStore,
        root: str = "jobs/",
        *,
        sealer: EventSealer | None = None,
        keys: ServiceKeys | None = None,
    ) -> None:
        self._store = store
        self._root = validate_prefix(root)
        self._logs: OrderedDict[str, _JobLog] = OrderedDict()  # job uid -> its log
        self._new_logs = 0  # since ended logs were last dropped
        self._sealer = sealer  # None: appended events are not sealed (tests of the log alone)
        self._keys = keys  # None: events are read unverified (replay verifies them itself)

    def events_prefix(self, job_uid: str) -> str:
        # Validated, so a job uid can never steer a key outside its own folder.
        return f"{self._root}{_UID.validate_python(job_uid)}/events/"

    def event_key(self, job_uid: str, seq: int) -> str:
        return self._log(job_uid).key(seq)

    def _log(self, job_uid: str) -> _JobLog:
        """The job's log, with the events already read (the least recently used dropped)."""
        log = self._logs.get(job_uid)
        if log is None:
            log = self._logs[job_uid] = _JobLog(self._store, self.events_prefix(job_uid), job_uid)
            while len(self._logs) > _CACHED_JOBS:
                self._logs.popitem(last=False)
            self._new_logs += 1
            if self._new_logs >= _TRIM_EVERY:
                self._drop_ended()
        self._logs.move_to_end(job_uid)
        return log

    def _drop_ended(self) -> None:
        """Keep the `_CACHED_ENDED` most recently used ended logs: a daemon's memory then grows
        with the jobs in flight, not with every job it has seen (~20 KiB each)."""
        self._new_logs = 0
        ended = [uid for uid, log in self._logs.items() if log.ended]  # least recent first
        for uid in ended[: max(0, len(ended) - _CACHED_ENDED)]:
            del self._logs[uid]

    async def job_uids(self, *, starting: str = "") -> list[str]:
        """Every job that has a log here (whose uid starts with `starting`), sorted."""
        return sorted(await self.listed_logs(starting=starting))

    async def listed_logs(self, *, starting: str = "") -> dict[str, list[str]]:
        """Every job that has a log here (whose uid starts with `starting`) -> the keys under its
        log's prefix, sorted: one listing of the root (a LIST per page of 1,000 keys), for
        `read_listed`."""
        found: dict[str, list[str]] = {}
        for info in await self._store.list(self._root + starting):
            uid, _, rest = info.key.removeprefix(self._root).partition("/")
            if rest.startswith("events/"):
                found.setdefault(uid, []).append(info.key)
        return found

    async def read_listed(self, job_uid: str, keys: list[str]) -> list[JobEvent]:
        """The job's events at `keys` (its `listed_logs` entry), unverified and not remembered:
        for a reader of every log once (replay), which lists the root instead of each log.

        EventLogCorruptError if a key is no event's, or a seq is missing, as for `read`; or if
        `job_uid` (a folder name found in the root) is no job uid.
        """
        try:
            prefix = self.events_prefix(job_uid)
        except ValidationError:
            raise EventLogCorruptError(
                f"{keys[0]!r} is under the jobs' root, but {job_uid!r} is no job uid"
            ) from None
        log = _JobLog(self._store, prefix, job_uid)
        return await log.fetch(log.listed_seqs(keys))

    async def read(self, job_uid: str, *, after: int = 0) -> list[JobEvent]:
        """The job's events with seq > `after`, in seq order; [] if there are none.

        Events are never rewritten, so those already read are remembered (for the most recently
        read jobs) and only newer ones are listed and fetched: a poll costs one LIST, not a GET
        per event of the whole history, and an ended job's none. With service keys, every event
        read is verified first.
        """
        log = self._log(job_uid)
        if log.ended and len(trusted := self._trusted(log)) == len(log.known):
            return trusted[after:]  # an ended log is complete: nothing to list
        if self._keys is None:
            return await log.read(after=after)
        events = await log.read()
        log.verify(events, self._keys)
        return events[after:]

    async def read_through(self, job_uid: str, seq: int) -> list[JobEvent]:
        """The job's events, at least up to `seq`: from memory when known that far (no I/O),
        else read (`read`)."""
        trusted = self._trusted(self._log(job_uid))
        return trusted if len(trusted) >= seq else await self.read(job_uid)

    async def through(self, trigger: JobEvent) -> list[JobEvent]:
        """The job's events up to `trigger`, an event a handler received, reading no more than
        that needs: those remembered; those between fetched by key, not listed (services publish
        only what they appended, so a sealed event's predecessors are stored); the trigger as
        received. With service keys they must verify as one chain; if they do not, the log is
        read as `read` does, and judged. Events remembered past the trigger come too.
        """
        log = self._log(trigger.job_uid)
        known = self._trusted(log)
        if len(known) >= trigger.seq:
            return known
        if len(known) == len(log.known):  # no event read but not yet verified
            try:
                between = await log.fetch(range(len(known) + 1, trigger.seq))
                events = [*known, *between, trigger]
                if self._keys is not None:
                    log.verify(events, self._keys)
            except EventLogCorruptError:
                pass  # judged on what is stored, below
            else:
                for event in events[len(known) :]:
                    log.remember(event.seq, event)
                return events
        return await self.read(trigger.job_uid)

    def forget(self, job_uid: str) -> None:
        """Drop what is remembered of `job_uid`, for a daemon done with the job (storage, once
        it has contracted it); a later read reads the log again."""
        self._logs.pop(job_uid, None)

    def remembered(self, starting: str) -> list[list[JobEvent]]:
        """The events remembered (and verified) of each job whose uid starts with `starting`,
        as `read_through` would answer them; no I/O."""
        return [self._trusted(log) for uid, log in self._logs.items() if uid.startswith(starting)]

    def _trusted(self, log: _JobLog) -> list[JobEvent]:
        """The events of `log` known and, with service keys, verified."""
        if self._keys is None or len(log.verified) == len(log.known):
            return log.known
        return log.verified

    async def owner(self, job_uid: str) -> str:
        """The registered user whose job it is (from its `submitted` event, read once)."""
        log = self._log(job_uid)
        first = log.known[0] if log.known else (await self._read_existing(job_uid))[0]
        if not isinstance(first.payload, Submitted):
            raise EventLogCorruptError(f"job {job_uid}'s log does not start with `submitted`")
        return first.payload.owner

    async def deadline(self, job_uid: str) -> datetime | None:
        """When the job expires unless it started, from its `submitted` event: remembered, or one
        GET by key (no LIST); None if it has no log (yet). A hint of when to read the log, not
        verified here: whoever acts on it reads the log, verified."""
        log = self._log(job_uid)
        first = log.known[0] if log.known else await log.get(1)
        if first is None:
            return None
        if not isinstance(first.payload, Submitted):
            raise EventLogCorruptError(f"job {job_uid}'s log does not start with `submitted`")
        return first.payload.expires_at

    def _sealed(self, event: JobEvent, prev: JobEvent | None) -> JobEvent:
        return event if self._sealer is None else self._sealer.seal(event, prev)

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
        if not await self._log(event.job_uid).append(event.seq, event):
            raise AppendConflictError(
                f"job {event.job_uid}: event {event.seq} was already written by another writer"
            )

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
        event = self._sealed(event, None)
        try:
            await self.append(event)
        except AppendConflictError:
            (first,) = await self._log(job_uid).fetch([1])
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
        our_id = event_id or new_event_id()
        log = self._log(job_uid)
        # What this log remembers is a prefix of the job's log: appending after it succeeds only
        # if nothing followed it, and a lost race reads what did. Nothing remembered: read.
        unseen = list(self._trusted(log))
        fresh = not unseen  # whether `unseen` ends at the stored log's end as last read
        if fresh:
            unseen = await self._read_existing(job_uid)
        sheet: JobSheetState | None = None  # as of the events checked so far
        last: JobEvent | None = None  # the last of them: what the new event chains to

        async def attempt() -> JobEvent | None:
            nonlocal unseen, sheet, last, fresh
            if sheet is not None:  # a try before this one lost: read the events that won
                unseen, fresh = await self.read(job_uid, after=sheet.seq), True
            for logged in unseen:
                if logged.event_id == our_id:
                    return logged
            sheet = fold(unseen, sheet)
            last = unseen[-1] if unseen else last
            event = JobEvent(
                event_id=our_id, job_uid=job_uid, seq=sheet.seq + 1, actor=actor, payload=payload
            )
            try:
                apply(sheet, event)  # refuses an illegal transition before anything is written
            except IllegalTransitionError:
                if fresh:
                    raise
                return None  # judged on what was remembered: read what followed, judge again
            event = self._sealed(event, last)
            return event if await log.append(event.seq, event) else None

        return await until_won(
            attempt,
            max_attempts,
            give_up=lambda: AppendConflictError(
                f"job {job_uid}: still losing the race to append after {max_attempts} attempts; "
                "too many writers at once, retry later"
            ),
        )


def step_event_id(job_uid: str, step: str) -> str:
    """The event id of a step that happens at most once per job (e.g. "storage_contracted").

    Derived, not random: a redelivered message that redoes the step appends nothing new, because
    `EventLog.transition` finds this id already in the log.
    """
    return hashlib.sha256(f"{job_uid}|{step}".encode()).hexdigest()[:32]
