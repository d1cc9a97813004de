"""Replay's throughput: events/s and S3 requests by type, against the bare LIST + GET of the same
objects and against the checks alone on bytes already fetched, in the same run.

A private SeaweedFS (`LocalSeaweed`). --jobs jobs of --events events each are appended as the
services append them: `EventLog.create` by access, `transition` by storage and compute, each
role's log sealing with its own key (hash chain + Ed25519), and each event is published to the
events stream of an in-memory broker (RabbitMQ is not what is measured here: reading the stream
is the same for every row). Rows, each --repeat times (median):

- raw: bare aiobotocore, `list_objects_v2` pages over the jobs' root, then every object GET with
  --concurrency in flight, no parsing: the S3 side of a replay at best.
- checks: no I/O; the fetched bytes parsed (`JobEvent`), each job's log checked and compared
  with its stream records (`compare`: seals, links, the fold): the CPU side at best.
- replay: `orchestrator.services.replay.replay` as `parjobs admin replay` runs it.

Each row runs once more through a counting proxy (s3_counter.py, its own process) for its S3
requests by type; the rates come from the direct runs. See README.md.

    .venv/bin/python benchmarks/bench_replay.py [--jobs 200] [--events 6] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
from pydantic import TypeAdapter

from benchmarks.bench_jobs import s3_counting_proxy, s3_counts
from orchestrator.broker.memory import MemoryBroker
from orchestrator.core.keys import KeyPair
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.services.replay import StreamedEvent, compare, replay
from orchestrator.settings import AMQPSettings, S3Settings
from orchestrator.store.eventlog import EventLog, EventSealer
from orchestrator.store.s3 import S3ObjectStore, create_s3_client
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import (
    Completed,
    ComputeContracted,
    EventPayload,
    JobEvent,
    JobRequest,
    OutputFile,
    Progress,
    RunStarted,
    StorageContracted,
    Submitted,
)
from schemas.keys import PublicKeyData
from schemas.messages import Envelope, EventPublished
from schemas.par import PARData, PARKind
from schemas.signing import SERVICE_ROLES, ServiceRole

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

Run = Callable[[], Awaitable[int]]
ROWS = ("raw", "checks", "replay")
ROOT = "jobs/"
NOTES = """
events/s = events checked (raw: objects fetched) / wall time; ratio = replay / raw. S3/job:
requests per job by type, from one pass through the counting proxy. CPU ms/event: this process
(the one doing the checks) over the timed runs; SeaweedFS runs beside it on the same 2 cores."""


@dataclass
class Row:
    row: str
    jobs: int
    events: int
    concurrency: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    s3_requests: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / statistics.median(self.seconds)

    def to_json(self, raw: Row | None) -> str:
        result = {
            "row": self.row,
            "jobs": self.jobs,
            "events": self.events,
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "events_per_s": round(self.events_per_s),
            "cpu_ms_per_event": round(1000 * statistics.median(self.cpu_seconds) / self.events, 4),
            "s3_requests": self.s3_requests,
            "ratio_to_raw": None if raw is None else round(self.events_per_s / raw.events_per_s, 3),
        }
        return json.dumps(result)


def payloads(events: int) -> list[tuple[ServiceRole, EventPayload]]:
    """A completed job's events after `submitted`, with `events - 5` progress reports, and who
    appends each (as access.py, workers/storage.py and workers/compute.py do)."""
    now = datetime.now(UTC)

    def par(kind: PARKind, **flags: bool) -> PARData:
        return PARData(
            uid=uuid.uuid4().hex,
            kind=kind,
            issuer="storage",
            recipient="f" * 64,
            created_at=now,
            expires_at=now + timedelta(hours=1),
            sealed=bytes(180),  # about what a sealed PAR weighs
            **flags,
        )

    steps: list[tuple[ServiceRole, EventPayload]] = [
        (
            "storage",
            StorageContracted(
                upload_par=par(PARKind.OBJECT, is_writeable=True),
                output_par=par(PARKind.BUCKET, is_writeable=True),
            ),
        ),
        ("compute", ComputeContracted(run_par=par(PARKind.CALCULATION, is_executable=True))),
        ("compute", RunStarted()),
    ]
    steps += [("compute", Progress(message=f"step {n}", fraction=0.5)) for n in range(events - 5)]
    outputs = (OutputFile(key="summary.json", size=12, sha256="0" * 64),)
    return [*steps, ("compute", Completed(outputs=outputs, summary="1 file", cpu_seconds=0.01))]


def submitted() -> Submitted:
    return Submitted(
        request=JobRequest(calculation="checksum", parameters={"algo": "sha256"}),
        owner="ada",
        user="f" * 64,
        user_key=PublicKeyData(name="ada", x25519=bytes(32), ed25519=bytes(32)),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )


async def write_jobs(
    store: S3ObjectStore, broker: MemoryBroker, keys: dict[ServiceRole, KeyPair], args: Namespace
) -> None:
    """--jobs logs of --events events, each appended by its role's own sealing log and published
    to the events stream."""
    logs = {
        role: EventLog(store, ROOT, sealer=EventSealer(key, role)) for role, key in keys.items()
    }
    limit = anyio.CapacityLimiter(32)

    async def publish(event: JobEvent) -> None:
        body = Envelope(sender="bench", body=EventPublished(event=event))
        key = f"job.ada.{event.job_uid}.{event.payload.type}"
        await broker.publish(broker.topology.events, key, body, message_id=event.event_id)

    async def one_job() -> None:
        uid = uuid.uuid4().hex
        async with limit:
            await publish(await logs["access"].create(uid, "user:ada", submitted()))
            for role, payload in payloads(args.events):
                await publish(await logs[role].transition(uid, role, payload))

    async with anyio.create_task_group() as tasks:
        for _ in range(args.jobs):
            tasks.start_soon(one_job)


async def raw_fetch(s3: S3Client, bucket: str, concurrency: int) -> int:
    """LIST the root page by page and GET every object, `concurrency` at once; objects fetched."""
    limit = anyio.CapacityLimiter(concurrency)
    keys = [
        obj["Key"]
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=ROOT)
        for obj in page.get("Contents", [])
    ]

    async def get(key: str) -> None:
        async with limit:
            response = await s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                await body.read()

    async with anyio.create_task_group() as tasks:
        for key in keys:
            tasks.start_soon(get, key)
    return len(keys)


async def fetched_bytes(settings: S3Settings) -> dict[str, list[bytes]]:
    """Every stored event's bytes by job, in seq order (for the `checks` row, fetched untimed)."""
    by_job: dict[str, list[bytes]] = {}
    async with S3ObjectStore(settings) as store:
        for info in await store.list(ROOT):
            by_job.setdefault(info.key.split("/")[1], []).append(await store.get(info.key))
    return by_job


def check_all(
    by_job: dict[str, list[bytes]], stream: dict[str, list[StreamedEvent]], keys: ServiceKeys
) -> int:
    """Parse each job's bytes and check them as replay does; events checked."""
    parse = TypeAdapter(JobEvent).validate_json
    count = 0
    for uid, blobs in by_job.items():
        result = compare(uid, [parse(blob) for blob in blobs], stream[uid], keys)
        assert result.ok, result.problems
        count += len(blobs)
    return count


async def timed(run: Run, row: Row, events: int) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    done = await run()
    row.seconds.append(round(time.perf_counter() - started, 4))
    row.cpu_seconds.append(time.process_time() - cpu)
    assert done == events, f"{row.row}: {done} events, expected {events}"


async def bench(args: Namespace) -> list[Row]:
    keys = {role: KeyPair.generate(role) for role in SERVICE_ROLES}
    service_keys = ServiceKeys({role: key.public for role, key in keys.items()})
    events = args.jobs * args.events
    amqp = AMQPSettings(prefix=f"bench-replay-{uuid.uuid4().hex[:8]}")
    async with LocalSeaweed() as seaweed, MemoryBroker(amqp) as broker:
        await broker.declare()
        async with S3ObjectStore(seaweed.settings) as store:
            await write_jobs(store, broker, keys, args)
        stream: dict[str, list[StreamedEvent]] = {}
        async for record in broker.read_stream(
            broker.topology.events_stream, TypeAdapter(Envelope)
        ):
            assert isinstance(record.value.body, EventPublished)
            event = record.value.body.event
            stream.setdefault(event.job_uid, []).append(StreamedEvent(event, record.offset))
        by_job = await fetched_bytes(seaweed.settings)

        @asynccontextmanager
        async def runs(settings: S3Settings) -> AsyncIterator[dict[str, Run]]:
            """Each row's run, on clients opened (untimed) for `settings`."""
            async with create_s3_client(settings) as s3, S3ObjectStore(settings) as store:

                async def raw() -> int:
                    return await raw_fetch(s3, settings.bucket, args.concurrency)

                async def checks() -> int:
                    return check_all(by_job, stream, service_keys)

                async def replayed() -> int:
                    results = await replay(EventLog(store, ROOT), broker, service_keys)
                    assert all(result.ok for result in results), [r.problems for r in results]
                    return sum(result.stored.seq for result in results if result.stored)

                yield {"raw": raw, "checks": checks, "replay": replayed}

        rows = [Row(name, args.jobs, events, args.concurrency) for name in args.rows]
        async with runs(seaweed.settings) as direct:
            for _ in range(args.repeat):
                for row in rows:
                    await timed(direct[row.row], row, events)
        async with (
            s3_counting_proxy(seaweed.settings) as (counted_settings, counts_url),
            runs(counted_settings) as counted,
        ):
            for row in rows:
                before = await s3_counts(counts_url)
                await counted[row.row]()
                row.s3_requests = dict(sorted((await s3_counts(counts_url) - before).items()))
    return rows


def report(args: Namespace, rows: list[Row]) -> None:
    raw = next((row for row in rows if row.row == "raw"), None)
    if args.json:
        for row in rows:
            print(row.to_json(raw))
        return
    print(f"command: {shlex.join(sys.orig_argv)}")
    head = f"{'row':<8} {'events':>7} {'events/s':>9} {'ratio':>6} {'CPU ms/ev':>10}  S3/job"
    print(f"{head}\n{'-' * len(head)}")
    for row in rows:
        ratio = "" if raw is None else f"{row.events_per_s / raw.events_per_s:.2f}"
        cpu = 1000 * statistics.median(row.cpu_seconds) / row.events
        per_job = ", ".join(f"{kind} {n / row.jobs:.2f}" for kind, n in row.s3_requests.items())
        print(
            f"{row.row:<8} {row.events:>7} {row.events_per_s:>9,.0f} {ratio:>6} {cpu:>10.3f}  "
            f"{per_job or '-'}"
        )
    print(NOTES)


class Namespace(argparse.Namespace):
    jobs: int
    events: int
    concurrency: int
    repeat: int
    rows: list[str]
    json: bool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=200, help="jobs written and replayed")
    parser.add_argument("--events", type=int, default=6, help="events per job (at least 5)")
    parser.add_argument("--concurrency", type=int, default=64, help="raw GETs in flight")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median)")
    parser.add_argument(
        "--rows", type=lambda s: s.split(","), default=list(ROWS), help="of raw,checks,replay"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(namespace=Namespace())
    if args.events < 5 or not set(args.rows) <= set(ROWS):
        parser.error(f"--events is at least 5; --rows are of {','.join(ROWS)}")
    report(args, anyio.run(bench, args))


if __name__ == "__main__":
    main()
