"""Wire forms of what crosses RabbitMQ: one versioned envelope, and a body union per queue.

Events (`EventPublished`) go to the events exchange and the stream; requests go to a service's
RPC queue; replies come back on the caller's reply queue. Every body carries a `type` tag, and each
queue takes its own union of them, a `MessageUnion` (the topology names it in `QueueSpec.accepts`):
a body that is not JSON, is malformed, or is of a type the queue does not take fails validation and
is dead-lettered with its reason.
"""

from __future__ import annotations

import typing
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal

from pydantic import AwareDatetime, Field, JsonValue, TypeAdapter
from typing_extensions import TypeVar

from schemas._base import B64Bytes, WireModel
from schemas.auth import Authorisation, Cheque
from schemas.events import JobEvent, JobRequest, JobSheetState, Progress
from schemas.par import PARData, PARState, Sha256Hex, Uid
from schemas.signing import MessageSignature

# --- events -------------------------------------------------------------------------------------


class EventPublished(WireModel):
    """A job event, as published after it was appended to the job's log."""

    type: Literal["event"] = "event"
    event: JobEvent


# --- a run's progress: compute -> the job's owner, live, never logged ---------------------------


class ProgressReport(WireModel):
    """Compute -> the job's owner: the run's latest output line, live (at most one per
    `workers.compute.PROGRESS_INTERVAL`), published on the events exchange under the job's own
    routing key (`job.<owner>.<job uid>.progress`, so only the owner's queues take it) and signed
    by compute (the envelope's signature; a client uses no other).

    Not an event: it is never appended to the job's log, not chained, not published again; a lost
    one is superseded by the next. Compute also keeps the latest as the job's progress snapshot
    (`jobs/<uid>/progress.json`, this model's JSON, overwritten at most every
    `PARJOBS_PROGRESS_SNAPSHOT_S`), which GetRunStatus and GetJob show.

    It reads like a job event where `job.events()` readers look (`job_uid`, `seq`, `time`,
    `payload`), so code that matched `Progress` payloads of the old progress events reads these
    unchanged.
    """

    type: Literal["progress_report"] = "progress_report"
    job_uid: Uid
    seq: int = Field(ge=1)
    """The seq of the job's event this report follows (its `run_started`): not a seq of its
    own, as the report is in no log."""
    time: AwareDatetime
    payload: Progress


# --- deadlines: access to itself, through a delay queue ----------------------------------------


class JobDeadline(WireModel):
    """Access → access, after a delay: job `job_uid` is due to expire at `expires_at`.

    Published when access admits the job, to a delay queue whose TTL runs out at `expires_at`;
    only then does it reach access's deadlines queue. A hint, never the truth: access judges the
    job by its own log (its `submitted` event's deadline), so an early or repeated one expires
    nothing before its time.
    """

    type: Literal["job_deadline"] = "job_deadline"
    job_uid: Uid
    expires_at: AwareDatetime


# --- requests to access -------------------------------------------------------------------------


class SubmitJob(WireModel):
    """User → access: run `request`, signed for by the user and paid for by the cheque.

    The user is the registered owner of the key that signed `authorisation`; the PARs are sealed
    for that registered key.
    """

    type: Literal["submit_job"] = "submit_job"
    request: JobRequest
    authorisation: Authorisation
    cheque: Cheque
    lifetime_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)


class GetJob(WireModel):
    """User → access: the job's current sheet, and optionally its events and the run's latest
    progress (its snapshot: one more object read, so only when asked)."""

    type: Literal["get_job"] = "get_job"
    job_uid: Uid
    with_events: bool = False
    with_progress: bool = False


class GetOutputs(WireModel):
    """User → access: a read PAR (sealed for the job's user) over the job's outputs."""

    type: Literal["get_outputs"] = "get_outputs"
    job_uid: Uid


class ClosePAR(WireModel):
    """PAR holder → access: close PAR `uid`, proving possession with the capability's checksum."""

    type: Literal["close_par"] = "close_par"
    uid: Uid
    proof: Sha256Hex


class GetPARState(WireModel):
    """PAR holder → access: whether PAR `uid` is open, closed or expired."""

    type: Literal["get_par_state"] = "get_par_state"
    uid: Uid


# --- requests to compute: what a calculation PAR's holder may do with the run -------------------

RunAction = Literal["start", "stop", "status"]
SealedRunCapability = Annotated[B64Bytes, Field(min_length=48, max_length=2048)]
"""A run capability (the opened run PAR's URL) sealed for compute: HPKE to compute's X25519 key,
bound to the action, the job and the requester (`orchestrator.core.run_commands`)."""


class StartRun(WireModel):
    """PAR holder → compute's run queue: start the run the calculation PAR grants."""

    type: Literal["start_run"] = "start_run"
    job_uid: Uid
    sealed: SealedRunCapability


class StopRun(WireModel):
    """PAR holder → compute: stop the run (or cancel the job if it has not started)."""

    type: Literal["stop_run"] = "stop_run"
    job_uid: Uid
    sealed: SealedRunCapability


class GetRunStatus(WireModel):
    """PAR holder → compute: the job's state and its last progress message."""

    type: Literal["get_run_status"] = "get_run_status"
    job_uid: Uid
    sealed: SealedRunCapability


RunCommand = StartRun | StopRun | GetRunStatus
"""A command through a run PAR: its capability never travels in the clear."""


# --- replies ------------------------------------------------------------------------------------


class PARStateReply(WireModel):
    type: Literal["par_state"] = "par_state"
    uid: Uid
    state: PARState


class JobReply(WireModel):
    type: Literal["job"] = "job"
    sheet: JobSheetState
    events: tuple[JobEvent, ...] = ()
    progress: ProgressReport | None = None
    """With `with_progress`: the run's latest progress snapshot, if it has reported any."""


class OutputsReply(WireModel):
    type: Literal["outputs"] = "outputs"
    read_par: PARData


class RunReply(WireModel):
    type: Literal["run"] = "run"
    job_uid: Uid
    state: str
    accepted: bool
    detail: str = ""
    place: int | None = Field(default=None, ge=1)  # while queued: its place in the run queue


ERROR_CODE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"
"""An error's stable code: dotted lower-case words (`par.expired`); see `orchestrator.errors`."""


class ErrorReply(WireModel):
    """A refused request: the error's stable `code` and `message`; whether the same request may
    succeed if sent again (`retriable`); and the error's `details` (the keyword arguments it was
    made with), so the client raises the very error the service raised.

    Schema version 2. Version 1 named the Python class (`error`) and carried the message as
    `detail`; it fails validation here, as this form does for a version-1 reader.
    """

    type: Literal["error"] = "error"
    schema_version: Literal[2] = 2
    code: str = Field(pattern=ERROR_CODE_PATTERN, max_length=200)
    message: str
    retriable: bool = False
    details: dict[str, JsonValue] = Field(default_factory=dict)


# --- what each queue takes ----------------------------------------------------------------------

AccessRequest = Annotated[
    SubmitJob | GetJob | GetOutputs | ClosePAR | GetPARState, Field(discriminator="type")
]
"""What access's RPC queue takes."""
ComputeRequest = Annotated[StopRun | GetRunStatus, Field(discriminator="type")]
"""What compute's RPC queue takes: control of runs, never blocked behind a long run."""
AccessResponse = Annotated[
    JobReply | OutputsReply | PARStateReply | ErrorReply, Field(discriminator="type")
]
"""What access answers."""
ComputeResponse = Annotated[RunReply | ErrorReply, Field(discriminator="type")]
"""What compute answers, on its RPC queue and its run queue alike."""
JobUpdate = Annotated[EventPublished | ProgressReport, Field(discriminator="type")]
"""What a user's events queue takes: their jobs' events and their runs' progress reports."""
MessageBody = Annotated[
    EventPublished
    | ProgressReport
    | JobDeadline
    | SubmitJob
    | GetJob
    | GetOutputs
    | ClosePAR
    | GetPARState
    | StartRun
    | StopRun
    | GetRunStatus
    | PARStateReply
    | JobReply
    | OutputsReply
    | RunReply
    | ErrorReply,
    Field(discriminator="type"),
]
"""Every body parjobs sends (to read what any queue holds: the dead letters, a whole stream)."""

Body = TypeVar("Body", default=MessageBody)


class Envelope(WireModel, Generic[Body]):
    """Every message parjobs sends: versioned, identified, timed, attributed.

    `Envelope[AccessRequest]` is an envelope whose body is an access request; a bare `Envelope`
    holds any body (`MessageBody`).
    """

    schema_version: Literal[1] = 1
    message_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$")
    sent_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    sender: str = Field(min_length=1, max_length=200)
    body: Body
    signature: MessageSignature | None = None
    """The sender's signature over message id, time and body (`orchestrator.core.message_signing`):
    a user's over a request, the answering role's over a reply. Receivers refuse a message whose
    signature is missing or does not verify."""


class MessageUnion(Generic[Body]):
    """The bodies one queue takes, as data: what the queue's consumer decodes with, and what an
    AsyncAPI description of the queue reads (`name`, `bodies`, `envelope.json_schema()`).

    `replies` is the union the queue's service answers with, for a queue of requests.
    """

    def __init__(self, name: str, union: Any, *, replies: MessageUnion[Any] | None = None) -> None:
        self.name = name
        self.envelope: TypeAdapter[Envelope[Body]] = TypeAdapter(Envelope[union])
        self.bodies: tuple[type[WireModel], ...] = _members(union)
        self.replies = replies

    def __repr__(self) -> str:
        return f"MessageUnion({self.name!r}: {' | '.join(body.__name__ for body in self.bodies)})"


def _members(union: Any) -> tuple[type[WireModel], ...]:
    """The models of a (possibly Annotated) union of models, or of one model alone."""
    if typing.get_origin(union) is Annotated:
        union = typing.get_args(union)[0]
    return typing.get_args(union) or (union,)


ACCESS_RESPONSES = MessageUnion[AccessResponse]("access responses", AccessResponse)
COMPUTE_RESPONSES = MessageUnion[ComputeResponse]("compute responses", ComputeResponse)
ACCESS_REQUESTS = MessageUnion[AccessRequest](
    "access requests", AccessRequest, replies=ACCESS_RESPONSES
)
COMPUTE_REQUESTS = MessageUnion[ComputeRequest](
    "compute requests", ComputeRequest, replies=COMPUTE_RESPONSES
)
RUN_STARTS = MessageUnion[StartRun]("run starts", StartRun, replies=COMPUTE_RESPONSES)
"""What compute's run queue takes: a start, held unacknowledged for the whole run."""
JOB_EVENTS = MessageUnion[EventPublished]("job events", EventPublished)
"""What a work queue fed by the events exchange takes."""
JOB_UPDATES = MessageUnion[JobUpdate]("job updates", JobUpdate)
"""What a user's events queue takes: job events, and progress reports signed by compute."""
DEADLINES = MessageUnion[JobDeadline]("job deadlines", JobDeadline)
"""What access's deadlines queue (and the delay queues before it) take."""
