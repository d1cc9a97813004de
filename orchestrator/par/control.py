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
    """A `PARControl` that also reaches the compute service, to act on calculation PARs."""

    async def run_command(self, action: RunAction, run_url: str) -> RunReply:
        """Send `action` for the run `run_url` grants; the compute service's answer."""


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
