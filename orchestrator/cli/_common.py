"""What the CLI's commands share: the console, passphrases, key files, a client session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import typer
from rich.console import Console

from orchestrator.broker.amqp import AMQPBroker
from orchestrator.client.client import ParjobsClient
from orchestrator.core.keys import KeyPair
from orchestrator.settings import AMQPSettings

console = Console()
PASSPHRASE_ENV = "PARJOBS_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


def passphrase(*, confirm: bool) -> str:
    """$PARJOBS_PASSPHRASE, or asked for on the terminal."""
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env:
        return from_env
    return str(typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, type=str))


def load_key(path: Path) -> KeyPair:
    return KeyPair.load(path, passphrase(confirm=False))


@asynccontextmanager
async def client_session() -> AsyncIterator[ParjobsClient]:
    """A client on the broker named by PARJOBS_AMQP_URL / PARJOBS_PREFIX."""
    async with AMQPBroker(AMQPSettings(), name="parjobs-cli") as broker:
        yield ParjobsClient(broker, sender="cli")
