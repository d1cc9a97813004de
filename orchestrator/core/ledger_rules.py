"""The ledger's rules as pure functions: accounts and their limits, what each kind of transaction
may move, the builders that make correct transactions, and the checks that refuse the rest.

No I/O here: the store (`orchestrator.store.ledger`) asks these functions before it writes anything,
and `verify` re-checks a whole stored history with the very same checks.

Sign convention: an account's balance is its credits minus its debits. A deposit debits
`external` and credits a user; a hold debits the payer and credits `held`; a settle debits `held`
and credits `access` (the charge) and the payer (the refund). Every transaction balances, so all
balances always sum to zero: `external`, the one account with no floor, goes negative by exactly
the money that has entered the system.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType

from pydantic import TypeAdapter, ValidationError

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
    ZERO,
    AccountName,
    Hold,
    LedgerState,
    Note,
    StatementRow,
    Transaction,
    TransactionDraft,
    TxKind,
    new_tx_id,
    to_money,
)

# --- accounts -------------------------------------------------------------------------------------

ACCESS = "access"  # the service's revenue: what completed jobs are charged
HELD = "held"  # escrow: value held for jobs that have not ended yet
EXTERNAL = "external"  # where deposits come from: the world outside the ledger


class AccountKind(StrEnum):
    USER = "user"
    REVENUE = "revenue"
    ESCROW = "escrow"
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class AccountLimit:
    """How low an account's balance may go; `floor` None: no limit at all."""

    floor: Decimal | None

    def allows(self, balance: Decimal) -> bool:
        return self.floor is None or balance >= self.floor


SERVICE_ACCOUNTS: Mapping[str, AccountKind] = MappingProxyType(
    {ACCESS: AccountKind.REVENUE, HELD: AccountKind.ESCROW, EXTERNAL: AccountKind.EXTERNAL}
)
"""The service's own accounts; every other valid name is a user's (so no user may take these)."""

LIMITS: Mapping[AccountKind, AccountLimit] = MappingProxyType(
    {
        AccountKind.USER: AccountLimit(ZERO),  # no credit: a user spends what they deposited
        AccountKind.REVENUE: AccountLimit(ZERO),
        AccountKind.ESCROW: AccountLimit(ZERO),  # never more released than was held
        AccountKind.EXTERNAL: AccountLimit(None),  # money entering the system
    }
)

_ACCOUNT_NAME: TypeAdapter[str] = TypeAdapter(AccountName)


def account_kind(name: str) -> AccountKind:
    """What kind of account `name` is; InvalidAccountError if it is no valid account name."""
    try:
        _ACCOUNT_NAME.validate_python(name)
    except ValidationError:
        raise InvalidAccountError(
            f"{name!r} is not an account name: 1 to 64 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        ) from None
    return SERVICE_ACCOUNTS.get(name, AccountKind.USER)


def user_account(name: str) -> str:
    """`name`, checked to be a user's account (not one of the service's)."""
    if account_kind(name) is not AccountKind.USER:
        raise InvalidAccountError(f"{name!r} is one of the service's accounts, not a user's")
    return name


def limit_of(account: str) -> AccountLimit:
    return LIMITS[account_kind(account)]


# --- builders: correct transactions, ready for the ledger to number -------------------------------


def _derived_id(*parts: str) -> str:
    # Derived, not random: redoing the same operation builds the same id, which the ledger
    # recognises, so a retried or redelivered operation appends nothing new.
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def hold_tx_id(job_uid: str, cheque_id: str) -> str:
    return _derived_id("hold", job_uid, cheque_id)


def settle_tx_id(job_uid: str) -> str:
    return _derived_id("settle", job_uid)


def _money(value: Decimal | int | str) -> Decimal:
    try:
        return to_money(value)
    except ValueError as exc:  # a parjobs error, so callers (the CLI) report it like the rest
        raise InvalidAmountError(str(exc)) from None


def _positive(value: Decimal | int | str, what: str) -> Decimal:
    amount = _money(value)
    if amount <= 0:
        raise InvalidAmountError(f"{what} must be more than 0, not {amount}")
    return amount


def deposit(
    account: str, amount: Decimal | int | str, *, tx_id: str | None = None, memo: str = ""
) -> TransactionDraft:
    """Money from outside into user `account`. Give `tx_id` (say, the payment's reference) to make
    a retried deposit idempotent; without it every call is a new deposit."""
    value = _positive(amount, "a deposit")
    notes = (
        Note(account=EXTERNAL, amount=value, side="debit"),
        Note(account=user_account(account), amount=value, side="credit"),
    )
    return TransactionDraft(
        tx_id=tx_id or new_tx_id(),
        kind="deposit",
        notes=notes,
        memo=memo or f"deposit into {account}",
    )


def hold(job_uid: str, cheque_id: str, payer: str, amount: Decimal | int | str) -> TransactionDraft:
    """Cheque `cheque_id` cashed for job `job_uid`: `amount` moves from `payer` into `held`."""
    value = _positive(amount, "a hold")
    return TransactionDraft(
        tx_id=hold_tx_id(job_uid, cheque_id),
        kind="hold",
        job_uid=job_uid,
        cheque_id=cheque_id,
        notes=(
            Note(account=user_account(payer), amount=value, side="debit"),
            Note(account=HELD, amount=value, side="credit"),
        ),
        memo=f"hold for job {job_uid}, cheque {cheque_id}",
    )


def settle(job_uid: str, state: LedgerState, charge: Decimal | int | str) -> TransactionDraft:
    """Job `job_uid` ended: `charge` of its hold goes to `access`, the rest back to the payer.

    `charge` is rounded half-even to six places; 0 refunds in full. A job already settled gets the
    same transaction again (same tx id), so a retry is recognised; `apply` refuses it otherwise.
    """
    held = state.holds.get(job_uid) or state.settled.get(job_uid)
    if held is None:
        raise UnknownHoldError(f"job {job_uid}: nothing was held for it, so nothing to settle")
    value = _money(charge)
    if not ZERO <= value <= held.amount:
        raise SettlementMismatchError(
            f"job {job_uid}: the charge {value} must be between 0 and the {held.amount} held"
        )
    refund = held.amount - value
    credits = [(ACCESS, value), (held.payer, refund)]
    return TransactionDraft(
        tx_id=settle_tx_id(job_uid),
        kind="settle",
        job_uid=job_uid,
        cheque_id=held.cheque_id,
        notes=(
            Note(account=HELD, amount=held.amount, side="debit"),
            # A zero leg is no movement: charge 0 is a refund only, a full charge no refund.
            *(Note(account=name, amount=part, side="credit") for name, part in credits if part),
        ),
        memo=f"charge {value}, refund {refund}",
    )


def same_operation(tx: Transaction, draft: TransactionDraft) -> bool:
    """Whether stored `tx` is `draft` done already: same id, same movement (time and the words
    of the memo may differ between the first attempt and a retry)."""
    fields = ("tx_id", "kind", "job_uid", "cheque_id", "notes")
    return all(getattr(tx, name) == getattr(draft, name) for name in fields)


# --- the checks -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Books:
    """A mutable working copy of a LedgerState. Folding copies the state once, not once per
    transaction: copying a frozen state per step would make a replay quadratic."""

    seq: int
    balances: dict[str, Decimal]
    holds: dict[str, Hold]
    settled: dict[str, Hold]
    cheques: dict[str, str]
    tx_ids: dict[str, int]

    @classmethod
    def of(cls, state: LedgerState) -> _Books:
        return cls(
            state.seq,
            dict(state.balances),
            dict(state.holds),
            dict(state.settled),
            dict(state.cheques),
            dict(state.tx_ids),
        )

    def view(self) -> LedgerState:
        """The books as a LedgerState sharing their dicts: it changes as they do."""
        # No revalidation: every value came from validated transactions.
        return LedgerState.model_construct(
            seq=self.seq,
            balances=self.balances,
            holds=self.holds,
            settled=self.settled,
            cheques=self.cheques,
            tx_ids=self.tx_ids,
        )

    def post(self, tx: Transaction) -> None:
        """Apply `tx`, or raise the first rule it breaks (and change nothing)."""
        refusals = _refusals(self, tx)
        if refusals:
            raise refusals[0]
        self._move(tx)

    def force(self, tx: Transaction) -> list[LedgerRuleError]:
        """Apply `tx` whatever it breaks, and return what it breaks: `verify` goes on past a bad
        transaction, so each later one is judged on its own."""
        refusals = _refusals(self, tx)
        self._move(tx)
        return refusals

    def _move(self, tx: Transaction) -> None:
        self.balances.update(_balances_after(self.balances, tx))
        self.seq = tx.seq
        self.tx_ids[tx.tx_id] = tx.seq
        if tx.kind == "hold" and tx.job_uid is not None and tx.cheque_id is not None:
            debits = _side(tx.notes, "debit")
            self.holds[tx.job_uid] = Hold.model_construct(
                amount=_total(_side(tx.notes, "credit")),
                payer=debits[0].account,
                cheque_id=tx.cheque_id,
            )
            self.cheques[tx.cheque_id] = tx.job_uid
        elif tx.kind == "settle" and tx.job_uid in self.holds:
            self.settled[tx.job_uid] = self.holds.pop(tx.job_uid)


def _side(notes: Iterable[Note], side: str) -> list[Note]:
    return [note for note in notes if note.side == side]


def _total(notes: Iterable[Note]) -> Decimal:
    return sum((note.amount for note in notes), ZERO)


def _balances_after(
    balances: Mapping[str, Decimal], tx: TransactionDraft | Transaction
) -> dict[str, Decimal]:
    """The balance of each account `tx` touches, once it has moved."""
    after: dict[str, Decimal] = {}
    for note in tx.notes:
        current = after.get(note.account, balances.get(note.account, ZERO))
        after[note.account] = current + (note.amount if note.side == "credit" else -note.amount)
    return after


def _balance_refusals(tx: Transaction) -> list[LedgerRuleError]:
    # The model refuses these already; re-checked for transactions built without validation.
    debits, credits = _side(tx.notes, "debit"), _side(tx.notes, "credit")
    if not debits or not credits or any(note.amount <= 0 for note in tx.notes):
        return [UnbalancedTransactionError("it needs a debit and a credit, all amounts positive")]
    if _total(debits) != _total(credits):
        return [
            UnbalancedTransactionError(
                f"debits total {_total(debits)} but credits total {_total(credits)}"
            )
        ]
    return []


def _deposit_refusals(books: _Books, tx: Transaction) -> list[LedgerRuleError]:
    debits, credits = _side(tx.notes, "debit"), _side(tx.notes, "credit")
    if (
        tx.job_uid is not None
        or tx.cheque_id is not None
        or [note.account for note in debits] != [EXTERNAL]
        or len(credits) != 1
        or account_kind(credits[0].account) is not AccountKind.USER
    ):
        return [
            MalformedTransactionError(
                f"a deposit moves money from {EXTERNAL!r} into one user account, for no job"
            )
        ]
    return []


def _hold_refusals(books: _Books, tx: Transaction) -> list[LedgerRuleError]:
    if tx.job_uid is None or tx.cheque_id is None:
        return [MalformedTransactionError("a hold names the job it is for and its cheque")]
    found: list[LedgerRuleError] = []
    cashed_for = books.cheques.get(tx.cheque_id)
    if cashed_for is not None:
        found.append(
            ChequeAlreadyCashedError(
                f"cheque {tx.cheque_id} was already cashed, for job {cashed_for}: "
                "a cheque pays exactly once; write a new one",
                cheque_id=tx.cheque_id,
                job_uid=cashed_for,
            )
        )
    if tx.job_uid in books.holds or tx.job_uid in books.settled:
        found.append(DuplicateHoldError(f"job {tx.job_uid} is already paid for (held once)"))
    debits, credits = _side(tx.notes, "debit"), _side(tx.notes, "credit")
    if (
        len(debits) != 1
        or account_kind(debits[0].account) is not AccountKind.USER
        or [note.account for note in credits] != [HELD]
    ):
        found.append(
            MalformedTransactionError(f"a hold moves money from the payer's account to {HELD!r}")
        )
    return found


def _settle_refusals(books: _Books, tx: Transaction) -> list[LedgerRuleError]:
    if tx.job_uid is None:
        return [MalformedTransactionError("a settle names the job whose hold it releases")]
    held = books.holds.get(tx.job_uid)
    if held is None:
        if tx.job_uid in books.settled:
            return [
                AlreadySettledError(
                    f"job {tx.job_uid} was already settled: its hold was charged or refunded once"
                )
            ]
        return [UnknownHoldError(f"job {tx.job_uid}: nothing was held for it, nothing to settle")]
    found: list[LedgerRuleError] = []
    if tx.cheque_id != held.cheque_id:
        found.append(
            MalformedTransactionError(
                f"job {tx.job_uid}: a settle names the cheque its hold cashed ({held.cheque_id})"
            )
        )
    debits, credits = _side(tx.notes, "debit"), _side(tx.notes, "credit")
    if [(note.account, note.amount) for note in debits] != [(HELD, held.amount)]:
        found.append(
            SettlementMismatchError(
                f"job {tx.job_uid}: a settle releases exactly the {held.amount} held, "
                f"from {HELD!r}, once"
            )
        )
    payees = [note.account for note in credits]
    if len(set(payees)) != len(payees) or not set(payees) <= {ACCESS, held.payer}:
        found.append(
            SettlementMismatchError(
                f"job {tx.job_uid}: the held value goes to {ACCESS!r} (the charge) and to the "
                f"payer {held.payer!r} (the refund), each at most once, nowhere else"
            )
        )
    return found


_KIND_RULES: Mapping[TxKind, Callable[[_Books, Transaction], list[LedgerRuleError]]] = (
    MappingProxyType(
        {"deposit": _deposit_refusals, "hold": _hold_refusals, "settle": _settle_refusals}
    )
)


def _limit_refusals(books: _Books, after: Mapping[str, Decimal]) -> list[LedgerRuleError]:
    found: list[LedgerRuleError] = []
    for account, balance in after.items():
        limit = limit_of(account)
        if not limit.allows(balance):
            before = books.balances.get(account, ZERO)
            found.append(
                InsufficientFundsError(
                    f"account {account!r} has {before}, too little for {before - balance} "
                    f"(it may not go below {limit.floor})",
                    account=account,
                    balance=before,
                    amount=before - balance,
                )
            )
    return found


def _refusals(books: _Books, tx: Transaction) -> list[LedgerRuleError]:
    """Every rule `tx` breaks against `books`, most specific first; [] if it may be applied."""
    found = _balance_refusals(tx)
    found += _KIND_RULES[tx.kind](books, tx)
    if tx.tx_id in books.tx_ids:
        found.append(
            DuplicateTransactionError(
                f"transaction id {tx.tx_id} is already transaction {books.tx_ids[tx.tx_id]}"
            )
        )
    after = _balances_after(books.balances, tx)
    found += _limit_refusals(books, after)
    if tx.seq != books.seq + 1:
        found.append(LedgerSequenceError(f"the next seq is {books.seq + 1}, not {tx.seq}"))
    if tx.balances_after != after:
        found.append(
            LedgerSequenceError(
                f"it records balances {_show(tx.balances_after)} but leaves {_show(after)}"
            )
        )
    return found


def _show(balances: Mapping[str, Decimal]) -> str:
    return ", ".join(f"{account}={amount}" for account, amount in sorted(balances.items()))


# --- state: apply, fold, post ---------------------------------------------------------------------


def apply(state: LedgerState, tx: Transaction) -> LedgerState:
    """The state after `tx`, or the LedgerRuleError for the first rule it breaks. Never mutates."""
    books = _Books.of(state)
    books.post(tx)
    return books.view()


def fold(txs: Iterable[Transaction], state: LedgerState | None = None) -> LedgerState:
    """Apply `txs` in order to `state` (None: an empty ledger); raises like `apply`."""
    books = _Books.of(state or LedgerState())
    for tx in txs:
        books.post(tx)
    return books.view()


def post(state: LedgerState, draft: TransactionDraft) -> tuple[Transaction, LedgerState]:
    """`draft` numbered as the ledger's next transaction, and the state it leaves; raises the
    LedgerRuleError of the first rule it would break."""
    batch = Batch(state)
    tx = batch.post(draft)
    return tx, batch.state()


class Batch:
    """Drafts numbered and posted one after another onto `state`, each checked against the state
    the ones before it leave: what appending them one at a time would give, with the state copied
    once for them all rather than once each."""

    def __init__(self, state: LedgerState) -> None:
        self._books = _Books.of(state)
        self.first = state.seq + 1
        """The seq of the first transaction posted."""
        self.transactions: list[Transaction] = []
        """The transactions posted so far, in order."""

    def view(self) -> LedgerState:
        """The state so far. It shares the batch's working copy: read it before the next `post`,
        do not keep it."""
        return self._books.view()

    def post(self, draft: TransactionDraft) -> Transaction:
        """`draft` numbered as the next transaction and applied; raises the LedgerRuleError of the
        first rule it would break, and then changes nothing."""
        books = self._books
        tx = Transaction(
            **dict(draft),
            seq=books.seq + 1,
            balances_after=_balances_after(books.balances, draft),
        )
        books.post(tx)
        self.transactions.append(tx)
        return tx

    def posted(self, seq: int) -> Transaction | None:
        """Transaction `seq` if it was posted to this batch, else None."""
        return self.transactions[seq - self.first] if seq >= self.first else None

    def state(self) -> LedgerState:
        """The state after every transaction posted; the batch is done with."""
        return self._books.view()


# --- whole histories ------------------------------------------------------------------------------


def verify(txs: Iterable[Transaction]) -> list[str]:
    """Every invariant re-checked from an empty ledger: [] if the history is sound, else one line
    per problem. Never trusts a stored balance: each is recomputed and compared."""
    books = _Books.of(LedgerState())
    problems: list[str] = []
    for tx in txs:
        for refusal in books.force(tx):
            problems.append(f"transaction {tx.seq} ({tx.kind} {tx.tx_id}): {refusal}")
    total = sum(books.balances.values(), ZERO)
    if total != ZERO:
        problems.append(f"the balances sum to {total}, not 0: the books do not balance")
    open_holds = sum((held.amount for held in books.holds.values()), ZERO)
    if books.balances.get(HELD, ZERO) != open_holds:
        problems.append(
            f"{HELD!r} has {books.balances.get(HELD, ZERO)} but the open holds total {open_holds}"
        )
    return problems


def statement(txs: Iterable[Transaction], account: str) -> list[StatementRow]:
    """The transactions that touched `account`, each with its signed amount and the running
    balance after it."""
    account_kind(account)  # refuses a name no account can have
    rows: list[StatementRow] = []
    balance = ZERO
    for tx in txs:
        mine = [note for note in tx.notes if note.account == account]
        if not mine:
            continue
        amount = _total(_side(mine, "credit")) - _total(_side(mine, "debit"))
        balance += amount
        rows.append(
            StatementRow(
                seq=tx.seq,
                time=tx.time,
                kind=tx.kind,
                job_uid=tx.job_uid,
                memo=tx.memo,
                amount=amount,
                balance=balance,
            )
        )
    return rows
