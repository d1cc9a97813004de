"""The ledger store on the in-memory store: round trips, idempotence, refusals, corruption and
lost races on demand.

Racing ledgers on separate clients of a real S3 server: tests/integration/test_ledger.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from functools import partial

import anyio
import pytest

from orchestrator.core.ledger_rules import ACCESS, EXTERNAL, HELD, deposit, fold, hold
from orchestrator.errors import (
    AlreadySettledError,
    ChequeAlreadyCashedError,
    DuplicateTransactionError,
    InsufficientFundsError,
    LedgerConflictError,
    LedgerCorruptError,
    ObjectStoreError,
    UnknownHoldError,
)
from orchestrator.store.base import ObjectStore
from orchestrator.store.ledger import Ledger
from schemas.ledger import Transaction, TransactionDraft
from tests._forwarding import CountingStore, ForwardingStore


def uid() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def root(prefix: str) -> str:
    return f"{prefix}ledger/"


@pytest.fixture
def ledger(store: ObjectStore, root: str) -> Ledger:
    return Ledger(store, root)


class RivalStore(ForwardingStore):
    """Before each conditional create, lets a rival append its transaction first: a lost race on
    demand, with the store's own conditional create doing the refusing."""

    def __init__(self, store: ObjectStore, rival: Ledger, drafts: list[TransactionDraft]) -> None:
        super().__init__(store)
        self._rival = rival
        self.drafts = drafts

    async def put_if_absent(self, key: str, data: bytes) -> str:
        if self.drafts:
            await self._rival.commit(self.drafts.pop(0))
        return await super().put_if_absent(key, data)


# --- one writer --------------------------------------------------------------------------------


async def test_deposit_hold_settle_round_trip(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    job, cheque = uid(), uid()
    written = [
        await ledger.deposit("alice", "10"),
        await ledger.hold(job, cheque, "alice", "4"),
        await ledger.settle(job, "1.5"),
    ]
    assert [tx.kind for tx in written] == ["deposit", "hold", "settle"]
    assert [info.key for info in await store.list(root)] == [
        f"{root}{seq:012d}.json" for seq in (1, 2, 3)
    ]
    assert await ledger.read() == written
    assert await ledger.read(after=2) == written[2:]
    assert await ledger.read(after=3) == []

    assert await ledger.balance("alice") == Decimal("8.5")
    assert await ledger.balance(ACCESS) == Decimal("1.5")
    assert await ledger.balance(HELD) == 0
    assert await ledger.balance(EXTERNAL) == Decimal("-10")
    assert await ledger.balance("bob") == 0  # never used
    rows = await ledger.statement("alice")
    assert [(row.kind, str(row.amount), str(row.balance)) for row in rows] == [
        ("deposit", "10.000000", "10.000000"),
        ("hold", "-4.000000", "6.000000"),
        ("settle", "2.500000", "8.500000"),
    ]
    assert await ledger.verify() == []

    fresh = Ledger(store, root)  # another process: the same state, from the store alone
    assert await fresh.state() == await ledger.state() == fold(written)


async def test_the_state_is_read_incrementally(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    for amount in (1, 2, 3):
        await ledger.deposit("alice", amount)
    async with CountingStore(store) as counting:
        watcher = Ledger(counting, root)
        assert (await watcher.state()).seq == 3
        await ledger.deposit("alice", 4)
        await ledger.deposit("alice", 5)
        counting.gets.clear()
        counting.lists.clear()
        state = await watcher.state()
    assert (state.seq, state.balances["alice"]) == (5, Decimal(15))
    # Only what came after the cached seq 3: one listing after entry 3, then entries 4 and 5.
    assert counting.lists == [(root, f"{root}{3:012d}.json")]
    assert counting.gets == [f"{root}{seq:012d}.json" for seq in (4, 5)]


async def test_a_ledger_that_has_read_appends_without_reading(
    store: ObjectStore, root: str
) -> None:
    await Ledger(store, root).deposit("alice", 10)
    async with CountingStore(store) as counting:
        ledger = Ledger(counting, root)
        await ledger.deposit("alice", 1)  # just made, it knows nothing: it reads first, once
        assert counting.lists == [(root, None)]
        job = uid()
        await ledger.hold(job, uid(), "alice", 4)
        settled = await ledger.settle(job, 1)
        assert await ledger.settle(job, 1) == settled  # a redelivered end: found in memory
    # Each append went after the state it held; the conditional create vouched that it was the
    # latest. Nothing it wrote was read back: the one block read is the one it found stored.
    assert (counting.lists, counting.gets) == ([(root, None)], [ledger.entry_key(1)])
    assert len(counting.creates) == 3
    assert await Ledger(store, root).balance("alice") == Decimal(10)


async def test_appends_from_one_ledger_take_turns(store: ObjectStore, root: str) -> None:
    # SeaweedFS answers each extra concurrent create of one key about a second later: tasks of
    # one process must not collide with each other, only with other processes.
    async with CountingStore(store) as counting:
        ledger = Ledger(counting, root)
        async with anyio.create_task_group() as tasks:
            for n in range(20):
                tasks.start_soon(ledger.deposit, "alice", n + 1)
        # No create of a key twice: the tasks never raced each other.
        assert len(counting.creates) == len(set(counting.creates))
        assert await ledger.balance("alice") == 210
        assert await ledger.verify() == []


async def test_a_refused_transaction_writes_nothing(ledger: Ledger, store: ObjectStore) -> None:
    await ledger.deposit("alice", "3")
    with pytest.raises(InsufficientFundsError, match=r"'alice' has 3\.000000"):
        await ledger.hold(uid(), uid(), "alice", "3.000001")
    with pytest.raises(UnknownHoldError):
        await ledger.settle(uid(), 0)
    assert len(await ledger.read()) == 1


# --- idempotence -------------------------------------------------------------------------------


async def test_a_retried_hold_or_settle_appends_nothing(ledger: Ledger) -> None:
    job, cheque = uid(), uid()
    await ledger.deposit("alice", "10")
    held = await ledger.hold(job, cheque, "alice", "4")
    await ledger.deposit("bob", "1")  # the retry is not the last transaction
    assert await ledger.hold(job, cheque, "alice", "4") == held
    settled = await ledger.settle(job, "1")
    assert await ledger.settle(job, "1") == settled
    assert await ledger.hold(job, cheque, "alice", "4") == held  # even once settled
    assert len(await ledger.read()) == 4

    # The same ids for another movement are no retry: refused for what they are.
    with pytest.raises(AlreadySettledError):
        await ledger.settle(job, "2")
    with pytest.raises(ChequeAlreadyCashedError):
        await ledger.hold(job, cheque, "alice", "5")
    assert len(await ledger.read()) == 4
    assert await ledger.balance("alice") == Decimal(9)


async def test_a_deposit_with_a_tx_id_is_made_once(ledger: Ledger) -> None:
    reference = uid()
    first = await ledger.deposit("alice", "2.5", tx_id=reference)
    assert await ledger.deposit("alice", "2.5", tx_id=reference) == first
    with pytest.raises(DuplicateTransactionError, match=f"{reference} is already transaction 1"):
        await ledger.deposit("alice", "3", tx_id=reference)
    await ledger.deposit("alice", "2.5")  # no tx id: a new deposit each time
    assert await ledger.balance("alice") == Decimal(5)


# --- corruption ----------------------------------------------------------------------------------


async def test_an_unreadable_entry_is_reported(ledger: Ledger, store: ObjectStore) -> None:
    await ledger.deposit("alice", 1)
    await store.put(ledger.entry_key(2), b"{not json")
    with pytest.raises(LedgerCorruptError, match=r"000000000002\.json' is not a valid transaction"):
        await ledger.read()
    (problem,) = await ledger.verify()
    assert "is not a valid transaction" in problem


async def test_an_entry_under_the_wrong_key_is_reported(ledger: Ledger, store: ObjectStore) -> None:
    first = await ledger.deposit("alice", 1)
    await store.put(ledger.entry_key(2), first.model_dump_json().encode())
    with pytest.raises(LedgerCorruptError, match="holds transaction 1, not 2"):
        await ledger.state()


async def test_an_altered_stored_balance_is_caught(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    await ledger.deposit("alice", 5)
    second = await ledger.deposit("alice", 1)
    forged = Transaction.model_validate(
        second.model_dump() | {"balances_after": {"alice": "600", EXTERNAL: "-6"}}
    )
    await store.put(ledger.entry_key(2), forged.model_dump_json().encode())
    with pytest.raises(LedgerCorruptError, match="breaks the ledger's rules: it records balances"):
        await Ledger(store, root).state()
    (problem,) = await Ledger(store, root).verify()
    assert problem.startswith("transaction 2 (deposit")


async def test_verify_reports_strays_and_entries_beyond_a_gap(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    for _ in range(3):
        await ledger.deposit("alice", 1)
    await store.delete(ledger.entry_key(2))
    await store.put(f"{root}notes.txt", b"hello")
    problems = await Ledger(store, root).verify()
    assert problems == [
        f"{ledger.entry_key(3)!r} is in the ledger's folder but transaction 3 after a gap",
        f"'{root}notes.txt' is in the ledger's folder but not a transaction",
    ]


async def test_a_stray_or_a_gap_is_refused_by_reads(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    for _ in range(3):
        await ledger.deposit("alice", 1)
    await store.put(f"{root}notes.txt", b"hello")
    with pytest.raises(LedgerCorruptError, match=r"notes\.txt' is in the ledger's folder but no"):
        await Ledger(store, root).state()
    await store.delete(f"{root}notes.txt")
    await store.delete(ledger.entry_key(2))
    with pytest.raises(LedgerCorruptError, match="after a gap: no transaction 2"):
        await Ledger(store, root).read()


# --- lost races, on demand -----------------------------------------------------------------------


async def test_a_lost_race_rereads_and_appends_next(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    await ledger.deposit("alice", 10)
    async with RivalStore(store, ledger, [deposit("bob", 1)]) as racing:
        ours = await Ledger(racing, root).hold(uid(), uid(), "alice", 4)
    assert ours.seq == 3
    assert [tx.kind for tx in await ledger.read()] == ["deposit", "deposit", "hold"]


async def test_a_lost_race_to_the_same_cheque_is_refused(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    await ledger.deposit("alice", 10)
    cheque = uid()
    rival = hold(uid(), cheque, "alice", 4)
    async with RivalStore(store, ledger, [rival]) as racing:
        with pytest.raises(ChequeAlreadyCashedError, match=f"for job {rival.job_uid}"):
            await Ledger(racing, root).hold(uid(), cheque, "alice", 4)
    assert await ledger.balance("alice") == 6
    assert len(await ledger.read()) == 2


async def test_a_lost_race_that_spends_the_money_is_refused(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    await ledger.deposit("alice", 10)
    async with RivalStore(store, ledger, [hold(uid(), uid(), "alice", 7)]) as racing:
        with pytest.raises(InsufficientFundsError, match=r"'alice' has 3\.000000"):
            await Ledger(racing, root).hold(uid(), uid(), "alice", 4)
    assert await ledger.verify() == []


async def test_a_lost_race_with_our_own_transaction_returns_it(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    # As when our write landed but its reply was lost and the client retried.
    await ledger.deposit("alice", 10)
    mine = hold(uid(), uid(), "alice", 4)
    async with RivalStore(store, ledger, [mine]) as racing:
        found = await Ledger(racing, root).commit(mine)
    assert found.tx_id == mine.tx_id
    assert len(await ledger.read()) == 2


async def test_always_losing_gives_up_after_max_attempts(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    rivals = [deposit("bob", 1) for _ in range(3)]
    async with RivalStore(store, ledger, rivals) as racing:
        with pytest.raises(LedgerConflictError, match="after 3 attempts"):
            await Ledger(racing, root).append(lambda _: deposit("alice", 1), max_attempts=3)
    assert [tx.balances_after.get("alice") for tx in await ledger.read()] == [None] * 3


# --- group commit --------------------------------------------------------------------------------


class GatedStore(CountingStore):
    """Holds the first conditional create until `opened` is set: while that block is in flight,
    whatever else is submitted queues for the next one."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store)
        self.opened = anyio.Event()

    async def put_if_absent(self, key: str, data: bytes) -> str:
        if not self.creates:
            await self.opened.wait()
        return await super().put_if_absent(key, data)


Call = Callable[[], Awaitable[Transaction]]


async def at_once(calls: Sequence[Call]) -> list[Transaction | Exception]:
    """Run `calls` at once: what each returned or raised."""
    outcomes: list[Transaction | Exception] = []

    async def one(index: int) -> None:
        try:
            outcomes[index] = await calls[index]()
        except Exception as exc:
            outcomes[index] = exc

    outcomes.extend(ValueError("not run") for _ in calls)
    async with anyio.create_task_group() as tasks:
        for index in range(len(calls)):
            tasks.start_soon(one, index)
    return outcomes


async def in_one_block(gated: GatedStore, ledger: Ledger, calls: Sequence[Call]) -> list[object]:
    """Run `calls` at once while a deposit's block is held in flight, so that they all go into
    the next block together: what each returned or raised."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ledger.deposit, "zed", 1)
        await anyio.wait_all_tasks_blocked()  # the deposit's block waits at the gate
        outcomes: list[object] = []

        async def run() -> None:
            outcomes.extend(await at_once(calls))

        tasks.start_soon(run)
        await anyio.wait_all_tasks_blocked()  # every call waits for the turn
        gated.opened.set()
    return outcomes


async def test_transactions_submitted_at_once_share_a_block(store: ObjectStore, root: str) -> None:
    async with CountingStore(store) as counting:
        ledger = Ledger(counting, root)
        calls = [partial(ledger.deposit, "alice", n) for n in range(1, 51)]
        written = await at_once(calls)
        assert len(counting.creates) <= 2  # all in one block, or the first alone, then the rest
    stored = await ledger.read()
    assert [tx.seq for tx in stored] == list(range(1, 51))
    assert sorted(written, key=lambda tx: getattr(tx, "seq", 0)) == stored  # each its own
    assert len(await store.list(root)) == len(counting.creates)
    assert await ledger.balance("alice") == sum(range(1, 51))
    assert await ledger.verify() == []
    assert await Ledger(store, root).state() == await ledger.state()


async def test_a_refusal_in_a_block_reaches_only_its_caller(store: ObjectStore, root: str) -> None:
    job, cheque = uid(), uid()
    async with GatedStore(store) as gated:
        ledger = Ledger(gated, root)
        outcomes = await in_one_block(
            gated,
            ledger,
            [
                lambda: ledger.deposit("alice", 10),
                lambda: ledger.hold(job, cheque, "alice", 6),
                lambda: ledger.hold(uid(), uid(), "alice", 6),  # alice has 4 left by then
                lambda: ledger.hold(uid(), cheque, "alice", 1),  # cashed just before
                lambda: ledger.settle(uid(), 0),  # never held
                lambda: ledger.settle(job, "1.5"),  # held earlier in this very block
                lambda: ledger.hold(job, cheque, "alice", 6),  # a retry of the hold
                lambda: ledger.deposit("bob", 2),
            ],
        )
        assert len(gated.creates) == 2  # the held deposit's block, then one for them all
    deposited, held, overdraft, cashed, unknown, settled, again, bob = outcomes
    assert isinstance(overdraft, InsufficientFundsError)
    assert overdraft.balance == 4
    assert isinstance(cashed, ChequeAlreadyCashedError)
    assert cashed.job_uid == job
    assert isinstance(unknown, UnknownHoldError)
    assert again == held
    assert [deposited, held, settled, bob] == (await ledger.read())[1:]
    block = json.loads(await store.get(ledger.entry_key(2)))
    assert [tx["seq"] for tx in block["transactions"]] == [2, 3, 4, 5]
    assert await ledger.balance("alice") == Decimal("8.5")
    assert await ledger.balance(ACCESS) == Decimal("1.5")
    assert await ledger.verify() == []


async def test_a_lost_race_checks_the_whole_block_again(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    await ledger.deposit("alice", 10)
    cheque = uid()
    async with RivalStore(store, ledger, [hold(uid(), cheque, "alice", 7)]) as racing:
        ours = Ledger(racing, root)
        outcomes = await at_once(
            [
                lambda: ours.hold(uid(), cheque, "alice", 1),  # the rival cashes it first
                lambda: ours.hold(uid(), uid(), "alice", 4),  # and leaves alice 3
                lambda: ours.deposit("bob", 1),
            ]
        )
    cashed, overdraft, deposited = outcomes
    assert isinstance(cashed, ChequeAlreadyCashedError)
    assert isinstance(overdraft, InsufficientFundsError)
    assert overdraft.balance == 3
    assert isinstance(deposited, Transaction)
    assert deposited.seq == 3
    assert [tx.kind for tx in await ledger.read()] == ["deposit", "hold", "deposit"]
    assert await ledger.verify() == []


async def test_each_transaction_in_a_losing_block_has_its_own_attempts(
    ledger: Ledger, store: ObjectStore, root: str
) -> None:
    async with RivalStore(store, ledger, [deposit("bob", 1), deposit("bob", 2)]) as racing:
        ours = Ledger(racing, root)
        impatient, patient = await at_once(
            [
                lambda: ours.append(lambda _: deposit("alice", 1), max_attempts=1),
                lambda: ours.append(lambda _: deposit("alice", 2), max_attempts=3),
            ]
        )
    assert isinstance(impatient, LedgerConflictError)
    assert "after 1 attempts" in str(impatient)
    assert isinstance(patient, Transaction)
    assert (patient.seq, patient.balances_after["alice"]) == (3, Decimal(2))


async def test_a_store_failure_reaches_every_transaction_of_its_block(
    store: ObjectStore, root: str
) -> None:
    class BrokenOnce(ForwardingStore):
        failed = False

        async def put_if_absent(self, key: str, data: bytes) -> str:
            if not self.failed:
                self.failed = True
                raise ObjectStoreError("the server went away")
            return await super().put_if_absent(key, data)

    async with BrokenOnce(store) as broken:
        ledger = Ledger(broken, root)
        outcomes = await at_once([partial(ledger.deposit, "alice", n) for n in (1, 2, 3)])
        assert all(isinstance(o, ObjectStoreError) for o in outcomes)
        assert await ledger.read() == []
        assert (await ledger.deposit("alice", 4)).seq == 1


async def test_a_caller_cancelled_while_waiting_writes_nothing(
    store: ObjectStore, root: str
) -> None:
    async with GatedStore(store) as gated:
        ledger = Ledger(gated, root)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ledger.deposit, "alice", 1)
            await anyio.wait_all_tasks_blocked()  # its block waits at the gate
            tasks.start_soon(ledger.deposit, "alice", 2)
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(ledger.deposit, "alice", 4)
                await anyio.wait_all_tasks_blocked()  # both wait for the next block
                doomed.cancel_scope.cancel()
            gated.opened.set()
    assert [tx.balances_after["alice"] for tx in await ledger.read()] == [1, 3]
    assert await ledger.verify() == []


async def test_blocks_read_as_transactions(store: ObjectStore, root: str) -> None:
    async with GatedStore(store) as gated:
        ledger = Ledger(gated, root)
        job, cheque = uid(), uid()
        await in_one_block(
            gated,
            ledger,
            [
                lambda: ledger.deposit("alice", 10),
                lambda: ledger.hold(job, cheque, "alice", 4),
                lambda: ledger.deposit("bob", 1),
            ],
        )
    await ledger.settle(job, 1)
    assert [info.key for info in await store.list(root)] == [
        ledger.entry_key(seq) for seq in (1, 2, 5)
    ]
    fresh = Ledger(store, root)  # another process: the same transactions from the store alone
    everything = await fresh.read()
    assert [tx.seq for tx in everything] == [1, 2, 3, 4, 5]
    assert await fresh.read(after=2) == everything[2:]  # from inside a block
    assert await fresh.read(after=3) == everything[3:]
    assert await fresh.read(after=5) == []
    held = everything[2]
    assert await fresh.find(held.tx_id) == held  # in the middle of its block
    assert [row.seq for row in await fresh.statement("alice")] == [2, 3, 5]
    assert await fresh.balance("alice") == 9
    assert await fresh.verify() == []


async def test_a_block_overlapping_the_one_before_is_reported(
    store: ObjectStore, root: str
) -> None:
    async with GatedStore(store) as gated:
        ledger = Ledger(gated, root)
        await in_one_block(gated, ledger, [lambda: ledger.deposit("alice", 1) for _ in range(2)])
    third = (await ledger.read())[2]
    await store.put(ledger.entry_key(3), third.model_dump_json().encode())  # inside block 2..3
    with pytest.raises(LedgerCorruptError, match="but transaction 3 is in the block before"):
        await Ledger(store, root).state()
    problems = await Ledger(store, root).verify()
    assert problems == [
        f"{ledger.entry_key(3)!r} is in the ledger's folder but transaction 3 inside the block "
        "before it"
    ]


async def test_a_rule_refusing_on_the_state_held_is_judged_again_on_the_latest(
    store: ObjectStore, root: str
) -> None:
    mine = Ledger(store, root)
    await mine.deposit("alice", 1)
    await Ledger(store, root).deposit("alice", 10)  # another writer; `mine` has not seen it
    held = await mine.hold(uid(), uid(), "alice", 5)  # too much on the state held, not on 11
    assert held.seq == 3
    assert await mine.balance("alice") == Decimal(6)
