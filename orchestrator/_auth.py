"""Authorisations and cheques: signing them, checking them, and the two stores checks need.

The checks are pure functions: every rule is applied, and every refusal raised, before the caller
creates a job or moves any value. Acquire's cheque checks compared fields that were never set, so
its resource and expiry checks never fired; here each rule has a test of its own that makes it
fire alone. The stores are thin: `NonceStore` makes an authorisation single-use with one
conditional create, `UserRegistry` keeps the public keys the checks verify against.

Order at the access service: look the user up, `check_authorisation`, `check_cheque`, and only
then `NonceStore.claim` -- so an authorisation that fails a check (a forgery carrying a real
user's nonce, say) cannot burn the nonce of the submission it imitates.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anyio
from pydantic import TypeAdapter, ValidationError

from orchestrator._exceptions import (
    ExpiredChequeError,
    ForgedAuthorisationError,
    ForgedChequeError,
    InsufficientChequeError,
    MismatchedAuthorisationError,
    ObjectExistsError,
    ObjectNotFoundError,
    ReplayedAuthorisationError,
    StaleAuthorisationError,
    UnknownUserError,
    UserExistsError,
    WrongRecipientError,
    WrongResourceError,
)
from orchestrator._keys import KeyPair, PublicKeys
from orchestrator._objectstore import ObjectStore
from orchestrator._par_rules import validate_prefix
from schemas.auth import Authorisation, Cheque, Nonce, UserRecord, canonical_bytes
from schemas.events import JobRequest
from schemas.ledger import AccountName
from schemas.par import Sha256Hex

# Signed messages are built once with this placeholder to compute their signed bytes, which leave
# the signature out, then copied with the real signature.
_UNSIGNED = bytes(64)
_FINGERPRINT = TypeAdapter(Sha256Hex)
_NONCE = TypeAdapter(Nonce)
_ACCOUNT = TypeAdapter(AccountName)
_READ_CONCURRENCY = 16  # GETs in flight while listing users


def request_fingerprint(request: JobRequest) -> str:
    """SHA-256 (hex) of the request's canonical bytes: what authorisations and cheques name."""
    return hashlib.sha256(canonical_bytes(request)).hexdigest()


def _short(fingerprint: str) -> str:
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
            f"the authorisation names user {_short(auth.user)} but was checked against the key "
            f"of {_short(user.fingerprint)}: it is not that user's to give"
        )
    if not user.verify(auth.signature, auth.signed_bytes()):
        raise ForgedAuthorisationError(
            f"the authorisation's signature does not verify against user {_short(auth.user)}'s "
            "registered key: it was forged or altered after signing"
        )
    expected = request_fingerprint(request)
    if auth.request_fingerprint != expected:
        raise MismatchedAuthorisationError(
            f"the authorisation was signed for request {_short(auth.request_fingerprint)}, not "
            f"for this one ({_short(expected)}): sign the request being submitted"
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
    recipient: str,
    resource: str,
    price: Decimal,
    now: datetime,
) -> None:
    """Refuse `cheque` unless it can pay `price` to `recipient` for `resource` at `now`.

    `payer_key` is the registered key of the account `cheque.payer`: look it up by that name, so
    the key the cheque claims must also be the payer's. Nothing here moves value; every rule is
    applied before the caller does.
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
    if cheque.recipient != recipient:
        raise WrongRecipientError(
            f"cheque {cheque.cheque_id} is payable to {cheque.recipient!r}, not {recipient!r}"
        )
    if cheque.resource != resource:
        raise WrongResourceError(
            f"cheque {cheque.cheque_id} pays for request {_short(cheque.resource)}, not for "
            f"this one ({_short(resource)}): write a cheque for the request being submitted"
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


class NonceStore:
    """Every nonce ever claimed, per user: `<root><user fingerprint>/<nonce>`, holding its holder.

    Claims are conditional creates and nothing is ever deleted, so a nonce is used once, for
    ever, however many access replicas race for it.
    """

    def __init__(self, store: ObjectStore, root: str = "auth/nonces/") -> None:
        self._store = store
        self._root = validate_prefix(root)

    def _key(self, user_fingerprint: str, nonce: str) -> str:
        # Validated, so neither part can steer the key out of the user's folder.
        user = _FINGERPRINT.validate_python(user_fingerprint)
        return f"{self._root}{user}/{_NONCE.validate_python(nonce)}"

    async def claim(self, user_fingerprint: str, nonce: str, *, holder: str) -> None:
        """Claim `nonce` for `holder` (the job it authorises); refused if anyone else has.

        The same holder claiming again succeeds: that is one submission retried after a crash,
        not a replay.
        """
        if not holder:
            raise ValueError("a nonce's holder must be named")
        key = self._key(user_fingerprint, nonce)
        mine = holder.encode()
        try:
            await self._store.put_if_absent(key, mine)
        except ObjectExistsError:
            if await self._store.get(key) == mine:
                return
            raise ReplayedAuthorisationError(
                f"nonce {nonce} of user {_short(user_fingerprint)} was already used by another "
                "submission: an authorisation is good for one job; sign a new one"
            ) from None


class UserRegistry:
    """Registered users and their public keys, by name and by key fingerprint.

    `<root>names/<name>.json` holds the `UserRecord` (the truth); `<root>fingerprints/<fp>` holds
    the name (the index), written only once that record holds the key. Both are conditional
    creates, so a name is one key's and a key is one name's, even when registrations race.
    """

    def __init__(self, store: ObjectStore, root: str = "auth/users/") -> None:
        self._store = store
        self._root = validate_prefix(root)

    def _name_key(self, name: str) -> str:
        return f"{self._root}names/{name}.json"

    def _index_key(self, fingerprint: str) -> str:
        return f"{self._root}fingerprints/{fingerprint}"

    async def add(self, name: str, public_key: PublicKeys) -> UserRecord:
        """Register `name` with `public_key`; the same pair again returns the first record."""
        record = UserRecord(
            name=name, public_key=public_key.to_wire(), registered_at=datetime.now(UTC)
        )
        try:
            await self._store.put_if_absent(self._name_key(name), record.model_dump_json().encode())
        except ObjectExistsError:
            record = await self.get(name)
            if PublicKeys.from_wire(record.public_key) != public_key:
                raise UserExistsError(
                    f"user {name!r} is already registered with another key; choose another name"
                ) from None
            # Same name, same key: a retry; carry on, as the first try may have stopped before
            # writing the index.
        fingerprint = public_key.fingerprint
        try:
            await self._store.put_if_absent(self._index_key(fingerprint), name.encode())
        except ObjectExistsError:
            owner = (await self._store.get(self._index_key(fingerprint))).decode()
            if owner != name:
                # The key went to `owner` first; the record made above must not stand beside it.
                await self._store.delete(self._name_key(name))
                raise UserExistsError(
                    f"this public key is already registered as user {owner!r}; one key, one user"
                ) from None
        return record

    async def get(self, name: str) -> UserRecord:
        """The user registered as `name`; `UnknownUserError` if none is."""
        try:
            valid = _ACCOUNT.validate_python(name)
        except ValidationError:
            raise UnknownUserError(
                f"{name!r} is not a valid user name, so no user has it"
            ) from None
        try:
            raw = await self._store.get(self._name_key(valid))
        except ObjectNotFoundError:
            raise UnknownUserError(f"no user {name!r} is registered") from None
        return UserRecord.model_validate_json(raw)

    async def by_fingerprint(self, fingerprint: str) -> UserRecord:
        """The user whose key has `fingerprint`; `UnknownUserError` if none."""
        try:
            valid = _FINGERPRINT.validate_python(fingerprint)
            name = (await self._store.get(self._index_key(valid))).decode()
        except (ValidationError, ObjectNotFoundError):
            raise UnknownUserError(f"no user is registered with key {fingerprint!r}") from None
        record = await self.get(name)
        # The index is only a pointer: trust the record, never the index alone.
        if PublicKeys.from_wire(record.public_key).fingerprint != valid:
            raise UnknownUserError(
                f"the index names {name!r} for key {_short(valid)}, but that user has another key"
            )
        return record

    async def list(self) -> builtins.list[UserRecord]:
        """Every registered user, sorted by name."""
        keys = [info.key for info in await self._store.list(f"{self._root}names/")]
        records: list[UserRecord] = []
        limit = anyio.Semaphore(_READ_CONCURRENCY)

        async def fetch(key: str) -> None:
            async with limit:
                try:
                    raw = await self._store.get(key)
                except ObjectNotFoundError:  # a registration that lost its key's race, withdrawn
                    return
                records.append(UserRecord.model_validate_json(raw))

        async with anyio.create_task_group() as group:
            for key in keys:
                group.start_soon(fetch, key)
        return sorted(records, key=lambda record: record.name)
