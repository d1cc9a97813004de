"""The storage worker's logic: on `submitted`, contract storage for the job.

It mints the upload PAR (write `jobs/<uid>/input`, sealed for the user, pinned to the input's
SHA-256 when the request names one) and the bucket-write PAR (`jobs/<uid>/output/`, sealed for the
compute service), both expiring at the job's deadline, and appends `storage_contracted`, which
carries their records (`JobPARs`): minting them writes nothing else.
"""

from __future__ import annotations

from orchestrator.core.keys import PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.par.issuer import JobPARs, PARIssuer
from orchestrator.store.eventlog import EventLog, step_event_id
from schemas.events import JobEvent, JobState, StorageContracted, Submitted
from workers.steps import due_step

MAX_INPUT_BYTES = 5 * 2**30  # one presigned PUT carries at most 5 GiB
MAX_OUTPUT_BYTES = 2**30  # per output object; S3 enforces it through the POST policy


class StorageWorker:
    def __init__(
        self,
        log: EventLog,
        issuer: PARIssuer,
        compute_key: PublicKeys,
        keys: JobKeys,
        *,
        actor: str = "storage",
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> None:
        self._log = log
        self._issuer = issuer
        self._compute_key = compute_key
        self._keys = keys
        self._actor = actor
        self._max_output_bytes = max_output_bytes

    async def on_submitted(self, event: JobEvent, *, redelivered: bool = False) -> JobEvent | None:
        """Contract storage once per job; a redelivery mints nothing and returns the logged event
        (to publish again); None if the job has moved on without us (expired, cancelled)."""
        if not isinstance(event.payload, Submitted):
            return None
        job_uid = event.job_uid
        step = await due_step(
            self._log, event, JobState.SUBMITTED, "storage_contracted", redelivered=redelivered
        )
        if step.done is not None or step.sheet is None:
            return step.done
        sheet, remaining = step.sheet, step.remaining
        user = PublicKeys.from_wire(sheet.user_key)
        minted = JobPARs(job_uid)
        upload = await self._issuer.object_par(
            self._keys.input(job_uid),
            user,
            readable=False,
            writeable=True,
            lifetime=remaining,
            max_size=MAX_INPUT_BYTES,
            sha256=sheet.request.input_sha256,
            job=minted,
        )
        output = await self._issuer.bucket_write_par(
            self._keys.output_prefix(job_uid),
            self._compute_key,
            max_size=self._max_output_bytes,
            lifetime=remaining,
            job=minted,
        )
        payload = StorageContracted(
            upload_par=upload.data, output_par=output.data, proofs=minted.proofs
        )
        event_id = step_event_id(job_uid, "storage_contracted")
        return await self._log.transition(job_uid, self._actor, payload, event_id=event_id)
