"""What a calculation's child process gets: a clean environment and resource limits.

The limits are set by a tiny Python shim that the child starts as: it calls `setrlimit` on itself
and then `exec`s the real program, which inherits them. That avoids `preexec_fn` (unsafe with
threads) and the race of `prlimit(pid)` after spawn. Linux only (prctl, RLIMIT_AS semantics).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestrator.errors import CalculationLaunchError

DEFAULT_MEMORY_LIMIT = 1 << 30
"""Address space a child may map (RLIMIT_AS): 1 GiB."""

# argv after -c: parent pid, memory bytes, CPU seconds, resolved program, then the child's argv.
# PR_SET_PDEATHSIG (1) = SIGKILL (9): the child dies with the worker instead of running on as an
# orphan nobody reads; the getppid check closes the race of the worker dying before the prctl.
_SHIM = """\
import ctypes, os, resource, sys
parent, memory, cpu = (int(arg) for arg in sys.argv[1:4])
ctypes.CDLL(None).prctl(1, 9)
if os.getppid() != parent:
    os._exit(137)
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.execv(sys.argv[4], sys.argv[5:])
"""


def clean_environment(workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's whole environment: nothing of the worker's (its credentials live there).

    PATH is kept so operator-configured commands resolve as the operator expects; HOME and
    TMPDIR point into the run's own directory.
    """
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir / "tmp"),
        "PYTHONUNBUFFERED": "1",  # Python children print progress as it happens
    }
    env.update(extra or {})
    return env


def limited_argv(
    argv: Sequence[str], *, env: Mapping[str, str], memory_limit_bytes: int, cpu_limit_s: int
) -> list[str]:
    """`argv` wrapped in the shim that applies the limits; the program is resolved on `env`'s PATH
    now, so a missing one is a clear error here rather than a traceback from the child."""
    program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if program is None:
        raise CalculationLaunchError(
            f"program {argv[0]!r} not found on the calculation's PATH ({env.get('PATH', '')})"
        )
    limits = (str(os.getpid()), str(memory_limit_bytes), str(cpu_limit_s))
    # -I -S: ignore PYTHON* variables and site-packages; the shim needs only the standard library.
    return [sys.executable, "-I", "-S", "-c", _SHIM, *limits, os.path.abspath(program), *argv]
