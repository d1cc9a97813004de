"""What a calculation's child process gets: a clean environment, resource limits and a sandbox.

The operator's `PARJOBS_SANDBOX` chooses between two launches:

- `bwrap` (the default): bubblewrap gives the run its own PID, network, IPC, UTS and cgroup
  namespaces and a file system of its own: read-only, only what a run needs (the system's /usr,
  the loader's files of /etc, the interpreter, the built-in scripts, the program, the run's
  inputs); writable, only the run directory and the output directory; a fresh /tmp, /dev/shm, /dev
  and a /proc that shows the sandbox's processes only. No capabilities, no variable of the
  worker's environment. A worker running as root hands the run to an unprivileged user
  (`SANDBOX_UID`). The sandbox's PID 1 is the supervisor script below.
- `none`: explicitly unsandboxed, for machines without namespaces: a shim applies the limits and
  execs the program, which then has the worker's user and view of the machine.

Either way the limits are set by a tiny Python script in the child: it calls `setrlimit` on the
process that then `exec`s the real program, which inherits them. That avoids `preexec_fn`
(unsafe with threads) and the race of `prlimit(pid)` after spawn. Linux only (prctl, RLIMIT_AS
semantics, namespaces).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from orchestrator.errors import CalculationLaunchError

SandboxMode = Literal["bwrap", "none"]
"""`bwrap`: every run in a bubblewrap sandbox; `none`: explicitly unsandboxed."""

DEFAULT_MEMORY_LIMIT = 1 << 30
"""Address space a child may map (RLIMIT_AS): 1 GiB."""

SANDBOX_UID = 65534
"""Who a calculation runs as when the worker is root ("nobody"): a user namespace made by root
maps the sandbox to host uid 0, which still owns root's files, so root hands over a real uid."""

SCRIPTS_DIR = Path(__file__).parent
"""The built-in calculations' scripts, visible (read-only) in every sandbox."""

UNSANDBOXED_HINT = "set PARJOBS_SANDBOX=none to run calculations unsandboxed"
INSTALL_HINT = f"install bubblewrap (apt-get install bubblewrap), or {UNSANDBOXED_HINT}"

# The loader's files, and the alternatives Debian's commands are links through.
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime")
# Top-level directories that are links into /usr on merged-/usr systems, or real ones elsewhere.
_SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

# Shared by both launch scripts: the limits, set on the process that then becomes the program.
_LIMIT = """\
def limit(memory, cpu):
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
"""

# Unsandboxed. argv after -c: parent pid, memory bytes, CPU seconds, resolved program, then the
# child's argv. PR_SET_PDEATHSIG (1) = SIGKILL (9): the child dies with the worker instead of
# running on as an orphan nobody reads; the getppid check closes the race of the worker dying
# before the prctl.
_SHIM = (
    "import ctypes, os, resource, sys\n"
    + _LIMIT
    + """
parent, memory, cpu = (int(arg) for arg in sys.argv[1:4])
ctypes.CDLL(None).prctl(1, 9)
if os.getppid() != parent:
    os._exit(137)
limit(memory, cpu)
os.execv(sys.argv[4], sys.argv[5:])
"""
)

# The sandbox's PID 1 (bwrap --as-pid-1). argv after -c: report fd, job fd, uid to become (-1:
# stay). It can be spawned ahead of need (see `_warm`): it waits for its one job, a JSON object
# (`job_request`) read to EOF from the job fd, runs it and exits; EOF with nothing means "not
# needed" and it exits at once.
# - It runs the program as its child and, once that has exited, kills and reaps whatever is left,
#   then reports the program's wait status and the CPU seconds of everything it reaped (the run's
#   cost, without its own start) to the report fd: bwrap can only say 128 + signal.
# - Python scripts (`python -I -u script.py ...`, a path) run in the forked child itself: the
#   modules they use are imported here, ahead of the job, so no second interpreter starts. Any
#   other program is exec'd.
# - SIGTERM from the worker goes on to every process of the sandbox (a stop with a grace period);
#   SIGUSR1 kills them all. PID 1 gets no other signal: the kernel drops those it has no handler
#   for, so a program cannot kill it either.
# - The report fd doubles as a lifeline: POLLERR on it means the worker's end closed, that is
#   the worker died (even before bwrap's --die-with-parent was in place): everything ends. While
#   it waits, the job fd's EOF is the same sign.
# - PR_SET_DUMPABLE (4) = 0 keeps the program from reaching its descriptors through /proc/1/fd.
_SUPERVISOR = (
    "import ctypes, json, os, resource, select, signal, sys\n"
    + _LIMIT
    + """
report, job_fd, uid = (int(arg) for arg in sys.argv[1:4])

def to_all(sig):
    try:
        os.kill(-1, sig)  # every process of the sandbox but its PID 1
    except ProcessLookupError:
        pass

def inline(argv):
    script = argv[3]
    sys.argv = argv[3:]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # as -u: each line as it is printed
    main = sys.modules["__main__"] = type(sys)("__main__")
    main.__file__ = script
    try:
        with open(script, "rb") as source:
            exec(compile(source.read(), script, "exec"), main.__dict__)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 255)

def run(job):
    os.close(report)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    limit(job["memory"], job["cpu"])
    argv, program = job["argv"], job["program"]
    python = os.path.realpath(program) == os.path.realpath(sys.executable)
    if python and argv[1:3] == ["-I", "-u"] and len(argv) > 3 and argv[3][:1] != "-":
        inline(argv)  # a script's path; anything else (-c, -m) is for a real interpreter
    os.execv(program, argv)

signal.signal(signal.SIGTERM, lambda *_: to_all(signal.SIGTERM))
signal.signal(signal.SIGUSR1, lambda *_: to_all(signal.SIGKILL))
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
ctypes.CDLL(None).prctl(4, 0)
import argparse, collections, hashlib, math, pathlib, time  # what the built-in scripts import
with open(job_fd, "rb") as pipe:
    request = pipe.read()
if not request:
    os._exit(0)
job = json.loads(request)
program = os.fork()
if program == 0:
    try:
        run(job)
    except BaseException:
        import traceback
        traceback.print_exc()
    os._exit(127)
exited = os.pidfd_open(program)
watch = select.poll()
watch.register(exited, select.POLLIN)
watch.register(report, 0)
if exited not in dict(watch.poll()):
    to_all(signal.SIGKILL)
    os._exit(137)
to_all(signal.SIGKILL)
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == program:
        ended = status
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
os.write(report, b"%d %.6f" % (ended, usage.ru_utime + usage.ru_stime))
"""
)


def clean_environment(workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's whole environment: nothing of the worker's (its credentials live there).

    PATH is kept so operator-configured commands resolve as the operator expects; HOME, TMPDIR and
    PWD point into the run's own directory.
    """
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir / "tmp"),
        "PWD": str(workdir),  # bwrap sets it in the sandbox; the same either way
        "PYTHONUNBUFFERED": "1",  # Python children print progress as it happens
    }
    env.update(extra or {})
    return env


def resolve_program(program: str, env: Mapping[str, str]) -> str:
    """`program` found on `env`'s PATH now, so a missing one is a clear error here rather than
    a traceback from the child."""
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise CalculationLaunchError(
            f"program {program!r} not found on the calculation's PATH ({env.get('PATH', '')})"
        )
    return os.path.abspath(found)


def limited_argv(
    argv: Sequence[str], *, env: Mapping[str, str], memory_limit_bytes: int, cpu_limit_s: int
) -> list[str]:
    """Unsandboxed: `argv` wrapped in the shim that applies the limits."""
    program = resolve_program(argv[0], env)
    limits = (str(os.getpid()), str(memory_limit_bytes), str(cpu_limit_s))
    # -I -S: ignore PYTHON* variables and site-packages; the shim needs only the standard library.
    return [sys.executable, "-I", "-S", "-c", _SHIM, *limits, program, *argv]


def sandbox_user() -> int | None:
    """The uid a run is handed to (the worker is root), or None: it keeps the worker's."""
    return SANDBOX_UID if os.geteuid() == 0 else None


def hand_over(directories: Sequence[Path]) -> None:
    """Give the run's writable directories to the sandbox user (only when the worker is root)."""
    uid = sandbox_user()
    if uid is not None:
        for directory in directories:
            os.chown(directory, uid, uid)


def sandbox_view(
    *, memory_limit_bytes: int, writable: Sequence[Path], readable: Sequence[Path]
) -> View:
    """What one sandbox shows: the common view, plus `readable` (read-only) and `writable`."""
    view = copy.copy(_common_view(memory_limit_bytes))
    for path in readable:
        view.bind(path.absolute())
    for path in writable:
        view.bind(path.absolute(), writable=True)
    return view


def job_request(
    argv: Sequence[str],
    *,
    program: str,
    env: Mapping[str, str],
    workdir: Path,
    memory_limit_bytes: int,
    cpu_limit_s: int,
) -> bytes:
    """The one job a sandbox's supervisor reads: `argv` run as `program` in `workdir`, with
    exactly `env` and the limits."""
    job = {
        "argv": list(argv),
        "program": program,
        "env": dict(env),
        "cwd": str(workdir.absolute()),
        "memory": memory_limit_bytes,
        "cpu": cpu_limit_s,
    }
    return json.dumps(job).encode()


def sandboxed_argv(
    view: View, *, workdir: Path, info_fd: int, report_fd: int, job_fd: int
) -> list[str]:
    """A bubblewrap sandbox showing `view`, its supervisor as PID 1, waiting for its job.

    Everything is bound at its own path, so a job's paths mean the same inside. bwrap writes the
    host pid of the sandbox's PID 1 to `info_fd`; the supervisor reads its job from `job_fd` and
    writes how it ended to `report_fd`. All three must be passed to the child (`pass_fds`).
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise CalculationLaunchError(f"bwrap not found: {INSTALL_HINT}")
    uid = sandbox_user()
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    namespaces.append("--unshare-cgroup-try")
    if uid is None:  # an unprivileged worker: a user namespace, with no capabilities in it
        user = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        user += ["--cap-drop", "ALL"]
    else:  # root: only what it takes to enter the run directory (SANDBOX_UID's now) and to
        # become SANDBOX_UID; the supervisor loses them all when it does
        user = ["--cap-drop", "ALL"]
        for capability in ("CAP_DAC_OVERRIDE", "CAP_SETUID", "CAP_SETGID"):
            user += ["--cap-add", capability]
    supervisor = [str(report_fd), str(job_fd), str(-1 if uid is None else uid)]
    return [
        bwrap,
        *namespaces,
        *user,
        "--die-with-parent",  # bwrap and the sandbox die with the worker
        "--new-session",  # no way back to a terminal (TIOCSTI)
        "--as-pid-1",  # the supervisor, not bwrap's own init: see _SUPERVISOR
        "--clearenv",  # nothing of the worker's; the job brings the program's environment
        *view.args,
        "--chdir",
        str(workdir.absolute()),
        "--info-fd",
        str(info_fd),
        "--",
        sys.executable,
        "-I",
        "-S",
        "-c",
        _SUPERVISOR,
        *supervisor,
    ]


@functools.cache
def _common_view(tmp_bytes: int) -> View:
    """What every run sees: the system, a fresh /tmp, the interpreter, the built-in scripts. The
    same for every run of a worker, so made once (a few milliseconds of path lookups)."""
    view = View(tmp_bytes=tmp_bytes)
    for prefix in sorted({sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}):
        view.bind(Path(prefix))
    view.bind(SCRIPTS_DIR)
    return view


class View:
    """The sandbox's file system as bwrap arguments. Everything is bound at its own path, so the
    argv's paths mean the same inside; the parents bwrap would make owner-only are made 0755."""

    def __init__(self, *, tmp_bytes: int) -> None:
        self.args: list[str] = []
        self._binds: list[tuple[Path, Path, bool]] = []  # (path, its real path, writable)
        self._made: set[Path] = {Path("/proc"), Path("/dev")}  # directories the sandbox has
        self.bind(Path("/usr"))
        for name in _SYSTEM_DIRS:
            path = Path("/", name)
            if path.is_symlink():
                self.args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                self.bind(path)
        for name in _ETC:
            if (path := Path("/etc", name)).exists():
                self.bind(path)
        self.args += ["--proc", "/proc", "--dev", "/dev"]
        # Fresh, empty and the sandbox's own (nothing of the host's /tmp), in RAM: at most the
        # memory limit each.
        for tmp in (Path("/tmp"), Path("/dev/shm")):  # noqa: S108
            self.args += ["--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", str(tmp)]
            self._made.add(tmp)

    def __copy__(self) -> View:
        # What a bind changes: its lists and set (their items are immutable). A deep copy of
        # every Path took a couple of milliseconds of the worker's CPU per sandbox.
        view = object.__new__(View)
        view.args, view._binds, view._made = list(self.args), list(self._binds), set(self._made)
        return view

    def bind(self, path: Path, *, writable: bool = False) -> None:
        """Bind `path` (read-only unless `writable`) unless a bind already shows it as such."""
        if self._shown(path, writable):
            return
        for parent in reversed(path.parents[:-1]):  # outermost first, without "/"
            if parent not in self._made and not self._inside_a_bind(parent):
                self.args += ["--perms", "0755", "--dir", str(parent)]
                self._made.add(parent)
        self.args += ["--bind" if writable else "--ro-bind", str(path), str(path)]
        self._binds.append((path, path.resolve(), writable))

    def shows(self, path: Path, *, writable: bool = False) -> bool:
        """Whether `path` is visible (and writable, if asked) at its own path in the sandbox."""
        return self._shown(path.absolute(), writable)

    def _shown(self, path: Path, writable: bool) -> bool:
        # By its own path or, through links bound too (a venv's python), by where it leads.
        binds = [(bound, real) for bound, real, rw in self._binds if rw or not writable]
        if any(path.is_relative_to(bound) for bound, _ in binds):
            return True
        real = path.resolve()
        return any(real.is_relative_to(bound_real) for _, bound_real in binds)

    def _inside_a_bind(self, path: Path) -> bool:
        return any(path.is_relative_to(bound) for bound, _, _ in self._binds)
