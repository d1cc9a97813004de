"""The ledger store: every transaction of every account, appended to the object store for good.

Transactions are numbered in one sequence for the whole ledger and stored in blocks of
consecutive ones: the block whose first transaction is n is `<root><n, 12 digits>.json`,
appended with a conditional create. Whoever creates n has checked every transaction in it
against all of 1..n-1 and those before it in the block; two writers can never both create n,
and the next block starts after the last transaction of this one. That is the whole concurrency
control between writers (no lock). A block is one object, so a crash leaves it wholly written or
not at all.

A block is appended after the state this ledger holds, without reading first: if another writer
created that block's key, the create fails and the process reads what it missed. Only a ledger
that has never read the store (a process just started) reads first, and a refusal judged on the
state held is judged again on a fresh read (a deposit may have come since).

Group commit: the transactions a process submits while its previous block is being written wait
and go together into its next block, so one conditional create carries many of them. Each is
still checked on its own (a refusal reaches only its caller) and keeps its own id and time. A
block that loses the race (another writer created n first) is not written at all: the process
reads what it missed, checks every transaction of the block again against the newer state (a
rival may have cashed the same cheque, or spent the money) and tries again, after a random pause
that doubles per loss. A transaction whose blocks lost `max_attempts` races gives up.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import anyio

from orchestrator.core.ledger_rules import (
    Batch,
    account_kind,
    fold,
    same_operation,
    statement,
    verify,
)
from orchestrator.core.ledger_rules import deposit as build_deposit
from orchestrator.core.ledger_rules import hold as build_hold
from orchestrator.core.ledger_rules import settle as build_settle
from orchestrator.core.par_rules import validate_prefix
from orchestrator.errors import LedgerConflictError, LedgerCorruptError, LedgerRuleError
from orchestrator.metrics import LEDGER_APPENDS, LEDGER_LOST_RACES
from orchestrator.store.appendlog import AppendLog, until_won
from orchestrator.store.base import ObjectStore
from schemas.ledger import (
    ZERO,
    Block,
    LedgerState,
    StatementRow,
    Transaction,
    TransactionDraft,
)

DEFAULT_MAX_ATTEMPTS = 40  # one sequence for every account: more contention than one job's log
MAX_BLOCK = 256  # transactions per block: an object of ~150 KiB at most
_RECENT_BLOCKS = 64  # the newest blocks written or read, kept: a retry finds its own in memory
_READ_CONCURRENCY = 64  # GETs in flight while reading (a cold start reads the whole ledger)

Builder = Callable[[LedgerState], TransactionDraft]
"""Makes the transaction to append from the ledger's state as of its place in its block (called
again after a lost race, against the newer state). It must not keep that state."""


class _Blocks(AppendLog[Block]):
    """The ledger's blocks, each stored under the seq of its first transaction; not remembered
    (the ledger keeps its folded state instead)."""

    model = Block
    noun = "transaction"  # a key names the first transaction of its block
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

    def misplaced(self, record: Block, seq: int) -> str | None:
        return None if record.first == seq else f"transaction {record.first}, not {seq}"

    async def read(self, *, after: int = 0) -> list[Block]:
        """The blocks after transaction `after`, in order; `after` must end a block (or be 0).

        One LIST, then the blocks fetched concurrently; each must start where the one before it
        ends."""
        listed: list[int] = []
        start_after = self.key(after) if after else None
        for info in await self._store.list(self._prefix, start_after=start_after):
            seq = self.seq_of(info.key)
            if seq is None:
                raise self.corrupt(f"{info.key!r} is in {self._where} but no {self.noun}")
            listed.append(seq)
        blocks = await self.fetch(listed)
        expected = after + 1
        for block in blocks:
            if block.first != expected:
                raise self.corrupt(self._out_of_line(block.first, expected))
            expected = block.last + 1
        return blocks

    def _out_of_line(self, seq: int, expected: int) -> str:
        """Why the block at `seq` cannot come next, where transaction `expected` should."""
        if seq > expected:
            return f"{self.key(seq)!r} is in {self._where} after a gap: no {self.noun} {expected}"
        return f"{self.key(seq)!r} is in {self._where} but {self.noun} {seq} is in the block before"


Outcome = Transaction | Exception
"""What became of a transaction: stored, or why not (a refusal, a failure)."""


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's transaction waiting for a block, and, once answered, what became of it."""

    build: Builder
    max_attempts: int
    losses: int = 0  # blocks it was in that lost the race
    outcome: Outcome | None = None

    def result(self) -> Transaction:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        assert self.outcome is not None, "not answered yet"
        return self.outcome


class _OutOfAttemptsError(Exception):
    """A block lost as many races as one of its transactions may (caught where it is raised)."""


class Ledger:
    """The accounts ledger under `root` of one object store.

    Keeps the state it has folded so far: each read fetches only the blocks after it.
    """

    def __init__(self, store: ObjectStore, root: str = "ledger/") -> None:
        self._store = store
        self._root = validate_prefix(root)
        self._blocks = _Blocks(store, self._root)
        self._state = LedgerState()
        self._starts: list[int] = []  # the first seq of each block folded into `_state`
        self._waiting: list[_Request] = []  # submitted, not yet taken into a block
        self._turn = anyio.Lock()  # one block at a time from this instance (see `append`)
        self._read_once = False  # whether `_state` came from the store (else it may be far behind)
        self._recent: OrderedDict[int, Block] = OrderedDict()  # first seq -> block, newest last

    def entry_key(self, seq: int) -> str:
        """The key of the block whose first transaction is `seq`."""
        return self._blocks.key(seq)

    # --- reading ----------------------------------------------------------------------------------

    async def read(self, *, after: int = 0) -> list[Transaction]:
        """The transactions with seq > `after`, in order (one LIST, then a GET for each block from
        the one holding `after + 1`)."""
        starts, known = self._starts, self._state.seq
        first = starts[bisect.bisect_right(starts, after + 1) - 1] if after < known else known + 1
        blocks = await self._blocks.read(after=first - 1)
        return [tx for block in blocks for tx in block.transactions if tx.seq > after]

    async def state(self) -> LedgerState:
        """The ledger as all its transactions leave it (only the new blocks are fetched)."""
        cached = self._state
        unseen = await self._blocks.read(after=cached.seq)
        self._read_once = True
        if not unseen:
            return cached
        try:
            latest = fold((tx for block in unseen for tx in block.transactions), cached)
        except LedgerRuleError as exc:
            raise LedgerCorruptError(
                f"a stored transaction breaks the ledger's rules: {exc}; "
                "run `parjobs ledger verify` for the whole story"
            ) from exc
        self._remember(latest, unseen)
        return latest

    def _remember(self, state: LedgerState, blocks: list[Block]) -> None:
        """Keep `state`, where its newest `blocks` start and the blocks themselves, if it is
        further on than the state kept: tasks sharing this Ledger fold concurrently."""
        known = self._state.seq
        if state.seq > known:
            self._starts.extend(block.first for block in blocks if block.first > known)
            self._state = state
            for block in blocks:
                self._recent[block.first] = block
            while len(self._recent) > _RECENT_BLOCKS:
                self._recent.popitem(last=False)

    async def balance(self, account: str) -> Decimal:
        """`account`'s balance now (0 for an account never used)."""
        account_kind(account)  # refuses a name no account can have
        return (await self.state()).balances.get(account, ZERO)

    def holds(self, tx_id: str) -> bool:
        """Whether transaction `tx_id` is in the state this ledger holds (no I/O; a stored
        transaction stays, so True is final, while False may only mean not seen yet)."""
        return tx_id in self._state.tx_ids

    async def find(self, tx_id: str) -> Transaction | None:
        """The stored transaction with id `tx_id`, or None if the ledger has none."""
        seq = (await self.state()).tx_ids.get(tx_id)
        return None if seq is None else await self._stored(seq)

    async def _stored(self, seq: int) -> Transaction:
        """Transaction `seq`, which this ledger has folded already, from its block."""
        first = self._starts[bisect.bisect_right(self._starts, seq) - 1]
        block = self._recent.get(first) or await self._blocks.get(first)
        if block is None:
            raise LedgerCorruptError(
                f"{self.entry_key(first)!r} vanished from the ledger's folder: "
                "transactions are never deleted"
            )
        return block.transactions[seq - first]

    async def statement(self, account: str) -> list[StatementRow]:
        return statement(await self.read(), account)

    async def verify(self) -> list[str]:
        """Every invariant re-checked over the whole stored ledger: [] if sound, else the
        problems, one line each. Also reports objects under the root that are not blocks of the
        sequence (a stray file, a block beyond a gap or overlapping the one before)."""
        listed = await self._store.list(self._root)
        seqs = [seq for info in listed if (seq := self._blocks.seq_of(info.key)) is not None]
        try:
            blocks = dict(zip(seqs, await self._blocks.fetch(seqs), strict=True))
        except LedgerCorruptError as exc:
            return [str(exc)]
        txs: list[Transaction] = []
        strays: list[str] = []
        for info in listed:
            seq = self._blocks.seq_of(info.key)
            if seq is None:
                strays.append(f"{info.key!r} is in the ledger's folder but not a transaction")
            elif seq == len(txs) + 1:
                txs.extend(blocks[seq].transactions)
            else:
                where = "after a gap" if seq > len(txs) + 1 else "inside the block before it"
                strays.append(
                    f"{info.key!r} is in the ledger's folder but transaction {seq} {where}"
                )
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
        """
        # Correctness needs no lock: the conditional create decides. But SeaweedFS makes each
        # extra concurrent create of one key wait about a second longer for its 412, so tasks of
        # this process take turns writing blocks rather than collide; whoever has the turn writes
        # everything waiting, and only other processes race us.
        request = _Request(build, max_attempts)
        self._waiting.append(request)
        try:
            while request.outcome is None:
                async with self._turn:
                    if request.outcome is None:
                        await self._write_block()
        except BaseException:
            if request in self._waiting:  # cancelled before a block took it: never written
                self._waiting.remove(request)
            raise
        return request.result()

    async def _write_block(self) -> None:
        """Take the waiting transactions (up to MAX_BLOCK) into one block, and answer each; while
        the block loses the race, try it again (after a pause, against the newer state)."""
        requests = self._waiting[:MAX_BLOCK]
        del self._waiting[:MAX_BLOCK]
        budget = min(request.max_attempts - request.losses for request in requests)
        read = not self._read_once  # the first try goes after the state held, if it is the store's

        async def attempt() -> list[Outcome] | None:
            nonlocal read
            outcomes = await self._try_block(requests, read=read)
            read = True  # it lost: read what won
            return outcomes

        outcomes: list[Outcome]
        try:
            outcomes = await until_won(attempt, budget, _OutOfAttemptsError)
        except _OutOfAttemptsError:  # those out of attempts give up; the others wait for a turn
            for request in requests:
                if request.losses >= request.max_attempts:
                    request.outcome = LedgerConflictError(
                        "still losing the race to append to the ledger after "
                        f"{request.max_attempts} attempts; too many writers at once, retry later"
                    )
            self._waiting[:0] = [request for request in requests if request.outcome is None]
            return
        except Exception as exc:  # the store failed: every transaction of the block shares it
            outcomes = [exc] * len(requests)
        except BaseException:  # cancelled: they wait for the next turn (and are checked again)
            self._waiting[:0] = requests
            raise
        for request, outcome in zip(requests, outcomes, strict=True):
            request.outcome = outcome

    async def _try_block(self, requests: list[_Request], *, read: bool) -> list[Outcome] | None:
        """Check each request against the state (`read` from the store, else the one held) as
        the ones before it leave it, and append those the rules allow as one block; each one's
        outcome, or None if the block lost."""
        batch = Batch(await self.state() if read else self._state)
        outcomes = [await self._check(request.build, batch) for request in requests]
        if not read and any(isinstance(outcome, Exception) for outcome in outcomes):
            return await self._try_block(requests, read=True)  # refused on what may be stale
        if batch.transactions:
            block = Block(transactions=tuple(batch.transactions))
            if not await self._blocks.append(block.first, block):
                LEDGER_LOST_RACES.inc()
                for request in requests:
                    request.losses += 1
                return None
            LEDGER_APPENDS.inc(len(block.transactions))
            self._remember(batch.state(), [block])
        return outcomes

    async def _check(self, build: Builder, batch: Batch) -> Outcome:
        """`build`'s transaction posted to `batch`; or the one already stored (or posted to the
        batch) if it is a retry; or why not, for its caller alone."""
        try:
            draft = build(batch.view())
            done = batch.view().tx_ids.get(draft.tx_id)
            if done is not None:
                existing = batch.posted(done)
                if existing is None:
                    existing = await self._stored(done)
                if same_operation(existing, draft):
                    return existing
                # Not the same: `post` refuses it with the specific reason.
            return batch.post(draft)
        except Exception as exc:  # a refusal, or a failure of this transaction alone
            return exc

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
