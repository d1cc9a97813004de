"""Users, accounts, cheques and the ledger: `parjobs accounts users|deposit|balance|statement|
cheque|ledger` (before the grouping: `parjobs users|account|cheque|ledger`).

`users`, `account` and `ledger` are the operator's (they need the object store's credentials, and
`users add` RabbitMQ's management API); `cheque write` is the user's (it needs only their key file).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, TypeVar

import anyio
import typer
from rich.markup import escape
from rich.table import Table

from orchestrator.broker.admin import Credentials
from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import Topology
from orchestrator.cli._common import (
    JsonOption,
    KeyOption,
    admin_session,
    console,
    load_key,
    paying_account,
    print_json,
    store_session,
)
from orchestrator.cli._exit import EXIT_PROBLEMS
from orchestrator.cli._inputs import (
    ACCOUNT,
    DEPOSIT,
    MAX_CHEQUE_LIFETIME_S,
    MAX_SPEND,
    PUBLIC_KEYS,
    REQUEST_FINGERPRINT,
    USER_ACCOUNT,
)
from orchestrator.core.keys import PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.core.ledger_rules import ACCESS
from orchestrator.core.signing import write_cheque
from orchestrator.services.accounts import Accounts
from orchestrator.settings import AMQPSettings, ServiceSettings
from schemas.ledger import StatementRow

users_app = typer.Typer(help="Registered users: who may sign for jobs and pay for them.")
account_app = typer.Typer(help="Accounts: deposits, balances, statements.")
cheque_app = typer.Typer(help="Cheques: a signed promise to pay, up to a limit, for one job.")
ledger_app = typer.Typer(help="The double-entry ledger.")
T = TypeVar("T")


def _with_accounts(action: Callable[[Accounts], Awaitable[T]]) -> T:
    async def run() -> T:
        async with store_session() as store:
            return await action(Accounts(store, JobKeys(ServiceSettings().data_root)))

    return anyio.run(run)


def statement_table(rows: list[StatementRow]) -> Table:
    table = Table("seq", "time", "kind", "job", "memo", "amount", "balance")
    for row in rows:
        table.add_row(
            str(row.seq),
            row.time.strftime("%Y-%m-%d %H:%M:%S"),
            row.kind,
            (row.job_uid or "")[:12],
            escape(row.memo),
            f"{row.amount:+}",
            f"{row.balance}",
        )
    return table


UserArgument = Annotated[
    str, typer.Argument(help="A registered user (their account's name).", parser=USER_ACCOUNT)
]


@users_app.command("add")
def users_add(
    name: Annotated[
        str, typer.Argument(help="The user's (and their account's) name.", parser=USER_ACCOUNT)
    ],
    public_key: Annotated[
        PublicKeys,
        typer.Option(
            help="Their .pub file from `parjobs keys new`.", parser=PUBLIC_KEYS, metavar="FILE"
        ),
    ],
) -> None:
    """Register a user's public key (their account opens at zero) and give them a broker user of
    their own; prints the AMQP URL they connect with, once (its password is stored nowhere: run
    this again to give them a new one)."""
    record = _with_accounts(lambda a: a.add_user(name, public_key))
    console.print(
        f"registered {record.name} ({PublicKeys.from_wire(record.public_key).fingerprint})"
    )
    amqp = AMQPSettings()
    grant = Identities(Topology(amqp.prefix, amqp.delivery_limit)).user_grant(name)

    async def provision() -> Credentials:
        async with admin_session() as admin:
            return await admin.provision(grant)

    credentials = anyio.run(provision)
    url = credentials.amqp_url(amqp.amqp_url).get_secret_value()
    console.print(
        f"broker user {escape(credentials.username)}; give {record.name} this, with the service "
        "keys file (shown once, stored nowhere):"
    )
    console.print(
        f"  export PARJOBS_AMQP_URL='{url}'", markup=False, highlight=False, soft_wrap=True
    )


@account_app.command("deposit")
def account_deposit(
    name: UserArgument,
    amount: Annotated[
        Decimal, typer.Argument(help="Decimal amount, e.g. 12.50", parser=DEPOSIT, metavar="AMOUNT")
    ],
) -> None:
    """Money into a user's account (from outside the ledger)."""
    tx = _with_accounts(lambda a: a.deposit(name, amount))
    console.print(f"deposited {amount} into {name}: balance {tx.balances_after[name]}")


AccountArgument = Annotated[
    str, typer.Argument(help="An account: a user's, or the service's own.", parser=ACCOUNT)
]


@account_app.command("balance")
def account_balance(name: AccountArgument, as_json: JsonOption = False) -> None:
    """The account's balance."""
    balance = _with_accounts(lambda a: a.balance(name))
    if as_json:
        print_json({"account": name, "balance": str(balance)})
    else:
        console.print(f"{name}: {balance}")


@account_app.command("statement")
def account_statement(name: AccountArgument, as_json: JsonOption = False) -> None:
    """Every movement of the account with its running balance."""
    rows = _with_accounts(lambda a: a.statement(name))
    if as_json:
        print_json([row.model_dump(mode="json") for row in rows])
    else:
        console.print(statement_table(rows))


@cheque_app.command("write")
def cheque_write(
    key: KeyOption,
    resource: Annotated[
        str,
        typer.Option(
            help="The job request's fingerprint it pays for.",
            parser=REQUEST_FINGERPRINT,
            metavar="SHA256",
        ),
    ],
    max_spend: Annotated[
        Decimal,
        typer.Option(help="The most it may be cashed for.", parser=MAX_SPEND, metavar="AMOUNT"),
    ],
    payer: Annotated[
        str | None,
        typer.Option(help="Paying account (default: key's name).", parser=USER_ACCOUNT),
    ] = None,
    lifetime: Annotated[
        int,
        typer.Option(
            help="Seconds until it expires (at most a year).", min=1, max=MAX_CHEQUE_LIFETIME_S
        ),
    ] = 3600,
) -> None:
    """Write a cheque payable to the access service; prints it as JSON."""
    signer = load_key(key)
    cheque = write_cheque(
        signer,
        payer=paying_account(payer, signer),
        recipient=ACCESS,
        max_spend=max_spend,
        resource=resource,
        lifetime=timedelta(seconds=lifetime),
    )
    console.print_json(json.dumps(cheque.model_dump(mode="json")))


@ledger_app.command("verify")
def ledger_verify(as_json: JsonOption = False) -> None:
    """Check the books: every transaction balances, a replay reproduces every balance, no
    account below its limit, each hold charged or refunded exactly once when its job ends."""
    problems = _with_accounts(lambda a: a.verify_books())
    if as_json:
        print_json({"ok": not problems, "problems": list(problems)})
    else:
        for problem in problems:
            console.print(f"[red]✗[/] {escape(problem)}")
        if not problems:
            console.print("[green]✓[/] the books balance and every invariant holds")
    if problems:
        raise typer.Exit(EXIT_PROBLEMS)
