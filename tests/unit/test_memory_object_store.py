"""The object-store contract on `MemoryObjectStore`, and what only the twin has to say."""

from __future__ import annotations

import httpx
import pytest

from orchestrator.store.memory import DEFAULT_ENDPOINT, MemoryObjectStore
from tests.contract.object_store import ObjectStoreContract


class TestMemoryObjectStore(ObjectStoreContract):
    """Every contract test, on a fresh in-memory store (fixtures in tests/unit/conftest.py)."""


async def test_urls_point_nowhere_but_at_the_twins_transport(
    memory_store: MemoryObjectStore,
) -> None:
    await memory_store.put("k", b"data")
    url = await memory_store.presign_get("k", 60)
    assert url.startswith(f"{DEFAULT_ENDPOINT}/parjobs/k?")
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.ConnectError):
            await plain.get(url)


async def test_another_stores_urls_are_refused(memory_store: MemoryObjectStore) -> None:
    twin = MemoryObjectStore()
    await twin.put("k", b"twin's")
    await memory_store.put("k", b"mine")
    async with httpx.AsyncClient(transport=memory_store.http_transport()) as http:
        answer = await http.get(await twin.presign_get("k", 60))
    assert answer.status_code == 403
    assert "SignatureDoesNotMatch" in answer.text


async def test_the_store_is_an_async_context_manager(memory_store: MemoryObjectStore) -> None:
    async with memory_store as entered:
        assert entered is memory_store
