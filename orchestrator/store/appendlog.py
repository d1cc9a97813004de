"""A conditional-append log: one sequence of immutable records in an object store.

Record n is `<prefix><n, zero-padded>.json`, created with a conditional create, so two writers
can never both write n: optimistic concurrency with no lock. A writer that loses reads what it
missed, checks its record again against the newer state, and tries the next seq; `until_won`
paces those tries. Records are never rewritten, so whatever a reader has seen stays true: a log
can remember what it read and list and fetch only what came after (LIST with StartAfter costs
the same however long the log is).

The log holds only records: an object under its prefix that is not one, a record that is not the
one its key names, and a missing record with later ones present are all corruption, reported
with the owner's error.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
from pydantic import BaseModel, ValidationError

from orchestrator.errors import ObjectExistsError, ObjectNotFoundError, ParjobsError
from orchestrator.store.base import ObjectStore

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")

_BACKOFF_BASE = 0.01  # seconds: the first lost race waits up to this, doubling per loss
_BACKOFF_CAP = 0.5
DEFAULT_READ_CONCURRENCY = 16  # GETs in flight while reading one log


class AppendLog(ABC, Generic[R]):
    """The records of one sequence under `prefix`; a subclass says what a record is.

    With `remember` (for short logs), the records read from seq 1 on are kept, so a later read
    fetches only newer ones; a long log's owner keeps a summary of its own instead.
    """

    model: type[R]
    """The pydantic model of a record."""
    noun: str
    """What a record is called in error messages ("event")."""
    corrupt: type[ParjobsError]
    """The error for anything stored here that is not the record it should be."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        *,
        digits: int,
        where: str,
        remember: bool = True,
        read_concurrency: int = DEFAULT_READ_CONCURRENCY,
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._digits = digits
        self._name = re.compile(rf"(\d{{{digits}}})\.json")
        self._where = where
        self._remember = remember
        self._read_concurrency = read_concurrency
        self._known: list[R] = []  # records 1..n, once read or written

    @abstractmethod
    def misplaced(self, record: R, seq: int) -> str | None:
        """None if `record` is rightly record `seq` of this log; else what it is instead."""

    def key(self, seq: int) -> str:
        return f"{self._prefix}{seq:0{self._digits}d}.json"

    def seq_of(self, key: str) -> int | None:
        """The seq of the record stored at `key`, or None if `key` is not a record's."""
        if not key.startswith(self._prefix):
            return None
        name = self._name.fullmatch(key.removeprefix(self._prefix))
        return None if name is None else int(name[1])

    # --- reading ---------------------------------------------------------------------------------

    async def read(self, *, after: int = 0) -> list[R]:
        """The records with seq > `after`, in seq order; [] if there are none.

        Only the records after those remembered are listed and fetched: with the log up to date,
        a read costs one LIST.
        """
        known = self._known
        fresh = await self._read_stored(after=max(after, len(known)))
        if after > len(known):
            return fresh
        records = known + fresh
        # Concurrent reads of one log each extend what they started from; keep the longest.
        if self._remember and len(records) > len(self._known):
            self._known = records
        return records[after:]

    async def _read_stored(self, *, after: int) -> list[R]:
        start_after = self.key(after) if after else None
        listed = await self._store.list(self._prefix, start_after=start_after)
        return await self.fetch(self.listed_seqs([info.key for info in listed], after=after))

    def listed_seqs(self, keys: Sequence[str], *, after: int = 0) -> list[int]:
        """The seqs of the records at `keys` (a sorted listing of this log's objects after record
        `after`), checked to be records and to follow one another."""
        seqs: list[int] = []
        for key in keys:
            seq = self.seq_of(key)
            if seq is None:
                raise self.corrupt(f"{key!r} is in {self._where} but no {self.noun}")
            expected = after + len(seqs) + 1
            if seq != expected:
                raise self.corrupt(
                    f"{key!r} is in {self._where} after a gap: no {self.noun} {expected}"
                )
            seqs.append(seq)
        return seqs

    async def fetch(self, seqs: Sequence[int]) -> list[R]:
        """Records `seqs`, which must all be stored, fetched concurrently (a bounded number)."""
        found: dict[int, R] = {}
        limit = anyio.Semaphore(self._read_concurrency)

        async def fetch_one(seq: int) -> None:
            async with limit:
                record = await self.get(seq)
            if record is None:
                raise self.corrupt(
                    f"{self.key(seq)!r} vanished from {self._where}: {self.noun}s are never deleted"
                )
            found[seq] = record

        try:
            async with anyio.create_task_group() as tasks:
                for seq in seqs:
                    tasks.start_soon(fetch_one, seq)
        except* Exception as failed:  # the first failed GET is the error, not a group of them
            raise failed.exceptions[0] from None
        return [found[seq] for seq in seqs]

    async def get(self, seq: int) -> R | None:
        """Record `seq`, or None if nothing is stored there."""
        key = self.key(seq)
        try:
            data = await self._store.get(key)
        except ObjectNotFoundError:
            return None
        try:
            record = self.model.model_validate_json(data)
        except ValidationError as exc:
            raise self.corrupt(f"{key!r} is not a valid {self.noun}: {exc}") from exc
        wrong = self.misplaced(record, seq)
        if wrong is not None:
            raise self.corrupt(f"{key!r} holds {wrong}")
        return record

    # --- appending -------------------------------------------------------------------------------

    async def append(self, seq: int, record: R) -> bool:
        """Write `record` at `seq` unless something is there; whether it was written."""
        try:
            await self._store.put_if_absent(self.key(seq), record.model_dump_json().encode())
        except ObjectExistsError:
            return False
        self.remember(seq, record)
        return True

    def remember(self, seq: int, record: R) -> bool:
        """Keep `record`, known to be record `seq` (written here, or vouched for otherwise), if it
        is the next after those remembered; whether it was kept."""
        if not self._remember or seq != len(self._known) + 1:
            return False
        self._known = [*self._known, record]  # a new list: a read in flight holds the old one
        return True


async def until_won(
    attempt: Callable[[], Awaitable[T | None]],
    max_attempts: int,
    give_up: Callable[[], Exception],
) -> T:
    """`attempt()` until it returns something (None: it lost a race to append), then that.

    Losers that retry in lockstep collide again, so each retry waits a random time up to a
    bound that doubles per loss. After `max_attempts` losses, `give_up()` is raised.
    """
    for tries in range(max_attempts):
        if tries:
            pause = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (tries - 1))
            await anyio.sleep(random.uniform(0, pause))  # noqa: S311 - jitter, not a secret
        result = await attempt()
        if result is not None:
            return result
    raise give_up()
