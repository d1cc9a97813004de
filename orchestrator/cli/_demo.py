"""`parjobs demo`: one whole job end to end on the embedded default (a local SeaweedFS).

Starts SeaweedFS and the three daemons as separate processes, submits a csv-summary job,
uploads the input through the upload PAR, starts it through the run PAR, shows progress,
downloads the outputs through a read PAR, prints the job's timeline, and replays the log.
"""

from __future__ import annotations

import json
import random
import secrets
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

from orchestrator._access import ObjectWriter
from orchestrator._broker import Broker
from orchestrator._client import ParjobsClient
from orchestrator._eventlog import EventLog
from orchestrator._exceptions import ParjobsError
from orchestrator._jobkeys import JobKeys
from orchestrator._keys import KeyPair
from orchestrator._objectstore import ObjectStore
from orchestrator._replay import replay
from orchestrator.cli._common import console
from orchestrator.cli._jobs import fetch_outputs, timeline, watch_job
from orchestrator.cli._ops import local_s3
from schemas.events import JobRequest
from workers.cluster import LocalCluster

DEMO_ROWS = 200_000


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
        broker = await stack.enter_async_context(Broker(cluster.amqp, name="parjobs-demo"))
        client = ParjobsClient(broker, sender="demo")
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        user = KeyPair.generate("demo-user")
        source = scratch / "weather.csv"
        _write_csv(source)

        request = JobRequest(calculation="csv-summary", parameters={"delimiter": ","})
        job_uid, upload, run_par, expires = await client.request_services(request, user.public)
        console.print(f"[green]✓[/] job {job_uid} contracted: {upload!r}, {run_par!r}")
        console.print(f"  both sealed for {user.name}, expiring {expires:%H:%M:%S}Z")
        sent = await ObjectWriter(upload, user).set_object_from_file(source)
        console.print(f"[green]✓[/] uploaded {sent.size:,} bytes through the upload PAR")
        await run_par.execute(user, control=client).start()
        console.print("[green]✓[/] started through the run PAR")
        final = await watch_job(client, job_uid)
        if final.state.value != "completed":
            raise ParjobsError(f"the demo job ended {final.state.value}: {final.reason}")
        for path in await fetch_outputs(client, user, job_uid, scratch / "outputs"):
            console.print(
                f"[green]✓[/] downloaded {path.name} through a read PAR (SHA-256 checked)"
            )
            summary = json.loads(path.read_text())
            console.print_json(json.dumps({k: summary[k] for k in list(summary)[:3]}))
        console.print(timeline((await client.job(job_uid, with_events=True)).events))

        store = await stack.enter_async_context(ObjectStore(s3))
        results = await replay(EventLog(store, JobKeys().jobs), broker)
        mine = [r for r in results if r.job_uid == job_uid]
        verdict = "agrees" if mine and mine[0].ok else f"DIVERGES: {mine}"
        console.print(f"[green]✓[/] replay: the job rebuilt from the stream {verdict} with its log")
