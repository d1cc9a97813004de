"""Wire forms of a job's event log: the events, their envelope, and the state they fold into.

The log is the truth: a `JobSheetState` is never stored, only computed from the `JobEvent`s (see
`orchestrator.core.jobstate`). Each payload carries a `type` tag, so a reader can tell every event
apart from the JSON alone, and an unknown tag is a validation error rather than a silent skip.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, JsonValue, field_validator, model_validator

from schemas._base import WireModel
from schemas.auth import Authorisation, Cheque
from schemas.keys import PublicKeyData
from schemas.ledger import AccountName, Money
from schemas.par import PARData, PARKind, Sha256Hex, Uid
from schemas.signing import ServiceRole, Signature, canonical_json

Actor = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$", max_length=200)]
"""Who appended an event: a role, optionally with an id (`access`, `compute`, `user:<fp>`)."""


class JobState(StrEnum):
    """Where a job is in its life; the last four are terminal."""

    SUBMITTED = "submitted"  # accepted and paid for; no service contracted yet
    STORAGE_CONTRACTED = "storage_contracted"  # upload and bucket-write PARs minted
    READY = "ready"  # run PAR minted too: waiting for the user's input and start
    QUEUED = "queued"  # started, waiting for a free run slot (its start message holds the claim)
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # stopped by the user, before or during the run
    EXPIRED = "expired"  # input or start did not come before the deadline


class JobRequest(WireModel):
    """What the user asks for (what their authorisation signs)."""

    calculation: str = Field(min_length=1, max_length=200)
    parameters: dict[str, JsonValue] = Field(default_factory=dict)
    input_sha256: Sha256Hex | None = None  # if given, the upload PAR accepts only this content

    @field_validator("parameters")
    @classmethod
    def _canonical(cls, parameters: dict[str, JsonValue]) -> dict[str, JsonValue]:
        # A request is signed over its canonical JSON: one without any (NaN, an integer past
        # 2**53) could be neither authorised nor paid for, so it is refused as it is read.
        canonical_json(parameters)
        return parameters


class OutputFile(WireModel):
    """One file a run wrote, keyed relative to the job's output prefix."""

    key: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    sha256: Sha256Hex


def _require_par(par: PARData, kind: PARKind, flag: str, role: str) -> PARData:
    # Catches a swapped or wrongly minted PAR when the event is built, not when a user uses it.
    if par.kind is not kind or not getattr(par, flag):
        raise ValueError(f"the {role} must be a {kind.value} PAR with {flag} set")
    return par


ParProofs = Annotated[
    dict[Uid, Sha256Hex],
    Field(
        description="The issuer's record of each PAR the event hands out: its uid -> the proof "
        "of possession its holder must show (the SHA-256 of the capability it seals). With the "
        "PAR's public data and the event's seal (the minting role's) it is the whole record, so "
        "minting writes nothing else. Empty in logs from before records travelled in events: "
        "their PARs have a record object in the registry.",
    ),
]


def _check_proofs(proofs: dict[str, str], *pars: PARData | None) -> None:
    minted = {par.uid for par in pars if par is not None}
    if stray := set(proofs) - minted:
        raise ValueError(f"proofs for PARs this event does not hand out: {sorted(stray)}")


class Payment(WireModel):
    """The job's credit notes: the cheque cashed for it and the value held until it ends."""

    cheque: Cheque
    held: Money
    ledger_seq: int = Field(ge=1)  # the ledger transaction that holds it


class Submitted(WireModel):
    type: Literal["submitted"] = "submitted"
    request: JobRequest
    owner: AccountName  # the registered user's name: the job's events are routed by it
    user: Sha256Hex  # fingerprint of the user's key pair: the PARs are sealed for it
    user_key: PublicKeyData  # the key pair's public half, to seal the user's PARs with
    expires_at: AwareDatetime  # input and start must come before this; the PARs expire then
    # The user's signature over exactly this request, and how it is paid for. The access
    # service always sets both; they are optional here only so the log's schema v1 stays one.
    authorisation: Authorisation | None = None
    payment: Payment | None = None


class StorageContracted(WireModel):
    """The PARs themselves travel (sealed), so the log alone can answer the user."""

    type: Literal["storage_contracted"] = "storage_contracted"
    upload_par: PARData  # object write of the input, sealed for the user
    output_par: PARData  # bucket write of the output prefix, sealed for the compute service
    proofs: ParProofs = Field(default_factory=dict)

    @field_validator("upload_par")
    @classmethod
    def _upload_writes_an_object(cls, par: PARData) -> PARData:
        return _require_par(par, PARKind.OBJECT, "is_writeable", "upload PAR")

    @field_validator("output_par")
    @classmethod
    def _output_writes_a_bucket(cls, par: PARData) -> PARData:
        return _require_par(par, PARKind.BUCKET, "is_writeable", "output PAR")

    @model_validator(mode="after")
    def _proofs_of_its_pars(self) -> StorageContracted:
        _check_proofs(self.proofs, self.upload_par, self.output_par)
        return self


class ComputeContracted(WireModel):
    type: Literal["compute_contracted"] = "compute_contracted"
    run_par: PARData  # execute the calculation, sealed for the user
    proofs: ParProofs = Field(default_factory=dict)

    @field_validator("run_par")
    @classmethod
    def _run_executes(cls, par: PARData) -> PARData:
        return _require_par(par, PARKind.CALCULATION, "is_executable", "run PAR")

    @model_validator(mode="after")
    def _proofs_of_its_pars(self) -> ComputeContracted:
        _check_proofs(self.proofs, self.run_par)
        return self


class Queued(WireModel):
    """A start accepted while every run slot was taken: the job waits its turn.

    It is the run PAR's claim: only the start message `start_message_id` (or a redelivery of it)
    may run the job; `place` is the job's place in the compute daemon's queue when it joined (1:
    next to run)."""

    type: Literal["queued"] = "queued"
    start_message_id: Uid
    place: int = Field(ge=1)


class RunStarted(WireModel):
    """The run begins. Unless a `queued` event holds it already, it is the run PAR's claim:
    `start_message_id` is the start message's id (None only in logs from before claims were
    logged)."""

    type: Literal["run_started"] = "run_started"
    start_message_id: Uid | None = None


class Progress(WireModel):
    type: Literal["progress"] = "progress"
    message: str
    fraction: float | None = Field(default=None, ge=0.0, le=1.0)


class Completed(WireModel):
    type: Literal["completed"] = "completed"
    outputs: tuple[OutputFile, ...] = ()
    summary: str = ""
    cpu_seconds: float = Field(default=0.0, ge=0)  # what the run used: the charge is based on it
    # A bucket read PAR over the outputs, sealed for the job's user and minted as the job
    # completed, so fetching them needs no request (None: ask access, `GetOutputs`).
    read_par: PARData | None = None
    proofs: ParProofs = Field(default_factory=dict)

    @field_validator("read_par")
    @classmethod
    def _read_reads_a_bucket(cls, par: PARData | None) -> PARData | None:
        return None if par is None else _require_par(par, PARKind.BUCKET, "is_readable", "read PAR")

    @model_validator(mode="after")
    def _proofs_of_its_pars(self) -> Completed:
        _check_proofs(self.proofs, self.read_par)
        return self


class Failed(WireModel):
    type: Literal["failed"] = "failed"
    reason: str = Field(min_length=1)


class Cancelled(WireModel):
    type: Literal["cancelled"] = "cancelled"
    reason: str = ""


class Expired(WireModel):
    type: Literal["expired"] = "expired"


EventPayload = Annotated[
    Submitted
    | StorageContracted
    | ComputeContracted
    | Queued
    | RunStarted
    | Progress
    | Completed
    | Failed
    | Cancelled
    | Expired,
    Field(discriminator="type"),
]


def new_event_id() -> str:
    return uuid.uuid4().hex


class JobEvent(WireModel):
    """One entry of a job's log: event `seq` of job `job_uid`.

    Each event is sealed by the service role that appends it (`orchestrator.core.chain`): it
    names the hash of the job's previous event (`prev_hash`, so the log is a hash chain) and is
    signed by the role's key. `actor` says on whose behalf it happened (`user:<name>` for a
    submission, which access appends and signs); `signer` says which role vouches for it. The
    three seal fields are optional only until every service seals what it appends: the chain's
    checks report an unsealed event as unsigned.
    """

    schema_version: Literal[1] = 1
    event_id: Uid = Field(default_factory=new_event_id)  # consumers de-duplicate by it
    job_uid: Uid
    seq: int = Field(ge=1)
    time: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    actor: Actor
    payload: EventPayload
    prev_hash: Sha256Hex | None = None  # the hash of event seq - 1 of this job; None for seq 1
    signer: ServiceRole | None = None
    signature: Signature | None = None  # the signer's, over every field but itself


class JobSheetState(WireModel):
    """A job as its events leave it: the fold of its log up to event `seq`."""

    schema_version: Literal[1] = 1
    job_uid: Uid
    state: JobState
    seq: int = Field(ge=1)
    request: JobRequest
    owner: AccountName  # the registered user whose job it is (their broker user routes its events)
    user: Sha256Hex
    user_key: PublicKeyData
    authorisation: Authorisation | None = None
    payment: Payment | None = None
    expires_at: AwareDatetime
    created_at: AwareDatetime
    updated_at: AwareDatetime
    upload_par: PARData | None = None
    output_par: PARData | None = None
    run_par: PARData | None = None
    start_message_id: Uid | None = None  # the start message that claimed the run PAR
    place: int | None = None  # while queued: its place in the run queue when it joined
    progress: str | None = None  # the last progress message
    fraction: float | None = None  # the last progress fraction reported
    outputs: tuple[OutputFile, ...] = ()
    summary: str | None = None
    cpu_seconds: float = 0.0
    reason: str | None = None  # why it failed or was cancelled
