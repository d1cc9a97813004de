"""The event store on the in-memory store: appends, refusals, corruption and lost races on demand.

Racing writers on separate clients of a real S3 server: tests/integration/test_eventlog.py.
"""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from orchestrator.core.chain import event_hash, verify_log
from orchestrator.core.jobstate import fold
from orchestrator.core.keys import KeyPair
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import (
    AppendConflictError,
    EventLogCorruptError,
    IllegalTransitionError,
    JobExistsError,
    JobNotFoundError,
)
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import _CACHED_ENDED, _TRIM_EVERY, EventLog, EventSealer
from schemas.events import (
    EventPayload,
    Failed,
    JobEvent,
    JobState,
    Progress,
    RunStarted,
)
from schemas.signing import SERVICE_ROLES, ServiceRole
from tests._forwarding import CountingStore, ForwardingStore
from tests.unit.test_jobstate import RUN, SAMPLES, SUBMITTED, USER


@pytest.fixture
def root(prefix: str) -> str:
    return f"{prefix}jobs/"


@pytest.fixture
def log(store: ObjectStore, root: str) -> EventLog:
    return EventLog(store, root)


async def running_job(log: EventLog) -> str:
    """A new job, contracted and started: its log is at seq 4."""
    job = uuid.uuid4().hex
    await log.create(job, f"user:{USER}", SUBMITTED)
    await log.transition(job, "storage", SAMPLES["storage_contracted"])
    await log.transition(job, "compute", SAMPLES["compute_contracted"])
    await log.transition(job, "compute", RunStarted())
    return job


class RivalStore(ForwardingStore):
    """Before each conditional create, lets a rival writer append its event first: a lost race on
    demand, with the store's own conditional create doing the refusing."""

    def __init__(self, store: ObjectStore, log: EventLog, rivals: list[JobEvent]) -> None:
        super().__init__(store)
        self._log = log
        self.rivals = rivals

    async def put_if_absent(self, key: str, data: bytes) -> str:
        if self.rivals:
            await self._log.append(self.rivals.pop(0))
        return await super().put_if_absent(key, data)


def rival(job: str, seq: int, payload: EventPayload) -> JobEvent:
    return JobEvent(job_uid=job, seq=seq, actor="compute:rival", payload=payload)


# --- one writer --------------------------------------------------------------------------------


async def test_create_transitions_and_load(log: EventLog, store: ObjectStore, root: str) -> None:
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


def test_a_job_uid_cannot_steer_keys(store: ObjectStore) -> None:
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
    log: EventLog, store: ObjectStore, name: str, body: bytes | None, complaint: str
) -> None:
    job = await running_job(log)
    stored = await log.read(job)
    data = stored[-1].model_dump_json().encode() if body is None else body
    await store.put(log.events_prefix(job) + name, data)
    with pytest.raises(EventLogCorruptError, match=complaint):
        await log.read(job)


async def test_a_gap_in_a_log_is_reported(store: ObjectStore, log: EventLog, root: str) -> None:
    job = await running_job(log)
    await store.delete(log.event_key(job, 3))
    with pytest.raises(EventLogCorruptError, match="after a gap: no event 3"):
        await EventLog(store, root).read(job)  # a reader that remembers nothing yet


# --- lost races, on demand --------------------------------------------------------------------


async def test_a_lost_race_rereads_and_appends_next(
    store: ObjectStore, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    async with RivalStore(store, log, [rival(job, 5, Progress(message="rival"))]) as racing:
        ours = await EventLog(racing, root).transition(job, "compute", Progress(message="ours"))
    assert ours.seq == 6
    assert [event.actor for event in await log.read(job, after=4)] == ["compute:rival", "compute"]


async def test_a_lost_race_that_ends_the_job_makes_ours_illegal(
    store: ObjectStore, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    rivals = [rival(job, 5, Failed(reason="out of memory"))]
    async with RivalStore(store, log, rivals) as racing:
        with pytest.raises(IllegalTransitionError, match="not legal in state 'failed'"):
            await EventLog(racing, root).transition(job, "compute", Progress(message="late"))
    assert (await log.load(job)).state is JobState.FAILED


async def test_a_lost_race_with_our_own_event_id_returns_it(
    store: ObjectStore, log: EventLog, root: str
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
    store: ObjectStore, log: EventLog, root: str
) -> None:
    job = await running_job(log)
    rivals = [rival(job, seq, Progress(message=f"rival {seq}")) for seq in (5, 6, 7)]
    async with RivalStore(store, log, rivals) as racing:
        with pytest.raises(AppendConflictError, match="after 3 attempts"):
            await EventLog(racing, root).transition(
                job, "compute", Progress(message="ours"), max_attempts=3
            )
    assert [event.seq for event in await log.read(job)] == [1, 2, 3, 4, 5, 6, 7]


# --- sealed logs ---------------------------------------------------------------------------------

ROLE_KEYS = {role: KeyPair.generate(role) for role in SERVICE_ROLES}
SERVICE_KEYS = ServiceKeys({role: key.public for role, key in ROLE_KEYS.items()})


def sealed_log(store: ObjectStore, root: str, role: ServiceRole) -> EventLog:
    """`role`'s log, as its daemon has it: sealing what it appends, verifying what it reads."""
    return EventLog(store, root, sealer=EventSealer(ROLE_KEYS[role], role), keys=SERVICE_KEYS)


async def test_each_role_seals_what_it_appends_into_one_chain(
    store: ObjectStore, root: str
) -> None:
    access, storage, compute = (sealed_log(store, root, role) for role in SERVICE_ROLES)
    job = uuid.uuid4().hex
    await access.create(job, f"user:{USER}", SUBMITTED)
    await storage.transition(job, "storage", SAMPLES["storage_contracted"])
    await compute.transition(job, "compute", SAMPLES["compute_contracted"])
    events = await EventLog(store, root).read(job)  # as stored
    assert [event.signer for event in events] == ["access", "storage", "compute"]
    assert verify_log(events, SERVICE_KEYS) == []
    assert [event.prev_hash for event in events[1:]] == [event_hash(e) for e in events[:-1]]
    # Each reader verifies, and they agree.
    assert await access.read(job) == await compute.read(job) == events
    assert await access.owner(job) == SUBMITTED.owner


async def test_an_event_edited_behind_the_services_back_makes_the_log_unreadable(
    store: ObjectStore, root: str
) -> None:
    access = sealed_log(store, root, "access")
    job = uuid.uuid4().hex
    await access.create(job, f"user:{USER}", SUBMITTED)
    await sealed_log(store, root, "storage").transition(
        job, "storage", SAMPLES["storage_contracted"]
    )
    first = (await EventLog(store, root).read(job))[0]
    edited = first.model_copy(update={"actor": "user:mallory"})
    await store.put(access.event_key(job, 1), edited.model_dump_json().encode())
    reader = sealed_log(store, root, "compute")  # a daemon that has not read it before
    with pytest.raises(EventLogCorruptError, match=r"event 1 .*signature invalid"):
        await reader.read(job)
    with pytest.raises(EventLogCorruptError):
        await reader.transition(job, "compute", SAMPLES["compute_contracted"])
    assert len(await EventLog(store, root).read(job)) == 2  # nothing appended on top


async def test_an_unsealed_event_in_a_sealed_log_is_refused(store: ObjectStore, root: str) -> None:
    job = uuid.uuid4().hex
    await EventLog(store, root).create(job, f"user:{USER}", SUBMITTED)  # written unsealed
    with pytest.raises(EventLogCorruptError, match="unsigned"):
        await sealed_log(store, root, "storage").read(job)


# --- remembering: what a log wrote or was handed is not read again --------------------------------


async def test_a_log_appends_after_what_it_wrote_without_reading(
    store: ObjectStore, root: str
) -> None:
    async with CountingStore(store) as counting:
        job = await running_job(EventLog(counting, root))
    assert (counting.lists, counting.gets) == ([], [])
    assert len(counting.creates) == 4
    assert (await EventLog(store, root).load(job)).state is JobState.RUNNING


async def test_a_log_behind_the_stored_one_is_judged_again_on_what_it_missed(
    store: ObjectStore, root: str
) -> None:
    mine, other = EventLog(store, root), EventLog(store, root)
    job = uuid.uuid4().hex
    await mine.create(job, f"user:{USER}", SUBMITTED)
    await other.transition(job, "storage", SAMPLES["storage_contracted"])
    # Illegal after event 1, which is all `mine` remembers; legal after the stored event 2.
    event = await mine.transition(job, "compute", SAMPLES["compute_contracted"])
    assert event.seq == 3
    stored = await EventLog(store, root).read(job)
    assert [e.payload.type for e in stored] == [
        "submitted",
        "storage_contracted",
        event.payload.type,
    ]


async def test_a_trigger_stands_for_the_log_up_to_it(store: ObjectStore, root: str) -> None:
    job = uuid.uuid4().hex
    await sealed_log(store, root, "access").create(job, f"user:{USER}", SUBMITTED)
    storage = sealed_log(store, root, "storage")
    trigger = await storage.transition(job, "storage", SAMPLES["storage_contracted"])
    async with CountingStore(store) as counting:
        compute = sealed_log(counting, root, "compute")
        events = await compute.through(trigger)
        await compute.transition(job, "compute", SAMPLES["compute_contracted"])
    assert events == (await EventLog(store, root).read(job))[:2]
    # Event 1 fetched by its key, the trigger as received, nothing listed.
    assert (counting.lists, counting.gets) == ([], [compute.event_key(job, 1)])


async def test_a_trigger_that_does_not_chain_to_the_stored_log_is_not_taken(
    store: ObjectStore, root: str
) -> None:
    job = uuid.uuid4().hex
    first = await sealed_log(store, root, "access").create(job, f"user:{USER}", SUBMITTED)
    # Sealed with storage's key, but chained to a first event that is not the stored one.
    elsewhere = EventSealer(ROLE_KEYS["access"], "access").seal(
        JobEvent(job_uid=job, seq=1, actor=f"user:{USER}", payload=SUBMITTED), None
    )
    forged = EventSealer(ROLE_KEYS["storage"], "storage").seal(
        rival(job, 2, SAMPLES["storage_contracted"]), elsewhere
    )
    compute = sealed_log(store, root, "compute")
    assert await compute.through(forged) == [first]  # the stored log, read and verified
    assert await compute.read(job) == [first]


async def test_an_ended_log_is_not_listed_again(store: ObjectStore, root: str) -> None:
    async with CountingStore(store) as counting:
        log = EventLog(counting, root)
        job = await running_job(log)
        await log.transition(job, "compute", Failed(reason="no"))
        assert (await log.load(job)).state is JobState.FAILED
    assert counting.lists == []


async def test_an_ended_log_whose_end_fails_its_checks_stays_unreadable(
    store: ObjectStore, root: str
) -> None:
    job = uuid.uuid4().hex
    await sealed_log(store, root, "access").create(job, f"user:{USER}", SUBMITTED)
    await sealed_log(store, root, "storage").transition(
        job, "storage", SAMPLES["storage_contracted"]
    )
    reader = sealed_log(store, root, "access")
    assert len(await reader.read(job)) == 2  # verified so far
    end = await sealed_log(store, root, "compute").transition(job, "compute", Failed(reason="x"))
    edited = end.model_copy(update={"actor": "compute:mallory"})
    await store.put(reader.event_key(job, 3), edited.model_dump_json().encode())
    for _ in range(2):  # the second read must not take the verified events for the whole log
        with pytest.raises(EventLogCorruptError, match="event 3"):
            await reader.read(job)


async def test_memory_keeps_the_jobs_in_flight_and_only_the_latest_ended_ones(
    store: ObjectStore, root: str
) -> None:
    log = EventLog(store, root)
    ended = []
    for _ in range(_CACHED_ENDED + _TRIM_EVERY):
        job = await running_job(log)
        await log.transition(job, "compute", Failed(reason="x"))
        ended.append(job)
    running = [await running_job(log) for _ in range(_TRIM_EVERY)]
    kept = set(log._logs)  # what this daemon remembers
    assert set(running) <= kept  # in flight: never dropped for an ended one
    assert set(ended[-_CACHED_ENDED:]) <= kept
    assert not kept & set(ended[:_TRIM_EVERY])  # the oldest ended ones went
    # A dropped log is read again on demand, whole.
    assert (await log.load(ended[0])).state is JobState.FAILED
