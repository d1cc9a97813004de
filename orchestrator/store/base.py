"""The object-store seam: what the services ask of a bucket, as one protocol.

`S3ObjectStore` (`store.s3`) talks to a real S3 server; `MemoryObjectStore` (`store.memory`) keeps
the bucket in memory with the same semantics, for tests with no server. Both pass one contract
suite (`tests/contract/object_store.py`).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store knows about one object (listings carry no metadata)."""

    key: str
    size: int
    etag: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresignedPost:
    """A browser-style POST upload: send `fields` as form fields, then the file, to `url`."""

    url: str
    fields: dict[str, str]


class ObjectStore(Protocol):
    """One bucket. Every implementation keeps these semantics (the contract suite checks them).

    Keys are plain strings; a "prefix" is a leading substring, not a folder. ETags are the hex
    MD5 of the bytes (S3's single-part ETag), without quotes. Failures of the store itself are
    `ObjectStoreError`s.
    """

    @property
    def bucket(self) -> str:
        """The bucket's name (recorded in the PARs minted on it)."""
        ...

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists; calling it again is harmless."""
        ...

    async def check(self) -> None:
        """A round trip to the store: the bucket answers (an `ObjectStoreError` if not)."""
        ...

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        """Store `data` at `key`, replacing any object there; returns the ETag."""
        ...

    async def put_if_absent(self, key: str, data: bytes) -> str:
        """Create `key` only if nothing is there; returns the ETag.

        An existing object is refused with `ObjectExistsError` and left as it was. Of writers
        racing to create one key, exactly one wins.
        """
        ...

    async def get(self, key: str) -> bytes:
        """The object's bytes; `ObjectNotFoundError` if there is none."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and metadata, or None if there is none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object at `key`; removing a missing object is not an error."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix`; returns how many.

        An empty prefix (the whole bucket) is refused with ValueError.
        """
        ...

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> builtins.list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key, however many there are.

        With `start_after`, only keys greater than it (it need not exist, nor start with
        `prefix`); None or "" means from the first key.
        """
        ...

    async def presign_get(self, key: str, expires_in: int) -> str:
        """A URL that lets its holder GET `key` for `expires_in` seconds, and nothing else.

        The store refuses the URL once expired (403, a message saying "expired") or edited in any
        way (403 SignatureDoesNotMatch), and a GET of a missing key (404 NoSuchKey).
        """
        ...

    async def presign_put(
        self, key: str, expires_in: int, *, sha256_b64: str | None = None
    ) -> tuple[str, dict[str, str]]:
        """A URL to PUT `key` for `expires_in` seconds, and the headers the uploader must send.

        With `sha256_b64` (base64 SHA-256 of the body) the checksum header is signed: a request
        without it is refused (403 SignatureDoesNotMatch), other content with it is refused (400
        BadDigest). A `Content-MD5` header, if sent, must match the body (400 BadDigest).
        Expiry and edits are refused as for `presign_get`.
        """
        ...

    async def presign_post(
        self, prefix: str, expires_in: int, *, min_size: int, max_size: int
    ) -> PresignedPost:
        """A POST policy to upload any `prefix<name>` of `min_size`..`max_size` bytes.

        The form's `key` field may be `prefix${filename}` (as given) or any key starting with
        `prefix`; another key is refused (403 AccessDenied, "Invalid according to Policy"), as is
        a file too large (400 EntityTooLarge) or too small (400 EntityTooSmall), an expired
        policy (403, "Policy expired") and an edited one (403 SignatureDoesNotMatch). Success
        answers 204 with the object's ETag.
        """
        ...
