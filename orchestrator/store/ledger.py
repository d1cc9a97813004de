"""The ledger store: every transaction of every account, appended to the object store for good.

Transaction n is `<root><n, 12 digits>.json`, appended to an `AppendLog`. There is one
sequence for the whole ledger, so every transaction is serialised: two writers can never both
append n, and whoever appends n has checked its rules against all of 1..n-1. That is the whole
concurrency control between writers (no lock): a writer that loses reads what it missed, checks
its transaction again against the newer state (a rival may have cashed the same cheque, or spent
the money), and tries n+1. Each transaction is one object, so a crash leaves it wholly written or
not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import anyio

from orchestrator.core.ledger_rules import (
    account_kind,
    fold,
    post,
    same_operation,
    statement,
    verify,
)
from orchestrator.core.ledger_rules import deposit as build_deposit
from orchestrator.core.ledger_rules import hold as build_hold
from orchestrator.core.ledger_rules import settle as build_settle
from orchestrator.core.par_rules import validate_prefix
from orchestrator.errors import LedgerConflictError, LedgerCorruptError, LedgerRuleError
from orchestrator.store.appendlog import AppendLog, until_won
from orchestrator.store.base import ObjectStore
from schemas.ledger import ZERO, LedgerState, StatementRow, Transaction, TransactionDraft

DEFAULT_MAX_ATTEMPTS = 40  # one sequence for every account: more contention than one job's log
_READ_CONCURRENCY = 64  # GETs in flight while reading (a cold start reads the whole ledger)

Builder = Callable[[LedgerState], TransactionDraft]
"""Makes the transaction to append from the ledger's latest state (called again after a lost
race, against the newer state)."""


class _Entries(AppendLog[Transaction]):
    """The ledger's transactions; not remembered (the ledger keeps its folded state instead)."""

    model = Transaction
    noun = "transaction"
    corrupt = LedgerCorruptError

    def __init__(self, store: ObjectStore, root: str) -> None:
        super().__init__(
            store,
            root,
            digits=12,
            where="the ledger's folder",
            remember=False,
            read_concurrency=_READ_CONCURRENCY,
        )

    def misplaced(self, record: Transaction, seq: int) -> str | None:
        return None if record.seq == seq else f"transaction {record.seq}, not {seq}"


class Ledger:
    """The accounts ledger under `root` of one object store.

    Keeps the state it has folded so far: each read fetches only the transactions after it.
    """

    def __init__(self, store: ObjectStore, root: str = "ledger/") -> None:
        self._store = store
        self._root = validate_prefix(root)
        self._entries = _Entries(store, self._root)
        self._state = LedgerState()
        self._turn = anyio.Lock()  # one append at a time from this instance (see `_attempt`)

    def entry_key(self, seq: int) -> str:
        return self._entries.key(seq)

    # --- reading ----------------------------------------------------------------------------------

    async def read(self, *, after: int = 0) -> list[Transaction]:
        """The transactions with seq > `after`, in order (one LIST, then a GET for each)."""
        return await self._entries.read(after=after)

    async def state(self) -> LedgerState:
        """The ledger as all its transactions leave it (only the new ones are fetched)."""
        cached = self._state
        unseen = await self.read(after=cached.seq)
        if not unseen:
            return cached
        try:
            latest = fold(unseen, cached)
        except LedgerRuleError as exc:
            raise LedgerCorruptError(
                f"a stored transaction breaks the ledger's rules: {exc}; "
                "run `parjobs ledger verify` for the whole story"
            ) from exc
        self._remember(latest)
        return latest

    def _remember(self, state: LedgerState) -> None:
        # Tasks sharing this Ledger fold concurrently; keep whichever state is furthest on.
        if state.seq > self._state.seq:
            self._state = state

    async def balance(self, account: str) -> Decimal:
        """`account`'s balance now (0 for an account never used)."""
        account_kind(account)  # refuses a name no account can have
        return (await self.state()).balances.get(account, ZERO)

    async def find(self, tx_id: str) -> Transaction | None:
        """The stored transaction with id `tx_id`, or None if the ledger has none."""
        seq = (await self.state()).tx_ids.get(tx_id)
        return None if seq is None else await self._entries.get(seq)

    def holds(self, tx_id: str) -> bool:
        """Whether transaction `tx_id` is in the state this ledger holds (no I/O; a stored
        transaction stays, so True is final, while False may only mean not seen yet)."""
        return tx_id in self._state.tx_ids

    async def statement(self, account: str) -> list[StatementRow]:
        return statement(await self.read(), account)

    async def verify(self) -> list[str]:
        """Every invariant re-checked over the whole stored ledger: [] if sound, else the
        problems, one line each. Also reports objects under the root that are not entries of the
        sequence (a stray file, or an entry beyond a gap)."""
        seqs: list[int] = []
        strays: list[str] = []
        for info in await self._store.list(self._root):
            seq = self._entries.seq_of(info.key)
            if seq == len(seqs) + 1:
                seqs.append(seq)
                continue
            what = "not a transaction" if seq is None else f"transaction {seq} after a gap"
            strays.append(f"{info.key!r} is in the ledger's folder but {what}")
        try:
            txs = await self._entries.fetch(seqs)
        except LedgerCorruptError as exc:
            return [str(exc)]
        return verify(txs) + strays

    # --- appending --------------------------------------------------------------------------------

    async def append(
        self, build: Builder, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS
    ) -> Transaction:
        """Append the transaction `build` makes from the latest state; returns it as stored.

        The rules are checked first: a refusal (a LedgerRuleError) is raised and nothing is
        written. If a transaction with the same tx id doing the same movement is already in the
        ledger (a retry, a redelivered message, a write whose reply was lost) it is returned and
        nothing is appended.

        The first try builds on the state this ledger already holds, with no read: appending
        after it succeeds only if nothing followed it. A lost race, or a rule refusing the
        transaction on that state, reads what followed and tries again on the latest state, so
        only the latest state refuses.
        """
        tries = 0

        async def attempt() -> Transaction | None:
            nonlocal tries
            tries += 1
            return await self._attempt(build, latest=tries > 1 or self._state.seq == 0)

        return await until_won(
            attempt,
            max_attempts,
            give_up=lambda: LedgerConflictError(
                f"still losing the race to append to the ledger after {max_attempts} attempts; "
                "too many writers at once, retry later"
            ),
        )

    async def _attempt(self, build: Builder, *, latest: bool) -> Transaction | None:
        """One try at appending: the transaction, or None if another writer took its seq (or,
        unless on the `latest` state read just now, a rule refused it on the state held)."""
        # Correctness needs no lock: the conditional create decides. But SeaweedFS makes each
        # extra concurrent create of one key wait about a second longer for its 412, so tasks
        # of this process take turns rather than collide; only other processes race us.
        async with self._turn:
            state = await self.state() if latest else self._state
            try:
                draft = build(state)
                done = state.tx_ids.get(draft.tx_id)
                if done is not None:
                    existing = await self._entries.get(done)
                    if existing is not None and same_operation(existing, draft):
                        return existing
                    # Not the same: `post` refuses it with the specific reason.
                tx, after = post(state, draft)
            except LedgerRuleError:
                if latest:
                    raise
                return None  # perhaps only on the state held here: judge on the latest
            if not await self._entries.append(tx.seq, tx):
                return None
            self._remember(after)
            return tx

    async def commit(self, draft: TransactionDraft) -> Transaction:
        """Append `draft` as it is (see `append`)."""
        return await self.append(lambda _state: draft)

    async def deposit(
        self, account: str, amount: Decimal | int | str, *, tx_id: str | None = None
    ) -> Transaction:
        """Money from outside into user `account`; the same `tx_id` again deposits nothing."""
        return await self.commit(build_deposit(account, amount, tx_id=tx_id))

    async def hold(
        self,
        job_uid: str,
        cheque_id: str,
        payer: str,
        amount: Decimal | int | str,
        *,
        at: datetime | None = None,
    ) -> Transaction:
        """Cash cheque `cheque_id` for job `job_uid`: hold `amount` of `payer`'s money.

        `at`, if given, is the transaction's time (when the cheque was checked); else now.
        """
        draft = build_hold(job_uid, cheque_id, payer, amount)
        return await self.commit(draft if at is None else draft.model_copy(update={"time": at}))

    async def settle(self, job_uid: str, charge: Decimal | int | str) -> Transaction:
        """Job `job_uid` ended: charge `charge` of its hold, refund the rest to its payer."""
        return await self.append(lambda state: build_settle(job_uid, state, charge))
