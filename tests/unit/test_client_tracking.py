"""What a client makes of a job's events (pure): verified, chained, applied once, in seq order."""

from __future__ import annotations

import logging

import anyio
import pytest

from orchestrator.client.tracking import JobTracker
from orchestrator.core.chain import seal_event
from orchestrator.core.keys import KeyPair
from schemas.events import Completed, JobEvent, JobState
from tests.unit.test_chain import COMPLETED_PATH, KEYS, SERVICE_KEYS, sealed_log
from tests.unit.test_jobstate import JOB

LOG = sealed_log(COMPLETED_PATH)  # submitted … run_started, progress, progress, completed


def tracker() -> JobTracker:
    return JobTracker(JOB, SERVICE_KEYS)


def offer_all(into: JobTracker, events: list[JobEvent]) -> None:
    for event in events:
        into.offer(event, source="test")


def test_events_in_order_fold_into_the_sheet() -> None:
    followed = tracker()
    offer_all(followed, LOG)
    assert followed.events == LOG
    assert followed.sheet is not None
    assert followed.sheet.state is JobState.COMPLETED
    assert followed.sheet.seq == len(LOG)
    assert followed.ended
    assert not followed.has_gap


def test_events_out_of_order_are_held_until_the_gap_is_filled() -> None:
    followed = tracker()
    offer_all(followed, LOG[:2])
    followed.offer(LOG[3], source="test")
    followed.offer(LOG[4], source="test")
    assert followed.has_gap
    assert [event.seq for event in followed.events] == [1, 2]
    followed.offer(LOG[2], source="test")
    assert not followed.has_gap
    assert followed.events == LOG[:5]


def test_copies_are_dropped_and_a_held_event_that_came_again_closes_no_gap() -> None:
    followed = tracker()
    offer_all(followed, [LOG[0], LOG[2], LOG[0], LOG[1], LOG[2], LOG[1]])
    assert followed.events == LOG[:3]
    # Held (seq 4), then applied from a catch-up: the held copy is no gap any more.
    followed.offer(LOG[4], source="test")
    followed.offer(LOG[3], source="catch-up")
    followed.offer(LOG[4], source="catch-up")
    assert followed.events == LOG[:5]
    assert not followed.has_gap


def test_an_event_with_a_bad_seal_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    followed = tracker()
    offer_all(followed, LOG[:4])
    stranger = KeyPair.generate("compute")  # signs as compute, with a key not in ServiceKeys
    claim = LOG[4].model_copy(update={"payload": Completed(summary="forged")})
    forged = seal_event(claim, LOG[3], stranger, "compute")
    edited = LOG[4].model_copy(update={"payload": Completed(summary="edited")})
    with caplog.at_level(logging.WARNING, "parjobs.client"):
        offer_all(followed, [forged, edited, forged.model_copy(update={"signature": None})])
    assert followed.events == LOG[:4]
    assert followed.sheet is not None
    assert followed.sheet.state is JobState.RUNNING
    assert not followed.has_gap
    assert len(caplog.records) == 3
    assert "does not verify" in caplog.records[0].getMessage()
    assert "no signature" in caplog.records[2].getMessage()


def test_a_genuinely_sealed_event_that_breaks_the_chain_is_dropped() -> None:
    followed = tracker()
    offer_all(followed, LOG[:4])
    other_job_run = sealed_log(COMPLETED_PATH, job="b" * 32)
    unchained = seal_event(
        LOG[4].model_copy(update={"payload": Completed(summary="not the log's")}),
        other_job_run[3].model_copy(update={"job_uid": JOB}),
        KEYS["compute"],
        "compute",
    )
    foreign = other_job_run[4]
    offer_all(followed, [unchained, foreign])
    assert followed.events == LOG[:4]
    followed.offer(LOG[4], source="test")
    assert followed.events == LOG[:5]


def test_an_event_of_the_same_seq_with_another_id_is_dropped() -> None:
    followed = tracker()
    offer_all(followed, LOG[:3])
    rival = seal_event(
        LOG[2].model_copy(update={"event_id": "c" * 32}), LOG[1], KEYS["compute"], "compute"
    )
    followed.offer(rival, source="test")
    assert followed.events == LOG[:3]


def test_an_illegal_transition_is_dropped_even_if_sealed_and_chained() -> None:
    followed = tracker()
    illegal = sealed_log(["submitted", "run_started"])  # compute may seal it; not legal now
    offer_all(followed, illegal)
    assert [event.seq for event in followed.events] == [1]


async def test_changed_wakes_on_an_applied_event_or_a_gap_not_on_a_copy() -> None:
    followed = tracker()
    followed.offer(LOG[0], source="test")
    woke: list[int] = []

    async def waiter() -> None:
        await followed.changed()
        woke.append(len(followed.events))

    async with anyio.create_task_group() as group:
        group.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        followed.offer(LOG[0], source="copy")
        await anyio.wait_all_tasks_blocked()
        assert woke == []
        followed.offer(LOG[2], source="early")  # a gap
        await anyio.wait_all_tasks_blocked()
    assert woke == [1]
