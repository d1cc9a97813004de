"""The ledger's throughput: transactions/s and S3 requests per transaction, in one process and in
two racing on one ledger, against bare conditional PUTs (one per transaction) in the same run.

A private SeaweedFS (`LocalSeaweed`). Each row runs for --seconds with --in-flight tasks per
process, each appending one transaction after another: `deposit` (into one of ten users) or
`hold` (a new job and cheque each). raw = `put_object(IfNoneMatch="*")` with bare aiobotocore, a
new key per call, of the size of a stored hold: what one conditional create per transaction
costs at best. Two processes = two OS processes (this script with --worker) on one ledger.
ratio = ledger tx/s / raw tx/s at the same in-flight and process count. S3 requests are counted
by the store the ledger writes through. See README.md.

    .venv/bin/python benchmarks/bench_ledger.py [--in-flight 1,10,100] [--seconds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import shlex
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, cast

import anyio
import psutil
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator.core.ledger_rules import deposit, hold, post
from orchestrator.errors import ObjectExistsError
from orchestrator.settings import S3Settings
from orchestrator.store.base import ObjectInfo
from orchestrator.store.ledger import Ledger
from orchestrator.store.s3 import S3ObjectStore, create_s3_client
from orchestrator.store.seaweed import LocalSeaweed
from schemas.ledger import LedgerState
from workers.cluster import s3_environment

Phase = Literal["raw", "deposit", "hold"]
PHASES: tuple[Phase, ...] = ("raw", "deposit", "hold")
USERS = tuple(f"user{n}" for n in range(10))
HOLD = Decimal("0.001")
FUNDS = 10**6  # each user's, deposited before a group's rows: holds never run out
LINE_LIMIT = 1 << 20
NOTES = """
ratio = ledger tx/s / raw tx/s (same in-flight, same processes). S3/tx: requests per transaction
(LIST calls, GETs, conditional PUTs won and lost). tx/block = transactions per conditional create
that won. CPU ms/tx: the benchmark's process(es) (the ledger, or raw's bare client), and weed:
SeaweedFS over the same time. Two processes: both start together; tx/s = all transactions / the
slower one's time."""


class CountingStore(S3ObjectStore):
    """An S3ObjectStore that counts the requests the ledger makes (LIST, GET, conditional PUT)."""

    def __init__(self, settings: S3Settings) -> None:
        super().__init__(settings)
        self.requests: Counter[str] = Counter()

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> builtins.list[ObjectInfo]:
        self.requests["LIST"] += 1  # one page: a ledger read lists only what is new
        return await super().list(prefix, start_after=start_after)

    async def get(self, key: str) -> bytes:
        self.requests["GET"] += 1
        return await super().get(key)

    async def put_if_absent(self, key: str, data: bytes) -> str:
        try:
            etag = await super().put_if_absent(key, data)
        except ObjectExistsError:
            self.requests["PUT lost"] += 1
            raise
        self.requests["PUT"] += 1
        return etag


@dataclass
class Tally:
    """One phase in one process: transactions done, seconds from start to the last, requests,
    CPU seconds (this process's; SeaweedFS's, added by the parent)."""

    done: int = 0
    seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)
    client_cpu: float = 0.0
    weed_cpu: float = 0.0

    def __add__(self, other: Tally) -> Tally:  # two processes side by side
        slower = max(self.seconds, other.seconds)
        return Tally(
            self.done + other.done,
            slower,
            self.requests + other.requests,
            self.client_cpu + other.client_cpu,
            self.weed_cpu + other.weed_cpu,
        )

    def to_json(self) -> str:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting pairs.
        return json.dumps(vars(self))

    @classmethod
    def from_json(cls, text: str) -> Tally:
        data = json.loads(text)
        return cls(**(data | {"requests": Counter(data["requests"])}))


def transaction_size() -> int:
    """The bytes of a stored hold (a block of one): what a raw PUT carries."""
    _, funded = post(LedgerState(), deposit(USERS[0], FUNDS))
    tx, _ = post(funded, hold(uuid.uuid4().hex, uuid.uuid4().hex, USERS[0], HOLD))
    return len(tx.model_dump_json())


One = Callable[[int], Awaitable[None]]
"""One transaction of a phase; its argument makes it unique within the process."""


@asynccontextmanager
async def prepared(
    phase: Phase, settings: S3Settings, prefix: str, tag: str
) -> AsyncIterator[tuple[One, Counter[str]]]:
    """`phase` ready to time (client open, the ledger read once): one transaction, and the
    counter of the requests it makes."""
    if phase == "raw":
        payload, counts = os.urandom(transaction_size()), Counter[str]()
        async with create_s3_client(settings) as s3:

            async def put(n: int) -> None:
                key = f"{prefix}raw/{tag}-{n:09d}"
                await s3.put_object(Bucket=settings.bucket, Key=key, Body=payload, IfNoneMatch="*")
                counts["PUT"] += 1

            yield put, counts
        return
    async with CountingStore(settings) as store:
        ledger = Ledger(store, f"{prefix}ledger/")
        await ledger.state()  # a new process reads the ledger first: not part of its throughput
        store.requests.clear()

        async def one(n: int) -> None:
            user = USERS[n % len(USERS)]
            if phase == "deposit":
                await ledger.deposit(user, 1)
            else:
                await ledger.hold(uuid.uuid4().hex, uuid.uuid4().hex, user, HOLD)

        yield one, store.requests


async def drive(one: One, requests: Counter[str], in_flight: int, seconds: float) -> Tally:
    """`in_flight` tasks, each calling `one` again and again until `seconds` have passed."""
    tally = Tally(requests=requests)
    cpu_start, start = time.process_time(), time.perf_counter()
    deadline = start + seconds

    async def task(index: int) -> None:
        n = index
        while time.perf_counter() < deadline:
            await one(n)
            tally.done += 1
            tally.seconds = time.perf_counter() - start
            n += in_flight

    async with anyio.create_task_group() as tasks:
        for index in range(in_flight):
            tasks.start_soon(task, index)
    tally.client_cpu = time.process_time() - cpu_start
    return tally


# --- two processes --------------------------------------------------------------------------------


async def worker(args: argparse.Namespace) -> None:
    """--worker: prepare the phase, say "ready", wait for "go" on stdin, run, print the tally."""
    async with prepared(args.worker, S3Settings(), args.prefix, args.tag) as (one, requests):
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        tally = await drive(one, requests, args.in_flight, args.seconds)
    print(tally.to_json(), flush=True)


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds `process` has used so far."""
    return float(sum(process.cpu_times()[:2]))


async def two_processes(
    phase: Phase, weed: psutil.Process, prefix: str, in_flight: int, seconds: float
) -> Tally:
    env = {**os.environ, **s3_environment(S3Settings())}
    processes: list[Process] = []
    try:
        for tag in ("a", "b"):
            command = [sys.executable, __file__, "--worker", phase, "--prefix", prefix]
            command += ["--tag", tag, "--in-flight", str(in_flight), "--seconds", str(seconds)]
            processes.append(await anyio.open_process(command, env=env, stderr=None))
        lines: list[BufferedByteReceiveStream] = []
        for process in processes:
            assert process.stdout is not None
            lines.append(BufferedByteReceiveStream(process.stdout))
        for line in lines:
            assert await line.receive_until(b"\n", LINE_LIMIT) == b"ready"
        weed_start = cpu_seconds(weed)
        for process in processes:
            assert process.stdin is not None
            await process.stdin.send(b"go\n")
        tallies = [
            Tally.from_json((await line.receive_until(b"\n", LINE_LIMIT)).decode())
            for line in lines
        ]
        tallies[0].weed_cpu = cpu_seconds(weed) - weed_start
        for process in processes:
            assert await process.wait() == 0
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    return tallies[0] + tallies[1]


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Row:
    phase: Phase
    processes: int
    in_flight: int
    tallies: list[Tally] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [t.done / t.seconds for t in self.tallies if t.seconds]

    def per_tx(self) -> dict[str, float]:
        done = sum(t.done for t in self.tallies)
        requests = sum((t.requests for t in self.tallies), Counter[str]())
        return {kind: requests[kind] / done for kind in ("LIST", "GET", "PUT", "PUT lost")}

    def cpu_ms_per_tx(self) -> dict[str, float]:
        """CPU ms per transaction: the ledger's (or raw's) process(es), and SeaweedFS."""
        done = sum(t.done for t in self.tallies)
        total = sum(self.tallies, Tally())
        return {"client": total.client_cpu * 1000 / done, "weed": total.weed_cpu * 1000 / done}

    def tx_per_block(self) -> float:
        puts = sum(t.requests["PUT"] for t in self.tallies)
        return sum(t.done for t in self.tallies) / puts


async def run_group(
    weed: psutil.Process, store: S3ObjectStore, rows: Sequence[Row], prefix: str, seconds: float
) -> None:
    """One repetition of `rows` (one process count and in-flight) on a fresh ledger, checked.
    The S3 settings are the environment's (PARJOBS_S3_*), the workers' too."""
    seed = Ledger(store, f"{prefix}ledger/")
    for user in USERS:
        await seed.deposit(user, FUNDS)
    for row in rows:
        if row.processes == 1:
            async with prepared(row.phase, S3Settings(), prefix, "a") as (one, requests):
                weed_start = cpu_seconds(weed)
                tally = await drive(one, requests, row.in_flight, seconds)
                tally.weed_cpu = cpu_seconds(weed) - weed_start
        else:
            tally = await two_processes(row.phase, weed, prefix, row.in_flight, seconds)
        row.tallies.append(tally)
    problems = await seed.verify()
    appended = sum(row.tallies[-1].done for row in rows if row.phase != "raw")
    if problems or (await seed.state()).seq != len(USERS) + appended:
        raise SystemExit(f"the ledger does not check out: {problems}")
    await store.delete_prefix(prefix)


async def bench(args: argparse.Namespace) -> None:
    levels = [int(level) for level in args.in_flight.split(",")]
    groups = [
        [Row(phase, processes, in_flight) for phase in PHASES]
        for in_flight in levels
        for processes in (1, 2)
    ]
    async with LocalSeaweed() as s3, S3ObjectStore(s3.settings) as store:
        await store.ensure_bucket()
        os.environ.update(s3_environment(s3.settings))
        weed = psutil.Process(s3.pid)
        for rep in range(args.repeat):
            for number, rows in enumerate(groups):
                ordered = rows if rep % 2 == 0 else [*rows[1:], rows[0]]  # raw first, then last
                await run_group(weed, store, ordered, f"bench/{rep}-{number}/", args.seconds)
    report(args, [row for rows in groups for row in rows])


def report(args: argparse.Namespace, rows: list[Row]) -> None:
    raw: dict[tuple[int, int], float] = {}
    results: list[dict[str, object]] = []
    for row in rows:
        rate = statistics.median(row.rates)
        if row.phase == "raw":
            raw[row.processes, row.in_flight] = rate
        results.append(
            {
                "row": f"{row.phase}, {row.processes} process{'es' if row.processes > 1 else ''}",
                "phase": row.phase,
                "processes": row.processes,
                "in_flight": row.in_flight,
                "tx_per_s": round(rate, 1),
                "min": round(min(row.rates), 1),
                "max": round(max(row.rates), 1),
                "s3_per_tx": {kind: round(n, 4) for kind, n in row.per_tx().items()},
                "tx_per_block": round(row.tx_per_block(), 2),
                "cpu_ms_per_tx": {who: round(ms, 3) for who, ms in row.cpu_ms_per_tx().items()},
                "ratio": round(rate / raw[row.processes, row.in_flight], 3),
            }
        )
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"{args.seconds} s a row, median of {args.repeat}, {os.cpu_count()} CPUs, "
        f"python {sys.version.split()[0]}, a raw PUT carries {transaction_size()} bytes\n"
    )
    head = f"{'row':<22}{'in flight':>10}{'tx/s':>9}{'min':>8}{'max':>8}"
    head += f"{'LIST/tx':>9}{'GET/tx':>8}{'PUT/tx':>8}{'lost/tx':>9}{'tx/block':>10}"
    head += f"{'CPU ms/tx':>10}{'weed':>6}{'ratio':>7}"
    print(f"{head}\n{'-' * len(head)}")
    for r in results:
        per = cast("dict[str, float]", r["s3_per_tx"])
        cpu = cast("dict[str, float]", r["cpu_ms_per_tx"])
        print(
            f"{r['row']:<22}{r['in_flight']:>10}{r['tx_per_s']:>9.0f}{r['min']:>8.0f}"
            f"{r['max']:>8.0f}{per['LIST']:>9.3f}{per['GET']:>8.3f}{per['PUT']:>8.3f}"
            f"{per['PUT lost']:>9.3f}{r['tx_per_block']:>10.1f}"
            f"{cpu['client']:>10.3f}{cpu['weed']:>6.2f}{r['ratio']:>7.2f}"
        )
    print(NOTES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--in-flight", default="1,10,100", help="tasks per process, a list")
    parser.add_argument("--seconds", type=float, default=2.0, help="each row's duration")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--worker", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.in_flight = int(args.in_flight)
        anyio.run(worker, args)
    else:
        anyio.run(bench, args)


if __name__ == "__main__":
    main()
