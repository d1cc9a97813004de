"""S3ObjectStore on a real SeaweedFS: CRUD, conditional create, and what presigning enforces."""

from __future__ import annotations

import base64
import hashlib

import anyio
import httpx
import pytest
from pydantic import SecretStr

from orchestrator.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from orchestrator.settings import S3Settings
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


async def test_presigned_urls_are_sigv4_path_style_for_the_public_endpoint() -> None:
    settings = S3Settings(
        endpoint_url="http://127.0.0.1:1",  # never contacted: presigning is local
        public_endpoint_url="https://s3.example.com",
        access_key_id="AKID",
        secret_access_key=SecretStr("secret"),
        bucket="jobs",
    )
    async with S3ObjectStore(settings) as store:
        url = await store.presign_get("a/b.txt", 60)
        post = await store.presign_post("up/", 60, min_size=1, max_size=10)
    assert url.startswith("https://s3.example.com/jobs/a/b.txt?")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    assert post.url == "https://s3.example.com/jobs"
    assert post.fields["key"] == "up/${filename}"


async def test_an_unopened_store_says_so() -> None:
    store = S3ObjectStore(S3Settings(endpoint_url="http://127.0.0.1:1"))
    with pytest.raises(ObjectStoreError, match="not open"):
        await store.get("k")


@pytest.mark.integration
async def test_put_get_head_list_delete(store: S3ObjectStore, prefix: str) -> None:
    etag = await store.put(prefix + "b", b"bee", content_type="text/plain")
    await store.put(prefix + "a", b"a")
    assert etag == hashlib.md5(b"bee").hexdigest()  # noqa: S324 - S3's single-part ETag
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


@pytest.mark.integration
async def test_ensure_bucket_is_idempotent(store: S3ObjectStore) -> None:
    await store.ensure_bucket()
    await store.ensure_bucket()


@pytest.mark.integration
async def test_put_if_absent_refuses_the_second_and_keeps_the_first(
    store: S3ObjectStore, prefix: str
) -> None:
    await store.put_if_absent(prefix + "event-1", b"first")
    with pytest.raises(ObjectExistsError):
        await store.put_if_absent(prefix + "event-1", b"second")
    assert await store.get(prefix + "event-1") == b"first"


@pytest.mark.integration
async def test_concurrent_put_if_absent_has_exactly_one_winner(
    store: S3ObjectStore, prefix: str
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


@pytest.mark.integration
async def test_list_and_delete_prefix_go_past_one_page(store: S3ObjectStore, prefix: str) -> None:
    keys = [f"{prefix}{n:04d}" for n in range(1005)]  # S3 pages and batch deletes hold 1000
    limit = anyio.Semaphore(32)

    async def put(key: str) -> None:
        async with limit:
            await store.put(key, b"x")

    async with anyio.create_task_group() as tasks:
        for key in reversed(keys):
            tasks.start_soon(put, key)
    assert [info.key for info in await store.list(prefix)] == keys
    assert await store.delete_prefix(prefix) == 1005
    assert await store.list(prefix) == []


async def test_delete_prefix_refuses_the_whole_bucket() -> None:
    store = S3ObjectStore(S3Settings(endpoint_url="http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="whole bucket"):
        await store.delete_prefix("")


@pytest.mark.integration
async def test_wrong_credentials_become_object_store_errors(seaweed: LocalSeaweed) -> None:
    wrong = seaweed.settings.model_copy(update={"secret_access_key": SecretStr("nope")})
    async with S3ObjectStore(wrong) as store:
        with pytest.raises(ObjectStoreError, match="SignatureDoesNotMatch"):
            await store.get("anything")


@pytest.mark.integration
async def test_presign_get_works_until_it_expires(store: S3ObjectStore, prefix: str) -> None:
    await store.put(prefix + "out", b"result")
    url = await store.presign_get(prefix + "out", expires_in=2)
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
        assert (response.status_code, response.content) == (200, b"result")
        await anyio.sleep(3)
        expired = await http.get(url)
    assert expired.status_code == 403
    assert "expired" in expired.text.lower()


@pytest.mark.integration
async def test_presign_put_pinned_to_a_sha256_refuses_other_content(
    store: S3ObjectStore, prefix: str
) -> None:
    body = b"the expected input"
    url, headers = await store.presign_put(prefix + "in", 60, sha256_b64=sha256_b64(body))
    assert headers == {"x-amz-checksum-sha256": sha256_b64(body)}
    async with httpx.AsyncClient() as http:
        wrong = await http.put(url, content=b"something else", headers=headers)
        assert wrong.status_code == 400
        assert "BadDigest" in wrong.text
        unsigned_header = await http.put(url, content=body)  # the pin cannot be dropped
        assert unsigned_header.status_code == 403
        assert await store.head(prefix + "in") is None
        right = await http.put(url, content=body, headers=headers)
    assert right.status_code == 200
    assert await store.get(prefix + "in") == body


@pytest.mark.integration
async def test_presign_put_without_a_pin_takes_any_content(
    store: S3ObjectStore, prefix: str
) -> None:
    url, headers = await store.presign_put(prefix + "in", 60)
    assert headers == {}
    async with httpx.AsyncClient() as http:
        response = await http.put(url, content=b"anything")
    assert response.status_code == 200
    assert await store.get(prefix + "in") == b"anything"


@pytest.mark.integration
async def test_presign_post_enforces_prefix_and_size(store: S3ObjectStore, prefix: str) -> None:
    post = await store.presign_post(prefix + "out/", 60, min_size=1, max_size=16)
    async with httpx.AsyncClient() as http:
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
