"""Streaming through PARs against a real SeaweedFS: 64 MiB up and back in bounded memory (every
other reader and writer behaviour is tested on the in-memory store in tests/unit/test_access.py,
which holds its objects in memory by design)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from orchestrator import KeyPair, ObjectWriter
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.base import ObjectStore
from orchestrator.store.registry import PARRegistry

pytestmark = pytest.mark.integration


@pytest.fixture
def issuer(store: ObjectStore, prefix: str) -> PARIssuer:
    return PARIssuer(store, PARRegistry(store, root=f"{prefix}registry/"), name="storage")


@pytest.fixture(scope="module")
def user() -> KeyPair:
    return KeyPair.generate("user")


async def test_streaming_keeps_memory_flat(
    issuer: PARIssuer, user: KeyPair, prefix: str, tmp_path: Path
) -> None:
    """64 MiB through a PAR and back must not be held in memory (bounded Python allocations)."""
    source = tmp_path / "big.bin"
    with source.open("wb") as out:
        for _ in range(64):
            out.write(os.urandom(2**20))
    par = await issuer.object_par(f"{prefix}big", user.public, writeable=True)
    writer = ObjectWriter(par, user)
    tracemalloc.start()
    try:
        sent = await writer.set_object_from_file(source)
        await writer.get_object_as_file(tmp_path / "back.bin", expected_sha256=sent.sha256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent.size == 64 * 2**20
    assert peak < 16 * 2**20, f"peak Python allocation {peak / 2**20:.1f} MiB"
