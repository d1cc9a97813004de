"""The JobSheet state machine as pure functions: which event is legal when, and what it changes.

A job's state is `fold(events)`; `apply` refuses any event that does not continue the log (wrong
job, seq not last + 1) or is not legal in the current state. No I/O here: the event store
(`orchestrator.store.eventlog`) decides what to append by asking these functions first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from orchestrator.errors import EventSequenceError, IllegalTransitionError
from schemas.events import (
    Cancelled,
    Completed,
    ComputeContracted,
    EventPayload,
    Expired,
    Failed,
    JobEvent,
    JobSheetState,
    JobState,
    Progress,
    Queued,
    RunStarted,
    StorageContracted,
    Submitted,
)


@dataclass(frozen=True, slots=True)
class Rule:
    """The states an event type is legal in (None: a job with no events) and where it leads."""

    sources: frozenset[JobState | None]
    target: JobState


_BEFORE_RUN = frozenset({JobState.SUBMITTED, JobState.STORAGE_CONTRACTED, JobState.READY})
_LIVE = _BEFORE_RUN | {JobState.QUEUED, JobState.RUNNING}

TRANSITIONS: Mapping[str, Rule] = MappingProxyType(
    {
        "submitted": Rule(frozenset({None}), JobState.SUBMITTED),
        "storage_contracted": Rule(frozenset({JobState.SUBMITTED}), JobState.STORAGE_CONTRACTED),
        "compute_contracted": Rule(frozenset({JobState.STORAGE_CONTRACTED}), JobState.READY),
        # Started while every run slot is taken: it waits its turn (`_check_claim` holds it).
        "queued": Rule(frozenset({JobState.READY}), JobState.QUEUED),
        "run_started": Rule(frozenset({JobState.READY, JobState.QUEUED}), JobState.RUNNING),
        "progress": Rule(frozenset({JobState.RUNNING}), JobState.RUNNING),
        "completed": Rule(frozenset({JobState.RUNNING}), JobState.COMPLETED),
        # A service that cannot do its part fails the job at any live stage.
        "failed": Rule(_LIVE, JobState.FAILED),
        "cancelled": Rule(_LIVE, JobState.CANCELLED),
        # A started job (queued or running) is bounded by its calculation's time limit (->
        # failed), not by expiry: the user did their part.
        "expired": Rule(_BEFORE_RUN, JobState.EXPIRED),
    }
)
"""Every event type (the payload's `type` tag) -> the rule for applying it."""

TERMINAL_STATES = frozenset(
    state for state in JobState if not any(state in r.sources for r in TRANSITIONS.values())
)


def legal_events(state: JobState | None) -> list[str]:
    """The event types legal in `state` (None: a job with no events), in table order."""
    return [event_type for event_type, rule in TRANSITIONS.items() if state in rule.sources]


def is_terminal(state: JobState) -> bool:
    return state in TERMINAL_STATES


def _check_follows(sheet: JobSheetState | None, event: JobEvent) -> None:
    if sheet is None:
        if event.seq != 1:
            raise EventSequenceError(
                f"job {event.job_uid}: its log starts at seq 1, not at {event.seq}"
            )
        return
    if event.job_uid != sheet.job_uid:
        raise EventSequenceError(
            f"event {event.event_id} belongs to job {event.job_uid}, not to job {sheet.job_uid}"
        )
    if event.seq != sheet.seq + 1:
        raise EventSequenceError(
            f"job {sheet.job_uid}: the next event is seq {sheet.seq + 1}, not {event.seq}"
        )


def _next_state(sheet: JobSheetState | None, job_uid: str, payload: EventPayload) -> JobState:
    """The state `payload` leads to from `sheet`, or IllegalTransitionError."""
    state = None if sheet is None else sheet.state
    rule = TRANSITIONS[payload.type]
    if state not in rule.sources:
        legal = legal_events(state)
        where = f"in state {state.value!r}" if state else "before the job is submitted"
        allowed = ", ".join(legal) if legal else "nothing: the job has ended"
        raise IllegalTransitionError(
            f"job {job_uid}: {payload.type!r} is not legal {where}; legal now: {allowed}",
            job_uid=job_uid,
            state=state,
            event_type=payload.type,
            legal=legal,
        )
    return rule.target


def _check_claim(sheet: JobSheetState | None, payload: EventPayload) -> None:
    """A queued job's run is started only by the start message that queued it: its `queued`
    event is the run PAR's claim, and no other start may take it over."""
    if (
        isinstance(payload, RunStarted)
        and sheet is not None
        and sheet.state is JobState.QUEUED
        and payload.start_message_id != sheet.start_message_id
    ):
        raise IllegalTransitionError(
            f"job {sheet.job_uid}: it is queued for start message {sheet.start_message_id}, so "
            f"only that start may run it, not {payload.start_message_id}",
            job_uid=sheet.job_uid,
            state=sheet.state,
            event_type=payload.type,
            legal=legal_events(sheet.state),
        )


def _changes(event: JobEvent) -> dict[str, Any]:
    """The fields of the sheet `event` sets, besides state, seq and updated_at."""
    match event.payload:
        case Submitted() as submitted:
            return {
                "job_uid": event.job_uid,
                "request": submitted.request,
                "owner": submitted.owner,
                "user": submitted.user,
                "user_key": submitted.user_key,
                "authorisation": submitted.authorisation,
                "payment": submitted.payment,
                "expires_at": submitted.expires_at,
                "created_at": event.time,
            }
        case StorageContracted(upload_par=upload_par, output_par=output_par):
            return {"upload_par": upload_par, "output_par": output_par}
        case ComputeContracted(run_par=run_par):
            return {"run_par": run_par}
        case Queued(start_message_id=start_message_id, place=place):
            return {"start_message_id": start_message_id, "place": place}
        case RunStarted(start_message_id=start_message_id):
            # None only in logs from before runs were claimed in the log.
            return {} if start_message_id is None else {"start_message_id": start_message_id}
        case Progress(message=message, fraction=fraction):
            # A line without a fraction (say, a log line) keeps the last fraction known.
            return {"progress": message} | ({} if fraction is None else {"fraction": fraction})
        case Completed(outputs=outputs, summary=summary, cpu_seconds=cpu_seconds):
            return {"outputs": outputs, "summary": summary, "cpu_seconds": cpu_seconds}
        case Failed(reason=reason) | Cancelled(reason=reason):
            return {"reason": reason}
        case Expired():
            return {}  # the new state is the whole change


def apply(sheet: JobSheetState | None, event: JobEvent) -> JobSheetState:
    """The sheet after `event`; `sheet` is None before the first event. Never mutates `sheet`."""
    _check_follows(sheet, event)
    state = _next_state(sheet, event.job_uid, event.payload)
    _check_claim(sheet, event.payload)
    fields = {
        "state": state,
        "seq": event.seq,
        "updated_at": event.time,
        "place": None,  # a place in the run queue is the queued state's alone
        **_changes(event),
    }
    if sheet is None:
        return JobSheetState.model_validate(fields)
    return sheet.model_copy(update=fields)  # values come from validated events


def fold(events: Iterable[JobEvent], sheet: JobSheetState | None = None) -> JobSheetState:
    """Apply `events` in order to `sheet` (None: from the start of the log)."""
    result = functools.reduce(apply, events, sheet)
    if result is None:
        raise EventSequenceError("there are no events to fold: a job's log starts at seq 1")
    return result
