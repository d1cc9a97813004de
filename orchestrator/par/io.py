"""Reading and writing data through PARs: the seed page's ObjectReader/Writer, BucketReader/Writer.

Each checks what the PAR grants before any byte moves, opens the capability with the holder's key
(refusing expired, closed or foreign PARs), then streams through `PARTransport`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from orchestrator.core.keys import KeyPair
from orchestrator.core.par_rules import join_key, validate_key
from orchestrator.errors import (
    InvalidPARError,
    PARPermissionError,
    RemoteObjectNotFoundError,
    UploadTooLargeError,
    UploadTooSmallError,
)
from orchestrator.par.par import PAR
from orchestrator.par.transfer import PARTransport, TransferResult, local_file
from schemas.par import Capability, PARKind

Filename = str | os.PathLike[str]


def _check_size(par: PAR, size: int, what: str) -> None:
    data = par.data
    if data.max_size is not None and size > data.max_size:
        raise UploadTooLargeError(
            f"{what} is {size} bytes; PAR {par.uid} allows at most {data.max_size}; nothing sent"
        )
    if size < data.min_size:
        raise UploadTooSmallError(
            f"{what} is {size} bytes; PAR {par.uid} needs at least {data.min_size}; nothing sent"
        )


class _PARAccess:
    _kind: PARKind

    def __init__(
        self, par: PAR, decrypt_key: KeyPair, *, transport: PARTransport | None = None
    ) -> None:
        if par.kind is not self._kind:
            raise InvalidPARError(
                f"{type(self).__name__} needs an {self._kind.value} PAR; PAR {par.uid} is a "
                f"{par.kind.value} PAR"
            )
        self._par = par
        self._decrypt_key = decrypt_key
        self._transport = transport

    @property
    def par(self) -> PAR:
        return self._par

    def _require(self, granted: bool, verb: str) -> Capability:
        if not granted:
            mode = "read" if self._par.is_readable else "write"
            raise PARPermissionError(f"PAR {self._par.uid} is {mode}-only: it cannot {verb}")
        return self._par.open(self._decrypt_key)

    @asynccontextmanager
    async def _http(self) -> AsyncIterator[PARTransport]:
        # A caller's shared transport is reused; otherwise one lives for this call only.
        if self._transport is not None:
            yield self._transport
        else:
            async with PARTransport() as transport:
                yield transport


class ObjectReader(_PARAccess):
    """Read the one object an object PAR points at."""

    _kind = PARKind.OBJECT

    def __init__(
        self, par: PAR, decrypt_key: KeyPair, *, transport: PARTransport | None = None
    ) -> None:
        super().__init__(par, decrypt_key, transport=transport)
        if type(self) is ObjectReader and not par.is_readable:
            raise PARPermissionError(f"PAR {par.uid} is write-only: use an ObjectWriter")

    def _get_url(self) -> str:
        url = self._require(self._par.is_readable, "read").get_url
        if url is None:
            raise InvalidPARError(f"PAR {self._par.uid} carries no read URL")
        return url

    async def get_object_as_file(
        self, filename: Filename, *, expected_sha256: str | None = None
    ) -> TransferResult:
        """Stream the object into `filename`; an existing file is replaced only on success."""
        async with self._http() as http:
            return await http.download_to_file(
                self._get_url(), Path(filename), expected_sha256=expected_sha256
            )

    async def get_object(self, *, expected_sha256: str | None = None) -> bytes:
        async with self._http() as http:
            data, _ = await http.download_bytes(self._get_url(), expected_sha256=expected_sha256)
        return data

    async def get_string(self, encoding: str = "utf-8") -> str:
        return (await self.get_object()).decode(encoding)

    async def get_json(self) -> Any:
        return json.loads(await self.get_object())


class ObjectWriter(ObjectReader):
    """Read (if granted) and write the one object an object PAR points at."""

    def __init__(
        self, par: PAR, decrypt_key: KeyPair, *, transport: PARTransport | None = None
    ) -> None:
        super().__init__(par, decrypt_key, transport=transport)
        if not par.is_writeable:
            raise PARPermissionError(f"PAR {par.uid} is read-only: use an ObjectReader")

    def _put(self) -> tuple[str, dict[str, str]]:
        capability = self._require(self._par.is_writeable, "write")
        if capability.put_url is None:
            raise InvalidPARError(f"PAR {self._par.uid} carries no write URL")
        return capability.put_url, capability.put_headers

    async def set_object_from_file(self, filename: Filename) -> TransferResult:
        """Stream `filename` to the object; S3 checks its MD5 (and SHA-256 if the PAR pins one)."""
        path = local_file(filename)
        _check_size(self._par, path.stat().st_size, str(path))
        url, headers = self._put()
        async with self._http() as http:
            return await http.put_file(url, headers, path)

    async def set_object(self, data: bytes) -> TransferResult:
        _check_size(self._par, len(data), "the data")
        url, headers = self._put()
        async with self._http() as http:
            return await http.put_bytes(url, headers, data)

    async def set_string(self, text: str, encoding: str = "utf-8") -> TransferResult:
        return await self.set_object(text.encode(encoding))

    async def set_json(self, value: Any) -> TransferResult:
        return await self.set_object(json.dumps(value).encode())


class BucketReader(_PARAccess):
    """Read the objects a bucket read PAR lists (those under its prefix when it was minted)."""

    _kind = PARKind.BUCKET

    def __init__(
        self, par: PAR, decrypt_key: KeyPair, *, transport: PARTransport | None = None
    ) -> None:
        super().__init__(par, decrypt_key, transport=transport)
        if not par.is_readable:
            raise PARPermissionError(f"PAR {par.uid} is write-only: use a BucketWriter")

    def list_keys(self) -> list[str]:
        """The keys (relative to the prefix) this PAR can read, sorted."""
        return sorted(self._require(True, "read").manifest)

    def _url_for(self, key: str) -> str:
        manifest = self._require(True, "read").manifest
        url = manifest.get(validate_key(key))
        if url is None:
            raise RemoteObjectNotFoundError(
                f"{key!r} is not one of the {len(manifest)} objects PAR {self._par.uid} lists"
            )
        return url

    async def get_object_as_file(
        self, key: str, filename: Filename, *, expected_sha256: str | None = None
    ) -> TransferResult:
        async with self._http() as http:
            return await http.download_to_file(
                self._url_for(key), Path(filename), expected_sha256=expected_sha256
            )

    async def get_object(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        async with self._http() as http:
            data, _ = await http.download_bytes(self._url_for(key), expected_sha256=expected_sha256)
        return data

    async def get_string(self, key: str, encoding: str = "utf-8") -> str:
        return (await self.get_object(key)).decode(encoding)

    async def get_json(self, key: str) -> Any:
        return json.loads(await self.get_object(key))


class BucketWriter(_PARAccess):
    """Write objects under a bucket write PAR's prefix; S3 enforces the prefix and size range."""

    _kind = PARKind.BUCKET

    def __init__(
        self, par: PAR, decrypt_key: KeyPair, *, transport: PARTransport | None = None
    ) -> None:
        super().__init__(par, decrypt_key, transport=transport)
        if not par.is_writeable:
            raise PARPermissionError(f"PAR {par.uid} is read-only: use a BucketReader")

    def _post(self, key: str) -> tuple[str, dict[str, str], str]:
        prefix = self._par.data.prefix
        if prefix is None:
            raise InvalidPARError(f"PAR {self._par.uid} has no prefix")
        full_key = join_key(prefix, key)
        capability = self._require(True, "write")
        if capability.post_url is None:
            raise InvalidPARError(f"PAR {self._par.uid} carries no POST policy")
        return capability.post_url, capability.post_fields, full_key

    async def set_object_from_file(self, key: str, filename: Filename) -> TransferResult:
        """Stream `filename` to `<prefix><key>`."""
        path = local_file(filename)
        _check_size(self._par, path.stat().st_size, str(path))
        url, fields, full_key = self._post(key)
        async with self._http() as http:
            return await http.post_file(url, fields, full_key, path)

    async def set_object(self, key: str, data: bytes) -> TransferResult:
        _check_size(self._par, len(data), "the data")
        url, fields, full_key = self._post(key)
        async with self._http() as http:
            return await http.post_bytes(url, fields, full_key, data)

    async def set_string(self, key: str, text: str, encoding: str = "utf-8") -> TransferResult:
        return await self.set_object(key, text.encode(encoding))

    async def set_json(self, key: str, value: Any) -> TransferResult:
        return await self.set_object(key, json.dumps(value).encode())
