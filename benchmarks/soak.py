"""A soak: many whole jobs through the three daemons, watching each daemon for growth.

Not run in CI. A private SeaweedFS (`LocalSeaweed`) and `LocalCluster` (access, storage, compute
as processes, each its own broker user, own broker prefix, removed at the end); one registered
user's `ParjobsClient` runs --jobs `checksum` jobs, --concurrency at once (`client.run`, then
`job.result()`). Every --every jobs (default: a twentieth of --jobs) it samples, for each daemon:
RSS and open file descriptors (psutil), and the channels its broker user holds open (RabbitMQ's
management API, `PARJOBS_MANAGEMENT_*`, which may lag the broker by a few seconds). At the end
it compares the last samples with the first ones after the warm-up (the first 10% of jobs) and
says which figure grew more than 10% (`verdict`).

    .venv/bin/python benchmarks/soak.py [--jobs 5000] [--concurrency 10] [--every N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from decimal import Decimal

import anyio
import httpx
import psutil

from orchestrator.broker.admin import vhost_of
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.identities import Role
from orchestrator.client.client import ParjobsClient
from orchestrator.core.keys import KeyPair
from orchestrator.core.layout import JobKeys
from orchestrator.par.transfer import PARTransport
from orchestrator.services.accounts import Accounts
from orchestrator.settings import ManagementSettings
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from workers.cluster import LocalCluster, role_of

WARM_UP = 0.1  # the share of jobs before the baseline sample
GROWTH = 0.10  # more than this over the baseline is growth
SPAN = 3  # samples whose median is the baseline, and the end
FIGURES = ("rss_mib", "fds", "channels")


@dataclass(frozen=True)
class Sample:
    jobs_done: int
    seconds: float
    daemon: str
    rss_mib: float
    fds: int
    channels: int

    def row(self) -> str:
        return (
            f"{self.jobs_done:>7} {self.seconds:>8.1f} {self.daemon:<9} {self.rss_mib:>8.1f} "
            f"{self.fds:>5} {self.channels:>8}"
        )


HEADER = f"{'jobs':>7} {'seconds':>8} {'daemon':<9} {'RSS MiB':>8} {'fds':>5} {'channels':>8}"


async def channels_by_user(management: ManagementSettings, vhost: str) -> dict[str, int]:
    """Open channels per broker user in `vhost`, as the management API counts them."""
    async with httpx.AsyncClient(
        base_url=management.url,
        auth=(management.username, management.password.get_secret_value()),
        timeout=management.timeout,
    ) as http:
        response = await http.get("/api/channels", params={"columns": "user,vhost"})
        counts: dict[str, int] = {}
        for channel in response.raise_for_status().json():
            if channel["vhost"] == vhost:
                counts[channel["user"]] = counts.get(channel["user"], 0) + 1
        return counts


class Sampler:
    """Each daemon's figures, on demand."""

    def __init__(self, cluster: LocalCluster, started: float) -> None:
        self.cluster = cluster
        self.started = started
        self.processes = {name: psutil.Process(cluster.pid(name)) for name in cluster.instances}
        self.users = {
            name: cluster.deployment.role_settings(Role(role_of(name))).username
            for name in cluster.instances
        }
        self.vhost = vhost_of(cluster.amqp.amqp_url.get_secret_value())
        self.samples: list[Sample] = []

    async def sample(self, jobs_done: int) -> list[Sample]:
        channels = await channels_by_user(self.cluster.management, self.vhost)
        taken = [
            Sample(
                jobs_done,
                round(time.monotonic() - self.started, 1),
                name,
                round(process.memory_info().rss / 2**20, 1),
                process.num_fds(),
                channels.get(self.users[name], 0),
            )
            for name, process in self.processes.items()
        ]
        self.samples += taken
        return taken


def verdict(samples: list[Sample], warm_up_jobs: int) -> list[dict[str, object]]:
    """Per daemon and figure: the baseline (median of the first SPAN samples at or after the
    warm-up), the end (median of the last SPAN), and whether it grew more than GROWTH. Medians,
    so that one sample taken with more jobs in flight than the others is not growth."""
    found = []
    for daemon in dict.fromkeys(sample.daemon for sample in samples):
        mine = [sample for sample in samples if sample.daemon == daemon]
        warm = [sample for sample in mine if sample.jobs_done >= warm_up_jobs] or mine
        for figure in FIGURES:
            before = statistics.median(getattr(s, figure) for s in warm[:SPAN])
            after = statistics.median(getattr(s, figure) for s in mine[-SPAN:])
            grown = (after - before) / before if before else (1.0 if after else 0.0)
            found.append(
                {
                    "daemon": daemon,
                    "figure": figure,
                    "baseline": before,
                    "baseline_jobs": warm[0].jobs_done,
                    "end": after,
                    "growth": round(grown, 3),
                    "grew": grown > GROWTH,
                }
            )
    return found


async def soak(args: Namespace) -> tuple[list[dict[str, object]], int]:
    """The verdict (`verdict`), and how many jobs did not complete."""
    every = args.every or max(1, args.jobs // 20)
    prefix = f"soak-{uuid.uuid4().hex[:8]}"
    user = KeyPair.generate("soak")
    failed = 0
    async with (
        LocalSeaweed() as s3,
        LocalCluster(s3.settings, prefix=prefix, delete_topology=True) as cluster,
    ):
        amqp = await cluster.add_user(user.name, user.public)
        async with S3ObjectStore(s3.settings) as store:
            await Accounts(store, JobKeys()).deposit(user.name, Decimal(10**6))
        sampler = Sampler(cluster, time.monotonic())
        emit(args, await sampler.sample(0))
        async with (
            AMQPBroker(amqp, name=f"{prefix}-client") as broker,
            ParjobsClient(broker, user, service_keys=cluster.service_keys) as client,
            PARTransport() as transport,
        ):
            done = 0
            limit = anyio.CapacityLimiter(args.concurrency)

            async def one(n: int) -> None:
                nonlocal done, failed
                async with limit:
                    try:
                        job = await client.run(
                            "checksum",
                            f"soak job {n}\n".encode(),
                            max_spend=Decimal(1),
                            transport=transport,
                        )
                        await job.result(timeout=300)
                    except Exception as exc:  # counted and shown: the soak goes on
                        failed += 1
                        print(f"job {n}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    done += 1
                    if done % every == 0 or done == args.jobs:
                        emit(args, await sampler.sample(done))

            async with anyio.create_task_group() as tasks:
                for n in range(args.jobs):
                    tasks.start_soon(one, n)
    return verdict(sampler.samples, int(args.jobs * WARM_UP)), failed


def emit(args: Namespace, samples: list[Sample]) -> None:
    for sample in samples:
        print(json.dumps(asdict(sample)) if args.json else sample.row(), flush=True)


class Namespace(argparse.Namespace):
    jobs: int
    concurrency: int
    every: int | None
    json: bool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=5000, help="jobs to run")
    parser.add_argument("--concurrency", type=int, default=10, help="jobs in flight")
    parser.add_argument("--every", type=int, help="sample every this many jobs (default jobs/20)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample")
    args = parser.parse_args(namespace=Namespace())
    if args.jobs < 1 or args.concurrency < 1 or (args.every is not None and args.every < 1):
        parser.error("--jobs, --concurrency and --every are at least 1")
    if not args.json:
        print(f"command: {shlex.join(sys.orig_argv)}\n{HEADER}\n{'-' * len(HEADER)}")
    started = time.monotonic()
    found, failed = anyio.run(soak, args)
    grew = [row for row in found if row["grew"]]
    summary = {
        "jobs": args.jobs,
        "failed": failed,
        "seconds": round(time.monotonic() - started, 1),
        "warm_up_jobs": int(args.jobs * WARM_UP),
        "grew": grew,
        "verdict": "growth" if grew else "steady",
    }
    if args.json:
        print(json.dumps({"summary": summary, "figures": found}))
        return
    print(f"\n{args.jobs} jobs ({failed} did not complete) in {summary['seconds']} s")
    print(
        f"baseline: median of the first {SPAN} samples after {summary['warm_up_jobs']} jobs "
        f"(warm-up); end: median of the last {SPAN}"
    )
    for row in found:
        mark = "GREW" if row["grew"] else "ok"
        print(
            f"  {row['daemon']:<9} {row['figure']:<9} {row['baseline']!s:>8} -> "
            f"{row['end']!s:>8} ({row['growth']:+.1%}) {mark}"
        )
    print(f"verdict: {summary['verdict']} (more than {GROWTH:.0%} after warm-up is growth)")


if __name__ == "__main__":
    main()
