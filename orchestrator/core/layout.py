"""Where parjobs' data lives in the object store (jobs, PARs, users, nonces, the ledger).

Everything sits under one `root` (empty in production), so test runs and deployments sharing a
bucket keep apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import TypeAdapter

from orchestrator.core.par_rules import validate_prefix
from schemas.par import Uid

_UID = TypeAdapter(Uid)


@dataclass(frozen=True)
class JobKeys:
    root: str = ""

    def __post_init__(self) -> None:
        if self.root:
            validate_prefix(self.root)

    @property
    def jobs(self) -> str:
        """The event logs' root: `<jobs>/<uid>/events/`."""
        return f"{self.root}jobs/"

    def input(self, job_uid: str) -> str:
        return f"{self.jobs}{_UID.validate_python(job_uid)}/input"

    def output_prefix(self, job_uid: str) -> str:
        return f"{self.jobs}{_UID.validate_python(job_uid)}/output/"

    def progress(self, job_uid: str) -> str:
        """The run's latest progress: one object, overwritten (not an event of the log)."""
        return f"{self.jobs}{_UID.validate_python(job_uid)}/progress.json"

    @property
    def registry(self) -> str:
        return f"{self.root}registry/pars/"

    @property
    def users(self) -> str:
        return f"{self.root}auth/users/"

    @property
    def nonces(self) -> str:
        return f"{self.root}auth/nonces/"

    @property
    def ledger(self) -> str:
        return f"{self.root}ledger/"
