"""`parjobs demo`: one whole job end to end on the embedded default (a local SeaweedFS).

Starts SeaweedFS and the three daemons as separate processes (each as its own broker user, with
its own key), registers a user (with a broker user of their own) and funds their account, submits
a signed csv-summary job paid by a cheque, uploads the input through the upload
PAR, starts it through the run PAR, shows progress, downloads the outputs through a read PAR,
prints the job's timeline and its payment (balance before, cheque, charge, refund, balance
after), replays the log and verifies the books.
"""

from __future__ import annotations

import json
import random
import secrets
import tempfile
from contextlib import AsyncExitStack
from decimal import Decimal
from pathlib import Path

import anyio
from rich.table import Table

from orchestrator.broker.amqp import AMQPBroker
from orchestrator.cli._common import console
from orchestrator.cli._jobs import follow_job, timeline
from orchestrator.cli._money import statement_table
from orchestrator.cli._ops import local_s3
from orchestrator.client.client import ParjobsClient
from orchestrator.core.keys import KeyPair
from orchestrator.core.layout import JobKeys
from orchestrator.core.ledger_rules import ACCESS
from orchestrator.errors import ParjobsError
from orchestrator.par.io import ObjectWriter
from orchestrator.services.accounts import Accounts
from orchestrator.services.replay import replay
from orchestrator.store.eventlog import EventLog
from orchestrator.store.s3 import S3ObjectStore
from schemas.events import JobRequest, JobSheetState
from schemas.ledger import Transaction
from workers.cluster import LocalCluster

DEMO_ROWS = 200_000
DEPOSIT = Decimal("10.00")
MAX_SPEND = Decimal("2.00")


def _write_csv(path: Path) -> None:
    rng = random.Random(7)  # noqa: S311 - demo data
    with path.open("w") as out:
        out.write("city,temperature,rain_mm\n")
        for _ in range(DEMO_ROWS):
            city = rng.choice(["Oslo", "Lyon", "Porto", "Graz"])
            out.write(f"{city},{rng.gauss(12, 6):.1f},{max(0.0, rng.gauss(2, 3)):.1f}\n")


async def run_job_demo() -> None:
    prefix = f"demo{secrets.token_hex(4)}"
    async with AsyncExitStack() as stack:
        s3 = await local_s3(stack)
        cluster = LocalCluster(s3, prefix=prefix, delete_topology=True)
        await stack.enter_async_context(cluster)
        console.print(f"access, storage, compute daemons ready as separate processes ({prefix})")
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        user = KeyPair.generate("demo-user")
        user_amqp = await cluster.add_user(user.name, user.public)
        broker = await stack.enter_async_context(AMQPBroker(user_amqp, name="parjobs-demo"))
        client = await stack.enter_async_context(
            ParjobsClient(broker, user, service_keys=cluster.service_keys, sender="demo")
        )
        store = await stack.enter_async_context(S3ObjectStore(s3))
        accounts = Accounts(store, JobKeys())
        await accounts.deposit(user.name, DEPOSIT)
        before = await accounts.balance(user.name)
        console.print(
            f"[green]✓[/] registered {user.name} (a broker user of their own); deposited "
            f"{DEPOSIT}: balance {before}"
        )
        source = scratch / "weather.csv"
        _write_csv(source)

        request = JobRequest(calculation="csv-summary", parameters={"delimiter": ","})
        job_uid, upload, run_par, expires = await client.request_services(
            request, account=user.name, max_spend=MAX_SPEND
        )
        console.print(f"[green]✓[/] job {job_uid} signed for, paid by a cheque, contracted:")
        console.print(f"  {upload!r}\n  {run_par!r}")
        console.print(f"  both sealed for {user.name}, expiring {expires:%H:%M:%S}Z")
        sent = await ObjectWriter(upload, user).set_object_from_file(source)
        console.print(f"[green]✓[/] uploaded {sent.size:,} bytes through the upload PAR")
        await run_par.execute(user, control=client).start()
        console.print("[green]✓[/] started through the run PAR")
        final = await follow_job(client, job_uid, show=True)
        if final.state.value != "completed":
            raise ParjobsError(f"the demo job ended {final.state.value}: {final.reason}")
        for path in await client.fetch(job_uid, scratch / "outputs"):
            console.print(f"[green]✓[/] downloaded {path.name} through a read PAR, SHA-256 checked")
            summary = json.loads(path.read_text())
            console.print_json(json.dumps({k: summary[k] for k in list(summary)[:3]}))
        console.print(timeline((await client.job(job_uid, with_events=True)).events))

        await _show_payment(accounts, user.name, job_uid, before, final)
        operator = await stack.enter_async_context(
            AMQPBroker(cluster.operator_amqp, name="parjobs-demo-operator")
        )
        results = await replay(EventLog(store, JobKeys().jobs), operator, cluster.service_keys)
        mine = [r for r in results if r.job_uid == job_uid]
        verdict = "agrees" if mine and mine[0].ok else f"DIVERGES: {mine}"
        console.print(f"[green]✓[/] replay: the job rebuilt from the stream {verdict} with its log")
        problems = await accounts.verify_books()
        console.print(f"[green]✓[/] ledger verify: {'; '.join(problems) or 'the books balance'}")


async def _show_payment(
    accounts: Accounts, name: str, job_uid: str, before: Decimal, final: JobSheetState
) -> None:
    """Balance before, the cheque, what was held, charged and refunded, balance after."""
    settled = await _settlement(accounts, job_uid)
    payment = final.payment
    if payment is None or settled is None:
        raise ParjobsError(f"job {job_uid} has no payment or was not settled")
    charge = next((n.amount for n in settled.notes if n.account == ACCESS), Decimal(0))
    rows = [
        ("balance before", f"{before}"),
        ("cheque", f"{payment.cheque.cheque_id[:12]}… max spend {payment.cheque.max_spend}"),
        ("held when cashed", f"{payment.held}"),
        ("charged", f"{charge}  ({final.cpu_seconds:.3f} CPU-s of csv-summary)"),
        ("refunded", f"{payment.held - charge}"),
        ("balance after", f"{await accounts.balance(name)}"),
    ]
    table = Table("payment", "")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(statement_table(await accounts.statement(name)))


async def _settlement(accounts: Accounts, job_uid: str) -> Transaction | None:
    # Settlement follows the `completed` event through the access daemon: wait briefly for it.
    with anyio.move_on_after(15):
        while True:
            for tx in await accounts.ledger.read():
                if tx.kind == "settle" and tx.job_uid == job_uid:
                    return tx
            await anyio.sleep(0.2)
    return None
