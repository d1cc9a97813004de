"""The `parjobs` commands, run as a user would, against the three daemons (LocalCluster)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator.store.seaweed import LocalSeaweed
from workers.cluster import LocalCluster, s3_environment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def cluster(seaweed: LocalSeaweed) -> AsyncIterator[LocalCluster]:
    overrides = {"PARJOBS_DATA_ROOT": f"cli-{uuid.uuid4().hex[:8]}/"}
    prefix = f"pjcli{uuid.uuid4().hex[:8]}"
    cluster = LocalCluster(
        seaweed.settings, prefix=prefix, overrides=overrides, delete_topology=True
    )
    async with cluster as running:
        yield running


def parjobs(
    cluster: LocalCluster, *args: str, as_user: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`parjobs <args>` as the operator, or as a user connecting with `as_user` (the AMQP URL
    `users add` printed for them)."""
    operator = cluster.operator_amqp.amqp_url.get_secret_value()
    env = {
        **os.environ,
        **s3_environment(cluster.s3),
        "PARJOBS_PREFIX": cluster.prefix,
        "PARJOBS_AMQP_URL": as_user or operator,
        "PARJOBS_SERVICE_KEYS_FILE": str(cluster.service_keys_file),
        "PARJOBS_KEY_PASSPHRASE": "cli test passphrase",
        "PARJOBS_DATA_ROOT": cluster.data_root,
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def add_user(cluster: LocalCluster, name: str, public_key: Path) -> str:
    """`parjobs accounts users add`: the AMQP URL it prints once for the user."""
    adding = ("accounts", "users", "add", name, "--public-key", str(public_key))
    added = parjobs(cluster, *adding).stdout
    found = re.search(r"export PARJOBS_AMQP_URL='([^']+)'", added)
    assert found is not None, added
    assert f"broker user user:{name}@{cluster.prefix}" in added
    return found.group(1)


def test_submit_status_events_fetch_replay(cluster: LocalCluster, tmp_path: Path) -> None:
    key = tmp_path / "me.key"
    parjobs(cluster, "keys", "new", str(key), "--name", "me")
    me = add_user(cluster, "me", tmp_path / "me.key.pub")
    assert "balance 10.000000" in parjobs(cluster, "accounts", "deposit", "me", "10").stdout
    data = tmp_path / "data.txt"
    data.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    submitted = parjobs(
        cluster,
        *("jobs", "submit", "checksum", str(data), "--key", str(key), "--output", str(out)),
        "--json",
        as_user=me,
    )
    done = json.loads(submitted.stdout)  # --json: stdout is the one document
    job_uid = done["job"]
    assert done["state"] == "completed"
    assert done["fetched"] == [str(out / "summary.json")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size_bytes"] == 14
    assert summary["lines"] == 3

    status = parjobs(cluster, "jobs", "status", job_uid, "--key", str(key), "--json", as_user=me)
    assert json.loads(status.stdout)["state"] == "completed"
    assert json.loads(status.stdout)["outputs"] == ["summary.json"]
    told = parjobs(cluster, "status", job_uid, "--key", str(key), as_user=me).stdout
    assert "state: completed" in told  # the spelling before the groups, as a person reads it
    watched = parjobs(cluster, "watch", job_uid, "--key", str(key), as_user=me).stdout
    assert f"job {job_uid} completed" in watched
    logged = parjobs(cluster, "jobs", "events", job_uid, "--key", str(key), "--json", as_user=me)
    assert [event["seq"] for event in json.loads(logged.stdout)] == [1, 2, 3, 4, 5]
    timeline = parjobs(cluster, "events", job_uid, "--key", str(key), as_user=me).stdout
    for event in (
        "submitted",
        "storage_contracted",
        "compute_contracted",
        "run_started",
        "completed",
    ):
        assert event in timeline
    again = tmp_path / "again"
    parjobs(cluster, "fetch", job_uid, str(again), "--key", str(key), as_user=me)
    assert (again / "summary.json").read_bytes() == (out / "summary.json").read_bytes()
    replayed = parjobs(cluster, "replay")
    assert "0 diverge" in replayed.stdout
    assert json.loads(parjobs(cluster, "admin", "replay", "--json").stdout)["diverged"] == 0
    # Paid for: held when cashed, then charged for the CPU used and the rest refunded.
    balance = parjobs(cluster, "account", "balance", "me").stdout
    assert Decimal("9") < Decimal(balance.split(":")[1]) < Decimal(10)
    as_json = json.loads(parjobs(cluster, "accounts", "balance", "me", "--json").stdout)
    assert as_json == {"account": "me", "balance": balance.split(":")[1].strip()}
    statement = parjobs(cluster, "account", "statement", "me").stdout
    for kind in ("deposit", "hold", "settle"):
        assert kind in statement
    assert "the books balance" in parjobs(cluster, "ledger", "verify").stdout
    verified = parjobs(cluster, "accounts", "ledger", "verify", "--json").stdout
    assert json.loads(verified) == {"ok": True, "problems": []}


def test_a_job_that_failed_is_exit_3_for_submit_and_watch(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    key = tmp_path / "me.key"
    parjobs(cluster, "keys", "new", str(key), "--name", "failing")
    me = add_user(cluster, "failing", tmp_path / "me.key.pub")
    parjobs(cluster, "accounts", "deposit", "failing", "10")
    data = tmp_path / "data.txt"
    data.write_text("x")
    submit = ("jobs", "submit", "sleep", str(data), "--key", str(key), "--json")
    failed = parjobs(
        cluster, *submit, "-p", "seconds=0", "-p", "exit_code=3", as_user=me, check=False
    )
    assert failed.returncode == 3, failed.stdout + failed.stderr
    told = json.loads(failed.stdout)
    assert told["state"] == "failed"
    watched = parjobs(cluster, "watch", told["job"], "--key", str(key), as_user=me, check=False)
    assert watched.returncode == 3, watched.stdout + watched.stderr
    assert f"job {told['job']} failed" in watched.stdout


def test_users_commands_need_their_own_broker_user(cluster: LocalCluster, tmp_path: Path) -> None:
    key = tmp_path / "me.key"
    parjobs(cluster, "keys", "new", str(key), "--name", "nobody")
    as_operator = parjobs(cluster, "status", "0" * 32, "--key", str(key), check=False)
    assert as_operator.returncode == 2
    assert "is no registered user" in as_operator.stderr
    # A URL `users add` printed, with another password: RabbitMQ refuses it.
    url = add_user(cluster, "nobody", tmp_path / "me.key.pub")
    wrong = re.sub(r":[^:@/]+@127", ":not-the-password@127", url)
    refused = parjobs(cluster, "status", "0" * 32, "--key", str(key), as_user=wrong, check=False)
    assert refused.returncode == 2
    assert "(broker.unavailable)" in refused.stderr


def test_errors_are_specific(cluster: LocalCluster, tmp_path: Path) -> None:
    key = tmp_path / "me.key"
    parjobs(cluster, "keys", "new", str(key), "--name", "other")
    other = add_user(cluster, "other", tmp_path / "me.key.pub")
    missing = parjobs(cluster, "status", "0" * 32, "--key", str(key), as_user=other, check=False)
    assert missing.returncode == 2
    assert "no job" in missing.stderr
    assert "(job.not_found)" in missing.stderr
    data = tmp_path / "d"
    data.write_text("x")
    submit = ("submit", "no-such-calc", str(data), "--key", str(key))
    unknown = parjobs(cluster, *submit, as_user=other, check=False)
    assert unknown.returncode == 2
    assert "no-such-calc" in unknown.stderr
    assert "(calculation.unknown)" in unknown.stderr
    submit = ("submit", "checksum", str(data), "--key", str(key))
    broke = parjobs(cluster, *submit, as_user=other, check=False)
    assert broke.returncode == 2
    assert "too little" in broke.stderr
    assert "(ledger.insufficient_funds)" in broke.stderr


def test_cheque_write_prints_a_signed_cheque(cluster: LocalCluster, tmp_path: Path) -> None:
    key = tmp_path / "me.key"
    parjobs(cluster, "keys", "new", str(key), "--name", "payer")
    written = parjobs(
        cluster, "cheque", "write", "--key", str(key), "--resource", "a" * 64, "--max-spend", "3"
    )
    cheque = json.loads(written.stdout)
    assert cheque["payer"] == "payer"
    assert cheque["recipient"] == "access"
    assert cheque["max_spend"] == "3.000000"
    assert len(cheque["signature"]) > 40


def test_dlq_list_runs(cluster: LocalCluster) -> None:
    listed = parjobs(cluster, "dlq", "list")
    assert "message id" in listed.stdout
    assert isinstance(json.loads(parjobs(cluster, "admin", "dlq", "list", "--json").stdout), list)
