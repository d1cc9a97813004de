"""Operators' commands: set up the broker, run everything locally, replay the log, look after
dead letters."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Annotated

import anyio
import typer
from rich.markup import escape
from rich.table import Table

from orchestrator.broker.base import DeadLetter
from orchestrator.broker.deployment import Deployment, declare_topology, provision_roles
from orchestrator.broker.identities import Role
from orchestrator.cli._common import (
    JsonOption,
    admin_session,
    broker_session,
    console,
    print_json,
    store_session,
)
from orchestrator.cli._exit import EXIT_PROBLEMS
from orchestrator.core.layout import JobKeys
from orchestrator.services.replay import ReplayResult
from orchestrator.services.replay import replay as replay_jobs
from orchestrator.settings import AMQPSettings, S3Settings, ServiceSettings
from orchestrator.store.eventlog import EventLog
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobSheetState
from workers.cluster import LocalCluster

dlq_app = typer.Typer(help="The dead-letter queue: what could not be processed, and why.")
broker_app = typer.Typer(help="The deployment on RabbitMQ: its roles' broker users, its topology.")


@broker_app.command("setup")
def broker_setup() -> None:
    """Give the operator and each service role a broker user of its own (fresh passwords),
    declare the topology as the operator, and print each role's AMQP URL, once: nothing keeps
    them. Give each daemon its role's URL as PARJOBS_AMQP_URL, and the operator's to `replay`
    and `dlq`. Runs as PARJOBS_MANAGEMENT_*'s administrator, for PARJOBS_PREFIX; running it
    again changes every password."""

    async def run() -> Deployment:
        async with admin_session() as admin:
            await admin.check()
            deployment = await provision_roles(admin, AMQPSettings())
        await declare_topology(deployment.role_settings(Role.OPERATOR))
        return deployment

    deployment = anyio.run(run)
    console.print(f"topology of {deployment.amqp.prefix!r} declared as the operator")
    console.print("each role's PARJOBS_AMQP_URL (shown once):")
    for role in Role:
        url = deployment.role_settings(role).amqp_url.get_secret_value()
        # Whole, never wrapped or cut: the line is copied into the role's configuration.
        console.print(f"{role.value}: {escape(url)}", soft_wrap=True, highlight=False)


async def local_s3(stack: AsyncExitStack) -> S3Settings:
    """The configured S3 server, or a local SeaweedFS started for as long as `stack` lives."""
    settings = S3Settings()
    if settings.endpoint_url is not None:
        return settings
    seaweed = await stack.enter_async_context(LocalSeaweed())
    console.print(f"SeaweedFS at {seaweed.endpoint_url} (auth on; data in {seaweed.dir})")
    return seaweed.settings


def dev() -> None:
    """access, storage and compute daemons plus a local SeaweedFS, until Ctrl-C."""

    async def run() -> None:
        async with AsyncExitStack() as stack:
            s3 = await local_s3(stack)
            prefix = AMQPSettings().prefix
            cluster = await stack.enter_async_context(
                LocalCluster(s3, prefix=prefix, keep_dir=True)
            )
            console.print(f"daemons ready (broker prefix {prefix!r}); logs in {cluster.dir}")
            console.print("in another shell, register yourself (`parjobs accounts users add`,")
            console.print(
                "which prints your PARJOBS_AMQP_URL), then `parjobs jobs submit|status|watch|...`:"
            )
            console.print(f"  export PARJOBS_PREFIX={prefix}")
            console.print(f"  export PARJOBS_SERVICE_KEYS_FILE={cluster.service_keys_file}")
            console.print("Ctrl-C stops everything")
            await anyio.sleep_forever()

    anyio.run(run)


def _at(sheet: JobSheetState | None) -> str:
    return f"{sheet.state.value}@{sheet.seq}" if sheet is not None else "-"


def replay(
    show_all: Annotated[bool, typer.Option("--all", help="List agreeing jobs too.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Rebuild every JobSheet from the events stream and from the stored log; report divergence."""

    async def run() -> list[ReplayResult]:
        settings = ServiceSettings()
        keys = JobKeys(settings.data_root)
        service_keys = settings.service_keys()
        async with store_session() as store, broker_session("replay") as broker:
            return await replay_jobs(EventLog(store, keys.jobs), broker, service_keys)

    results = anyio.run(run)
    shown = [result for result in results if show_all or not result.ok]
    diverged = sum(not result.ok for result in results)
    if as_json:
        print_json(
            {
                "replayed": len(results),
                "diverged": diverged,
                "jobs": [
                    {
                        "job": result.job_uid,
                        "stored": _at(result.stored),
                        "streamed": _at(result.streamed),
                        "ok": result.ok,
                        "problems": list(result.problems),
                    }
                    for result in shown
                ],
            }
        )
    else:
        table = Table("job", "stored", "streamed", "verdict")
        for result in shown:
            verdict = "agrees" if result.ok else "; ".join(result.problems)
            table.add_row(result.job_uid, _at(result.stored), _at(result.streamed), escape(verdict))
        console.print(table)
        console.print(f"{len(results)} job(s) replayed, {diverged} diverge")
    if diverged:
        raise typer.Exit(EXIT_PROBLEMS)


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    as_json: JsonOption = False,
) -> None:
    """Dead letters, oldest first, with their reason (they stay in the queue)."""

    async def run() -> list[DeadLetter]:
        async with broker_session("parjobs-dlq") as broker:
            return await broker.dead_letters(limit)

    letters = anyio.run(run)
    if as_json:
        print_json(
            [
                {
                    "message_id": letter.message_id,
                    "why": letter.code.value,
                    "from_queue": letter.original_queue,
                    "when": letter.dead_lettered_at.isoformat()
                    if letter.dead_lettered_at
                    else None,
                    "reason": letter.reason,
                }
                for letter in letters
            ]
        )
        return
    table = Table("message id", "why", "from queue", "when", "reason")
    for letter in letters:
        when = letter.dead_lettered_at.isoformat() if letter.dead_lettered_at else "-"
        table.add_row(
            escape(letter.message_id or "-"),
            letter.code.value,
            escape(letter.original_queue or "-"),
            when,
            escape(letter.reason[:80]),
        )
    console.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    message_ids: Annotated[list[str] | None, typer.Argument(help="Ids from `dlq list`.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
) -> None:
    """Send dead letters back to the queue they came from."""
    if every == bool(message_ids):
        raise typer.BadParameter(
            "name message ids, or pass --all (one of the two)", param_hint="MESSAGE_IDS / --all"
        )

    async def run() -> int:
        async with broker_session("parjobs-dlq") as broker:
            return await broker.redrive("all" if every else list(message_ids or []))

    console.print(f"re-drove {anyio.run(run)} message(s)")
