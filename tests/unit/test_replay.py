"""Replay: the stored log's own checks, stream records sorted into counted and rejected, and
the divergence between what counts and the stored log (pure); then every job of a store."""

from __future__ import annotations

from orchestrator.broker.memory import MemoryBroker
from orchestrator.core.chain import ChainFault, event_bytes, event_hash
from orchestrator.core.keys import KeyPair
from orchestrator.services.replay import ReplayResult, StreamedEvent, compare, replay
from orchestrator.settings import AMQPSettings
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.memory import MemoryObjectStore
from schemas.events import Completed, JobEvent, JobState, Progress
from schemas.messages import Envelope, EventPublished
from tests._forwarding import CountingStore
from tests.unit.test_chain import (
    COMPLETED_PATH,
    SERVICE_KEYS,
    edited,
    resigned,
    sealed_log,
)
from tests.unit.test_jobstate import JOB, SAMPLES, event


def stream_of(events: list[JobEvent]) -> list[StreamedEvent]:
    return [StreamedEvent(e, offset) for offset, e in enumerate(events, start=100)]


def replayed(stored: list[JobEvent], streamed: list[JobEvent]) -> ReplayResult:
    return compare(
        JOB,
        stored,
        stream_of(streamed),
        SERVICE_KEYS,
        event_key=lambda seq: f"jobs/{JOB}/events/{seq:010d}.json",
    )


def rejections(result: ReplayResult) -> list[tuple[int, ChainFault]]:
    return [(r.record.event.seq, r.fault) for r in result.rejected]


def forged_by_a_stranger(unsealed: JobEvent, prev: JobEvent) -> JobEvent:
    """What anyone who may publish to the events exchange can make: a record claiming a role."""
    draft = unsealed.model_copy(update={"prev_hash": event_hash(prev), "signer": "compute"})
    return draft.model_copy(
        update={"signature": KeyPair.generate("compute").sign(event_bytes(draft))}
    )


# --- agreement -----------------------------------------------------------------------------------


def test_a_clean_log_and_its_stream_agree() -> None:
    stored = sealed_log(COMPLETED_PATH)
    result = replayed(stored, stored)
    assert result.ok, result.problems
    assert (result.tampered, result.rejected) == ([], [])
    assert result.stored is not None
    assert result.stored.state is JobState.COMPLETED
    assert result.streamed == result.stored


def test_duplicate_and_reordered_records_are_normal() -> None:
    # At-least-once publishing repeats records; the relay republishes old ones later.
    stored = sealed_log(COMPLETED_PATH)
    result = replayed(stored, [*stored[3:], *stored, stored[2], stored[4]])
    assert result.ok, result.problems
    assert result.rejected == []
    assert result.streamed == result.stored


# --- records that do not count: rejected, never a failure ---------------------------------------


def test_a_forged_record_is_rejected_and_fails_nothing() -> None:
    stored = sealed_log(COMPLETED_PATH[:-1])
    completed = event(len(stored) + 1, Completed(cpu_seconds=0.0), actor="compute")
    forged = forged_by_a_stranger(completed, stored[-1])
    result = replayed(stored, [*stored, forged])
    assert result.ok, result.problems
    assert rejections(result) == [(len(stored) + 1, ChainFault.FORGED)]
    assert "at offset" in str(result.rejected[0])
    assert result.streamed == result.stored


def test_a_forged_job_that_only_the_stream_has_is_rejected_and_fails_nothing() -> None:
    forged = forged_by_a_stranger(
        event(2, SAMPLES["compute_contracted"], actor="compute"), sealed_log(["submitted"])[0]
    )
    unsigned = event(1, SAMPLES["submitted"], actor="user:mallory")
    result = replayed([], [unsigned, forged])
    assert result.ok, result.problems
    assert rejections(result) == [(1, ChainFault.UNSIGNED), (2, ChainFault.FORGED)]
    assert (result.stored, result.streamed) == (None, None)


def test_a_record_forged_with_a_stored_events_id_is_rejected_and_the_genuine_one_counts() -> None:
    stored = sealed_log(COMPLETED_PATH)
    spoof = forged_by_a_stranger(
        stored[-1].model_copy(update={"payload": Completed(cpu_seconds=0.0)}), stored[-2]
    )
    result = replayed(stored, [*stored, spoof])
    assert result.ok, result.problems
    assert rejections(result) == [(len(stored), ChainFault.FORGED)]


def test_a_genuine_role_emitting_another_roles_event_is_rejected() -> None:
    stored = sealed_log(COMPLETED_PATH[:-1])
    stray = resigned(
        event(len(stored) + 1, Completed(), actor="storage"),
        "storage",
        prev_hash=None,
    )
    result = replayed(stored, [*stored, stray])
    assert result.ok, result.problems
    assert rejections(result) == [(len(stored) + 1, ChainFault.FORBIDDEN_SIGNER)]


def test_a_sealed_record_off_the_chain_is_rejected() -> None:
    # Genuinely compute's, but continuing no known event: a replayed or misdirected record.
    stored = sealed_log(COMPLETED_PATH[:-1])
    off_chain = resigned(
        event(len(stored) + 1, Progress(message="?"), actor="compute"),
        "compute",
        prev_hash="0" * 64,
    )
    result = replayed(stored, [*stored, off_chain])
    assert result.ok, result.problems
    assert rejections(result) == [(len(stored) + 1, ChainFault.BROKEN_LINK)]
    assert "does not continue the job's chain" in result.rejected[0].detail


def test_an_unsigned_record_is_rejected() -> None:
    stored = sealed_log(COMPLETED_PATH)
    result = replayed(stored, [*stored, edited(stored[3], signer=None, signature=None)])
    assert result.ok, result.problems
    assert rejections(result) == [(4, ChainFault.UNSIGNED)]


# --- the stored log tampered with: named, and a failure -----------------------------------------


def test_an_edited_stored_event_is_named_by_key_and_seq() -> None:
    genuine = sealed_log(COMPLETED_PATH)
    stored = [*genuine[:-1], edited(genuine[-1], payload=Completed(cpu_seconds=0.0))]
    result = replayed(stored, genuine)
    assert not result.ok
    assert [(p.seq, p.fault) for p in result.tampered] == [(7, ChainFault.FORGED)]
    assert result.problems[0].startswith(
        f"stored event 7 (jobs/{JOB}/events/0000000007.json) signature invalid:"
    )
    assert "the stream has other sealed versions of stored event(s) [7]" in result.problems
    assert result.rejected == []


def test_a_removed_stored_event_is_a_gap_and_the_stream_still_has_it() -> None:
    genuine = sealed_log(COMPLETED_PATH)
    result = replayed(genuine[:3] + genuine[4:], genuine)
    assert [(p.seq, p.fault) for p in result.tampered] == [(5, ChainFault.SEQ_GAP)]
    assert any("sealed event(s) [4] that the stored log does not" in p for p in result.problems)
    assert result.rejected == []


def test_a_stored_event_resigned_by_the_wrong_role_is_named() -> None:
    genuine = sealed_log(COMPLETED_PATH)
    stored = list(genuine)
    stored[4] = resigned(genuine[4], "access", payload=Progress(message="rewritten"))
    result = replayed(stored, genuine)
    assert [(p.seq, p.fault) for p in result.tampered] == [
        (5, ChainFault.FORBIDDEN_SIGNER),
        (5, ChainFault.EDITED),
    ]
    assert not result.ok


def test_events_lost_from_the_end_of_the_store_are_found_on_the_stream() -> None:
    # The stored log alone still verifies; the stream's sealed events show what it lost.
    genuine = sealed_log(COMPLETED_PATH)
    result = replayed(genuine[:-2], genuine)
    assert result.tampered == []
    assert any("sealed event(s) [6, 7] that the stored log does not" in p for p in result.problems)


def test_a_lost_stored_log_is_named() -> None:
    result = replayed([], sealed_log(COMPLETED_PATH))
    assert "no stored log" in result.problems


# --- divergence of what counts -----------------------------------------------------------------


def test_an_event_missing_from_the_stream_is_named() -> None:
    stored = sealed_log(COMPLETED_PATH)
    result = replayed(stored, stored[:3] + stored[4:])
    assert not result.ok
    assert "lacks event(s) [4]" in result.problems[0]
    # The records after the gap still continue the chain through the stored event 4.
    assert result.rejected == []


def test_a_stream_record_that_is_a_forged_stored_event_byte_for_byte_is_still_rejected() -> None:
    # A record identical to a stored event is taken on the stored event's seal only if it held.
    genuine = sealed_log(COMPLETED_PATH)
    forged = edited(genuine[-1], payload=Completed(cpu_seconds=0.0))
    result = replayed([*genuine[:-1], forged], [*genuine[:-1], forged])
    assert rejections(result) == [(7, ChainFault.FORGED)]
    assert [(p.seq, p.fault) for p in result.tampered] == [(7, ChainFault.FORGED)]


# --- every job of a store and a stream ----------------------------------------------------------


async def stored_and_streamed(
    store: ObjectStore, broker: MemoryBroker, logs: dict[str, list[JobEvent]]
) -> None:
    """Each log stored where the services store it, and published on the events stream."""
    await broker.declare()
    for events in logs.values():
        for stored in events:
            await store.put_if_absent(
                f"jobs/{stored.job_uid}/events/{stored.seq:010d}.json",
                stored.model_dump_json().encode(),
            )
            body = Envelope(sender="test", body=EventPublished(event=stored))
            await broker.publish(broker.topology.events, f"job.ada.{stored.job_uid}", body)


async def test_replay_lists_the_root_once_and_checks_every_job() -> None:
    logs = {job: sealed_log(COMPLETED_PATH, job=job) for job in (c * 32 for c in "bdc")}
    logs["e" * 32] = sealed_log(["submitted"], job="e" * 32)[:1]
    store = CountingStore(MemoryObjectStore())
    async with MemoryBroker(AMQPSettings(prefix="replay-test")) as broker:
        await stored_and_streamed(store, broker, logs)
        await store.put("jobs/" + "b" * 32 + "/input", b"not an event: not listed as one")
        store.lists.clear()
        results = await replay(EventLog(store), broker, SERVICE_KEYS, jobs_at_once=2)
    assert [r.job_uid for r in results] == sorted(logs)
    assert all(r.ok for r in results), [r.problems for r in results]
    assert [r.stored.seq if r.stored else 0 for r in results] == [7, 7, 7, 1]
    assert store.lists == [("jobs/", None)]
    assert len(store.gets) == 3 * 7 + 1


async def test_replay_names_a_gap_a_stray_folder_and_a_log_only_the_stream_has() -> None:
    gapped, lost = "b" * 32, "c" * 32
    store = MemoryObjectStore()
    async with MemoryBroker(AMQPSettings(prefix="replay-test")) as broker:
        await stored_and_streamed(store, broker, {gapped: sealed_log(COMPLETED_PATH, job=gapped)})
        await store.delete(f"jobs/{gapped}/events/0000000004.json")
        await store.put("jobs/Not-A-Job/events/0000000001.json", b"{}")
        await stored_and_streamed(
            MemoryObjectStore(), broker, {lost: sealed_log(["submitted"], job=lost)}
        )
        results = {r.job_uid: r for r in await replay(EventLog(store), broker, SERVICE_KEYS)}
    assert results[gapped].problems[0].startswith("the stored log cannot be read:")
    assert "after a gap: no event 4" in results[gapped].problems[0]
    assert results[lost].problems[-1] == "no stored log"
    assert "'Not-A-Job' is no job uid" in results["Not-A-Job"].problems[0]
