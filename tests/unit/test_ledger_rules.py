"""The ledger's pure rules: money, accounts, builders, each refusal, fold, verify, statements."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from decimal import Decimal

import pytest
from pydantic import ValidationError

from orchestrator.core.ledger_rules import (
    ACCESS,
    EXTERNAL,
    HELD,
    AccountKind,
    Batch,
    account_kind,
    apply,
    deposit,
    fold,
    hold,
    hold_tx_id,
    limit_of,
    post,
    same_operation,
    settle,
    settle_tx_id,
    statement,
    user_account,
    verify,
)
from orchestrator.errors import (
    AlreadySettledError,
    ChequeAlreadyCashedError,
    DuplicateHoldError,
    DuplicateTransactionError,
    InsufficientFundsError,
    InvalidAccountError,
    InvalidAmountError,
    LedgerRuleError,
    LedgerSequenceError,
    MalformedTransactionError,
    SettlementMismatchError,
    UnbalancedTransactionError,
    UnknownHoldError,
)
from schemas.ledger import (
    Block,
    LedgerState,
    Note,
    Transaction,
    TransactionDraft,
    to_money,
)

Step = TransactionDraft | Callable[[LedgerState], TransactionDraft]


def book(*steps: Step, state: LedgerState | None = None) -> tuple[list[Transaction], LedgerState]:
    """Post each step in turn (a draft, or a builder given the state so far)."""
    current = state or LedgerState()
    txs: list[Transaction] = []
    for step in steps:
        draft = step if isinstance(step, TransactionDraft) else step(current)
        tx, current = post(current, draft)
        txs.append(tx)
    return txs, current


def uid() -> str:
    return uuid.uuid4().hex


def d(text: str) -> Decimal:
    return Decimal(text)


JOB, JOB2, CHEQUE, CHEQUE2 = uid(), uid(), uid(), uid()


def funded(amount: str = "10") -> tuple[list[Transaction], LedgerState]:
    return book(deposit("alice", amount))


def held(amount: str = "4") -> tuple[list[Transaction], LedgerState]:
    return book(deposit("alice", "10"), hold(JOB, CHEQUE, "alice", amount))


def tampered(tx: Transaction, **changes: object) -> Transaction:
    """`tx` with `changes`, revalidated, as if someone edited the stored JSON."""
    return Transaction.model_validate(tx.model_dump() | changes)


# --- money ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("12.5", "12.500000"),
        (7, "7.000000"),
        (Decimal("0.1"), "0.100000"),
        ("1e2", "100.000000"),
        # Six places, rounded half to even: exact halves go to the even digit.
        ("0.0000005", "0.000000"),
        ("0.0000015", "0.000002"),
        ("0.0000025", "0.000002"),
        ("2.1234566", "2.123457"),
        ("-0.0000001", "0.000000"),  # no negative zero
        ("-3.25", "-3.250000"),
    ],
)
def test_money_has_six_places_rounded_half_even(given: str | int | Decimal, expected: str) -> None:
    value = to_money(given)
    assert value == Decimal(expected)
    assert str(value) == expected


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        (0.1, "must not be a float"),
        (1.0, "must not be a float"),
        ("NaN", "finite"),
        ("-Infinity", "finite"),
        ("sNaN", "finite"),
        ("ten", "not a decimal number"),
        (True, "not bool"),
        (None, "not NoneType"),
        ("1e18", "too large"),
    ],
)
def test_money_refuses_floats_non_finite_and_junk(given: object, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        to_money(given)


def test_money_travels_as_a_json_string_and_a_json_number_float_is_refused() -> None:
    note = Note(account="alice", amount="1.5", side="credit")
    assert json.loads(note.model_dump_json())["amount"] == "1.500000"
    assert note.model_dump()["amount"] == Decimal("1.500000")  # Python keeps the Decimal
    assert Note.model_validate_json(note.model_dump_json()) == note
    assert Note.model_validate_json('{"account":"a","amount":3,"side":"debit"}').amount == 3
    with pytest.raises(ValidationError, match="must not be a float"):
        Note.model_validate_json('{"account":"a","amount":3.5,"side":"debit"}')


@pytest.mark.parametrize("amount", ["0", "-1", "0.0000004"])
def test_a_note_moves_a_positive_amount(amount: str) -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        Note(account="alice", amount=amount, side="debit")


# --- the transaction model ------------------------------------------------------------------------


def notes(*moves: tuple[str, str, str]) -> tuple[Note, ...]:
    return tuple(Note.model_validate({"account": a, "amount": m, "side": s}) for a, m, s in moves)


def test_a_transaction_must_balance_and_have_both_sides() -> None:
    with pytest.raises(ValidationError, match=r"debits total 5\.000000 but credits total 4"):
        TransactionDraft(
            kind="deposit", notes=notes((EXTERNAL, "5", "debit"), ("alice", "4", "credit"))
        )
    with pytest.raises(ValidationError, match="at least one debit and one credit"):
        TransactionDraft(
            kind="deposit", notes=notes(("alice", "5", "credit"), ("bob", "5", "credit"))
        )


def test_a_transaction_reports_exactly_the_accounts_it_touches() -> None:
    (tx,), _ = funded()
    with pytest.raises(ValidationError, match="cover exactly the accounts touched"):
        tampered(tx, balances_after={"alice": "10"})
    assert Transaction.model_validate_json(tx.model_dump_json()) == tx


# --- accounts -------------------------------------------------------------------------------------


def test_account_kinds_and_limits() -> None:
    assert account_kind(ACCESS) is AccountKind.REVENUE
    assert account_kind(HELD) is AccountKind.ESCROW
    assert account_kind(EXTERNAL) is AccountKind.EXTERNAL
    assert account_kind("alice") is AccountKind.USER
    assert not limit_of("alice").allows(d("-0.000001"))
    assert limit_of("alice").allows(d("0"))
    assert not limit_of(HELD).allows(d("-1"))
    assert limit_of(EXTERNAL).allows(d("-1e17"))


@pytest.mark.parametrize("name", ["", "Alice", "-x", "a/b", "x" * 65])
def test_a_bad_account_name_is_refused(name: str) -> None:
    with pytest.raises(InvalidAccountError, match="not an account name"):
        account_kind(name)


@pytest.mark.parametrize("name", [ACCESS, HELD, EXTERNAL])
def test_a_service_account_is_no_user_account(name: str) -> None:
    with pytest.raises(InvalidAccountError, match="one of the service's accounts"):
        user_account(name)
    with pytest.raises(InvalidAccountError):
        deposit(name, 5)
    with pytest.raises(InvalidAccountError):
        hold(JOB, CHEQUE, name, 5)


# --- builders -------------------------------------------------------------------------------------


def test_a_deposit_moves_money_from_external_to_the_user() -> None:
    (tx,), state = book(deposit("alice", "10.25"))
    assert (tx.seq, tx.kind, tx.job_uid, tx.cheque_id) == (1, "deposit", None, None)
    assert tx.balances_after == {EXTERNAL: d("-10.25"), "alice": d("10.25")}
    assert state.balances == tx.balances_after
    assert state.tx_ids == {tx.tx_id: 1}
    assert deposit("alice", 1).tx_id != deposit("alice", 1).tx_id  # each call a new deposit
    assert deposit("alice", 1, tx_id=JOB).tx_id == JOB


def test_a_hold_moves_the_payers_money_into_held() -> None:
    txs, state = held("4")
    assert txs[1].tx_id == hold_tx_id(JOB, CHEQUE)
    assert txs[1].balances_after == {"alice": d("6"), HELD: d("4")}
    assert state.holds[JOB].model_dump() == {
        "amount": d("4"),
        "payer": "alice",
        "cheque_id": CHEQUE,
    }
    assert state.cheques == {CHEQUE: JOB}
    assert hold(JOB, CHEQUE, "alice", 4).tx_id == hold(JOB, CHEQUE, "bob", 9).tx_id
    assert hold(JOB, CHEQUE2, "alice", 4).tx_id != hold(JOB, CHEQUE, "alice", 4).tx_id


@pytest.mark.parametrize(
    ("charge", "access", "refund_notes"),
    [("1.5", "1.500000", 1), ("0", None, 1), ("4", "4.000000", 0)],
)
def test_a_settle_charges_access_and_refunds_the_rest(
    charge: str, access: str | None, refund_notes: int
) -> None:
    _, state = held("4")
    txs, after = book(lambda s: settle(JOB, s, charge), state=state)
    tx = txs[0]
    assert tx.tx_id == settle_tx_id(JOB)
    assert (tx.kind, tx.job_uid, tx.cheque_id) == ("settle", JOB, CHEQUE)
    credited = {n.account: n.amount for n in tx.notes if n.side == "credit"}
    assert credited.get(ACCESS) == (None if access is None else d(access))
    assert len([n for n in tx.notes if n.account == "alice"]) == refund_notes
    assert after.balances["alice"] == d("10") - d(charge)
    assert after.balances[HELD] == 0
    assert after.balances.get(ACCESS, d("0")) == d(charge)
    assert (after.holds, list(after.settled)) == ({}, [JOB])


def test_a_charge_is_rounded_half_even_to_the_ledgers_places() -> None:
    _, state = held("4")
    assert settle(JOB, state, "1.0000005").memo == "charge 1.000000, refund 3.000000"
    assert settle(JOB, state, d("1.0000015")).memo == "charge 1.000002, refund 2.999998"


@pytest.mark.parametrize("charge", ["4.000001", "-0.5"])
def test_a_charge_outside_the_hold_is_refused(charge: str) -> None:
    _, state = held("4")
    with pytest.raises(SettlementMismatchError, match=r"between 0 and the 4\.000000 held"):
        settle(JOB, state, charge)


def test_settling_a_job_never_held_is_refused_by_the_builder() -> None:
    _, state = funded()
    with pytest.raises(UnknownHoldError, match="nothing was held"):
        settle(JOB, state, 0)


@pytest.mark.parametrize(
    ("build", "complaint"),
    [
        (lambda: deposit("alice", 0), "a deposit must be more than 0, not 0.000000"),
        (lambda: deposit("alice", "-5"), "a deposit must be more than 0"),
        (lambda: deposit("alice", "0.0000004"), "more than 0, not 0.000000"),  # rounds to 0
        (lambda: hold(JOB, CHEQUE, "alice", 0), "a hold must be more than 0"),
        (lambda: deposit("alice", 2.5), "must not be a float"),  # type: ignore[arg-type]
        (lambda: hold(JOB, CHEQUE, "alice", "Infinity"), "finite"),
        (lambda: settle(JOB, held()[1], "one"), "not a decimal number"),
    ],
)
def test_a_builder_refuses_what_is_no_amount(
    build: Callable[[], TransactionDraft], complaint: str
) -> None:
    with pytest.raises(InvalidAmountError, match=complaint):
        build()


def test_a_retry_is_the_same_operation_a_different_movement_is_not() -> None:
    txs, state = held("4")
    assert same_operation(txs[1], hold(JOB, CHEQUE, "alice", "4"))
    assert not same_operation(txs[1], hold(JOB, CHEQUE, "alice", "5"))
    (settled,), after = book(lambda s: settle(JOB, s, 1), state=state)
    assert same_operation(settled, settle(JOB, after, 1))  # built again once settled: same
    assert not same_operation(settled, settle(JOB, after, 2))


# --- every refusal --------------------------------------------------------------------------------


def test_an_unbalanced_transaction_is_refused() -> None:
    # Built without validation (the model refuses it otherwise): the rules check it themselves.
    (tx,), _ = funded()
    bad = tx.model_copy(
        update={"notes": notes((EXTERNAL, "10", "debit"), ("alice", "9", "credit"))}
    )
    with pytest.raises(UnbalancedTransactionError, match=r"debits total 10\.000000 but credits"):
        apply(LedgerState(), bad)
    one_sided = tx.model_copy(update={"notes": notes(("alice", "9", "credit"))})
    with pytest.raises(UnbalancedTransactionError, match="needs a debit and a credit"):
        apply(LedgerState(), one_sided)


def test_an_overdraft_is_refused_naming_account_balance_and_amount() -> None:
    _, state = funded("10")
    with pytest.raises(
        InsufficientFundsError, match=r"'alice' has 10\.000000, too little for 10\.5"
    ) as e:
        post(state, hold(JOB, CHEQUE, "alice", "10.5"))
    assert (e.value.account, e.value.balance, e.value.amount) == ("alice", d("10"), d("10.5"))
    post(state, hold(JOB, CHEQUE, "alice", "10"))  # all of it is fine: the limit is 0


def test_a_cheque_cashed_twice_is_refused() -> None:
    _, state = held()
    with pytest.raises(ChequeAlreadyCashedError, match=f"cheque {CHEQUE} was already cashed") as e:
        post(state, hold(JOB2, CHEQUE, "alice", "1"))
    assert (e.value.cheque_id, e.value.job_uid) == (CHEQUE, JOB)


def test_a_second_hold_for_a_job_is_refused_even_once_settled() -> None:
    _, state = held()
    with pytest.raises(DuplicateHoldError, match=f"job {JOB} is already paid for"):
        post(state, hold(JOB, CHEQUE2, "alice", "1"))
    _, settled = book(lambda s: settle(JOB, s, 0), state=state)
    with pytest.raises(DuplicateHoldError):
        post(settled, hold(JOB, CHEQUE2, "alice", "1"))


def test_a_second_settle_is_refused() -> None:
    _, state = held()
    _, settled = book(lambda s: settle(JOB, s, 1), state=state)
    with pytest.raises(AlreadySettledError, match=f"job {JOB} was already settled"):
        post(settled, settle(JOB, settled, 1))


def test_a_settle_of_a_job_never_held_is_refused() -> None:
    _, state = held()
    draft = settle(JOB, state, 1).model_copy(update={"job_uid": JOB2})
    with pytest.raises(UnknownHoldError, match=f"job {JOB2}: nothing was held"):
        post(state, draft)


def settle_by_hand(*moves: tuple[str, str, str]) -> TransactionDraft:
    return TransactionDraft(kind="settle", job_uid=JOB, cheque_id=CHEQUE, notes=notes(*moves))


@pytest.mark.parametrize(
    ("moves", "complaint"),
    [
        # Releases less than the hold: the rest would stay in "held" for good (neither).
        ([(HELD, "3", "debit"), (ACCESS, "3", "credit")], "releases exactly the 4.000000 held"),
        # Charges and refunds more than was held (both), taking from the payer to do it.
        (
            [(HELD, "4", "debit"), ("alice", "1", "debit"), (ACCESS, "5", "credit")],
            "releases exactly",
        ),
        # Pays someone who is neither the service nor the payer.
        ([(HELD, "4", "debit"), ("mallory", "4", "credit")], "nowhere else"),
        # Refunds the payer twice over two notes.
        ([(HELD, "4", "debit"), ("alice", "2", "credit"), ("alice", "2", "credit")], "at most"),
    ],
)
def test_a_settle_must_release_the_hold_exactly(
    moves: list[tuple[str, str, str]], complaint: str
) -> None:
    _, state = held("4")
    with pytest.raises(SettlementMismatchError, match=complaint):
        post(state, settle_by_hand(*moves))


@pytest.mark.parametrize(
    ("draft", "complaint"),
    [
        (
            TransactionDraft(
                kind="deposit", notes=notes((HELD, "1", "debit"), ("bob", "1", "credit"))
            ),
            "a deposit moves money from 'external'",
        ),
        (
            TransactionDraft(
                kind="deposit", notes=notes((EXTERNAL, "1", "debit"), (ACCESS, "1", "credit"))
            ),
            "into one user account",
        ),
        (
            TransactionDraft(
                kind="hold",
                job_uid=JOB,
                notes=notes(("alice", "1", "debit"), (HELD, "1", "credit")),
            ),
            "names the job it is for and its cheque",
        ),
        (
            TransactionDraft(
                kind="hold",
                job_uid=JOB2,
                cheque_id=CHEQUE2,
                notes=notes(("alice", "1", "debit"), (ACCESS, "1", "credit")),
            ),
            "from the payer's account to 'held'",
        ),
        (
            TransactionDraft(
                kind="settle", notes=notes((HELD, "4", "debit"), (ACCESS, "4", "credit"))
            ),
            "names the job whose hold",
        ),
        (
            TransactionDraft(
                kind="settle",
                job_uid=JOB,
                cheque_id=CHEQUE2,
                notes=notes((HELD, "4", "debit"), (ACCESS, "4", "credit")),
            ),
            "names the cheque its hold cashed",
        ),
    ],
)
def test_a_kind_moving_the_wrong_accounts_is_refused(
    draft: TransactionDraft, complaint: str
) -> None:
    _, state = held("4")
    with pytest.raises(MalformedTransactionError, match=complaint):
        post(state, draft)


def test_a_tx_id_used_by_another_transaction_is_refused() -> None:
    _, state = book(deposit("alice", 5, tx_id=JOB))
    with pytest.raises(DuplicateTransactionError, match=f"{JOB} is already transaction 1"):
        post(state, deposit("alice", 6, tx_id=JOB))


def test_a_transaction_must_continue_the_sequence_and_its_balances() -> None:
    _, state = held()
    (nxt,), _ = book(deposit("alice", 1), state=state)
    with pytest.raises(LedgerSequenceError, match="the next seq is 3, not 4"):
        apply(state, tampered(nxt, seq=4))
    forged = tampered(nxt, balances_after={EXTERNAL: "-11", "alice": "100"})
    with pytest.raises(LedgerSequenceError, match=r"records balances alice=100\.000000"):
        apply(state, forged)


def test_a_refusal_changes_nothing() -> None:
    _, state = funded("10")
    before = state.model_copy(deep=True)
    with pytest.raises(LedgerRuleError):
        post(state, hold(JOB, CHEQUE, "alice", "11"))
    assert state == before
    post(state, hold(JOB, CHEQUE, "alice", "1"))
    assert state == before  # a success does not mutate its input either


def test_a_batch_posts_each_draft_on_the_state_the_ones_before_it_leave() -> None:
    _, state = funded("10")
    before = state.model_copy(deep=True)
    batch = Batch(state)
    first = batch.post(hold(JOB, CHEQUE, "alice", "6"))
    with pytest.raises(InsufficientFundsError, match=r"'alice' has 4\.000000"):
        batch.post(hold(JOB2, CHEQUE2, "alice", "5"))  # only after the first hold
    with pytest.raises(ChequeAlreadyCashedError):
        batch.post(hold(JOB2, CHEQUE, "alice", "1"))  # cashed by the first, in this batch
    assert batch.view().holds[JOB].amount == 6  # a builder sees the holds posted so far
    settled = batch.post(settle(JOB, batch.view(), "2"))
    assert batch.transactions == [first, settled]
    assert (first.seq, settled.seq, batch.first) == (2, 3, 2)
    assert (batch.posted(1), batch.posted(3)) == (None, settled)

    # The same as posting them one at a time, and the state it started from is untouched.
    txs, alone = book(hold(JOB, CHEQUE, "alice", "6"), lambda s: settle(JOB, s, "2"), state=state)
    assert [tx.balances_after for tx in txs] == [first.balances_after, settled.balances_after]
    assert batch.state() == alone
    assert state == before


def test_a_block_holds_consecutive_transactions_and_stores_one_as_itself() -> None:
    txs = history()
    block = Block(transactions=tuple(txs[2:5]))
    assert (block.first, block.last) == (3, 5)
    assert Block.model_validate_json(block.model_dump_json()) == block
    assert json.loads(block.model_dump_json())["transactions"][0]["seq"] == 3

    # A block of one is the transaction's own JSON: the layout from before blocks reads too.
    one = Block(transactions=(txs[0],))
    assert one.model_dump_json() == txs[0].model_dump_json()
    assert Block.model_validate_json(txs[0].model_dump_json()) == one
    with pytest.raises(ValidationError, match=r"consecutive transactions, not seqs \[3, 5\]"):
        Block(transactions=(txs[2], txs[4]))
    with pytest.raises(ValidationError, match="at least 1 item"):
        Block(transactions=())


# --- fold and verify ------------------------------------------------------------------------------


def history() -> list[Transaction]:
    """Two users, four jobs: charged in part, refunded in full, charged in full, still open."""
    jobs, cheques = [uid() for _ in range(4)], [uid() for _ in range(4)]
    txs, _ = book(
        deposit("alice", "10"),
        deposit("bob", "5.5"),
        hold(jobs[0], cheques[0], "alice", "3"),
        hold(jobs[1], cheques[1], "bob", "2"),
        lambda s: settle(jobs[0], s, "1.25"),
        hold(jobs[2], cheques[2], "alice", "4"),
        lambda s: settle(jobs[1], s, 0),
        lambda s: settle(jobs[2], s, "4"),
        hold(jobs[3], cheques[3], "bob", "1"),
    )
    return txs


def test_a_sound_history_verifies_and_folds_to_its_balances() -> None:
    txs = history()
    assert verify(txs) == []
    state = fold(txs)
    assert state.balances == {
        EXTERNAL: d("-15.5"),
        "alice": d("10") - d("1.25") - d("4"),
        "bob": d("4.5"),
        HELD: d("1"),
        ACCESS: d("5.25"),
    }
    assert sum(state.balances.values()) == 0
    assert (state.seq, len(state.holds), len(state.settled), len(state.cheques)) == (9, 1, 3, 4)
    assert fold(txs[5:], fold(txs[:5])) == state  # folding on from a state is the same
    for tx in txs:  # every stored balance is what the fold so far leaves
        assert {a: fold(txs[: tx.seq]).balances[a] for a in tx.balances_after} == tx.balances_after


def test_folding_a_tampered_history_raises() -> None:
    txs = history()
    txs[3] = tampered(txs[3], balances_after={"bob": "9", HELD: "5"})
    with pytest.raises(LedgerSequenceError):
        fold(txs)


def test_verify_reports_an_altered_stored_balance_and_nothing_else() -> None:
    txs = history()
    txs[4] = tampered(txs[4], balances_after={**txs[4].balances_after, ACCESS: "100"})
    problems = verify(txs)
    assert len(problems) == 1
    assert problems[0].startswith(f"transaction 5 (settle {txs[4].tx_id}): it records balances")


def test_verify_reports_an_altered_amount() -> None:
    txs = history()
    doubled = notes((EXTERNAL, "20", "debit"), ("alice", "20", "credit"))
    txs[0] = tampered(txs[0], notes=doubled)
    problems = verify(txs)
    assert problems[0].startswith("transaction 1 (deposit")
    assert "leaves alice=20.000000, external=-20.000000" in problems[0]


def test_verify_reports_a_second_settle_and_the_hold_it_overdraws() -> None:
    txs = history()
    again = tampered(txs[4], seq=10, tx_id=uid())
    problems = verify([*txs, again])
    assert any("transaction 10" in p and "already settled" in p for p in problems)
    assert any("'held' has" in p and "may not go below" in p for p in problems)


def test_verify_reports_a_cheque_cashed_twice_and_a_duplicate_tx_id() -> None:
    txs = history()
    second = txs[2]
    job = uid()
    replay = tampered(second, seq=10, job_uid=job, balances_after={"alice": "1.75", HELD: "4"})
    problems = verify([*txs, replay])
    assert any("transaction 10" in p and "was already cashed" in p for p in problems)
    assert any("transaction 10" in p and "is already transaction 3" in p for p in problems)


def test_verify_reports_a_gap_and_books_that_do_not_balance() -> None:
    txs = history()
    assert any("the next seq is 5, not 6" in p for p in verify(txs[:4] + txs[5:]))
    (tx,), _ = funded()
    lopsided = tx.model_copy(
        update={"notes": notes((EXTERNAL, "10", "debit"), ("alice", "12", "credit"))}
    )
    problems = verify([lopsided])
    assert any("debits total 10.000000 but credits total 12.000000" in p for p in problems)
    assert "the balances sum to 2.000000, not 0: the books do not balance" in problems


def test_verify_of_nothing_is_sound() -> None:
    assert verify([]) == []


# --- statements -----------------------------------------------------------------------------------


def test_a_statement_has_signed_amounts_and_running_balances() -> None:
    txs = history()
    rows = statement(txs, "alice")
    assert [(r.seq, r.kind, str(r.amount), str(r.balance)) for r in rows] == [
        (1, "deposit", "10.000000", "10.000000"),
        (3, "hold", "-3.000000", "7.000000"),
        (5, "settle", "1.750000", "8.750000"),
        (6, "hold", "-4.000000", "4.750000"),
    ]
    assert rows[-1].balance == fold(txs).balances["alice"]
    assert rows[1].job_uid == txs[2].job_uid
    assert rows[2].memo == "charge 1.250000, refund 1.750000"
    assert [str(r.balance) for r in statement(txs, ACCESS)] == ["1.250000", "5.250000"]
    assert statement(txs, "carol") == []
    with pytest.raises(InvalidAccountError):
        statement(txs, "Carol")
