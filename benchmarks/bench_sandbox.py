"""What the calculation sandbox adds to every run: sandboxed against unsandboxed, same process.

Rows: three trivial calculations, each run through `run_calculation` --runs times unsandboxed
(`PARJOBS_SANDBOX=none`, the reference), in a bubblewrap sandbox spawned for the run (`bwrap`,
cold) and in one spawned ahead by a `SandboxPool` (`bwrap, ahead`, warm: what a compute daemon
does), alternating so noise hits all alike:
- `python -c pass`: the interpreter starting and exiting: the launch cost alone (exec'd in the
  sandbox, as any program that is not a built-in script).
- `sleep 0 (built-in)`: the built-in `sleep` calculation with 0 seconds (its script imports
  argparse and json and writes summary.json).
- `checksum 4 KiB (built-in)`: what bench_jobs.py's jobs run.

Reading it: `ms/run` is the median wall time of one whole run (spawn or hand-over to reaped,
output read): the run's part of a job's latency. `ratio` = that median / the unsandboxed median
of the same calculation, and `+ms` their difference. CPU per run, in ms (means): `worker` is
this process (spawning, reading the output, reaping; with spares, spawning the replacement too);
`children` is every process it reaped (bwrap, the supervisor, the program; a spare's own start
counts in the run that used it, so it is the whole CPU a run costs the machine); `charged` is
what the run is billed (`RunOutcome.cpu_seconds`: the program's processes only). After each warm
run the benchmark waits 0.2 s, as a daemon between jobs would, so the replacement's start does
not land in the next row. Absolute times only compare within a run; the ratio and +ms compare
across runs. Needs bwrap (`apt-get install bubblewrap`).

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import anyio

from workers.calculations import (
    DEFAULT_MEMORY_LIMIT,
    CalculationRegistry,
    SandboxMode,
    SandboxPool,
    Stream,
    Workspace,
    run_calculation,
)
from workers.calculations._sandbox import SANDBOX_UID

MODES = ("none", "bwrap", "bwrap, ahead")
WARM_PAUSE_S = 0.2


async def ignore(stream: Stream, line: str) -> None:
    """Output is read (as a worker reads it) and dropped."""


def built_in(name: str, params: dict[str, object]) -> Callable[[Path, Path], list[str]]:
    def argv(input_path: Path, output_dir: Path) -> list[str]:
        registry = CalculationRegistry.from_entry_points()
        invocation = registry.invocation(name, params, input_path=input_path, output_dir=output_dir)
        return list(invocation.argv)

    return argv


CALCULATIONS: dict[str, Callable[[Path, Path], list[str]]] = {
    "python -c pass": lambda input_path, output_dir: [sys.executable, "-I", "-S", "-c", "pass"],
    "sleep 0 (built-in)": built_in("sleep", {"seconds": 0}),
    "checksum 4 KiB (built-in)": built_in("checksum", {}),
}


class Sample(NamedTuple):
    wall_s: float
    worker_cpu_s: float
    children_cpu_s: float
    charged_cpu_s: float


def cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@asynccontextmanager
async def workspace(mode: str, pool: SandboxPool) -> AsyncIterator[Workspace]:
    if mode == "bwrap, ahead":
        async with pool.workspace() as space:
            yield space
        return
    root = Path(tempfile.mkdtemp(prefix="parjobs-bench-sandbox-"))
    try:
        (root / "input").mkdir()
        cold: SandboxMode = "none" if mode == "none" else "bwrap"
        yield Workspace(root / "input", root / "run", root / "output", cold)
    finally:
        shutil.rmtree(root)


async def one_run(calculation: str, mode: str, pool: SandboxPool) -> Sample:
    """One whole run of `calculation` in a fresh run directory."""
    async with workspace(mode, pool) as space:
        input_path = space.input_dir / "input"
        input_path.write_bytes(os.urandom(4096))
        argv = CALCULATIONS[calculation](input_path, space.output_dir)
        worker, children = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        outcome = await run_calculation(
            argv,
            workdir=space.workdir,
            output_dir=space.output_dir,
            inputs=(input_path,),
            time_limit_s=60,
            on_output=ignore,
            sandbox=space.sandbox,
        )
        elapsed = time.perf_counter() - started
        worker = cpu(resource.RUSAGE_SELF) - worker
        children = cpu(resource.RUSAGE_CHILDREN) - children
        if not outcome.succeeded:
            raise SystemExit(f"{calculation} ({mode}) failed: {outcome.reason}")
    if mode == "bwrap, ahead":
        await anyio.sleep(WARM_PAUSE_S)  # the replacement starts, as between a daemon's jobs
    return Sample(elapsed, worker, children, outcome.cpu_seconds)


async def measure(runs: int) -> dict[tuple[str, str], list[Sample]]:
    samples: dict[tuple[str, str], list[Sample]] = {
        (calculation, mode): [] for calculation in CALCULATIONS for mode in MODES
    }
    pool = SandboxPool("bwrap", size=1, memory_limit_bytes=DEFAULT_MEMORY_LIMIT)
    async with anyio.create_task_group() as group:
        await group.start(pool.serve)
        await anyio.sleep(WARM_PAUSE_S)
        for calculation, mode in samples:  # warm-up: imports, page cache, the first namespaces
            await one_run(calculation, mode, pool)
        for _ in range(runs):
            for calculation, mode in samples:
                samples[calculation, mode].append(await one_run(calculation, mode, pool))
        group.cancel_scope.cancel()
    return samples


def bwrap_version() -> str:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SystemExit("bwrap not found: apt-get install bubblewrap")
    # The path comes from shutil.which, the argument is fixed.
    return subprocess.run(  # noqa: S603
        [bwrap, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=50, help="runs per row (after one warm-up)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args()

    version = bwrap_version()
    samples = anyio.run(measure, args.runs)
    rows: list[dict[str, Any]] = []
    for (calculation, mode), taken in samples.items():
        median_ms = statistics.median(sample.wall_s for sample in taken) * 1000
        reference_ms = statistics.median(sample.wall_s for sample in samples[calculation, "none"])
        reference_ms *= 1000
        rows.append(
            {
                "calculation": calculation,
                "sandbox": mode,
                "runs": len(taken),
                "median_ms": round(median_ms, 2),
                "min_ms": round(min(sample.wall_s for sample in taken) * 1000, 2),
                "max_ms": round(max(sample.wall_s for sample in taken) * 1000, 2),
                "runs_per_s": round(1000 / median_ms, 1),
                "ratio": round(median_ms / reference_ms, 3),
                "added_ms": round(median_ms - reference_ms, 2),
                "cpu_ms_per_run": {
                    "worker": round(statistics.mean(x.worker_cpu_s for x in taken) * 1000, 2),
                    "children": round(statistics.mean(x.children_cpu_s for x in taken) * 1000, 2),
                    "charged": round(statistics.mean(x.charged_cpu_s for x in taken) * 1000, 2),
                },
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return

    as_user = f"uid {SANDBOX_UID}" if os.geteuid() == 0 else "the worker's uid, user namespace"
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"python {platform.python_version()}, {version}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; sandboxed runs as {as_user}"
    )
    print(f"{args.runs} runs per row after one warm-up, rows alternating; ms/run is the median")
    print()
    header = (
        f"{'calculation':<26} {'sandbox':<13} {'runs':>4} {'ms/run':>7} {'min':>6} {'max':>6} "
        f"{'ratio':>6} {'+ms':>6} | {'CPU ms/run: worker':>18} {'children':>8} {'charged':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        reference = row["sandbox"] == "none"
        used = row["cpu_ms_per_run"]
        print(
            f"{row['calculation']:<26} {row['sandbox']:<13} {row['runs']:>4} "
            f"{row['median_ms']:>7.1f} {row['min_ms']:>6.1f} {row['max_ms']:>6.1f} "
            f"{'' if reference else format(row['ratio'], '.2f'):>6} "
            f"{'' if reference else format(row['added_ms'], '+.1f'):>6} | "
            f"{used['worker']:>18.1f} {used['children']:>8.1f} {used['charged']:>7.1f}"
        )
    print()
    print("ratio = ms/run / unsandboxed ms/run of the same calculation; +ms = the difference.")
    print("CPU: worker = this process; children = every process it reaped (bwrap, supervisor,")
    print("program; a spare's start counts in the run that used it); charged = RunOutcome.")


if __name__ == "__main__":
    main()
