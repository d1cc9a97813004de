"""At a compute worker's start: can calculations run the way the operator chose?

With `PARJOBS_SANDBOX=bwrap` one trivial calculation runs through the sandbox, exactly as a job's
would; if it cannot, the worker refuses to start and says how to fix it. With `none` the worker
starts, and says loudly, every time, what that means.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from orchestrator.errors import CalculationLaunchError, ConfigurationError
from workers.calculations._runner import Stream, run_calculation
from workers.calculations._sandbox import UNSANDBOXED_HINT, SandboxMode

log = logging.getLogger("parjobs.compute")

UNSANDBOXED_WARNING = (
    "PARJOBS_SANDBOX=none: calculations run UNSANDBOXED, as this worker's user with its view of "
    "the machine: they can read its environment and files (S3 credentials, the key file and its "
    "passphrase), reach the network and the broker, and see and signal its processes. Run "
    "untrusted calculations only with PARJOBS_SANDBOX=bwrap."
)
_TIME_LIMIT_S = 30.0  # a cold start on a loaded machine takes well under a second


async def check_sandbox(mode: SandboxMode) -> None:
    """Raise ConfigurationError, naming the fix, if calculations cannot be sandboxed; with mode
    `none`, log the warning that they are not."""
    if mode == "none":
        log.warning(UNSANDBOXED_WARNING)
        return
    said: list[str] = []

    async def keep(stream: Stream, line: str) -> None:
        said.append(line)

    with tempfile.TemporaryDirectory(prefix="parjobs-sandbox-check-") as scratch:
        try:
            outcome = await run_calculation(
                [sys.executable, "-I", "-S", "-c", "pass"],
                workdir=Path(scratch),
                time_limit_s=_TIME_LIMIT_S,
                on_output=keep,
                sandbox=mode,
            )
        except CalculationLaunchError as exc:
            raise ConfigurationError(f"calculations cannot be sandboxed: {exc}") from None
    if not outcome.succeeded:
        raise ConfigurationError(
            f"calculations cannot be sandboxed: a trivial run in bwrap {outcome.reason}"
            f" ({' / '.join(said[-3:]) or 'no output'}). Fix: bwrap needs namespaces: run the "
            "worker as root, or allow unprivileged user namespaces (a container needs a seccomp "
            f"profile that permits them), or {UNSANDBOXED_HINT}"
        )
