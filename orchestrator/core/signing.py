"""Authorisations and cheques: signing them and checking them (pure; stores: `store.users`).

The checks are pure functions: every rule is applied, and every refusal raised, before the caller
creates a job or moves any value. Acquire's cheque checks compared fields that were never set, so
its resource and expiry checks never fired; here each rule has a test of its own that makes it
fire alone.

Order at the access service: look the user up, `check_authorisation`, `check_cheque`, and only
then `NonceStore.claim` -- so an authorisation that fails a check (a forgery carrying a real
user's nonce, say) cannot burn the nonce of the submission it imitates.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.errors import (
    ChequePayerMismatchError,
    ExpiredChequeError,
    ForgedAuthorisationError,
    ForgedChequeError,
    InsufficientChequeError,
    MismatchedAuthorisationError,
    StaleAuthorisationError,
    WrongRecipientError,
    WrongResourceError,
)
from schemas.auth import Authorisation, Cheque
from schemas.events import JobRequest
from schemas.signing import canonical_bytes

# Signed messages are built once with this placeholder to compute their signed bytes, which leave
# the signature out, then copied with the real signature.
_UNSIGNED = bytes(64)


def request_fingerprint(request: JobRequest) -> str:
    """SHA-256 (hex) of the request's canonical bytes: what authorisations and cheques name."""
    return hashlib.sha256(canonical_bytes(request)).hexdigest()


def short(fingerprint: str) -> str:
    return f"{fingerprint[:16]}…"


# --- authorisations -----------------------------------------------------------------------------


def sign_authorisation(
    key: KeyPair, request: JobRequest, *, now: datetime | None = None
) -> Authorisation:
    """`key`'s owner authorises `request`, now, once (a fresh random nonce)."""
    draft = Authorisation(
        user=key.fingerprint,
        request_fingerprint=request_fingerprint(request),
        timestamp=now if now is not None else datetime.now(UTC),
        nonce=secrets.token_hex(16),
        signature=_UNSIGNED,
    )
    return draft.model_copy(update={"signature": key.sign(draft.signed_bytes())})


def check_authorisation(
    auth: Authorisation,
    request: JobRequest,
    user: PublicKeys,
    *,
    now: datetime,
    window: timedelta,
) -> None:
    """Refuse `auth` unless `user` signed it, for `request`, within `window` of `now`.

    `user` is the registered key of the user `auth` names. The nonce is not checked here: claim it
    with `NonceStore.claim` after this (and the cheque) passed.
    """
    if window < timedelta(0):
        raise ValueError(f"the window must not be negative, not {window}")
    if auth.user != user.fingerprint:
        raise ForgedAuthorisationError(
            f"the authorisation names user {short(auth.user)} but was checked against the key "
            f"of {short(user.fingerprint)}: it is not that user's to give"
        )
    if not user.verify(auth.signature, auth.signed_bytes()):
        raise ForgedAuthorisationError(
            f"the authorisation's signature does not verify against user {short(auth.user)}'s "
            "registered key: it was forged or altered after signing"
        )
    expected = request_fingerprint(request)
    if auth.request_fingerprint != expected:
        raise MismatchedAuthorisationError(
            f"the authorisation was signed for request {short(auth.request_fingerprint)}, not "
            f"for this one ({short(expected)}): sign the request being submitted"
        )
    offset = auth.timestamp - now
    if abs(offset) > window:
        direction = "behind" if offset < timedelta(0) else "ahead of"
        raise StaleAuthorisationError(
            f"the authorisation's timestamp is {abs(offset).total_seconds():.0f} s {direction} "
            f"the service's clock; at most {window.total_seconds():.0f} s is accepted: sign it "
            "again (and check the clock if this repeats)",
            offset=offset,
            window=window,
        )


# --- cheques ------------------------------------------------------------------------------------


def write_cheque(
    key: KeyPair,
    *,
    payer: str,
    recipient: str,
    max_spend: Decimal,
    resource: str,
    lifetime: timedelta,
    now: datetime | None = None,
) -> Cheque:
    """A cheque from account `payer` (whose key is `key`) to `recipient`, for one resource."""
    if lifetime <= timedelta(0):
        raise ValueError(f"a cheque's lifetime must be positive, not {lifetime}")
    draft = Cheque(
        cheque_id=uuid.uuid4().hex,
        payer=payer,
        payer_key=key.fingerprint,
        recipient=recipient,
        max_spend=max_spend,
        resource=resource,
        expires_at=(now if now is not None else datetime.now(UTC)) + lifetime,
        signature=_UNSIGNED,
    )
    return draft.model_copy(update={"signature": key.sign(draft.signed_bytes())})


def check_cheque(
    cheque: Cheque,
    *,
    payer_key: PublicKeys,
    job_owner: str,
    recipient: str,
    resource: str,
    price: Decimal,
    now: datetime,
) -> None:
    """Refuse `cheque` unless it can pay `price` to `recipient` for `resource` at `now`, for a
    job of its own payer.

    `payer_key` is the registered key of the account `cheque.payer`: look it up by that name, so
    the key the cheque claims must also be the payer's. `job_owner` is the account of the user
    whose authorisation the job carries: a cheque pays only for its payer's own jobs, or anyone
    who saw a cheque go by could spend it on a job of theirs for the same request. Nothing here
    moves value; every rule is applied before the caller does.
    """
    if not price.is_finite() or price < 0:
        raise ValueError(f"a price must be a finite, non-negative amount, not {price}")
    if cheque.payer_key != payer_key.fingerprint or not payer_key.verify(
        cheque.signature, cheque.signed_bytes()
    ):
        raise ForgedChequeError(
            f"cheque {cheque.cheque_id} does not verify against the registered key of "
            f"{cheque.payer!r}: it was forged, altered, or signed with another key"
        )
    if cheque.payer != job_owner:
        raise ChequePayerMismatchError(
            f"cheque {cheque.cheque_id} is written by {cheque.payer!r} but the job is authorised "
            f"by {job_owner!r}: a cheque pays only for its payer's own jobs"
        )
    if cheque.recipient != recipient:
        raise WrongRecipientError(
            f"cheque {cheque.cheque_id} is payable to {cheque.recipient!r}, not {recipient!r}"
        )
    if cheque.resource != resource:
        raise WrongResourceError(
            f"cheque {cheque.cheque_id} pays for request {short(cheque.resource)}, not for "
            f"this one ({short(resource)}): write a cheque for the request being submitted"
        )
    if now >= cheque.expires_at:
        raise ExpiredChequeError(
            f"cheque {cheque.cheque_id} expired at {cheque.expires_at.isoformat()}: write a new one"
        )
    if price > cheque.max_spend:
        raise InsufficientChequeError(
            f"the calculation costs up to {price}, but cheque {cheque.cheque_id} allows at most "
            f"{cheque.max_spend}: write one for at least {price}",
            price=price,
            limit=cheque.max_spend,
        )


# --- stores -------------------------------------------------------------------------------------
