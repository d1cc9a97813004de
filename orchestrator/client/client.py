"""`ParjobsClient`: a user's (or operator's) connection to the parjobs services over RabbitMQ.

It submits jobs, asks about them, fetches output PARs, and is the `RunService` a calculation PAR's
`RunControl` uses to start and stop runs. Requests go to a service's RPC queue; the reply is read
as one of what that service answers (`RPC_REQUESTS[service].replies`), and an `ErrorReply` is
raised as the very error the service raised (`ParjobsError.from_reply`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel

from orchestrator import errors
from orchestrator.broker.base import Broker
from orchestrator.broker.topology import RPC_REQUESTS
from orchestrator.core.keys import KeyPair
from orchestrator.core.ledger_rules import ACCESS
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import ParjobsError
from orchestrator.par.par import PAR
from schemas.auth import Authorisation, Cheque
from schemas.events import JobRequest, JobSheetState, JobState
from schemas.messages import (
    ClosePAR,
    Envelope,
    ErrorReply,
    GetJob,
    GetOutputs,
    GetPARState,
    GetRunStatus,
    JobReply,
    MessageUnion,
    OutputsReply,
    PARStateReply,
    RunAction,
    RunReply,
    StartRun,
    StopRun,
    SubmitJob,
)
from schemas.par import PARState

R = TypeVar("R", bound=BaseModel)
CHEQUE_LIFETIME = timedelta(hours=1)
ENDED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
# A start goes to the run queue (its worker holds it for the run); the rest to compute's RPC
# queue, which is never blocked behind long runs.
_RUN_REQUESTS: dict[RunAction, tuple[str, type[StartRun | StopRun | GetRunStatus]]] = {
    "start": ("runs", StartRun),
    "stop": ("compute", StopRun),
    "status": ("compute", GetRunStatus),
}


def raise_error_reply(reply: ErrorReply) -> None:
    """Raise the parjobs error `reply` describes (a ParjobsError carrying its code if unknown)."""
    raise ParjobsError.from_reply(reply)


def _replies(service: str) -> MessageUnion[Any]:
    requests = RPC_REQUESTS.get(service)
    if requests is None or requests.replies is None:
        raise errors.ConfigurationError(f"parjobs has no RPC service {service!r}")
    return requests.replies


class ParjobsClient:
    """Talks to access (jobs, PARs) and compute (runs); also usable as a PAR's control."""

    def __init__(self, broker: Broker, *, sender: str = "client", timeout: float = 60.0) -> None:
        self._broker = broker
        self._sender = sender
        self._timeout = timeout

    async def _call(self, service: str, body: BaseModel, expected: type[R]) -> R:
        topology = self._broker.topology
        reply = await self._broker.request(
            topology.commands,
            topology.rpc_routing_key(service),
            Envelope(sender=self._sender, body=body),
            _replies(service).envelope,
            timeout=self._timeout,
        )
        if isinstance(reply.body, ErrorReply):
            raise_error_reply(reply.body)
        if not isinstance(reply.body, expected):
            raise ParjobsError(f"{service} answered {reply.body.type}, not {expected.__name__}")
        return reply.body

    # --- jobs -------------------------------------------------------------------------------------

    async def submit(
        self,
        request: JobRequest,
        authorisation: Authorisation,
        cheque: Cheque,
        *,
        lifetime_s: int | None = None,
    ) -> JobSheetState:
        """Submit a job signed for by `authorisation` and paid for by `cheque`."""
        command = SubmitJob(
            request=request, authorisation=authorisation, cheque=cheque, lifetime_s=lifetime_s
        )
        return (await self._call("access", command, JobReply)).sheet

    async def submit_paid(
        self,
        request: JobRequest,
        user: KeyPair,
        *,
        account: str,
        max_spend: Decimal,
        lifetime_s: int | None = None,
    ) -> JobSheetState:
        """Sign for `request` with `user`'s key and pay from `account` (which `user` owns)."""
        cheque = write_cheque(
            user,
            payer=account,
            recipient=ACCESS,
            max_spend=max_spend,
            resource=request_fingerprint(request),
            lifetime=CHEQUE_LIFETIME,
        )
        authorisation = sign_authorisation(user, request)
        return await self.submit(request, authorisation, cheque, lifetime_s=lifetime_s)

    async def job(self, job_uid: str, *, with_events: bool = False) -> JobReply:
        query = GetJob(job_uid=job_uid, with_events=with_events)
        return await self._call("access", query, JobReply)

    async def wait_until(
        self,
        job_uid: str,
        states: frozenset[JobState],
        *,
        timeout: float = 120,  # noqa: ASYNC109 - a deadline for the whole wait
        poll_interval: float = 0.2,
    ) -> JobSheetState:
        """Poll the job until it is in one of `states` (or has ended); TimeoutError if not."""
        with anyio.fail_after(timeout):
            while True:
                sheet = (await self.job(job_uid)).sheet
                if sheet.state in states or sheet.state in ENDED:
                    return sheet
                await anyio.sleep(poll_interval)

    async def request_services(
        self,
        request: JobRequest,
        user: KeyPair,
        *,
        account: str,
        max_spend: Decimal,
        lifetime_s: int | None = None,
    ) -> tuple[str, PAR, PAR, datetime]:
        """The seed's `JobSheet.request_services`: (job uid, upload PAR, run PAR, expiry).

        Submits the signed and paid job, then waits until storage and compute have contracted.
        """
        submitted = await self.submit_paid(
            request, user, account=account, max_spend=max_spend, lifetime_s=lifetime_s
        )
        return await self.wait_ready(submitted.job_uid)

    async def wait_ready(self, job_uid: str) -> tuple[str, PAR, PAR, datetime]:
        """Wait until the job is contracted: (job uid, upload PAR, run PAR, expiry)."""
        sheet = await self.wait_until(job_uid, frozenset({JobState.READY}))
        if sheet.state is not JobState.READY or sheet.upload_par is None or sheet.run_par is None:
            raise errors.JobError(
                f"job {job_uid} ended {sheet.state.value} before it was ready: {sheet.reason or ''}"
            )
        return job_uid, PAR(sheet.upload_par), PAR(sheet.run_par), sheet.expires_at

    async def outputs(self, job_uid: str) -> PAR:
        """A bucket read PAR over the completed job's outputs, sealed for the job's user."""
        return PAR((await self._call("access", GetOutputs(job_uid=job_uid), OutputsReply)).read_par)

    # --- PARControl and RunService ---------------------------------------------------------------

    async def close(self, uid: str, proof: str) -> None:
        await self._call("access", ClosePAR(uid=uid, proof=proof), PARStateReply)

    async def state(self, uid: str) -> PARState:
        return (await self._call("access", GetPARState(uid=uid), PARStateReply)).state

    async def run_command(self, action: RunAction, run_url: str) -> RunReply:
        service, request = _RUN_REQUESTS[action]
        return await self._call(service, request(run_url=run_url), RunReply)
