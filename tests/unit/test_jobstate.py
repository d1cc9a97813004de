"""The JobSheet state machine, pure: legal paths, every refusal, fold, and the events' wire form."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from orchestrator.core.jobstate import TERMINAL_STATES, TRANSITIONS, apply, fold, legal_events
from orchestrator.errors import EventSequenceError, IllegalTransitionError
from schemas.events import (
    Cancelled,
    Completed,
    ComputeContracted,
    EventPayload,
    Expired,
    Failed,
    JobEvent,
    JobRequest,
    JobSheetState,
    JobState,
    OutputFile,
    Progress,
    Queued,
    RunStarted,
    StorageContracted,
    Submitted,
)
from schemas.keys import PublicKeyData
from schemas.par import PARData, PARKind

JOB = "a" * 32
USER = "f" * 64
START = "5" * 32  # the start message that claims the run
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def make_par(kind: PARKind, *, writeable: bool = False, executable: bool = False) -> PARData:
    return PARData(
        uid=uuid.uuid4().hex,
        kind=kind,
        is_writeable=writeable,
        is_executable=executable,
        issuer="storage",
        recipient=USER,
        created_at=T0,
        expires_at=T0 + timedelta(hours=1),
        sealed=b"sealed capability",
    )


UPLOAD = make_par(PARKind.OBJECT, writeable=True)
OUTPUT = make_par(PARKind.BUCKET, writeable=True)
RUN = make_par(PARKind.CALCULATION, executable=True)
REQUEST = JobRequest(calculation="checksum", parameters={"algo": "sha256", "n": [1, 2.5, None]})
OUTPUTS = (OutputFile(key="summary.json", size=12, sha256="0" * 64),)
USER_KEY = PublicKeyData(name="user", x25519=bytes(32), ed25519=bytes(32))
SUBMITTED = Submitted(
    request=REQUEST, owner="ada", user=USER, user_key=USER_KEY, expires_at=T0 + timedelta(hours=1)
)

SAMPLES: dict[str, EventPayload] = {
    "submitted": SUBMITTED,
    "storage_contracted": StorageContracted(upload_par=UPLOAD, output_par=OUTPUT),
    "compute_contracted": ComputeContracted(run_par=RUN),
    "queued": Queued(start_message_id=START, place=2),
    "run_started": RunStarted(start_message_id=START),
    "progress": Progress(message="half way", fraction=0.5),
    "completed": Completed(outputs=OUTPUTS, summary="1 file"),
    "failed": Failed(reason="calculation exited with status 3"),
    "cancelled": Cancelled(reason="user stopped it"),
    "expired": Expired(),
}

# Written out independently of TRANSITIONS, so a slip in the table shows up here.
LEGAL: dict[JobState | None, set[str]] = {
    None: {"submitted"},
    JobState.SUBMITTED: {"storage_contracted", "failed", "cancelled", "expired"},
    JobState.STORAGE_CONTRACTED: {"compute_contracted", "failed", "cancelled", "expired"},
    JobState.READY: {"queued", "run_started", "failed", "cancelled", "expired"},
    JobState.QUEUED: {"run_started", "failed", "cancelled"},  # started: it no longer expires
    JobState.RUNNING: {"progress", "completed", "failed", "cancelled"},
    JobState.COMPLETED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
    JobState.EXPIRED: set(),
}
TARGET = {
    "submitted": JobState.SUBMITTED,
    "storage_contracted": JobState.STORAGE_CONTRACTED,
    "compute_contracted": JobState.READY,
    "queued": JobState.QUEUED,
    "run_started": JobState.RUNNING,
    "progress": JobState.RUNNING,
    "completed": JobState.COMPLETED,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
    "expired": JobState.EXPIRED,
}
# One way to reach each state.
_READY = ["submitted", "storage_contracted", "compute_contracted"]
PATHS: dict[JobState, list[str]] = {
    JobState.SUBMITTED: ["submitted"],
    JobState.STORAGE_CONTRACTED: ["submitted", "storage_contracted"],
    JobState.READY: _READY,
    JobState.QUEUED: [*_READY, "queued"],
    JobState.RUNNING: [*_READY, "run_started"],
    JobState.COMPLETED: [*_READY, "run_started", "completed"],
    JobState.FAILED: ["submitted", "failed"],
    JobState.CANCELLED: ["submitted", "cancelled"],
    JobState.EXPIRED: [*_READY, "expired"],
}


def event(seq: int, payload: EventPayload, *, job: str = JOB, actor: str = "access") -> JobEvent:
    return JobEvent(
        job_uid=job, seq=seq, time=T0 + timedelta(seconds=seq), actor=actor, payload=payload
    )


def history(types: list[str]) -> list[JobEvent]:
    return [event(seq, SAMPLES[name]) for seq, name in enumerate(types, start=1)]


def sheet_in(state: JobState) -> JobSheetState:
    return fold(history(PATHS[state]))


# --- the table ---------------------------------------------------------------------------------


def test_every_event_type_has_a_rule() -> None:
    assert set(TRANSITIONS) == set(SAMPLES) == set(TARGET)
    assert {name: rule.target for name, rule in TRANSITIONS.items()} == TARGET


@pytest.mark.parametrize("state", [None, *JobState])
def test_legal_events_match_the_design(state: JobState | None) -> None:
    assert set(legal_events(state)) == LEGAL[state]


def test_terminal_states_accept_nothing() -> None:
    assert {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED} == (
        TERMINAL_STATES
    )


# --- legal paths -------------------------------------------------------------------------------


def test_happy_path_to_completed_step_by_step() -> None:
    sheet = apply(None, event(1, SAMPLES["submitted"], actor=f"user:{USER}"))
    assert (sheet.state, sheet.seq, sheet.job_uid) == (JobState.SUBMITTED, 1, JOB)
    assert (sheet.request, sheet.user, sheet.user_key) == (REQUEST, USER, USER_KEY)
    assert sheet.created_at == sheet.updated_at == T0 + timedelta(seconds=1)
    assert sheet.expires_at == T0 + timedelta(hours=1)

    sheet = apply(sheet, event(2, SAMPLES["storage_contracted"], actor="storage"))
    assert sheet.state is JobState.STORAGE_CONTRACTED
    assert (sheet.upload_par, sheet.output_par, sheet.run_par) == (UPLOAD, OUTPUT, None)

    sheet = apply(sheet, event(3, SAMPLES["compute_contracted"], actor="compute"))
    assert (sheet.state, sheet.run_par) == (JobState.READY, RUN)

    sheet = apply(sheet, event(4, RunStarted(start_message_id=START), actor="compute"))
    assert (sheet.state, sheet.progress, sheet.fraction) == (JobState.RUNNING, None, None)

    sheet = apply(sheet, event(5, Progress(message="reading", fraction=0.25)))
    sheet = apply(sheet, event(6, Progress(message="a log line")))
    assert (sheet.state, sheet.progress, sheet.fraction) == (JobState.RUNNING, "a log line", 0.25)

    sheet = apply(sheet, event(7, SAMPLES["completed"], actor="compute"))
    assert (sheet.state, sheet.seq, sheet.outputs, sheet.summary) == (
        JobState.COMPLETED,
        7,
        OUTPUTS,
        "1 file",
    )
    assert sheet.created_at == T0 + timedelta(seconds=1)
    assert sheet.updated_at == T0 + timedelta(seconds=7)
    assert sheet.reason is None


@pytest.mark.parametrize(
    ("before", "end", "reason"),
    [
        (JobState.SUBMITTED, "failed", "calculation exited with status 3"),
        (JobState.STORAGE_CONTRACTED, "failed", "calculation exited with status 3"),
        (JobState.READY, "failed", "calculation exited with status 3"),
        (JobState.QUEUED, "failed", "calculation exited with status 3"),
        (JobState.RUNNING, "failed", "calculation exited with status 3"),
        (JobState.SUBMITTED, "cancelled", "user stopped it"),
        (JobState.READY, "cancelled", "user stopped it"),
        (JobState.QUEUED, "cancelled", "user stopped it"),
        (JobState.RUNNING, "cancelled", "user stopped it"),
        (JobState.SUBMITTED, "expired", None),
        (JobState.STORAGE_CONTRACTED, "expired", None),
        (JobState.READY, "expired", None),
    ],
)
def test_jobs_end_failed_cancelled_or_expired(
    before: JobState, end: str, reason: str | None
) -> None:
    sheet = sheet_in(before)
    ended = apply(sheet, event(sheet.seq + 1, SAMPLES[end]))
    assert (ended.state, ended.reason) == (TARGET[end], reason)
    assert ended.outputs == ()
    assert ended.place is None


def test_a_queued_job_holds_its_claim_and_place_until_its_run_starts() -> None:
    queued = sheet_in(JobState.QUEUED)
    assert (queued.state, queued.start_message_id, queued.place) == (JobState.QUEUED, START, 2)
    running = apply(queued, event(queued.seq + 1, RunStarted(start_message_id=START)))
    assert (running.state, running.start_message_id, running.place) == (
        JobState.RUNNING,
        START,
        None,
    )
    # Started with a slot free, `run_started` is the claim itself.
    direct = sheet_in(JobState.RUNNING)
    assert (direct.start_message_id, direct.place) == (START, None)


@pytest.mark.parametrize("other", ["6" * 32, None])
def test_only_the_start_that_queued_a_job_may_run_it(other: str | None) -> None:
    queued = sheet_in(JobState.QUEUED)
    with pytest.raises(IllegalTransitionError, match=f"queued for start message {START}") as caught:
        apply(queued, event(queued.seq + 1, RunStarted(start_message_id=other)))
    assert (caught.value.state, caught.value.event_type) == (JobState.QUEUED, "run_started")


def test_a_log_from_before_claims_were_logged_still_folds() -> None:
    # `run_started` had no fields then: the wire form of such an event is read as it was.
    wire = event(4, RunStarted()).model_dump(mode="json")
    wire["payload"] = {"type": "run_started"}
    old = [*history(_READY), JobEvent.model_validate(wire)]
    sheet = fold([*old, event(5, SAMPLES["completed"])])
    assert (sheet.state, sheet.start_message_id) == (JobState.COMPLETED, None)


def test_apply_never_mutates_the_sheet_it_is_given() -> None:
    sheet = sheet_in(JobState.RUNNING)
    before = sheet.model_dump()
    apply(sheet, event(sheet.seq + 1, SAMPLES["completed"]))
    assert sheet.model_dump() == before


def test_fold_equals_stepwise_apply_and_can_resume() -> None:
    events = history([*PATHS[JobState.RUNNING], "progress", "progress", "completed"])
    stepwise: JobSheetState | None = None
    for each in events:
        stepwise = apply(stepwise, each)
    assert fold(events) == stepwise
    assert fold(events[3:], fold(events[:3])) == stepwise
    assert fold([], stepwise) == stepwise


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "refused"),
    [(state, name) for state in JobState for name in SAMPLES if name not in LEGAL[state]],
)
def test_every_illegal_transition_is_refused(state: JobState, refused: str) -> None:
    sheet = sheet_in(state)
    with pytest.raises(IllegalTransitionError) as caught:
        apply(sheet, event(sheet.seq + 1, SAMPLES[refused]))
    error = caught.value
    assert (error.job_uid, error.state, error.event_type) == (JOB, state, refused)
    assert set(error.legal) == LEGAL[state]
    message = str(error)
    assert JOB in message
    assert f"{refused!r} is not legal in state {state.value!r}" in message
    for name in error.legal:
        assert name in message
    if not error.legal:
        assert "the job has ended" in message


@pytest.mark.parametrize("first", [name for name in SAMPLES if name != "submitted"])
def test_only_submitted_can_start_a_log(first: str) -> None:
    with pytest.raises(IllegalTransitionError, match="before the job is submitted") as caught:
        apply(None, event(1, SAMPLES[first]))
    assert (caught.value.state, caught.value.legal) == (None, ["submitted"])


@pytest.mark.parametrize("seq", [2, 7])
def test_a_log_starts_at_seq_one(seq: int) -> None:
    with pytest.raises(EventSequenceError, match="starts at seq 1"):
        apply(None, event(seq, SAMPLES["submitted"]))


@pytest.mark.parametrize("seq", [1, 3, 4, 6, 9])  # replays, a duplicate of the last, gaps
def test_a_seq_that_is_not_last_plus_one_is_refused(seq: int) -> None:
    sheet = sheet_in(JobState.RUNNING)  # at seq 4
    with pytest.raises(EventSequenceError, match=f"next event is seq 5, not {seq}"):
        apply(sheet, event(seq, Progress(message="x")))


def test_fold_refuses_a_duplicate_or_a_gap() -> None:
    events = history(PATHS[JobState.RUNNING])
    with pytest.raises(EventSequenceError):
        fold([*events[:2], events[1], *events[2:]])
    with pytest.raises(EventSequenceError):
        fold([*events[:2], *events[3:]])


def test_fold_of_nothing_is_refused() -> None:
    with pytest.raises(EventSequenceError, match="no events"):
        fold([])


def test_another_jobs_event_is_refused() -> None:
    sheet = sheet_in(JobState.RUNNING)
    with pytest.raises(EventSequenceError, match="not to job"):
        apply(sheet, event(sheet.seq + 1, Progress(message="x"), job="b" * 32))


def test_refusals_are_distinct_errors() -> None:
    assert not issubclass(IllegalTransitionError, EventSequenceError)
    assert not issubclass(EventSequenceError, IllegalTransitionError)


# --- the wire form -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_event_type_round_trips_through_json(name: str) -> None:
    original = event(3, SAMPLES[name], actor=f"user:{USER}")
    wire = original.model_dump_json()
    assert json.loads(wire)["payload"]["type"] == name
    again = JobEvent.model_validate_json(wire)
    assert again == original
    assert type(again.payload) is type(original.payload)
    adapter: TypeAdapter[EventPayload] = TypeAdapter(EventPayload)
    assert adapter.validate_json(adapter.dump_json(SAMPLES[name])) == SAMPLES[name]


def test_a_sheet_round_trips_through_json() -> None:
    sheet = fold(history([*PATHS[JobState.RUNNING], "progress", "completed"]))
    assert JobSheetState.model_validate_json(sheet.model_dump_json()) == sheet


def wire_event(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event(2, Progress(message="x")).model_dump_json())
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"payload": {"type": "exploded", "message": "x"}}, "does not match any of the expected"),
        ({"payload": {"message": "x"}}, "Unable to extract tag"),
        ({"payload": {"type": "progress", "message": "x", "extra": 1}}, "Extra inputs"),
        ({"schema_version": 2}, "schema_version"),
        ({"seq": 0}, "seq"),
        ({"job_uid": "../../etc"}, "job_uid"),
        ({"event_id": "not-hex"}, "event_id"),
        ({"time": "2030-01-01T00:00:00"}, "timezone"),
        ({"actor": "Robert'); DROP TABLE"}, "actor"),
        ({"payload": {"type": "progress", "message": "x", "fraction": 1.5}}, "fraction"),
    ],
)
def test_invalid_events_are_refused(changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        JobEvent.model_validate(wire_event(**changes))


def test_contracts_refuse_the_wrong_kind_of_par() -> None:
    with pytest.raises(ValidationError, match="upload PAR must be a object PAR"):
        StorageContracted(upload_par=OUTPUT, output_par=OUTPUT)
    with pytest.raises(ValidationError, match="output PAR must be a bucket PAR"):
        StorageContracted(upload_par=UPLOAD, output_par=UPLOAD)
    with pytest.raises(ValidationError, match="is_writeable"):
        StorageContracted(upload_par=make_par(PARKind.OBJECT), output_par=OUTPUT)
    with pytest.raises(ValidationError, match="run PAR must be a calculation PAR"):
        ComputeContracted(run_par=UPLOAD)


def test_failure_needs_a_reason() -> None:
    with pytest.raises(ValidationError, match="reason"):
        Failed(reason="")


def test_events_get_a_fresh_id_and_an_aware_time_by_default() -> None:
    first = JobEvent(job_uid=JOB, seq=1, actor="access", payload=SAMPLES["submitted"])
    second = JobEvent(job_uid=JOB, seq=1, actor="access", payload=SAMPLES["submitted"])
    assert first.event_id != second.event_id
    assert first.time.tzinfo is not None
