"""Large-file upload/download throughput and memory through PARs vs raw httpx, same process.

A private SeaweedFS serves a --size-mib file (default 1 GiB of random bytes). Raw = a streamed
httpx PUT/GET on a presigned URL; parjobs = `ObjectWriter.set_object_from_file` (hashes the file
once first: SHA-256, and MD5 for Content-MD5) and `ObjectReader.get_object_as_file` (hashes as it
streams, SHA-256). `ratio` = parjobs MiB/s / raw MiB/s of this run (1.0 = free). `peak RSS`
(sampled every 20 ms, minus the RSS before the phase) and `tracemalloc` (an extra untimed pass)
must stay a few MiB whatever the file size. Details: benchmarks/README.md.

    .venv/bin/python benchmarks/bench_transfer.py [--size-mib 1024] [--repeat 2] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import anyio
import httpx
import psutil

from orchestrator import KeyPair, ObjectReader, ObjectWriter
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.registry import PARRegistry
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed

MIB = 1 << 20
TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # as PARTransport's own client; a client per phase


class Payload(NamedTuple):
    path: Path
    size: int
    sha256: str


@contextmanager
def watch() -> Iterator[dict[str, float]]:
    """Yield a dict, filled on exit: peak RSS above the start (sampled every 20 ms), CPU s."""
    process, stop, usage = psutil.Process(), threading.Event(), dict[str, float]()

    def rss() -> int:
        return int(process.memory_info().rss)

    def cpu() -> float:  # user + system, all threads
        return float(sum(process.cpu_times()[:2]))

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss())

    gc.collect()
    base, peak, cpu_start = rss(), [rss()], cpu()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield usage
    finally:
        stop.set()
        thread.join()
        usage.update(rss_mib=(max(peak[0], rss()) - base) / MIB, cpu_s=cpu() - cpu_start)


def write_random_file(path: Path, size_mib: int) -> Payload:
    sha = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size_mib):
            sha.update(chunk := os.urandom(MIB))
            out.write(chunk)
    return Payload(path, size_mib * MIB, sha.hexdigest())


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as source:
        while chunk := await source.read(MIB):
            yield chunk


async def bench(args: argparse.Namespace, tmp: Path) -> None:
    dest, source = tmp / "dest.bin", write_random_file(tmp / "source.bin", args.size_mib)
    warm = write_random_file(tmp / "warm.bin", 8)
    async with LocalSeaweed() as s3, S3ObjectStore(s3.settings) as store:
        await store.ensure_bucket()
        issuer = PARIssuer(store, PARRegistry(store), name="bench")
        keypair = KeyPair.generate("bench")

        # Each phase mints or presigns first (a few ms, inside the timing), then moves the file.
        async def raw_up(load: Payload, prefix: str) -> None:
            url, _ = await store.presign_put(prefix + "raw", 3600)
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                body, length = file_chunks(load.path), {"Content-Length": str(load.size)}
                (await http.put(url, content=body, headers=length)).raise_for_status()

        async def par_up(load: Payload, prefix: str) -> None:
            par = await issuer.object_par(prefix + "par", keypair.public, writeable=True)
            await ObjectWriter(par, keypair).set_object_from_file(load.path)

        async def raw_down(load: Payload, prefix: str) -> None:  # reads parjobs' upload
            url = await store.presign_get(prefix + "par", 3600)
            async with httpx.AsyncClient(timeout=TIMEOUT) as http, http.stream("GET", url) as r:
                r.raise_for_status()
                async with await anyio.open_file(dest, "wb") as sink:
                    async for chunk in r.aiter_bytes(MIB):
                        await sink.write(chunk)

        async def par_down(load: Payload, prefix: str) -> None:
            reader = ObjectReader(await issuer.object_par(prefix + "par", keypair.public), keypair)
            await reader.get_object_as_file(dest, expected_sha256=load.sha256)

        phases: list[tuple[str, Callable[[Payload, str], Awaitable[None]]]] = [
            ("upload raw (httpx PUT)", raw_up),
            ("upload parjobs (ObjectWriter)", par_up),
            ("download raw (httpx GET)", raw_down),
            ("download parjobs (ObjectReader)", par_down),
        ]
        for _, phase in phases:  # warm-up: imports, volumes, thread pool, connections
            await phase(warm, "warm/")
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in phases}
        traced: dict[str, float] = {}
        for rep in range(args.repeat + args.tracemalloc):  # the extra pass: tracemalloc only
            for name, phase in (phases[i] for i in ([1, 0, 3, 2] if rep % 2 else [0, 1, 2, 3])):
                if rep == args.repeat:
                    tracemalloc.start()
                    await phase(source, f"bench/{rep}/")
                    traced[name] = tracemalloc.get_traced_memory()[1] / MIB
                    tracemalloc.stop()
                    continue
                with watch() as usage:
                    start = time.perf_counter()
                    await phase(source, f"bench/{rep}/")
                    elapsed = time.perf_counter() - start
                sample = (args.size_mib / elapsed, usage["cpu_s"] / elapsed * 100, usage["rss_mib"])
                results[name].append(sample)
            dest.unlink(missing_ok=True)
            await store.delete_prefix(f"bench/{rep}/")

    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"file {args.size_mib} MiB, {args.repeat} repetition(s) alternating raw/parjobs order, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, httpx {httpx.__version__}\n"
    )
    head = f"{'phase':<32} {'MiB/s':>6} {'min':>6} {'max':>6} {'CPU':>5} {'peak RSS':>10}"
    print(f"{head} {'tracemalloc':>11} {'ratio':>6}\n{'-' * (len(head) + 19)}")
    raw = 0.0
    for index, (name, samples) in enumerate(results.items()):
        rate, (low, high) = statistics.median(s[0] for s in samples), (min(samples), max(samples))
        ratio = f"{rate / raw:.3f}" if index % 2 else ""  # each parjobs row follows its raw row
        raw, malloc = rate, f"{traced[name]:.1f} MiB" if name in traced else "-"
        print(
            f"{name:<32} {rate:>6.0f} {low[0]:>6.0f} {high[0]:>6.0f} "
            f"{statistics.median(s[1] for s in samples):>4.0f}% "
            f"{max(s[2] for s in samples):>6.1f} MiB {malloc:>11} {ratio:>6}"
        )
    print(
        "\nratio = parjobs / raw, same run. parjobs hashes an upload once before sending "
        "(SHA-256 + MD5 for Content-MD5) and hashes a download as it streams (SHA-256)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="test file size (MiB)")
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions per phase")
    parser.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parjobs-bench-") as tmp:  # honours TMPDIR
        anyio.run(bench, args, Path(tmp))


if __name__ == "__main__":
    main()
