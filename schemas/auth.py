"""Wire forms of who may ask for a job and who pays for it: authorisations, cheques, users.

Both signed messages are signed over `signed_bytes()`: a purpose tag, a NUL, then the RFC 8785
canonical JSON of every field but the signature (see `schemas.signing`). The tag differs per
message type, so a signature made for an authorisation never verifies as a cheque's, or the other
way round, even if their fields were ever to line up.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from schemas._base import WireModel
from schemas.keys import PublicKeyData
from schemas.ledger import AccountName, Money
from schemas.par import Sha256Hex, Uid
from schemas.signing import Nonce as Nonce  # re-exported: the nonce store names it from here
from schemas.signing import Signature, UtcDatetime, canonical_bytes, signed_bytes

AUTHORISATION_PURPOSE = b"parjobs-authorisation-v1"
CHEQUE_PURPOSE = b"parjobs-cheque-v1"


class _Signed(WireModel):
    """A message signed over `signed_bytes()`; subclasses name their purpose and a `signature`."""

    purpose: ClassVar[bytes]

    def signed_bytes(self) -> bytes:
        """Exactly what the signature signs: purpose tag, NUL, canonical bytes of the rest."""
        return signed_bytes(self.purpose, canonical_bytes(self, exclude={"signature"}))


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
