"""Launching a calculation's process: unsandboxed, or a bubblewrap sandbox waiting for its job.

A `Sandbox` is spawned before its job is known: bwrap with the view it will show and, as its PID 1,
the supervisor (`_sandbox._SUPERVISOR`), which imports what the built-ins need and then blocks
reading its one job from a pipe. `start` hands the job over; the sandbox runs it and exits, and is
never given another. A run that needs one at once spawns it and starts it straight away; the
compute worker's `SandboxPool` (`_warm`) spawns them ahead of need.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from orchestrator.errors import CalculationLaunchError
from workers.calculations._sandbox import View, sandboxed_argv


def popen(
    command: list[str], workdir: Path, env: Mapping[str, str], pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    # Not a shell, and the argv comes from a Calculation, never from the user directly.
    return subprocess.Popen(  # noqa: S603
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=env,
        start_new_session=True,
        pass_fds=pass_fds,
    )


class Sandbox:
    """One bubblewrap sandbox showing `view`, spawned and waiting for the one job it will run.

    Spawned on the event loop's thread on purpose: fork+exec takes about a millisecond, and
    bwrap's PR_SET_PDEATHSIG fires when the *thread* that forked it ends, so spawning from a
    pooled worker thread would kill the sandbox when that thread retires.
    """

    def __init__(self, view: View, *, workdir: Path) -> None:
        self.view = view
        self.link = SandboxLink()
        job, self._job = os.pipe()
        try:
            command = sandboxed_argv(
                view,
                workdir=workdir,
                info_fd=self.link.info_fd,
                report_fd=self.link.report_fd,
                job_fd=job,
            )
            fds = (self.link.info_fd, self.link.report_fd, job)
            self.process = popen(command, workdir, {}, pass_fds=fds)
        except BaseException:
            self.link.close()
            os.close(self._job)
            raise
        finally:
            os.close(job)
        self.link.close_child_ends()

    def shows(self, *, readable: Sequence[Path], writable: Sequence[Path]) -> bool:
        """Whether a job reading `readable` and writing `writable` can run in this sandbox."""
        return all(self.view.shows(path) for path in readable) and all(
            self.view.shows(path, writable=True) for path in writable
        )

    @property
    def waiting(self) -> bool:
        """Not given its job yet, and still alive to take one."""
        return self._job >= 0 and self.process.poll() is None

    def start(self, job: bytes) -> None:
        """Hand the sandbox its job (`_sandbox.job_request`); it runs it, then exits. If it has
        ended already (bwrap could not make it), its output and exit status will say why."""
        if self._job < 0:
            raise CalculationLaunchError("a sandbox runs one job only, and this one had its job")
        try:
            view = memoryview(job)
            while view:
                view = view[os.write(self._job, view) :]
        except BrokenPipeError:
            pass
        finally:
            os.close(self._job)
            self._job = -1

    def discard(self) -> None:
        """End the sandbox unless its run has ended it (the runner reaps what it started)."""
        if self._job >= 0:
            os.close(self._job)  # EOF: a waiting supervisor exits
            self._job = -1
        if self.process.returncode is None:  # not reaped: its pid, so its group, is still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # bwrap; the sandbox dies with it
            self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        self.link.close()


class SandboxLink:
    """The worker's end of one bubblewrap launch: bwrap's info pipe, which names the sandbox's
    PID 1 (the supervisor), and the supervisor's report pipe, which says how the program ended."""

    def __init__(self) -> None:
        self._info, self.info_fd = os.pipe()
        self._report, self.report_fd = os.pipe()
        os.set_blocking(self._report, False)
        self._supervisor: int | None = None  # its pidfd, once known
        self.located = anyio.Event()

    def close_child_ends(self) -> None:
        """After the spawn: from now on only the child holds them (so EOF means it is gone)."""
        os.close(self.info_fd)
        os.close(self.report_fd)
        self.info_fd = self.report_fd = -1

    async def locate(self, bwrap_pid: int) -> None:
        """Open a pidfd on the supervisor, which bwrap names right after creating it."""
        try:
            info = b""
            while True:
                await anyio.wait_readable(self._info)
                if not (chunk := os.read(self._info, 4096)):
                    break
                info += chunk
            if info:
                self._supervisor = _pidfd_of_child(json.loads(info)["child-pid"], bwrap_pid)
        finally:
            self.located.set()

    def signal(self, sig: signal.Signals) -> bool:
        """Send `sig` to the supervisor; False if it is not known (bwrap failed before it)."""
        if self._supervisor is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._supervisor, sig)
        return True

    def report(self) -> tuple[int, float] | None:
        """The program's wait status and the CPU seconds of the run's processes, once bwrap has
        exited; None if the supervisor did not get to report (it was killed, or never started)."""
        try:
            report = os.read(self._report, 64)
        except BlockingIOError:
            return None
        if not report:
            return None
        status, cpu_seconds = report.split()
        return int(status), float(cpu_seconds)

    def close(self) -> None:
        for fd in (self._info, self.info_fd, self._report, self.report_fd, self._supervisor):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._info = self.info_fd = self._report = self.report_fd = -1
        self._supervisor = None


def _pidfd_of_child(pid: int, parent: int) -> int | None:
    """A pidfd on `pid` if it is still `parent`'s child: a pid is only a name until a pidfd holds
    it, and this one's process may have ended (and its number gone to another) meanwhile."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:  # after the pidfd: whichever process it is, it is the one held now
        parent_now = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:  # reaped meanwhile
        parent_now = None
    if parent_now == parent:
        return pidfd
    os.close(pidfd)
    return None
