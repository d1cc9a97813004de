"""The unit tier's object store: a fresh `MemoryObjectStore` per test, and HTTP to its URLs.

`store` is the same store as `memory_store`, so a test written against the integration tier's
`store` fixture runs here unchanged.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import httpx
import pytest

from orchestrator.par.transfer import PARTransport
from orchestrator.store.memory import MemoryObjectStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture
def memory_store() -> MemoryObjectStore:
    """An empty in-memory bucket of this test's own."""
    return MemoryObjectStore()


@pytest.fixture
def store(memory_store: MemoryObjectStore) -> MemoryObjectStore:
    """The tier's store: the in-memory one."""
    return memory_store


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own (the store is fresh anyway; keys look as they do on S3)."""
    return f"t-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def http(memory_store: MemoryObjectStore) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose requests the store's presigned URLs answer (no network)."""
    async with httpx.AsyncClient(transport=memory_store.http_transport()) as client:
        yield client


@pytest.fixture
def par_transport(http: httpx.AsyncClient) -> PARTransport:
    """A `PARTransport` for PAR readers and writers, talking to the in-memory store."""
    return PARTransport(http)
