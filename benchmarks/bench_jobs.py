"""Whole jobs through the three daemons: jobs/s, latency and AMQP messages per job, vs raw aio-pika.

parjobs: LocalCluster (access, storage, compute subprocesses) on a private LocalSeaweed, own broker
prefix; a job = `request_services` (submit, poll until ready) -> upload through the upload PAR ->
`run_control.start()` -> `wait()` (polls status), calculation `checksum`. raw, same process: the
same hops with aio-pika alone (persistent, mandatory, publisher confirms, the same quorum queues
with manual ack, the events stream, an exclusive reply queue), a connection per service, a trivial
handler per hop; its client hears "ready"/"completed" as events. ratio = parjobs / raw: the cost
of everything parjobs adds (event log on S3, PARs, polling, transfers, subprocess). See README.md.

    [PARJOBS_MAX_RUNS=2] .venv/bin/python benchmarks/bench_jobs.py [--jobs 50] [--concurrency 10]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shlex
import sys
import textwrap
import time
import uuid
from argparse import ArgumentParser, Namespace
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, NamedTuple

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.common import FieldTable
from pydantic import TypeAdapter

from orchestrator import KeyPair, ObjectWriter
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.topology import QueueSpec, Topology, declare
from orchestrator.client.client import ParjobsClient
from orchestrator.core.layout import JobKeys
from orchestrator.services.accounts import Accounts
from orchestrator.settings import AMQPSettings, ServiceSettings
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobRequest
from schemas.messages import Envelope, EventPublished
from workers.cluster import ROLES, LocalCluster
from workers.daemons import delete_topology

# Event bindings: '#' = <prefix>.events.stream; the others as workers/daemons.py binds its queues.
BINDINGS = ("#", "job.*.submitted", "job.*.storage_contracted")
RAW_CLIENT = ("job.*.compute_contracted", "job.*.completed")  # the raw client's queue: no polling
RAW_QUEUES = "dlq events.stream rpc.access rpc.runs storage compute client".split()  # noqa: SIM905
MARKS = "client submit,submitted,storage_contracted,compute_contracted,client ready,client uploaded"
MARKS += ",run_started,completed,client saw it"  # a parjobs job's timeline, in order
NOTES = """
ratio: the cost of all parjobs adds to the bare hops: S3 event-log appends (conditional creates,
each handler re-reading the log), PAR minting and HPKE sealing, the client's polling (GetJob every
0.2 s until ready, status every 0.5 s), upload, input download, subprocess, output upload.

per job: msgs = AMQP messages published, queued = their copies routed into queues{kinds}
  parjobs: the client's requests counted by its Broker, one reply each; events read back from the
  events stream, each queued in the stream + storage (submitted) or compute (storage_contracted).
  raw: counted as sent; its client's queue gets compute_contracted and completed: no polling.

where a parjobs job's time goes (an event's time: when it was built, before its PUT)"""
Timeline = dict[str, float]  # MARKS -> epoch s


class Result(NamedTuple):
    wall: float
    latencies: list[float]
    published: Counter[str]  # over all timed jobs: "request:<kind>", "reply", "event:<type>"
    queued: Counter[str]  # their copies routed into queues (an event: one per bound queue)


def routes(key: str, bindings: tuple[str, ...]) -> int:
    """Queues the event job.<uid>.<type> lands in, for bindings '#' and 'job.*.<type>'."""
    return sum(b in ("#", f"job.*.{key.split('.')[2]}") for b in bindings)


def pct(values: list[float], q: float) -> float:
    return sorted(values)[max(0, math.ceil(q * len(values)) - 1)]  # nearest rank


async def drive(job: Callable[[], Awaitable[None]], count: int, limit: int) -> list[float]:
    """Run `count` jobs, `limit` at once: [wall s, then each job's latency s]."""
    gate, start = asyncio.Semaphore(limit), time.perf_counter()

    async def one() -> float:
        async with gate:
            begin = time.perf_counter()
            await job()
            return time.perf_counter() - begin

    latencies = await asyncio.gather(*(one() for _ in range(count)))
    return [time.perf_counter() - start, *latencies]


class CountingBroker(AMQPBroker):
    """Counts the client's requests by kind; each one is answered by exactly one reply."""

    requests: Counter[str] = Counter()  # noqa: RUF012 - one instance per run

    async def request(self, *args: Any, **kwargs: Any) -> Any:  # (exchange, key, Envelope, ...)
        kind = args[2].body.type
        self.requests[f"request:{kind}"] += 1
        return await super().request(*args, **kwargs)


async def run_raw(args: Namespace, prefix: str, runs_prefetch: int) -> Result:
    """parjobs' hops with aio-pika alone: a connection per service, a trivial handler per hop."""
    settings, t = AMQPSettings(prefix=prefix), Topology(prefix)
    events, reply_to = t.events.name, t.reply_queue(uuid.uuid4().hex).name
    published, queued = Counter[str](), Counter[str]()
    waiting: dict[str | None, asyncio.Future[None]] = {}

    async def send(ch: AbstractChannel, exchange: str, key: str, body: str, **props: Any) -> None:
        event = f"event:{key.split('.')[-1]}" if exchange == events else None
        kind = event or (f"request:{key}" if exchange else "reply")
        published[kind] += 1  # before the publish: a consumer may see it before our confirm
        queued[kind] += routes(key, BINDINGS + RAW_CLIENT) if event else 1
        props |= {"delivery_mode": aio_pika.DeliveryMode.PERSISTENT, "message_id": uuid.uuid4().hex}
        target = await ch.get_exchange(exchange, ensure=False) if exchange else ch.default_exchange
        await target.publish(aio_pika.Message(body.encode(), **props), key, mandatory=True)

    async def serve(name: str, steps: dict[QueueSpec, tuple[str, ...]]) -> AbstractChannel:
        """As parjobs' Broker: a connection, its publishing channel (confirms), a consumer channel
        per queue whose handler publishes its steps (events or the reply), then acks."""
        names: FieldTable = {"connection_name": f"{prefix}-{name}"}
        url = settings.amqp_url.get_secret_value()
        connection = await aio_pika.connect(url, client_properties=names)
        await stack.enter_async_context(connection)
        publisher = await connection.channel()
        await declare(publisher, t, steps)
        for spec, todo in steps.items():
            channel = await connection.channel(publisher_confirms=False)
            runs = spec.name.endswith(".runs")
            await channel.set_qos(runs_prefetch if runs else settings.prefetch)

            async def handle(msg: AbstractIncomingMessage, todo: tuple[str, ...] = todo) -> None:
                job = msg.body.decode()
                for step in todo:
                    if step == "reply":
                        to, cid = msg.reply_to or "", msg.correlation_id
                        await send(publisher, "", to, "", correlation_id=cid)
                    else:
                        await send(publisher, events, f"job.{job}.{step}", job)
                if not todo:  # the client's queue: every event it takes has a waiter
                    waiting.pop(msg.routing_key).set_result(None)
                await msg.ack()  # manual, once this handler's publishes are confirmed

            await (await channel.get_queue(spec.name)).consume(handle)
        return publisher

    async def on_reply(message: AbstractIncomingMessage) -> None:
        waiting.pop(message.correlation_id).set_result(None)

    async def job() -> None:  # submit, hear compute_contracted; start, hear completed
        job, loop, commands = uuid.uuid4().hex, asyncio.get_running_loop(), t.commands.name
        for service, event in (("access", "compute_contracted"), ("runs", "completed")):
            heard = waiting[f"job.{job}.{event}"] = loop.create_future()
            reply = waiting[cid := uuid.uuid4().hex] = loop.create_future()
            props = {"correlation_id": cid, "reply_to": reply_to}
            await send(client, commands, t.rpc_routing_key(service), job, **props)
            await asyncio.gather(reply, heard)

    async with contextlib.AsyncExitStack() as stack:
        client = await serve("client", {t.work_queue("client", events=RAW_CLIENT): ()})
        await (await client.declare_queue(reply_to, exclusive=True)).consume(on_reply, no_ack=True)
        await serve("access", {t.rpc_queue("access"): ("submitted", "reply")})
        storage = t.work_queue("storage", events=[BINDINGS[1]])
        await serve("storage", {storage: ("storage_contracted",)})
        compute, runs = t.work_queue("compute", events=[BINDINGS[2]]), t.rpc_queue("runs")
        run = ("run_started", "reply", "completed")  # as parjobs, the run holds the start message
        await serve("compute", {compute: ("compute_contracted",), runs: run})
        await drive(job, args.warmup, args.concurrency)
        published.clear()
        queued.clear()
        wall, *latencies = await drive(job, args.jobs, args.concurrency)
    return Result(wall, latencies, published, queued)


async def run_parjobs(args: Namespace, prefix: str) -> tuple[Result, list[Timeline], int]:
    """The result, each job's timeline, and the warnings in the daemons' logs."""
    async with (
        LocalSeaweed() as s3,
        LocalCluster(s3.settings, prefix=prefix) as cluster,  # PARJOBS_* come from os.environ
        CountingBroker(cluster.amqp, name=f"{prefix}-client") as broker,
        S3ObjectStore(s3.settings) as store,
    ):
        client, user = ParjobsClient(broker), KeyPair.generate("bench")
        accounts = Accounts(store, JobKeys())  # a funded user: every job is signed and paid
        await accounts.add_user(user.name, user.public)
        await accounts.deposit(user.name, Decimal(1_000_000))
        payload, marks = os.urandom(args.input_kib * 1024), dict[str, Timeline]()

        async def job() -> None:
            mark = {"client submit": time.time()}
            request = JobRequest(calculation="checksum")
            uid, upload, run, _ = await client.request_services(
                request, user, account=user.name, max_spend=Decimal(1)
            )
            mark["client ready"] = time.time()
            await ObjectWriter(upload, user).set_object(payload)
            mark["client uploaded"] = time.time()
            control = run.execute(user, control=client)
            await control.start()
            if (reply := await control.wait(timeout=600)).state != "completed":
                raise RuntimeError(f"job {uid} ended {reply.state}: {reply.detail}")
            marks[uid] = mark | {"client saw it": time.time()}

        await drive(job, args.warmup, args.concurrency)
        marks.clear()
        broker.requests.clear()
        wall, *latencies = await drive(job, args.jobs, args.concurrency)
        await asyncio.sleep(1)  # a job's log may show `completed` before its publish is confirmed
        published = broker.requests + Counter(reply=broker.requests.total())
        queued = published.copy()  # a request or a reply: one queue
        stream = broker.read_stream(broker.topology.events_stream, TypeAdapter(Envelope))
        async for record in stream:
            body = record.value.body
            if isinstance(body, EventPublished) and (mark := marks.get(body.event.job_uid)):
                published[kind := f"event:{body.event.payload.type}"] += 1
                queued[kind] += routes(record.routing_key, BINDINGS)
                mark.setdefault(body.event.payload.type, body.event.time.timestamp())
        logs = (cluster.log_path(role).read_text() for role in ROLES)
        warnings = sum(log.count('"level": "warning"') for log in logs)
    return Result(wall, latencies, published, queued), list(marks.values()), warnings


def row(name: str, result: Result, jobs: int) -> list[float]:
    """Print the table row of `result`; its jobs/s and latency percentiles (ms)."""
    values = [jobs / result.wall, *(1000 * pct(result.latencies, q) for q in (0.5, 0.9, 0.99, 1))]
    cells = "".join(f"{v:>8.0f}" for v in values[1:])
    per_job = f"{result.published.total() / jobs:>10.1f}{result.queued.total() / jobs:>10.1f}"
    print(f"{name:<32}{values[0]:>8.2f}{cells}{per_job}")
    return values


def report(args: Namespace, runs: int, raw: Result, ours: Result, lines: list[Timeline]) -> None:
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"{args.jobs} jobs, {args.concurrency} in flight, after {args.warmup} untimed warm-up "
        f"job(s); checksum of {args.input_kib} KiB; runs at once: {runs} (PARJOBS_MAX_RUNS; raw: "
        f"its runs queue's prefetch); {os.cpu_count()} CPUs, python {sys.version.split()[0]}\n"
    )
    head = f"{'pipeline':<32}{'jobs/s':>8}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'max ms':>8}"
    print(f"{head}{'msgs/job':>10}{'queued':>10}\n{'-' * (len(head) + 20)}")
    base = row("raw aio-pika, same hops", raw, args.jobs)
    mine = row("parjobs: 3 daemons + SeaweedFS", ours, args.jobs)
    ratios = "".join(f"{m / b:>7.1f}x" for m, b in zip(mine[1:], base[1:], strict=True))
    print(f"{'ratio parjobs / raw':<32}{mine[0] / base[0]:>8.3f}{ratios}")
    kinds = ""
    for name, result in (("raw:", raw), ("parjobs:", ours)):
        counts = ", ".join(f"{k} {n / args.jobs:.2f}" for k, n in sorted(result.published.items()))
        kinds += "\n" + textwrap.fill(f"{name} {counts}", 98, subsequent_indent="    ")
    print(NOTES.format(kinds=textwrap.indent(kinds, "  ")))
    print(f"{'stage':<48}{'p50 ms':>8}{'p90 ms':>8}{'max ms':>8}")
    for a, b in itertools.pairwise(MARKS.split(",")):
        spans = [1000 * (mark[b] - mark[a]) for mark in lines]
        print(f"{a + ' -> ' + b:<48}" + "".join(f"{pct(spans, q):>8.0f}" for q in (0.5, 0.9, 1)))


async def bench(args: Namespace) -> None:
    prefix, runs = f"bench-jobs-{uuid.uuid4().hex[:8]}", ServiceSettings().max_runs
    try:
        raw = await run_raw(args, prefix + "-raw", runs)
        parjobs, timelines, warnings = await run_parjobs(args, prefix)
    finally:  # delete what either declared (reply queues went with their connections)
        await delete_topology(AMQPSettings(prefix=prefix))
        url = AMQPSettings().amqp_url.get_secret_value()
        async with await aio_pika.connect(url) as connection, connection.channel() as channel:
            for queue in RAW_QUEUES:
                await channel.queue_delete(f"{prefix}-raw.{queue}")
            for exchange in Topology(prefix + "-raw").exchanges:
                await channel.exchange_delete(exchange.name)
    report(args, runs, raw, parjobs, timelines)
    print(f"\nwarnings in the daemons' logs: {warnings}")


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=50, help="timed jobs per pipeline")
    parser.add_argument("--concurrency", type=int, default=10, help="jobs in flight at once")
    parser.add_argument("--input-kib", type=int, default=4, help="each job's input (KiB)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed jobs first, per pipeline")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
