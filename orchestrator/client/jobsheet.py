"""`JobSheet`: the complete record of one job, as on the seed page, over the job's event log.

The log is the truth: a JobSheet holds the request it was made with and, once the job exists,
the state folded from its events. `request_services` is the seed's flow: submit through the
access service, wait for storage and compute to contract (following the job's events, no
polling), return the upload PAR, the run PAR and their expiry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ValidationError

from orchestrator.client.client import ParjobsClient
from orchestrator.errors import JobError
from orchestrator.par.par import PAR
from orchestrator.store.eventlog import EventLog
from schemas.auth import Authorisation, Cheque
from schemas.events import JobRequest, JobSheetState, Payment


class JobSheet:
    """`JobSheet(job, authorisation)` is a job not yet submitted (null); `load` gives one that
    exists. `set_payment(cheque)` names the cheque that `request_services` has cashed."""

    def __init__(
        self,
        job: JobRequest | None = None,
        authorisation: Authorisation | None = None,
        *,
        state: JobSheetState | None = None,
    ):
        if state is not None and job is not None and state.request != job:
            raise JobError("the job request and the job's state disagree")
        self._job = state.request if state is not None else job
        self._authorisation = state.authorisation if state is not None else authorisation
        self._cheque = state.payment.cheque if state and state.payment else None
        self._state = state

    def job(self) -> JobRequest | None:
        """The original job request."""
        return self._job

    def authorisation(self) -> Authorisation | None:
        """The user's original authorisation: their signature over exactly this request."""
        return self._authorisation

    def payment(self) -> Payment | None:
        """The credit notes: the cheque cashed for the job and the value held for it."""
        return self._state.payment if self._state is not None else None

    def set_payment(self, cheque: Cheque) -> None:
        """The cheque that pays for this job; `request_services` has the access service cash it
        (checked, then held in the ledger) before anything else happens."""
        if not self.is_null():
            raise JobError(f"job {self.uid()} is already paid for")
        self._cheque = cheque

    def is_null(self) -> bool:
        """True until the job exists (it has a uid and a log)."""
        return self._state is None

    def uid(self) -> str | None:
        return self._state.job_uid if self._state is not None else None

    def state(self) -> JobSheetState | None:
        """The job as its events leave it (None while null)."""
        return self._state

    def to_data(self) -> dict[str, Any]:
        return {
            "job": self._job.model_dump(mode="json") if self._job is not None else None,
            "state": self._state.model_dump(mode="json") if self._state is not None else None,
            "authorisation": (
                self._authorisation.model_dump(mode="json") if self._authorisation else None
            ),
            "cheque": self._cheque.model_dump(mode="json") if self._cheque else None,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> JobSheet:
        try:
            job = JobRequest.model_validate(data["job"]) if data.get("job") else None
            state = JobSheetState.model_validate(data["state"]) if data.get("state") else None
            auth = data.get("authorisation")
            cheque = data.get("cheque")
            authorisation = Authorisation.model_validate(auth) if auth else None
            paid_by = Cheque.model_validate(cheque) if cheque else None
        except (ValidationError, TypeError, AttributeError) as exc:
            raise JobError(f"not JobSheet data: {exc}") from exc
        sheet = cls(job, authorisation, state=state)
        if state is None and paid_by is not None:
            sheet.set_payment(paid_by)
        return sheet

    @classmethod
    async def load(cls, uid: str, log: EventLog) -> JobSheet:
        """The JobSheet of job `uid`, folded from its log in the object store."""
        return cls(state=await log.load(uid))

    async def request_services(
        self, client: ParjobsClient, *, lifetime_s: int | None = None
    ) -> tuple[PAR, PAR, datetime]:
        """Contract storage and compute: (upload PAR, run PAR, expiry), sealed for the user who
        signed the authorisation. Needs the job, its authorisation and a cheque (`set_payment`)."""
        if not self.is_null():
            raise JobError(f"job {self.uid()} was already submitted")
        if self._job is None or self._authorisation is None or self._cheque is None:
            raise JobError("request_services needs the job, its authorisation and set_payment()")
        submitted = await client.submit(
            self._job, self._authorisation, self._cheque, lifetime_s=lifetime_s
        )
        self._state, upload, run = await client.wait_ready(submitted.job_uid)
        return upload, run, self._state.expires_at

    async def refresh(self, client: ParjobsClient) -> JobSheetState:
        """Fetch the job's current state from the access service."""
        uid = self.uid()
        if uid is None:
            raise JobError("a null JobSheet has nothing to refresh")
        self._state = (await client.job(uid)).sheet
        return self._state
