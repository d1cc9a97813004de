"""The expiry sweep's cost at 1,000 and 10,000 active jobs: time and S3 requests per sweep, against
a raw walk over a dict of as many deadlines in the same run.

A private SeaweedFS (`LocalSeaweed`) behind the counting proxy (`s3_counter.py`). Active jobs are
made cheaply but real, on SeaweedFS: each a hold in the ledger (appended through `Ledger.hold`,
group commit) and a `submitted` event in its log (a conditional create), with an hour to live,
not through `AccessService.submit` (no signatures, nonces or cheques checked: they cost the
submit, not the sweep). Then, on an `AccessService` that never saw them:

- cold: its first sweep, as after a restart: the ledger read whole, and each job's deadline
  learnt from its first event (one GET a job);
- warm: every later sweep (median of --repeat): the ledger's new blocks (none: one LIST), and
  each job's deadline compared in memory; no log is read before its deadline;
- raw: a bare loop over a dict of as many deadlines, each compared with now.

ratio = warm / raw. See README.md.

    .venv/bin/python benchmarks/bench_expiry.py [--jobs 1000,10000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anyio

from orchestrator.core.keys import KeyPair
from orchestrator.core.layout import JobKeys
from orchestrator.core.pricing import Pricing
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.par.issuer import PARIssuer
from orchestrator.services.access import AccessService
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog, step_event_id
from orchestrator.store.ledger import Ledger
from orchestrator.store.registry import PARRegistry
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobEvent, JobRequest, Payment, Submitted
from workers.calculations import CalculationRegistry

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as a script: benchmarks/ importable
from benchmarks.bench_jobs import s3_counting_proxy, s3_counts
from benchmarks.s3_counter import KINDS

PAYER = "bench"
PRICE = Decimal("0.01")
SETUP_CONCURRENCY = 64
NOTES = """
cold: the first sweep of an access service that knows none of the jobs (a restart): the ledger
read whole (its blocks) and each job's deadline from its first event. warm: each later sweep;
what a sweep costs every PARJOBS_SWEEP_INTERVAL_S (600 s by default). raw: a loop
over a dict of the deadlines. ratio = warm / raw. S3 requests counted by the proxy."""


@dataclass
class Row:
    jobs: int
    phase: str
    seconds: list[float] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    """Per sweep (the median sweep's for warm, all of them are alike)."""


async def make_jobs(store: ObjectStore, keys: JobKeys, count: int) -> None:
    """`count` active jobs: a hold each in the ledger, a `submitted` event each in its log."""
    user = KeyPair.generate(PAYER)
    request = JobRequest(calculation="checksum")
    cheque = write_cheque(
        user,
        payer=PAYER,
        recipient="access",
        max_spend=Decimal(5),
        resource=request_fingerprint(request),
        lifetime=timedelta(hours=1),
    )
    template = Submitted(
        request=request,
        owner=PAYER,
        user=user.fingerprint,
        user_key=user.public.to_wire(),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        authorisation=sign_authorisation(user, request),
        payment=Payment(cheque=cheque, held=PRICE, ledger_seq=1),
    )
    ledger = Ledger(store, keys.ledger)
    log = EventLog(store, keys.jobs)
    await ledger.deposit(PAYER, PRICE * count)
    limit = anyio.Semaphore(SETUP_CONCURRENCY)

    async def one(job_uid: str) -> JobEvent:
        async with limit:
            await ledger.hold(job_uid, uuid.uuid4().hex, PAYER, PRICE)
            return await log.create(
                job_uid, f"user:{PAYER}", template, event_id=step_event_id(job_uid, "submitted")
            )

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one, uuid.uuid4().hex)


def access_service(store: ObjectStore, keys: JobKeys) -> AccessService:
    """An access service that has seen none of the jobs."""
    registry = PARRegistry(store, root=keys.registry)
    return AccessService(
        store,
        EventLog(store, keys.jobs),
        PARIssuer(store, registry, name="access"),
        keys,
        Pricing(CalculationRegistry.from_entry_points(), 60),
    )


async def nothing(event: JobEvent) -> None:
    raise AssertionError(f"nothing is due, yet the sweep published {event.payload.type}")


def raw_sweep(deadlines: dict[str, datetime]) -> list[str]:
    """The reference: every deadline compared with now, in a bare loop."""
    now = datetime.now(UTC)
    return [job_uid for job_uid, deadline in deadlines.items() if deadline <= now]


async def measure(jobs: int, repeat: int, store: ObjectStore, counts_url: str) -> list[Row]:
    keys = JobKeys(f"bench-expiry/{uuid.uuid4().hex[:8]}/")
    await make_jobs(store, keys, jobs)
    access = access_service(store, keys)
    cold, warm, raw = Row(jobs, "cold"), Row(jobs, "warm"), Row(jobs, "raw")
    before = await s3_counts(counts_url)
    start = time.perf_counter()
    assert await access.sweep(nothing) == []
    cold.seconds.append(time.perf_counter() - start)
    cold.requests = await s3_counts(counts_url) - before
    for _ in range(repeat):
        before = await s3_counts(counts_url)
        start = time.perf_counter()
        assert await access.sweep(nothing) == []
        warm.seconds.append(time.perf_counter() - start)
        warm.requests = await s3_counts(counts_url) - before
    deadlines = {uuid.uuid4().hex: datetime.now(UTC) + timedelta(hours=1) for _ in range(jobs)}
    for _ in range(repeat):
        start = time.perf_counter()
        assert raw_sweep(deadlines) == []
        raw.seconds.append(time.perf_counter() - start)
    await store.delete_prefix(keys.root)
    return [cold, warm, raw]


async def bench(args: argparse.Namespace) -> None:
    counts = [int(jobs) for jobs in args.jobs.split(",")]
    rows: list[Row] = []
    async with (
        LocalSeaweed() as seaweed,
        s3_counting_proxy(seaweed.settings) as (settings, url),
        S3ObjectStore(settings) as store,
    ):
        await store.ensure_bucket()
        for jobs in counts:
            rows += await measure(jobs, args.repeat, store, url)
    report(args, rows)


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    raw = {row.jobs: statistics.median(row.seconds) for row in rows if row.phase == "raw"}
    results: list[dict[str, object]] = []
    lines: list[str] = []
    for row in rows:
        seconds = statistics.median(row.seconds)
        requests = {kind: row.requests[kind] for kind in KINDS if row.requests[kind]}
        ratio = round(seconds / raw[row.jobs], 1) if row.phase == "warm" else None
        results.append(
            {
                "row": f"{row.phase}, {row.jobs} jobs",
                "phase": row.phase,
                "jobs": row.jobs,
                "ms_per_sweep": round(seconds * 1000, 3),
                "us_per_job": round(seconds * 1e6 / row.jobs, 3),
                "s3_per_sweep": requests,
                "ratio": ratio,
            }
        )
        listed = ", ".join(f"{n} {kind}" for kind, n in requests.items()) or "none"
        lines.append(
            f"{results[-1]['row']:<20}{seconds * 1000:>11.1f}{seconds * 1e6 / row.jobs:>9.2f}"
            f"{listed:>30}{'' if ratio is None else f'{ratio:.0f}':>8}"
        )
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"median of {args.repeat}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}\n")
    head = f"{'row':<20}{'ms/sweep':>11}{'µs/job':>9}{'S3 requests/sweep':>30}{'ratio':>8}"
    print(f"{head}\n{'-' * len(head)}")
    print("\n".join(lines))
    print(NOTES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", default="1000,10000", help="active jobs, a list")
    parser.add_argument("--repeat", type=int, default=5, help="warm sweeps and raw walks (median)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    anyio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()
