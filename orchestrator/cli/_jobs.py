"""The user's commands: submit a job, follow it, read its timeline, fetch its outputs.

Each signs its requests with the user's key (`--key`) and connects as the user's broker user;
following a job means following its events, never polling.
"""

from __future__ import annotations

import json
import math
from contextlib import aclosing
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import anyio
import typer
from pydantic import JsonValue
from rich import progress as bars
from rich.markup import escape
from rich.table import Table

from orchestrator.cli._common import (
    JsonOption,
    KeyOption,
    client_session,
    console,
    load_key,
    paying_account,
    print_json,
)
from orchestrator.cli._exit import JOB_END_STATUS
from orchestrator.cli._inputs import (
    CALCULATION,
    JOB_LIFETIME,
    JOB_UID,
    MAX_SPEND,
    PARAMETER,
    PARAMS_JSON,
    USER_ACCOUNT,
    Parameter,
)
from orchestrator.client.client import ENDED, ParjobsClient
from orchestrator.client.tracking import with_progress
from schemas.events import (
    Cancelled,
    Completed,
    ComputeContracted,
    Failed,
    JobEvent,
    JobRequest,
    JobSheetState,
    JobState,
    Progress,
    StorageContracted,
    Submitted,
)

JobUidArgument = Annotated[str, typer.Argument(help="The job's uid.", parser=JOB_UID)]


def _parameters(
    params: list[Parameter], params_json: dict[str, JsonValue] | None
) -> dict[str, JsonValue]:
    """--params-json, then each --param over it."""
    return {**(params_json or {}), **{param.name: param.value for param in params}}


def _describe(event: JobEvent) -> str:
    match event.payload:
        case Submitted(request=request):
            return f"{request.calculation} {json.dumps(request.parameters)}"
        case StorageContracted(upload_par=upload, output_par=output):
            return f"upload PAR {upload.uid[:8]}…, output PAR {output.uid[:8]}…"
        case ComputeContracted(run_par=run_par):
            return f"run PAR {run_par.uid[:8]}…"
        case Progress(message=message):
            return message
        case Completed(outputs=outputs):
            return ", ".join(f"{o.key} ({o.size} B)" for o in outputs) or "no outputs"
        case Failed(reason=reason) | Cancelled(reason=reason):
            return reason
        case _:
            return ""


def timeline(events: tuple[JobEvent, ...] | list[JobEvent]) -> Table:
    table = Table("seq", "time", "actor", "event", "detail")
    for event in events:
        when = event.time.strftime("%H:%M:%S.%f")[:-3]
        # Details carry the user's parameters and a calculation's messages: text, not markup.
        detail = escape(_describe(event))
        table.add_row(str(event.seq), when, escape(event.actor), event.payload.type, detail)
    return table


async def follow_job(client: ParjobsClient, job_uid: str, *, show: bool) -> JobSheetState:
    """Follow the job's events until it ends, moving a live progress bar if `show` (its text
    the run's latest progress report); its final state."""
    if not show:
        return await client.wait_until(job_uid, frozenset(), timeout=math.inf)
    columns = (
        bars.TextColumn("[bold]{task.fields[state]}"),
        bars.BarColumn(),
        bars.TimeElapsedColumn(),
    )
    with bars.Progress(*columns, bars.TextColumn("{task.description}"), console=console) as bar:
        task = bar.add_task("", total=1.0, state="…")
        async with aclosing(client.watch(job_uid)) as states:
            async for sheet in states:
                done = 1.0 if sheet.state in ENDED else sheet.fraction
                bar.update(
                    task,
                    completed=done or 0,
                    state=sheet.state.value,
                    description=escape((sheet.progress or "")[:60]),
                )
    return sheet


def submit(
    calculation: Annotated[
        str, typer.Argument(help="A calculation's name, e.g. checksum.", parser=CALCULATION)
    ],
    input_file: Annotated[
        Path,
        typer.Argument(help="The job's input file.", exists=True, dir_okay=False, readable=True),
    ],
    key: KeyOption,
    param: Annotated[
        list[Parameter],
        typer.Option(
            "--param",
            "-p",
            help="A parameter; VALUE is taken as JSON if it is JSON, else as a string.",
            parser=PARAMETER,
            metavar="NAME=VALUE",
        ),
    ] = [],  # noqa: B006 - typer's way
    params_json: Annotated[
        dict[str, JsonValue] | None,
        typer.Option(
            help="Parameters as a JSON object; --param adds to it.",
            parser=PARAMS_JSON,
            metavar="JSON",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Download outputs here.", file_okay=False, writable=True)
    ] = None,
    lifetime: Annotated[
        int | None,
        typer.Option(
            help="Seconds before the job expires.", parser=JOB_LIFETIME, metavar="SECONDS"
        ),
    ] = None,
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = True,
    account: Annotated[
        str | None,
        typer.Option(help="The account that pays (default: the key's name).", parser=USER_ACCOUNT),
    ] = None,
    max_spend: Annotated[
        Decimal, typer.Option(help="The cheque's limit.", parser=MAX_SPEND, metavar="AMOUNT")
    ] = Decimal(1),
    as_json: JsonOption = False,
) -> None:
    """Sign for and pay for a job, upload its input through the upload PAR, start it through the
    run PAR, and follow it: the exit status says how it ended (see `parjobs --help`)."""
    user = load_key(key)
    payer = paying_account(account, user)
    # Checked here, before anything connects; `client.run` makes the request it signs.
    request = JobRequest(calculation=calculation, parameters=_parameters(param, params_json))

    def say(text: str) -> None:
        if not as_json:  # --json: stdout is the one JSON document
            console.print(text)

    async def run() -> tuple[str, JobSheetState | None, list[Path]]:
        async with client_session(user) as client:
            job = await client.run(
                request.calculation,
                input_file,
                request.parameters,
                max_spend=max_spend,
                account=payer,
                lifetime_s=lifetime,
            )
            job_uid = job.uid
            say(
                f"job [bold]{job_uid}[/]: input uploaded through the upload PAR, run started "
                f"through the run PAR; PARs expire {job.expires_at:%Y-%m-%d %H:%M:%S}Z"
            )
            if not watch:
                return job_uid, None, []
            final = await follow_job(client, job_uid, show=not as_json)
            say(f"job {job_uid} {final.state.value} {escape(final.reason or '')}")
            fetched = []
            if output is not None and final.state is JobState.COMPLETED:
                fetched = await client.fetch(job_uid, output)
                for path in fetched:
                    say(f"  {escape(str(path))}")
            return job_uid, final, fetched

    job_uid, final, fetched = anyio.run(run)
    if as_json:
        summary = sheet_summary(final) if final is not None else {"job": job_uid}
        print_json({**summary, "fetched": [str(path) for path in fetched]})
    if final is not None:
        raise typer.Exit(JOB_END_STATUS[final.state])


def sheet_summary(sheet: JobSheetState) -> dict[str, JsonValue]:
    """What `jobs status` tells of a job (and `--json` prints)."""
    return {
        "job": sheet.job_uid,
        "state": sheet.state.value,
        "calculation": sheet.request.calculation,
        "progress": sheet.progress,
        "expires_at": sheet.expires_at.isoformat(),
        "outputs": [o.key for o in sheet.outputs],
        "reason": sheet.reason,
    }


def status(job_uid: JobUidArgument, key: KeyOption, as_json: JsonOption = False) -> None:
    """The job's state, last progress, expiry and outputs."""
    user = load_key(key)

    async def run() -> JobSheetState:
        async with client_session(user) as client:
            reply = await client.job(job_uid, with_progress=True)
            return with_progress(reply.sheet, reply.progress)

    summary = sheet_summary(anyio.run(run))
    if as_json:
        print_json(summary)
        return
    for name, value in summary.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        console.print(f"{name}: {escape(str(shown if shown is not None else '-'))}")


def watch(job_uid: JobUidArgument, key: KeyOption, as_json: JsonOption = False) -> None:
    """A live progress bar, moved by the job's events, until the job ends (--json: each state as
    a line of JSON instead); the exit status says how it ended (see `parjobs --help`)."""
    user = load_key(key)

    async def run() -> JobSheetState:
        async with client_session(user) as client:
            if not as_json:
                return await follow_job(client, job_uid, show=True)
            async with aclosing(client.watch(job_uid)) as states:
                async for sheet in states:
                    typer.echo(json.dumps(sheet_summary(sheet), ensure_ascii=False))
            return sheet

    final = anyio.run(run)
    if not as_json:
        console.print(f"job {job_uid} {final.state.value} {escape(final.reason or '')}")
    raise typer.Exit(JOB_END_STATUS[final.state])


def events(job_uid: JobUidArgument, key: KeyOption, as_json: JsonOption = False) -> None:
    """The job's timeline: every event of its log (each verified)."""
    user = load_key(key)

    async def run() -> list[JobEvent]:
        async with client_session(user) as client:
            return await client.events(job_uid)

    log = anyio.run(run)
    if as_json:
        print_json([event.model_dump(mode="json") for event in log])
    else:
        console.print(timeline(log))


def fetch(
    job_uid: JobUidArgument,
    directory: Annotated[
        Path, typer.Argument(help="Where to write the outputs.", file_okay=False, writable=True)
    ],
    key: KeyOption,
) -> None:
    """Download a completed job's outputs (SHA-256 checked) through a read PAR."""
    user = load_key(key)

    async def run() -> None:
        async with client_session(user) as client:
            for path in await client.fetch(job_uid, directory):
                console.print(escape(str(path)))

    anyio.run(run)
