"""What the CLI's commands share: the console, passphrases, key files, and the connections.

Every connection a command opens (RabbitMQ, its management API, the object store) is opened here,
after its inputs were checked: one place to see, and for the tests to prove, that nothing connects
before that.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import typer
from pydantic import JsonValue
from rich.console import Console

from orchestrator.broker.admin import BrokerAdmin, vhost_of
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker
from orchestrator.broker.topology import Topology
from orchestrator.client.client import ParjobsClient, registered_user
from orchestrator.core.keys import KeyPair
from orchestrator.core.ledger_rules import user_account
from orchestrator.settings import AMQPSettings, ManagementSettings, S3Settings, ServiceSettings
from orchestrator.store.s3 import S3ObjectStore

console = Console()
PASSPHRASE_ENV = "PARJOBS_KEY_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret
"""A key file's passphrase: the daemons' setting of the same name, so one name for both."""
OLD_PASSPHRASE_ENV = "PARJOBS_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret
"""The CLI's name for it before, still read (with a note on stderr) when the new one is unset."""

KeyOption = Annotated[
    Path,
    typer.Option(
        "--key",
        help="Your key file (parjobs keys new).",
        exists=True,
        dir_okay=False,
        readable=True,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON on stdout (one document) for scripts.")
]


def print_json(value: JsonValue) -> None:
    """`value` as indented JSON on stdout, nothing else: what `--json` promises scripts."""
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def passphrase(*, confirm: bool) -> str:
    """$PARJOBS_KEY_PASSPHRASE (or, deprecated, $PARJOBS_PASSPHRASE), or asked on the terminal."""
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env:
        return from_env
    from_old_env = os.environ.get(OLD_PASSPHRASE_ENV)
    if from_old_env:
        typer.echo(
            f"note: {OLD_PASSPHRASE_ENV} is deprecated; set {PASSPHRASE_ENV} instead", err=True
        )
        return from_old_env
    return str(typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, type=str))


def load_key(path: Path) -> KeyPair:
    """The key pair in `path`; KeyFileError or PassphraseError say what is wrong."""
    return KeyPair.load(path, passphrase(confirm=False))


def paying_account(account: str | None, key: KeyPair) -> str:
    """`account`, or by default the key's name, which must then be a user's account name."""
    return account if account is not None else user_account(key.name)


@asynccontextmanager
async def broker_session(name: str, settings: AMQPSettings | None = None) -> AsyncIterator[Broker]:
    """RabbitMQ as PARJOBS_AMQP_URL / PARJOBS_PREFIX say (or `settings`)."""
    # aiormq logs a failed connect itself; the BrokerUnavailableError after it says it in one line.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    async with AMQPBroker(settings or AMQPSettings(), name=name) as broker:
        yield broker


@asynccontextmanager
async def client_session(user: KeyPair) -> AsyncIterator[ParjobsClient]:
    """A client of the parjobs services as `user`: connected as their broker user (the
    PARJOBS_AMQP_URL `parjobs users add` printed), checking what comes against the operator's
    PARJOBS_SERVICE_KEYS_FILE. Both settings are checked before anything connects."""
    settings = AMQPSettings()
    registered_user(settings.username, Topology(settings.prefix, settings.delivery_limit))
    service_keys = ServiceSettings().service_keys()
    async with (
        broker_session("parjobs-cli", settings) as broker,
        ParjobsClient(broker, user, service_keys=service_keys, sender="cli") as client,
    ):
        yield client


@asynccontextmanager
async def admin_session() -> AsyncIterator[BrokerAdmin]:
    """RabbitMQ's management API (PARJOBS_MANAGEMENT_*), for the virtual host of
    PARJOBS_AMQP_URL: where the operator provisions broker users."""
    url = AMQPSettings().amqp_url.get_secret_value()
    async with BrokerAdmin(ManagementSettings(), vhost=vhost_of(url)) as admin:
        yield admin


@asynccontextmanager
async def store_session() -> AsyncIterator[S3ObjectStore]:
    """The object store as the PARJOBS_S3_* settings say (the operator's commands)."""
    async with S3ObjectStore(S3Settings()) as store:
        yield store
