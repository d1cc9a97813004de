"""The runner and the built-ins, with real child processes (each test well under three seconds).

Every test runs twice: in the bubblewrap sandbox and unsandboxed (`PARJOBS_SANDBOX=none`).
Processes are found by a marker in their command line (`tests._processes`), which works whatever
PID namespace they are in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import CalculationLaunchError
from tests._processes import gone, marked_pids, new_marker, python, running
from workers.calculations import (
    CalculationRegistry,
    Command,
    CommandSettings,
    RunHandle,
    RunOutcome,
    SandboxMode,
    SandboxPool,
    Stream,
    Workspace,
    run_calculation,
)
from workers.calculations._launch import Sandbox

MiB = 1 << 20


class Lines:
    """An `on_output` callback that keeps every line, with the time it arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[Stream, str]] = []
        self.arrived: list[float] = []

    async def __call__(self, stream: Stream, line: str) -> None:
        self.seen.append((stream, line))
        self.arrived.append(time.monotonic())

    def of(self, stream: Stream) -> list[str]:
        return [line for source, line in self.seen if source == stream]


@pytest.fixture(params=["bwrap", "none"])
def sandbox(request: pytest.FixtureRequest) -> SandboxMode:
    mode: SandboxMode = request.param
    return mode


async def run(argv: list[str], workdir: Path, lines: Lines, **options: object) -> RunOutcome:
    options.setdefault("time_limit_s", 5)
    return await run_calculation(argv, workdir=workdir, on_output=lines, **options)  # type: ignore[arg-type]


async def run_builtin(
    tmp_path: Path, name: str, params: dict[str, object], data: bytes, **options: object
) -> tuple[RunOutcome, Lines, Path]:
    registry = CalculationRegistry()
    registry.register(CalculationRegistry.from_entry_points().get(name))
    input_path = tmp_path / "input"
    input_path.write_bytes(data)
    workdir = tmp_path / "run"
    invocation = registry.invocation(
        name, params, input_path=input_path, output_dir=workdir / "output"
    )
    lines = Lines()
    outcome = await run(
        list(invocation.argv), workdir, lines, env=invocation.env, inputs=[input_path], **options
    )
    return outcome, lines, workdir / "output"


# --- the built-ins ------------------------------------------------------------------------------


async def test_checksum(tmp_path: Path, sandbox: SandboxMode) -> None:
    data = b"hello\nworld\n\xff\x00last line"
    outcome, lines, output = await run_builtin(
        tmp_path, "checksum", {}, data, memory_limit_bytes=256 * MiB, sandbox=sandbox
    )
    assert outcome.succeeded, lines.seen
    assert outcome.outputs == ("summary.json",)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sha256"] == hashlib.sha256(data).hexdigest()
    assert summary["size_bytes"] == len(data)
    assert summary["lines"] == 3
    assert summary["bytes"]["distinct"] == len(set(data))
    assert summary["bytes"]["most_common"][0] == {"byte": ord("l"), "char": "l", "count": 5}
    assert lines.of("stdout")[-1].startswith("checksum: done")


async def test_csv_summary(tmp_path: Path, sandbox: SandboxMode) -> None:
    data = b"city;population;note\nOslo;700000;capital\nBergen;290000;\nTromso;77000;north;x\n"
    outcome, _, output = await run_builtin(
        tmp_path,
        "csv-summary",
        {"delimiter": ";"},
        data,
        memory_limit_bytes=256 * MiB,
        sandbox=sandbox,
    )
    assert outcome.succeeded
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["rows"], summary["ragged_rows"]) == (3, 1)
    city, population, note, extra = summary["columns"]
    assert (city["name"], city["type"], city["distinct"]) == ("city", "text", 3)
    assert population["type"] == "numeric"
    assert population["numeric"]["min"] == 77000
    assert population["numeric"]["max"] == 700000
    assert population["numeric"]["mean"] == pytest.approx(355666.667)
    assert (note["filled"], note["empty"]) == (2, 1)
    assert (extra["name"], extra["filled"], extra["empty"]) == ("column_4", 1, 2)


async def test_sleep_reports_progress_and_its_exit_code(
    tmp_path: Path, sandbox: SandboxMode
) -> None:
    outcome, lines, output = await run_builtin(
        tmp_path, "sleep", {"seconds": 0.2, "exit_code": 3}, b"", sandbox=sandbox
    )
    assert (outcome.exit_code, outcome.succeeded) == (3, False)
    assert outcome.reason == "exited with code 3"
    assert lines.of("stdout") == ["sleep: 0/0.2 s", "sleep: 0.2/0.2 s"]
    assert json.loads((output / "summary.json").read_text())["seconds"] == 0.2


async def test_command_runs_the_allow_listed_program(tmp_path: Path, sandbox: SandboxMode) -> None:
    command = Command(
        CommandSettings(
            commands={
                "copy": ("cp", "{input}", "{output_dir}/{name}"),
                "count": ("wc", "-l", "{input}"),
            }
        )
    )
    (tmp_path / "input").write_text("a\nb\nc\n")
    paths = {"input_path": tmp_path / "input", "output_dir": tmp_path / "run" / "output"}
    lines = Lines()

    copy = command.invocation(
        command.parse_params({"command": "copy", "args": {"name": "copy.txt"}}), **paths
    )
    inputs = [paths["input_path"]]
    outcome = await run(list(copy.argv), tmp_path / "run", lines, inputs=inputs, sandbox=sandbox)
    assert outcome.outputs == ("copy.txt",)
    assert (paths["output_dir"] / "copy.txt").read_text() == "a\nb\nc\n"

    count = command.invocation(command.parse_params({"command": "count"}), **paths)
    outcome = await run(list(count.argv), tmp_path / "run", lines, inputs=inputs, sandbox=sandbox)
    assert outcome.succeeded
    assert lines.of("stdout") == [f"3 {tmp_path / 'input'}"]


# --- limits -------------------------------------------------------------------------------------


async def test_time_limit_kills_and_reports_timed_out(tmp_path: Path, sandbox: SandboxMode) -> None:
    lines = Lines()
    outcome = await run(python("import time; print('up'); time.sleep(30)"), tmp_path, lines,
                        time_limit_s=0.5, sandbox=sandbox)  # fmt: skip
    assert outcome.timed_out
    assert (outcome.exit_code, outcome.signal) == (None, signal.SIGKILL)
    assert 0.5 <= outcome.wall_seconds < 2
    assert outcome.reason is not None
    assert outcome.reason.startswith("time limit reached")
    assert lines.of("stdout") == ["up"]


async def test_memory_limit_is_enforced_and_reported(tmp_path: Path, sandbox: SandboxMode) -> None:
    lines = Lines()
    code = "small = bytearray(64 * 1024**2); print('64 MiB ok'); big = bytearray(2 * 1024**3)"
    outcome = await run(
        python(code), tmp_path, lines, memory_limit_bytes=256 * MiB, sandbox=sandbox
    )
    assert outcome.exit_code == 1
    assert outcome.memory_exceeded
    assert outcome.reason == "memory limit reached"
    assert lines.of("stdout") == ["64 MiB ok"]
    assert lines.of("stderr")[-1] == "MemoryError"


async def test_cpu_limit_is_enforced(tmp_path: Path, sandbox: SandboxMode) -> None:
    # A wall-clock limit far off: on a loaded machine one CPU second can take several.
    outcome = await run(
        python("while True: pass"),
        tmp_path,
        Lines(),
        cpu_limit_s=1,
        time_limit_s=30,
        sandbox=sandbox,
    )
    assert outcome.signal == signal.SIGXCPU
    assert outcome.cpu_seconds >= 0.9
    assert outcome.reason is not None
    assert outcome.reason.startswith("CPU time limit")


async def test_cpu_seconds_are_measured(tmp_path: Path, sandbox: SandboxMode) -> None:
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    outcome = await run(python(busy), tmp_path, Lines(), sandbox=sandbox)
    assert outcome.succeeded
    assert 0.3 <= outcome.cpu_seconds < 1.5
    assert outcome.wall_seconds >= 0.3


# --- stop, cancellation, leftovers ---------------------------------------------------------------

# argv: a marker, which the grandchild carries too.
_PARENT_OF_A_SLEEPER = """
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]])
    print("started", flush=True)
    time.sleep(60)
"""


async def test_stop_kills_the_whole_process_group(tmp_path: Path, sandbox: SandboxMode) -> None:
    handle = RunHandle()
    marker = new_marker()

    async def on_output(stream: Stream, line: str) -> None:
        await handle.stop(grace_s=1)  # from inside the run's own callback, as a worker might

    outcome = await run_calculation(
        python(_PARENT_OF_A_SLEEPER, marker),
        workdir=tmp_path,
        time_limit_s=5,
        on_output=on_output,
        handle=handle,
        sandbox=sandbox,
    )
    assert outcome.stopped
    assert outcome.signal == signal.SIGTERM
    assert outcome.reason == "stopped on request"
    assert outcome.wall_seconds < 2
    assert await gone(marker)


async def test_stop_escalates_to_sigkill_after_the_grace_period(
    tmp_path: Path, sandbox: SandboxMode
) -> None:
    handle = RunHandle()
    stubborn = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM")
        time.sleep(30)
    """

    async def stop_when_ready(stream: Stream, line: str) -> None:
        await handle.stop(grace_s=0.3)

    outcome = await run_calculation(
        python(stubborn),
        workdir=tmp_path,
        time_limit_s=5,
        on_output=stop_when_ready,
        handle=handle,
        sandbox=sandbox,
    )
    assert (outcome.stopped, outcome.signal) == (True, signal.SIGKILL)
    assert 0.3 <= outcome.wall_seconds < 2


async def test_a_killed_run_is_charged_for_the_cpu_time_it_used(
    tmp_path: Path, sandbox: SandboxMode
) -> None:
    # Killed, not ended by itself: sandboxed, the supervisor must still reap it to count it.
    handle = RunHandle()
    stubborn_and_busy = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        end = time.process_time() + 0.4
        while time.process_time() < end:
            pass
        print("worked 0.4 CPU seconds", flush=True)
        time.sleep(30)
    """

    async def stop(stream: Stream, line: str) -> None:
        await handle.stop(grace_s=0.1)

    outcome = await run_calculation(
        python(stubborn_and_busy),
        workdir=tmp_path,
        time_limit_s=10,
        on_output=stop,
        handle=handle,
        sandbox=sandbox,
    )
    assert (outcome.stopped, outcome.signal) == (True, signal.SIGKILL)
    assert outcome.cpu_seconds >= 0.4


async def test_processes_left_behind_after_a_normal_exit_are_killed(
    tmp_path: Path, sandbox: SandboxMode
) -> None:
    leaver = """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[1]])
    """
    marker = new_marker()
    outcome = await run(python(leaver, marker), tmp_path, Lines(), sandbox=sandbox)
    assert outcome.succeeded
    assert outcome.wall_seconds < 2  # not waiting for the leftover to close the pipes
    assert await gone(marker)


async def test_cancelling_the_caller_kills_the_child(tmp_path: Path, sandbox: SandboxMode) -> None:
    lines, marker = Lines(), new_marker()
    with anyio.move_on_after(1):
        code = "import time; print('up'); time.sleep(30)"
        await run(python(code, marker), tmp_path, lines, sandbox=sandbox)
    assert lines.of("stdout") == ["up"]
    assert await gone(marker)


async def test_a_failing_output_callback_ends_the_run(tmp_path: Path, sandbox: SandboxMode) -> None:
    async def broken(stream: Stream, line: str) -> None:
        raise RuntimeError(f"broker down while sending {line}")

    marker = new_marker()
    with pytest.raises(ExceptionGroup) as info:
        await run_calculation(
            python("import time; print('up'); time.sleep(30)", marker),
            workdir=tmp_path,
            time_limit_s=5,
            on_output=broken,
            sandbox=sandbox,
        )
    assert info.group_contains(RuntimeError, match="broker down while sending up")
    assert await gone(marker)


# argv: the run directory, the sandbox mode, a marker for the calculation's command line.
_WORKER = """
    import sys
    from pathlib import Path

    import anyio

    from workers.calculations import run_calculation


    async def show(stream, line):
        print(line, flush=True)


    anyio.run(lambda: run_calculation(
        [sys.executable, "-c", "import time; print('up'); time.sleep(30)", sys.argv[3]],
        workdir=Path(sys.argv[1]), time_limit_s=30, on_output=show, sandbox=sys.argv[2],
    ))
"""


async def test_the_child_dies_with_a_killed_worker(tmp_path: Path, sandbox: SandboxMode) -> None:
    marker = new_marker()
    # The marker reaches the worker only through a variable (the worker's command line must not
    # hold it): sys.argv[3] is read from the environment below.
    worker_code = textwrap.dedent(_WORKER).replace("sys.argv[3]", "os.environ['MARKER']")
    worker_code = "import os\n" + worker_code
    argv = [sys.executable, "-c", worker_code, str(tmp_path), sandbox]
    env = {**os.environ, "MARKER": marker}
    async with await anyio.open_process(argv, env=env) as worker:
        assert worker.stdout is not None
        assert (await worker.stdout.receive()).strip() == b"up"
        assert running(marker)
        worker.kill()
        assert await gone(marker)


# --- output -------------------------------------------------------------------------------------


async def test_lines_arrive_while_the_child_runs(tmp_path: Path, sandbox: SandboxMode) -> None:
    # The child waits for a file the callback creates on seeing "ready": it would hang until the
    # time limit if lines were only delivered at exit.
    waits = """
        import os, time
        print("ready")
        while not os.path.exists("go"):
            time.sleep(0.01)
        print("done")
    """

    async def on_output(stream: Stream, line: str) -> None:
        await lines(stream, line)
        if line == "ready":
            (tmp_path / "go").touch()

    lines = Lines()
    outcome = await run_calculation(
        python(waits), workdir=tmp_path, time_limit_s=2, on_output=on_output, sandbox=sandbox
    )
    assert not outcome.timed_out
    assert lines.of("stdout") == ["ready", "done"]


async def test_lines_keep_their_order_and_stream(tmp_path: Path, sandbox: SandboxMode) -> None:
    code = """
        import sys
        for n in range(500):
            print(n)
        print("oops", file=sys.stderr)
        sys.stdout.write("no newline at the end")
    """
    lines = Lines()
    assert (await run(python(code), tmp_path, lines, sandbox=sandbox)).succeeded
    assert lines.of("stdout") == [str(n) for n in range(500)] + ["no newline at the end"]
    assert lines.of("stderr") == ["oops"]


@pytest.mark.parametrize("length", [100_000, 200_000, 300_000])
async def test_very_long_lines_come_in_pieces(
    tmp_path: Path, length: int, sandbox: SandboxMode
) -> None:
    lines = Lines()
    code = f"import sys; sys.stdout.write('x' * {length} + '\\n\\ny\\r\\n')"
    assert (await run(python(code), tmp_path, lines, sandbox=sandbox)).succeeded
    *pieces, empty, last = lines.of("stdout")
    assert max(len(piece) for piece in pieces) <= 64 * 1024
    assert "".join(pieces) == "x" * length
    assert (empty, last) == ("", "y")


async def test_every_line_is_delivered_even_to_a_slow_callback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxMode
) -> None:
    monkeypatch.setattr("workers.calculations._runner._DRAIN_S", 0.1)
    seen: list[str] = []

    async def slow(stream: Stream, line: str) -> None:
        await anyio.sleep(0.001)
        seen.append(line)

    code = "for n in range(500): print(n)"  # exits at once, leaving its lines in the pipe
    outcome = await run_calculation(
        python(code), workdir=tmp_path, time_limit_s=5, on_output=slow, sandbox=sandbox
    )
    assert outcome.succeeded
    assert seen == [str(n) for n in range(500)]


async def test_a_process_that_left_the_session_does_not_hold_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxMode
) -> None:
    # A grandchild that calls setsid() escapes the group kill (unsandboxed, only cgroups would
    # catch it); it keeps our pipes open, and the run gives up waiting for their end after the
    # drain time. (In the sandbox the end of the PID namespace takes it: see test_sandbox.)
    monkeypatch.setattr("workers.calculations._runner._DRAIN_S", 0.5)
    escaper = """
        import os, subprocess, sys, time
        code = "import os, time; os.setsid(); print('left', flush=True); time.sleep(10)"
        child = subprocess.Popen([sys.executable, "-c", code, sys.argv[1]])
        while os.getsid(child.pid) == os.getsid(0):  # exit only once it has left
            time.sleep(0.01)
    """
    lines, marker = Lines(), new_marker()
    started = time.monotonic()
    outcome = await run(python(escaper, marker), tmp_path, lines, sandbox=sandbox)
    try:
        assert lines.of("stdout") == ["left"]
        assert outcome.succeeded
        assert time.monotonic() - started < 2
    finally:
        for pid in marked_pids(marker):
            os.kill(pid, signal.SIGKILL)


async def test_outputs_are_regular_files_only(tmp_path: Path, sandbox: SandboxMode) -> None:
    code = """
        import os
        os.makedirs("output/sub")
        open("output/a.txt", "w").write("a")
        open("output/sub/b.txt", "w").write("b")
        os.symlink("/etc/passwd", "output/passwd")
        os.symlink("/etc", "output/etc")
    """
    outcome = await run(python(code), tmp_path, Lines(), sandbox=sandbox)
    assert outcome.outputs == ("a.txt", "sub/b.txt")


# --- environment and working directory ----------------------------------------------------------


async def test_environment_is_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxMode
) -> None:
    monkeypatch.setenv("PARJOBS_S3_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    lines = Lines()
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    extra = {"EXTRA": "given by the caller"}
    outcome = await run(python(code), tmp_path, lines, env=extra, sandbox=sandbox)
    assert outcome.succeeded
    environment = json.loads(lines.of("stdout")[0])
    assert "hunter2" not in json.dumps(environment)
    assert environment == {
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path / "tmp"),
        "PWD": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "EXTRA": "given by the caller",
    }


async def test_working_directory_is_the_given_one(tmp_path: Path, sandbox: SandboxMode) -> None:
    lines = Lines()
    workdir = tmp_path / "jobs" / "42"
    code = "import os, tempfile; print(os.getcwd()); print(tempfile.gettempdir())"
    outcome = await run(python(code), workdir, lines, sandbox=sandbox)
    assert outcome.succeeded
    assert lines.of("stdout") == [str(workdir), str(workdir / "tmp")]
    assert (workdir / "output").is_dir()


async def test_a_missing_program_is_a_clear_error(tmp_path: Path, sandbox: SandboxMode) -> None:
    handle = RunHandle()
    with pytest.raises(CalculationLaunchError, match="'no-such-program' not found"):
        await run_calculation(
            ["no-such-program"],
            workdir=tmp_path,
            time_limit_s=1,
            on_output=Lines(),
            handle=handle,
            sandbox=sandbox,
        )
    with anyio.fail_after(1):
        await handle.stop()  # returns: the run is over, even though it never started


# --- sandboxes spawned ahead (the pool itself: test_sandbox.py) ---------------------------------


@contextlib.asynccontextmanager
async def spare_workspace() -> AsyncIterator[Workspace]:
    """A workspace of a sandbox spawned ahead, and given time to be ready."""
    pool = SandboxPool("bwrap", size=1, memory_limit_bytes=256 * MiB)
    async with anyio.create_task_group() as group:
        await group.start(pool.serve)
        async with pool.workspace() as space:
            yield space
        group.cancel_scope.cancel()


async def test_a_built_in_runs_the_same_in_a_sandbox_spawned_ahead() -> None:
    data = b"hello\nworld\n"
    registry = CalculationRegistry.from_entry_points()
    async with spare_workspace() as space:
        input_path = space.input_dir / "input"
        input_path.write_bytes(data)
        invocation = registry.invocation(
            "checksum", {}, input_path=input_path, output_dir=space.output_dir
        )
        lines = Lines()
        outcome = await run(
            list(invocation.argv),
            space.workdir,
            lines,
            output_dir=space.output_dir,
            inputs=[input_path],
            sandbox=space.sandbox,
        )
        assert outcome.succeeded, lines.seen
        assert outcome.outputs == ("summary.json",)
        summary = json.loads((space.output_dir / "summary.json").read_text())
        assert summary["sha256"] == hashlib.sha256(data).hexdigest()
        assert isinstance(space.sandbox, Sandbox)
        assert space.sandbox.process.returncode == 0  # the spare ran it (and was reaped)


_SCRIPT = """\
import os, sys, time
print(open("/proc/self/cmdline", "rb").read().split(b"\\0")[1:3])
print(sys.argv, os.getcwd(), os.environ["HOME"])
time.sleep(0.5)
print("later")
if sys.argv[1] == "fail":
    raise RuntimeError("as asked")
sys.exit(int(sys.argv[1]))
"""


async def test_a_python_script_runs_in_the_supervisor_s_child_as_if_started_on_its_own() -> None:
    # `python -I -u script` (how the built-ins run) starts no second interpreter: the supervisor
    # imported what they need ahead and runs the script in its forked child.
    for ending, expected in (("3", 3), ("fail", 1)):
        async with spare_workspace() as space:
            script = space.input_dir / "script.py"
            script.write_text(_SCRIPT)
            argv = [sys.executable, "-I", "-u", str(script), ending]
            lines = Lines()
            outcome = await run(argv, space.workdir, lines, inputs=[script], sandbox=space.sandbox)
            assert outcome.exit_code == expected, lines.seen
            cmdline, args, later = lines.of("stdout")
            assert cmdline == "[b'-I', b'-S']"  # the supervisor's flags: no new interpreter
            assert args == f"{[str(script), ending]} {space.workdir} {space.workdir}"
            assert later == "later"
            assert lines.arrived[1] < lines.arrived[2] - 0.4  # each line as it is printed
            if ending == "fail":
                assert lines.of("stderr")[-1] == "RuntimeError: as asked"


async def test_a_run_the_spare_cannot_show_gets_a_sandbox_of_its_own(tmp_path: Path) -> None:
    # An input outside the spare's scratch directory: a spawned sandbox cannot bind it now.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("outside")
    async with spare_workspace() as space:
        assert isinstance(space.sandbox, Sandbox)
        lines = Lines()
        code = "import sys; print(open(sys.argv[1]).read())"
        outcome = await run(
            python(code, str(elsewhere)),
            space.workdir,
            lines,
            inputs=[elsewhere],
            sandbox=space.sandbox,
        )
        assert outcome.succeeded, lines.seen
        assert lines.of("stdout") == ["outside"]
        assert space.sandbox.waiting  # not used: the run had one of its own
