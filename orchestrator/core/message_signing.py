"""Signed messages: what a request or a reply is signed over, signing it, and checking it (pure).

Every message on the broker is signed by its sender: a user over their requests, a service role
over its replies. The signature covers

    signed_bytes(MESSAGE_PURPOSE, RFC 8785 JSON of {message_id, sent_at, nonce, signer, body})

with the envelope's message id, its time (in UTC, written `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the
fraction left out when zero), the signer's name and nonce from the signature block, and the body
as its JSON, so a sender or a receiver in another language rebuilds the bytes from the JSON alone.

`verify_message` answers who signed, or refuses with the reason: unsigned, forged, stale, or an
unknown signer, each its own error so a service can say which. It does not remember nonces: a
handler whose effect is not idempotent by message id claims `(signer, nonce)` once, as the access
service does with an authorisation's nonce.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from pydantic import AwareDatetime, BaseModel, TypeAdapter

from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.core.service_keys import is_service_role
from orchestrator.errors import (
    ForgedSignatureError,
    StaleSignatureError,
    UnknownSignerError,
    UnsignedError,
)
from schemas.signing import MESSAGE_PURPOSE, MessageSignature, canonical_json, signed_bytes

_TIME = TypeAdapter(AwareDatetime)


def _short(name: str) -> str:
    return name if is_service_role(name) else f"user {name[:16]}…"


def message_bytes(
    *, message_id: str, sent_at: datetime, nonce: str, signer: str, body: BaseModel
) -> bytes:
    """Exactly what a message's signature signs."""
    document = {
        "message_id": message_id,
        "sent_at": _TIME.dump_python(sent_at.astimezone(UTC), mode="json"),
        "nonce": nonce,
        "signer": signer,
        "body": body.model_dump(mode="json"),
    }
    return signed_bytes(MESSAGE_PURPOSE, canonical_json(document))


def sign_message(
    key: KeyPair, signer: str, *, message_id: str, sent_at: datetime, body: BaseModel
) -> MessageSignature:
    """`key`'s owner signs the message as `signer`: a service role, or the user's fingerprint."""
    if not is_service_role(signer) and signer != key.fingerprint:
        raise ValueError(
            f"a user signs as their key's fingerprint ({key.fingerprint[:16]}…), not as {signer!r}"
        )
    nonce = secrets.token_hex(16)
    data = message_bytes(
        message_id=message_id, sent_at=sent_at, nonce=nonce, signer=signer, body=body
    )
    return MessageSignature(signer=signer, nonce=nonce, signature=key.sign(data))


def verify_message(
    signature: MessageSignature | None,
    *,
    message_id: str,
    sent_at: datetime,
    body: BaseModel,
    keys: Sequence[PublicKeys],
    now: datetime,
    window: timedelta,
) -> str:
    """The signer of the message, once its signature verifies and its time is within `window`.

    `keys` are the keys the claimed signer (`signature.signer`) may sign with: a role's from the
    operator's `ServiceKeys`, a user's registered key looked up by the fingerprint; none if the
    signer is not known. The signature is checked before the time, so only a genuine message
    learns that the clocks disagree.
    """
    if window < timedelta(0):
        raise ValueError(f"the window must not be negative, not {window}")
    if signature is None:
        raise UnsignedError(f"message {message_id} is not signed: every message must be")
    signer = signature.signer
    if not keys:
        raise UnknownSignerError(
            f"message {message_id} is signed by {_short(signer)}, who has no key here: not a "
            "configured service role nor a registered user"
        )
    if not is_service_role(signer):
        # A user is named by their key: a key of any other fingerprint is not theirs.
        keys = [key for key in keys if key.fingerprint == signer]
    data = message_bytes(
        message_id=message_id,
        sent_at=sent_at,
        nonce=signature.nonce,
        signer=signer,
        body=body,
    )
    if not any(key.verify(signature.signature, data) for key in keys):
        raise ForgedSignatureError(
            f"message {message_id}'s signature does not verify against the key of "
            f"{_short(signer)}: it was forged, or altered after signing"
        )
    offset = sent_at - now
    if abs(offset) > window:
        direction = "behind" if offset < timedelta(0) else "ahead of"
        raise StaleSignatureError(
            f"message {message_id} was sent {abs(offset).total_seconds():.0f} s {direction} "
            f"this clock; at most {window.total_seconds():.0f} s is accepted: send it again "
            "(and check the clock if this repeats)",
            offset=offset,
            window=window,
        )
    return signer
