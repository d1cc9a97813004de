"""The calculation sandbox: the bwrap argv, the start-up check, and a hostile calculation's escapes.

No server needed, only bwrap. The escapes run a hostile calculation through `run_calculation`, as
the compute worker does, from a worker process whose environment holds secrets; each is also
tried unsandboxed, where it succeeds, so the sandboxed refusals cannot pass by accident.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import ValidationError

from orchestrator.errors import CalculationLaunchError, ConfigurationError
from orchestrator.settings import ServiceSettings
from tests._processes import gone, new_marker, python
from workers.calculations import (
    RunOutcome,
    SandboxMode,
    SandboxPool,
    Workspace,
    check_sandbox,
    run_calculation,
)
from workers.calculations._launch import Sandbox
from workers.calculations._sandbox import (
    SANDBOX_UID,
    SCRIPTS_DIR,
    clean_environment,
    job_request,
    sandbox_view,
    sandboxed_argv,
)

SECRET = f"hunter2-{uuid.uuid4().hex}"
WORKER_SECRETS = {
    "PARJOBS_S3_SECRET_ACCESS_KEY": SECRET,
    "PARJOBS_KEY_PASSPHRASE": SECRET,
    "AWS_SECRET_ACCESS_KEY": SECRET,
}


async def keep_nothing(stream: str, line: str) -> None:
    """An `on_output` for runs whose outcome is all that matters."""


# --- the argv -------------------------------------------------------------------------------------


def build(tmp_path: Path) -> list[str]:
    workdir = tmp_path / "run"
    view = sandbox_view(
        memory_limit_bytes=1 << 28,
        writable=(workdir, workdir / "out"),
        readable=(tmp_path / "input",),
    )
    return sandboxed_argv(view, workdir=workdir, info_fd=11, report_fd=12, job_fd=13)


def options(argv: list[str]) -> list[str]:
    """bwrap's part of the argv (before the command)."""
    return argv[: argv.index("--")]


def binds(argv: list[str]) -> dict[str, str]:
    """Bound path -> "rw" or "ro" (everything is bound at its own path)."""
    found = {}
    bwrap = options(argv)
    for at, arg in enumerate(bwrap):
        if arg in ("--bind", "--ro-bind"):
            assert bwrap[at + 1] == bwrap[at + 2], "bound somewhere else than its own path"
            found[bwrap[at + 1]] = "rw" if arg == "--bind" else "ro"
    return found


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker runs as an ordinary user (uid 1000)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


def test_every_namespace_is_new_and_the_sandbox_dies_with_the_worker(
    tmp_path: Path, as_user: None
) -> None:
    bwrap = options(build(tmp_path))
    for flag in (
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
    ):
        assert flag in bwrap
    assert bwrap[bwrap.index("--cap-drop") + 1] == "ALL"
    assert "--cap-add" not in bwrap
    assert bwrap[bwrap.index("--uid") + 1] == bwrap[bwrap.index("--gid") + 1] == str(SANDBOX_UID)


def test_a_root_worker_hands_the_run_to_an_unprivileged_user(tmp_path: Path, as_root: None) -> None:
    argv = build(tmp_path)
    bwrap = options(argv)
    assert "--unshare-user" not in bwrap  # root's user namespace would map the run to uid 0
    added = [bwrap[at + 1] for at, arg in enumerate(bwrap) if arg == "--cap-add"]
    assert sorted(added) == ["CAP_DAC_OVERRIDE", "CAP_SETGID", "CAP_SETUID"]
    supervisor = argv[argv.index("--") + 6 :]  # after python -I -S -c <script>
    assert supervisor == ["12", "13", str(SANDBOX_UID)]  # report fd, job fd, the uid to become


def test_the_environment_is_only_the_run_s_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in WORKER_SECRETS.items():
        monkeypatch.setenv(name, value)
    argv = build(tmp_path)
    bwrap = options(argv)
    assert "--clearenv" in bwrap  # the supervisor starts with nothing, the job brings the rest
    assert "--setenv" not in bwrap
    workdir = tmp_path / "run"
    job = job_request(
        [sys.executable, "-I", "-u", str(SCRIPTS_DIR / "_builtin_sleep.py"), "1", str(workdir)],
        program=sys.executable,
        env=clean_environment(workdir, {"EXTRA": "yes"}),
        workdir=workdir,
        memory_limit_bytes=1 << 28,
        cpu_limit_s=7,
    )
    assert SECRET not in json.dumps(argv) + job.decode()
    given = json.loads(job)["env"]
    assert set(given) == {"PATH", "LANG", "HOME", "TMPDIR", "PWD", "PYTHONUNBUFFERED", "EXTRA"}
    assert (given["HOME"], given["TMPDIR"]) == (str(workdir), str(workdir / "tmp"))


def test_only_the_run_directories_are_writable_and_little_else_is_visible(
    tmp_path: Path,
) -> None:
    argv = build(tmp_path)
    bound = binds(argv)
    run = tmp_path / "run"
    assert {path for path, mode in bound.items() if mode == "rw"} == {str(run)}  # out/ is in it
    assert bound[str(tmp_path / "input")] == "ro"
    assert bound["/usr"] == bound[str(SCRIPTS_DIR)] == bound[sys.base_prefix] == "ro"
    assert not {"/", "/etc", "/root", "/home", "/work", "/var", "/proc"} & bound.keys()
    # Nothing else of the host's /tmp; the project's own code and interpreter may live there
    # (a checkout under /tmp), and are bound read-only.
    given = (str(run), str(tmp_path / "input"))
    own = (SCRIPTS_DIR, Path(sys.prefix), Path(sys.base_prefix))
    others = [path for path in bound if path not in given]
    assert not any(
        Path(path).is_relative_to("/tmp") and not any(Path(path).is_relative_to(o) for o in own)
        for path in others
    )
    assert all(bound[path] == "ro" for path in others)
    # Fresh ones instead: /proc of the sandbox's PID namespace, a /dev and /tmp of its own.
    bwrap = options(argv)
    assert bwrap[bwrap.index("--proc") + 1] == "/proc"
    assert bwrap[bwrap.index("--dev") + 1] == "/dev"
    tmpfs = [bwrap[at + 1] for at, arg in enumerate(bwrap) if arg == "--tmpfs"]
    assert tmpfs == ["/tmp", "/dev/shm"]
    assert bwrap[bwrap.index("--size") + 1] == str(1 << 28)  # at most the memory limit


def test_the_parents_of_what_is_bound_are_not_owner_only(tmp_path: Path) -> None:
    # bwrap makes missing parents 0700, which a handed-over run could not go through.
    bwrap = options(build(tmp_path))
    made = {bwrap[at + 1] for at, arg in enumerate(bwrap) if arg == "--dir"}
    assert {str(parent) for parent in tmp_path.parents[:-2]} <= made  # /tmp is a fresh tmpfs
    for at, arg in enumerate(bwrap):
        if arg == "--dir":
            assert bwrap[at - 2 : at] == ["--perms", "0755"]


def test_without_bwrap_the_launch_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CalculationLaunchError, match="apt-get install bubblewrap") as info:
        build(tmp_path)
    assert "PARJOBS_SANDBOX=none" in str(info.value)


# --- the mode and the start-up check ------------------------------------------------------------


def test_the_mode_is_bwrap_unless_the_operator_says_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PARJOBS_SANDBOX", raising=False)
    assert ServiceSettings().sandbox == "bwrap"
    monkeypatch.setenv("PARJOBS_SANDBOX", "none")
    assert ServiceSettings().sandbox == "none"
    monkeypatch.setenv("PARJOBS_SANDBOX", "off")
    with pytest.raises(ValidationError, match="'bwrap' or 'none'"):
        ServiceSettings()


async def test_the_check_passes_where_bwrap_works() -> None:
    await check_sandbox("bwrap")


async def test_the_check_refuses_without_bwrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match="apt-get install bubblewrap") as info:
        await check_sandbox("bwrap")
    assert "PARJOBS_SANDBOX=none" in str(info.value)


async def test_the_check_refuses_when_bwrap_cannot_make_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What bwrap says where user namespaces are not allowed.
    refusal = "bwrap: No permissions to creating new namespace"
    fake = tmp_path / "bwrap"
    fake.write_text(f"#!/bin/sh\necho '{refusal}' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(ConfigurationError, match=refusal) as info:
        await check_sandbox("bwrap")
    assert "PARJOBS_SANDBOX=none" in str(info.value)


async def test_unsandboxed_is_warned_about_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="parjobs.compute"):
        await check_sandbox("none")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "UNSANDBOXED" in record.getMessage()


# --- the escapes ---------------------------------------------------------------------------------

# A hostile calculation. argv: the worker's pid, the compute key file, a port listening on the
# host's 127.0.0.1, then paths to write. Prints what it got as JSON (of environments, the names).
_HOSTILE = """
    import json, os, socket, sys

    worker_pid, key_file, port, *targets = sys.argv[1:]
    report = {}

    def attempt(name, action):
        try:
            report[name] = ["done", action()]
        except OSError as exc:
            report[name] = ["refused", f"{type(exc).__name__}: {exc}"]

    def read(path):
        with open(path, "rb") as file:
            return file.read().decode(errors="replace")

    def names(environ_path):
        return [entry.split("=")[0] for entry in read(environ_path).split("\\0") if entry]

    def connect(port):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return "connected"

    def write(path):
        with open(path, "w") as file:
            file.write("escaped")
        return "written"

    attempt("worker environ", lambda: names(f"/proc/{worker_pid}/environ"))
    attempt("PID 1's environ", lambda: names("/proc/1/environ"))
    report["environment"] = dict(os.environ)
    attempt("broker", lambda: connect(5672))
    attempt("listener", lambda: connect(int(port)))
    attempt("key file", lambda: read(key_file))
    for target in targets:
        attempt(f"write {target}", lambda: write(target))
    report["pids"] = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    report["interfaces"] = [name for _, name in socket.if_nameindex()]
    print(json.dumps(report))
"""

# The compute worker's part: run the hostile calculation through the runner, as a job's. argv:
# sandbox mode, run directory, then the hostile calculation's argv after the worker's pid.
_WORKER = """
    import json, os, sys
    from pathlib import Path

    import anyio

    from workers.calculations import run_calculation

    mode, workdir, *argv = sys.argv[1:]
    said = []

    async def keep(stream, line):
        said.append(line)

    async def main():
        hostile = [sys.executable, "-c", argv[0], str(os.getpid()), *argv[1:]]
        outcome = await run_calculation(
            hostile, workdir=Path(workdir), time_limit_s=30, on_output=keep, sandbox=mode
        )
        print(json.dumps({"succeeded": outcome.succeeded, "said": said}))

    anyio.run(main)
"""


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on the host's loopback that accepts connections (the broker's stand-in)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


async def escape(
    mode: SandboxMode, tmp_path: Path, listener: int, targets: list[Path]
) -> tuple[dict[str, Any], str, int]:
    """(the hostile calculation's report, everything it printed, the worker's pid)."""
    key_file = tmp_path / "keys" / "compute.key"  # outside the run directory, like a real one
    key_file.parent.mkdir(exist_ok=True)
    key_file.write_text(SECRET)
    args = [str(key_file), str(listener), *map(str, targets)]
    argv = python(_WORKER, mode, str(tmp_path / f"run-{mode}"), python(_HOSTILE)[2], *args)
    async with await anyio.open_process(argv, env={**os.environ, **WORKER_SECRETS}) as worker:
        assert worker.stdout is not None
        printed = b"".join([chunk async for chunk in worker.stdout]).decode()
        await worker.wait()
    ran = json.loads(printed)
    assert ran["succeeded"], ran["said"]
    return json.loads(ran["said"][-1]), printed, worker.pid


def outcome_of(report: dict[str, Any], attempt: str) -> str:
    """ "done" or "refused"."""
    done_or_refused: str = report[attempt][0]
    return done_or_refused


async def test_unsandboxed_the_hostile_calculation_gets_everything(
    tmp_path: Path, listener: int
) -> None:
    # The control: the same calculation without the sandbox escapes every way it tries.
    outside = tmp_path / "outside.txt"
    report, _, worker = await escape("none", tmp_path, listener, [outside])
    done, names = report["worker environ"]
    assert done == "done"
    assert set(WORKER_SECRETS) <= set(names)
    assert outcome_of(report, "listener") == "done"
    assert (outcome_of(report, "key file"), SECRET in json.dumps(report["key file"])) == (
        "done",
        True,
    )
    assert outside.read_text() == "escaped"
    assert worker in report["pids"]


async def test_sandboxed_the_hostile_calculation_gets_nothing(
    tmp_path: Path, listener: int
) -> None:
    escapes = f"parjobs-escape-{uuid.uuid4().hex}"
    outside = tmp_path / "outside.txt"
    host_tmp = Path("/tmp", escapes)  # the sandbox's /tmp is its own: written there, not here
    worktree = Path(__file__).parent / escapes
    read_only = [
        Path(prefix, escapes) for prefix in sorted({sys.prefix, sys.base_prefix, str(SCRIPTS_DIR)})
    ]
    try:
        report, printed, worker = await escape(
            "bwrap", tmp_path, listener, [outside, host_tmp, worktree, *read_only]
        )
        # The worker's environment: not its /proc entry, not PID 1's, not passed down.
        assert outcome_of(report, "worker environ") == "refused"
        assert outcome_of(report, "PID 1's environ") == "refused"  # not dumpable
        assert not [name for name in report["environment"] if name.startswith(("PARJOBS_", "AWS_"))]
        assert SECRET not in printed
        # No network: neither the broker's port nor anything else on the host's loopback.
        assert outcome_of(report, "broker") == outcome_of(report, "listener") == "refused"
        assert report["interfaces"] == ["lo"]
        # Nothing outside the run directory: unreadable, and unwritable (or written elsewhere).
        assert outcome_of(report, "key file") == "refused"
        for written in (outside, host_tmp, worktree, *read_only):
            assert not written.exists(), f"{written} was written from the sandbox"
        for target in (outside, worktree, *read_only):
            assert outcome_of(report, f"write {target}") == "refused"
        # No other process: its PID 1 (the supervisor) and itself.
        assert report["pids"] == [1, 2]
        assert worker not in report["pids"]
    finally:
        for written in (host_tmp, worktree, *read_only):
            written.unlink(missing_ok=True)


async def test_the_calculation_has_no_capabilities_and_no_root_powers(tmp_path: Path) -> None:
    # A file only the worker's user may read, given to the run as an input.
    private = tmp_path / "private.txt"
    private.write_text(SECRET)
    private.chmod(0o600)
    code = """
        import json, os, sys
        status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines()
                      if line.startswith(("CapEff", "CapPrm", "NoNewPrivs")))
        try:
            private = open(sys.argv[1]).read()
        except PermissionError:
            private = "refused"
        print(json.dumps({"uid": os.getuid(), "status": status, "private": private}))
    """
    said: list[str] = []

    async def keep(stream: str, line: str) -> None:
        said.append(line)

    outcome = await run_calculation(
        python(code, str(private)),
        workdir=tmp_path / "run",
        inputs=[private],
        time_limit_s=10,
        on_output=keep,
        sandbox="bwrap",
    )
    assert outcome.succeeded, said
    seen = json.loads(said[-1])
    assert seen["uid"] == SANDBOX_UID
    assert seen["status"] == {"CapEff": "0" * 16, "CapPrm": "0" * 16, "NoNewPrivs": "1"}
    if os.geteuid() == 0:  # a root worker's file stays closed: the run is not root at all
        assert seen["private"] == "refused"


async def test_the_sandbox_ends_even_processes_that_left_the_session(tmp_path: Path) -> None:
    # Unsandboxed, a grandchild that calls setsid() outlives the run; the PID namespace ends
    # with its PID 1, and everything in it.
    escaper = """
        import os, subprocess, sys, time
        code = "import os, time; os.setsid(); time.sleep(30)"
        child = subprocess.Popen([sys.executable, "-c", code, sys.argv[1]])
        while os.getsid(child.pid) == os.getsid(0):  # exit only once it has left
            time.sleep(0.01)
    """
    marker = new_marker()
    outcome = await run_calculation(
        python(escaper, marker),
        workdir=tmp_path,
        time_limit_s=10,
        on_output=keep_nothing,
        sandbox="bwrap",
    )
    assert outcome.succeeded
    assert await gone(marker)


# --- sandboxes spawned ahead ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(size: int, memory_limit_bytes: int = 1 << 30) -> AsyncIterator[SandboxPool]:
    pool = SandboxPool("bwrap", size=size, memory_limit_bytes=memory_limit_bytes)
    async with anyio.create_task_group() as group:
        await group.start(pool.serve)
        yield pool
        group.cancel_scope.cancel()


async def run_in(space: Workspace, argv: list[str], **options: Any) -> tuple[RunOutcome, list[str]]:
    said: list[str] = []

    async def keep(stream: str, line: str) -> None:
        said.append(line)

    options.setdefault("time_limit_s", 10)
    outcome = await run_calculation(
        argv,
        workdir=space.workdir,
        output_dir=space.output_dir,
        inputs=[space.input_dir / "input"],
        on_output=keep,
        sandbox=space.sandbox,
        **options,
    )
    return outcome, said


def spawned_ahead(space: Workspace) -> Sandbox:
    assert isinstance(space.sandbox, Sandbox)
    return space.sandbox


async def test_a_sandbox_spawned_ahead_runs_one_job_only() -> None:
    async with served(1) as pool, pool.workspace() as space:
        sandbox = spawned_ahead(space)
        pid = sandbox.process.pid
        (space.input_dir / "input").write_text("mine")
        outcome, said = await run_in(space, python("print(open('../input/input').read())"))
        assert outcome.succeeded, said
        assert said == ["mine"]
        assert sandbox.process.returncode is not None  # it ran the job, was reaped: it is gone
        assert not Path(f"/proc/{pid}").exists()
        with pytest.raises(CalculationLaunchError, match="one job only"):
            await run_in(space, python("print('again')"))


async def test_one_job_cannot_see_another_s_files(listener: int) -> None:
    code = """
        import json, os, socket, sys
        report = {}
        for name in sys.argv[1:]:
            try:
                with open(name) as file:
                    report[name] = file.read()
            except OSError as exc:
                report[name] = type(exc).__name__
        try:
            socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=2).close()
            report["network"] = "connected"
        except OSError as exc:
            report["network"] = type(exc).__name__
        report["tmp"] = os.listdir("/tmp")
        print(json.dumps(report))
    """
    async with served(2) as pool, pool.workspace() as other, pool.workspace() as mine:
        theirs = [other.input_dir / "input", other.output_dir / "result", other.workdir / "notes"]
        for path in theirs:
            path.write_text(SECRET)
        (mine.input_dir / "input").write_text("mine")
        targets = [str(path) for path in (*theirs, mine.input_dir / "input")]
        outcome, said = await run_in(mine, python(code, *targets), env={"PORT": str(listener)})
        assert outcome.succeeded, said
        report = json.loads(said[-1])
        assert [report[str(path)] for path in theirs] == ["FileNotFoundError"] * 3
        assert report[str(mine.input_dir / "input")] == "mine"  # the control: its own is there
        assert report["network"] != "connected"
        # A fresh /tmp: its own dir, and the way to what the sandbox binds from the host (the
        # interpreter, the project) when those live under /tmp, as in a CI clone; no other job's.
        bound = (sys.prefix, sys.base_prefix, Path(__file__).resolve().parents[2])
        host = {Path(path).parts[2] for path in bound if Path(path).parts[1:2] == ("tmp",)}
        assert Path(mine.workdir).parts[2] in report["tmp"]
        assert set(report["tmp"]) <= {Path(mine.workdir).parts[2], *host}
        assert Path(other.workdir).parts[2] not in report["tmp"]
        # Its input is read-only to the run, as a per-run sandbox's inputs are.
        write = python("open(__import__('sys').argv[1], 'w').write('changed')", targets[0])
        refused, said = await run_in(other, write)
        assert not refused.succeeded
        assert "Read-only file system" in said[-1]
        assert theirs[0].read_text() == SECRET


async def test_the_limits_apply_in_a_sandbox_spawned_ahead() -> None:
    allocate = "x = bytearray(512 * 1024 * 1024); print('allocated')"
    async with served(2) as pool:
        async with pool.workspace() as space:
            started = time.monotonic()
            outcome, _ = await run_in(
                space, python("import time; time.sleep(30)"), time_limit_s=0.5
            )
            assert outcome.timed_out
            assert time.monotonic() - started < 5
        async with pool.workspace() as space:
            outcome, said = await run_in(space, python(allocate), memory_limit_bytes=256 << 20)
            assert outcome.memory_exceeded, said
            assert "allocated" not in said
        async with pool.workspace() as space:
            spin = "while True: pass"
            outcome, _ = await run_in(space, python(spin), time_limit_s=10, cpu_limit_s=1)
            assert outcome.signal == signal.SIGXCPU


async def test_the_pool_refills_and_never_hands_out_a_dead_sandbox() -> None:
    async with served(2) as pool:
        assert pool.spares == 2
        async with pool.workspace() as first:
            await anyio.lowlevel.checkpoint()  # the refill runs once the job awaits anything
            assert pool.spares == 2
            async with (
                pool.workspace() as second,
                pool.workspace() as third,
                pool.workspace() as fourth,  # none spare left: spawned on the spot
            ):
                assert pool.spares == 0
                spaces = (second, third, fourth)
                ran = [await run_in(space, python("print('ok')")) for space in spaces]
                assert [said for _, said in ran] == [["ok"]] * 3
            killed = spawned_ahead(first)
            os.killpg(killed.process.pid, signal.SIGKILL)
        for _ in range(100):
            if pool.spares == 2:
                break
            await anyio.sleep(0.01)
        assert pool.spares == 2
        spare = pool._spares[0][0]
        os.killpg(spare.process.pid, signal.SIGKILL)  # dies waiting: never given a job
        await anyio.sleep(0.1)
        async with pool.workspace() as space:
            assert space.sandbox is not spare
            _, said = await run_in(space, python("print('fresh')"))
            assert said == ["fresh"]


async def test_spares_end_and_leave_nothing_when_the_pool_stops() -> None:
    async with served(2) as pool:
        roots = [root for _, root in pool._spares]
        pids = [sandbox.process.pid for sandbox, _ in pool._spares]
    assert pool.spares == 0
    assert not any(root.exists() for root in roots)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


async def test_unsandboxed_the_pool_keeps_nothing_and_runs_as_before() -> None:
    pool = SandboxPool("none", size=2, memory_limit_bytes=1 << 30)
    async with anyio.create_task_group() as group:
        await group.start(pool.serve)
        assert pool.spares == 0
        async with pool.workspace() as space:
            assert space.sandbox == "none"
            (space.input_dir / "input").write_text("mine")
            outcome, said = await run_in(space, python("import os; print(os.getppid())"))
            assert outcome.succeeded, said
            assert said == [str(os.getpid())]  # the worker's own child: no sandbox between
        assert not space.input_dir.parent.exists()
        group.cancel_scope.cancel()
