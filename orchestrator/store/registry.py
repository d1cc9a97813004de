"""The issuer's PAR registry, kept in the object store.

One record per PAR (`<root><uid>.json`: recipient, proof of possession, expiry, driver details),
written once. Closing creates `<root><uid>.closed` with a conditional create, so a PAR closes
exactly once even when two closes race, then deletes the record's driver details.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from orchestrator.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    PARClosedError,
    PARError,
    PARNotFoundError,
    PARPermissionError,
)
from orchestrator.store.base import ObjectStore
from schemas.par import PARRecord, PARState, PARTombstone


class PARRegistry:
    """Records every PAR an issuer mints; answers closes and state queries (a `PARControl`)."""

    def __init__(self, store: ObjectStore, root: str = "registry/pars/") -> None:
        self._store = store
        self._root = root

    def _record_key(self, uid: str) -> str:
        return f"{self._root}{uid}.json"

    def _tombstone_key(self, uid: str) -> str:
        return f"{self._root}{uid}.closed"

    async def register(self, record: PARRecord) -> None:
        try:
            await self._store.put_if_absent(
                self._record_key(record.uid), record.model_dump_json().encode()
            )
        except ObjectExistsError as exc:
            raise PARError(f"PAR uid {record.uid} is already registered") from exc

    async def get(self, uid: str, *, recipient: str | None = None) -> PARRecord:
        """The record of an open (or expired) PAR; `PARClosedError` once closed.

        With `recipient` (a key fingerprint), a PAR sealed for anyone else is answered as one
        never issued (`PARNotFoundError`): no one learns of another's PARs.
        """
        try:
            raw = await self._store.get(self._record_key(uid))
        except ObjectNotFoundError:
            if (tombstone := await self._tombstone(uid)) is not None:
                self._check_recipient(uid, tombstone.recipient, recipient)
                raise PARClosedError(f"PAR {uid} was closed") from None
            raise self._not_found(uid) from None
        record = PARRecord.model_validate_json(raw)
        self._check_recipient(uid, record.recipient, recipient)
        return record

    async def _tombstone(self, uid: str) -> PARTombstone | None:
        try:
            raw = await self._store.get(self._tombstone_key(uid))
        except ObjectNotFoundError:
            return None
        return PARTombstone.model_validate_json(raw)

    @staticmethod
    def _not_found(uid: str) -> PARNotFoundError:
        return PARNotFoundError(f"no PAR {uid} was issued here")

    def _check_recipient(self, uid: str, holder: str | None, asker: str | None) -> None:
        if asker is not None and holder != asker:
            raise self._not_found(uid)

    async def state(self, uid: str, *, recipient: str | None = None) -> PARState:
        """Open, closed or expired; with `recipient`, only for the PAR's own recipient."""
        if (tombstone := await self._tombstone(uid)) is not None:
            self._check_recipient(uid, tombstone.recipient, recipient)
            return PARState.CLOSED
        record = await self.get(uid, recipient=recipient)
        return PARState.EXPIRED if record.expires_at <= datetime.now(UTC) else PARState.OPEN

    async def verify(self, uid: str, proof: str, *, recipient: str | None = None) -> PARRecord:
        """The record, if `proof` matches the capability minted for `uid` (and, with
        `recipient`, the PAR was sealed for that key)."""
        record = await self.get(uid, recipient=recipient)
        if not hmac.compare_digest(record.proof, proof):
            raise PARPermissionError(
                f"proof of possession for PAR {uid} does not match: it was not opened with the "
                "key it was sealed for"
            )
        return record

    async def close(self, uid: str, proof: str, *, recipient: str | None = None) -> None:
        record = await self.verify(uid, proof, recipient=recipient)
        tombstone = PARTombstone(uid=uid, closed_at=datetime.now(UTC), recipient=record.recipient)
        try:
            await self._store.put_if_absent(
                self._tombstone_key(uid), tombstone.model_dump_json().encode()
            )
        except ObjectExistsError as exc:
            raise PARClosedError(f"PAR {uid} is already closed") from exc
        # The tombstone is the truth from here on; the record (with driver details) can go.
        await self._store.delete(self._record_key(uid))
