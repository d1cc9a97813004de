"""The two-line client against the three daemons (LocalCluster): `client.run`, then the `Job`."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator import Job, JobFailedError, KeyPair, ParjobsClient
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.core.layout import JobKeys
from orchestrator.services.accounts import Accounts
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobState
from workers.cluster import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def client(seaweed: LocalSeaweed) -> AsyncIterator[ParjobsClient]:
    """A registered, funded user's client of a cluster of their own."""
    overrides = {"PARJOBS_DATA_ROOT": f"run-{uuid.uuid4().hex[:8]}/"}
    cluster = LocalCluster(
        seaweed.settings,
        prefix=f"pjrun{uuid.uuid4().hex[:8]}",
        overrides=overrides,
        delete_topology=True,
    )
    async with cluster:
        user = KeyPair.generate("runner")
        settings = await cluster.add_user(user.name, user.public)
        async with S3ObjectStore(cluster.s3) as store:
            await Accounts(store, JobKeys(cluster.data_root)).deposit(user.name, Decimal(5))
        async with (
            AMQPBroker(settings, name="e2e-run") as broker,
            ParjobsClient(broker, user, service_keys=cluster.service_keys) as client,
        ):
            yield client


async def test_run_then_events_result_and_fetch(client: ParjobsClient, tmp_path: Path) -> None:
    data = b"one\ntwo\nthree\n"
    job = await client.run("checksum", data, max_spend=Decimal(1))
    assert isinstance(job, Job)
    seen = [event.payload.type async for event in job.events()]
    assert seen[:4] == ["submitted", "storage_contracted", "compute_contracted", "run_started"]
    assert seen[-1] == "completed"
    sheet = await job.result(timeout=60)
    assert sheet.state is JobState.COMPLETED
    [summary] = await job.fetch(tmp_path / "out")
    assert summary.name == "summary.json"
    assert json.loads(summary.read_text())["sha256"] == hashlib.sha256(data).hexdigest()


async def test_a_job_that_failed_raises_job_failed_error(client: ParjobsClient) -> None:
    job = await client.run("sleep", b"x", {"seconds": 0, "exit_code": 3}, max_spend=Decimal(1))
    with pytest.raises(JobFailedError) as failed:
        await job.result(timeout=60)
    assert failed.value.job_uid == job.uid
    assert failed.value.reason
