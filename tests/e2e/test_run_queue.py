"""Issue 9 end to end: 200 jobs started at once through the Python client, against the three
daemons as processes (LocalCluster) on RabbitMQ and SeaweedFS. Each start is answered when it is
accepted (`queued` with its place while the run slots are taken), so no client call waits for a
run slot: every job completes, no client sees an error, and each job ends once."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from decimal import Decimal

import anyio
import pytest

from orchestrator import KeyPair, ParjobsClient
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.core.layout import JobKeys
from orchestrator.services.accounts import Accounts
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobState
from workers.cluster import LocalCluster

pytestmark = pytest.mark.integration

JOBS = 200


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `values`."""
    ranked = sorted(values)
    return ranked[max(0, round(fraction * len(ranked)) - 1)]


async def test_two_hundred_jobs_at_once_all_complete_with_no_client_error(
    seaweed: LocalSeaweed,
) -> None:
    cluster = LocalCluster(
        seaweed.settings,
        prefix=f"pjqueue{uuid.uuid4().hex[:8]}",
        overrides={"PARJOBS_DATA_ROOT": f"queue-{uuid.uuid4().hex[:8]}/"},
        delete_topology=True,
    )
    async with cluster:
        user = KeyPair.generate("crowd")
        settings = await cluster.add_user(user.name, user.public)
        async with S3ObjectStore(cluster.s3) as store:
            await Accounts(store, JobKeys(cluster.data_root)).deposit(user.name, Decimal(JOBS))
        async with (
            AMQPBroker(settings, name="e2e-queue") as broker,
            ParjobsClient(broker, user, service_keys=cluster.service_keys) as client,
        ):
            accepted: Counter[str] = Counter()
            took: dict[str, float] = {}  # job uid -> seconds from submit to its completion seen
            answered: list[float] = []  # seconds from submit to the start's answer
            errors: list[str] = []

            async def one(n: int) -> None:
                began = time.monotonic()
                try:
                    job = await client.run("checksum", b"%d\n" % n, max_spend=Decimal(1))
                    answered.append(time.monotonic() - began)
                    accepted[job.accepted.state] += 1
                    sheet = await job.result(timeout=220)
                except Exception as exc:  # every error a client would be shown counts
                    errors.append(f"job {n}: {exc!r}")
                    return
                assert sheet.state is JobState.COMPLETED
                took[job.uid] = time.monotonic() - began

            started = time.monotonic()
            with anyio.fail_after(240):
                async with anyio.create_task_group() as group:
                    for n in range(JOBS):
                        group.start_soon(one, n)
            elapsed = time.monotonic() - started

            assert errors == []
            assert len(took) == JOBS
            kinds = Counter[str]()
            for job_uid in took:
                counted = Counter(event.payload.type for event in await client.events(job_uid))
                assert (counted["run_started"], counted["completed"]) == (1, 1), job_uid
                assert counted["queued"] <= 1, job_uid
                kinds.update(counted)
    seconds = list(took.values())
    print(
        f"\n{JOBS} jobs at once in {elapsed:.1f}s: {len(took)} completed, {len(errors)} client "
        f"errors; starts answered {dict(accepted)}, {kinds['queued']} logged queued; "
        f"submit -> start accepted p50 {percentile(answered, 0.5):.2f}s, "
        f"p99 {percentile(answered, 0.99):.2f}s; submit -> completed p50 "
        f"{percentile(seconds, 0.5):.2f}s, p99 {percentile(seconds, 0.99):.2f}s"
    )
    assert kinds["queued"] == accepted["queued"]
