"""Sandboxes spawned ahead of need, one job each: starting a run costs a pipe write, not a start.

A compute worker keeps `size` spare sandboxes (`SandboxPool.serve`). Each has a scratch directory
of its own, made when it is spawned (a sandbox cannot bind a directory that does not exist yet):
`input/` (read-only inside), `run/` (the working directory, with `tmp/`) and `output/`, nothing
else of the host's files but the system, the interpreter and the built-in scripts. A job takes one
(`workspace`), has its input put into `input/`, runs in it, and has its outputs taken from
`output/`; the sandbox then exits and the directory goes. A new spare is spawned at once, off the
job's path. One job never sees another's files: each sandbox shows its own directory only, and
never runs a second job.

With `PARJOBS_SANDBOX=none`, or no spares kept, `workspace` gives a fresh directory and the run
starts its process then, as before.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from workers.calculations._launch import Sandbox
from workers.calculations._sandbox import SandboxMode, hand_over, sandbox_view


@dataclass(frozen=True)
class Workspace:
    """Where one job's run happens, and what to pass `run_calculation` as its `sandbox`."""

    input_dir: Path
    """Put the run's input here (read-only to the run)."""
    workdir: Path
    output_dir: Path
    sandbox: SandboxMode | Sandbox


class SandboxPool:
    """Single-use sandboxes for one worker's runs, `size` of them spawned ahead while `serve`
    runs. `memory_limit_bytes` sizes each sandbox's /tmp, as for a sandbox spawned per run."""

    def __init__(self, mode: SandboxMode, *, size: int, memory_limit_bytes: int) -> None:
        self._mode: SandboxMode = mode
        self._size = size if mode == "bwrap" else 0
        self._memory_limit_bytes = memory_limit_bytes
        self._spares: list[tuple[Sandbox, Path]] = []
        self._wanted: anyio.Event | None = None  # set by a take while `serve` runs

    @property
    def spares(self) -> int:
        """Sandboxes spawned and waiting for a job."""
        return len(self._spares)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the spares: spawn them, then a new one each time one is taken; end them all when
        cancelled. Started (`TaskGroup.start`) once the first spares are spawned."""
        try:
            self._fill()
            task_status.started()
            while True:
                self._wanted = anyio.Event()
                await self._wanted.wait()
                self._fill()
        finally:
            self._wanted = None
            while self._spares:
                sandbox, root = self._spares.pop()
                sandbox.discard()
                shutil.rmtree(root)

    @contextlib.asynccontextmanager
    async def workspace(self) -> AsyncIterator[Workspace]:
        """A job's place to run: a spare sandbox's directory, or (none spare) a new one's."""
        if self._mode == "none":
            root = Path(tempfile.mkdtemp(prefix="parjobs-run-"))
            try:
                (root / "input").mkdir()
                yield Workspace(root / "input", root / "run", root / "output", "none")
            finally:
                shutil.rmtree(root)
            return
        sandbox, root = self._take()
        try:
            yield Workspace(root / "input", root / "run", root / "output", sandbox)
        finally:
            sandbox.discard()
            shutil.rmtree(root)

    def _take(self) -> tuple[Sandbox, Path]:
        while self._spares:
            sandbox, root = self._spares.pop(0)  # the oldest: the likeliest to be ready
            if self._wanted is not None:
                self._wanted.set()  # its replacement, spawned once this job awaits something
            if sandbox.waiting:
                return sandbox, root
            sandbox.discard()  # it died waiting (killed from outside): never hand it a job
            shutil.rmtree(root)
        return self._spawn()

    def _fill(self) -> None:
        while len(self._spares) < self._size:
            self._spares.append(self._spawn())

    def _spawn(self) -> tuple[Sandbox, Path]:
        root = Path(tempfile.mkdtemp(prefix="parjobs-run-"))
        try:
            inputs, workdir, outputs = root / "input", root / "run", root / "output"
            for directory in (inputs, workdir, workdir / "tmp", outputs):
                directory.mkdir()
            hand_over((workdir, workdir / "tmp", outputs))
            view = sandbox_view(
                memory_limit_bytes=self._memory_limit_bytes,
                writable=(workdir, outputs),
                readable=(inputs,),
            )
            return Sandbox(view, workdir=workdir), root
        except BaseException:
            shutil.rmtree(root)
            raise
