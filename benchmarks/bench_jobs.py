"""Whole jobs through the three daemons: jobs/s, latency, messages, S3 requests and CPU per job,
against two raw references in the same run.

parjobs: LocalCluster (access, storage, compute subprocesses, each its own broker user) on a
private LocalSeaweed, own broker prefix; a registered user's client (their broker user, their key)
runs each job: `request_services` (submit, then follow the job's events until ready) -> upload
through the upload PAR -> `run_control.start()` -> `wait()` (follows events until it ends),
calculation `checksum`. raw-hops, same process: the same hops with aio-pika alone (persistent,
mandatory, publisher confirms, the same quorum queues with manual ack, the events stream, an
exclusive reply queue), a connection per service, a trivial handler per hop; its client hears
"ready"/"completed" as events. raw-durable: raw-hops plus as many conditional creates a job as
parjobs made (bare aiobotocore) and the same three presigned transfers (httpx). ratio = parjobs /
a reference. `--burst N`: then N parjobs jobs at once. See README.md.

    [PARJOBS_MAX_RUNS=2] .venv/bin/python benchmarks/bench_jobs.py [--jobs 50] [--concurrency 10]
    .venv/bin/python benchmarks/bench_jobs.py --jobs 20 --concurrency 1 --json   # one JSON per row
    .venv/bin/python benchmarks/bench_jobs.py --jobs 10 --burst 200    # and 200 jobs at once
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time
import uuid
from argparse import ArgumentParser, Namespace
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aio_pika
import httpx
import psutil
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.common import FieldTable
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter
from types_aiobotocore_s3 import S3Client

from orchestrator import KeyPair, ObjectWriter
from orchestrator.broker._memory import topic_matches
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import QueueSpec, Topology, declare
from orchestrator.client.client import ParjobsClient
from orchestrator.core.layout import JobKeys
from orchestrator.par.transfer import PARTransport
from orchestrator.services.accounts import Accounts
from orchestrator.settings import AMQPSettings, S3Settings, ServiceSettings
from orchestrator.store.s3 import S3ObjectStore, create_s3_client
from orchestrator.store.seaweed import LocalSeaweed, pick_ports
from schemas.events import JobRequest
from schemas.messages import Envelope, EventPublished
from workers.cluster import ROLES, LocalCluster

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as a script: benchmarks/ importable
from benchmarks.s3_counter import COUNTS_PATH, KINDS

# The raw pipeline's event bindings: '#' = <prefix>.events.stream, then storage's and compute's.
BINDINGS = ("#", "job.*.submitted", "job.*.storage_contracted")
RAW_CLIENT = ("job.*.compute_contracted", "job.*.completed")  # the raw client's queue: no polling
RAW_QUEUES = "dlq events.stream rpc.access rpc.runs storage compute client".split()  # noqa: SIM905
RECORD = b"x" * 1024  # a raw-durable write's body, and its output: about a stored event's size
MARKS = "client submit,submitted,storage_contracted,compute_contracted,client ready,client uploaded"
MARKS += ",run_started,completed,client saw it"  # a parjobs job's timeline, in order
NOTES = """
ratio: the cost of all parjobs adds to the bare hops: S3 event-log appends (conditional creates),
the ledger, the nonce, signing and checking every request, reply and event, PAR minting and HPKE
sealing, the deadline, upload, input download, a sandboxed run, output upload.

per job: msgs = AMQP messages published, queued = their copies routed into queues{kinds}
  parjobs: the client's requests counted by its Broker, one reply each; events read back from the
  events stream, each queued in every queue bound to it (the stream, the service queues, compute's
  stop queue, the client's own events queue): the client follows them, it does not poll; the
  deadlines and progress reports as the daemons count them (their /metrics).
  raw: counted as sent; its client's queue gets compute_contracted and completed: no polling.

where a parjobs job's time goes (an event's time: when it was built, before its PUT)"""
Timeline = dict[str, float]  # MARKS -> epoch s


class Result(NamedTuple):
    wall: float
    latencies: list[float]
    published: Counter[str]  # over all timed jobs: "request:<kind>", "reply", "event:<type>"
    queued: Counter[str]  # their copies routed into queues (an event: one per bound queue)
    s3_requests: Counter[str]  # over all timed jobs, by s3_counter.KINDS
    cpu_seconds: dict[str, float]  # process -> CPU s over the timed jobs


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU of `process` and of its children it has waited for (the calculations)."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def rabbitmq(amqp_url: str) -> psutil.Process | None:
    """The Erlang VM of the broker at `amqp_url` (the one listening on its port), if it runs on
    this host (shared: others' work counts too). Other nodes on this host are not it."""
    port = urlsplit(amqp_url.split(",")[0]).port or 5672
    for process in psutil.process_iter(["name"]):
        if process.info["name"] not in ("beam.smp", "beam"):
            continue
        with contextlib.suppress(psutil.Error):
            listening = (c.laddr.port for c in process.net_connections("tcp") if not c.raddr)
            if port in listening:
                return process
    return None


class CPUMeter:
    """CPU seconds per named process between `start()` and `stop()`."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(p) for name, p in self.processes.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(p) - self._before[name] for name, p in self.processes.items()}


@contextlib.asynccontextmanager
async def peak_rss(processes: dict[str, psutil.Process]) -> AsyncIterator[dict[str, float]]:
    """Each process's highest resident set (MiB) while the block runs, sampled every 0.2 s."""
    peaks = dict.fromkeys(processes, 0.0)

    async def sample() -> None:
        while True:
            for name, process in processes.items():
                with contextlib.suppress(psutil.Error):
                    peaks[name] = max(peaks[name], process.memory_info().rss / 2**20)
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    try:
        yield peaks
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


@contextlib.asynccontextmanager
async def s3_counting_proxy(upstream: S3Settings) -> AsyncIterator[tuple[S3Settings, str]]:
    """`upstream`'s settings pointed at a counting proxy (s3_counter.py, its own process), and
    the URL its counts are read from."""
    port = pick_ports(1)[0]
    upstream_port = urlsplit(upstream.require_endpoint()).port
    script = Path(__file__).with_name("s3_counter.py")
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(upstream_port), str(port), stdout=subprocess.PIPE
    )
    try:
        assert proxy.stdout is not None
        await asyncio.wait_for(proxy.stdout.readline(), 10)  # "ready"
        endpoint = f"http://127.0.0.1:{port}"
        yield upstream.model_copy(update={"endpoint_url": endpoint}), endpoint + COUNTS_PATH
    finally:
        proxy.terminate()
        await proxy.wait()


async def s3_counts(url: str) -> Counter[str]:
    async with httpx.AsyncClient() as http:
        return Counter[str]((await http.get(url)).raise_for_status().json())


def routes(key: str, bindings: tuple[str, ...]) -> int:
    """Queues an event with routing key `key` lands in, for these topic bindings."""
    return sum(topic_matches(binding, key) for binding in bindings)


def parjobs_bindings(cluster: LocalCluster, user: str) -> tuple[str, ...]:
    """Every binding on the parjobs events exchange: the stream, the services' queues, each
    compute daemon's stop queue, and the user's client's events queue."""
    topology = Topology(cluster.prefix)
    identities = Identities(topology)
    queues = [topology.events_stream, *itertools.chain(*identities.service_queues().values())]
    queues += [identities.stops_queue(name) for name in cluster.replicas("compute")]
    queues.append(identities.events_queue(identities.user_username(user), "bench"))
    events = topology.events.name
    return tuple(b.routing_key for q in queues for b in q.bindings if b.exchange == events)


async def daemon_publishes(cluster: LocalCluster) -> Counter[str]:
    """What the daemons say they published, by kind (their `/metrics`): for the publishes no
    one else sees, the deadlines and progress reports."""
    counts = Counter[str]()
    async with httpx.AsyncClient(timeout=10) as http:
        for name in cluster.instances:
            url = f"http://127.0.0.1:{cluster.health_ports[name]}/metrics"
            for family in text_string_to_metric_families((await http.get(url)).text):
                for sample in family.samples:
                    if sample.name == "parjobs_messages_published_total":
                        counts[sample.labels["kind"]] += int(sample.value)
    return counts


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
    """Counts the requests the client publishes, by kind; each one is answered by one reply."""

    requests: Counter[str] = Counter()  # noqa: RUF012 - one instance per run

    async def publish(self, *args: Any, **kwargs: Any) -> str:  # (exchange, key, Envelope, ...)
        if args[0] in (self.topology.commands, self.topology.commands.name):
            self.requests[f"request:{args[2].body.type}"] += 1
        return await super().publish(*args, **kwargs)


class Durable(NamedTuple):
    """What the raw-durable pipeline adds to the hops: bare aiobotocore and httpx."""

    s3: S3Client
    http: httpx.AsyncClient
    bucket: str
    writes: int  # conditional creates per job: as many as parjobs made, per job, in this run
    counts_url: str  # the S3 counting proxy's, as parjobs'
    seaweedfs: psutil.Process


def durable_steps(writes: int) -> dict[str, tuple[str, ...]]:
    """Where the raw-durable pipeline's conditional creates go, as parjobs places its 8: the
    submit (nonce, hold, event 1), storage's event, compute's contract event, the start's claim
    (run_started), the end (completed and the settlement, which raw has no hop for); fewer are
    taken from the end of that list, more added at the end."""
    places = ["access"] * 3 + ["storage", "compute", "run"] + ["completed"] * 2
    placed = places[:writes] + ["completed"] * max(0, writes - len(places))
    split = Counter(placed)
    hops = ("access", "storage", "compute", "run", "completed")
    return {hop: (f"write:{split[hop]}",) if split[hop] else () for hop in hops}


async def run_raw(
    args: Namespace, prefix: str, runs_prefetch: int, durable: Durable | None = None
) -> Result:
    """parjobs' hops with aio-pika alone: a connection per service, a trivial handler per hop.
    With `durable`, also parjobs' conditional creates (bare aiobotocore) and its three transfers
    (presigned URLs, httpx): the input's upload by the client, its download and the output's
    upload by compute."""
    settings, t = AMQPSettings(prefix=prefix), Topology(prefix)
    writes = durable_steps(durable.writes if durable else 0)
    if not durable:
        writes = dict.fromkeys(writes, ())
    written, payload = itertools.count(), os.urandom(args.input_kib * 1024)
    counts_url = durable.counts_url if durable else None
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
                    if step.startswith("write:"):
                        await write(job, int(step.removeprefix("write:")))
                    elif step == "transfers":
                        await transfer(job)
                    elif step == "reply":
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

    def key(job: str, name: str) -> str:
        return f"{prefix}/{job}/{name}"

    async def write(job: str, count: int) -> None:  # parjobs' appends: one after another
        assert durable is not None
        for _ in range(count):
            name = f"w{next(written)}"
            await durable.s3.put_object(
                Bucket=durable.bucket, Key=key(job, name), Body=RECORD, IfNoneMatch="*"
            )

    async def upload_input(job: str) -> None:  # the client, through a presigned PUT
        assert durable is not None
        params = {"Bucket": durable.bucket, "Key": key(job, "input")}
        url = await durable.s3.generate_presigned_url("put_object", Params=params, ExpiresIn=300)
        (await durable.http.put(url, content=payload)).raise_for_status()

    async def transfer(job: str) -> None:  # compute: the input down, the output up (POST policy)
        assert durable is not None
        params = {"Bucket": durable.bucket, "Key": key(job, "input")}
        url = await durable.s3.generate_presigned_url("get_object", Params=params, ExpiresIn=300)
        (await durable.http.get(url)).raise_for_status()
        post = await durable.s3.generate_presigned_post(
            Bucket=durable.bucket,
            Key=key(job, "output/${filename}"),
            Conditions=[["content-length-range", 0, 1 << 20]],
            ExpiresIn=300,
        )
        files = {"file": ("summary.json", RECORD)}
        (await durable.http.post(post["url"], data=post["fields"], files=files)).raise_for_status()

    async def job() -> None:  # submit, hear compute_contracted; start, hear completed
        job, loop, commands = uuid.uuid4().hex, asyncio.get_running_loop(), t.commands.name
        for service, event in (("access", "compute_contracted"), ("runs", "completed")):
            if service == "runs" and durable:
                await upload_input(job)
            heard = waiting[f"job.{job}.{event}"] = loop.create_future()
            reply = waiting[cid := uuid.uuid4().hex] = loop.create_future()
            props = {"correlation_id": cid, "reply_to": reply_to}
            await send(client, commands, t.rpc_routing_key(service), job, **props)
            await asyncio.gather(reply, heard)

    processes = {"client (every hop)": psutil.Process()}
    if durable:
        processes["seaweedfs"] = durable.seaweedfs
    if (broker_vm := rabbitmq(AMQPSettings().amqp_url.get_secret_value())) is not None:
        processes["rabbitmq (shared)"] = broker_vm
    meter = CPUMeter(processes)
    async with contextlib.AsyncExitStack() as stack:
        client = await serve("client", {t.work_queue("client", events=RAW_CLIENT): ()})
        await (await client.declare_queue(reply_to, exclusive=True)).consume(on_reply, no_ack=True)
        await serve("access", {t.rpc_queue("access"): (*writes["access"], "submitted", "reply")})
        storage = t.work_queue("storage", events=[BINDINGS[1]])
        await serve("storage", {storage: (*writes["storage"], "storage_contracted")})
        compute, runs = t.work_queue("compute", events=[BINDINGS[2]]), t.rpc_queue("runs")
        # As parjobs: the run holds the start message; claimed and started, then it runs.
        run = (*writes["run"], "run_started", "reply")
        run += ("transfers",) if durable else ()
        run += (*writes["completed"], "completed")
        await serve("compute", {compute: (*writes["compute"], "compute_contracted"), runs: run})
        await drive(job, args.warmup, args.concurrency)
        published.clear()
        queued.clear()
        s3_before = await s3_counts(counts_url) if counts_url else Counter[str]()
        meter.start()
        wall, *latencies = await drive(job, args.jobs, args.concurrency)
        cpu = meter.stop()
        s3_requests = await s3_counts(counts_url) - s3_before if counts_url else Counter[str]()
    return Result(wall, latencies, published, queued, s3_requests, cpu)


class Burst(NamedTuple):
    """`--burst`: jobs submitted all at once."""

    wall: float
    latencies: list[float]  # of the jobs that completed
    errors: Counter[str]  # the others: what the client raised (an error's code), by kind
    peak_rss_mib: dict[str, float]  # each daemon's, through the timed jobs and the burst


async def burst(
    job: Callable[[], Awaitable[None]], count: int, peak_rss_mib: dict[str, float]
) -> Burst:
    errors, start = Counter[str](), time.perf_counter()

    async def one() -> float | None:
        begin = time.perf_counter()
        try:
            await job()
        except Exception as exc:  # counted, as a user would see them
            errors[getattr(exc, "code", None) or type(exc).__name__] += 1
            return None
        return time.perf_counter() - begin

    ended = await asyncio.gather(*(one() for _ in range(count)))
    latencies = [seconds for seconds in ended if seconds is not None]
    return Burst(time.perf_counter() - start, latencies, errors, peak_rss_mib)


async def run_parjobs(
    args: Namespace, prefix: str, s3_settings: S3Settings, counts_url: str, seaweed: psutil.Process
) -> tuple[Result, list[Timeline], int, Burst | None]:
    """The result, each job's timeline, the warnings in the daemons' logs and, with `--burst`,
    the burst's figures."""
    user = KeyPair.generate("bench")
    async with (
        # PARJOBS_* come from os.environ; the cluster removes its topology and broker users.
        LocalCluster(s3_settings, prefix=prefix, delete_topology=True) as cluster,
        S3ObjectStore(s3_settings) as store,
    ):
        processes = {name: psutil.Process(cluster.pid(name)) for name in cluster.instances}
        processes |= {"seaweedfs": seaweed, "client": psutil.Process()}
        if (broker_vm := rabbitmq(AMQPSettings().amqp_url.get_secret_value())) is not None:
            processes["rabbitmq (shared)"] = broker_vm
        meter = CPUMeter(processes)
        amqp = await cluster.add_user(user.name, user.public)  # registered, own broker user
        await Accounts(store, JobKeys()).deposit(user.name, Decimal(1_000_000))
        async with (
            CountingBroker(amqp, name=f"{prefix}-client") as broker,
            ParjobsClient(broker, user, service_keys=cluster.service_keys) as client,
            PARTransport() as transport,  # one HTTP client for every upload, as a client keeps
        ):
            payload, marks = os.urandom(args.input_kib * 1024), dict[str, Timeline]()

            async def job(timed: bool = True) -> None:
                mark = {"client submit": time.time()}
                request = JobRequest(calculation="checksum")
                uid, upload, run, _ = await client.request_services(
                    request, account=user.name, max_spend=Decimal(1)
                )
                mark["client ready"] = time.time()
                await ObjectWriter(upload, user, transport=transport).set_object(payload)
                mark["client uploaded"] = time.time()
                control = run.execute(user, control=client)
                await control.start()
                if (reply := await control.wait(timeout=600)).state != "completed":
                    raise RuntimeError(f"job {uid} ended {reply.state}: {reply.detail}")
                if timed:
                    marks[uid] = mark | {"client saw it": time.time()}

            await drive(job, args.warmup, args.concurrency)
            marks.clear()
            broker.requests.clear()
            s3_before = await s3_counts(counts_url)
            published_before = await daemon_publishes(cluster)
            daemons = {role: processes[role] for role in cluster.instances}
            async with peak_rss(daemons) as peaks:
                meter.start()
                wall, *latencies = await drive(job, args.jobs, args.concurrency)
                requests = broker.requests.copy()
                await asyncio.sleep(1)  # a job's log may show `completed` before it is published
                cpu = meter.stop()  # (the jobs' tail: their last publishes, the sweep's)
                s3_requests = await s3_counts(counts_url) - s3_before
                by_daemons = await daemon_publishes(cluster) - published_before
                untimed = functools.partial(job, timed=False)
                burst_figures = await burst(untimed, args.burst, peaks) if args.burst else None
        published = requests + Counter(reply=requests.total())
        for kind in ("deadline", "progress"):  # seen by no one but their daemon and recipient
            if by_daemons[kind]:
                published[kind] = by_daemons[kind]
        queued = published.copy()  # a request or a reply: one queue
        bindings = parjobs_bindings(cluster, user.name)
        # The stream as the operator reads it (a user's broker user may not).
        async with AMQPBroker(cluster.operator_amqp, name=f"{prefix}-reader") as operator:
            stream = operator.read_stream(operator.topology.events_stream, TypeAdapter(Envelope))
            async for record in stream:
                body = record.value.body
                if isinstance(body, EventPublished) and (mark := marks.get(body.event.job_uid)):
                    published[kind := f"event:{body.event.payload.type}"] += 1
                    queued[kind] += routes(record.routing_key, bindings)
                    mark.setdefault(body.event.payload.type, body.event.time.timestamp())
        logs = (cluster.log_path(role).read_text() for role in ROLES)
        warnings = sum(log.count('"level": "warning"') for log in logs)
    result = Result(wall, latencies, published, queued, s3_requests, cpu)
    return result, list(marks.values()), warnings, burst_figures


Row = dict[str, Any]
"""One row of the report: what `--json` prints, one JSON object per line."""
LATENCIES = {"p50_ms": 0.5, "p90_ms": 0.9, "p99_ms": 0.99, "max_ms": 1.0}


def pipeline_row(name: str, result: Result, jobs: int) -> Row:
    """jobs/s, latency percentiles (ms) and messages per job of one pipeline."""
    return {
        "row": "pipeline",
        "pipeline": name,
        "jobs_per_s": jobs / result.wall,
        **{key: 1000 * pct(result.latencies, q) for key, q in LATENCIES.items()},
        "msgs_per_job": result.published.total() / jobs,
        "queued_per_job": result.queued.total() / jobs,
        "msgs_per_job_by_kind": {k: n / jobs for k, n in sorted(result.published.items())},
        "s3_per_job": result.s3_requests.total() / jobs,
        "s3_per_job_by_type": {k: result.s3_requests[k] / jobs for k in KINDS},
        "cpu_ms_per_job": 1000 * sum(result.cpu_seconds.values()) / jobs,
        "cpu_ms_per_job_by_process": {k: 1000 * s / jobs for k, s in result.cpu_seconds.items()},
    }


def stage_rows(lines: list[Timeline]) -> list[Row]:
    """Where a parjobs job's time goes: each step of its timeline, percentiles in ms."""
    rows = []
    for a, b in itertools.pairwise(MARKS.split(",")):
        spans = [1000 * (mark[b] - mark[a]) for mark in lines]
        quantiles = {"p50_ms": 0.5, "p90_ms": 0.9, "max_ms": 1.0}
        row = {key: pct(spans, q) for key, q in quantiles.items()}
        rows.append({"row": "stage", "stage": f"{a} -> {b}", **row})
    return rows


def burst_row(figures: Burst, jobs: int) -> Row:
    done = figures.latencies
    return {
        "row": "burst",
        "jobs": jobs,
        "completed": len(done),
        "errors": dict(figures.errors),
        "wall_s": figures.wall,
        "jobs_per_s": len(done) / figures.wall,
        **{key: 1000 * pct(done, LATENCIES[key]) if done else None for key in ("p50_ms", "p99_ms")},
        "max_ms": 1000 * max(done) if done else None,
        "peak_rss_mib": figures.peak_rss_mib,
    }


def ratio_row(ours: Row, references: tuple[Row, ...]) -> Row:
    """parjobs' jobs/s over each reference's (the issue's ">= 0.7x raw-durable")."""
    ratios = {row["pipeline"]: ours["jobs_per_s"] / row["jobs_per_s"] for row in references}
    return {"row": "ratio", "jobs_per_s_parjobs_over": ratios}


def print_table(run: Row, pipelines: tuple[Row, ...], stages: list[Row], extra: list[Row]) -> None:
    *references, ours = pipelines
    print(f"command: {run['command']}")
    print(
        f"{run['jobs']} jobs, {run['concurrency']} in flight, after {run['warmup']} untimed "
        f"warm-up job(s); checksum of {run['input_kib']} KiB; runs at once: {run['runs']} "
        f"(PARJOBS_MAX_RUNS; raw: its runs queue's prefetch); {run['cpus']} CPUs, python "
        f"{run['python']}; raw-durable: {run['durable_writes']} conditional creates a job\n"
    )
    head = f"{'pipeline':<32}{'jobs/s':>8}" + "".join(
        f"{key.replace('_ms', ' ms'):>8}" for key in LATENCIES
    )
    print(f"{head}{'msgs/job':>10}{'queued':>10}\n{'-' * (len(head) + 20)}")
    for row in pipelines:
        cells = "".join(f"{row[key]:>8.0f}" for key in LATENCIES)
        per_job = f"{row['msgs_per_job']:>10.1f}{row['queued_per_job']:>10.1f}"
        print(f"{row['pipeline']:<32}{row['jobs_per_s']:>8.2f}{cells}{per_job}")
    for raw in references:
        ratios = "".join(f"{ours[key] / raw[key]:>7.1f}x" for key in LATENCIES)
        name = f"ratio parjobs / {raw['pipeline'].split(':')[0]}"
        print(f"{name:<32}{ours['jobs_per_s'] / raw['jobs_per_s']:>8.3f}{ratios}")
    kinds = ""
    for row in pipelines:
        counts = ", ".join(f"{k} {n:.2f}" for k, n in row["msgs_per_job_by_kind"].items())
        name = row["pipeline"].split(":")[0] + ":"
        kinds += "\n" + textwrap.fill(f"{name} {counts}", 98, subsequent_indent="    ")
    print(NOTES.format(kinds=textwrap.indent(kinds, "  ")))
    print(f"{'stage':<48}{'p50 ms':>8}{'p90 ms':>8}{'max ms':>8}")
    for stage in stages:
        cells = "".join(f"{stage[key]:>8.0f}" for key in ("p50_ms", "p90_ms", "max_ms"))
        print(f"{stage['stage']:<48}{cells}")
    print(f"\nwarnings in the daemons' logs: {run['warnings']}")
    print("\nper job, over the timed jobs (S3 counted by the proxy all S3 traffic goes through):")
    for row in pipelines:
        s3 = ", ".join(f"{k} {n:.2f}" for k, n in row["s3_per_job_by_type"].items() if n)
        cpu = ", ".join(f"{k} {ms:.0f}" for k, ms in row["cpu_ms_per_job_by_process"].items())
        print(f"{row['pipeline']}:")
        print(
            textwrap.fill(
                f"S3 requests {row['s3_per_job']:.2f}: {s3 or '-'}",
                98,
                initial_indent="  ",
                subsequent_indent="    ",
            )
        )
        print(
            textwrap.fill(
                f"CPU ms {row['cpu_ms_per_job']:.0f}: {cpu}",
                98,
                initial_indent="  ",
                subsequent_indent="    ",
            )
        )
    for row in extra:
        if row["row"] == "burst":
            errors = ", ".join(f"{k} {n}" for k, n in row["errors"].items()) or "none"
            latency = "-"
            if row["completed"]:
                latency = ", ".join(
                    f"{k[:3]} {row[k]:.0f} ms" for k in ("p50_ms", "p99_ms", "max_ms")
                )
            rss = ", ".join(f"{k} {mib:.0f}" for k, mib in row["peak_rss_mib"].items())
            print(
                f"\nburst: {row['jobs']} jobs submitted at once (parjobs): {row['completed']} "
                f"completed in {row['wall_s']:.1f} s ({row['jobs_per_s']:.2f} jobs/s); "
                f"submit -> completed {latency}; client errors: {errors}; peak RSS MiB "
                f"(timed jobs and burst): {rss}"
            )


async def bench(args: Namespace) -> None:
    prefix, runs = f"bench-jobs-{uuid.uuid4().hex[:8]}", ServiceSettings().max_runs
    try:
        async with (
            LocalSeaweed() as seaweed,
            s3_counting_proxy(seaweed.settings) as (s3_settings, counts_url),
        ):
            weed = psutil.Process(seaweed.pid)
            raw = await run_raw(args, prefix + "-raw", runs)
            parjobs, timelines, warnings, burst_figures = await run_parjobs(
                args, prefix, s3_settings, counts_url, weed
            )
            # As many conditional creates a job as parjobs made, in this run.
            writes = round(parjobs.s3_requests["conditional PUT"] / args.jobs)
            async with (
                create_s3_client(s3_settings) as s3,
                httpx.AsyncClient() as http,  # one, as parjobs' client and compute keep theirs
            ):
                durable = Durable(s3, http, s3_settings.bucket, writes, counts_url, weed)
                raw_durable = await run_raw(args, prefix + "-durable", runs, durable)
    finally:  # delete what the raw pipelines declared (LocalCluster removes its own)
        url = AMQPSettings().amqp_url.get_secret_value()
        async with await aio_pika.connect(url) as connection, connection.channel() as channel:
            for raw_prefix in (f"{prefix}-raw", f"{prefix}-durable"):
                for queue in RAW_QUEUES:
                    await channel.queue_delete(f"{raw_prefix}.{queue}")
                for exchange in Topology(raw_prefix).exchanges:
                    await channel.exchange_delete(exchange.name)
    run: Row = {
        "row": "run",
        "command": shlex.join(sys.orig_argv),
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "input_kib": args.input_kib,
        "runs": runs,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "warnings": warnings,
        "durable_writes": writes,
    }
    pipelines = (
        pipeline_row("raw-hops: aio-pika, same hops", raw, args.jobs),
        pipeline_row("raw-durable: + S3, transfers", raw_durable, args.jobs),
        pipeline_row("parjobs: 3 daemons + SeaweedFS", parjobs, args.jobs),
    )
    extra = [ratio_row(pipelines[-1], pipelines[:-1])]
    if burst_figures is not None:
        extra.append(burst_row(burst_figures, args.burst))
    stages = stage_rows(timelines)
    if args.json:
        for row in (run, *pipelines, *extra, *stages):
            print(json.dumps(row))
    else:
        print_table(run, pipelines, stages, extra)


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=50, help="timed jobs per pipeline")
    parser.add_argument("--concurrency", type=int, default=10, help="jobs in flight at once")
    parser.add_argument("--input-kib", type=int, default=4, help="each job's input (KiB)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed jobs first, per pipeline")
    parser.add_argument("--json", action="store_true", help="one JSON object per row, no table")
    parser.add_argument(
        "--burst",
        type=int,
        default=0,
        metavar="N",
        help="then N parjobs jobs submitted at once: p50/p99 submit -> completed, client errors",
    )
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
