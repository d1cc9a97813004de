"""The ledger store on a real SeaweedFS: ledgers on separate S3 clients racing their conditional
creates. The logic, lost races on demand included, is tested on the in-memory store in
tests/unit/test_ledger.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal

import anyio
import pytest

from orchestrator.core.ledger_rules import ACCESS, HELD
from orchestrator.errors import ChequeAlreadyCashedError, InsufficientFundsError, LedgerRuleError
from orchestrator.store.base import ObjectStore
from orchestrator.store.ledger import Ledger
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.ledger import Transaction
from tests.unit.test_ledger import uid

pytestmark = pytest.mark.integration


@pytest.fixture
def root(prefix: str) -> str:
    return f"{prefix}ledger/"


@pytest.fixture
def ledger(store: ObjectStore, root: str) -> Ledger:
    return Ledger(store, root)


async def race(
    ledgers: tuple[Ledger, Ledger], count: int, attempt: Callable[[Ledger, int], Awaitable[object]]
) -> list[object]:
    """Run `attempt(ledger, i)` for i in range(count) at once, alternating the two ledgers; what
    each returned or raised (a LedgerRuleError)."""
    outcomes: list[object] = [None] * count

    async def one(i: int) -> None:
        try:
            outcomes[i] = await attempt(ledgers[i % 2], i)
        except LedgerRuleError as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tasks:
        for i in range(count):
            tasks.start_soon(one, i)
    return outcomes


async def test_twenty_holds_of_one_cheque_across_two_ledgers_cash_it_once(
    seaweed: LocalSeaweed, ledger: Ledger, root: str
) -> None:
    await ledger.deposit("alice", 100)
    cheque = uid()
    async with S3ObjectStore(seaweed.settings) as other_store:
        ledgers = (ledger, Ledger(other_store, root))
        outcomes = await race(
            ledgers, 20, lambda writer, _i: writer.hold(uid(), cheque, "alice", "7.5")
        )
    won = [o for o in outcomes if isinstance(o, Transaction)]
    refused = [o for o in outcomes if isinstance(o, ChequeAlreadyCashedError)]
    assert (len(won), len(refused)) == (1, 19)
    assert {exc.job_uid for exc in refused} == {won[0].job_uid}
    assert await ledger.balance("alice") == Decimal("92.5")  # debited once
    assert await ledger.balance(HELD) == Decimal("7.5")
    assert len(await ledger.read()) == 2
    assert await ledger.verify() == []


async def test_one_hold_delivered_ten_times_at_once_appends_once(
    seaweed: LocalSeaweed, ledger: Ledger, root: str
) -> None:
    await ledger.deposit("alice", 10)
    job, cheque = uid(), uid()
    async with S3ObjectStore(seaweed.settings) as other_store:
        ledgers = (ledger, Ledger(other_store, root))
        outcomes = await race(ledgers, 10, lambda w, _i: w.hold(job, cheque, "alice", 3))
    assert all(isinstance(o, Transaction) for o in outcomes)
    assert len({o.tx_id for o in outcomes if isinstance(o, Transaction)}) == 1
    assert len(await ledger.read()) == 2
    assert await ledger.balance("alice") == 7


async def test_racing_holds_never_overdraw(
    seaweed: LocalSeaweed, ledger: Ledger, root: str
) -> None:
    await ledger.deposit("alice", "10")  # covers 6 holds of 1.6, not 20
    async with S3ObjectStore(seaweed.settings) as other_store:
        ledgers = (ledger, Ledger(other_store, root))
        outcomes = await race(ledgers, 20, lambda w, _i: w.hold(uid(), uid(), "alice", "1.6"))
    won = [o for o in outcomes if isinstance(o, Transaction)]
    refused = [o for o in outcomes if isinstance(o, InsufficientFundsError)]
    assert (len(won), len(refused)) == (6, 14)
    assert all(exc.balance == Decimal("0.4") for exc in refused[-1:])
    assert await ledger.balance("alice") == Decimal("0.4")
    assert await ledger.balance(HELD) == Decimal("9.6")
    assert await ledger.verify() == []


async def test_racing_jobs_reconcile(seaweed: LocalSeaweed, ledger: Ledger, root: str) -> None:
    """Thirty jobs, each held, then settled (charged in part, in full, or refunded), from both
    ledgers at once while deposits land: every balance reconciles and the ledger verifies."""
    users = ("alice", "bob", "carol")
    for user in users:
        await ledger.deposit(user, 50)
    charges = [Decimal(i % 4) / 2 for i in range(30)]  # 0 (full refund) .. 1.5 (the whole hold)

    async def job(writer: Ledger, i: int) -> Transaction:
        job_uid = uid()
        await writer.hold(job_uid, uid(), users[i % 3], "1.5")
        await writer.deposit(users[i % 3], "0.1")
        return await writer.settle(job_uid, charges[i])

    async with S3ObjectStore(seaweed.settings) as other_store:
        ledgers = (ledger, Ledger(other_store, root))
        outcomes = await race(ledgers, 30, job)
    assert all(isinstance(o, Transaction) for o in outcomes)

    for n, user in enumerate(users):
        spent = sum(charges[n::3], Decimal(0))
        assert await ledger.balance(user) == 50 + Decimal("0.1") * 10 - spent
    assert await ledger.balance(ACCESS) == sum(charges, Decimal(0))
    assert await ledger.balance(HELD) == 0
    assert len(await ledger.read()) == 3 + 30 * 3
    assert await ledger.verify() == []
    assert (await ledger.state()).holds == {}


async def test_two_ledgers_racing_in_blocks_cash_each_cheque_once_and_never_overdraw(
    seaweed: LocalSeaweed, store: ObjectStore, ledger: Ledger, root: str
) -> None:
    """Two ledgers with a hundred transactions in flight each, so each writes blocks of many:
    ten cheques presented four times (from both), holds worth four times what alice has, and
    deposits. Each cheque is cashed once, alice ends at zero exactly, nothing is lost."""
    await ledger.deposit("alice", "30")  # covers 30 holds of 1, not the 120 presented
    await ledger.deposit("carol", "100")
    cheques = [uid() for _ in range(10)]

    def attempt(writer: Ledger, i: int) -> Awaitable[Transaction]:
        if i < 40:  # cheque i // 4, presented by both ledgers (race alternates them)
            return writer.hold(uid(), cheques[i // 4], "carol", 1)
        if i < 160:
            return writer.hold(uid(), uid(), "alice", 1)
        return writer.deposit("bob", "0.5")

    async with S3ObjectStore(seaweed.settings) as other_store:
        ledgers = (ledger, Ledger(other_store, root))
        outcomes = await race(ledgers, 200, attempt)

    presented, spending, deposits = outcomes[:40], outcomes[40:160], outcomes[160:]
    cashed = [o for o in presented if isinstance(o, Transaction)]
    assert sorted(tx.cheque_id or "" for tx in cashed) == sorted(cheques)
    assert all(isinstance(o, ChequeAlreadyCashedError) for o in presented if o not in cashed)
    held = [o for o in spending if isinstance(o, Transaction)]
    assert len(held) == 30  # every unit alice had, not one more
    assert all(isinstance(o, InsufficientFundsError) for o in spending if o not in held)
    assert all(isinstance(o, Transaction) for o in deposits)
    assert await ledger.balance("alice") == 0
    assert await ledger.balance("bob") == 20
    assert await ledger.balance(HELD) == 40

    stored = await ledger.read()
    assert len(stored) == 2 + 10 + 30 + 40
    won = {o.tx_id for o in outcomes if isinstance(o, Transaction)}
    assert {tx.tx_id for tx in stored[2:]} == won
    assert len(await store.list(root)) < len(stored) / 4  # blocks of several transactions
    assert await ledger.verify() == []
