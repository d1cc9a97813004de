"""The access service's logic: admit signed and paid jobs, answer about them, settle, expire.

No broker here: each method takes a validated message and returns what to reply and which events
were appended; the daemon shell (`workers.daemons`) publishes them. So it is tested on real S3
without RabbitMQ.

Admitting a job checks everything before anything happens — who signed, for exactly this request,
recently, and a cheque payable to this service, for this request, unexpired and large enough for
the calculation's highest price — and only then uses the nonce, holds the value and creates the
job, each step idempotent for the same message so a redelivery after a crash repeats nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anyio

from orchestrator.core.jobstate import fold, is_terminal
from orchestrator.core.keys import PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.core.ledger_rules import ACCESS, hold_tx_id, settle_tx_id
from orchestrator.core.pricing import Pricing
from orchestrator.core.signing import check_authorisation, check_cheque, request_fingerprint
from orchestrator.errors import (
    ExpiredChequeError,
    IllegalTransitionError,
    JobError,
    JobNotCompletedError,
    JobNotFoundError,
    RequesterMismatchError,
    StaleAuthorisationError,
)
from orchestrator.par.issuer import PARIssuer
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog, step_event_id
from orchestrator.store.ledger import Ledger
from orchestrator.store.progress import ProgressSnapshots
from orchestrator.store.users import NonceStore, UserRegistry
from schemas.auth import UserRecord
from schemas.events import (
    Expired,
    JobEvent,
    JobSheetState,
    JobState,
    Payment,
    Submitted,
)
from schemas.ledger import Transaction
from schemas.messages import GetJob, GetOutputs, JobReply, OutputsReply, SubmitJob

DEFAULT_JOB_LIFETIME = timedelta(hours=1)
DEFAULT_AUTH_WINDOW = timedelta(minutes=5)
# States in which a job waits for its user; past its deadline it expires (a running job is
# bounded by its calculation's time limit instead).
_WAITING = frozenset({JobState.SUBMITTED, JobState.STORAGE_CONTRACTED, JobState.READY})
_LEARN_CONCURRENCY = 32  # GETs in flight while the sweep learns deadlines it does not know
Publish = Callable[[JobEvent], Awaitable[None]]


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
        pricing: Pricing,
        *,
        default_lifetime: timedelta = DEFAULT_JOB_LIFETIME,
        auth_window: timedelta = DEFAULT_AUTH_WINDOW,
    ) -> None:
        self._keys = keys
        self._store = store
        self._log = log
        self._issuer = issuer
        self._pricing = pricing
        self._default_lifetime = default_lifetime
        self._auth_window = auth_window
        self._deadlines: dict[str, datetime] = {}
        """Each job with an open hold (not settled) and seen here -> when it expires if still
        waiting: the sweep's index, O(1) a job."""
        self.users = UserRegistry(store, keys.users)
        self.nonces = NonceStore(store, keys.nonces)
        self.ledger = Ledger(store, keys.ledger)
        self._snapshots = ProgressSnapshots(store, keys)

    async def submit(
        self, command: SubmitJob, *, message_id: str, requester: str | None = None
    ) -> Outcome:
        """Admit the job (the uid derives from the message id: a redelivery finds its own job).

        `requester` is the key fingerprint that signed the request (verified by the daemon): the
        job must be authorised by that same key, so no one submits another's authorisation.
        """
        request, authorisation, cheque = command.request, command.authorisation, command.cheque
        if requester is not None and authorisation.user != requester:
            raise RequesterMismatchError(
                f"the authorisation is signed by key {authorisation.user[:16]}…, the request by "
                f"{requester[:16]}…: a user submits only jobs they authorised themselves"
            )
        job_uid = step_event_id(message_id, "job")
        # A redelivery (of a job created or not) repeats each step below, each idempotent for
        # this job uid: nothing is read first to find out. One after a crash between the hold and
        # the job's creation has its hold: every check passed when it was made (nothing is held
        # before them), so the time-bound ones (the authorisation's window, the cheque's expiry)
        # failing now are judged again as of then. Judged now, a restart later than the window
        # would refuse the job and strand the value held for it.
        now = checked_at = datetime.now(UTC)
        try:
            user_record, price = await self._check(command, now)
        except (StaleAuthorisationError, ExpiredChequeError):
            held = await self.ledger.find(hold_tx_id(job_uid, cheque.cheque_id))
            if held is None:
                raise
            checked_at = held.time
            user_record, price = await self._check(command, checked_at)
        user = PublicKeys.from_wire(user_record.public_key)
        # Everything is checked: from here on each step is idempotent for this job uid.
        await self.nonces.claim(authorisation.user, authorisation.nonce, holder=job_uid)
        hold = await self.ledger.hold(job_uid, cheque.cheque_id, cheque.payer, price, at=checked_at)
        lifetime = (
            timedelta(seconds=command.lifetime_s) if command.lifetime_s else self._default_lifetime
        )
        submitted = Submitted(
            request=request,
            owner=user_record.name,
            user=user.fingerprint,
            user_key=user_record.public_key,
            expires_at=now + lifetime,
            authorisation=authorisation,
            payment=Payment(cheque=cheque, held=price, ledger_seq=hold.seq),
        )
        actor = f"user:{user_record.name}"
        event_id = step_event_id(job_uid, "submitted")
        event = await self._log.create(job_uid, actor, submitted, event_id=event_id)
        self._deadlines[job_uid] = submitted.expires_at
        sheet = fold(await self._log.read_through(job_uid, event.seq))  # no read: it wrote it
        return Outcome(reply=JobReply(sheet=sheet), events=[event])

    async def _check(self, command: SubmitJob, now: datetime) -> tuple[UserRecord, Decimal]:
        """(the user's record, the price held) if `command` may be admitted at `now`: signed
        by its user for exactly its request within the window, and paid by a cheque payable
        here, for this request, unexpired and large enough for the highest price."""
        request, authorisation, cheque = command.request, command.authorisation, command.cheque
        user_record = await self.users.by_fingerprint(authorisation.user)
        user = PublicKeys.from_wire(user_record.public_key)
        check_authorisation(authorisation, request, user, now=now, window=self._auth_window)
        price = self._pricing.highest(request)
        payer = PublicKeys.from_wire((await self.users.get(cheque.payer)).public_key)
        check_cheque(
            cheque,
            payer_key=payer,
            job_owner=user_record.name,
            recipient=ACCESS,
            resource=request_fingerprint(request),
            price=price,
            now=now,
        )
        return user_record, price

    async def get(self, query: GetJob, *, owner: str | None = None) -> Outcome:
        """The job's sheet (and events); with `owner`, only if it is `owner`'s job: another
        user's job is answered exactly as one that does not exist."""
        reply = await self._job_reply(query.job_uid, with_events=query.with_events, owner=owner)
        if query.with_progress:
            progress = await self._snapshots.load(query.job_uid)
            reply = reply.model_copy(update={"progress": progress})
        return Outcome(reply=reply)

    async def outputs(self, query: GetOutputs, *, owner: str | None = None) -> Outcome:
        """A bucket read PAR over the job's outputs, sealed for the job's user (with `owner`,
        only for `owner`'s own job)."""
        sheet = fold(await self._events(query.job_uid, owner=owner))
        if sheet.state is not JobState.COMPLETED:
            raise JobNotCompletedError(
                f"job {query.job_uid} is {sheet.state.value}; outputs exist once it is completed"
            )
        user = PublicKeys.from_wire(sheet.user_key)
        par = await self._issuer.bucket_read_par(self._keys.output_prefix(query.job_uid), user)
        return Outcome(reply=OutputsReply(read_par=par.data))

    async def settle(self, job_uid: str, *, ending: JobEvent | None = None) -> Transaction | None:
        """Once the job has ended: charge what it cost, refund the rest of the hold (once).

        `ending`: an event of the job as received: the events before it are then those
        remembered (access takes the events that lead to an end, to remember them) or fetched,
        not listed; one that does not end the job settles nothing."""
        sheet = fold(await self._log.through(ending)) if ending else await self._log.load(job_uid)
        return await self._settle(sheet)

    async def _settle(self, sheet: JobSheetState) -> Transaction | None:
        if sheet.payment is None or not is_terminal(sheet.state):
            return None
        return await self.ledger.settle(sheet.job_uid, self._pricing.charge(sheet))

    async def on_deadline(self, job_uid: str, publish: Publish) -> datetime | None:
        """Job `job_uid`'s deadline message arrived: judge the job by its own log. Past its own
        deadline and still waiting, it expires (the `expired` event appended once and published);
        ended and not settled, it is settled; started, nothing. Returns the job's deadline if it
        is still waiting and that is yet to come (the message came early: delay it again)."""
        events = await self._log.read(job_uid)
        if not events:
            return None  # no such job: a deadline is only a hint
        sheet = fold(events)
        if sheet.state in _WAITING and sheet.expires_at > datetime.now(UTC):
            return sheet.expires_at
        await self._close(sheet, publish)
        return None

    async def sweep(self, publish: Publish) -> list[JobEvent]:
        """The safety net behind the deadline messages: expire what is still waiting past its
        deadline, settle what ended unsettled, for the jobs whose message or settlement was lost.

        O(1) a job with no I/O: every job not settled yet has an open hold in the ledger (its
        blocks since the last sweep are read), and this instance knows each one's deadline (from
        its admission, or once from its first event). Only a job past its deadline has its log
        read (one still running past it, each sweep until it ends: its time limit bounds that); an
        ended job's end is not published again (settling it is what was missed). Returns the
        `expired` events appended.
        """
        now = datetime.now(UTC)
        open_holds = list((await self.ledger.state()).holds)  # settling below moves the ledger on
        for job_uid in self._deadlines.keys() - set(open_holds):
            del self._deadlines[job_uid]  # settled: nothing left to do for it
        await self._learn_deadlines([uid for uid in open_holds if uid not in self._deadlines])
        expired: list[JobEvent] = []
        for job_uid in open_holds:
            deadline = self._deadlines.get(job_uid)
            if deadline is None or deadline > now:
                continue  # not due; or held, but its log not (yet) created or not sound
            try:
                sheet = fold(await self._log.read(job_uid))
            except JobError:
                continue  # a log that fails its checks is not acted on
            if (event := await self._close(sheet, publish)) is not None:
                expired.append(event)
        return expired

    async def _learn_deadlines(self, job_uids: list[str]) -> None:
        """Each job's deadline from its first event (one GET each, a few at once): what an
        instance that did not admit them learns once (after a restart, from another replica)."""
        limit = anyio.Semaphore(_LEARN_CONCURRENCY)

        async def learn(job_uid: str) -> None:
            async with limit:
                try:
                    deadline = await self._log.deadline(job_uid)
                except JobError:
                    return  # a log that fails its checks is not acted on
            if deadline is not None:
                self._deadlines[job_uid] = deadline

        try:
            async with anyio.create_task_group() as group:
                for job_uid in job_uids:
                    group.start_soon(learn, job_uid)
        except* Exception as failed:  # the first failure is the error, not a group of them
            raise failed.exceptions[0] from None

    async def _close(self, sheet: JobSheetState, publish: Publish) -> JobEvent | None:
        """A job past its deadline: settled if it ended (unless it is already), expired (and the
        event published, the two shielded from cancellation) if still waiting; its `expired`
        event, if this appended it."""
        job_uid = sheet.job_uid
        if is_terminal(sheet.state):
            if not self.ledger.holds(settle_tx_id(job_uid)):  # settled as it ended, mostly
                await self._settle(sheet)  # a no-op when its end was settled already
            return None
        if sheet.state not in _WAITING:
            return None  # it runs: its calculation's time limit bounds it
        with anyio.CancelScope(shield=True):
            try:
                event = await self._log.transition(
                    job_uid, "access", Expired(), event_id=step_event_id(job_uid, "expired")
                )
            except IllegalTransitionError:
                return None  # it started (or ended) since we looked: not ours to expire
            await publish(event)
        return event

    async def _events(self, job_uid: str, *, owner: str | None) -> list[JobEvent]:
        """The job's events; JobNotFoundError alike for no such job and for another's job."""
        events = await self._log.read(job_uid)
        if not events or (owner is not None and fold(events[:1]).owner != owner):
            raise JobNotFoundError(f"no job {job_uid} is known here")
        return events

    async def _job_reply(self, job_uid: str, *, with_events: bool, owner: str | None) -> JobReply:
        events = await self._events(job_uid, owner=owner)
        return JobReply(sheet=fold(events), events=tuple(events) if with_events else ())
