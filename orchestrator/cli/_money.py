"""Users, accounts, cheques and the ledger: `parjobs users|account|cheque|ledger`.

`users`, `account` and `ledger` are the operator's (they need the object store's credentials);
`cheque write` is the user's (it needs only their key file).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, TypeVar

import anyio
import typer
from rich.table import Table

from orchestrator.cli._common import console, load_key
from orchestrator.core.keys import PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.core.ledger_rules import ACCESS
from orchestrator.core.signing import write_cheque
from orchestrator.services.accounts import Accounts
from orchestrator.settings import S3Settings, ServiceSettings
from orchestrator.store.s3 import S3ObjectStore
from schemas.ledger import StatementRow

users_app = typer.Typer(help="Registered users: who may sign for jobs and pay for them.")
account_app = typer.Typer(help="Accounts: deposits, balances, statements.")
cheque_app = typer.Typer(help="Cheques: a signed promise to pay, up to a limit, for one job.")
ledger_app = typer.Typer(help="The double-entry ledger.")
T = TypeVar("T")


@asynccontextmanager
async def _accounts() -> AsyncIterator[Accounts]:
    async with S3ObjectStore(S3Settings()) as store:
        yield Accounts(store, JobKeys(ServiceSettings().data_root))


def _with_accounts(action: Callable[[Accounts], Awaitable[T]]) -> T:
    async def run() -> T:
        async with _accounts() as accounts:
            return await action(accounts)

    return anyio.run(run)


def statement_table(rows: list[StatementRow]) -> Table:
    table = Table("seq", "time", "kind", "job", "memo", "amount", "balance")
    for row in rows:
        table.add_row(
            str(row.seq),
            row.time.strftime("%Y-%m-%d %H:%M:%S"),
            row.kind,
            (row.job_uid or "")[:12],
            row.memo,
            f"{row.amount:+}",
            f"{row.balance}",
        )
    return table


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user's (and their account's) name.")],
    public_key: Annotated[Path, typer.Option(help="Their .pub file from `parjobs keys new`.")],
) -> None:
    """Register a user's public key; their account opens at zero."""
    record = _with_accounts(lambda a: a.add_user(name, PublicKeys.load(public_key)))
    console.print(
        f"registered {record.name} ({PublicKeys.from_wire(record.public_key).fingerprint})"
    )


@account_app.command("deposit")
def account_deposit(
    name: Annotated[str, typer.Argument(help="A registered user.")],
    amount: Annotated[str, typer.Argument(help="Decimal amount, e.g. 12.50")],
) -> None:
    """Money into a user's account (from outside the ledger)."""
    tx = _with_accounts(lambda a: a.deposit(name, Decimal(amount)))
    console.print(f"deposited {amount} into {name}: balance {tx.balances_after[name]}")


@account_app.command("balance")
def account_balance(name: Annotated[str, typer.Argument(help="An account.")]) -> None:
    """The account's balance."""
    console.print(f"{name}: {_with_accounts(lambda a: a.balance(name))}")


@account_app.command("statement")
def account_statement(name: Annotated[str, typer.Argument(help="An account.")]) -> None:
    """Every movement of the account with its running balance."""
    console.print(statement_table(_with_accounts(lambda a: a.statement(name))))


@cheque_app.command("write")
def cheque_write(
    key: Annotated[Path, typer.Option(help="The payer's key file.")],
    resource: Annotated[str, typer.Option(help="The job request's fingerprint it pays for.")],
    max_spend: Annotated[str, typer.Option(help="The most it may be cashed for.")],
    payer: Annotated[str | None, typer.Option(help="Paying account (default: key's name).")] = None,
    lifetime: Annotated[int, typer.Option(help="Seconds until it expires.")] = 3600,
) -> None:
    """Write a cheque payable to the access service; prints it as JSON."""
    signer = load_key(key)
    cheque = write_cheque(
        signer,
        payer=payer or signer.name,
        recipient=ACCESS,
        max_spend=Decimal(max_spend),
        resource=resource,
        lifetime=timedelta(seconds=lifetime),
    )
    console.print_json(json.dumps(cheque.model_dump(mode="json")))


@ledger_app.command("verify")
def ledger_verify() -> None:
    """Check the books: every transaction balances, a replay reproduces every balance, no
    account below its limit, each hold charged or refunded exactly once when its job ends."""
    problems = _with_accounts(lambda a: a.verify_books())
    for problem in problems:
        console.print(f"[red]✗[/] {problem}")
    if problems:
        raise typer.Exit(1)
    console.print("[green]✓[/] the books balance and every invariant holds")
