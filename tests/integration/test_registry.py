"""Closing PARs at the issuer's registry, against the real SeaweedFS.

Also tests the README's statement of what closing revokes at once and what only expiry ends.
"""

from __future__ import annotations

from datetime import timedelta

import anyio
import httpx
import pytest

from orchestrator import (
    PAR,
    ConfigurationError,
    KeyPair,
    ObjectReader,
    PARClosedError,
    PARError,
    PARExpiredError,
    PARPermissionError,
    PARState,
    PARTransport,
    WrongKeyError,
    use_par_control,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.registry import PARRegistry
from orchestrator.store.s3 import S3ObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(store: S3ObjectStore, prefix: str) -> PARRegistry:
    return PARRegistry(store, root=f"{prefix}registry/")


@pytest.fixture
def issuer(store: S3ObjectStore, registry: PARRegistry) -> PARIssuer:
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


async def test_what_closing_revokes_and_what_only_expiry_ends(
    issuer: PARIssuer, registry: PARRegistry, store: S3ObjectStore, user: KeyPair, prefix: str
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
