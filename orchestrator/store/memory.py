"""An object store in memory, presigned URLs included: for tests with no server.

`MemoryObjectStore` keeps one bucket in a dict with the semantics of `S3ObjectStore` (one contract
suite runs on both). Its presigned URLs are served by `http_transport()`, an `httpx.MockTransport`
that enforces what S3 enforces and answers with S3's status codes and XML errors, so PAR readers
and writers run against it unchanged::

    store = MemoryObjectStore()
    async with httpx.AsyncClient(transport=store.http_transport()) as http:
        transport = PARTransport(http)
        await ObjectWriter(par, user_key, transport=transport).set_object(b"...")

URLs are signed with an HMAC under a secret of this store (not SigV4, which needs no secret here):
any edit of the method, key, expiry or a signed header makes the signature fail.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote
from xml.sax.saxutils import escape

import httpx
from anyio.lowlevel import checkpoint

from orchestrator.errors import ObjectExistsError, ObjectNotFoundError
from orchestrator.store.base import ObjectInfo, PresignedPost

if TYPE_CHECKING:
    from types import TracebackType

DEFAULT_ENDPOINT = "http://memory-object-store.invalid"
"""Where the URLs point: `.invalid` never resolves, so only `http_transport()` answers them."""
_ALGORITHM = "PARJOBS-MEMORY-HMAC-SHA256"
_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_CHECKSUM_HEADER = "x-amz-checksum-sha256"
_DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class _Stored:
    data: bytes
    etag: str
    content_type: str


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class _S3Error(Exception):
    """An S3 error answer: status, code and message (raised inside the transport only)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_SIGNATURE_MISMATCH = (
    403,
    "SignatureDoesNotMatch",
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method.",
)


class MemoryObjectStore:
    """One bucket held in memory: an `ObjectStore` for tests and for users testing theirs.

    Every operation yields to the event loop first, so concurrent tasks interleave as they would
    against a server; the conditional create itself is atomic. `async with` works as for
    `S3ObjectStore` and does nothing.
    """

    def __init__(self, bucket: str = "parjobs", *, endpoint_url: str = DEFAULT_ENDPOINT) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url.rstrip("/")
        self._objects: dict[str, _Stored] = {}
        self._secret = secrets.token_bytes(32)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    # --- the ObjectStore operations --------------------------------------------------------------

    async def ensure_bucket(self) -> None:
        """The bucket always exists."""
        await checkpoint()

    async def check(self) -> None:
        """The bucket always answers."""
        await checkpoint()

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        await checkpoint()
        return self._store(key, data, content_type)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        await checkpoint()
        if key in self._objects:
            raise ObjectExistsError(f"an object already exists at {key!r}")
        return self._store(key, data, None)

    async def get(self, key: str) -> bytes:
        await checkpoint()
        stored = self._objects.get(key)
        if stored is None:
            raise ObjectNotFoundError(f"no object at {key!r}")
        return stored.data

    async def head(self, key: str) -> ObjectInfo | None:
        await checkpoint()
        stored = self._objects.get(key)
        return None if stored is None else ObjectInfo(key, len(stored.data), stored.etag)

    async def delete(self, key: str) -> None:
        await checkpoint()
        self._objects.pop(key, None)

    async def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("refusing to delete the whole bucket: give a non-empty prefix")
        doomed = [info.key for info in await self.list(prefix)]
        for key in doomed:
            del self._objects[key]
        return len(doomed)

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> builtins.list[ObjectInfo]:
        await checkpoint()
        return [
            ObjectInfo(key, len(stored.data), stored.etag)
            for key, stored in sorted(self._objects.items())
            if key.startswith(prefix) and (not start_after or key > start_after)
        ]

    async def presign_get(self, key: str, expires_in: int) -> str:
        await checkpoint()
        return self._presign("GET", key, expires_in, {})

    async def presign_put(
        self, key: str, expires_in: int, *, sha256_b64: str | None = None
    ) -> tuple[str, dict[str, str]]:
        await checkpoint()
        headers = {} if sha256_b64 is None else {_CHECKSUM_HEADER: sha256_b64}
        return self._presign("PUT", key, expires_in, headers), headers

    async def presign_post(
        self, prefix: str, expires_in: int, *, min_size: int, max_size: int
    ) -> PresignedPost:
        await checkpoint()
        expiration = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=expires_in)
        policy = {
            "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "conditions": [
                {"bucket": self.bucket},
                ["starts-with", "$key", prefix],
                ["content-length-range", min_size, max_size],
            ],
        }
        encoded = _b64(json.dumps(policy).encode())
        return PresignedPost(
            url=f"{self.endpoint_url}/{self.bucket}",
            fields={
                "key": prefix + "${filename}",
                "x-amz-algorithm": _ALGORITHM,
                "policy": encoded,
                "x-amz-signature": self._sign("POST", self.bucket, encoded),
            },
        )

    # --- serving the presigned URLs ------------------------------------------------------------

    def http_transport(self) -> httpx.MockTransport:
        """An httpx transport that answers this store's presigned URLs as S3 would."""
        return httpx.MockTransport(self._serve)

    def _store(self, key: str, data: bytes, content_type: str | None) -> str:
        etag = _md5_hex(data)
        self._objects[key] = _Stored(data, etag, content_type or _DEFAULT_CONTENT_TYPE)
        return etag

    def _sign(self, *parts: str) -> str:
        return hmac.new(self._secret, "\n".join(parts).encode(), hashlib.sha256).hexdigest()

    def _url_signature(
        self,
        method: str,
        url: httpx.URL,
        key: str,
        query: dict[str, str],
        headers: builtins.list[str],
    ) -> str:
        # Like SigV4, it covers the method, the host, the key, the query and the signed headers.
        origin = str(url.copy_with(path="/", query=None))
        signed_query = (f"{name}={value}" for name, value in sorted(query.items()))
        return self._sign(method, origin, key, *signed_query, *headers)

    def _presign(self, method: str, key: str, expires_in: int, headers: dict[str, str]) -> str:
        url = httpx.URL(f"{self.endpoint_url}/{self.bucket}/{quote(key, safe='/')}")
        query = {
            "X-Amz-Algorithm": _ALGORITHM,
            "X-Amz-Date": datetime.now(UTC).strftime(_DATE_FORMAT),
            "X-Amz-Expires": str(expires_in),
            "X-Amz-SignedHeaders": ";".join(["host", *sorted(headers)]),
        }
        values = [headers[name] for name in sorted(headers)]
        signature = self._url_signature(method, url, key, query, values)
        return str(url.copy_with(params={**query, "X-Amz-Signature": signature}))

    def _serve(self, request: httpx.Request) -> httpx.Response:
        bucket, _, key = request.url.path.removeprefix("/").partition("/")
        try:
            if bucket != self.bucket:
                raise _S3Error(404, "NoSuchBucket", "The specified bucket does not exist")
            if not key:
                if request.method == "POST":
                    return self._serve_post(request)
                raise _S3Error(405, "MethodNotAllowed", "The method is not allowed here.")
            self._check_url(request, key)  # signed for one method: any other is refused here
            if request.method == "GET":
                return self._serve_get(key)
            return self._serve_put(request, key)
        except _S3Error as error:
            return _error_response(error, request.url.path, key)

    def _check_url(self, request: httpx.Request, key: str) -> None:
        """Refuse an expired or edited URL, as S3 does (SeaweedFS checks expiry first)."""
        query = dict(request.url.params)
        signature = query.pop("X-Amz-Signature", "")
        try:
            signed_at = datetime.strptime(query["X-Amz-Date"], _DATE_FORMAT).replace(tzinfo=UTC)
            expires_in = int(query["X-Amz-Expires"])
            names = query["X-Amz-SignedHeaders"].split(";")
        except (KeyError, ValueError):
            raise _S3Error(403, "AccessDenied", "Access Denied.") from None
        if datetime.now(UTC) > signed_at + timedelta(seconds=expires_in):
            raise _S3Error(403, "AccessDenied", "Request has expired")
        headers = [request.headers.get(name, "") for name in names if name != "host"]
        expected = self._url_signature(request.method, request.url, key, query, headers)
        if not hmac.compare_digest(expected, signature):
            raise _S3Error(*_SIGNATURE_MISMATCH)

    def _serve_get(self, key: str) -> httpx.Response:
        stored = self._objects.get(key)
        if stored is None:
            raise _S3Error(404, "NoSuchKey", "The specified key does not exist.")
        return httpx.Response(
            200,
            content=stored.data,
            headers={"ETag": f'"{stored.etag}"', "Content-Type": stored.content_type},
        )

    def _serve_put(self, request: httpx.Request, key: str) -> httpx.Response:
        body = request.content
        _check_digests(body, request.headers)
        etag = self._store(key, body, request.headers.get("content-type"))
        return httpx.Response(200, headers={"ETag": f'"{etag}"'})

    def _serve_post(self, request: httpx.Request) -> httpx.Response:
        fields, filename, body = _form(request)
        encoded = fields.get("policy", "")
        if not hmac.compare_digest(
            self._sign("POST", self.bucket, encoded), fields.get("x-amz-signature", "")
        ):
            raise _S3Error(*_SIGNATURE_MISMATCH)
        policy = json.loads(base64.b64decode(encoded))
        expiration = datetime.strptime(policy["expiration"], "%Y-%m-%dT%H:%M:%SZ")
        if datetime.now(UTC) >= expiration.replace(tzinfo=UTC):
            raise _S3Error(403, "AccessDenied", "Invalid according to Policy: Policy expired")
        key = fields.get("key", "").replace("${filename}", filename)
        _check_policy(policy["conditions"], key, len(body))
        etag = self._store(key, body, None)
        return httpx.Response(204, headers={"ETag": f'"{etag}"'})


def _check_digests(body: bytes, headers: httpx.Headers) -> None:
    """Content-MD5 and x-amz-checksum-sha256, when sent, must be the body's."""
    md5 = headers.get("content-md5")
    if md5 is not None:
        try:
            claimed = base64.b64decode(md5, validate=True)
        except ValueError:
            claimed = b""
        if len(claimed) != 16:
            raise _S3Error(400, "InvalidDigest", "The Content-Md5 you specified is not valid.")
        if claimed != hashlib.md5(body, usedforsecurity=False).digest():
            raise _S3Error(
                400, "BadDigest", "The Content-Md5 you specified did not match what we received."
            )
    sha256 = headers.get(_CHECKSUM_HEADER)
    if sha256 is not None and sha256 != _b64(hashlib.sha256(body).digest()):
        raise _S3Error(
            400, "BadDigest", "The SHA256 you specified did not match the calculated checksum."
        )


def _check_policy(conditions: list[Any], key: str, size: int) -> None:
    for condition in conditions:
        if isinstance(condition, dict):  # {"bucket": ...}: checked by the URL's path
            continue
        match condition:
            case ["starts-with", "$key", prefix] if not key.startswith(prefix):
                raise _S3Error(
                    403,
                    "AccessDenied",
                    "Invalid according to Policy: Policy Condition failed: "
                    + json.dumps(condition),
                )
            case ["content-length-range", low, _] if size < low:
                raise _S3Error(
                    400,
                    "EntityTooSmall",
                    "Your proposed upload is smaller than the minimum allowed object size.",
                )
            case ["content-length-range", _, high] if size > high:
                raise _S3Error(
                    400,
                    "EntityTooLarge",
                    "Your proposed upload exceeds the maximum allowed object size.",
                )


def _form(request: httpx.Request) -> tuple[dict[str, str], str, bytes]:
    """A multipart/form-data POST's text fields, and the file's name and bytes."""
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.content)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise _S3Error(
            400,
            "MalformedPOSTRequest",
            "The body of your POST request is not well-formed multipart/form-data.",
        )
    fields: dict[str, str] = {}
    file: tuple[str, bytes] | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if name == "file":
            file = (part.get_filename() or "", payload)
        else:
            fields[name] = payload.decode()
    if file is None:
        raise _S3Error(400, "InvalidArgument", "POST requires exactly one file upload per request.")
    return fields, *file


def _error_response(error: _S3Error, resource: str, key: str) -> httpx.Response:
    key_element = f"<Key>{escape(key)}</Key>" if key else ""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{error.code}</Code><Message>{escape(error.message)}</Message>"
        f"<Resource>{escape(resource)}</Resource>{key_element}</Error>"
    )
    return httpx.Response(
        error.status, content=body.encode(), headers={"Content-Type": "application/xml"}
    )
