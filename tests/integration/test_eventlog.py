"""The event store on a real SeaweedFS: writers on separate S3 clients racing their conditional
creates. The logic, lost races on demand included, is tested on the in-memory store in
tests/unit/test_eventlog.py."""

from __future__ import annotations

import uuid

import anyio
import pytest

from orchestrator.errors import IllegalTransitionError
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import Completed, Failed, JobEvent, Progress
from tests.unit.test_eventlog import running_job

pytestmark = pytest.mark.integration


@pytest.fixture
def root(prefix: str) -> str:
    return f"{prefix}jobs/"


@pytest.fixture
def log(store: ObjectStore, root: str) -> EventLog:
    return EventLog(store, root)


async def test_racing_writers_lose_no_update(
    seaweed: LocalSeaweed, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    async with S3ObjectStore(seaweed.settings) as other_store:
        other = EventLog(other_store, root)

        async def write(writer: EventLog, name: str) -> None:
            for n in range(5):
                await writer.transition(job, f"compute:{name}", Progress(message=f"{name}{n}"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(write, log, "a")
            tasks.start_soon(write, other, "b")

    events = await log.read(job)
    assert [event.seq for event in events] == list(range(1, 15))
    assert len({event.event_id for event in events}) == 14
    messages = [event.payload.message for event in events if isinstance(event.payload, Progress)]
    assert sorted(messages) == ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2", "b3", "b4"]
    for name in "ab":  # each writer's own events keep its order
        assert [m for m in messages if m[0] == name] == [f"{name}{n}" for n in range(5)]
    assert (await log.load(job)).progress == messages[-1]


async def race_to_end(job: str, first: EventLog, second: EventLog) -> list[object]:
    """`first` appends Completed while `second` appends Failed; what each got, in that order."""
    outcomes: dict[EventLog, object] = {}

    async def end(writer: EventLog, payload: Completed | Failed) -> None:
        try:
            outcomes[writer] = await writer.transition(job, "compute", payload)
        except IllegalTransitionError as exc:
            outcomes[writer] = exc

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(end, first, Completed(summary="done"))
        tasks.start_soon(end, second, Failed(reason="crashed"))
    return [outcomes[first], outcomes[second]]


async def test_completed_and_failed_at_once_exactly_one_wins(
    seaweed: LocalSeaweed, log: EventLog, root: str
) -> None:
    async with S3ObjectStore(seaweed.settings) as other_store:
        other = EventLog(other_store, root)
        for _ in range(3):
            job = await running_job(log)
            outcomes = await race_to_end(job, log, other)
            winners = [o for o in outcomes if isinstance(o, JobEvent)]
            losers = [o for o in outcomes if isinstance(o, IllegalTransitionError)]
            assert (len(winners), len(losers)) == (1, 1)
            assert (winners[0].seq, losers[0].state) == (5, winners[0].payload.type)
            sheet = await log.load(job)
            assert (sheet.seq, sheet.state) == (5, winners[0].payload.type)


async def test_a_duplicate_delivery_handled_twice_at_once_appends_once(
    seaweed: LocalSeaweed, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    event_id = uuid.uuid4().hex
    results: list[JobEvent] = []
    async with S3ObjectStore(seaweed.settings) as other_store:
        other = EventLog(other_store, root)

        async def handle(writer: EventLog) -> None:
            payload = Progress(message="one message")
            results.append(await writer.transition(job, "compute", payload, event_id=event_id))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(handle, log)
            tasks.start_soon(handle, other)

    assert results[0] == results[1]
    assert [event.event_id for event in await log.read(job, after=4)] == [event_id]
