"""Closing PARs at the issuer's registry, on the in-memory store.

What closing revokes at once and what only expiry ends (the README's statement) is tested
against a real S3 server in tests/integration/test_registry.py.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import anyio
import pytest

from orchestrator import (
    PAR,
    BucketReader,
    ConfigurationError,
    KeyPair,
    ObjectKeyError,
    PARClosedError,
    PARError,
    PARPermissionError,
    PARState,
    PARTransport,
    WrongKeyError,
    use_par_control,
)
from orchestrator.core.par_rules import capability_proof
from orchestrator.errors import EventLogCorruptError, PARNotFoundError
from orchestrator.par.issuer import JobPARs, PARIssuer
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.registry import PARRegistry
from schemas.events import ComputeContracted, JobEvent, StorageContracted
from tests._forwarding import CountingStore
from tests.unit.test_eventlog import sealed_log
from tests.unit.test_jobstate import SUBMITTED, USER


@pytest.fixture
def registry(store: ObjectStore, prefix: str) -> PARRegistry:
    return PARRegistry(store, root=f"{prefix}registry/")


@pytest.fixture
def issuer(store: ObjectStore, registry: PARRegistry) -> PARIssuer:
    return PARIssuer(store, registry, name="storage")


@pytest.fixture(scope="module")
def user() -> KeyPair:
    return KeyPair.generate("user")


async def test_close_once_then_refused(
    issuer: PARIssuer, registry: PARRegistry, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}k", user.public)
    copy = PAR.from_data(par.to_data())
    assert await registry.state(par.uid) is PARState.OPEN
    await par.close(user, control=registry)
    assert await registry.state(par.uid) is PARState.CLOSED
    with pytest.raises(PARClosedError):
        await par.close(user, control=registry)
    with pytest.raises(PARClosedError, match=r"already closed|was closed"):
        await copy.close(user, control=registry)


async def test_close_needs_the_recipient_key(
    issuer: PARIssuer, registry: PARRegistry, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}k", user.public)
    with pytest.raises(WrongKeyError):
        await par.close(KeyPair.generate("mallory"), control=registry)
    with pytest.raises(PARPermissionError, match="proof of possession"):
        await registry.close(par.uid, "0" * 64)
    assert await registry.state(par.uid) is PARState.OPEN


async def test_concurrent_closes_succeed_exactly_once(
    issuer: PARIssuer, registry: PARRegistry, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}k", user.public)
    copies = [PAR.from_data(par.to_data()) for _ in range(10)]
    outcomes: list[str] = []

    async def close(copy: PAR) -> None:
        try:
            await copy.close(user, control=registry)
            outcomes.append("closed")
        except PARClosedError:
            outcomes.append("refused")

    async with anyio.create_task_group() as group:
        for copy in copies:
            group.start_soon(close, copy)
    assert sorted(outcomes) == ["closed"] + ["refused"] * 9


async def test_closing_an_expired_par_is_allowed(
    issuer: PARIssuer, registry: PARRegistry, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}k", user.public, lifetime=timedelta(seconds=1))
    await anyio.sleep(1.2)
    assert await registry.state(par.uid) is PARState.EXPIRED
    await par.close(user, control=registry)
    assert await registry.state(par.uid) is PARState.CLOSED


async def test_default_control_comes_from_context(
    issuer: PARIssuer, registry: PARRegistry, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}k", user.public)
    with pytest.raises(ConfigurationError, match="use_par_control"):
        await par.close(user)
    with use_par_control(registry):
        await par.close(user)
    assert await registry.state(par.uid) is PARState.CLOSED


async def test_unknown_par_is_an_error(registry: PARRegistry) -> None:
    with pytest.raises(PARError, match="no PAR"):
        await registry.state("f" * 32)


async def test_run_control_needs_a_run_service(
    issuer: PARIssuer, registry: PARRegistry, user: KeyPair
) -> None:
    par = await issuer.calculation_par("job-1", user.public)
    run = par.execute(user, control=registry)
    assert run.run_url.startswith(f"parjobs-run://storage/{par.uid}?token=")
    with pytest.raises(ConfigurationError, match="ParjobsClient"):
        await run.start()
    await par.close(user, control=registry)
    assert await registry.state(par.uid) is PARState.CLOSED
    with pytest.raises(PARClosedError):
        par.execute(user, control=registry)


# --- a job's PARs: recorded in the event that hands them out ------------------------------------


class Job:
    """A job whose storage has contracted: the upload and bucket-write PARs minted by storage,
    their records in its sealed `storage_contracted` event, nothing else written."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.uid = uuid.uuid4().hex
        self.jobs = f"{prefix}jobs/"
        self.registry_root = f"{prefix}registry/"
        self.storage_log = sealed_log(store, self.jobs, "storage")
        self.registry = self.registry_in(self.storage_log)
        self.issuer = PARIssuer(store, self.registry, name="storage")

    def registry_in(self, log: EventLog, store: ObjectStore | None = None) -> PARRegistry:
        return PARRegistry(store or self.store, root=self.registry_root, log=log)

    def log(self, store: ObjectStore | None = None) -> EventLog:
        """Another process's log of the jobs: it remembers nothing yet."""
        return sealed_log(store or self.store, self.jobs, "access")

    async def contract(self, user: KeyPair, compute: KeyPair) -> tuple[PAR, PAR]:
        await self.log().create(self.uid, f"user:{USER}", SUBMITTED)
        minted = JobPARs(self.uid)
        upload = await self.issuer.object_par(
            f"{self.jobs}{self.uid}/input", user.public, readable=False, writeable=True, job=minted
        )
        output = await self.issuer.bucket_write_par(
            f"{self.jobs}{self.uid}/output/", compute.public, max_size=10, job=minted
        )
        payload = StorageContracted(
            upload_par=upload.data, output_par=output.data, proofs=minted.proofs
        )
        await self.storage_log.transition(self.uid, "storage", payload)
        return upload, output


@pytest.fixture
def job(store: ObjectStore, prefix: str) -> Job:
    return Job(store, prefix)


async def test_minting_a_job_par_writes_nothing_and_its_event_is_its_record(
    job: Job, user: KeyPair
) -> None:
    upload, output = await job.contract(user, KeyPair.generate("compute"))
    assert await job.store.list(job.registry_root) == []
    assert {upload.uid[:16], output.uid[:16]} == {job.uid[:16]}  # each leads to its job
    # The minting process remembers the event: the record costs no read, only the tombstone's.
    async with CountingStore(job.store) as counting:
        registry = job.registry_in(job.storage_log, counting)
        assert await registry.state(upload.uid, recipient=user.fingerprint) is PARState.OPEN
        record = await registry.verify(upload.uid, proof(upload, user))
    assert (record.recipient, record.expires_at) == (user.fingerprint, upload.data.expires_at)
    assert record.driver_details["key"] == upload.data.key
    assert (counting.lists, counting.gets) == ([], [f"{job.registry_root}{upload.uid}.closed"] * 2)
    # Another process finds the job from the PAR's uid, and reads its log once.
    async with CountingStore(job.store) as counting:
        elsewhere = job.registry_in(job.log(counting), counting)
        assert await elsewhere.state(upload.uid) is PARState.OPEN
        assert await elsewhere.state(upload.uid) is PARState.OPEN
    assert [listed for listed, _ in counting.lists] == [
        f"{job.jobs}{job.uid[:16]}",  # the jobs the uid leads to
        f"{job.jobs}{job.uid}/events/",  # that job's log
    ]


def proof(par: PAR, holder: KeyPair) -> str:
    return capability_proof(par.open(holder))


async def test_a_job_par_closes_once_everywhere(job: Job, user: KeyPair) -> None:
    upload, _ = await job.contract(user, KeyPair.generate("compute"))
    copy = PAR.from_data(upload.to_data())
    elsewhere = job.registry_in(job.log())
    await upload.close(user, control=elsewhere)
    assert await job.registry.state(upload.uid) is PARState.CLOSED
    with pytest.raises(PARClosedError):
        await job.registry.verify(upload.uid, proof(copy, user))
    with pytest.raises(PARClosedError, match=r"already closed|was closed"):
        await copy.close(user, control=job.registry)
    # The event still holds the record; the tombstone, written by the close, overrides it.
    listed = [info.key for info in await job.store.list(job.registry_root)]
    assert listed == [f"{job.registry_root}{upload.uid}.closed"]


async def test_a_job_par_answers_only_its_recipient(job: Job, user: KeyPair) -> None:
    compute = KeyPair.generate("compute")
    upload, output = await job.contract(user, compute)
    # The bucket-write PAR is compute's: the job's user (who sees the event) cannot close it.
    with pytest.raises(PARNotFoundError):
        await job.registry.close(output.uid, proof(output, compute), recipient=user.fingerprint)
    with pytest.raises(PARNotFoundError):
        await job.registry.state(upload.uid, recipient=compute.fingerprint)
    with pytest.raises(PARPermissionError, match="proof of possession"):
        await job.registry.close(upload.uid, "0" * 64, recipient=user.fingerprint)
    assert await job.registry.state(output.uid, recipient=compute.fingerprint) is PARState.OPEN
    with pytest.raises(PARNotFoundError):
        await job.registry.state(job.uid[:16] + "0" * 16)  # the job's, but no such PAR


async def test_a_record_no_service_sealed_is_refused(job: Job, user: KeyPair) -> None:
    await job.contract(user, KeyPair.generate("compute"))
    # A hostile writer adds an event of its own making: a run PAR with a proof it chose.
    mine = JobPARs(job.uid)
    run = await job.issuer.calculation_par(job.uid, user.public, job=mine)
    forged = JobEvent(
        job_uid=job.uid,
        seq=3,
        actor="compute",
        payload=ComputeContracted(run_par=run.data, proofs=mine.proofs),
    )
    await job.store.put_if_absent(
        job.log().event_key(job.uid, 3), forged.model_dump_json().encode()
    )
    with pytest.raises(EventLogCorruptError):
        await job.registry_in(job.log()).state(run.uid)


async def test_a_read_par_over_objects_just_written_lists_nothing(
    job: Job, user: KeyPair, par_transport: PARTransport
) -> None:
    output = f"{job.jobs}{job.uid}/output/"
    await job.store.put(f"{output}a/b.txt", b"b")
    minted = JobPARs(job.uid)
    async with CountingStore(job.store) as counting:
        issuer = PARIssuer(counting, job.registry, name="compute")
        par = await issuer.bucket_read_par(output, user.public, objects=["a/b.txt"], job=minted)
    assert (counting.lists, counting.creates) == ([], [])
    assert list(minted.proofs) == [par.uid]
    reader = BucketReader(par, user, transport=par_transport)
    assert (reader.list_keys(), await reader.get_object("a/b.txt")) == (["a/b.txt"], b"b")
    with pytest.raises(ObjectKeyError):
        await issuer.bucket_read_par(output, user.public, objects=["../input"], job=minted)
