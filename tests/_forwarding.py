"""A store that forwards every call to another: subclass it to watch or meddle with one call."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Self

from orchestrator.store.base import ObjectInfo, ObjectStore, PresignedPost

if TYPE_CHECKING:
    from types import TracebackType


class ForwardingStore:
    """An `ObjectStore` that is `inner` (same objects), for tests that override a method or two.

    `async with` gives the store itself, as an opened `S3ObjectStore` would.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    @property
    def bucket(self) -> str:
        return self.inner.bucket

    async def ensure_bucket(self) -> None:
        await self.inner.ensure_bucket()

    async def check(self) -> None:
        await self.inner.check()

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        return await self.inner.put(key, data, content_type=content_type)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        return await self.inner.put_if_absent(key, data)

    async def get(self, key: str) -> bytes:
        return await self.inner.get(key)

    async def head(self, key: str) -> ObjectInfo | None:
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> builtins.list[ObjectInfo]:
        return await self.inner.list(prefix, start_after=start_after)

    async def presign_get(self, key: str, expires_in: int) -> str:
        return await self.inner.presign_get(key, expires_in)

    async def presign_put(
        self, key: str, expires_in: int, *, sha256_b64: str | None = None
    ) -> tuple[str, dict[str, str]]:
        return await self.inner.presign_put(key, expires_in, sha256_b64=sha256_b64)

    async def presign_post(
        self, prefix: str, expires_in: int, *, min_size: int, max_size: int
    ) -> PresignedPost:
        return await self.inner.presign_post(
            prefix, expires_in, min_size=min_size, max_size=max_size
        )


class CountingStore(ForwardingStore):
    """Records the key of every GET, conditional create and plain PUT, and the prefix and start
    of every listing, to see what a store's user asks for."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store)
        self.gets: list[str] = []
        self.creates: list[str] = []
        self.puts: list[str] = []
        self.lists: list[tuple[str, str | None]] = []

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        self.puts.append(key)
        return await super().put(key, data, content_type=content_type)

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> builtins.list[ObjectInfo]:
        self.lists.append((prefix, start_after))
        return await super().list(prefix, start_after=start_after)

    async def get(self, key: str) -> bytes:
        self.gets.append(key)
        return await super().get(key)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        self.creates.append(key)
        return await super().put_if_absent(key, data)
