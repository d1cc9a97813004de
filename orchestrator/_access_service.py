"""The access service's logic: submit jobs, answer about them, hand out outputs, expire the idle.

No broker here: each method takes a validated message and returns what to reply and which events
were appended; the daemon shell (`workers._daemon`) publishes them. So it is tested on real S3
without RabbitMQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from orchestrator._eventlog import EventLog, step_event_id
from orchestrator._exceptions import (
    IllegalTransitionError,
    JobError,
    JobNotCompletedError,
    JobNotFoundError,
)
from orchestrator._issuer import PARIssuer
from orchestrator._jobkeys import JobKeys
from orchestrator._jobstate import fold, is_terminal
from orchestrator._keys import PublicKeys
from orchestrator._objectstore import ObjectStore
from schemas.events import Expired, JobEvent, JobState, Submitted
from schemas.messages import GetJob, GetOutputs, JobReply, OutputsReply, SubmitJob

DEFAULT_JOB_LIFETIME = timedelta(hours=1)
# States in which a job waits for its user; past its deadline it expires (a running job is
# bounded by its calculation's time limit instead).
_WAITING = frozenset({JobState.SUBMITTED, JobState.STORAGE_CONTRACTED, JobState.READY})


@dataclass
class Outcome:
    """What handling one message produced: a reply for the caller, events to publish."""

    reply: JobReply | OutputsReply | None = None
    events: list[JobEvent] = field(default_factory=list)


class AccessService:
    def __init__(
        self,
        store: ObjectStore,
        log: EventLog,
        issuer: PARIssuer,
        keys: JobKeys,
        *,
        default_lifetime: timedelta = DEFAULT_JOB_LIFETIME,
    ) -> None:
        self._keys = keys
        self._store = store
        self._log = log
        self._issuer = issuer
        self._default_lifetime = default_lifetime

    async def submit(self, command: SubmitJob, *, message_id: str) -> Outcome:
        """Create the job and append `submitted`. The job uid derives from the message id, so a
        redelivered submit finds its own job instead of creating a second one."""
        user = PublicKeys.from_wire(command.user_key)
        job_uid = step_event_id(message_id, "job")
        lifetime = (
            timedelta(seconds=command.lifetime_s) if command.lifetime_s else self._default_lifetime
        )
        submitted = Submitted(
            request=command.request,
            user=user.fingerprint,
            user_key=command.user_key,
            expires_at=datetime.now(UTC) + lifetime,
        )
        await self._store.put(self._keys.active_marker(job_uid), b"")
        actor = f"user:{user.fingerprint[:32]}"
        event_id = step_event_id(job_uid, "submitted")
        event = await self._log.create(job_uid, actor, submitted, event_id=event_id)
        return Outcome(reply=await self._job_reply(job_uid, with_events=False), events=[event])

    async def get(self, query: GetJob) -> Outcome:
        return Outcome(reply=await self._job_reply(query.job_uid, with_events=query.with_events))

    async def outputs(self, query: GetOutputs) -> Outcome:
        """A bucket read PAR over the job's outputs, sealed for the job's user."""
        sheet = await self._log.load(query.job_uid)
        if sheet.state is not JobState.COMPLETED:
            raise JobNotCompletedError(
                f"job {query.job_uid} is {sheet.state.value}; outputs exist once it is completed"
            )
        user = PublicKeys.from_wire(sheet.user_key)
        par = await self._issuer.bucket_read_par(self._keys.output_prefix(query.job_uid), user)
        return Outcome(reply=OutputsReply(read_par=par.data))

    async def sweep(self) -> list[JobEvent]:
        """Expire every job still waiting for its user past its deadline; forget ended jobs."""
        expired: list[JobEvent] = []
        now = datetime.now(UTC)
        prefix = self._keys.active_prefix
        for info in await self._store.list(prefix):
            job_uid = info.key.removeprefix(prefix)
            try:
                sheet = await self._log.load(job_uid)
            except JobError:
                continue  # submit wrote the marker but not (yet) the log
            if is_terminal(sheet.state):
                await self._store.delete(info.key)
            elif sheet.state in _WAITING and sheet.expires_at <= now:
                try:
                    event = await self._log.transition(
                        job_uid, "access", Expired(), event_id=step_event_id(job_uid, "expired")
                    )
                except IllegalTransitionError:
                    continue  # it started (or ended) since we looked: not ours to expire
                expired.append(event)
        return expired

    async def _job_reply(self, job_uid: str, *, with_events: bool) -> JobReply:
        events = await self._log.read(job_uid)
        if not events:
            raise JobNotFoundError(f"no job {job_uid} is known here")
        return JobReply(sheet=fold(events), events=tuple(events) if with_events else ())
