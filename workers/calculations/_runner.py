"""Runs a calculation's argv in a child process and reports how it ended.

The child runs in a bubblewrap sandbox (or, if the operator chose so, unsandboxed in a session of
its own), with a clean environment, memory and CPU limits (see `_sandbox`), and a wall-clock
limit enforced here. Its stdout and stderr lines go to a callback as they are printed.

The child is spawned with `subprocess.Popen` and watched through a pidfd rather than with
`anyio.open_process`: asyncio's child watcher reaps with `waitpid`, which throws away the child's
resource usage, and the CPU seconds are what a run is charged for. Reaping it ourselves with
`os.wait4` keeps them.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal, NamedTuple

import anyio
from pydantic import BaseModel, ConfigDict

from workers.calculations._launch import Sandbox, SandboxLink, popen
from workers.calculations._sandbox import (
    DEFAULT_MEMORY_LIMIT,
    SandboxMode,
    clean_environment,
    hand_over,
    job_request,
    limited_argv,
    resolve_program,
    sandbox_view,
)

Stream = Literal["stdout", "stderr"]
OutputCallback = Callable[[Stream, str], Awaitable[None]]

DEFAULT_STOP_GRACE_S = 5.0
_MAX_LINE_BYTES = 64 * 1024  # a longer line (or binary output) is passed on in pieces
_DRAIN_S = 2.0  # after the exit, how long a process that left the session may hold our pipes
_KILL_GRACE_S = 1.0  # how long the sandbox's supervisor may take to kill and reap its processes
# What allocation failures look like on stderr (Python, C, C++, Go, Rust): RLIMIT_AS makes
# allocation fail in the child rather than killing it, so this is the sign the limit was hit.
_ALLOCATION_FAILURES = (
    "MemoryError",
    "Cannot allocate memory",
    "std::bad_alloc",
    "out of memory",
    "memory allocation of",
)


class RunOutcome(BaseModel):
    """How a run ended. `exit_code` is None when a signal ended it (then `signal` says which)."""

    model_config = ConfigDict(frozen=True)

    exit_code: int | None
    signal: int | None
    timed_out: bool
    """The wall-clock limit passed and the process group was killed."""
    stopped: bool
    """`RunHandle.stop()` was asked for while the child ran."""
    memory_exceeded: bool
    """Best effort: the child reported an allocation failure on stderr."""
    cpu_seconds: float
    """User + system CPU time of the child and of the descendants it waited for."""
    wall_seconds: float
    outputs: tuple[str, ...]
    """Regular files in the output directory (relative, `/`-separated, sorted). Symlinks are
    left out: following one would upload whatever it points at on the worker's disk."""

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.stopped)

    @property
    def reason(self) -> str | None:
        """Why the run failed, in words for a user; None if it succeeded."""
        if self.succeeded:
            return None
        if self.stopped:
            return "stopped on request"
        if self.timed_out:
            return f"time limit reached after {self.wall_seconds:.1f} s"
        if self.memory_exceeded:
            return "memory limit reached"
        if self.signal == signal.SIGXCPU:
            return f"CPU time limit reached after {self.cpu_seconds:.1f} CPU seconds"
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with code {self.exit_code}"


class RunHandle:
    """Lets another task stop a run. One handle per run; pass it to `run_calculation`."""

    def __init__(self) -> None:
        self._requested = anyio.Event()
        self._finished = anyio.Event()
        self._grace_s = DEFAULT_STOP_GRACE_S

    def request_stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        """Ask for the stop `stop` makes, without waiting for the run to end (nor to start)."""
        if not self._requested.is_set():
            self._grace_s = grace_s
            self._requested.set()

    async def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        """SIGTERM to the run's whole process group, SIGKILL after `grace_s` if anything is left;
        returns once the child has ended (also when called from the run's `on_output`).
        Stopping before the run starts stops it as soon as it starts."""
        self.request_stop(grace_s)
        await self._finished.wait()


async def run_calculation(
    argv: Sequence[str],
    *,
    workdir: Path,
    time_limit_s: float,
    on_output: OutputCallback,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
    cpu_limit_s: int | None = None,
    env: Mapping[str, str] | None = None,
    output_dir: Path | None = None,
    inputs: Sequence[Path] = (),
    sandbox: SandboxMode | Sandbox = "bwrap",
    handle: RunHandle | None = None,
) -> RunOutcome:
    """Run `argv` in `workdir` (created if needed, with `tmp/` for TMPDIR) and report the outcome.

    `cpu_limit_s` (RLIMIT_CPU) defaults to the time limit, rounded up, so even an orphan cannot
    burn more; a caller may set it lower to cap what a run can cost. `output_dir` defaults to
    `workdir/output`. In the sandbox, `workdir` and `output_dir` are the only writable places and
    `inputs` are readable besides the system, the interpreter and the program. Cancelling the
    caller kills every process of the run at once; so does an exception from `on_output`, which
    then propagates (in an ExceptionGroup).

    `sandbox` may be a `Sandbox` spawned ahead (`SandboxPool.workspace`): the run is handed to it
    if it shows the run's paths, else it runs in a sandbox of its own, as with `bwrap`.
    """
    handle = handle or RunHandle()
    try:
        started = time.monotonic()
        child = _spawn(
            argv,
            workdir=workdir,
            output_dir=output_dir,
            inputs=inputs,
            env=env,
            memory_limit_bytes=memory_limit_bytes,
            cpu_limit_s=cpu_limit_s if cpu_limit_s is not None else max(1, math.ceil(time_limit_s)),
            sandbox=sandbox,
        )
        try:
            ending = await child.supervise(time_limit_s, handle, on_output)
        finally:
            child.close()
    finally:
        handle._finished.set()
    return RunOutcome(
        exit_code=ending.exit_code,
        signal=ending.signal,
        timed_out=ending.timed_out,
        stopped=ending.stopped,
        memory_exceeded=ending.memory_exceeded,
        cpu_seconds=ending.cpu_seconds,
        wall_seconds=ending.at - started,
        outputs=_regular_files(child.output_dir),
    )


def _spawn(
    argv: Sequence[str],
    *,
    workdir: Path,
    output_dir: Path | None,
    inputs: Sequence[Path],
    env: Mapping[str, str] | None,
    memory_limit_bytes: int,
    cpu_limit_s: int,
    sandbox: SandboxMode | Sandbox,
) -> _Child:
    # Synchronous and on the event loop's thread on purpose (see `Sandbox`).
    workdir = workdir.absolute()
    output_dir = (output_dir or workdir / "output").absolute()
    for directory in (workdir, workdir / "tmp", output_dir):
        directory.mkdir(parents=True, exist_ok=True)
    child_env = clean_environment(workdir, env)
    limits = {"memory_limit_bytes": memory_limit_bytes, "cpu_limit_s": cpu_limit_s}
    if sandbox == "none":
        command = limited_argv(argv, env=child_env, **limits)
        return _Child(popen(command, workdir, child_env), output_dir, None)
    hand_over((workdir, workdir / "tmp", output_dir))
    program = resolve_program(argv[0], child_env)
    readable, writable = (Path(program), *inputs), (workdir, output_dir)
    if not (isinstance(sandbox, Sandbox) and sandbox.shows(readable=readable, writable=writable)):
        # None spawned ahead, or it cannot show what this run needs: one of the run's own.
        view = sandbox_view(
            memory_limit_bytes=memory_limit_bytes, writable=writable, readable=readable
        )
        sandbox = Sandbox(view, workdir=workdir)
    try:
        sandbox.start(job_request(argv, program=program, env=child_env, workdir=workdir, **limits))
    except BaseException:
        sandbox.discard()
        raise
    return _Child(sandbox.process, output_dir, sandbox.link)


class _Ending(NamedTuple):
    exit_code: int | None
    signal: int | None
    cpu_seconds: float
    at: float  # time.monotonic() when reaped
    timed_out: bool
    stopped: bool
    memory_exceeded: bool


class _Child:
    """One spawned child: its pidfd, its process group, its pipes and, when sandboxed, the link
    to the sandbox's supervisor."""

    def __init__(
        self, process: subprocess.Popen[bytes], output_dir: Path, sandbox: SandboxLink | None
    ) -> None:
        self._process = process
        self.output_dir = output_dir
        self._sandbox = sandbox
        self._pidfd = os.pidfd_open(process.pid)
        self._reaped = False
        self._memory_exceeded = False
        self._drain_deadline = math.inf
        self._pipe_waits: set[anyio.CancelScope] = set()

    async def supervise(
        self, time_limit_s: float, handle: RunHandle, on_output: OutputCallback
    ) -> _Ending:
        assert self._process.stdout is not None
        assert self._process.stderr is not None
        timed_out = stopped = False
        try:
            async with anyio.create_task_group() as pumps:
                if self._sandbox is not None:
                    pumps.start_soon(self._sandbox.locate, self._process.pid)
                pumps.start_soon(self._pump, self._process.stdout, "stdout", on_output)
                pumps.start_soon(self._pump, self._process.stderr, "stderr", on_output)
                async with anyio.create_task_group() as watch:
                    watch.start_soon(self._stop_on_request, handle)
                    with anyio.move_on_after(time_limit_s) as limit:
                        await self._exited()
                    if limit.cancelled_caught:
                        timed_out = True
                        await self._kill()
                    stopped = handle._requested.is_set()
                    watch.cancel_scope.cancel()
                status, usage = self._reap()
                reaped_at = time.monotonic()
                handle._finished.set()  # before draining: stop() may be awaited by on_output
                self._stop_waiting_for_pipes_after(_DRAIN_S)
        finally:
            if not self._reaped:  # cancelled, or on_output failed: nothing may outlive the run
                with anyio.CancelScope(shield=True):
                    await self._kill()
                    self._reap()
        exit_code, ended_by, cpu_seconds = self._how_it_ended(status, usage)
        return _Ending(
            exit_code, ended_by, cpu_seconds, reaped_at, timed_out, stopped, self._memory_exceeded
        )

    async def _stop_on_request(self, handle: RunHandle) -> None:
        await handle._requested.wait()
        if self._sandbox is not None:
            await self._sandbox.located.wait()  # a stop right at the start waits a millisecond
        self._terminate()
        await anyio.sleep(handle._grace_s)
        await self._kill()

    async def _exited(self) -> None:
        """Wait until the child has exited (a zombie: its pid, and so its group id, stay ours)."""
        # On a duplicate: a stop's escalation and the time limit may both be waiting.
        pidfd = os.dup(self._pidfd)
        try:
            await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)

    def _terminate(self) -> None:
        """SIGTERM to every process of the run: in the sandbox, the supervisor passes it on."""
        if self._sandbox is None or not self._sandbox.signal(signal.SIGTERM):
            self._signal_group(signal.SIGTERM)

    async def _kill(self) -> None:
        """Kill every process of the run; returns once the child has exited."""
        if self._sandbox is not None and self._sandbox.signal(signal.SIGUSR1):
            # The supervisor kills and reaps them itself, so the CPU time they used is counted;
            # killing it instead would lose it (the kernel reaps a dying PID 1's children).
            with anyio.move_on_after(_KILL_GRACE_S):
                await self._exited()
                return
            self._sandbox.signal(signal.SIGKILL)
        self._signal_group(signal.SIGKILL)
        await self._exited()

    def _signal_group(self, sig: signal.Signals) -> None:
        # Safe until reaped: the zombie keeps the pid, so the group id cannot name anyone else.
        # Sandboxed, the group is bwrap alone: its death takes the sandbox (--die-with-parent).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)

    def _reap(self) -> tuple[int, resource.struct_rusage]:
        # Whatever the child left running in its session goes with it.
        self._signal_group(signal.SIGKILL)
        _, status, usage = os.wait4(self._process.pid, 0)
        self._reaped = True
        self._process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not reap again
        return status, usage

    def _how_it_ended(
        self, status: int, usage: resource.struct_rusage
    ) -> tuple[int | None, int | None, float]:
        """(exit code, signal, CPU seconds) of the program, from its wait status and usage or,
        sandboxed, from the supervisor's report (which leaves out the sandbox's own start);
        without one, bwrap's exit code says 128 + the ending signal."""
        cpu_seconds = usage.ru_utime + usage.ru_stime
        if self._sandbox is not None:
            reported = self._sandbox.report()
            if reported is not None:
                status, cpu_seconds = reported
            elif os.WIFEXITED(status) and os.WEXITSTATUS(status) > 128:
                return None, os.WEXITSTATUS(status) - 128, cpu_seconds
        if os.WIFSIGNALED(status):
            return None, os.WTERMSIG(status), cpu_seconds
        return os.WEXITSTATUS(status), None, cpu_seconds

    def _stop_waiting_for_pipes_after(self, seconds: float) -> None:
        # Once the group is dead its pipes end at once, unless a process that left the session
        # (setsid) still holds them: waiting for that one is given up after `seconds`. Only the
        # waits are limited, never on_output, so no line already printed is lost.
        self._drain_deadline = anyio.current_time() + seconds
        for scope in self._pipe_waits:
            scope.deadline = self._drain_deadline

    async def _readable(self, fd: int) -> bool:
        with anyio.CancelScope(deadline=self._drain_deadline) as scope:
            self._pipe_waits.add(scope)
            try:
                await anyio.wait_readable(fd)
            finally:
                self._pipe_waits.discard(scope)
        return not scope.cancelled_caught

    async def _pump(self, pipe: IO[bytes], stream: Stream, on_output: OutputCallback) -> None:
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                if await self._readable(fd):
                    continue
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                for piece in _pieces(line):
                    await self._emit(piece, stream, on_output)
            while len(pending) >= _MAX_LINE_BYTES:
                await self._emit(pending[:_MAX_LINE_BYTES], stream, on_output)
                pending = pending[_MAX_LINE_BYTES:]
        if pending:
            await self._emit(pending, stream, on_output)

    async def _emit(self, raw: bytes, stream: Stream, on_output: OutputCallback) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
        if stream == "stderr" and any(marker in line for marker in _ALLOCATION_FAILURES):
            self._memory_exceeded = True
        await on_output(stream, line)

    def close(self) -> None:
        os.close(self._pidfd)
        if self._sandbox is not None:
            self._sandbox.close()
        for pipe in (self._process.stdout, self._process.stderr):
            if pipe is not None:
                pipe.close()


def _pieces(line: bytes) -> list[bytes]:
    return [line[at : at + _MAX_LINE_BYTES] for at in range(0, len(line), _MAX_LINE_BYTES)] or [b""]


def _regular_files(root: Path) -> tuple[str, ...]:
    found = []
    for directory, _, names in os.walk(root):  # does not descend into symlinked directories
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                found.append(path.relative_to(root).as_posix())
    return tuple(sorted(found))
