"""The client's own two queues on the broker: its replies and its jobs' events, verified before use.

Both are in the user's namespace (`identities.reply_queue`, `identities.events_queue`), exclusive
to the client's connection and declared once, when the client starts. The events queue is bound
to `job.<username>.#`, the only events RabbitMQ lets a user bind, so every event of the user's
jobs queues up from then on, whether or not anything waits on it yet.

A reply is used only if it is signed by the service role the request went to; anything else that
comes with the request's correlation id is dropped and logged, and the request keeps waiting for
the genuine reply. An event goes to the `JobTracker` of its job, which verifies it, if the client
follows that job (someone waits on it, or waited and it has not ended yet); events of other jobs
are kept a while (the first few of the most recent jobs): a job's first events may come before
its submitter follows it. A run's progress report (`ProgressReport`, under the same routing key)
is used only if compute signed it, within the reply window of this clock, and goes to its job's
tracker likewise; others are dropped and logged.

Both queues are the connection's: when it is lost (its node goes, say), what is published to them
until the connection is restored, on whichever node, is lost. So after each reconnection (once the
queues are restored) every request still waiting is sent again at once if it may be, and every
tracker of a live job catches up with one GetJob (`catch_up`, a few at once); a catch-up that
fails is logged, and the job is caught up again at its next gap or its next follow.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from pydantic import JsonValue, TypeAdapter, ValidationError

from orchestrator.broker.base import Broker, IncomingMeta, Subscription
from orchestrator.broker.identities import Identities
from orchestrator.client.tracking import JobTracker
from orchestrator.core.message_signing import verify_message
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import (
    BrokerError,
    ForgedSignatureError,
    ParjobsError,
    RequestTimeoutError,
    SignatureError,
)
from schemas.events import JobEvent
from schemas.messages import JOB_UPDATES, Envelope, EventPublished, ProgressReport
from schemas.signing import ServiceRole

log = logging.getLogger("parjobs.client")

ANY_JSON: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)
"""What the client's queues are consumed as: validated here, so nothing is ever dead-lettered
from them (a user may not write to the dead-letter exchange)."""
REPLY_WINDOW = timedelta(minutes=5)
"""How far a reply's signed time may be from this clock (as a service allows a request)."""
ENDED_KEPT = 256
"""Trackers of ended jobs kept after their followers left (the most recent): a job that ended
before the next wait on it began (a quick run) needs no catch-up, nor access, to be waited on."""
EARLY_JOBS = 1024
EARLY_EVENTS = 8
"""Events of jobs nobody follows yet, kept for the most recent `EARLY_JOBS` jobs (the first
`EARLY_EVENTS` of each): a job just submitted may have its first events come before its
submitter follows it, and they need not be asked for again."""
CATCH_UPS_AT_ONCE = 8
"""GetJobs in flight at once while the trackers catch up after a reconnection."""


@dataclass(frozen=True)
class _Pending:
    """A request waiting for its reply: who must have signed it, and what it may be."""

    role: ServiceRole
    replies: TypeAdapter[Envelope[Any]]
    reply: asyncio.Future[Envelope[Any]]
    reconnected: asyncio.Event
    """Set when the connection was restored: a reply sent meanwhile may be lost."""


class Inbox:
    """The client's reply queue and events queue, and what waits on them."""

    def __init__(
        self,
        broker: Broker,
        keys: ServiceKeys,
        *,
        window: timedelta = REPLY_WINDOW,
        catch_up: Callable[[JobTracker], Awaitable[None]] | None = None,
    ):
        identities = Identities(broker.topology)
        instance = uuid.uuid4().hex
        self._broker = broker
        self.keys = keys
        """The operator's service keys: what replies and events are checked against."""
        self._window = window
        self.reply_queue = identities.reply_queue(broker.username, instance)
        self.events_queue = identities.events_queue(broker.username, instance)
        self._pending: dict[str, _Pending] = {}
        self._trackers: dict[str, tuple[JobTracker, int]] = {}
        """Followed jobs: their tracker and how many follow them now (0: kept while it lives)."""
        self._ended: OrderedDict[str, JobTracker] = OrderedDict()
        """Trackers of ended jobs nobody follows, least recently ended first."""
        self._early: OrderedDict[str, list[JobEvent]] = OrderedDict()
        """Events of jobs nobody follows yet, least recently come first (`EARLY_JOBS`)."""
        self._early_lost: OrderedDict[str, None] = OrderedDict()
        """Jobs some of whose early events were not kept (past `EARLY_EVENTS`, or dropped)."""
        self._subscriptions: list[Subscription] = []
        self._catch_up = catch_up
        """Offers a tracker its job's log as access has it (after a reconnection)."""
        self._catching_up: set[asyncio.Task[None]] = set()
        self._hooked = False

    async def start(self) -> None:
        """Declare both queues and consume them."""
        if not self._hooked:  # the broker keeps its callbacks: once, though started again
            self._broker.on_reconnect(self._on_reconnect)
            self._hooked = True
        await self._broker.declare(self.reply_queue, self.events_queue, shared=False)
        self._subscriptions = [
            await self._broker.consume(self.reply_queue, ANY_JSON, self._on_reply),
            await self._broker.consume(self.events_queue, ANY_JSON, self._on_event),
        ]

    async def close(self) -> None:
        """Stop consuming; requests still waiting fail (the queues go with the connection)."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.cancel()
        catching_up, self._catching_up = self._catching_up, set()
        for task in catching_up:
            task.cancel()
        await asyncio.gather(*catching_up, return_exceptions=True)
        for pending in self._pending.values():
            if not pending.reply.done():
                pending.reply.set_exception(BrokerError("the parjobs client was closed"))

    # --- requests and replies -------------------------------------------------------------------

    async def call(
        self,
        service: str,
        role: ServiceRole,
        request: Envelope[Any],
        replies: TypeAdapter[Envelope[Any]],
        *,
        timeout: float,  # noqa: ASYNC109 - it becomes RequestTimeoutError
        sends: int = 1,
    ) -> Envelope[Any]:
        """Send `request` to `service`'s RPC queue; its reply, signed by `role`. Unanswered
        within `timeout`, the very same request (same message id, same correlation id) is sent
        again, up to `sends` times in all, and a reply to any of them answers it: for requests
        that mean the same however often they come (a service recognises the message id). Such
        a request is also sent again at once after a reconnection (not counted in `sends`): its
        reply may have been lost with the reply queue."""
        topology = self._broker.topology
        correlation_id = uuid.uuid4().hex
        reply: asyncio.Future[Envelope[Any]] = asyncio.get_running_loop().create_future()
        pending = _Pending(role, replies, reply, asyncio.Event())
        self._pending[correlation_id] = pending
        try:
            resend, sent = sends > 1, 0
            while sent < sends:
                pending.reconnected.clear()
                with anyio.fail_after(timeout):
                    await self._broker.publish(
                        topology.commands,
                        topology.rpc_routing_key(service),
                        request,
                        correlation_id=correlation_id,
                        reply_to=self.reply_queue.name,
                        message_id=request.message_id,
                    )
                sent += 1
                # Waited on without cancelling it: a late reply to an earlier send still counts.
                if await self._reply_or_reconnection(pending, timeout, resend=resend):
                    return reply.result()
                if resend and pending.reconnected.is_set():
                    sent -= 1  # sent again for the reconnection, not for a timeout
        except TimeoutError:
            pass  # the publish itself took too long
        finally:
            self._pending.pop(correlation_id, None)
        raise RequestTimeoutError(
            f"no reply signed by {role} within {timeout:g}s to the {request.body.type} request "
            f"sent to {service}" + (f" ({sends} times)" if sends > 1 else "")
        )

    @staticmethod
    async def _reply_or_reconnection(
        pending: _Pending,
        timeout: float,  # noqa: ASYNC109 - one send's wait
        *,
        resend: bool,
    ) -> bool:
        """Wait up to `timeout` for the reply, or (if it may be sent again) for a reconnection;
        whether the reply came."""
        waits: set[asyncio.Future[Any]] = {pending.reply}
        reconnected = asyncio.ensure_future(pending.reconnected.wait()) if resend else None
        if reconnected is not None:
            waits.add(reconnected)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if reconnected is not None:
                reconnected.cancel()
        return pending.reply.done()

    def _on_reconnect(self) -> None:
        """The connection was restored (its queues with it): what came to them meanwhile is
        lost. Requests still waiting are sent again, trackers of live jobs catch up."""
        if not self._subscriptions:
            return  # closed
        for pending in self._pending.values():
            pending.reconnected.set()
        trackers = [tracker for tracker, _ in self._trackers.values() if not tracker.ended]
        if trackers and self._catch_up is not None:
            log.info("reconnected: catching up %d jobs followed", len(trackers))
            task = asyncio.get_running_loop().create_task(self._catch_up_all(trackers))
            self._catching_up.add(task)
            task.add_done_callback(self._catching_up.discard)

    async def _catch_up_all(self, trackers: list[JobTracker]) -> None:
        """Catch each tracker up, `CATCH_UPS_AT_ONCE` at a time; a failure is logged (the job
        catches up at its next gap or follow), never raised."""
        assert self._catch_up is not None
        catch_up = self._catch_up
        limit = anyio.Semaphore(CATCH_UPS_AT_ONCE)

        async def one(tracker: JobTracker) -> None:
            async with limit:
                try:
                    await catch_up(tracker)
                except ParjobsError as exc:
                    log.warning(
                        "job %s not caught up after the reconnection: %s", tracker.job_uid, exc
                    )
                    return
            self._release_if_ended(tracker)

        async with anyio.create_task_group() as group:
            for tracker in trackers:
                group.start_soon(one, tracker)

    async def _on_reply(self, raw: JsonValue, meta: IncomingMeta) -> None:
        pending = self._pending.get(meta.correlation_id or "")
        if pending is None or pending.reply.done():
            log.debug("dropped a reply nobody waits for (%s)", meta.correlation_id)
            return
        try:
            envelope = pending.replies.validate_python(raw)
            signer = verify_message(
                envelope.signature,
                message_id=envelope.message_id,
                sent_at=envelope.sent_at,
                body=envelope.body,
                keys=self.keys.keys_for(pending.role),
                now=datetime.now(UTC),
                window=self._window,
            )
            if signer != pending.role:
                raise ForgedSignatureError(f"it is signed by {signer}, not by {pending.role}")
        except (ValidationError, SignatureError) as exc:
            log.warning(
                "dropped a reply to %s from broker user %s, still waiting: %s",
                meta.correlation_id,
                meta.user_id,
                exc,
            )
            return
        pending.reply.set_result(envelope)

    # --- events ---------------------------------------------------------------------------------

    @contextmanager
    def following(self, job_uid: str) -> Iterator[JobTracker]:
        """The tracker of job `job_uid`, fed with its events while the block runs. After it, a
        caught-up tracker is kept (fed while its job lives, then among the `ENDED_KEPT`), so a
        later wait on the job needs no catch-up."""
        if (followed := self._trackers.get(job_uid)) is not None:
            tracker, followers = followed
        elif job_uid in self._ended:
            tracker, followers = self._ended.pop(job_uid), 0
        else:
            tracker, followers = JobTracker(job_uid, self.keys), 0
            for event in self._early.pop(job_uid, []):
                tracker.offer(event, source="the events queue, before it was followed")
        self._trackers[job_uid] = (tracker, followers + 1)
        try:
            yield tracker
        finally:
            tracker, followers = self._trackers.pop(job_uid)
            if followers > 1:
                self._trackers[job_uid] = (tracker, followers - 1)
            elif tracker.caught_up_on is not None:
                self._keep(tracker)

    def _keep(self, tracker: JobTracker) -> None:
        """Keep a tracker nobody follows now: fed while its job lives, then among the ended."""
        if not tracker.ended:
            self._trackers[tracker.job_uid] = (tracker, 0)
            return
        self._ended[tracker.job_uid] = tracker
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def kept_every_event(self, job_uid: str) -> bool:
        """Whether every event of `job_uid` that came before anyone followed it was kept."""
        return job_uid not in self._early_lost

    def _keep_early(self, event: JobEvent) -> None:
        """Keep an event of a job nobody follows (yet), within `EARLY_JOBS` and `EARLY_EVENTS`
        (what is not kept is noted); it is checked when a tracker takes it."""
        kept = self._early.setdefault(event.job_uid, [])
        self._early.move_to_end(event.job_uid)
        if len(kept) < EARLY_EVENTS:
            kept.append(event)
        else:
            self._lost_early(event.job_uid)
        while len(self._early) > EARLY_JOBS:
            self._lost_early(self._early.popitem(last=False)[0])

    def _lost_early(self, job_uid: str) -> None:
        self._early_lost[job_uid] = None
        while len(self._early_lost) > EARLY_JOBS:
            self._early_lost.popitem(last=False)

    async def _on_event(self, raw: JsonValue, meta: IncomingMeta) -> None:
        try:
            envelope = JOB_UPDATES.envelope.validate_python(raw)
        except ValidationError as exc:
            log.warning("dropped a message on the events queue from %s: %s", meta.user_id, exc)
            return
        match envelope.body:
            case ProgressReport() as report:
                self._on_progress(envelope, report, meta)
            case EventPublished(event=event):
                self._on_job_event(event, meta)

    def _on_job_event(self, event: JobEvent, meta: IncomingMeta) -> None:
        followed = self._trackers.get(event.job_uid)
        if followed is None:
            self._keep_early(event)
            return
        followed[0].offer(event, source=f"the events queue ({meta.routing_key})")
        self._release_if_ended(followed[0])

    def _release_if_ended(self, tracker: JobTracker) -> None:
        """A kept tracker (nobody follows it) whose job ended goes among the ended."""
        if tracker.ended and self._trackers.get(tracker.job_uid) == (tracker, 0):
            del self._trackers[tracker.job_uid]
            self._keep(tracker)

    def _on_progress(
        self, envelope: Envelope[Any], report: ProgressReport, meta: IncomingMeta
    ) -> None:
        followed = self._trackers.get(report.job_uid)
        if followed is None:
            log.debug("dropped a progress report of job %s: nobody follows it", report.job_uid)
            return
        try:
            signer = verify_message(
                envelope.signature,
                message_id=envelope.message_id,
                sent_at=envelope.sent_at,
                body=report,
                keys=self.keys.keys_for("compute"),
                now=datetime.now(UTC),
                window=self._window,
            )
            if signer != "compute":
                raise ForgedSignatureError(f"it is signed by {signer}, not by compute")
        except SignatureError as exc:
            log.warning(
                "dropped a progress report of job %s from broker user %s: %s",
                report.job_uid,
                meta.user_id,
                exc,
            )
            return
        followed[0].report(report)
