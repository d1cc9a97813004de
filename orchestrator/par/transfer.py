"""All HTTP a PAR holder does, behind one seam: streamed GET, PUT and POST to presigned URLs.

Nothing here holds a whole object in memory: files move in 1 MiB chunks. Integrity is checked end
to end: uploads send Content-MD5 (S3 rejects a body that does not match) and compare the ETag it
returns; downloads hash as they stream, compare the ETag, and only replace the destination file
once everything matched. S3's XML errors become the specific exceptions of `_exceptions`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import anyio
import httpx

from orchestrator.errors import (
    IntegrityError,
    LocalFileNotFoundError,
    OutsidePrefixError,
    PARExpiredError,
    RemoteObjectNotFoundError,
    RemoteRejectedError,
    TransferError,
    UploadTooLargeError,
    UploadTooSmallError,
)

CHUNK_SIZE = 1 << 20
_PLAIN_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class TransferResult:
    """What moved: its size, SHA-256 (hex) and the ETag the server reported."""

    size: int
    sha256: str
    etag: str | None


@dataclass(frozen=True)
class _Digests:
    size: int
    sha256: str
    md5_hex: str | None

    @property
    def md5_b64(self) -> str:
        if self.md5_hex is None:
            raise ValueError("no MD5 was computed for this transfer")
        return base64.b64encode(bytes.fromhex(self.md5_hex)).decode()


class _Hasher:
    """SHA-256 always; MD5 only where S3 needs it (Content-MD5, or the ETag is the only check).

    MD5 costs about three times SHA-256 here, so a download with an expected SHA-256 skips it.
    """

    def __init__(self, *, md5: bool = True) -> None:
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        self.size += len(chunk)

    def digests(self) -> _Digests:
        md5_hex = self._md5.hexdigest() if self._md5 is not None else None
        return _Digests(self.size, self._sha256.hexdigest(), md5_hex)


def _digest_bytes(data: bytes) -> _Digests:
    hasher = _Hasher()
    hasher.update(data)
    return hasher.digests()


def _digest_file(path: Path) -> _Digests:
    hasher = _Hasher()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher.digests()


def local_file(filename: str | os.PathLike[str]) -> Path:
    """`filename` as a Path, refusing early (and specifically) when there is nothing to send."""
    path = Path(filename)
    if not path.is_file():
        raise LocalFileNotFoundError(f"{path} does not exist or is not a file; nothing was sent")
    return path


def _error_fields(body: bytes) -> tuple[str, str]:
    text = body.decode(errors="replace")
    code = re.search(r"<Code>(.*?)</Code>", text)
    message = re.search(r"<Message>(.*?)</Message>", text)
    return (code.group(1) if code else "", message.group(1) if message else text[:200])


def _raise_for_s3(response: httpx.Response, body: bytes, *, what: str) -> None:
    if response.status_code < 300:
        return
    code, message = _error_fields(body)
    status = response.status_code
    detail = f"S3 refused to {what}: {status} {code}: {message}"
    if "expired" in message.lower():
        raise PARExpiredError(f"{detail} (the PAR's presigned URL is past its expiry)")
    if code == "EntityTooLarge":
        raise UploadTooLargeError(f"{detail}; nothing was stored")
    if code == "EntityTooSmall":
        raise UploadTooSmallError(f"{detail}; nothing was stored")
    if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
        raise IntegrityError(f"{detail}; the bytes sent did not match their checksum")
    if code in ("NoSuchKey", "NoSuchBucket") or status == 404:
        raise RemoteObjectNotFoundError(f"{detail}; nothing has been written there yet")
    if code == "AccessDenied" and "policy" in message.lower():
        raise OutsidePrefixError(f"{detail}; the key is outside what the PAR may write")
    raise RemoteRejectedError(detail, status=status, s3_code=code)


def _check_etag(etag: str | None, digests: _Digests, *, what: str) -> None:
    # A plain MD5 ETag (not multipart-style "...-N") must equal what we hashed.
    if digests.md5_hex and etag and _PLAIN_MD5_ETAG.match(etag) and etag != digests.md5_hex:
        raise IntegrityError(
            f"{what}: the server's ETag {etag} does not match the MD5 {digests.md5_hex} of the "
            "bytes; the data was corrupted in transit"
        )


def _etag(response: httpx.Response) -> str | None:
    raw = response.headers.get("etag")
    return raw.strip('"') if raw else None


def _check_expected(digests: _Digests, expected_sha256: str | None, *, what: str) -> None:
    if expected_sha256 is not None and digests.sha256 != expected_sha256.lower():
        raise IntegrityError(
            f"{what}: SHA-256 {digests.sha256} differs from the expected {expected_sha256}"
        )


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as source:
        while chunk := await source.read(CHUNK_SIZE):
            yield chunk


class PARTransport:
    """Streams bytes to and from presigned URLs. One per task or shared; close when done."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=False
        )

    async def __aenter__(self) -> PARTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # --- downloads ------------------------------------------------------------------------------

    async def download_to_file(
        self, url: str, destination: Path, *, expected_sha256: str | None = None
    ) -> TransferResult:
        """Stream `url` into `destination`; the old file stays untouched unless all checks pass."""
        destination = Path(destination)
        partial = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.partial")
        hasher = _Hasher(md5=expected_sha256 is None)
        try:
            async with self._request("GET", url, what="read the object") as response:
                async with await anyio.open_file(partial, "wb") as sink:
                    async for chunk in response.aiter_bytes(CHUNK_SIZE):
                        hasher.update(chunk)
                        await sink.write(chunk)
                etag = _etag(response)
            digests = hasher.digests()
            _check_etag(etag, digests, what=f"download to {destination}")
            _check_expected(digests, expected_sha256, what=f"download to {destination}")
            os.replace(partial, destination)
        finally:
            partial.unlink(missing_ok=True)
        return TransferResult(digests.size, digests.sha256, etag)

    async def download_bytes(
        self, url: str, *, expected_sha256: str | None = None
    ) -> tuple[bytes, TransferResult]:
        async with self._request("GET", url, what="read the object") as response:
            data = await response.aread()
            etag = _etag(response)
        digests = _digest_bytes(data)
        _check_etag(etag, digests, what="download")
        _check_expected(digests, expected_sha256, what="download")
        return data, TransferResult(digests.size, digests.sha256, etag)

    # --- uploads --------------------------------------------------------------------------------

    async def put_file(self, url: str, headers: dict[str, str], path: Path) -> TransferResult:
        digests = await anyio.to_thread.run_sync(_digest_file, path)
        return await self._put(url, headers, digests, _file_chunks(path))

    async def put_bytes(self, url: str, headers: dict[str, str], data: bytes) -> TransferResult:
        return await self._put(url, headers, _digest_bytes(data), data)

    async def post_file(
        self, url: str, fields: dict[str, str], key: str, path: Path
    ) -> TransferResult:
        digests = await anyio.to_thread.run_sync(_digest_file, path)
        with path.open("rb") as source:
            return await self._post(url, fields, key, digests, source)

    async def post_bytes(
        self, url: str, fields: dict[str, str], key: str, data: bytes
    ) -> TransferResult:
        return await self._post(url, fields, key, _digest_bytes(data), data)

    # --- plumbing -------------------------------------------------------------------------------

    async def _put(
        self,
        url: str,
        headers: dict[str, str],
        digests: _Digests,
        content: bytes | AsyncIterator[bytes],
    ) -> TransferResult:
        # Content-MD5 makes S3 itself reject a body that changed on the way (400 BadDigest).
        sent = {
            **headers,
            "Content-MD5": digests.md5_b64,
            "Content-Length": str(digests.size),
        }
        async with self._request(
            "PUT", url, what="write the object", headers=sent, content=content
        ) as response:
            etag = _etag(response)
        _check_etag(etag, digests, what="upload")
        return TransferResult(digests.size, digests.sha256, etag)

    async def _post(
        self,
        url: str,
        fields: dict[str, str],
        key: str,
        digests: _Digests,
        content: bytes | BinaryIO,
    ) -> TransferResult:
        form = {**fields, "key": key}
        files = {"file": (Path(key).name, content, "application/octet-stream")}
        async with self._request(
            "POST", url, what=f"write {key!r}", data=form, files=files
        ) as response:
            etag = _etag(response)
        _check_etag(etag, digests, what=f"upload of {key!r}")
        return TransferResult(digests.size, digests.sha256, etag)

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: dict[str, str] | None = None,
        content: bytes | AsyncIterator[bytes] | None = None,
        data: dict[str, str] | None = None,
        files: dict[str, tuple[str, bytes | BinaryIO, str]] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """One streamed request; a non-2xx answer becomes a specific exception."""
        try:
            async with self._client.stream(
                method, url, headers=headers, content=content, data=data, files=files
            ) as response:
                if response.status_code >= 300:
                    _raise_for_s3(response, await response.aread(), what=what)
                yield response
        except httpx.TransportError as exc:
            host = httpx.URL(url).host
            raise TransferError(f"cannot {what}: S3 at {host} unreachable ({exc})") from exc
