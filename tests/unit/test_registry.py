"""Closing PARs at the issuer's registry, on the in-memory store.

What closing revokes at once and what only expiry ends (the README's statement) is tested
against a real S3 server in tests/integration/test_registry.py.
"""

from __future__ import annotations

from datetime import timedelta

import anyio
import pytest

from orchestrator import (
    PAR,
    ConfigurationError,
    KeyPair,
    PARClosedError,
    PARError,
    PARPermissionError,
    PARState,
    WrongKeyError,
    use_par_control,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.base import ObjectStore
from orchestrator.store.registry import PARRegistry


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
