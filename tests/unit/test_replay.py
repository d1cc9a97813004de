"""Replay's comparison of the stored log with the streamed history (pure)."""

from __future__ import annotations

from orchestrator.services.replay import compare
from schemas.events import JobEvent, JobState
from tests.unit.test_jobstate import PATHS, history


def test_identical_histories_agree() -> None:
    stored = history(PATHS[JobState.COMPLETED])
    result = compare(stored[0].job_uid, stored, stored + stored[2:4])  # republished duplicates
    assert result.ok, result.problems
    assert result.stored is not None
    assert result.stored.state is JobState.COMPLETED
    assert result.streamed == result.stored


def test_event_missing_from_the_stream_is_named() -> None:
    stored = history(PATHS[JobState.COMPLETED])
    result = compare(stored[0].job_uid, stored, stored[:3] + stored[4:])
    assert not result.ok
    assert "lacks event(s) [4]" in result.problems[0]


def test_event_only_in_the_stream_is_named() -> None:
    stored = history(PATHS[JobState.COMPLETED])
    result = compare(stored[0].job_uid, stored[:-1], stored)
    assert any("that the stored log does not" in problem for problem in result.problems)


def test_job_only_in_the_stream() -> None:
    streamed: list[JobEvent] = history(PATHS[JobState.COMPLETED])
    result = compare(streamed[0].job_uid, [], streamed)
    assert "no stored log" in result.problems
