"""The event store against a real SeaweedFS: appends, refusals, and real racing writers."""

from __future__ import annotations

import uuid

import anyio
import pytest
from pydantic import ValidationError

from orchestrator.core.jobstate import fold
from orchestrator.errors import (
    AppendConflictError,
    EventLogCorruptError,
    IllegalTransitionError,
    JobExistsError,
    JobNotFoundError,
)
from orchestrator.store.eventlog import EventLog
from orchestrator.store.s3 import S3ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import (
    Completed,
    EventPayload,
    Failed,
    JobEvent,
    JobState,
    Progress,
    RunStarted,
)
from tests.unit.test_jobstate import RUN, SAMPLES, SUBMITTED, USER

pytestmark = pytest.mark.integration


@pytest.fixture
def root(prefix: str) -> str:
    return f"{prefix}jobs/"


@pytest.fixture
def log(store: S3ObjectStore, root: str) -> EventLog:
    return EventLog(store, root)


async def running_job(log: EventLog) -> str:
    """A new job, contracted and started: its log is at seq 4."""
    job = uuid.uuid4().hex
    await log.create(job, f"user:{USER}", SUBMITTED)
    await log.transition(job, "storage", SAMPLES["storage_contracted"])
    await log.transition(job, "compute", SAMPLES["compute_contracted"])
    await log.transition(job, "compute", RunStarted())
    return job


class RivalStore(S3ObjectStore):
    """Before each conditional create, lets a rival writer append its event first: a lost race on
    demand, with the server's own 412 doing the refusing."""

    def __init__(self, store: S3ObjectStore, log: EventLog, rivals: list[JobEvent]) -> None:
        super().__init__(store.settings)
        self._store = store
        self._log = log
        self.rivals = rivals

    async def put_if_absent(self, key: str, data: bytes) -> str:
        if self.rivals:
            await self._log.append(self.rivals.pop(0))
        return await super().put_if_absent(key, data)


def rival(job: str, seq: int, payload: EventPayload) -> JobEvent:
    return JobEvent(job_uid=job, seq=seq, actor="compute:rival", payload=payload)


# --- one writer --------------------------------------------------------------------------------


async def test_create_transitions_and_load(log: EventLog, store: S3ObjectStore, root: str) -> None:
    job = uuid.uuid4().hex
    written = [await log.create(job, f"user:{USER}", SUBMITTED)]
    for actor, name in [
        ("storage", "storage_contracted"),
        ("compute", "compute_contracted"),
        ("compute", "run_started"),
        ("compute", "progress"),
        ("compute", "completed"),
    ]:
        written.append(await log.transition(job, actor, SAMPLES[name]))

    assert [event.seq for event in written] == [1, 2, 3, 4, 5, 6]
    assert [info.key for info in await store.list(root)] == [
        f"{root}{job}/events/{seq:010d}.json" for seq in range(1, 7)
    ]
    assert await log.read(job) == written
    assert await log.read(job, after=4) == written[4:]
    assert await log.read(job, after=6) == []
    sheet = await log.load(job)
    assert sheet == fold(written)
    assert (sheet.state, sheet.seq, sheet.run_par) == (JobState.COMPLETED, 6, RUN)


async def test_an_unknown_job_is_not_found(log: EventLog) -> None:
    job = uuid.uuid4().hex
    assert await log.read(job) == []
    with pytest.raises(JobNotFoundError, match=job):
        await log.load(job)
    with pytest.raises(JobNotFoundError, match=job):
        await log.transition(job, "storage", SAMPLES["storage_contracted"])


async def test_a_second_create_is_refused_and_the_first_kept(log: EventLog) -> None:
    job = uuid.uuid4().hex
    first = await log.create(job, f"user:{USER}", SUBMITTED)
    with pytest.raises(JobExistsError, match=f"job {job} already exists") as caught:
        await log.create(job, "access", SUBMITTED)
    assert isinstance(caught.value, AppendConflictError)
    assert await log.read(job) == [first]


async def test_a_retried_create_with_its_event_id_returns_the_first(log: EventLog) -> None:
    job, event_id = uuid.uuid4().hex, uuid.uuid4().hex
    first = await log.create(job, "access", SUBMITTED, event_id=event_id)
    again = await log.create(job, "access", SUBMITTED, event_id=event_id)
    assert again == first
    assert await log.read(job) == [first]


async def test_an_illegal_transition_writes_nothing(log: EventLog) -> None:
    job = uuid.uuid4().hex
    await log.create(job, "access", SUBMITTED)
    with pytest.raises(IllegalTransitionError, match="'completed' is not legal in state"):
        await log.transition(job, "compute", SAMPLES["completed"])
    assert len(await log.read(job)) == 1


async def test_a_raw_append_of_a_taken_seq_conflicts(log: EventLog) -> None:
    job = await running_job(log)
    with pytest.raises(AppendConflictError, match="event 4 was already written"):
        await log.append(rival(job, 4, Progress(message="late")))


async def test_a_repeated_event_id_appends_nothing(log: EventLog) -> None:
    job = await running_job(log)
    event_id = uuid.uuid4().hex
    first = await log.transition(job, "compute", Progress(message="once"), event_id=event_id)
    await log.transition(job, "compute", Progress(message="other"))
    again = await log.transition(job, "compute", Progress(message="once"), event_id=event_id)
    assert again == first
    assert [event.seq for event in await log.read(job)] == [1, 2, 3, 4, 5, 6]


async def test_a_repeated_event_id_is_found_even_once_illegal(log: EventLog) -> None:
    job = await running_job(log)
    event_id = uuid.uuid4().hex
    done = await log.transition(job, "compute", SAMPLES["completed"], event_id=event_id)
    assert await log.transition(job, "compute", SAMPLES["completed"], event_id=event_id) == done


# --- keys and corruption -----------------------------------------------------------------------


def test_a_job_uid_cannot_steer_keys(store: S3ObjectStore) -> None:
    with pytest.raises(ValidationError):
        EventLog(store).event_key("../../registry", 1)
    assert EventLog(store).event_key("a" * 32, 12) == f"jobs/{'a' * 32}/events/0000000012.json"


@pytest.mark.parametrize(
    ("name", "body", "complaint"),
    [
        ("0000000005.json", b"{not json", "not a valid event"),
        ("0000000005.json", None, "holds event 4"),
        ("notes.txt", b"hello", "no event"),
    ],
)
async def test_a_corrupt_log_is_reported(
    log: EventLog, store: S3ObjectStore, name: str, body: bytes | None, complaint: str
) -> None:
    job = await running_job(log)
    stored = await log.read(job)
    data = stored[-1].model_dump_json().encode() if body is None else body
    await store.put(log.events_prefix(job) + name, data)
    with pytest.raises(EventLogCorruptError, match=complaint):
        await log.read(job)


# --- lost races --------------------------------------------------------------------------------


async def test_a_lost_race_rereads_and_appends_next(
    store: S3ObjectStore, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    async with RivalStore(store, log, [rival(job, 5, Progress(message="rival"))]) as racing:
        ours = await EventLog(racing, root).transition(job, "compute", Progress(message="ours"))
    assert ours.seq == 6
    assert [event.actor for event in await log.read(job, after=4)] == ["compute:rival", "compute"]


async def test_a_lost_race_that_ends_the_job_makes_ours_illegal(
    store: S3ObjectStore, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    rivals = [rival(job, 5, Failed(reason="out of memory"))]
    async with RivalStore(store, log, rivals) as racing:
        with pytest.raises(IllegalTransitionError, match="not legal in state 'failed'"):
            await EventLog(racing, root).transition(job, "compute", Progress(message="late"))
    assert (await log.load(job)).state is JobState.FAILED


async def test_a_lost_race_with_our_own_event_id_returns_it(
    store: S3ObjectStore, log: EventLog, root: str
) -> None:
    # As when our write landed but its reply was lost and the client retried.
    job = await running_job(log)
    mine = rival(job, 5, Progress(message="mine"))
    async with RivalStore(store, log, [mine]) as racing:
        found = await EventLog(racing, root).transition(
            job, "compute", Progress(message="mine"), event_id=mine.event_id
        )
    assert found == mine
    assert len(await log.read(job)) == 5


async def test_always_losing_gives_up_after_max_attempts(
    store: S3ObjectStore, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    rivals = [rival(job, seq, Progress(message=f"rival {seq}")) for seq in (5, 6, 7)]
    async with RivalStore(store, log, rivals) as racing:
        with pytest.raises(AppendConflictError, match="after 3 attempts"):
            await EventLog(racing, root).transition(
                job, "compute", Progress(message="ours"), max_attempts=3
            )
    assert [event.seq for event in await log.read(job)] == [1, 2, 3, 4, 5, 6, 7]


# --- real concurrency: two writers, each with its own S3 client --------------------------------


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
