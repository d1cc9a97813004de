"""The compute daemon's run queue, alone: slots, places, first come first served, drops."""

from __future__ import annotations

from contextlib import ExitStack

import anyio
import pytest

from workers.runqueue import RunQueue


def test_tickets_take_free_slots_then_places_in_order() -> None:
    queue = RunQueue(2)
    with ExitStack() as stack:
        tickets = [stack.enter_context(queue.ticket(f"job{n}")) for n in range(5)]
        assert [t.place for t in tickets] == [None, None, 1, 2, 3]
        assert [t.granted for t in tickets] == [True, True, False, False, False]
        assert [queue.place(f"job{n}") for n in range(5)] == [None, None, 1, 2, 3]
        assert (queue.running, queue.waiting) == (2, 3)


async def test_a_freed_slot_goes_to_the_first_waiting_and_the_rest_move_up() -> None:
    queue = RunQueue(1)
    with ExitStack() as first:
        first.enter_context(queue.ticket("a"))
        with queue.ticket("b") as second, queue.ticket("c") as third:
            assert (second.place, third.place) == (1, 2)
            first.close()  # a's run ends: b's turn; c moves up
            assert second.granted
            assert await second.wait()
            assert (third.granted, queue.place("c")) == (False, 1)
    assert (queue.running, queue.waiting) == (0, 0)
    # Nobody waits: the next ticket takes the free slot at once, not a place.
    with queue.ticket("d") as fourth:
        assert (fourth.granted, fourth.place) == (True, None)


async def test_a_dropped_ticket_leaves_the_queue_and_its_wait_says_so() -> None:
    queue = RunQueue(1)
    with queue.ticket("a"), queue.ticket("b") as dropped, queue.ticket("c"):
        assert queue.drop("b")
        assert not queue.drop("b")
        assert not await dropped.wait()
        assert (dropped.dropped, queue.place("c")) == (True, 1)


async def test_a_waiter_cancelled_gives_up_its_place_and_a_holder_its_slot() -> None:
    queue = RunQueue(1)
    turns: list[str] = []

    async def run(job: str) -> None:
        with queue.ticket(job) as ticket:
            await ticket.wait()
            turns.append(job)
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        with queue.ticket("holder"):
            for job in ("a", "b", "c"):
                group.start_soon(run, job)
                await anyio.wait_all_tasks_blocked()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await run("gone")  # cancelled while it waits: never runs, leaves no trace
            assert queue.waiting == 3
    assert turns == ["a", "b", "c"]
    assert (queue.running, queue.waiting) == (0, 0)


def test_a_queue_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        RunQueue(0)
