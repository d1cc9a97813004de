"""End to end: the three daemons as separate processes (`LocalCluster`) on the real RabbitMQ and
the session's SeaweedFS, driven the way a user drives them (a `ParjobsClient`, PARs, S3).

One cluster serves the module; tests that kill, stop or disconnect daemons, or need other settings,
start a cluster of their own. Every cluster has its own broker prefix and data root, removed
afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import httpx
import pytest
from pydantic import JsonValue, TypeAdapter

from orchestrator import PAR, BucketReader, KeyPair, ObjectWriter
from orchestrator.broker._dlq import CODE_HEADER, REASON_HEADER
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker, DeadLetter, DeadLetterReason, IncomingMeta
from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import Topology
from orchestrator.client.client import ParjobsClient
from orchestrator.client.jobsheet import JobSheet
from orchestrator.core.chain import seal_event
from orchestrator.core.layout import JobKeys
from orchestrator.core.message_signing import sign_message
from orchestrator.core.run_commands import run_command
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import PARExpiredError, RunRefusedError, WrongKeyError
from orchestrator.par.par import RunControl
from orchestrator.par.transfer import PARTransport
from orchestrator.services.accounts import Accounts
from orchestrator.services.replay import replay
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import Completed, JobEvent, JobRequest, JobSheetState, JobState
from schemas.messages import Envelope, EventPublished, ProgressReport, RunReply
from tests._waiting import eventually
from tests.conftest import RabbitMQCtl
from workers.cluster import ROLES, LocalCluster

pytestmark = pytest.mark.integration

ENVELOPE = TypeAdapter(Envelope)
PROCESSES_PER_RUN = 3
"""What one sandboxed run is on this machine: bwrap, the sandbox's supervisor, the calculation
(a built-in's script runs in the supervisor's forked child)."""
HAPPY_PATH = ("submitted", "storage_contracted", "compute_contracted", "run_started", "completed")
MAY_WAIT = ("queued",)
"""Between `compute_contracted` and `run_started` when its compute daemon's run slots are taken."""


# --- clusters -----------------------------------------------------------------------------------


ACCOUNT = "e2e-user"
MAX_SPEND = Decimal(5)


@dataclass
class Harness:
    """A running cluster and a user of it: their key pair, a client on their own broker
    connection; and the operator's broker connection, to look at the system from outside."""

    cluster: LocalCluster
    broker: Broker
    """The user's broker connection (as their own broker user)."""
    operator: Broker
    """The operator's: reads the events stream and the dead letters, publishes anywhere."""
    client: ParjobsClient
    store: ObjectStore
    root: str  # the cluster's PARJOBS_DATA_ROOT
    user: KeyPair

    @property
    def topology(self) -> Topology:
        return self.broker.topology

    @property
    def ids(self) -> Identities:
        return Identities(self.topology)

    # --- a user's steps --------------------------------------------------------------------------

    async def submit(self, request: JobRequest, *, lifetime_s: int | None = None) -> JobSheetState:
        """Submit `request`, signed by the user and paid from their account."""
        return await self.client.submit_paid(
            request, account=ACCOUNT, max_spend=MAX_SPEND, lifetime_s=lifetime_s
        )

    async def ready_job(
        self,
        calculation: str = "checksum",
        parameters: dict[str, JsonValue] | None = None,
        *,
        lifetime_s: int | None = None,
    ) -> tuple[str, PAR, PAR]:
        """Submit and wait until storage and compute contracted: (job uid, upload, run PAR)."""
        request = JobRequest(calculation=calculation, parameters=parameters or {})
        sheet = await self.submit(request, lifetime_s=lifetime_s)
        ready = await self.client.wait_until(sheet.job_uid, frozenset({JobState.READY}), timeout=60)
        assert ready.state is JobState.READY, f"{ready.state}: {ready.reason}"
        assert ready.upload_par is not None
        assert ready.run_par is not None
        return ready.job_uid, PAR(ready.upload_par), PAR(ready.run_par)

    async def start_job(
        self,
        data: bytes,
        calculation: str = "checksum",
        parameters: dict[str, JsonValue] | None = None,
    ) -> tuple[str, RunControl]:
        """A job whose input is uploaded and whose run was started (accepted)."""
        job_uid, upload, run = await self.ready_job(calculation, parameters)
        sent = await ObjectWriter(upload, self.user).set_object(data)
        assert sent.size == len(data)
        control = run.execute(self.user, control=self.client)
        reply = await control.start()
        assert reply.accepted, reply
        assert reply.job_uid == job_uid
        return job_uid, control

    async def run_job(
        self,
        data: bytes,
        calculation: str = "checksum",
        parameters: dict[str, JsonValue] | None = None,
        *,
        timeout: float = 60,  # noqa: ASYNC109 - a deadline for the whole job
    ) -> JobSheetState:
        """Submit, upload, start and wait until the job ends; its final sheet."""
        job_uid, control = await self.start_job(data, calculation, parameters)
        await control.wait(timeout=timeout)
        return (await self.client.job(job_uid)).sheet

    async def events(self, job_uid: str) -> list[JobEvent]:
        return list((await self.client.job(job_uid, with_events=True)).events)

    async def check_checksum_job(self, job_uid: str, data: bytes) -> None:
        """The job completed exactly once, and its summary is the checksum of `data`."""
        events = await self.events(job_uid)
        assert [event.seq for event in events] == list(range(1, len(events) + 1))
        assert len({event.event_id for event in events}) == len(events)
        kinds = kinds_of(events)
        assert {kind: kinds[kind] for kind in HAPPY_PATH} == dict.fromkeys(HAPPY_PATH, 1), kinds
        assert set(kinds) <= {*HAPPY_PATH, *MAY_WAIT, "progress"}, kinds
        assert events[-1].payload.type == "completed"
        completed = events[-1].payload
        assert isinstance(completed, Completed)
        assert [output.key for output in completed.outputs] == ["summary.json"]

        reader = BucketReader(await self.client.outputs(job_uid), self.user)
        assert reader.list_keys() == ["summary.json"]
        raw = await reader.get_object("summary.json")
        recorded = completed.outputs[0]
        assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (recorded.sha256, recorded.size)
        summary = json.loads(raw)
        assert summary["calculation"] == "checksum"
        assert summary["sha256"] == hashlib.sha256(data).hexdigest()
        assert summary["size_bytes"] == len(data)

    # --- looking at the system from outside ------------------------------------------------------

    async def stream_records(self, job_uid: str) -> list[tuple[str | None, Envelope]]:
        """(message id, envelope) of every message the events stream holds for `job_uid`."""
        found = []
        async for record in self.operator.read_stream(self.topology.events_stream, ENVELOPE):
            body = record.value.body
            if isinstance(body, EventPublished) and body.event.job_uid == job_uid:
                found.append((record.message_id, record.value))
        return found

    async def stream_counts(self, job_uid: str) -> Counter[str]:
        """How many events of each type the events stream holds for `job_uid`."""
        return Counter(
            str(envelope.body.event.payload.type)
            for _, envelope in await self.stream_records(job_uid)
            if isinstance(envelope.body, EventPublished)
        )

    def health_url(self, role: str, path: str) -> str:
        return f"http://127.0.0.1:{self.cluster.health_ports[role]}{path}"

    async def health(self, role: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=2) as http:
            response = await http.get(self.health_url(role, "/readyz"))
        body: dict[str, Any] = response.json()
        body["status"] = response.status_code
        return body


@asynccontextmanager
async def open_cluster(
    seaweed: LocalSeaweed, store: ObjectStore, overrides: dict[str, str] | None = None
) -> AsyncIterator[Harness]:
    """A LocalCluster with a broker prefix and data root of its own, and a user connected to it."""
    tag = uuid.uuid4().hex[:10]
    root = f"e2e-{tag}/"
    cluster = LocalCluster(
        seaweed.settings,
        prefix=f"e2e-{tag}",
        overrides={"PARJOBS_DATA_ROOT": root, **(overrides or {})},
        delete_topology=True,  # stop() deletes the prefix's queues, exchanges and broker users
    )
    user = KeyPair.generate("e2e-user")
    try:
        await cluster.start()
        user_amqp = await cluster.add_user(ACCOUNT, user.public)
        await Accounts(store, JobKeys(root)).deposit(ACCOUNT, Decimal(10_000))
        async with (
            AMQPBroker(user_amqp, name=f"e2e-client-{tag}") as broker,
            AMQPBroker(cluster.operator_amqp, name=f"e2e-operator-{tag}") as operator,
            ParjobsClient(broker, user, service_keys=cluster.service_keys) as client,
        ):
            yield Harness(
                cluster=cluster,
                broker=broker,
                operator=operator,
                client=client,
                store=store,
                root=root,
                user=user,
            )
    finally:
        await cluster.stop()
        await store.delete_prefix(root)


@pytest.fixture(scope="module")
async def harness(seaweed: LocalSeaweed, store: ObjectStore) -> AsyncIterator[Harness]:
    """The module's cluster: up to 10 runs at once, so 50 jobs go through quickly. Its sweep
    runs once, at the start: no expiry here, and the stream counts below see no end re-published
    by the sweep (tests/unit/test_services.py covers that)."""
    overrides = {"PARJOBS_MAX_RUNS": "10", "PARJOBS_SWEEP_INTERVAL_S": "3600"}
    async with open_cluster(seaweed, store, overrides) as opened:
        yield opened


# --- helpers ------------------------------------------------------------------------------------


_RUN_DIRS: dict[str, set[str]] = {}
"""Job uid -> the scratch directories its runs had (a directory goes with its run)."""


def run_processes(job_uid: str) -> set[int]:
    """Pids of live (not zombie) processes of `job_uid`'s runs on this machine.

    Compute runs a job in a sandbox spawned ahead, in a scratch directory of its own
    (`parjobs-run-...`) where it puts the job's input as `input/<job uid>`: bwrap's argv binds
    that directory, and the sandbox's supervisor and the calculation work in it.
    """
    found = Path(tempfile.gettempdir()).glob(f"parjobs-run-*/input/{job_uid}")
    roots = _RUN_DIRS.setdefault(job_uid, set())
    roots |= {str(path.parents[1]) for path in found}
    return {
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _is_live(entry, roots)
    }


def _is_live(proc: Path, roots: set[str]) -> bool:
    if not roots:
        return False
    try:
        cmdline = (proc / "cmdline").read_bytes()
        cwd = os.readlink(proc / "cwd")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    inside = [f"{root}/" for root in roots]
    return state != "Z" and any(cwd.startswith(r) or r.encode() in cmdline for r in inside)


async def ready_messages(harness: Harness, queue: str) -> int:
    """Messages waiting in `queue` for a consumer, as the broker says now (a passive declare;
    the counters `rabbitmqctl list_queues` shows are refreshed only every few seconds)."""
    connection = await aio_pika.connect(harness.operator.settings.amqp_url.get_secret_value())
    async with connection, connection.channel() as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def close_daemon_connections(
    rabbitmqctl: RabbitMQCtl, cluster: LocalCluster, roles: tuple[str, ...]
) -> None:
    """Close each daemon's broker connection from the server side, as an operator (or a network
    partition) would; each daemon names its connection `parjobs-<role>-<pid>`."""
    listing = await rabbitmqctl.run(
        "list_connections", "--no-table-headers", "pid", "client_properties"
    )
    for role in roles:
        marker = f'{{"connection_name","parjobs-{role}-{cluster.pid(role)}"}}'
        pids = [line.split("\t", 1)[0] for line in listing.splitlines() if marker in line]
        assert len(pids) == 1, f"{role}: {pids}"
        await rabbitmqctl.run("close_connection", pids[0], "e2e test: server-side close")


class RunWatch:
    """Samples a job's calculation processes in the background: which ran, how many at once."""

    def __init__(self, job_uid: str) -> None:
        self.job_uid = job_uid
        self.pids: set[int] = set()
        self.most_at_once = 0

    async def run(self) -> None:
        while True:
            now = await anyio.to_thread.run_sync(run_processes, self.job_uid)
            self.pids |= now
            self.most_at_once = max(self.most_at_once, len(now))
            await anyio.sleep(0.05)


def kinds_of(events: list[JobEvent]) -> Counter[str]:
    """How many events of each type."""
    return Counter(str(event.payload.type) for event in events)


def payload(size: int, seed: str) -> bytes:
    """`size` bytes of deterministic, job-specific data with lines in it."""
    chunk = hashlib.sha256(seed.encode()).hexdigest().encode() + b"\n"
    return (chunk * (size // len(chunk) + 1))[:size]


# --- the happy path -----------------------------------------------------------------------------


async def test_a_job_completes_with_the_right_output(harness: Harness) -> None:
    data = payload(300_000, "one job") + secrets.token_bytes(1000)
    sheet = await harness.run_job(data)
    assert sheet.state is JobState.COMPLETED, sheet.reason
    await harness.check_checksum_job(sheet.job_uid, data)
    # The read PAR over the outputs is sealed for the job's user: no other key opens it.
    read_par = await harness.client.outputs(sheet.job_uid)
    with pytest.raises(WrongKeyError, match="sealed for key"):
        BucketReader(read_par, KeyPair.generate("someone else")).list_keys()


async def test_the_seed_jobsheet_api_runs_a_job(harness: Harness) -> None:
    """JobSheet(job, authorisation), set_payment(cheque), request_services() -> PARs, expiry."""
    data = b"seed page\n"
    request = JobRequest(calculation="checksum", input_sha256=hashlib.sha256(data).hexdigest())
    sheet = JobSheet(request, sign_authorisation(harness.user, request))
    assert sheet.is_null()
    sheet.set_payment(
        write_cheque(
            harness.user,
            payer=ACCOUNT,
            recipient="access",
            max_spend=MAX_SPEND,
            resource=request_fingerprint(request),
            lifetime=timedelta(hours=1),
        )
    )
    upload, run, expires = await sheet.request_services(harness.client)
    assert not sheet.is_null()
    assert expires - datetime.now(UTC) > timedelta(minutes=55)  # one hour by default
    payment = sheet.payment()
    assert payment is not None
    assert payment.cheque.max_spend == MAX_SPEND
    await ObjectWriter(upload, harness.user).set_object(data)
    control = run.execute(harness.user, control=harness.client)
    await control.start()
    assert (await control.wait(timeout=60)).state == "completed"
    uid = sheet.uid()
    assert uid is not None
    loaded = await JobSheet.load(uid, EventLog(harness.store, JobKeys(harness.root).jobs))
    assert loaded.authorisation() == sheet.authorisation()
    state = loaded.state()
    assert state is not None
    assert state.state is JobState.COMPLETED


async def test_fifty_concurrent_jobs_all_complete_exactly_once(harness: Harness) -> None:
    inputs = {f"job-{n}": payload(1000 + 97 * n, f"job {n}") for n in range(50)}
    finished: dict[str, tuple[str, bytes]] = {}
    started = time.monotonic()

    async def one(name: str, data: bytes) -> None:
        sheet = await harness.run_job(data, timeout=100)
        assert sheet.state is JobState.COMPLETED, f"{name}: {sheet.state} {sheet.reason}"
        finished[name] = (sheet.job_uid, data)

    with anyio.fail_after(110):
        async with anyio.create_task_group() as group:
            for name, data in inputs.items():
                group.start_soon(one, name, data)
    elapsed = time.monotonic() - started

    assert len(finished) == 50
    assert len({job_uid for job_uid, _ in finished.values()}) == 50  # 50 jobs, not fewer

    checks = anyio.Semaphore(8)

    async def check(job_uid: str, data: bytes) -> None:
        async with checks:
            await harness.check_checksum_job(job_uid, data)

    async with anyio.create_task_group() as group:
        for job_uid, data in finished.values():
            group.start_soon(check, job_uid, data)

    # Nothing was published that is not in a log: the stream holds each job's events, by id.
    job_uids = {job_uid for job_uid, _ in finished.values()}
    published: dict[str, set[str]] = {job_uid: set() for job_uid in job_uids}
    async for record in harness.operator.read_stream(harness.topology.events_stream, ENVELOPE):
        body = record.value.body
        if isinstance(body, EventPublished) and body.event.job_uid in job_uids:
            published[body.event.job_uid].add(body.event.event_id)
    for job_uid in job_uids:
        logged = {event.event_id for event in await harness.events(job_uid)}
        assert published[job_uid] == logged, job_uid
    print(f"50 jobs in {elapsed:.1f}s")


async def test_two_hundred_jobs_with_progress_replay_with_no_divergence(harness: Harness) -> None:
    """Every appended event is published: 200 jobs, each reporting progress while its run's task
    group is being torn down, then `replay` compares every stored log with the events stream and
    finds nothing missing, nothing rejected, nothing different; the progress went on the stream
    as reports, never into a log."""
    job_uids: set[str] = set()
    flows = anyio.Semaphore(40)  # jobs in flight at once (10 runs, the rest contracting)

    async def one(n: int) -> None:
        async with flows:
            sheet = await harness.run_job(b"%d\n" % n, "sleep", {"seconds": 1.2}, timeout=150)
        assert sheet.state is JobState.COMPLETED, f"{n}: {sheet.state} {sheet.reason}"
        job_uids.add(sheet.job_uid)

    started = time.monotonic()
    with anyio.fail_after(170):
        async with anyio.create_task_group() as group:
            for n in range(200):
                group.start_soon(one, n)
    ran = time.monotonic() - started
    assert len(job_uids) == 200

    log = EventLog(harness.store, JobKeys(harness.root).jobs)
    results = {
        result.job_uid: result
        for result in await replay(log, harness.operator, harness.cluster.service_keys)
    }
    assert job_uids <= set(results)
    diverged = {uid: results[uid].problems for uid in job_uids if not results[uid].ok}
    assert diverged == {}, f"{len(diverged)} of 200 jobs diverge: {diverged}"
    assert [r for r in results.values() if r.rejected] == []  # nothing forged on the stream
    assert [r for r in results.values() if r.tampered] == []
    sample = sorted(job_uids)[:20]
    assert [kinds_of(await log.read(uid))["progress"] for uid in sample] == [0] * len(sample)
    reports = dict.fromkeys(sample, 0)
    async for record in harness.operator.read_stream(harness.topology.events_stream, ENVELOPE):
        body = record.value.body
        if isinstance(body, ProgressReport) and body.job_uid in reports:
            reports[body.job_uid] += 1
    assert all(count >= 1 for count in reports.values()), reports
    print(f"200 jobs with progress in {ran:.1f}s; replay: 0 divergence")


# --- expiry and stop ----------------------------------------------------------------------------


async def test_expiry_ends_a_job_and_its_pars_are_refused(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    # No sweep during the test: each job's deadline comes round the broker (a delay queue).
    async with open_cluster(seaweed, store, {"PARJOBS_SWEEP_INTERVAL_S": "3600"}) as h:
        # One job never gets its input; another gets its input but is never started.
        idle_uid, idle_upload, idle_run = await h.ready_job(lifetime_s=4)
        unstarted_uid, unstarted_upload, unstarted_run = await h.ready_job(lifetime_s=4)
        runs = {idle_uid: idle_run, unstarted_uid: unstarted_run}
        # The holder-side check keeps a 30 s margin, so with a 4 s lifetime the capabilities are
        # opened regardless, and sent as they are: what the services and S3 do is under test.
        forced = {uid: _forced_run_control(run, h) for uid, run in runs.items()}
        for control in forced.values():  # still live: compute answers for them
            assert (await control.status()).state == "ready"
        await _put_through(unstarted_upload, h.user, b"an input that is never used\n")
        assert await h.store.head(f"{h.root}jobs/{unstarted_uid}/input") is not None

        for job_uid in runs:
            sheet = await h.client.wait_until(job_uid, frozenset({JobState.EXPIRED}), timeout=15)
            assert sheet.state is JobState.EXPIRED
            assert (sheet.expires_at - sheet.created_at).total_seconds() <= 4.5
            assert sheet.updated_at >= sheet.expires_at
            # Its deadline message ends it as its TTL runs out.
            assert (sheet.updated_at - sheet.expires_at).total_seconds() < 2
            kinds = [event.payload.type for event in await h.events(job_uid)]
            assert kinds == ["submitted", "storage_contracted", "compute_contracted", "expired"]

        for job_uid, run in runs.items():
            with pytest.raises(PARExpiredError):  # the holder's side refuses it...
                run.execute(h.user, control=h.client)
            with pytest.raises(PARExpiredError):  # ...and so does compute, sent anyway
                await forced[job_uid].start()
            with pytest.raises(PARExpiredError):
                await forced[job_uid].status()
            assert (await h.client.job(job_uid)).sheet.state is JobState.EXPIRED
        assert run_processes(unstarted_uid) == set()

        # S3 itself refuses the expired upload PAR's presigned URL.
        with pytest.raises(PARExpiredError, match="403 AccessDenied: Request has expired"):
            await _put_through(idle_upload, h.user, b"too late\n")
        assert await h.store.head(f"{h.root}jobs/{idle_uid}/input") is None


def _forced_run_control(run: PAR, harness: Harness) -> RunControl:
    """The run PAR's control, opened without the holder-side expiry check."""
    capability = run.open(harness.user, allow_expired=True)
    assert capability.run_url is not None
    return RunControl(run, capability.run_url, harness.client)


async def _put_through(upload: PAR, user: KeyPair, data: bytes) -> None:
    """PUT `data` to the upload PAR's presigned URL, without the holder-side expiry check."""
    capability = upload.open(user, allow_expired=True)
    assert capability.put_url is not None
    async with PARTransport() as transport:
        await transport.put_bytes(capability.put_url, capability.put_headers, data)


async def test_stop_ends_a_running_job(harness: Harness) -> None:
    job_uid, control = await harness.start_job(b"input\n", "sleep", {"seconds": 30})
    await eventually(
        lambda: _running_with_process(harness, job_uid), "the sleep calculation is running"
    )
    pids = run_processes(job_uid)
    assert len(pids) == PROCESSES_PER_RUN, pids

    asked = time.monotonic()
    reply = await control.stop()
    assert reply.accepted, reply
    final = await control.wait(timeout=10)
    took = time.monotonic() - asked
    assert final.state == "cancelled", final
    assert took < 8, f"the stop took {took:.1f}s"
    # The job ends as the stop is logged; its `cancelled` event, delivered to every compute
    # daemon, has the one running it kill the run (SIGTERM, then SIGKILL after the grace).
    await eventually(
        lambda: _none_alive(pids, job_uid), "the stop killed the sleep process", timeout=8
    )
    assert run_processes(job_uid) == set()

    events = await harness.events(job_uid)
    kinds = kinds_of(events)
    assert kinds["run_started"] == 1, kinds
    assert kinds["cancelled"] == 1, kinds
    assert set(kinds) <= {
        "submitted",
        "storage_contracted",
        "compute_contracted",
        *MAY_WAIT,
        "run_started",
        "progress",
        "cancelled",
    }, kinds
    assert events[-1].payload.type == "cancelled"
    # The stop reached the run as a message: nothing was written to the store for it to poll.
    assert await harness.store.list(f"{harness.root}runs/") == []
    # An ended job cannot be started or stopped again through its run PAR.
    with pytest.raises(RunRefusedError):
        await control.start()
    with pytest.raises(RunRefusedError):
        await control.stop()


async def _running_with_process(harness: Harness, job_uid: str) -> bool:
    """Running, with its whole sandboxed run up: a job is `running` as soon as it is claimed,
    while bwrap's supervisor is still starting the calculation."""
    sheet = (await harness.client.job(job_uid)).sheet
    return sheet.state is JobState.RUNNING and len(run_processes(job_uid)) >= PROCESSES_PER_RUN


# --- poison and duplicates ----------------------------------------------------------------------


async def test_a_poison_message_is_dead_lettered_once(harness: Harness) -> None:
    topology = harness.topology
    storage_queue = topology.work_queue("storage").name
    access_queue = topology.rpc_queue("access").name
    undecodable_id, unknown_id = uuid.uuid4().hex, uuid.uuid4().hex
    unknown = {
        "schema_version": 1,
        "message_id": unknown_id,
        "sent_at": "2030-01-01T00:00:00Z",
        "sender": "e2e-test",
        "body": {"type": "make_coffee", "strength": 11},
    }
    connection = await aio_pika.connect(harness.operator.settings.amqp_url.get_secret_value())
    async with connection, connection.channel(publisher_confirms=True) as channel:
        # Straight into the storage work queue (not through the events exchange, whose stream
        # would keep the bad bytes for every later reader of the history).
        await channel.default_exchange.publish(
            aio_pika.Message(b"\x00\xffnot json at all{", message_id=undecodable_id),
            routing_key=storage_queue,
        )
        commands = await channel.get_exchange(topology.commands.name, ensure=False)
        await commands.publish(
            aio_pika.Message(json.dumps(unknown).encode(), message_id=unknown_id),
            routing_key=topology.rpc_routing_key("access"),
        )

    async def letters() -> list[DeadLetter]:
        return [
            letter
            for letter in await harness.operator.dead_letters()
            if letter.message_id in (undecodable_id, unknown_id)
        ]

    async def both_dead_lettered() -> bool:
        return len(await letters()) >= 2

    await eventually(both_dead_lettered, "both poison messages reach the dead-letter queue")

    # The daemons go on working; by the time a whole job has gone through, a looping poison
    # message would have come back.
    data = payload(5000, "after the poison")
    sheet = await harness.run_job(data)
    assert sheet.state is JobState.COMPLETED, sheet.reason
    await harness.check_checksum_job(sheet.job_uid, data)

    found = await letters()
    assert sorted(letter.message_id or "" for letter in found) == sorted(
        [undecodable_id, unknown_id]
    ), "each poison message is dead-lettered exactly once"
    by_id = {letter.message_id: letter for letter in found}
    bad_bytes, bad_type = by_id[undecodable_id], by_id[unknown_id]
    assert bad_bytes.code is DeadLetterReason.UNDECODABLE
    assert bad_bytes.original_queue == storage_queue
    assert "undecodable" in bad_bytes.reason
    assert "json" in bad_bytes.reason.lower()
    assert bad_bytes.body == b"\x00\xffnot json at all{"
    assert bad_type.code is DeadLetterReason.UNKNOWN_TYPE
    assert bad_type.original_queue == access_queue
    assert "make_coffee" in bad_type.reason
    # The reason travels in the message's headers.
    raw = await _raw_dead_letter_headers(harness, {undecodable_id, unknown_id})
    assert raw[undecodable_id][CODE_HEADER] == "undecodable"
    assert raw[unknown_id][CODE_HEADER] == "unknown-type"
    assert all(REASON_HEADER in headers for headers in raw.values())

    # Nothing waits to be tried again.
    assert await ready_messages(harness, storage_queue) == 0
    assert await ready_messages(harness, access_queue) == 0


async def _raw_dead_letter_headers(harness: Harness, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The headers of the dead letters with these ids, as they sit in the queue (handed back)."""
    connection = await aio_pika.connect(harness.operator.settings.amqp_url.get_secret_value())
    found: dict[str, dict[str, Any]] = {}
    async with connection, connection.channel() as channel:
        queue = await channel.declare_queue(harness.topology.dead_letter_queue.name, passive=True)
        held = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            held.append(message)
            if message.message_id in ids:
                found[message.message_id] = dict(message.headers or {})
        for message in held:
            await message.nack(requeue=True)
    return found


async def test_a_duplicate_delivery_has_no_second_effect(harness: Harness) -> None:
    job_uid, upload, run = await harness.ready_job()
    log_before = await harness.events(job_uid)
    assert [event.payload.type for event in log_before] == [
        "submitted",
        "storage_contracted",
        "compute_contracted",
    ]

    # The very envelopes the services published, from the stream, published again (by the
    # operator: no user may publish events).
    owner = harness.ids.user_username(ACCOUNT)
    originals = {
        envelope.body.event.payload.type: (message_id, envelope)
        for message_id, envelope in await harness.stream_records(job_uid)
        if isinstance(envelope.body, EventPublished)
    }
    for kind in ("submitted", "storage_contracted"):
        message_id, envelope = originals[kind]
        assert isinstance(envelope.body, EventPublished)
        assert message_id == envelope.body.event.event_id
        await harness.operator.publish(
            harness.topology.events,
            harness.ids.event_routing_key(owner, job_uid, kind),
            envelope,
            message_id=message_id,
        )

    # Storage answers the duplicate `submitted` by publishing its logged `storage_contracted`
    # again (a relay, deduplicated by event id downstream), compute likewise: wait for those.
    async def duplicates_handled() -> bool:
        counts = await harness.stream_counts(job_uid)
        return counts == Counter({"submitted": 2, "storage_contracted": 3, "compute_contracted": 3})

    await eventually(duplicates_handled, "the duplicates were handled and re-published")

    for role in ("storage", "compute"):
        assert await ready_messages(harness, harness.topology.work_queue(role).name) == 0

    # A job's PARs are recorded in the events that hand them out: none was handed out twice.
    log_after = await harness.events(job_uid)
    assert log_after == log_before, "an event was appended twice"
    republished = await harness.stream_records(job_uid)
    for _, envelope in republished:  # re-published, never made anew
        assert isinstance(envelope.body, EventPublished)
        assert envelope.body.event in log_before

    # The job itself is unharmed: it runs once, to the right output.
    data = payload(20_000, "duplicated")
    await ObjectWriter(upload, harness.user).set_object(data)
    control = run.execute(harness.user, control=harness.client)
    assert (await control.start()).accepted
    assert (await control.wait(timeout=60)).state == "completed"
    await harness.check_checksum_job(job_uid, data)
    # A second start through the same run PAR is refused: one run PAR, one run.
    with pytest.raises(RunRefusedError):
        await control.start()
    # No duplicate came round again meanwhile (handled once, acked, neither looping nor
    # dead-lettered).
    counts = await harness.stream_counts(job_uid)
    assert {kind: counts[kind] for kind in HAPPY_PATH} == {
        "submitted": 2,
        "storage_contracted": 3,
        "compute_contracted": 3,
        "run_started": 1,
        "completed": 1,
    }
    assert not [
        letter
        for letter in await harness.operator.dead_letters()
        if job_uid in (letter.original_routing_key or "")
    ]


async def test_a_duplicate_start_starts_no_second_run(harness: Harness) -> None:
    job_uid, upload, run = await harness.ready_job("sleep", {"seconds": 2})
    await ObjectWriter(upload, harness.user).set_object(b"input\n")
    capability = run.open(harness.user)
    assert capability.run_url is not None
    # One start message, delivered twice (as a publisher's resend after a lost confirm would):
    # the same envelope, signed once by the user, with the same message id.
    body = run_command(
        "start",
        capability.run_url,
        job_uid=job_uid,
        requester=harness.user.fingerprint,
        compute=harness.cluster.service_keys.current("compute"),
    )
    unsigned: Envelope = Envelope(sender="e2e-test", body=body)
    signature = sign_message(
        harness.user,
        harness.user.fingerprint,
        message_id=unsigned.message_id,
        sent_at=unsigned.sent_at,
        body=body,
    )
    start = unsigned.model_copy(update={"signature": signature})
    topology = harness.topology
    reply_queue = harness.ids.reply_queue(harness.broker.username, uuid.uuid4().hex)
    await harness.broker.declare(reply_queue, shared=False)
    sent_replies, replies = anyio.create_memory_object_stream[Envelope](2)

    async def on_reply(envelope: Envelope, meta: IncomingMeta) -> None:
        await sent_replies.send(envelope)

    await harness.broker.consume(reply_queue, ENVELOPE, on_reply)

    async def send() -> Envelope:
        await harness.broker.publish(
            topology.commands,
            topology.rpc_routing_key("runs"),
            start,
            reply_to=reply_queue.name,
            message_id=start.message_id,
        )
        with anyio.fail_after(60):
            return await replies.receive()

    watch = RunWatch(job_uid)
    async with anyio.create_task_group() as group:
        group.start_soon(watch.run)
        first = await send()
        assert isinstance(first.body, RunReply)
        assert first.body.accepted
        await eventually(lambda: _running_with_process(harness, job_uid), "the job is running")
        # The same message again (a client's resend): answered at once with the job as it is,
        # accepted (it was), and nothing more runs.
        second = await send()
        assert isinstance(second.body, RunReply), second.body
        assert (second.body.accepted, second.body.state) == (True, "running")

        async def completed() -> bool:
            return (await harness.client.job(job_uid)).sheet.state is JobState.COMPLETED

        await eventually(completed, "the job completed", timeout=60, interval=0.5)
        group.cancel_scope.cancel()

    assert (await harness.client.job(job_uid)).sheet.state is JobState.COMPLETED
    assert len(watch.pids) == PROCESSES_PER_RUN, f"{watch.pids}: more than one run of one start"
    assert watch.most_at_once == PROCESSES_PER_RUN
    events = await harness.events(job_uid)
    kinds = kinds_of(events)
    assert {kind: kinds[kind] for kind in HAPPY_PATH} == dict.fromkeys(HAPPY_PATH, 1), kinds
    assert set(kinds) <= {*HAPPY_PATH, *MAY_WAIT, "progress"}, kinds
    reader = BucketReader(await harness.client.outputs(job_uid), harness.user)
    assert await reader.get_json("summary.json") == {
        "calculation": "sleep",
        "seconds": 2.0,
        "exit_code": 0,
    }


# --- health -------------------------------------------------------------------------------------


async def test_health_and_readiness_answer(harness: Harness) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        for role in ROLES:
            healthz = await http.get(harness.health_url(role, "/healthz"))
            assert healthz.status_code == 200
            assert healthz.json() == {"alive": True}
            readyz = await http.get(harness.health_url(role, "/readyz"))
            assert readyz.status_code == 200
            assert readyz.json() == {"ready": True, "problems": [], "reconnections": 0}
            missing = await http.get(harness.health_url(role, "/nope"))
            assert missing.status_code == 404
            assert missing.json() == {"paths": ["/healthz", "/readyz", "/metrics"]}


async def test_a_deleted_queue_makes_its_daemon_unready_until_it_consumes_again(
    harness: Harness,
) -> None:
    """The operator (or a lost node) deletes storage's queue: storage's consumer is cancelled by
    the broker, /readyz says so (503), storage declares its queue again, consumes it, and is
    ready; new jobs flow."""
    storage_queue = harness.topology.work_queue("storage").name
    connection = await aio_pika.connect(harness.operator.settings.amqp_url.get_secret_value())
    async with connection, connection.channel() as channel:
        await channel.queue_delete(storage_queue)
    seen: list[dict[str, Any]] = []

    async def unready() -> bool:
        seen.append(await harness.health("storage"))
        return bool(seen[-1]["status"] == 503)

    async def ready_again() -> bool:
        return bool((await harness.health("storage"))["status"] == 200)

    # Storage looks at its consumers every second: the 503 comes before it is restored.
    await eventually(unready, "storage reports the lost consumer", timeout=3, interval=0.02)
    assert seen[-1]["problems"] == [f"not consuming {storage_queue}"], seen[-1]
    await eventually(ready_again, "storage consumes its queue again", timeout=15)
    log = harness.cluster.log_path("storage").read_text()
    assert "cancelled by the broker; declared again" in log, log[-2000:]
    data = payload(3000, "after the queue was deleted")
    sheet = await harness.run_job(data)
    assert sheet.state is JobState.COMPLETED, sheet.reason
    await harness.check_checksum_job(sheet.job_uid, data)


async def test_a_forged_event_is_refused_by_the_services_and_changes_nothing(
    harness: Harness,
) -> None:
    """Even one who may publish to the events exchange (here the operator) cannot make the
    services act on an event no role sealed: each service that takes a forged
    `storage_contracted` (compute, to mint; access, to remember) dead-letters it, and nothing is
    appended; the job goes on as its real events say."""
    job_uid, upload, run = await harness.ready_job()
    logged = await harness.events(job_uid)
    real = logged[1]
    assert real.payload.type == "storage_contracted"
    forger = KeyPair.generate("forger")
    forged = seal_event(real.model_copy(update={"signature": None}), logged[0], forger, "storage")
    owner = harness.ids.user_username(ACCOUNT)
    sent = await harness.operator.publish(
        harness.topology.events,
        harness.ids.event_routing_key(owner, job_uid, "storage_contracted"),
        Envelope(sender="forger", body=EventPublished(event=forged)),
    )

    async def refused() -> list[DeadLetter]:
        return [
            letter for letter in await harness.operator.dead_letters() if letter.message_id == sent
        ]

    takers = sorted(harness.topology.work_queue(role).name for role in ("access", "compute"))

    async def dead_lettered() -> bool:
        return len(await refused()) == len(takers)

    await eventually(dead_lettered, "access and compute dead-letter the forged event", timeout=15)
    letters = await refused()
    assert sorted(letter.original_queue or "" for letter in letters) == takers
    assert all("signature.forged" in letter.reason for letter in letters)
    assert await harness.events(job_uid) == logged
    data = payload(2000, "after a forged event")
    await ObjectWriter(upload, harness.user).set_object(data)
    control = run.execute(harness.user, control=harness.client)
    assert (await control.start()).accepted
    assert (await control.wait(timeout=60)).state == "completed"
    await harness.check_checksum_job(job_uid, data)


# --- crashes, disconnections, shutdown ----------------------------------------------------------


async def test_sigkilled_compute_mid_run_loses_no_job(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    async with open_cluster(seaweed, store) as h:
        job_uid, control = await h.start_job(b"input\n", "sleep", {"seconds": 3})
        await eventually(lambda: _running_with_process(h, job_uid), "the sleep job is running")
        first_run = run_processes(job_uid)
        killed_pid = h.cluster.pid("compute")

        assert await h.cluster.kill("compute") == -signal.SIGKILL
        # The calculation dies with its worker (it must not run on, unowned).
        await eventually(
            lambda: _none_alive(first_run, job_uid), "the orphaned run process is gone", timeout=5
        )
        assert (await h.client.job(job_uid)).sheet.state is JobState.RUNNING

        h.cluster._spawn("compute")
        await h.cluster.wait_ready("compute")
        assert h.cluster.pid("compute") != killed_pid
        # The unacked start is redelivered to the new daemon, which recognises its own claim.
        final = await control.wait(timeout=30)
        assert final.state == "completed", final

        events = await h.events(job_uid)
        kinds = kinds_of(events)
        assert {kind: kinds[kind] for kind in HAPPY_PATH} == dict.fromkeys(HAPPY_PATH, 1), kinds
        assert set(kinds) <= {*HAPPY_PATH, *MAY_WAIT, "progress"}, kinds
        assert [event.seq for event in events] == list(range(1, len(events) + 1))
        reader = BucketReader(await h.client.outputs(job_uid), h.user)
        summary = await reader.get_json("summary.json")
        assert summary == {"calculation": "sleep", "seconds": 3.0, "exit_code": 0}
        # Whatever the killed daemon appended and had not published yet, the next one published
        # again: the stream agrees with the log.
        log = EventLog(h.store, JobKeys(h.root).jobs)
        [result] = [
            r for r in await replay(log, h.operator, h.cluster.service_keys) if r.job_uid == job_uid
        ]
        assert result.ok, result.problems


async def _none_alive(pids: set[int], job_uid: str) -> bool:
    roots = _RUN_DIRS.get(job_uid, set())
    return not any(_is_live(Path(f"/proc/{pid}"), roots) for pid in pids)


async def test_sigkilled_storage_between_submit_and_contract_loses_no_job(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    async with open_cluster(seaweed, store) as h:
        storage_queue = h.topology.work_queue("storage").name
        # Freeze storage, so the `submitted` event is delivered to it but never handled...
        os.killpg(h.cluster.pid("storage"), signal.SIGSTOP)
        try:
            request = JobRequest(calculation="checksum")
            # Access publishes `submitted` (confirmed: queued) before it answers the submit.
            job_uid = (await h.submit(request)).job_uid

            async def delivered() -> bool:
                return await ready_messages(h, storage_queue) == 0

            await eventually(delivered, "the submitted event was delivered to storage")
            # ...then kill it: the job is between submit and contract.
            assert await h.cluster.kill("storage") == -signal.SIGKILL
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.cluster.pid("storage"), signal.SIGCONT)

        async def back_in_queue() -> bool:
            return await ready_messages(h, storage_queue) == 1

        await eventually(back_in_queue, "the broker requeued the unacked event")
        assert (await h.client.job(job_uid)).sheet.state is JobState.SUBMITTED

        h.cluster._spawn("storage")
        await h.cluster.wait_ready("storage")
        ready = await h.client.wait_until(job_uid, frozenset({JobState.READY}), timeout=30)
        assert ready.state is JobState.READY
        assert ready.upload_par is not None
        assert ready.run_par is not None

        data = payload(10_000, "storage was killed")
        await ObjectWriter(PAR(ready.upload_par), h.user).set_object(data)
        control = PAR(ready.run_par).execute(h.user, control=h.client)
        assert (await control.start()).accepted
        assert (await control.wait(timeout=30)).state == "completed"
        await h.check_checksum_job(job_uid, data)


async def test_a_broker_side_connection_close_is_survived(
    seaweed: LocalSeaweed, store: ObjectStore, rabbitmqctl: RabbitMQCtl
) -> None:
    async with open_cluster(seaweed, store) as h:
        running_uid, control = await h.start_job(b"input\n", "sleep", {"seconds": 3})
        await eventually(lambda: _running_with_process(h, running_uid), "the job is running")
        watch = RunWatch(running_uid)
        async with anyio.create_task_group() as group:
            group.start_soon(watch.run)
            await close_daemon_connections(rabbitmqctl, h.cluster, ROLES)

            async def all_reconnected() -> bool:
                states = [await h.health(role) for role in ROLES]
                return all(s["status"] == 200 and s["reconnections"] >= 1 for s in states)

            await eventually(all_reconnected, "every daemon reconnected", timeout=30)
            # The job that was running when its worker lost the broker still ends, once.
            final = await control.wait(timeout=30)
            group.cancel_scope.cancel()
        assert final.state == "completed", final
        assert watch.most_at_once == PROCESSES_PER_RUN, "two runs of one job at once"
        kinds = kinds_of(await h.events(running_uid))
        assert {kind: kinds[kind] for kind in HAPPY_PATH} == dict.fromkeys(HAPPY_PATH, 1), kinds
        assert set(kinds) <= {*HAPPY_PATH, *MAY_WAIT, "progress"}, kinds

        # And new work flows through the restored consumers.
        data = payload(50_000, "after the close")
        sheet = await h.run_job(data)
        assert sheet.state is JobState.COMPLETED, sheet.reason
        await h.check_checksum_job(sheet.job_uid, data)


async def test_sigterm_on_an_idle_daemon_exits_cleanly_and_quickly(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    async with open_cluster(seaweed, store) as h:
        for role in ROLES:
            asked = time.monotonic()
            code = await h.cluster.kill(role, signal.SIGTERM)
            took = time.monotonic() - asked
            assert code == 0, f"{role} exited with {code}:\n{h.cluster.log_tail(role)}"
            assert took < 5, f"{role} took {took:.1f}s to stop"
            log = h.cluster.log_path(role).read_text()
            assert "stopping on SIGTERM" in log, log[-2000:]
            assert "stopped (drained)" in log, log[-2000:]
