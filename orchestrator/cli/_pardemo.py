"""The PAR round trip demo: mint, seal, upload, read back, expire, close — on a real S3 server.

`parjobs demo` runs it; with no `PARJOBS_S3_ENDPOINT_URL` it starts a local SeaweedFS first.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import anyio
import httpx
from rich.console import Console

from orchestrator.core.keys import KeyPair
from orchestrator.errors import (
    ObjectKeyError,
    PARClosedError,
    PARExpiredError,
    ParjobsError,
)
from orchestrator.par.io import BucketReader, BucketWriter, ObjectReader, ObjectWriter
from orchestrator.par.issuer import PARIssuer
from orchestrator.par.par import PAR
from orchestrator.settings import S3Settings
from orchestrator.store.base import ObjectStore
from orchestrator.store.registry import PARRegistry
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed

DEMO_INPUT_BYTES = 32 * 1024 * 1024


@asynccontextmanager
async def s3_for_demo(console: Console) -> AsyncIterator[S3Settings]:
    """The configured S3 server, or a local SeaweedFS (auth on) started for the demo."""
    settings = S3Settings()
    if settings.endpoint_url is not None:
        console.print(f"Using S3 at [bold]{settings.endpoint_url}[/]")
        yield settings
        return
    async with LocalSeaweed() as seaweed:
        console.print(
            f"Started SeaweedFS at [bold]{seaweed.endpoint_url}[/] (pid {seaweed.pid}); "
            "readiness proved that unsigned requests are refused"
        )
        yield seaweed.settings


async def run_par_demo(console: Console) -> None:
    async with s3_for_demo(console) as settings, S3ObjectStore(settings) as store:
        await store.ensure_bucket()
        issuer = PARIssuer(store, PARRegistry(store), name="storage")
        user = KeyPair.generate("demo-user")
        job = f"demo-{os.urandom(4).hex()}"
        with tempfile.TemporaryDirectory() as scratch:
            await _round_trip(console, issuer, store, user, job, Path(scratch))


def _step(console: Console, text: str) -> None:
    console.print(f"[green]✓[/] {text}")


async def _refused(
    console: Console, what: str, error: type[ParjobsError], action: Awaitable[object]
) -> None:
    """Run `action`, which must fail with `error`; the demo stops loudly if it does not."""
    try:
        await action
    except error as exc:
        _step(console, f"{what}: refused with {type(exc).__name__}: {exc}")
        return
    raise ParjobsError(f"demo check failed: {what} was not refused")


async def _round_trip(
    console: Console,
    issuer: PARIssuer,
    store: ObjectStore,
    user: KeyPair,
    job: str,
    scratch: Path,
) -> None:
    # 1. Mint an upload PAR sealed for the user; it travels passphrase-protected.
    input_key = f"jobs/{job}/input"
    upload = await issuer.object_par(input_key, user.public, readable=False, writeable=True)
    passphrase = secrets.token_urlsafe(12)
    wire = upload.to_data(passphrase=passphrase)
    upload = PAR.from_data(wire, passphrase=passphrase)
    left = upload.seconds_remaining()
    _step(console, f"minted {upload!r}, sealed for {user.name}; {left:.0f} s left")

    # 2. Upload a file through it (streamed; S3 checks the Content-MD5).
    source = scratch / "input.bin"
    source.write_bytes(os.urandom(DEMO_INPUT_BYTES))
    started = time.perf_counter()
    sent = await ObjectWriter(upload, user).set_object_from_file(source)
    rate = sent.size / (time.perf_counter() - started) / 2**20
    mib = sent.size / 2**20
    _step(console, f"uploaded {mib:.0f} MiB at {rate:.0f} MiB/s, sha256 {sent.sha256[:16]}…")

    # 3. Read it back through a read PAR, checking the SHA-256 end to end.
    read = await issuer.object_par(input_key, user.public)
    copy = scratch / "copy.bin"
    got = await ObjectReader(read, user).get_object_as_file(copy, expected_sha256=sent.sha256)
    _step(console, f"read back {got.size} bytes through {read!r}; SHA-256 matches")

    # 4. Outputs: a bucket write PAR limited to a prefix and a size, then a read manifest.
    outputs = await issuer.bucket_write_par(f"jobs/{job}/output/", user.public, max_size=2**20)
    writer = BucketWriter(outputs, user)
    await writer.set_json("summary.json", {"job": job, "sha256": sent.sha256})
    await writer.set_string("log.txt", "all good\n")
    await _refused(
        console, "a write outside the prefix", ObjectKeyError, writer.set_string("../x", "no")
    )
    listing = await issuer.bucket_read_par(f"jobs/{job}/output/", user.public)
    reader = BucketReader(listing, user)
    summary = await reader.get_json("summary.json")
    _step(console, f"outputs {reader.list_keys()} read back; summary.json = {summary}")

    # 5. Expiry: refused locally (30 s buffer), then by S3 itself once past the URL's expiry.
    short = await issuer.object_par(input_key, user.public, lifetime=timedelta(seconds=2))
    await _refused(
        console,
        "a PAR inside its 30 s safety buffer",
        PARExpiredError,
        ObjectReader(short, user).get_object(),
    )
    raw_url = short.open(user, allow_expired=True).get_url or ""
    await anyio.sleep(3)
    async with httpx.AsyncClient() as http:
        answer = await http.get(raw_url)
    _step(console, f"past expiry, S3 itself refuses the presigned URL: HTTP {answer.status_code}")

    # 6. Close: proves possession of the key; closing again is refused.
    await upload.close(user, control=issuer.registry)
    state = await issuer.registry.state(upload.uid)
    _step(console, f"closed the upload PAR; its issuer's registry says {state.value}")
    second_copy = PAR.from_data(wire, passphrase=passphrase)
    await _refused(
        console,
        "closing the same PAR again",
        PARClosedError,
        second_copy.close(user, control=issuer.registry),
    )
    await store.delete_prefix(f"jobs/{job}/")
