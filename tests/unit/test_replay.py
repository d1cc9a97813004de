"""Replay, pure: the stored log's own checks, stream records sorted into counted and rejected, and
the divergence between what counts and the stored log."""

from __future__ import annotations

from orchestrator.core.chain import ChainFault, event_bytes, event_hash
from orchestrator.core.keys import KeyPair
from orchestrator.services.replay import ReplayResult, StreamedEvent, compare
from schemas.events import Completed, JobEvent, JobState, Progress
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
