"""Run commands that carry no capability in the clear: sealing them for compute, opening them.

A start, stop or status request through a run PAR names its job and holds the run capability (the
opened run PAR's URL) sealed with HPKE to compute's X25519 key. The seal's `info` binds the action,
the job uid and the requester's key fingerprint (who signs the request), so a sealed command read
off the broker opens for nobody but compute, and copied into another user's request, another
job's, or another action, it does not open at all. The client seals (`run_command`), compute opens
(`open_run_command`): one implementation of the binding for both.
"""

from __future__ import annotations

from typing import Final

from pydantic import JsonValue

from orchestrator.core.crypto import seal, unseal
from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.errors import PARPermissionError, TamperedError
from schemas.messages import GetRunStatus, RunAction, RunCommand, StartRun, StopRun
from schemas.signing import canonical_json, signed_bytes

RUN_COMMAND_PURPOSE: Final = b"parjobs-run-command-v1"
_BODIES: Final[dict[RunAction, type[StartRun | StopRun | GetRunStatus]]] = {
    "start": StartRun,
    "stop": StopRun,
    "status": GetRunStatus,
}
_ACTIONS: Final[dict[type[RunCommand], RunAction]] = {
    body: action for action, body in _BODIES.items()
}


def run_command_info(action: RunAction, *, job_uid: str, requester: str) -> bytes:
    """The HPKE `info` a run command is sealed with: purpose, action, job and requester."""
    binding: dict[str, JsonValue] = {"action": action, "job_uid": job_uid, "requester": requester}
    return signed_bytes(RUN_COMMAND_PURPOSE, canonical_json(binding))


def action_of(command: RunCommand) -> RunAction:
    """What `command` asks compute to do."""
    return _ACTIONS[type(command)]


def run_command(
    action: RunAction, run_url: str, *, job_uid: str, requester: str, compute: PublicKeys
) -> RunCommand:
    """The body of a `action` request for the run `run_url` grants on job `job_uid`, sealed for
    `compute` (the operator's ServiceKeys.current("compute")) and bound to `requester`, the key
    fingerprint that signs the request."""
    info = run_command_info(action, job_uid=job_uid, requester=requester)
    return _BODIES[action](
        job_uid=job_uid, sealed=seal(run_url.encode(), compute.sealing, info=info)
    )


def open_run_command(command: RunCommand, *, requester: str, key: KeyPair) -> str:
    """The run capability inside `command`, once it opens with compute's `key` for exactly this
    action, job and `requester` (the verified signer of the request); PARPermissionError if not."""
    info = run_command_info(action_of(command), job_uid=command.job_uid, requester=requester)
    try:
        return unseal(command.sealed, key.sealing, info=info).decode()
    except (TamperedError, UnicodeDecodeError) as exc:
        raise PARPermissionError(
            f"the {action_of(command)} command for job {command.job_uid} does not open here: it "
            "was sealed for another job, another requester or another action, or not for compute"
        ) from exc
