"""A compute daemon's run queue: `slots` runs at once, the starts beyond them waiting in order.

A start takes a `Ticket` as it arrives: a slot at once if one is free and nobody waits, else the
next place in the queue (1: next to run). A slot that frees goes to the first ticket waiting; a
ticket dropped (its job stopped while it waited) or given up (its handler ended) leaves the queue,
and the tickets behind it move up. Nothing here is durable: the start message, unacked until its
run ends, is what a crash hands to another daemon.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from orchestrator.metrics import RUN_SLOTS, RUN_SLOTS_IN_USE, RUNS_QUEUED


class Ticket:
    """One start's turn: granted a slot, or waiting for one."""

    def __init__(self, job_uid: str, *, granted: bool, place: int | None) -> None:
        self.job_uid = job_uid
        self.granted = granted
        self.dropped = False
        self.place = place
        """Its place when it joined the queue (1: next to run); None: it had a slot at once."""
        self._turn = anyio.Event()
        if granted:
            self._turn.set()

    def grant(self) -> None:
        self.granted = True
        self._turn.set()

    def drop(self) -> None:
        self.dropped = True
        self._turn.set()

    async def wait(self) -> bool:
        """Wait for a slot: True once it has one, False if it was dropped first."""
        await self._turn.wait()
        return self.granted


class RunQueue:
    """At most `slots` tickets hold a slot at once; the others wait, first come first served."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a run queue needs at least one slot, not {slots}")
        self._slots = slots
        self._running = 0
        self._waiting: OrderedDict[Ticket, None] = OrderedDict()
        # A daemon has one queue: its gauges read this one's counts at each scrape.
        RUN_SLOTS.set(slots)
        RUN_SLOTS_IN_USE.set_function(lambda: self._running)
        RUNS_QUEUED.set_function(lambda: len(self._waiting))

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextmanager
    def ticket(self, job_uid: str) -> Iterator[Ticket]:
        """A turn for a run of `job_uid` for the block's length: its slot (once granted) is
        given to the next ticket when the block ends, and a ticket still waiting leaves."""
        if self._running < self._slots and not self._waiting:
            self._running += 1
            ticket = Ticket(job_uid, granted=True, place=None)
        else:
            ticket = Ticket(job_uid, granted=False, place=len(self._waiting) + 1)
            self._waiting[ticket] = None
        try:
            yield ticket
        finally:
            if ticket.granted:
                self._running -= 1
                self._grant_next()
            else:
                self._waiting.pop(ticket, None)

    def place(self, job_uid: str) -> int | None:
        """The place of `job_uid`'s run in the queue now (1: next); None if it does not wait."""
        for place, ticket in enumerate(self._waiting, start=1):
            if ticket.job_uid == job_uid:
                return place
        return None

    def drop(self, job_uid: str) -> bool:
        """Take `job_uid`'s waiting runs out of the queue (it was stopped); whether any was."""
        dropped = [ticket for ticket in self._waiting if ticket.job_uid == job_uid]
        for ticket in dropped:
            del self._waiting[ticket]
            ticket.drop()
        return bool(dropped)

    def _grant_next(self) -> None:
        while self._running < self._slots and self._waiting:
            ticket, _ = self._waiting.popitem(last=False)
            self._running += 1
            ticket.grant()
