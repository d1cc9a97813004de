"""The README's statement of what closing a PAR revokes at once and what only expiry ends,
checked against a real SeaweedFS (closing itself is tested in tests/unit/test_registry.py)."""

from __future__ import annotations

from datetime import timedelta

import anyio
import httpx
import pytest

from orchestrator import (
    PAR,
    KeyPair,
    ObjectReader,
    PARClosedError,
    PARExpiredError,
    PARState,
    PARTransport,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.base import ObjectStore
from orchestrator.store.registry import PARRegistry
from tests.unit.test_registry import Job

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(store: ObjectStore, prefix: str) -> PARRegistry:
    return PARRegistry(store, root=f"{prefix}registry/")


@pytest.fixture
def issuer(store: ObjectStore, registry: PARRegistry) -> PARIssuer:
    return PARIssuer(store, registry, name="storage")


@pytest.fixture(scope="module")
def user() -> KeyPair:
    return KeyPair.generate("user")


async def test_what_closing_revokes_and_what_only_expiry_ends(
    issuer: PARIssuer, registry: PARRegistry, store: ObjectStore, user: KeyPair, prefix: str
) -> None:
    """README, "What closing a PAR revokes": checked here line by line."""
    key = f"{prefix}data"
    await store.put(key, b"data")
    par = await issuer.object_par(key, user.public, lifetime=timedelta(seconds=3))
    copy = PAR.from_data(par.to_data())
    leaked_url = par.open(user, allow_expired=True).get_url
    assert leaked_url is not None
    await par.close(user, control=registry)

    # At once: the issuer's registry says closed, and so does every run check against it ...
    assert await registry.state(par.uid) is PARState.CLOSED
    # ... the closed PAR object refuses all use ...
    with pytest.raises(PARClosedError):
        await ObjectReader(par, user).get_object()
    # ... and the issuer's driver details are gone, only the tombstone remains.
    assert await store.head(f"{prefix}registry/{par.uid}.json") is None
    assert await store.head(f"{prefix}registry/{par.uid}.closed") is not None

    # Not at once: a presigned URL that was already opened stays valid until it expires;
    # other copies of the PAR, unaware of the close, can still read (S3 checks only signature
    # and expiry) ...
    async with httpx.AsyncClient() as http:
        assert (await http.get(leaked_url)).status_code == 200
    async with PARTransport() as transport:
        assert (await transport.download_bytes(leaked_url))[0] == b"data"
        # ... until expiry, when S3 itself refuses.
        await anyio.sleep(copy.seconds_remaining(buffer=0) + 1.5)
        with pytest.raises(PARExpiredError):
            await transport.download_bytes(leaked_url)
    assert await store.get(key) == b"data"  # closing never deletes data


async def test_a_job_par_named_by_uid_alone_leads_to_its_job_on_a_real_store(
    store: ObjectStore, prefix: str, user: KeyPair
) -> None:
    """The record in the minting event, found by another process through S3's listing of the
    jobs whose uid starts like the PAR's (a prefix that ends inside a key's folder name)."""
    job = Job(store, prefix)
    upload, _ = await job.contract(user, KeyPair.generate("compute"))
    elsewhere = job.registry_in(job.log())
    assert await elsewhere.state(upload.uid, recipient=user.fingerprint) is PARState.OPEN
    await upload.close(user, control=elsewhere)
    assert await job.registry_in(job.log()).state(upload.uid) is PARState.CLOSED
    # Only the tombstone: minting wrote nothing there.
    listed = [info.key for info in await store.list(f"{prefix}registry/")]
    assert listed == [f"{prefix}registry/{upload.uid}.closed"]
