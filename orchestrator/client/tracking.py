"""What a client knows of one job: its events, each verified, chained and applied in seq order.

Events reach a client twice over: as they are published (its events queue) and in a GetJob reply
(to catch up). Either way each one is checked before it is used: sealed by a service role allowed
to emit it (`verify_event`, against the operator's `ServiceKeys`), chained to the event before it
(`prev_hash`), and legal in the job's state (`jobstate.apply`). One that fails is dropped and
logged, never used. A copy of an event already applied is dropped silently (the services publish
at least once); an event that arrives before the one it follows is held until the gap is filled.

A run's progress is no event: it comes as `ProgressReport`s (verified by the inbox, signed by
compute), of which the tracker keeps only the latest, and only while the job lives.
"""

from __future__ import annotations

import logging

import anyio

from orchestrator.core.chain import event_hash, verify_event
from orchestrator.core.jobstate import apply, is_terminal
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import JobError, SignatureError
from schemas.events import JobEvent, JobSheetState
from schemas.messages import ProgressReport

log = logging.getLogger("parjobs.client")


class JobTracker:
    """The verified events of job `job_uid`, from seq 1 without a gap, and the job's state after
    each.

    `offer` each event as it comes, `report` each progress report; `changed()` returns once the
    sheet moved, a gap opened or a newer report came.
    """

    def __init__(self, job_uid: str, keys: ServiceKeys) -> None:
        self.job_uid = job_uid
        self._keys = keys
        self.events: list[JobEvent] = []
        """Applied: verified and chained, seq 1 to `len(events)`."""
        self.sheets: list[JobSheetState] = []
        """The job's state after each event applied: `sheets[i]` is the fold of `events[:i+1]`."""
        self.progress: ProgressReport | None = None
        """The latest progress report of the run (None: none came while it ran)."""
        self._early: dict[int, JobEvent] = {}
        """Verified events whose predecessor has not come yet, by seq."""
        self._changed = anyio.Event()
        self.caught_up_on: int | None = None
        """The connection (its count of reconnections) on which a catch-up last gave it the log;
        None: never. While the connection stays that one, its events queue (bound before the
        catch-up) has fed it every event since: it misses none."""

    @property
    def sheet(self) -> JobSheetState | None:
        """The job's state as its events applied so far leave it; None before event 1."""
        return self.sheets[-1] if self.sheets else None

    @property
    def has_gap(self) -> bool:
        """Events are held that do not follow the last one applied: some are missing."""
        return bool(self._early)

    @property
    def ended(self) -> bool:
        return self.sheet is not None and is_terminal(self.sheet.state)

    async def changed(self) -> None:
        """Return once the next event was applied, a gap opened or a newer progress report came
        (not for dropped copies)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def report(self, progress: ProgressReport) -> None:
        """Take a (verified) progress report if it is this job's, the job has not ended, and it
        is newer than the one kept; reports are coalesced to the latest."""
        if progress.job_uid != self.job_uid or self.ended:
            return
        if self.progress is not None and progress.time <= self.progress.time:
            return  # a copy, or overtaken by a newer one
        self.progress = progress
        self._notify()

    def offer(self, event: JobEvent, *, source: str) -> None:
        """Take `event` (from `source`, for the log) if it verifies; apply it once it follows."""
        if event.job_uid != self.job_uid:
            log.warning(
                "dropped an event of job %s from %s: not job %s",
                event.job_uid,
                source,
                self.job_uid,
            )
            return
        try:
            verify_event(event, self._keys)
        except SignatureError as exc:
            log.warning(
                "dropped event %d of job %s from %s: %s", event.seq, self.job_uid, source, exc
            )
            return
        applied = len(self.events)
        if event.seq <= applied:
            if self.events[event.seq - 1].event_id != event.event_id:
                log.warning(
                    "dropped event %d (%s) of job %s from %s: event %d is already %s",
                    event.seq,
                    event.event_id,
                    self.job_uid,
                    source,
                    event.seq,
                    self.events[event.seq - 1].event_id,
                )
            return  # a copy of what is applied: published at least once, or caught up twice
        if event.seq > applied + 1:
            self._early.setdefault(event.seq, event)
            self._notify()
            return
        if not self._apply(event, source):
            return
        while (held := self._early.pop(len(self.events) + 1, None)) and self._apply(held, "held"):
            pass
        # What is held at or below the last seq applied came again by another way: a copy.
        self._early = {seq: held for seq, held in self._early.items() if seq > len(self.events)}
        self._notify()

    def _apply(self, event: JobEvent, source: str) -> bool:
        prev = self.events[-1] if self.events else None
        link = None if prev is None else event_hash(prev)
        if event.prev_hash != link:
            log.warning(
                "dropped event %d of job %s from %s: it is not chained to the event before it",
                event.seq,
                self.job_uid,
                source,
            )
            return False
        try:
            sheet = apply(self.sheet, event)
        except JobError as exc:
            log.warning(
                "dropped event %d of job %s from %s: %s", event.seq, self.job_uid, source, exc
            )
            return False
        self.events.append(event)
        self.sheets.append(sheet)
        return True


def with_progress(sheet: JobSheetState, progress: ProgressReport | None) -> JobSheetState:
    """`sheet` showing `progress` as its last progress message and fraction (a report without a
    fraction keeps the last one known, as a `progress` event did in the fold)."""
    if progress is None:
        return sheet
    fraction = progress.payload.fraction
    return sheet.model_copy(
        update={
            "progress": progress.payload.message,
            "fraction": sheet.fraction if fraction is None else fraction,
        }
    )
