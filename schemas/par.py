"""Wire forms of a PAR (pre-authenticated request) and of its registry record.

`PARData` is what travels: public metadata in clear plus the capability sealed (HPKE) for one
recipient. `Capability` is what the seal hides: the presigned S3 URLs, POST policy or run token.
`PARRecord` is what the issuing service keeps, to check closes and run requests.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from schemas._base import B64Bytes, WireModel

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Uid = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class PARKind(StrEnum):
    OBJECT = "object"  # one object: read, write, or both (presigned GET / PUT)
    BUCKET = "bucket"  # a key prefix: write (presigned POST policy) or read (a manifest)
    CALCULATION = "calculation"  # a run of a calculation: execute only (a run token)


class PARData(WireModel):
    """A PAR as it travels: everything but the capability is public and bound to the seal."""

    schema_version: Literal[1] = 1
    uid: Uid
    kind: PARKind
    is_readable: bool = False
    is_writeable: bool = False
    is_executable: bool = False
    key: str | None = None  # object PARs
    prefix: str | None = None  # bucket PARs
    resource: str | None = None  # calculation PARs: what the run starts (a job uid)
    max_size: int | None = Field(default=None, ge=0)
    min_size: int = Field(default=0, ge=0)
    sha256: Sha256Hex | None = None  # object write: the only content S3 will accept
    issuer: str = Field(min_length=1)
    recipient: Sha256Hex  # fingerprint of the key pair it is sealed for
    created_at: AwareDatetime
    expires_at: AwareDatetime
    sealed: B64Bytes


class Capability(WireModel):
    """The secret inside a PAR: only the recipient's private key opens it."""

    schema_version: Literal[1] = 1
    get_url: str | None = None
    put_url: str | None = None
    put_headers: dict[str, str] = Field(default_factory=dict)  # signed headers PUT must send
    post_url: str | None = None
    post_fields: dict[str, str] = Field(default_factory=dict)
    manifest: dict[str, str] = Field(default_factory=dict)  # bucket read: relative key -> GET URL
    run_url: str | None = None  # calculation: parjobs-run://<issuer>/<uid>?token=<secret>


class PARState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    EXPIRED = "expired"


class PARRecord(WireModel):
    """The issuer's registry entry: enough to check a proof of possession, never the secret."""

    schema_version: Literal[1] = 1
    uid: Uid
    kind: PARKind
    issuer: str
    recipient: Sha256Hex
    proof: Sha256Hex  # checksum of the capability: whoever can open the PAR can show it
    created_at: AwareDatetime
    expires_at: AwareDatetime
    driver_details: dict[str, str] = Field(default_factory=dict)


class PARTombstone(WireModel):
    """Left in the registry when a PAR is closed; its conditional create makes closing once-only."""

    schema_version: Literal[1] = 1
    uid: Uid
    closed_at: AwareDatetime
    recipient: Sha256Hex | None = None  # whose PAR it was (None: closed before this was kept)
