"""What the calculation sandbox adds to every run: sandboxed against unsandboxed, same process.

Rows: two trivial calculations, each run through `run_calculation` --runs times unsandboxed
(`PARJOBS_SANDBOX=none`, the reference) and in the bubblewrap sandbox, alternating so noise hits
both alike:
- `python -c pass`: the interpreter starting and exiting: the launch cost alone.
- `sleep 0 (built-in)`: the built-in `sleep` calculation with 0 seconds, as a job runs it (its
  script imports argparse and json and writes summary.json).

Reading it: `ms/run` is the median wall time of one whole run (spawn to reaped, output read);
`ratio` = the sandboxed median / the unsandboxed median of the same calculation, and `+ms` their
difference: what the sandbox costs per run on this machine. Absolute times only compare within a
run; the ratio and +ms compare across runs. Needs bwrap (`apt-get install bubblewrap`).

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from workers.calculations import CalculationRegistry, SandboxMode, Stream, run_calculation
from workers.calculations._sandbox import SANDBOX_UID

MODES: tuple[SandboxMode, ...] = ("none", "bwrap")


async def ignore(stream: Stream, line: str) -> None:
    """Output is read (as a worker reads it) and dropped."""


def sleep_zero(output_dir: Path) -> list[str]:
    registry = CalculationRegistry.from_entry_points()
    invocation = registry.invocation(
        "sleep", {"seconds": 0}, input_path=output_dir / "unused", output_dir=output_dir
    )
    return list(invocation.argv)


CALCULATIONS = {
    "python -c pass": lambda output_dir: [sys.executable, "-I", "-S", "-c", "pass"],
    "sleep 0 (built-in)": sleep_zero,
}


async def one_run(calculation: str, mode: SandboxMode) -> float:
    """Seconds for one whole run of `calculation` in a fresh run directory."""
    scratch = Path(tempfile.mkdtemp(prefix="parjobs-bench-sandbox-"))
    try:
        argv = CALCULATIONS[calculation](scratch / "output")
        started = time.perf_counter()
        outcome = await run_calculation(
            argv, workdir=scratch, time_limit_s=60, on_output=ignore, sandbox=mode
        )
        elapsed = time.perf_counter() - started
        if not outcome.succeeded:
            raise SystemExit(f"{calculation} ({mode}) failed: {outcome.reason}")
        return elapsed
    finally:
        shutil.rmtree(scratch)


async def measure(runs: int) -> dict[tuple[str, SandboxMode], list[float]]:
    timings: dict[tuple[str, SandboxMode], list[float]] = {
        (calculation, mode): [] for calculation in CALCULATIONS for mode in MODES
    }
    for calculation, mode in timings:  # warm-up: imports, page cache, the first namespaces
        await one_run(calculation, mode)
    for _ in range(runs):
        for calculation, mode in timings:
            timings[calculation, mode].append(await one_run(calculation, mode))
    return timings


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
    timings = anyio.run(measure, args.runs)
    rows = []
    for (calculation, mode), seconds in timings.items():
        median_ms = statistics.median(seconds) * 1000
        reference_ms = statistics.median(timings[calculation, "none"]) * 1000
        rows.append(
            {
                "calculation": calculation,
                "sandbox": mode,
                "runs": len(seconds),
                "median_ms": round(median_ms, 2),
                "min_ms": round(min(seconds) * 1000, 2),
                "max_ms": round(max(seconds) * 1000, 2),
                "runs_per_s": round(1000 / median_ms, 1),
                "ratio": round(median_ms / reference_ms, 3),
                "added_ms": round(median_ms - reference_ms, 2),
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
        f"{'calculation':<20} {'sandbox':<8} {'runs':>5} {'ms/run':>8} {'min':>8} {'max':>8} "
        f"{'runs/s':>7} {'ratio':>6} {'+ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        reference = row["sandbox"] == "none"
        print(
            f"{row['calculation']:<20} {row['sandbox']:<8} {row['runs']:>5} "
            f"{row['median_ms']:>8.1f} {row['min_ms']:>8.1f} {row['max_ms']:>8.1f} "
            f"{row['runs_per_s']:>7.1f} {'' if reference else format(row['ratio'], '.2f'):>6} "
            f"{'' if reference else format(row['added_ms'], '+.1f'):>7}"
        )
    print()
    print("ratio = sandboxed ms/run / unsandboxed ms/run of the same calculation; +ms = the")
    print("difference: the sandbox's cost per run (bwrap, namespaces, mounts, the supervisor).")


if __name__ == "__main__":
    main()
