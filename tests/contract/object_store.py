"""What every `ObjectStore` must do, written once: each tier subclasses `ObjectStoreContract`.

The subclass's module provides the fixtures `store` (the store under test, its bucket created),
`prefix` (a key prefix of the test's own), `http` (an httpx client that reaches the store's
presigned URLs) and `par_transport` (a `PARTransport` over `http`). The presigned URLs are used
the way PAR holders use them, through `PARTransport`, so each refusal is checked as the exception
a holder gets, and with raw HTTP where the status and S3 error code are the point.
"""

from __future__ import annotations

import base64
import hashlib

import anyio
import httpx
import pytest

from orchestrator.errors import (
    IntegrityError,
    ObjectExistsError,
    ObjectNotFoundError,
    OutsidePrefixError,
    PARExpiredError,
    RemoteObjectNotFoundError,
    RemoteRejectedError,
    UploadTooLargeError,
    UploadTooSmallError,
)
from orchestrator.par.transfer import PARTransport
from orchestrator.store.base import ObjectStore


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class ObjectStoreContract:
    """The object-store contract; a `Test...` subclass runs it on one implementation."""

    # --- objects -------------------------------------------------------------------------------

    async def test_put_get_head_list_delete(self, store: ObjectStore, prefix: str) -> None:
        etag = await store.put(prefix + "b", b"bee", content_type="text/plain")
        await store.put(prefix + "a", b"a")
        assert etag == md5_hex(b"bee")  # S3's single-part ETag
        assert await store.get(prefix + "b") == b"bee"

        info = await store.head(prefix + "b")
        assert info is not None
        assert (info.key, info.size, info.etag) == (prefix + "b", 3, etag)
        assert await store.head(prefix + "missing") is None

        assert [i.key for i in await store.list(prefix)] == [prefix + "a", prefix + "b"]
        await store.delete(prefix + "b")
        await store.delete(prefix + "b")  # deleting twice is fine
        assert [i.key for i in await store.list(prefix)] == [prefix + "a"]
        with pytest.raises(ObjectNotFoundError, match="missing"):
            await store.get(prefix + "missing")

    async def test_ensure_bucket_is_idempotent(self, store: ObjectStore) -> None:
        await store.ensure_bucket()
        await store.ensure_bucket()

    async def test_put_replaces_the_object_and_its_etag(
        self, store: ObjectStore, prefix: str
    ) -> None:
        first = await store.put(prefix + "k", b"first")
        second = await store.put(prefix + "k", b"second, longer")
        assert (first, second) == (md5_hex(b"first"), md5_hex(b"second, longer"))
        assert await store.get(prefix + "k") == b"second, longer"
        info = await store.head(prefix + "k")
        assert info is not None
        assert (info.size, info.etag) == (14, second)
        assert [i.key for i in await store.list(prefix)] == [prefix + "k"]

    async def test_a_missing_key_is_not_found_absent_and_deletable(
        self, store: ObjectStore, prefix: str
    ) -> None:
        with pytest.raises(ObjectNotFoundError, match=f"{prefix}nothing"):
            await store.get(prefix + "nothing")
        assert await store.head(prefix + "nothing") is None
        await store.delete(prefix + "nothing")
        assert await store.list(prefix) == []

    async def test_keys_keep_spaces_and_unicode(self, store: ObjectStore, prefix: str) -> None:
        key = prefix + "a dir/ünïcode + more.txt"
        await store.put(key, b"data")
        assert await store.get(key) == b"data"
        assert [i.key for i in await store.list(prefix)] == [key]

    # --- conditional create ----------------------------------------------------------------------

    async def test_put_if_absent_refuses_the_second_and_keeps_the_first(
        self, store: ObjectStore, prefix: str
    ) -> None:
        etag = await store.put_if_absent(prefix + "event-1", b"first")
        assert etag == md5_hex(b"first")
        with pytest.raises(ObjectExistsError, match="event-1"):
            await store.put_if_absent(prefix + "event-1", b"second")
        assert await store.get(prefix + "event-1") == b"first"

    async def test_put_if_absent_refuses_what_a_put_wrote_and_creates_after_a_delete(
        self, store: ObjectStore, prefix: str
    ) -> None:
        await store.put(prefix + "k", b"plain put")
        with pytest.raises(ObjectExistsError):
            await store.put_if_absent(prefix + "k", b"conditional")
        await store.delete(prefix + "k")
        await store.put_if_absent(prefix + "k", b"conditional")
        assert await store.get(prefix + "k") == b"conditional"

    async def test_concurrent_put_if_absent_has_exactly_one_winner(
        self, store: ObjectStore, prefix: str
    ) -> None:
        winners: list[bytes] = []

        async def write(body: bytes) -> None:
            try:
                await store.put_if_absent(prefix + "event-1", body)
            except ObjectExistsError:
                return
            winners.append(body)

        async with anyio.create_task_group() as tasks:
            for n in range(10):
                tasks.start_soon(write, f"writer {n}".encode())
        assert len(winners) == 1
        assert await store.get(prefix + "event-1") == winners[0]

    # --- listing ---------------------------------------------------------------------------------

    async def test_list_is_sorted_and_a_prefix_is_a_leading_substring(
        self, store: ObjectStore, prefix: str
    ) -> None:
        for key in ("b", "a/2", "a/1", "a-1", "ab", "a"):
            await store.put(prefix + key, key.encode())
        everything = [prefix + key for key in ("a", "a-1", "a/1", "a/2", "ab", "b")]
        assert [i.key for i in await store.list(prefix)] == everything
        assert [i.key for i in await store.list(prefix + "a")] == everything[:5]
        assert [i.key for i in await store.list(prefix + "a/")] == everything[2:4]
        assert await store.list(prefix + "c") == []
        listed = await store.list(prefix + "b")
        assert [(i.key, i.size, i.etag) for i in listed] == [(prefix + "b", 1, md5_hex(b"b"))]

    async def test_list_start_after_gives_only_later_keys(
        self, store: ObjectStore, prefix: str
    ) -> None:
        keys = [f"{prefix}{n:04d}.json" for n in range(1, 6)]
        for key in keys:
            await store.put(key, b"{}")
        assert [i.key for i in await store.list(prefix, start_after=keys[1])] == keys[2:]
        assert await store.list(prefix, start_after=keys[-1]) == []
        # start_after need not exist, nor lie under the prefix.
        between = f"{prefix}0002.zz"  # after 0002.json, before 0003.json
        assert [i.key for i in await store.list(prefix, start_after=between)] == keys[2:]
        assert [i.key for i in await store.list(prefix, start_after="")] == keys
        assert [i.key for i in await store.list(prefix, start_after=None)] == keys
        before, after = prefix[:-1], prefix + "\uffff"
        assert [i.key for i in await store.list(prefix, start_after=before)] == keys
        assert await store.list(prefix, start_after=after) == []

    async def test_list_and_delete_prefix_go_past_one_page(
        self, store: ObjectStore, prefix: str
    ) -> None:
        keys = [f"{prefix}{n:04d}" for n in range(1005)]  # S3 pages and batch deletes hold 1000
        limit = anyio.Semaphore(32)

        async def put(key: str) -> None:
            async with limit:
                await store.put(key, b"x")

        async with anyio.create_task_group() as tasks:
            for key in reversed(keys):
                tasks.start_soon(put, key)
        assert [info.key for info in await store.list(prefix)] == keys
        assert [info.key for info in await store.list(prefix, start_after=keys[2])] == keys[3:]
        assert await store.delete_prefix(prefix) == 1005
        assert await store.list(prefix) == []

    async def test_delete_prefix_removes_only_what_is_under_it(
        self, store: ObjectStore, prefix: str
    ) -> None:
        for key in ("out/1", "out/2", "out-side", "kept"):
            await store.put(prefix + key, b"x")
        assert await store.delete_prefix(prefix + "out/") == 2
        assert [i.key for i in await store.list(prefix)] == [prefix + "kept", prefix + "out-side"]
        assert await store.delete_prefix(prefix + "out/") == 0

    async def test_delete_prefix_refuses_the_whole_bucket(self, store: ObjectStore) -> None:
        with pytest.raises(ValueError, match="whole bucket"):
            await store.delete_prefix("")

    # --- presigned GET and PUT -------------------------------------------------------------------

    async def test_presigned_get_and_put_round_trip(
        self, store: ObjectStore, prefix: str, par_transport: PARTransport
    ) -> None:
        key = prefix + "in dir/ünï.bin"
        body = bytes(range(256)) * 8
        url, headers = await store.presign_put(key, 60)
        assert headers == {}
        sent = await par_transport.put_bytes(url, headers, body)  # with Content-MD5
        assert sent.etag == md5_hex(body)
        assert await store.get(key) == body

        data, got = await par_transport.download_bytes(await store.presign_get(key, 60))
        assert (data, got.etag, got.sha256) == (
            body,
            md5_hex(body),
            hashlib.sha256(body).hexdigest(),
        )

    async def test_presigned_get_of_a_missing_key_is_not_found(
        self, store: ObjectStore, prefix: str, par_transport: PARTransport
    ) -> None:
        url = await store.presign_get(prefix + "never-written", 60)
        with pytest.raises(RemoteObjectNotFoundError, match="NoSuchKey"):
            await par_transport.download_bytes(url)

    async def test_presign_put_pinned_to_a_sha256_refuses_other_content(
        self, store: ObjectStore, prefix: str, http: httpx.AsyncClient
    ) -> None:
        body = b"the expected input"
        url, headers = await store.presign_put(prefix + "in", 60, sha256_b64=sha256_b64(body))
        assert headers == {"x-amz-checksum-sha256": sha256_b64(body)}
        wrong = await http.put(url, content=b"something else", headers=headers)
        assert wrong.status_code == 400
        assert "BadDigest" in wrong.text
        unsigned_header = await http.put(url, content=body)  # the pin cannot be dropped
        assert unsigned_header.status_code == 403
        assert "SignatureDoesNotMatch" in unsigned_header.text
        other_pin = {"x-amz-checksum-sha256": sha256_b64(b"mine")}  # nor changed
        assert (await http.put(url, content=b"mine", headers=other_pin)).status_code == 403
        assert await store.head(prefix + "in") is None
        right = await http.put(url, content=body, headers=headers)
        assert right.status_code == 200
        assert await store.get(prefix + "in") == body

    async def test_a_wrong_checksum_is_an_integrity_error_and_stores_nothing(
        self, store: ObjectStore, prefix: str, par_transport: PARTransport
    ) -> None:
        body = b"the expected input"
        url, headers = await store.presign_put(prefix + "in", 60, sha256_b64=sha256_b64(body))
        with pytest.raises(IntegrityError, match="BadDigest"):
            await par_transport.put_bytes(url, headers, b"something else")
        assert await store.head(prefix + "in") is None
        await par_transport.put_bytes(url, headers, body)
        assert await store.get(prefix + "in") == body

    async def test_presign_put_without_a_pin_takes_any_content(
        self, store: ObjectStore, prefix: str, http: httpx.AsyncClient
    ) -> None:
        url, headers = await store.presign_put(prefix + "in", 60)
        assert headers == {}
        response = await http.put(url, content=b"anything")
        assert response.status_code == 200
        assert response.headers["etag"] == f'"{md5_hex(b"anything")}"'
        assert await store.get(prefix + "in") == b"anything"

    async def test_a_wrong_content_md5_is_refused(
        self, store: ObjectStore, prefix: str, http: httpx.AsyncClient
    ) -> None:
        url, _ = await store.presign_put(prefix + "c", 60)
        wrong_md5 = base64.b64encode(hashlib.md5(b"other", usedforsecurity=False).digest())
        answer = await http.put(url, content=b"data", headers={"Content-MD5": wrong_md5.decode()})
        assert answer.status_code == 400
        assert "BadDigest" in answer.text
        malformed = await http.put(url, content=b"data", headers={"Content-MD5": "zz"})
        assert malformed.status_code == 400
        assert "InvalidDigest" in malformed.text
        assert await store.head(prefix + "c") is None

    async def test_an_edited_url_is_refused(
        self, store: ObjectStore, prefix: str, par_transport: PARTransport
    ) -> None:
        await store.put(prefix + "mine", b"mine")
        await store.put(prefix + "other", b"other's data")
        put_url, _ = await store.presign_put(prefix + "mine", 60)
        edits = [
            put_url.replace("/mine?", "/other?"),
            put_url.replace("X-Amz-Expires=60", "X-Amz-Expires=600"),
        ]
        for edited in edits:
            with pytest.raises(RemoteRejectedError) as caught:
                await par_transport.put_bytes(edited, {}, b"overwrite")
            assert (caught.value.status, caught.value.s3_code) == (403, "SignatureDoesNotMatch")
        get_url = await store.presign_get(prefix + "mine", 60)
        with pytest.raises(RemoteRejectedError, match="SignatureDoesNotMatch"):
            await par_transport.download_bytes(get_url.replace("/mine?", "/other?"))
        assert await store.get(prefix + "other") == b"other's data"

    async def test_a_url_does_only_its_own_method(
        self, store: ObjectStore, prefix: str, http: httpx.AsyncClient
    ) -> None:
        await store.put(prefix + "keep", b"original")
        get_url = await store.presign_get(prefix + "keep", 60)
        put_url, _ = await store.presign_put(prefix + "keep", 60)
        assert (await http.put(get_url, content=b"overwrite")).status_code == 403
        assert (await http.get(put_url)).status_code == 403
        assert (await http.delete(get_url)).status_code == 403
        assert await store.get(prefix + "keep") == b"original"

    # --- presigned POST --------------------------------------------------------------------------

    async def test_presign_post_enforces_prefix_and_size(
        self, store: ObjectStore, prefix: str, http: httpx.AsyncClient
    ) -> None:
        post = await store.presign_post(prefix + "out/", 60, min_size=1, max_size=16)
        good = await http.post(
            post.url, data=post.fields, files={"file": ("result.txt", b"small enough")}
        )
        outside = await http.post(
            post.url,
            data={**post.fields, "key": prefix + "elsewhere.txt"},
            files={"file": ("x.txt", b"small enough")},
        )
        too_big = await http.post(
            post.url, data=post.fields, files={"file": ("big.txt", b"x" * 17)}
        )
        assert good.status_code in {200, 201, 204}, good.text
        assert await store.get(prefix + "out/result.txt") == b"small enough"
        assert outside.status_code == 403, outside.text
        assert too_big.status_code == 400, too_big.text
        assert "EntityTooLarge" in too_big.text
        assert [info.key for info in await store.list(prefix)] == [prefix + "out/result.txt"]

    async def test_presigned_post_through_a_par_transport(
        self, store: ObjectStore, prefix: str, par_transport: PARTransport
    ) -> None:
        out = prefix + "out/"
        post = await store.presign_post(out, 60, min_size=2, max_size=16)
        body = b"\x00\r\n--binary\r\n"
        sent = await par_transport.post_bytes(post.url, post.fields, f"{out}deep/er.bin", body)
        assert sent.etag == md5_hex(body)
        assert await store.get(f"{out}deep/er.bin") == body
        with pytest.raises(OutsidePrefixError):
            await par_transport.post_bytes(post.url, post.fields, f"{prefix}victim", b"over")
        with pytest.raises(UploadTooLargeError, match="EntityTooLarge"):
            await par_transport.post_bytes(post.url, post.fields, f"{out}big", b"x" * 17)
        with pytest.raises(UploadTooSmallError, match="EntityTooSmall"):
            await par_transport.post_bytes(post.url, post.fields, f"{out}small", b"x")
        forged = {**post.fields, "policy": post.fields["policy"][:-4] + "AAAA"}
        with pytest.raises(RemoteRejectedError, match="SignatureDoesNotMatch"):
            await par_transport.post_bytes(post.url, forged, f"{out}forged", b"abc")
        assert [info.key for info in await store.list(prefix)] == [f"{out}deep/er.bin"]

    # --- expiry ----------------------------------------------------------------------------------

    async def test_presigned_urls_work_until_they_expire(
        self, store: ObjectStore, prefix: str, http: httpx.AsyncClient, par_transport: PARTransport
    ) -> None:
        await store.put(prefix + "out", b"result")
        get_url = await store.presign_get(prefix + "out", expires_in=2)
        put_url, _ = await store.presign_put(prefix + "late", expires_in=2)
        post = await store.presign_post(prefix + "up/", 2, min_size=0, max_size=16)
        response = await http.get(get_url)
        assert (response.status_code, response.content) == (200, b"result")
        await anyio.sleep(3)
        expired = await http.get(get_url)
        assert expired.status_code == 403
        assert "expired" in expired.text.lower()
        with pytest.raises(PARExpiredError):
            await par_transport.download_bytes(get_url)
        with pytest.raises(PARExpiredError):
            await par_transport.put_bytes(put_url, {}, b"late")
        with pytest.raises(PARExpiredError):
            await par_transport.post_bytes(post.url, post.fields, prefix + "up/late", b"late")
        assert [info.key for info in await store.list(prefix)] == [prefix + "out"]
