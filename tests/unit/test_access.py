"""Reading and writing through PARs on the in-memory store: every method, every refusal.

The store's presigned URLs are reached through its transport (fixtures `http`, `par_transport`);
the object-store contract suite shows SeaweedFS refuses the same way. Each refusal also checks
that nothing already stored was harmed.
"""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from orchestrator import (
    PAR,
    BucketReader,
    BucketWriter,
    IntegrityError,
    KeyPair,
    LocalFileNotFoundError,
    ObjectKeyError,
    ObjectReader,
    ObjectWriter,
    OutsidePrefixError,
    PARExpiredError,
    PARPermissionError,
    PARTransport,
    RemoteObjectNotFoundError,
    RemoteRejectedError,
    TamperedError,
    UploadTooLargeError,
    WrongKeyError,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.base import ObjectStore
from orchestrator.store.registry import PARRegistry


@pytest.fixture
def issuer(store: ObjectStore, prefix: str) -> PARIssuer:
    return PARIssuer(store, PARRegistry(store, root=f"{prefix}registry/"), name="storage")


@pytest.fixture(scope="module")
def user() -> KeyPair:
    return KeyPair.generate("user")


async def _stored(store: ObjectStore, key: str) -> bytes | None:
    return await store.get(key) if await store.head(key) is not None else None


# --- object PARs -----------------------------------------------------------------------------


async def test_object_round_trip_file_bytes_string_json(
    issuer: PARIssuer, user: KeyPair, prefix: str, tmp_path: Path, par_transport: PARTransport
) -> None:
    par = await issuer.object_par(f"{prefix}obj", user.public, readable=True, writeable=True)
    writer = ObjectWriter(par, user, transport=par_transport)
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(3 * 2**20 + 17))
    sent = await writer.set_object_from_file(source)
    assert sent.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    got = await writer.get_object_as_file(tmp_path / "out.bin", expected_sha256=sent.sha256)
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
    assert got.size == sent.size

    await writer.set_object(b"\x00bytes")
    assert await writer.get_object() == b"\x00bytes"
    await writer.set_string("héllo")
    assert await writer.get_string() == "héllo"
    await writer.set_json({"a": [1, 2]})
    assert await ObjectReader(par, user, transport=par_transport).get_json() == {"a": [1, 2]}


async def test_driver_details_only_on_the_issuer(
    issuer: PARIssuer, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}k", user.public)
    assert par.driver_details()["key"] == f"{prefix}k"
    assert PAR.from_data(par.to_data()).driver_details() == {}


async def test_reading_a_missing_object_is_specific(
    issuer: PARIssuer, user: KeyPair, prefix: str, par_transport: PARTransport
) -> None:
    par = await issuer.object_par(f"{prefix}never-written", user.public)
    with pytest.raises(RemoteObjectNotFoundError):
        await ObjectReader(par, user, transport=par_transport).get_object()


async def test_write_through_read_only_par_is_refused_locally_and_by_s3(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, http: httpx.AsyncClient
) -> None:
    key = f"{prefix}keep"
    await store.put(key, b"original")
    par = await issuer.object_par(key, user.public)
    with pytest.raises(PARPermissionError, match="read-only"):
        ObjectWriter(par, user)
    # Even with the opened capability, the GET URL cannot be used to PUT: S3 checks the method.
    get_url = par.open(user).get_url
    assert get_url is not None
    answer = await http.put(get_url, content=b"overwrite")
    assert answer.status_code == 403
    assert await store.get(key) == b"original"


async def test_read_through_write_only_par_is_refused(
    issuer: PARIssuer, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}w", user.public, readable=False, writeable=True)
    with pytest.raises(PARPermissionError, match="write-only"):
        ObjectReader(par, user)
    with pytest.raises(PARPermissionError, match="cannot read"):
        await ObjectWriter(par, user).get_object()


async def test_wrong_private_key_is_refused_before_any_request(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str
) -> None:
    key = f"{prefix}mine"
    await store.put(key, b"mine")
    par = await issuer.object_par(key, user.public, writeable=True)
    with pytest.raises(WrongKeyError):
        await ObjectWriter(par, KeyPair.generate("mallory")).set_object(b"theirs")
    assert await store.get(key) == b"mine"


async def test_tampered_metadata_is_refused_and_nothing_harmed(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str
) -> None:
    await store.put(f"{prefix}other", b"other's data")
    data = (await issuer.object_par(f"{prefix}mine", user.public, writeable=True)).to_data()
    data["key"] = f"{prefix}other"
    with pytest.raises(TamperedError):
        await ObjectWriter(PAR.from_data(data), user).set_object(b"overwrite")
    assert await store.get(f"{prefix}other") == b"other's data"


async def test_tampered_url_inside_capability_is_refused_by_s3(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, par_transport: PARTransport
) -> None:
    await store.put(f"{prefix}other", b"other's data")
    par = await issuer.object_par(f"{prefix}mine", user.public, writeable=True)
    put_url = par.open(user).put_url
    assert put_url is not None
    async with par_transport as transport:
        with pytest.raises(RemoteRejectedError) as caught:
            await transport.put_bytes(put_url.replace("/mine?", "/other?"), {}, b"overwrite")
    assert caught.value.s3_code == "SignatureDoesNotMatch"
    assert await store.get(f"{prefix}other") == b"other's data"


async def test_expired_par_refused_locally_then_by_s3_itself(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, par_transport: PARTransport
) -> None:
    key = f"{prefix}obj"
    await store.put(key, b"data")
    par = await issuer.object_par(key, user.public, writeable=True, lifetime=timedelta(seconds=2))
    assert par.seconds_remaining() == 0.0  # inside the 30 s buffer already
    with pytest.raises(PARExpiredError, match="30 s"):
        await ObjectReader(par, user).get_object()
    capability = par.open(user, allow_expired=True)
    assert capability.get_url is not None
    assert capability.put_url is not None
    async with par_transport as transport:
        assert (await transport.download_bytes(capability.get_url))[0] == b"data"
        await _sleep_past(par)
        with pytest.raises(PARExpiredError, match="S3 refused"):
            await transport.download_bytes(capability.get_url)
        with pytest.raises(PARExpiredError, match="S3 refused"):
            await transport.put_bytes(capability.put_url, capability.put_headers, b"late")
    assert await store.get(key) == b"data"


async def _sleep_past(par: PAR) -> None:
    import anyio

    await anyio.sleep(par.seconds_remaining(buffer=0) + 1.5)


async def test_missing_local_file_is_specific_and_sends_nothing(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, tmp_path: Path
) -> None:
    par = await issuer.object_par(f"{prefix}up", user.public, readable=False, writeable=True)
    with pytest.raises(LocalFileNotFoundError, match="does not exist"):
        await ObjectWriter(par, user).set_object_from_file(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError):
        await ObjectWriter(par, user).set_object_from_file(tmp_path)
    assert await store.head(f"{prefix}up") is None


async def test_object_par_max_size_is_checked_before_sending(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str
) -> None:
    par = await issuer.object_par(f"{prefix}s", user.public, writeable=True, max_size=10)
    with pytest.raises(UploadTooLargeError, match="at most 10"):
        await ObjectWriter(par, user).set_object(b"x" * 11)
    assert await store.head(f"{prefix}s") is None


async def test_sha256_pinned_par_accepts_only_that_content(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, par_transport: PARTransport
) -> None:
    expected = b"the announced input"
    digest = hashlib.sha256(expected).hexdigest()
    par = await issuer.object_par(f"{prefix}in", user.public, writeable=True, sha256=digest)
    with pytest.raises(IntegrityError):
        await ObjectWriter(par, user, transport=par_transport).set_object(b"something else")
    assert await store.head(f"{prefix}in") is None
    await ObjectWriter(par, user, transport=par_transport).set_object(expected)
    assert await store.get(f"{prefix}in") == expected


async def test_corrupted_upload_is_rejected_by_s3_content_md5(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, http: httpx.AsyncClient
) -> None:
    par = await issuer.object_par(f"{prefix}c", user.public, writeable=True)
    capability = par.open(user)
    assert capability.put_url is not None
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()  # noqa: S324
    answer = await http.put(capability.put_url, content=b"data", headers={"Content-MD5": wrong_md5})
    assert answer.status_code == 400
    assert "BadDigest" in answer.text
    assert await store.head(f"{prefix}c") is None


async def test_failed_download_check_leaves_destination_untouched(
    issuer: PARIssuer,
    store: ObjectStore,
    user: KeyPair,
    prefix: str,
    tmp_path: Path,
    par_transport: PARTransport,
) -> None:
    await store.put(f"{prefix}o", b"new content")
    destination = tmp_path / "result.txt"
    destination.write_text("precious")
    reader = ObjectReader(
        await issuer.object_par(f"{prefix}o", user.public), user, transport=par_transport
    )
    with pytest.raises(IntegrityError, match="differs from the expected"):
        await reader.get_object_as_file(destination, expected_sha256="0" * 64)
    assert destination.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


@pytest.mark.parametrize("bad_key", ["../escape", "/abs", "", "a//b", "k" * 1025])
async def test_unsafe_keys_are_refused_at_minting(
    issuer: PARIssuer, user: KeyPair, prefix: str, bad_key: str
) -> None:
    with pytest.raises(ObjectKeyError):
        await issuer.object_par(prefix + bad_key if bad_key else bad_key, user.public)


# --- bucket PARs -----------------------------------------------------------------------------


async def test_bucket_write_then_read_manifest(
    issuer: PARIssuer,
    store: ObjectStore,
    user: KeyPair,
    prefix: str,
    tmp_path: Path,
    par_transport: PARTransport,
) -> None:
    out = f"{prefix}out/"
    writer = BucketWriter(
        await issuer.bucket_write_par(out, user.public, max_size=2**20),
        user,
        transport=par_transport,
    )
    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(300_000))
    await writer.set_object_from_file("data/f.bin", source)
    await writer.set_json("summary.json", {"ok": True})
    await writer.set_string("log.txt", "line\n")
    await writer.set_object("raw", b"\x01")
    assert await store.get(f"{out}data/f.bin") == source.read_bytes()

    reader = BucketReader(
        await issuer.bucket_read_par(out, user.public), user, transport=par_transport
    )
    assert reader.list_keys() == ["data/f.bin", "log.txt", "raw", "summary.json"]
    assert await reader.get_json("summary.json") == {"ok": True}
    assert await reader.get_string("log.txt") == "line\n"
    assert await reader.get_object("raw") == b"\x01"
    await reader.get_object_as_file("data/f.bin", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    # The manifest is fixed at minting: a later object is not readable through it.
    await writer.set_string("later.txt", "late")
    with pytest.raises(RemoteObjectNotFoundError, match="not one of the 4"):
        await reader.get_object("later.txt")


async def test_bucket_write_outside_prefix_refused_locally_and_by_s3(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, par_transport: PARTransport
) -> None:
    await store.put(f"{prefix}victim", b"safe")
    par = await issuer.bucket_write_par(f"{prefix}out/", user.public, max_size=100)
    writer = BucketWriter(par, user)
    for bad in ("../victim", "/victim", "a/../../victim", ""):
        with pytest.raises(ObjectKeyError):
            await writer.set_object(bad, b"overwrite")
    # Bypassing the local check, S3's POST policy still refuses the key.
    capability = par.open(user)
    assert capability.post_url is not None
    async with par_transport as transport:
        with pytest.raises(OutsidePrefixError):
            await transport.post_bytes(
                capability.post_url, capability.post_fields, f"{prefix}victim", b"overwrite"
            )
    assert await store.get(f"{prefix}victim") == b"safe"


async def test_bucket_write_over_size_refused_locally_and_by_s3(
    issuer: PARIssuer, store: ObjectStore, user: KeyPair, prefix: str, par_transport: PARTransport
) -> None:
    out = f"{prefix}out/"
    par = await issuer.bucket_write_par(out, user.public, max_size=100)
    with pytest.raises(UploadTooLargeError, match="at most 100"):
        await BucketWriter(par, user).set_object("big", b"x" * 101)
    capability = par.open(user)
    assert capability.post_url is not None
    async with par_transport as transport:
        with pytest.raises(UploadTooLargeError, match="EntityTooLarge"):
            await transport.post_bytes(
                capability.post_url, capability.post_fields, f"{out}big", b"x" * 101
            )
    assert await store.list(out) == []


async def test_bucket_reader_refuses_unsafe_keys(
    issuer: PARIssuer, user: KeyPair, prefix: str
) -> None:
    reader = BucketReader(await issuer.bucket_read_par(f"{prefix}out/", user.public), user)
    with pytest.raises(ObjectKeyError):
        await reader.get_object("../registry/x")
