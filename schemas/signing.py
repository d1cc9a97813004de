"""What every parjobs signature covers, and the wire form of a signed message's signature.

One rule for every signature (authorisations, cheques, messages, events): Ed25519 over

    <purpose tag> NUL <the RFC 8785 canonical JSON of the signed fields>

RFC 8785 (the JSON Canonicalization Scheme) fixes the bytes of a JSON value: object members sorted
by the UTF-16 code units of their names, no whitespace, ECMAScript's shortest number forms, minimal
string escapes, UTF-8. A signer in another language reproduces the bytes from the JSON alone with
any RFC 8785 library. The purpose tag differs per kind of signed thing, so a signature made for one
never verifies as another's, even if their fields were ever to line up.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal, get_args

import rfc8785
from pydantic import AfterValidator, AwareDatetime, BaseModel, Field, JsonValue

from schemas._base import B64Bytes, WireModel
from schemas.keys import PublicKeyData
from schemas.par import Sha256Hex

MESSAGE_PURPOSE: Final = b"parjobs-message-v1"
EVENT_PURPOSE: Final = b"parjobs-event-v1"

Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Signature = Annotated[B64Bytes, Field(min_length=64, max_length=64)]  # Ed25519

ServiceRole = Literal["access", "storage", "compute"]
"""A service role: each has its own signing key, named in the operator's service keys file."""
SERVICE_ROLES: Final[tuple[ServiceRole, ...]] = get_args(ServiceRole)

Signer = ServiceRole | Sha256Hex
"""Who signed a message: a service role, or a user named by their key pair's fingerprint."""


def _utc(moment: datetime) -> datetime:
    # One zone for every signed time, so an instant has exactly one canonical spelling.
    return moment.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]


def canonical_json(value: JsonValue) -> bytes:
    """The RFC 8785 bytes of a JSON value.

    Raises ValueError (`rfc8785.CanonicalizationError`) for what I-JSON cannot carry: NaN or an
    infinity, an integer beyond ±(2**53 - 1) (a double cannot hold it exactly, so another
    language would read another number), a string that is not valid Unicode. A float and an int of
    equal value (1.0 and 1) are one JSON number and encode alike, as in every other language.
    """
    return rfc8785.dumps(value)


def canonical_bytes(model: BaseModel, *, exclude: set[str] | None = None) -> bytes:
    """The canonical JSON of `model`'s JSON-mode dump, less the fields in `exclude`.

    The dump is what travels: money as its decimal string ("2.500000"), times as the ISO 8601
    strings pydantic writes, bytes as base64. Canonical because a signature covers bytes, not
    meaning: the same message parsed from JSON with its fields in another order, or pretty-printed,
    must encode to the same bytes for its signature to verify after travelling.
    """
    return canonical_json(model.model_dump(mode="json", exclude=exclude))


def signed_bytes(purpose: bytes, canonical: bytes) -> bytes:
    """Exactly what a signature of `purpose` signs: the tag, NUL, then the canonical JSON."""
    # NUL occurs in no tag and never raw in canonical JSON, so the split is unambiguous.
    return purpose + b"\x00" + canonical


class MessageSignature(WireModel):
    """A message's signature: who signed it, a fresh nonce, and the Ed25519 signature itself.

    It signs `signed_bytes(MESSAGE_PURPOSE, canonical JSON of {message_id, sent_at, nonce, signer,
    body})`, the message id, time and body being the envelope's (see
    `orchestrator.core.message_signing`). The time signed is the envelope's `sent_at`, so there is
    no second timestamp here to disagree with it.
    """

    schema_version: Literal[1] = 1
    signer: Signer
    nonce: Nonce  # with the message id: lets a service refuse a captured message sent again
    signature: Signature


class ServiceKeysData(WireModel):
    """The operator's service keys file: each role's public keys, the current one first.

    A role may list older keys after its current one, so what they signed (a job's log is kept
    for good) still verifies after the role's key is replaced.
    """

    schema_version: Literal[1] = 1
    kind: Literal["parjobs-service-keys"] = "parjobs-service-keys"
    roles: dict[ServiceRole, tuple[PublicKeyData, ...]]
