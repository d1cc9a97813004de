"""The stores the signature checks need: registered users and used nonces, in the object store."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime

import anyio
from pydantic import TypeAdapter, ValidationError

from orchestrator.core.keys import PublicKeys
from orchestrator.core.par_rules import validate_prefix
from orchestrator.core.signing import short
from orchestrator.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    ReplayedAuthorisationError,
    UnknownUserError,
    UserExistsError,
)
from orchestrator.store.base import ObjectStore
from schemas.auth import Nonce, UserRecord
from schemas.ledger import AccountName
from schemas.par import Sha256Hex

_FINGERPRINT = TypeAdapter(Sha256Hex)
_NONCE = TypeAdapter(Nonce)
_ACCOUNT = TypeAdapter(AccountName)
_READ_CONCURRENCY = 16  # GETs in flight while listing users
_CACHED_USERS = 4096


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
                f"nonce {nonce} of user {short(user_fingerprint)} was already used by another "
                "submission: an authorisation is good for one job; sign a new one"
            ) from None


class UserRegistry:
    """Registered users and their public keys, by name and by key fingerprint.

    `<root>names/<name>.json` holds the `UserRecord` (the truth); `<root>fingerprints/<fp>` holds
    the name (the index), written only once that record holds the key. Both are conditional
    creates, so a name is one key's and a key is one name's, even when registrations race.

    A registration the index confirms (its record holds the key the index names) is never
    withdrawn or changed, so it is remembered (the most recent `_CACHED_USERS`) and not read again.
    """

    def __init__(self, store: ObjectStore, root: str = "auth/users/") -> None:
        self._store = store
        self._root = validate_prefix(root)
        # Confirmed registrations, oldest first: fingerprint -> record, and name -> record.
        self._by_fingerprint: dict[str, UserRecord] = {}
        self._by_name: dict[str, UserRecord] = {}

    def _confirm(self, fingerprint: str, record: UserRecord) -> None:
        self._by_fingerprint[fingerprint] = self._by_name[record.name] = record
        if len(self._by_fingerprint) > _CACHED_USERS:
            oldest = self._by_fingerprint.pop(next(iter(self._by_fingerprint)))
            del self._by_name[oldest.name]

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
        if (confirmed := self._by_name.get(valid)) is not None:
            return confirmed
        try:
            raw = await self._store.get(self._name_key(valid))
        except ObjectNotFoundError:
            raise UnknownUserError(f"no user {name!r} is registered") from None
        return UserRecord.model_validate_json(raw)

    async def by_fingerprint(self, fingerprint: str) -> UserRecord:
        """The user whose key has `fingerprint`; `UnknownUserError` if none."""
        try:
            valid = _FINGERPRINT.validate_python(fingerprint)
        except ValidationError:
            raise UnknownUserError(f"no user is registered with key {fingerprint!r}") from None
        if (confirmed := self._by_fingerprint.get(valid)) is not None:
            return confirmed
        try:
            name = (await self._store.get(self._index_key(valid))).decode()
        except (ValidationError, ObjectNotFoundError):
            raise UnknownUserError(f"no user is registered with key {fingerprint!r}") from None
        record = await self.get(name)
        # The index is only a pointer: trust the record, never the index alone.
        if PublicKeys.from_wire(record.public_key).fingerprint != valid:
            raise UnknownUserError(
                f"the index names {name!r} for key {short(valid)}, but that user has another key"
            )
        self._confirm(valid, record)
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
