"""The `parjobs` command line (typer): key management, the demo, a local S3 server."""

from __future__ import annotations

import json
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
from orchestrator.cli._common import console, load_key, passphrase
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
    """Make a key pair, saved under a passphrase (prompted, or $PARJOBS_PASSPHRASE)."""
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
) -> None:
    """Print a key file's name and fingerprint (asks for its passphrase to prove it opens)."""
    pair = load_key(path)
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


@app.command()
def demo() -> None:
    """A whole job end to end: local SeaweedFS, the three daemons, submit, run, fetch, replay."""
    from orchestrator.cli._demo import run_job_demo

    anyio.run(run_job_demo)


@app.command("par-demo")
def par_demo() -> None:
    """PAR round trip on a real S3 server: mint, seal, upload, read back, expire, close."""
    anyio.run(run_par_demo, console)


def _daemon(role: str) -> None:
    from workers.daemons import run_daemon  # the daemons' imports stay out of client commands

    anyio.run(run_daemon, role)


@app.command()
def access() -> None:
    """The access service daemon: submits jobs, answers about them, expires idle ones."""
    _daemon("access")


@app.command()
def storage() -> None:
    """The storage daemon: mints each job's upload and output PARs."""
    _daemon("storage")


@app.command()
def compute() -> None:
    """The compute daemon: mints run PARs and runs calculations."""
    _daemon("compute")


@app.command("s3")
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


app.command()(jobs.submit)
app.command()(jobs.status)
app.command()(jobs.watch)
app.command()(jobs.events)
app.command()(jobs.fetch)
app.command()(ops.dev)
app.command()(ops.replay)
app.command()(contract.asyncapi)
app.command()(contract.asyncapi)
app.add_typer(ops.dlq_app, name="dlq")
app.add_typer(ops.broker_app, name="broker")
app.add_typer(money.users_app, name="users")
app.add_typer(money.account_app, name="account")
app.add_typer(money.cheque_app, name="cheque")
app.add_typer(money.ledger_app, name="ledger")


def main() -> None:
    """`parjobs`: the root command reports errors itself (`orchestrator.cli._exit`)."""
    app()
