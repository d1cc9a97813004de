"""Calculations a compute worker can run, and the runner that runs them in a child process.

A `Calculation` validates its parameters and describes its run as an argv; `run_calculation`
runs that argv in a sandbox, with limits, a clean environment and streamed output; a `SandboxPool`
keeps single-use sandboxes spawned ahead, so a run does not wait for one to start. Built-ins and
third-party calculations are found through the `parjobs.calculations` entry-point group.
"""

from orchestrator.core.calculations import (
    ENTRY_POINT_GROUP,
    Calculation,
    CalculationParams,
    CalculationRegistry,
    Invocation,
    Price,
)
from workers.calculations._command import Command, CommandParams, CommandSettings
from workers.calculations._preflight import UNSANDBOXED_WARNING, check_sandbox
from workers.calculations._runner import (
    DEFAULT_STOP_GRACE_S,
    OutputCallback,
    RunHandle,
    RunOutcome,
    Stream,
    run_calculation,
)
from workers.calculations._sandbox import DEFAULT_MEMORY_LIMIT, SandboxMode
from workers.calculations._warm import SandboxPool, Workspace

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_STOP_GRACE_S",
    "ENTRY_POINT_GROUP",
    "UNSANDBOXED_WARNING",
    "Calculation",
    "CalculationParams",
    "CalculationRegistry",
    "Command",
    "CommandParams",
    "CommandSettings",
    "Invocation",
    "OutputCallback",
    "Price",
    "RunHandle",
    "RunOutcome",
    "SandboxMode",
    "SandboxPool",
    "Stream",
    "Workspace",
    "check_sandbox",
    "run_calculation",
]
