"""The `parjobs` command line (typer): key management, the demo, a local S3 server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.console import Console

from orchestrator.cli import _jobs as jobs
from orchestrator.cli import _money as money
from orchestrator.cli import _ops as ops
from orchestrator.cli._pardemo import run_par_demo
from orchestrator.core.keys import KeyPair
from orchestrator.errors import ParjobsError
from orchestrator.store.seaweed import LocalSeaweed

app = typer.Typer(
    help="parjobs: jobs over RabbitMQ, data through encrypted expiring PARs.",
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Key pairs: X25519 for sealing, Ed25519 for signing.")
app.add_typer(keys_app, name="keys")
console = Console()

PASSPHRASE_ENV = "PARJOBS_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


def _passphrase(confirm: bool) -> str:
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env:
        return from_env
    return str(typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, type=str))


@keys_app.command("new")
def keys_new(
    path: Annotated[Path, typer.Argument(help="Where to write the key file.")],
    name: Annotated[str, typer.Option(help="Whose keys these are.")] = "me",
) -> None:
    """Make a key pair, saved under a passphrase (prompted, or $PARJOBS_PASSPHRASE)."""
    pair = KeyPair.generate(name)
    pair.save(path, _passphrase(confirm=True))
    public_path = path.with_name(path.name + ".pub")
    public_path.write_text(json.dumps(pair.public.to_data(), indent=2))
    console.print(f"wrote {path} (private, 0600) and {public_path} (public)")
    console.print(f"fingerprint {pair.fingerprint}")


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="A key file from `keys new`.")]) -> None:
    """Print a key file's name and fingerprint (asks for its passphrase to prove it opens)."""
    pair = KeyPair.load(path, _passphrase(confirm=False))
    console.print(f"{pair.name}: fingerprint {pair.fingerprint}")


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
app.add_typer(ops.dlq_app, name="dlq")
app.add_typer(money.users_app, name="users")
app.add_typer(money.account_app, name="account")
app.add_typer(money.cheque_app, name="cheque")
app.add_typer(money.ledger_app, name="ledger")


def main() -> None:
    try:
        app()
    except ParjobsError as exc:
        console.print(f"[red]error:[/] {exc} ({exc.code})")
        raise SystemExit(2) from exc
