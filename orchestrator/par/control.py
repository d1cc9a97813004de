"""The seam between a PAR holder and the service that issued it.

Closing a PAR, or asking whether it is still open, needs the issuer. In-process (the demo, the
services themselves) that is the `PARRegistry` directly; across processes it is a client that
reaches the issuer over the broker. Both satisfy `PARControl`, so the PAR logic never knows which.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

from orchestrator.errors import ConfigurationError
from schemas.events import JobSheetState, JobState
from schemas.messages import RunAction, RunReply
from schemas.par import PARState


@runtime_checkable
class PARControl(Protocol):
    async def close(self, uid: str, proof: str) -> None:
        """Close PAR `uid` for whoever proves possession with `proof` (the capability checksum)."""

    async def state(self, uid: str) -> PARState:
        """Whether PAR `uid` is open, closed or expired, as its issuer sees it."""


@runtime_checkable
class RunService(PARControl, Protocol):
    """A `PARControl` that also reaches the compute service, to act on calculation PARs, and
    follows a job's events to learn when it has ended."""

    async def run_command(self, action: RunAction, job_uid: str, run_url: str) -> RunReply:
        """Send `action` for job `job_uid`'s run, which `run_url` grants; compute's answer."""

    async def wait_until(
        self,
        job_uid: str,
        states: frozenset[JobState],
        *,
        timeout: float = 120,  # noqa: ASYNC109 - a deadline for the whole wait
    ) -> JobSheetState:
        """The job's state once it is in one of `states` or has ended (TimeoutError if not)."""


_current: ContextVar[PARControl | None] = ContextVar("parjobs_par_control", default=None)


@contextmanager
def use_par_control(control: PARControl) -> Iterator[PARControl]:
    """Make `control` the default for `PAR.close` / `PAR.execute` inside this block."""
    token = _current.set(control)
    try:
        yield control
    finally:
        _current.reset(token)


def resolve_par_control(control: PARControl | None) -> PARControl:
    """`control` if given, else the one set by `use_par_control`, else a clear error."""
    resolved = control if control is not None else _current.get()
    if resolved is None:
        raise ConfigurationError(
            "no PAR issuer to talk to: pass control=... or wrap the call in "
            "`with use_par_control(registry):`"
        )
    return resolved
