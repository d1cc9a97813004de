"""Wire forms of what crosses RabbitMQ: one versioned envelope, a discriminated body.

Events (a `JobEvent`) go to the events exchange and the stream; commands and queries go to a
service's queue; replies come back on the caller's reply queue. Every body carries a `type` tag, so
an unknown or malformed message is a validation error, dead-lettered with its reason.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, JsonValue

from schemas._base import WireModel
from schemas.auth import Authorisation, Cheque
from schemas.events import JobEvent, JobRequest, JobSheetState
from schemas.par import PARData, PARState, Sha256Hex, Uid


class EventPublished(WireModel):
    """A job event, as published after it was appended to the job's log."""

    type: Literal["event"] = "event"
    event: JobEvent


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
    """User → access: the job's current sheet, and optionally its events."""

    type: Literal["get_job"] = "get_job"
    job_uid: Uid
    with_events: bool = False


class GetOutputs(WireModel):
    """User → access: a read PAR (sealed for the job's user) over the job's outputs."""

    type: Literal["get_outputs"] = "get_outputs"
    job_uid: Uid


RunAction = Literal["start", "stop", "status"]


class RunCommand(WireModel):
    """PAR holder → compute: start, stop or ask about the run a calculation PAR grants."""

    type: Literal["run_command"] = "run_command"
    action: RunAction
    run_url: str = Field(min_length=1, max_length=500)


class ClosePAR(WireModel):
    """PAR holder → access: close PAR `uid`, proving possession with the capability's checksum."""

    type: Literal["close_par"] = "close_par"
    uid: Uid
    proof: Sha256Hex


class GetPARState(WireModel):
    type: Literal["get_par_state"] = "get_par_state"
    uid: Uid


class PARStateReply(WireModel):
    type: Literal["par_state"] = "par_state"
    uid: Uid
    state: PARState


class JobReply(WireModel):
    type: Literal["job"] = "job"
    sheet: JobSheetState
    events: tuple[JobEvent, ...] = ()


class OutputsReply(WireModel):
    type: Literal["outputs"] = "outputs"
    read_par: PARData


class RunReply(WireModel):
    type: Literal["run"] = "run"
    job_uid: Uid
    state: str
    accepted: bool
    detail: str = ""


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


MessageBody = Annotated[
    EventPublished
    | SubmitJob
    | GetJob
    | GetOutputs
    | RunCommand
    | ClosePAR
    | GetPARState
    | PARStateReply
    | JobReply
    | OutputsReply
    | RunReply
    | ErrorReply,
    Field(discriminator="type"),
]


class Envelope(WireModel):
    """Every message parjobs sends: versioned, identified, timed, attributed."""

    schema_version: Literal[1] = 1
    message_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=r"^[0-9a-f]{32}$")
    sent_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    sender: str = Field(min_length=1, max_length=200)
    body: MessageBody
