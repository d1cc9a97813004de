"""The real object store: one bucket on an S3 server, through aiobotocore (`S3ObjectStore`)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Self

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from orchestrator.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from orchestrator.metrics import S3_REQUEST_SECONDS
from orchestrator.store.base import ObjectInfo, PresignedPost

if TYPE_CHECKING:
    from types import TracebackType

    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_s3 import S3Client

    from orchestrator.settings import S3Settings

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_EXISTS = frozenset({"PreconditionFailed", "412"})
_tracer = trace.get_tracer("parjobs.s3")


def create_s3_client(
    settings: S3Settings, *, endpoint_url: str | None = None
) -> ClientCreatorContext[S3Client]:
    """An aiobotocore S3 client (`async with`) for `settings`, at `endpoint_url` if given."""
    access_key_id, secret_access_key = settings.require_credentials()
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint_url or settings.require_endpoint(),
        region_name=settings.region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=settings.client_config(),
    )


def _strip_etag(etag: str) -> str:
    return etag.strip('"')


@contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """Translate botocore errors into the parjobs exceptions."""
    try:
        yield
    except ClientError as err:
        error = err.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        if code in _NOT_FOUND:
            raise ObjectNotFoundError(f"no object at {key!r}") from err
        if code in _EXISTS:
            raise ObjectExistsError(f"an object already exists at {key!r}") from err
        raise ObjectStoreError(f"S3 refused {key!r}: {code} {message}".rstrip()) from err
    except BotoCoreError as err:
        raise ObjectStoreError(f"S3 request for {key!r} failed: {err}") from err


@contextmanager
def _s3_call(operation: str, key: str) -> Iterator[None]:
    """One S3 operation: its botocore errors translated (`_s3_errors`), its time and outcome
    recorded (`parjobs_s3_request_seconds`), and a client span of the current trace."""
    outcome = "ok"
    started = time.perf_counter()
    with _tracer.start_as_current_span(
        f"S3 {operation}",
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "aws-api", "rpc.service": "S3", "rpc.method": operation},
        # A missing object or a lost conditional create is an answer, not a failure.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            with _s3_errors(key):
                yield
        except ObjectNotFoundError:
            outcome = "not_found"
            raise
        except ObjectExistsError:
            outcome = "exists"
            raise
        except ObjectStoreError as exc:
            outcome = "error"
            span.set_status(StatusCode.ERROR, str(exc))
            raise
        finally:
            span.set_attribute("parjobs.outcome", outcome)
            S3_REQUEST_SECONDS.labels(operation, outcome).observe(time.perf_counter() - started)


class S3ObjectStore:
    """One bucket on one S3 server (an `ObjectStore`): `async with S3ObjectStore(s) as store:`."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None
        self._presigner: S3Client | None = None

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self._client = await stack.enter_async_context(create_s3_client(self.settings))
            # Presigned URLs are signed for the host their holders will reach.
            self._presigner = await stack.enter_async_context(
                create_s3_client(self.settings, endpoint_url=self.settings.presign_endpoint_url)
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client = self._presigner = None
        await self._stack.aclose()

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            raise ObjectStoreError("S3ObjectStore is not open: use `async with S3ObjectStore(...)`")
        return self._client

    @property
    def _signer(self) -> S3Client:
        if self._presigner is None:
            raise ObjectStoreError("S3ObjectStore is not open: use `async with S3ObjectStore(...)`")
        return self._presigner

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (idempotent)."""
        with _s3_call("ensure_bucket", self.bucket):
            try:
                await self._s3.head_bucket(Bucket=self.bucket)
                return
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket"}:
                    raise
            try:
                await self._s3.create_bucket(Bucket=self.bucket)
            except ClientError as err:  # a concurrent creator won the race
                if err.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    async def check(self) -> None:
        """A HEAD on the bucket: the server answers, with these credentials."""
        with _s3_call("head_bucket", self.bucket):
            await self._s3.head_bucket(Bucket=self.bucket)

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        """Store `data` at `key`, replacing any object there; returns the ETag."""
        with _s3_call("put_object", key):
            response = await self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type or "application/octet-stream",
            )
        return _strip_etag(response["ETag"])

    async def put_if_absent(self, key: str, data: bytes) -> str:
        """Create `key` only if nothing is there (`If-None-Match: *`); ObjectExistsError if not."""
        with _s3_call("put_object_if_absent", key):
            response = await self._s3.put_object(
                Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*"
            )
        return _strip_etag(response["ETag"])

    async def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFoundError if there is none."""
        with _s3_call("get_object", key):
            response = await self._s3.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                return await body.read()

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and metadata, or None if there is none."""
        try:
            with _s3_call("head_object", key):
                response = await self._s3.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFoundError:
            return None
        return ObjectInfo(
            key=key,
            size=response["ContentLength"],
            etag=_strip_etag(response["ETag"]),
            metadata=response.get("Metadata", {}),
        )

    async def delete(self, key: str) -> None:
        """Remove the object at `key`; removing a missing object is not an error."""
        with _s3_call("delete_object", key):
            await self._s3.delete_object(Bucket=self.bucket, Key=key)

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix` (not the whole bucket); returns how many."""
        if not prefix:
            raise ValueError("refusing to delete the whole bucket: give a non-empty prefix")
        keys = [info.key for info in await self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            with _s3_call("delete_objects", prefix):
                await self._s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
        return len(keys)

    async def presign_get(self, key: str, expires_in: int) -> str:
        """A URL that lets its holder GET `key` for `expires_in` seconds."""
        with _s3_errors(key):
            return await self._signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )

    async def presign_put(
        self, key: str, expires_in: int, *, sha256_b64: str | None = None
    ) -> tuple[str, dict[str, str]]:
        """A URL to PUT `key`, and the headers the uploader must send with it.

        With `sha256_b64` (base64 SHA-256 of the body) the checksum header is signed, so S3
        refuses (400 BadDigest) any other content.
        """
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        headers: dict[str, str] = {}
        if sha256_b64 is not None:
            params["ChecksumSHA256"] = sha256_b64
            headers["x-amz-checksum-sha256"] = sha256_b64
        with _s3_errors(key):
            url = await self._signer.generate_presigned_url(
                "put_object", Params=params, ExpiresIn=expires_in
            )
        return url, headers

    async def presign_post(
        self, prefix: str, expires_in: int, *, min_size: int, max_size: int
    ) -> PresignedPost:
        """A POST policy to upload any `prefix<filename>` of `min_size`..`max_size` bytes."""
        with _s3_errors(prefix):
            # botocore adds ["starts-with", "$key", prefix] itself for a key ending in ${filename}.
            post = await self._signer.generate_presigned_post(
                Bucket=self.bucket,
                Key=prefix + "${filename}",
                Conditions=[["content-length-range", min_size, max_size]],
                ExpiresIn=expires_in,
            )
        return PresignedPost(url=post["url"], fields=post["fields"])

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> builtins.list[ObjectInfo]:
        """Every object under `prefix` (only keys after `start_after`, if given), sorted by key."""
        found: builtins.list[ObjectInfo] = []
        with _s3_call("list_objects_v2", prefix):
            pages = self._s3.get_paginator("list_objects_v2")
            # An empty StartAfter means "from the first key", as S3 defines it.
            listing = pages.paginate(
                Bucket=self.bucket, Prefix=prefix, StartAfter=start_after or ""
            )
            async for page in listing:
                found.extend(
                    ObjectInfo(key=obj["Key"], size=obj["Size"], etag=_strip_etag(obj["ETag"]))
                    for obj in page.get("Contents", [])
                )
        return sorted(found, key=lambda info: info.key)
