"""The PAR registry: the records of the PARs the services mint, and the closes of them.

A job's PARs are recorded in the events that hand them out (`StorageContracted`,
`ComputeContracted`, `Completed`): each event carries the proof of possession of each PAR it
holds, and the PAR's public data is the rest of the record. The event is sealed by the role that
minted them, in the job's verified log, so no one can forge a record, and minting writes nothing
of its own. A job PAR's uid starts with its job's uid (`job_par_uid`), so a PAR named by uid alone
leads to its job: its record comes from the job's log as this process remembers it, or, on a
miss, from the jobs listed under that start.

A PAR minted outside a job's events (the demo, a read PAR access mints on request) has a record
object, `<root><uid>.json`, written once. Closing any PAR creates `<root><uid>.closed` with a
conditional create, so a PAR closes exactly once even when two closes race; a record object then
goes (the tombstone is the truth), while an event's record stays and the tombstone overrides it.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Iterable
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
from orchestrator.store.eventlog import EventLog
from schemas.events import Completed, ComputeContracted, JobEvent, StorageContracted
from schemas.par import PARData, PARRecord, PARState, PARTombstone

JOB_DIGITS = 16
"""How many hex digits of its job's uid a job PAR's uid starts with (the other 16 are random)."""

_UID = re.compile(r"[0-9a-f]{32}")


def job_par_uid(job_uid: str) -> str:
    """A new uid for a PAR of job `job_uid`, which leads back to the job (`JOB_DIGITS`)."""
    return job_uid[:JOB_DIGITS] + secrets.token_hex((32 - JOB_DIGITS) // 2)


def minted_records(events: Iterable[JobEvent], bucket: str) -> dict[str, PARRecord]:
    """The records of the PARs `events` hand out, by uid: each PAR's public data and the proof
    its event carries, for a PAR its event's signer issued."""
    records = {}
    for event in events:
        pars, proofs = _handed_out(event)
        for par in pars:
            proof = None if par is None else proofs.get(par.uid)
            if par is not None and proof is not None and event.signer in (None, par.issuer):
                records[par.uid] = _record(par, proof, bucket)
    return records


def _handed_out(event: JobEvent) -> tuple[tuple[PARData | None, ...], dict[str, str]]:
    """The PARs an event hands out, and the proofs it carries for them."""
    match event.payload:
        case StorageContracted() as contracted:
            return (contracted.upload_par, contracted.output_par), contracted.proofs
        case ComputeContracted() as contracted:
            return (contracted.run_par,), contracted.proofs
        case Completed() as completed:
            return (completed.read_par,), completed.proofs
    return (), {}


def _record(par: PARData, proof: str, bucket: str) -> PARRecord:
    target = {"key": par.key, "prefix": par.prefix, "resource": par.resource}
    return PARRecord(
        uid=par.uid,
        kind=par.kind,
        issuer=par.issuer,
        recipient=par.recipient,
        proof=proof,
        created_at=par.created_at,
        expires_at=par.expires_at,
        driver_details={
            "bucket": bucket,
            "issuer": par.issuer,
            **{name: value for name, value in target.items() if value},
        },
    )


class PARRegistry:
    """Finds every PAR the services mint; answers closes and state queries (a `PARControl`).

    Without `log` (the job logs' `EventLog`) only record objects are known.
    """

    def __init__(
        self, store: ObjectStore, root: str = "registry/pars/", *, log: EventLog | None = None
    ) -> None:
        self._store = store
        self._root = root
        self._log = log

    def _record_key(self, uid: str) -> str:
        return f"{self._root}{uid}.json"

    def _tombstone_key(self, uid: str) -> str:
        return f"{self._root}{uid}.closed"

    async def register(self, record: PARRecord) -> None:
        """Write the record object of a PAR no job event carries."""
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
        return (await self._open(uid, recipient))[0]

    async def _open(self, uid: str, recipient: str | None) -> tuple[PARRecord, bool]:
        """(the record, whether it is a record object) of a PAR not closed."""
        record, stored = await self._find(uid)
        # A record object goes when its PAR closes; an event's record stays: ask the tombstone.
        if (record is None or not stored) and (tombstone := await self._tombstone(uid)):
            self._check_recipient(uid, tombstone.recipient, recipient)
            raise PARClosedError(f"PAR {uid} was closed")
        if record is None:
            raise self._not_found(uid)
        self._check_recipient(uid, record.recipient, recipient)
        return record, stored

    async def _find(self, uid: str) -> tuple[PARRecord | None, bool]:
        """The record of PAR `uid` wherever it is, and whether it is a record object: from the
        job logs remembered (no I/O), the record object, or the logs of the jobs it leads to."""
        if _UID.fullmatch(uid) is None:
            return None, False  # no PAR has such a uid (and it must not steer a key anywhere)
        job_start = uid[:JOB_DIGITS]
        if self._log is not None:
            remembered = self._log.remembered(job_start)
            if (record := self._in_logs(uid, remembered)) is not None:
                return record, False
        try:
            return PARRecord.model_validate_json(await self._store.get(self._record_key(uid))), True
        except ObjectNotFoundError:
            pass
        if self._log is not None:
            jobs = await self._log.job_uids(starting=job_start)
            logs = [await self._log.read(job) for job in jobs]
            return self._in_logs(uid, logs), False
        return None, False

    def _in_logs(self, uid: str, logs: Iterable[list[JobEvent]]) -> PARRecord | None:
        for events in logs:
            if (record := minted_records(events, self._store.bucket).get(uid)) is not None:
                return record
        return None

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
        record, _ = await self._find(uid)
        if record is None:
            raise self._not_found(uid)
        self._check_recipient(uid, record.recipient, recipient)
        return PARState.EXPIRED if record.expires_at <= datetime.now(UTC) else PARState.OPEN

    async def verify(self, uid: str, proof: str, *, recipient: str | None = None) -> PARRecord:
        """The record, if `proof` matches the capability minted for `uid` (and, with
        `recipient`, the PAR was sealed for that key)."""
        return (await self._verified(uid, proof, recipient))[0]

    async def _verified(
        self, uid: str, proof: str, recipient: str | None
    ) -> tuple[PARRecord, bool]:
        record, stored = await self._open(uid, recipient)
        if not hmac.compare_digest(record.proof, proof):
            raise PARPermissionError(
                f"proof of possession for PAR {uid} does not match: it was not opened with the "
                "key it was sealed for"
            )
        return record, stored

    async def close(self, uid: str, proof: str, *, recipient: str | None = None) -> None:
        record, stored = await self._verified(uid, proof, recipient)
        tombstone = PARTombstone(uid=uid, closed_at=datetime.now(UTC), recipient=record.recipient)
        try:
            await self._store.put_if_absent(
                self._tombstone_key(uid), tombstone.model_dump_json().encode()
            )
        except ObjectExistsError as exc:
            raise PARClosedError(f"PAR {uid} is already closed") from exc
        if stored:  # the tombstone is the truth from here on; the record (and its details) can go
            await self._store.delete(self._record_key(uid))
