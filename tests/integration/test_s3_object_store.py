"""The object-store contract on S3ObjectStore and a real SeaweedFS, and what only S3 has to say:
SigV4 URLs for the public endpoint, an unopened client, wrong credentials."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from orchestrator.errors import ObjectStoreError
from orchestrator.par.transfer import PARTransport
from orchestrator.settings import S3Settings
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from tests.contract.object_store import ObjectStoreContract


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A plain httpx client: presigned URLs go to SeaweedFS over the network."""
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def par_transport(http: httpx.AsyncClient) -> PARTransport:
    return PARTransport(http)


@pytest.mark.integration
class TestS3ObjectStore(ObjectStoreContract):
    """Every contract test, on the session's SeaweedFS (fixtures `store`, `prefix`: conftest)."""


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


async def test_delete_prefix_refuses_the_whole_bucket_before_any_request() -> None:
    store = S3ObjectStore(S3Settings(endpoint_url="http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="whole bucket"):
        await store.delete_prefix("")


@pytest.mark.integration
async def test_wrong_credentials_become_object_store_errors(seaweed: LocalSeaweed) -> None:
    wrong = seaweed.settings.model_copy(update={"secret_access_key": SecretStr("nope")})
    async with S3ObjectStore(wrong) as store:
        with pytest.raises(ObjectStoreError, match="SignatureDoesNotMatch"):
            await store.get("anything")
