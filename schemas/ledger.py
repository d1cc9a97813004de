"""Wire forms of the accounts ledger: money, the transactions that move it, and what they fold into.

A `Transaction` is one double-entry movement: debit and credit `Note`s that total the same. The
ledger is the sequence of them, stored in `Block`s of consecutive ones; a `LedgerState` is never
stored, only computed from it (see `orchestrator.core.ledger_rules`). `Money` is a Decimal with
exactly six places that travels as a JSON string, so no binary float ever touches an amount.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Annotated, Literal, Self

from pydantic import (
    AwareDatetime,
    BeforeValidator,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from schemas._base import WireModel
from schemas.par import Uid

PLACES = 6
QUANTUM = Decimal(1).scaleb(-PLACES)  # 0.000001, the smallest amount the ledger records
MONEY_LIMIT = Decimal(10) ** 18
"""Amounts and balances stay below this in size: 24 significant digits, so every sum the ledger
makes (thousands of them at once) is exact within Decimal's default 28-digit precision."""
# Its own context: quantize must not depend on whatever context the calling thread has set.
_CONTEXT = Context(prec=40, rounding=ROUND_HALF_EVEN)


def to_money(value: object) -> Decimal:
    """`value` (str, int or Decimal) as money: rounded half-even to six places.

    A float is refused: it has already lost the exact value (0.1 is not one tenth), and guessing
    which decimal was meant is how ledgers drift.
    """
    if isinstance(value, float):
        raise ValueError(
            f"money must not be a float ({value!r}): give a string such as '{value}', "
            "an int or a Decimal"
        )
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError(f"money must be a str, int or Decimal, not {type(value).__name__}")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not amount.is_finite():
        raise ValueError(f"money must be a finite number, not {value!r}")
    if abs(amount) >= MONEY_LIMIT:
        raise ValueError(f"{value!r} is too large an amount (limit: below {MONEY_LIMIT:,})")
    quantized = amount.quantize(QUANTUM, context=_CONTEXT)
    return quantized.copy_abs() if quantized.is_zero() else quantized  # no "-0.000000"


Money = Annotated[
    Decimal,
    BeforeValidator(to_money),
    PlainSerializer(lambda amount: format(amount, "f"), return_type=str, when_used="json"),
]
"""A Decimal with six places: quantized (half-even) on validation, a string such as "1.500000"
in JSON. Finite, below `MONEY_LIMIT` in size, never from a float."""

ZERO = to_money(0)

AccountName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
"""An account: a user's (their user name) or one of the service's own (see `_ledger_rules`)."""

TxKind = Literal["deposit", "hold", "settle"]
Side = Literal["debit", "credit"]


class Note(WireModel):
    """One side of a movement: `amount` debited from or credited to `account`."""

    account: AccountName
    amount: Annotated[Money, Field(gt=0)]
    side: Side


def new_tx_id() -> str:
    return uuid.uuid4().hex


class _TxBody(WireModel):
    """What a transaction moves and why; the ledger adds where it stands (`Transaction`)."""

    schema_version: Literal[1] = 1
    tx_id: Uid = Field(default_factory=new_tx_id)  # unique in the ledger: a retry reuses it
    time: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    kind: TxKind
    job_uid: Uid | None = None  # hold and settle: the job the money is for
    cheque_id: Uid | None = None  # hold and settle: the cheque that pays for it
    notes: tuple[Note, ...] = Field(min_length=2)
    memo: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _balances(self) -> Self:
        # The books balance per transaction, so they balance in total: checked at the source.
        debits = [note.amount for note in self.notes if note.side == "debit"]
        credits = [note.amount for note in self.notes if note.side == "credit"]
        if not debits or not credits:
            raise ValueError("a transaction needs at least one debit and one credit")
        if sum(debits) != sum(credits):
            raise ValueError(f"debits total {sum(debits)} but credits total {sum(credits)}")
        return self


class TransactionDraft(_TxBody):
    """A transaction not yet in the ledger: the ledger numbers it when it appends it."""


class Transaction(_TxBody):
    """Transaction `seq` of the ledger, with the balance it left each account it touched.

    `balances_after` lets a replay check, transaction by transaction, that it reproduces every
    balance the ledger ever reported.
    """

    seq: int = Field(ge=1)
    balances_after: dict[AccountName, Money]

    @model_validator(mode="after")
    def _reports_what_it_touches(self) -> Self:
        touched = {note.account for note in self.notes}
        if set(self.balances_after) != touched:
            raise ValueError(
                f"balances_after must cover exactly the accounts touched ({sorted(touched)}), "
                f"not {sorted(self.balances_after)}"
            )
        return self


class Block(WireModel):
    """Consecutive transactions the ledger appended at once, with one conditional create.

    A block of one is stored as that transaction alone, which is also how every transaction was
    stored before blocks: such an object reads as a block of one.
    """

    schema_version: Literal[1] = 1
    transactions: tuple[Transaction, ...] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _a_lone_transaction(cls, data: object) -> object:
        if isinstance(data, dict) and "transactions" not in data:
            return {"transactions": [data]}
        return data

    @model_validator(mode="after")
    def _consecutive(self) -> Self:
        seqs = [tx.seq for tx in self.transactions]
        if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            raise ValueError(f"a block holds consecutive transactions, not seqs {seqs}")
        return self

    @model_serializer(mode="wrap")
    def _one_as_itself(self, handler: SerializerFunctionWrapHandler) -> object:
        data = handler(self)
        return data["transactions"][0] if len(self.transactions) == 1 else data

    @property
    def first(self) -> int:
        """The seq of its first transaction (and the key it is stored under)."""
        return self.transactions[0].seq

    @property
    def last(self) -> int:
        return self.transactions[-1].seq


class Hold(WireModel):
    """Value held (provisionally) for one job: who pays, how much, with which cheque."""

    amount: Annotated[Money, Field(gt=0)]
    payer: AccountName
    cheque_id: Uid


class LedgerState(WireModel):
    """The ledger as its transactions up to `seq` leave it. Computed, never stored."""

    seq: int = Field(default=0, ge=0)
    balances: dict[AccountName, Money] = Field(default_factory=dict)
    holds: dict[Uid, Hold] = Field(default_factory=dict)  # open: by job uid, not yet settled
    settled: dict[Uid, Hold] = Field(default_factory=dict)  # closed: by job uid, what was held
    cheques: dict[Uid, Uid] = Field(default_factory=dict)  # cashed cheque id -> its job uid
    tx_ids: dict[Uid, int] = Field(default_factory=dict)  # every transaction id -> its seq


class StatementRow(WireModel):
    """One line of an account's statement: a transaction as that account saw it."""

    seq: int = Field(ge=1)
    time: AwareDatetime
    kind: TxKind
    job_uid: Uid | None
    memo: str
    amount: Money  # credits minus debits to this account: + in, - out
    balance: Money  # the running balance after this line
