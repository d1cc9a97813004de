"""A whole job driven by a client written in Node.js from the docs alone (`tests/node/client.mjs`),
against the three daemons as processes (LocalCluster) on the real RabbitMQ and SeaweedFS.

The Node client signs and pays for the job, follows its verified events, uploads through the
upload PAR, starts through the run PAR and downloads the outputs through a read PAR; the Python
side then checks what it fetched and the job's log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import KeyPair, ParjobsClient
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.core.layout import JobKeys
from orchestrator.services.accounts import Accounts
from orchestrator.settings import AMQPSettings
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import Completed
from workers.cluster import LocalCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO / "tests" / "node" / "client.mjs"
NPM_PACKAGES = ("amqplib", "canonicalize", "@hpke/core", "@hpke/dhkem-x25519")
PASSPHRASE = "node client passphrase"
DEPOSIT = Decimal(5)


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` binary, with the client's npm packages installed; a clear failure if not."""
    binary = shutil.which("node")
    modules = REPO / "node_modules"
    missing = [name for name in NPM_PACKAGES if not (modules / name / "package.json").is_file()]
    if binary is None or missing:
        what = "node is not installed" if binary is None else f"npm packages missing: {missing}"
        pytest.fail(f"{what}; fix: bash scripts/bootstrap.sh", pytrace=False)
    return binary


@dataclass(frozen=True)
class NodeUser:
    """A registered, funded user as the Node client sees them: files and a URL."""

    name: str
    key: KeyPair
    key_file: Path
    amqp: AMQPSettings


@pytest.fixture(scope="module")
async def cluster(node: str, seaweed: LocalSeaweed) -> AsyncIterator[LocalCluster]:
    """The three daemons, started once `node` is known to be there."""
    overrides = {"PARJOBS_DATA_ROOT": f"node-{uuid.uuid4().hex[:8]}/"}
    prefix = f"pjnode{uuid.uuid4().hex[:8]}"
    async with LocalCluster(
        seaweed.settings, prefix=prefix, overrides=overrides, delete_topology=True
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def user(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> NodeUser:
    """A user with a key file as `parjobs keys new` writes it, registered and funded."""
    key = KeyPair.generate("nodeuser")
    key_file = tmp_path_factory.mktemp("node-user") / "nodeuser.key"
    key.save(key_file, PASSPHRASE)
    amqp = await cluster.add_user(key.name, key.public)
    async with S3ObjectStore(cluster.s3) as store:
        await Accounts(store, JobKeys(cluster.data_root)).deposit(key.name, DEPOSIT)
    return NodeUser(key.name, key, key_file, amqp)


@dataclass(frozen=True)
class NodeRun:
    status: int
    result: dict[str, Any]
    stderr: str


async def run_node_client(node: str, cluster: LocalCluster, user: NodeUser, *args: str) -> NodeRun:
    """`node tests/node/client.mjs <args>` as `user`; its exit status and last JSON line."""
    env = {
        **os.environ,
        "PARJOBS_AMQP_URL": user.amqp.amqp_url.get_secret_value(),
        "PARJOBS_KEY_FILE": str(user.key_file),
        "PARJOBS_KEY_PASSPHRASE": PASSPHRASE,
        "PARJOBS_SERVICE_KEYS_FILE": str(cluster.service_keys_file),
    }
    with anyio.fail_after(180):
        done = await anyio.run_process([node, str(NODE_CLIENT), *args], env=env, check=False)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    lines = stdout.strip().splitlines()
    assert lines, f"the Node client printed nothing (exit {done.returncode}): {stderr}"
    return NodeRun(done.returncode, json.loads(lines[-1]), stderr)


async def balance(cluster: LocalCluster, name: str) -> Decimal:
    async with S3ObjectStore(cluster.s3) as store:
        return await Accounts(store, JobKeys(cluster.data_root)).balance(name)


async def test_node_client_runs_a_whole_job(
    node: str, cluster: LocalCluster, user: NodeUser, tmp_path: Path
) -> None:
    data = b"alpha,1\nbeta,2\ngamma,3\n" * 100
    source = tmp_path / "input.csv"
    source.write_bytes(data)
    out = tmp_path / "out"
    before = await balance(cluster, user.name)

    run = await run_node_client(
        node,
        cluster,
        user,
        "--calculation=checksum",
        f"--input={source}",
        '--params={"byte_stats": false}',
        "--max-spend=1.5",
        f"--output={out}",
    )

    assert run.status == 0, run.stderr
    assert "dropped" not in run.stderr  # every event and reply verified
    result = run.result
    assert result["ok"] is True
    assert result["events"][:3] == ["submitted", "storage_contracted", "compute_contracted"]
    assert result["events"][-1] == "completed"
    # What Node fetched is what the calculation computed over the bytes it uploaded.
    fetched = json.loads((out / "summary.json").read_text())
    assert fetched["sha256"] == hashlib.sha256(data).hexdigest()
    assert (fetched["size_bytes"], fetched["lines"]) == (len(data), 300)
    assert "bytes" not in fetched  # the signed parameters reached it: no byte statistics
    [recorded] = result["outputs"]
    assert recorded["sha256"] == hashlib.sha256((out / "summary.json").read_bytes()).hexdigest()

    # The Python side: the job's verified log has one `completed`, naming what Node fetched.
    async with (
        AMQPBroker(user.amqp, name="e2e-node-check") as broker,
        ParjobsClient(broker, user.key, service_keys=cluster.service_keys) as client,
    ):
        events = await client.events(result["job_uid"])
        python_out = await client.fetch(result["job_uid"], tmp_path / "python-out")
    types = [event.payload.type for event in events]
    assert types.count("completed") == 1
    assert types == result["events"]
    completed = events[-1].payload
    assert isinstance(completed, Completed)
    assert [o.model_dump() for o in completed.outputs] == result["outputs"]
    assert [p.read_bytes() for p in python_out] == [(out / "summary.json").read_bytes()]
    # The cheque paid: charged for the run, the rest refunded.
    assert Decimal(0) < before - await balance(cluster, user.name) <= Decimal("1.5")


async def test_a_tampered_request_signature_is_refused(
    node: str, cluster: LocalCluster, user: NodeUser, tmp_path: Path
) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(b"never run\n")
    before = await balance(cluster, user.name)

    run = await run_node_client(
        node,
        cluster,
        user,
        "--calculation=checksum",
        f"--input={source}",
        "--max-spend=1",
        "--tamper=request-signature",
    )

    assert run.status == 2, run.stderr
    assert run.result["ok"] is False
    assert run.result["error"] == "signature.forged", run.result
    assert await balance(cluster, user.name) == before  # nothing held, nothing created


async def test_a_job_that_fails_ends_the_node_client_with_its_reason(
    node: str, cluster: LocalCluster, user: NodeUser, tmp_path: Path
) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(b"x")
    before = await balance(cluster, user.name)

    run = await run_node_client(
        node,
        cluster,
        user,
        "--calculation=sleep",
        f"--input={source}",
        '--params={"seconds": 0, "exit_code": 3}',
        "--max-spend=1",
    )

    assert run.status == 3, run.stderr
    assert run.result["error"] == "job.ended"
    assert "ended failed before completed" in run.result["message"]
    with anyio.fail_after(30):  # a failed job is refunded in full, once access settles it
        while await balance(cluster, user.name) != before:
            await anyio.sleep(0.2)
