"""A run's progress against the three daemons (LocalCluster), with every S3 request counted.

Progress travels on the broker, signed by compute, to the job's owner; only a bounded snapshot is
written to S3. The S3 requests of every process (daemons and client, presigned ones included) go
through the counting proxy of `benchmarks/s3_counter.py`, so the test can say what a job costs in
writes, and how that grows with a run that prints all the time: a 10-minute job printing a line
a second, scaled down 20 times (a line every 0.05 s for 5 s, the snapshot interval 30 s -> 1.5 s).
"""

from __future__ import annotations

import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import anyio
import pytest

from benchmarks.bench_jobs import s3_counting_proxy, s3_counts
from orchestrator import KeyPair, ParjobsClient
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.core.layout import JobKeys
from orchestrator.services.accounts import Accounts
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobEvent, JobState
from schemas.messages import ProgressReport
from workers.cluster import LocalCluster

pytestmark = pytest.mark.integration

SCALE = 20
"""The run here is this many times shorter than the job it stands for, and so is each interval."""
REAL_RUN_S, REAL_LINE_S, REAL_SNAPSHOT_S = 600, 1.0, 30.0
RUN_S = REAL_RUN_S / SCALE / 6  # 5 s: a sixth of the scaled 30 s, extrapolated below
LINE_S, SNAPSHOT_S = REAL_LINE_S / SCALE, REAL_SNAPSHOT_S / SCALE
TICKER = (
    "import sys, time\n"
    "n, every = int(sys.argv[1]), float(sys.argv[2])\n"
    "for i in range(n):\n"
    "    time.sleep(every)\n"
    "    print('tick', i + 1, 'of', n, flush=True)\n"
)
COMMANDS = {"ticker": [sys.executable, "-I", "-u", "-c", TICKER, "{lines}", "{every}"]}
WRITES = ("conditional PUT", "PUT", "DELETE")
"""What the counting proxy calls the requests that write through the S3 API (the presigned
transfers apart: the input's upload, and each output's)."""


@dataclass
class Counted:
    client: ParjobsClient
    counts_url: str
    store: S3ObjectStore
    keys: JobKeys


@pytest.fixture(scope="module")
async def counted(seaweed: LocalSeaweed) -> AsyncIterator[Counted]:
    """A registered, funded user's client of a cluster of their own, its S3 requests counted."""
    overrides = {
        "PARJOBS_DATA_ROOT": f"progress-{uuid.uuid4().hex[:8]}/",
        "PARJOBS_PROGRESS_SNAPSHOT_S": str(SNAPSHOT_S),
        "PARJOBS_COMMANDS": json.dumps(COMMANDS),
    }
    async with s3_counting_proxy(seaweed.settings) as (s3, counts_url):
        cluster = LocalCluster(
            s3, prefix=f"pjprog{uuid.uuid4().hex[:8]}", overrides=overrides, delete_topology=True
        )
        async with cluster, S3ObjectStore(cluster.s3) as store:
            user = KeyPair.generate("ticker")
            settings = await cluster.add_user(user.name, user.public)
            keys = JobKeys(cluster.data_root)
            await Accounts(store, keys).deposit(user.name, Decimal(5))
            async with (
                AMQPBroker(settings, name="e2e-progress") as broker,
                ParjobsClient(broker, user, service_keys=cluster.service_keys) as client,
            ):
                yield Counted(client, counts_url, store, keys)


async def _settled(url: str) -> Counter[str]:
    """The counts once nothing has been asked of S3 for a second (access settling the job)."""
    counts = await s3_counts(url)
    while True:
        await anyio.sleep(1.0)
        if (again := await s3_counts(url)) == counts:
            return counts
        counts = again


Updates = list[JobEvent | ProgressReport]


async def _job(counted: Counted, lines: int) -> tuple[Counter[str], Updates]:
    """Run the ticker for `lines` lines; its S3 requests by kind, and what job.events() gave."""
    before = await _settled(counted.counts_url)
    every = f"{LINE_S:g}"
    job = await counted.client.run(
        "command",
        b"x",
        {"command": "ticker", "args": {"lines": str(lines), "every": every}},
        max_spend=Decimal(1),
    )
    seen = [update async for update in job.events()]
    assert (await job.result(timeout=60)).state is JobState.COMPLETED
    after = await _settled(counted.counts_url)
    return after - before, seen


async def test_progress_costs_a_snapshot_per_interval_not_a_write_per_line(
    counted: Counted,
) -> None:
    quiet, _ = await _job(counted, 1)
    lines = round(RUN_S / LINE_S)  # 100
    loud, seen = await _job(counted, lines)
    job_uid = seen[0].job_uid
    # The owner saw the run's progress live, between run_started and completed ...
    types = [update.payload.type for update in seen]
    assert types[:4] == ["submitted", "storage_contracted", "compute_contracted", "run_started"]
    assert types[-1] == "completed"
    reports = [update for update in seen if isinstance(update, ProgressReport)]
    assert len(reports) >= 5
    assert reports[-1].payload.message.startswith("stdout: tick ")
    # ... and the log has none of it: the same conditional writes as a run of one line.
    log = await counted.client.events(job_uid)
    assert "progress" not in [event.payload.type for event in log]
    assert loud["conditional PUT"] == quiet["conditional PUT"]
    # The snapshot is the plain PUTs beyond the quiet job's (its one snapshot, the active marker):
    # one per interval of the run, and the run's last line as it ended.
    times = {event.payload.type: event.time for event in log}
    run_s = (times["completed"] - times["run_started"]).total_seconds()
    snapshots = loud["PUT"] - quiet["PUT"] + 1
    assert 2 <= snapshots <= run_s / SNAPSHOT_S + 2
    snapshot = await counted.store.get(counted.keys.progress(job_uid))
    kept = ProgressReport.model_validate_json(snapshot)
    assert kept.payload.message == f"stdout: tick {lines} of {lines}"  # kept after the end
    # A 10-minute job printing a line a second: its writes apart from the snapshots (conditional
    # creates of its log, cheque, ledger..., the active marker's PUT and the sweeper's DELETE of
    # it, whenever that comes), and a snapshot per interval and one at the end.
    fixed = loud["conditional PUT"] + (loud["PUT"] - snapshots) + 1
    # The quiet job's, but for its one snapshot (and the DELETE, if the sweeper came later).
    assert sum(quiet[kind] for kind in WRITES) - 1 in (fixed, fixed - 1)
    ten_minutes = fixed + REAL_RUN_S / REAL_SNAPSHOT_S + 1
    extrapolated = fixed + (snapshots - 1) * REAL_RUN_S / (run_s * SCALE) + 1
    print(
        f"\nS3 requests of a job printing {lines} lines in {run_s:.1f} s: {dict(loud)}; of one "
        f"line: {dict(quiet)}. Writes: {fixed} + {snapshots} snapshots. A 10-minute job printing "
        f"a line a second: {ten_minutes:.0f} S3 writes ({fixed} + "
        f"{REAL_RUN_S / REAL_SNAPSHOT_S:.0f} + 1 snapshots), {extrapolated:.0f} extrapolated "
        "from this run; with a progress event "
        f"per line: {fixed} + {REAL_RUN_S / REAL_LINE_S:.0f} conditional creates."
    )
    assert abs(extrapolated - ten_minutes) <= 0.25 * REAL_RUN_S / REAL_SNAPSHOT_S
