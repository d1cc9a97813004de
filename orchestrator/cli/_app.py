"""The `parjobs` command line (typer), in groups: jobs, accounts, admin, daemons, dev; and keys.

Every command grouped here is also reachable by its name before the grouping (`parjobs submit`,
`parjobs account balance`, `parjobs replay`...), hidden from `--help`, so scripts keep working.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.markup import escape

from orchestrator import __version__
from orchestrator.cli import _contract as contract
from orchestrator.cli import _jobs as jobs
from orchestrator.cli import _money as money
from orchestrator.cli import _ops as ops
from orchestrator.cli._common import JsonOption, console, load_key, passphrase, print_json
from orchestrator.cli._exit import EXIT_STATUS_HELP, ParjobsGroup
from orchestrator.cli._inputs import ACCOUNT, NEW_KEY_PATH
from orchestrator.cli._pardemo import run_par_demo
from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.store.seaweed import LocalSeaweed

app = typer.Typer(
    cls=ParjobsGroup,
    epilog=EXIT_STATUS_HELP,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Key pairs: X25519 for sealing, Ed25519 for signing.")
app.add_typer(keys_app, name="keys")


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"parjobs {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """parjobs: jobs over RabbitMQ, data through encrypted expiring PARs."""


@keys_app.command("new")
def keys_new(
    path: Annotated[
        Path, typer.Argument(help="Where to write the key file (a new file).", parser=NEW_KEY_PATH)
    ],
    name: Annotated[
        str, typer.Option(help="Whose keys these are: their account name.", parser=ACCOUNT)
    ] = "me",
) -> None:
    """Make a key pair, saved under a passphrase (prompted, or $PARJOBS_KEY_PASSPHRASE)."""
    pair = KeyPair.generate(name)
    pair.save(path, passphrase(confirm=True))
    public_path = path.with_name(path.name + ".pub")
    public_path.write_text(json.dumps(pair.public.to_data(), indent=2))
    console.print(
        f"wrote {escape(str(path))} (private, 0600) and {escape(str(public_path))} (public)"
    )
    console.print(f"fingerprint {pair.fingerprint}")


@keys_app.command("show")
def keys_show(
    path: Annotated[
        Path,
        typer.Argument(
            help="A key file from `keys new`.", exists=True, dir_okay=False, readable=True
        ),
    ],
    as_json: JsonOption = False,
) -> None:
    """Print a key file's name and fingerprint (asks for its passphrase to prove it opens)."""
    pair = load_key(path)
    if as_json:
        print_json({"name": pair.name, "fingerprint": pair.fingerprint})
    else:
        console.print(f"{escape(pair.name)}: fingerprint {pair.fingerprint}")


PublicKeyFile = Annotated[
    Path,
    typer.Option(
        help="The role's public key: its key file, or the .pub `keys new` wrote beside it.",
        exists=True,
        dir_okay=False,
        readable=True,
    ),
]


@keys_app.command("services")
def keys_services(
    path: Annotated[Path, typer.Argument(help="Where to write the service keys file.")],
    access: PublicKeyFile,
    storage: PublicKeyFile,
    compute: PublicKeyFile,
) -> None:
    """Write the operator's service keys file (PARJOBS_SERVICE_KEYS_FILE) from each role's public
    key: what daemons, clients and `parjobs replay` check replies and events against."""
    service_keys = ServiceKeys(
        {
            "access": PublicKeys.load(access),
            "storage": PublicKeys.load(storage),
            "compute": PublicKeys.load(compute),
        }
    )
    service_keys.save(path)
    console.print(f"wrote {escape(str(path))}: {service_keys!r} (public keys only)")


def demo() -> None:
    """A whole job end to end: local SeaweedFS, the three daemons, submit, run, fetch, replay."""
    from orchestrator.cli._demo import run_job_demo

    anyio.run(run_job_demo)


def par_demo() -> None:
    """PAR round trip on a real S3 server: mint, seal, upload, read back, expire, close."""
    anyio.run(run_par_demo, console)


def _daemon(role: str) -> None:
    from workers.daemons import run_daemon  # the daemons' imports stay out of client commands

    anyio.run(run_daemon, role)


def access() -> None:
    """The access service daemon: submits jobs, answers about them, expires idle ones."""
    _daemon("access")


def storage() -> None:
    """The storage daemon: mints each job's upload and output PARs."""
    _daemon("storage")


def compute() -> None:
    """The compute daemon: mints run PARs and runs calculations."""
    _daemon("compute")


def s3_server() -> None:
    """Run a local SeaweedFS with auth on until Ctrl-C; prints the settings to export."""

    async def serve() -> None:
        async with LocalSeaweed() as seaweed:
            settings = seaweed.settings
            secret = settings.secret_access_key
            console.print(f"export PARJOBS_S3_ENDPOINT_URL={seaweed.endpoint_url}")
            console.print(f"export PARJOBS_S3_ACCESS_KEY_ID={settings.access_key_id}")
            console.print(
                f"export PARJOBS_S3_SECRET_ACCESS_KEY={secret.get_secret_value() if secret else ''}"
            )
            await anyio.sleep_forever()

    anyio.run(serve)


jobs_app = typer.Typer(help="Your jobs: submit one, follow it, read its timeline, fetch outputs.")
accounts_app = typer.Typer(help="Users, their accounts and cheques, and the ledger.")
admin_app = typer.Typer(
    help="The operator's: the broker's setup, the service keys, dead letters, replay, AsyncAPI."
)
daemons_app = typer.Typer(help="The service daemons, one role a process.")
dev_app = typer.Typer(
    help="On one machine: everything (`parjobs dev` alone, or `dev up`), the demos, a local S3."
)


@dev_app.callback(invoke_without_command=True)
def _dev_group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:  # `parjobs dev`, as before the commands were grouped
        ops.dev()


Command = Callable[..., None]
COMMANDS: list[tuple[typer.Typer, str, Command]] = [
    (jobs_app, "submit", jobs.submit),
    (jobs_app, "status", jobs.status),
    (jobs_app, "watch", jobs.watch),
    (jobs_app, "events", jobs.events),
    (jobs_app, "fetch", jobs.fetch),
    (admin_app, "replay", ops.replay),
    (admin_app, "asyncapi", contract.asyncapi),
    (daemons_app, "access", access),
    (daemons_app, "storage", storage),
    (daemons_app, "compute", compute),
    (dev_app, "demo", demo),
    (dev_app, "par-demo", par_demo),
    (dev_app, "s3", s3_server),
]
"""Each grouped command: `parjobs <group> <name>`, and `parjobs <name>` as before (hidden)."""
SUBGROUPS: list[tuple[typer.Typer, str, typer.Typer]] = [
    (accounts_app, "users", money.users_app),
    (accounts_app, "cheque", money.cheque_app),
    (accounts_app, "ledger", money.ledger_app),
    (admin_app, "broker", ops.broker_app),
    (admin_app, "dlq", ops.dlq_app),
]
"""Each grouped group: `parjobs <group> <name> ...`, and `parjobs <name> ...` as before."""

for group, name, command in COMMANDS:
    group.command(name)(command)
    app.command(name, hidden=True)(command)
for group, name, commands in SUBGROUPS:
    group.add_typer(commands, name=name)
    app.add_typer(commands, name=name, hidden=True)
# `parjobs account deposit|balance|statement` before; `parjobs accounts deposit|...` now.
accounts_app.command("deposit")(money.account_deposit)
accounts_app.command("balance")(money.account_balance)
accounts_app.command("statement")(money.account_statement)
app.add_typer(money.account_app, name="account", hidden=True)
dev_app.command("up")(ops.dev)

app.add_typer(jobs_app, name="jobs")
app.add_typer(accounts_app, name="accounts")
app.add_typer(admin_app, name="admin")
app.add_typer(daemons_app, name="daemons")
app.add_typer(dev_app, name="dev")


def main() -> None:
    """`parjobs`: the root command reports errors itself (`orchestrator.cli._exit`)."""
    app()
