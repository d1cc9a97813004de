"""Each run's progress snapshot: the latest `ProgressReport` of a job, one object, overwritten.

A run's progress travels live on the broker (`ProgressReport`, to the job's owner) and is kept
here only as a bounded snapshot, `jobs/<uid>/progress.json`: compute overwrites it (a plain PUT,
not a new object) at most every `PARJOBS_PROGRESS_SNAPSHOT_S`, and once more as the run ends, so
a job costs a handful of writes however long it prints. The snapshot stays after the job ends
(the last thing the run reported; one small object per job). It is not the log: the job's events
say what happened, the snapshot only how far the run had got.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from orchestrator.core.layout import JobKeys
from orchestrator.errors import ObjectNotFoundError
from orchestrator.store.base import ObjectStore
from schemas.messages import ProgressReport

log = logging.getLogger("parjobs.store")


class ProgressSnapshots:
    """Reads and overwrites the jobs' progress snapshots."""

    def __init__(self, store: ObjectStore, keys: JobKeys) -> None:
        self._store = store
        self._keys = keys

    async def save(self, report: ProgressReport) -> None:
        """Overwrite the job's snapshot with `report`."""
        await self._store.put(
            self._keys.progress(report.job_uid),
            report.model_dump_json().encode(),
            content_type="application/json",
        )

    async def load(self, job_uid: str) -> ProgressReport | None:
        """The job's latest snapshot; None if its run has reported nothing (or the object is not
        a snapshot of this job: it is logged and ignored, as progress is only ever advisory)."""
        try:
            raw = await self._store.get(self._keys.progress(job_uid))
        except ObjectNotFoundError:
            return None
        try:
            report = ProgressReport.model_validate_json(raw)
        except ValidationError as exc:
            log.warning("ignored job %s's progress snapshot: %s", job_uid, exc)
            return None
        if report.job_uid != job_uid:
            log.warning("ignored job %s's progress snapshot: it is another job's", job_uid)
            return None
        return report
