"""Wire forms of who may ask for a job and who pays for it: authorisations, cheques, users.

Both signed messages are signed over `signed_bytes()`: a purpose tag, a NUL, then the canonical
bytes of every field but the signature. The tag differs per message type, so a signature made for
an authorisation never verifies as a cheque's, or the other way round, even if their fields were
ever to line up.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, Field

from schemas._base import B64Bytes, WireModel
from schemas.keys import PublicKeyData
from schemas.ledger import AccountName, Money
from schemas.par import Sha256Hex, Uid

AUTHORISATION_PURPOSE = b"parjobs-authorisation-v1"
CHEQUE_PURPOSE = b"parjobs-cheque-v1"

Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Signature = Annotated[B64Bytes, Field(min_length=64, max_length=64)]  # Ed25519


def _utc(moment: datetime) -> datetime:
    # One zone for every signed time, so an instant has exactly one canonical spelling.
    return moment.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]


def canonical_bytes(model: BaseModel, *, exclude: set[str] | None = None) -> bytes:
    """The one encoding signatures and fingerprints are computed over.

    JSON of `model_dump(mode="json")` with sorted keys, no whitespace, UTF-8 (not \\u escapes),
    and no NaN or infinity. Canonical because a signature covers bytes, not meaning: the same
    message parsed from JSON with its fields in another order, or pretty-printed, must encode to
    the same bytes for its signature to verify after travelling; and two different values must
    never encode alike, or one signature would cover both. Floats (only in job parameters) are
    written as Python's shortest round-trip repr; a signer in another language must match it.
    """
    data = model.model_dump(mode="json", exclude=exclude)
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


class _Signed(WireModel):
    """A message signed over `signed_bytes()`; subclasses name their purpose and a `signature`."""

    purpose: ClassVar[bytes]

    def signed_bytes(self) -> bytes:
        """Exactly what the signature signs: purpose tag, NUL, canonical bytes of the rest."""
        # NUL cannot occur in the tag or in canonical JSON, so the split is unambiguous.
        return self.purpose + b"\x00" + canonical_bytes(self, exclude={"signature"})


class Authorisation(_Signed):
    """A user's signed "run this request for me", checked before anything is created."""

    purpose: ClassVar[bytes] = AUTHORISATION_PURPOSE

    schema_version: Literal[1] = 1
    user: Sha256Hex  # fingerprint of the user's key pair
    request_fingerprint: Sha256Hex  # SHA-256 of the canonical bytes of the JobRequest
    timestamp: UtcDatetime  # bounds how long a captured authorisation is worth anything
    nonce: Nonce  # makes it single-use: each nonce is claimed once, for ever
    signature: Signature


class Cheque(_Signed):
    """A payer's signed promise to pay `recipient` up to `max_spend` for one job request."""

    purpose: ClassVar[bytes] = CHEQUE_PURPOSE

    schema_version: Literal[1] = 1
    cheque_id: Uid  # cashed at most once
    payer: AccountName
    payer_key: Sha256Hex  # fingerprint of the payer's key pair
    recipient: AccountName  # the service account it is payable to, e.g. "access"
    max_spend: Annotated[Money, Field(gt=0)]
    resource: Sha256Hex  # the fingerprint of the job request it pays for, and nothing else
    expires_at: UtcDatetime
    signature: Signature


class UserRecord(WireModel):
    """A registered user: the public key their authorisations and cheques must verify against."""

    schema_version: Literal[1] = 1
    name: AccountName
    public_key: PublicKeyData
    registered_at: UtcDatetime
