"""Payments end to end: the daemons as processes (`LocalCluster`), the real RabbitMQ and the
session's SeaweedFS, the ledger read straight from the store.

- one cheque, twenty concurrent cashings across two access replicas: it pays exactly once;
- a hundred mixed jobs (completed, failed, expired, cancelled): each hold is settled once, the
  completed ones charged for the CPU they used, the rest refunded, every balance reconciles and
  `parjobs ledger verify` passes;
- the access service SIGKILLed while it cashes or settles: the books balance after its restart.

Each test runs a cluster of its own (broker prefix, data root), removed afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import pytest

from orchestrator import PAR, KeyPair, ObjectWriter
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.broker.base import Broker
from orchestrator.broker.identities import ENDED_EVENTS, Identities
from orchestrator.client.client import ParjobsClient
from orchestrator.core.jobstate import is_terminal
from orchestrator.core.layout import JobKeys
from orchestrator.core.ledger_rules import ACCESS, EXTERNAL, HELD
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import ChequeAlreadyCashedError, ParjobsError
from orchestrator.par.par import RunControl
from orchestrator.services.accounts import Accounts
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.ledger import Ledger
from orchestrator.store.seaweed import LocalSeaweed
from schemas.auth import Authorisation, Cheque
from schemas.events import Completed, JobRequest, JobSheetState, JobState
from schemas.ledger import ZERO, Transaction, to_money
from tests._waiting import eventually
from workers.calculations import CalculationRegistry
from workers.cluster import LocalCluster, s3_environment

pytestmark = pytest.mark.integration

ACCOUNT = "payer"
DEPOSIT = Decimal(1000)
MAX_SPEND = Decimal(5)
TIME_LIMIT_S = 60  # what a job may run for, so what its hold is: the price of that much CPU
CALCULATIONS = CalculationRegistry.from_entry_points()
CHECKSUM = JobRequest(calculation="checksum", parameters={"byte_stats": False})
READY = frozenset({JobState.READY})


def sleep_request(seconds: float, exit_code: int = 0) -> JobRequest:
    return JobRequest(calculation="sleep", parameters={"seconds": seconds, "exit_code": exit_code})


# --- money as the calculations declare it -------------------------------------------------------


def expected_hold(calculation: str) -> Decimal:
    """The most a run may cost: its price for the whole time limit."""
    price = CALCULATIONS.get(calculation).price
    return to_money(price.fixed + price.per_cpu_second * Decimal(TIME_LIMIT_S))


def expected_charge(calculation: str, cpu_seconds: float, held: Decimal) -> Decimal:
    """What a completed run pays: fixed + CPU seconds used x price per CPU second, rounded
    half-even to six places like every amount of the ledger, never more than was held."""
    price = CALCULATIONS.get(calculation).price
    return min(held, to_money(price.fixed + price.per_cpu_second * Decimal(str(cpu_seconds))))


# --- a cluster and its paying user --------------------------------------------------------------


@dataclass
class Paid:
    """A running cluster, a registered and funded user of it, and views of its store."""

    cluster: LocalCluster
    broker: Broker
    """The user's broker connection (as their own broker user)."""
    operator: Broker
    """The operator's: the queues' counts, the dead letters, every job's events."""
    client: ParjobsClient
    store: ObjectStore
    root: str  # the cluster's PARJOBS_DATA_ROOT
    user: KeyPair
    accounts: Accounts
    log: EventLog = field(init=False)
    submitting: int = 0  # submissions sent and not answered yet

    def __post_init__(self) -> None:
        self.log = EventLog(self.store, self.keys.jobs)

    @property
    def keys(self) -> JobKeys:
        return JobKeys(self.root)

    # --- a user's steps --------------------------------------------------------------------------

    def cheque(self, request: JobRequest) -> Cheque:
        return write_cheque(
            self.user,
            payer=ACCOUNT,
            recipient=ACCESS,
            max_spend=MAX_SPEND,
            resource=request_fingerprint(request),
            lifetime=timedelta(hours=1),
        )

    async def submit(
        self,
        request: JobRequest,
        *,
        lifetime_s: int | None = None,
        authorisation: Authorisation | None = None,
        cheque: Cheque | None = None,
    ) -> JobSheetState:
        """Submit `request`, signed (a fresh nonce) and paid (a fresh cheque) unless given."""
        self.submitting += 1
        try:
            return await self.client.submit(
                request,
                authorisation or sign_authorisation(self.user, request),
                cheque or self.cheque(request),
                lifetime_s=lifetime_s,
            )
        finally:
            self.submitting -= 1

    async def ready(self, request: JobRequest) -> tuple[str, PAR]:
        """Submit, wait until contracted, upload a small input: (job uid, run PAR)."""
        sheet = await self.submit(request)
        ready = await self.client.wait_until(sheet.job_uid, READY, timeout=90)
        assert ready.state is JobState.READY, f"{ready.state}: {ready.reason}"
        assert ready.upload_par is not None
        assert ready.run_par is not None
        data = hashlib.sha256(ready.job_uid.encode()).hexdigest().encode() * 40
        await ObjectWriter(PAR(ready.upload_par), self.user).set_object(data)
        return ready.job_uid, PAR(ready.run_par)

    def control(self, run: PAR) -> RunControl:
        return run.execute(self.user, control=self.client)

    async def run(self, request: JobRequest) -> tuple[str, str]:
        """Submit, upload, start and wait until the run ends: (job uid, final state)."""
        job_uid, run = await self.ready(request)
        control = self.control(run)
        assert (await control.start()).accepted
        final = await control.wait(timeout=90)
        return job_uid, final.state

    # --- the system as the store holds it (not through the access service) -----------------------

    def ledger(self) -> Ledger:
        return Ledger(self.store, self.keys.ledger)

    async def transactions(self) -> list[Transaction]:
        return await self.ledger().read()

    async def job_uids(self) -> set[str]:
        return set(await self.log.job_uids())

    async def sheets(self) -> dict[str, JobSheetState]:
        uids = await self.job_uids()
        sheets: dict[str, JobSheetState] = {}
        limit = anyio.Semaphore(16)

        async def load(job_uid: str) -> None:
            async with limit:
                sheets[job_uid] = await EventLog(self.store, self.keys.jobs).load(job_uid)

        async with anyio.create_task_group() as group:
            for job_uid in uids:
                group.start_soon(load, job_uid)
        return sheets

    async def cpu_seconds(self, job_uid: str) -> float:
        """What the job's Completed event says its run used."""
        last = (await self.log.read(job_uid))[-1].payload
        assert isinstance(last, Completed), last
        return last.cpu_seconds

    async def ledger_verify_cli(self) -> tuple[int, str]:
        """`parjobs ledger verify` as an operator runs it: (exit code, output)."""
        env = {
            **os.environ,
            **s3_environment(self.cluster.s3),
            "PARJOBS_DATA_ROOT": self.root,
        }
        parjobs = Path(sys.executable).with_name("parjobs")
        assert parjobs.exists(), f"no {parjobs}: pip install -e '.[dev]'"
        done = await anyio.run_process([str(parjobs), "ledger", "verify"], env=env, check=False)
        return done.returncode, (done.stdout + done.stderr).decode(errors="replace")

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of `queue`, as the broker says now."""
        url = self.operator.settings.amqp_url.get_secret_value()
        connection = await aio_pika.connect(url)
        async with connection, connection.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return result.message_count or 0, result.consumer_count or 0


@asynccontextmanager
async def open_cluster(
    seaweed: LocalSeaweed,
    store: ObjectStore,
    overrides: dict[str, str] | None = None,
    *,
    replicas: dict[str, int] | None = None,
) -> AsyncIterator[Paid]:
    """A LocalCluster with a broker prefix and data root of its own, and a user with DEPOSIT."""
    tag = uuid.uuid4().hex[:10]
    root = f"pay-{tag}/"
    cluster = LocalCluster(
        seaweed.settings,
        prefix=f"pay-{tag}",
        overrides={
            "PARJOBS_DATA_ROOT": root,
            "PARJOBS_TIME_LIMIT_S": str(TIME_LIMIT_S),
            **(overrides or {}),
        },
        replicas=replicas,
        delete_topology=True,  # stop() deletes the prefix's queues, exchanges and broker users
    )
    user = KeyPair.generate(ACCOUNT)
    try:
        await cluster.start()
        user_amqp = await cluster.add_user(ACCOUNT, user.public)
        accounts = Accounts(store, JobKeys(root))
        await accounts.deposit(ACCOUNT, DEPOSIT)
        async with (
            AMQPBroker(user_amqp, name=f"pay-client-{tag}") as broker,
            AMQPBroker(cluster.operator_amqp, name=f"pay-operator-{tag}") as operator,
            ParjobsClient(
                broker, user, service_keys=cluster.service_keys, timeout=90, sender="pay-test"
            ) as client,
        ):
            yield Paid(
                cluster=cluster,
                broker=broker,
                operator=operator,
                client=client,
                store=store,
                root=root,
                user=user,
                accounts=accounts,
            )
    finally:
        # A daemon a test left SIGSTOPped would ignore the SIGTERM of stop() for 30 s.
        for name in cluster.instances:
            with contextlib.suppress(KeyError, ProcessLookupError):
                os.killpg(cluster.pid(name), signal.SIGCONT)
        await cluster.stop()
        await store.delete_prefix(root)


# --- helpers ------------------------------------------------------------------------------------


def refused_as_cashed(outcome: JobSheetState | BaseException, cheque_id: str, winner: str) -> bool:
    """Whether `outcome` is access's ChequeAlreadyCashedError for `cheque_id`, naming `winner`,
    rebuilt by the client with its details."""
    if not isinstance(outcome, ChequeAlreadyCashedError):
        return False
    named = f"cheque {cheque_id} was already cashed, for job {winner}" in str(outcome)
    return named and (outcome.cheque_id, outcome.job_uid) == (cheque_id, winner)


def log_messages(cluster: LocalCluster, name: str) -> list[str]:
    """The `message` of every JSON log line daemon `name` wrote."""
    messages = []
    for line in cluster.log_path(name).read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and isinstance(entry.get("message"), str):
                messages.append(entry["message"])
    return messages


async def ledger_state_settled(h: Paid, ended: set[str]) -> bool:
    state = await h.ledger().state()
    return ended <= set(state.settled)


@dataclass
class Books:
    """The ledger, job by job, once `check_books` found it sound."""

    holds: dict[str, Transaction]
    settles: dict[str, Transaction]
    charges: dict[str, Decimal]  # settled jobs: what each was charged
    sheets: dict[str, JobSheetState]


async def check_books(h: Paid, *, deposits: Decimal = DEPOSIT) -> Books:
    """Every invariant of the books, checked from the store (independently of access's view):

    `verify_books` is clean; every job has exactly one hold and every hold its job; no cheque is
    cashed twice; each hold is what the calculation may cost and is the one the job's log names;
    an ended job is settled once (charged its CPU if it completed, refunded in full otherwise), a
    live one not at all; every balance is what the deposits, charges and open holds make it.
    """
    problems = await h.accounts.verify_books()
    assert problems == [], problems
    txs = await h.transactions()
    assert [tx.seq for tx in txs] == list(range(1, len(txs) + 1))
    by_kind: dict[str, dict[str, list[Transaction]]] = defaultdict(lambda: defaultdict(list))
    for tx in txs:
        if tx.job_uid is not None:
            by_kind[tx.kind][tx.job_uid].append(tx)
    hold_lists, settle_lists = by_kind["hold"], by_kind["settle"]
    assert all(len(found) == 1 for found in hold_lists.values()), "a job was held for twice"
    assert all(len(found) == 1 for found in settle_lists.values()), "a job was settled twice"
    holds = {uid: found[0] for uid, found in hold_lists.items()}
    settles = {uid: found[0] for uid, found in settle_lists.items()}
    cashed = Counter(tx.cheque_id for tx in holds.values())
    assert all(count == 1 for count in cashed.values()), f"a cheque was cashed twice: {cashed}"

    sheets = await h.sheets()
    assert set(sheets) == set(holds), (
        f"jobs without a hold: {set(sheets) - set(holds)}; "
        f"holds without a job: {set(holds) - set(sheets)}"
    )
    assert set(settles) <= set(holds)
    charges: dict[str, Decimal] = {}
    open_holds = ZERO
    for job_uid, sheet in sheets.items():
        hold = holds[job_uid]
        held = hold.notes[0].amount
        assert [(n.account, n.side) for n in hold.notes] == [(ACCOUNT, "debit"), (HELD, "credit")]
        assert held == expected_hold(sheet.request.calculation), job_uid
        assert sheet.payment is not None, job_uid
        assert (sheet.payment.held, sheet.payment.ledger_seq) == (held, hold.seq), job_uid
        assert sheet.payment.cheque.cheque_id == hold.cheque_id, job_uid
        if not is_terminal(sheet.state):
            assert job_uid not in settles, f"live job {job_uid} was settled"
            open_holds += held
            continue
        assert job_uid in settles, f"job {job_uid} ended {sheet.state.value}, never settled"
        if sheet.state is JobState.COMPLETED:
            cpu = await h.cpu_seconds(job_uid)
            charge = expected_charge(sheet.request.calculation, cpu, held)
        else:
            charge = ZERO  # failed, cancelled, expired: refunded in full
        credits = {n.account: n.amount for n in settles[job_uid].notes if n.side == "credit"}
        debits = [(n.account, n.amount) for n in settles[job_uid].notes if n.side == "debit"]
        assert debits == [(HELD, held)], job_uid
        assert credits.get(ACCESS, ZERO) == charge, (job_uid, sheet.state, credits, charge)
        assert credits.get(ACCOUNT, ZERO) == held - charge, (job_uid, credits)
        assert set(credits) <= {ACCESS, ACCOUNT}
        charges[job_uid] = charge

    charged = sum(charges.values(), ZERO)
    state = await h.ledger().state()
    assert state.balances.get(ACCOUNT, ZERO) == deposits - charged - open_holds
    assert await h.accounts.balance(ACCOUNT) == deposits - charged - open_holds
    assert state.balances.get(ACCESS, ZERO) == charged
    assert state.balances.get(HELD, ZERO) == open_holds
    assert state.balances.get(EXTERNAL, ZERO) == -deposits
    assert sum(state.balances.values(), ZERO) == ZERO
    statement = await h.accounts.statement(ACCOUNT)
    assert statement[-1].balance == state.balances[ACCOUNT]
    assert Counter(row.kind for row in statement)["hold"] == len(holds)
    return Books(holds=holds, settles=settles, charges=charges, sheets=sheets)


# --- 1. one cheque, twenty cashings, two access processes -----------------------------------------


async def test_twenty_concurrent_cashings_of_one_cheque_across_two_access_replicas_pay_once(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    async with open_cluster(seaweed, store, replicas={"access": 2}) as h:
        replicas = h.cluster.replicas("access")
        assert replicas == ("access", "access#2")
        assert h.cluster.pid("access") != h.cluster.pid("access#2")
        rpc_queue = h.broker.topology.rpc_queue("access").name
        assert await h.queue_counts(rpc_queue) == (0, 2), "both replicas consume access requests"

        request = CHECKSUM
        cheque = h.cheque(request)
        # Twenty submissions of one request: each signed afresh (its own nonce), one cheque.
        authorisations = [sign_authorisation(h.user, request) for _ in range(20)]
        assert len({auth.nonce for auth in authorisations}) == 20
        outcomes: dict[int, JobSheetState | BaseException] = {}

        async def attempt(index: int) -> None:
            try:
                outcomes[index] = await h.submit(
                    request, authorisation=authorisations[index], cheque=cheque
                )
            except ParjobsError as exc:
                outcomes[index] = exc

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for index in range(20):
                    group.start_soon(attempt, index)

        admitted = [o for o in outcomes.values() if isinstance(o, JobSheetState)]
        assert len(admitted) == 1, f"{len(admitted)} jobs for one cheque: {outcomes}"
        winner = admitted[0].job_uid
        refused = [o for o in outcomes.values() if not isinstance(o, JobSheetState)]
        assert len(refused) == 19
        assert all(refused_as_cashed(o, cheque.cheque_id, winner) for o in refused), refused

        # Exactly one job, paid once.
        assert await h.job_uids() == {winner}
        price = expected_hold("checksum")
        holds = [tx for tx in await h.transactions() if tx.kind == "hold"]
        assert [(tx.job_uid, tx.cheque_id) for tx in holds] == [(winner, cheque.cheque_id)]
        statement = await h.accounts.statement(ACCOUNT)
        assert [(row.kind, row.amount) for row in statement] == [
            ("deposit", DEPOSIT),
            ("hold", -price),
        ]
        assert await h.accounts.balance(ACCOUNT) == DEPOSIT - price
        assert await h.accounts.balance(HELD) == price
        sheet = (await h.client.job(winner)).sheet
        assert sheet.payment is not None
        assert sheet.payment.cheque == cheque
        assert sheet.payment.held == price
        assert await h.accounts.verify_books() == []
        await check_books(h)

        # Both access processes took some of the twenty: each logged refusals of this cheque.
        cashed = ChequeAlreadyCashedError.code
        mark = f"refused ({cashed}): cheque {cheque.cheque_id} was already cashed"
        per_replica = {
            name: sum(mark in message for message in log_messages(h.cluster, name))
            for name in replicas
        }
        assert sum(per_replica.values()) == 19, per_replica
        assert all(count >= 1 for count in per_replica.values()), per_replica
        print(f"refusals per access replica: {per_replica}")


# --- 2. a hundred mixed jobs -------------------------------------------------------------------


async def test_a_hundred_mixed_jobs_settle_once_and_every_balance_reconciles(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    overrides = {"PARJOBS_MAX_RUNS": "12", "PARJOBS_SWEEP_INTERVAL_S": "0.5"}
    # Two access replicas: both admit, expire and settle (an end's event reaches one of them,
    # both sweeps may settle it too), so "settled exactly once" is tested under a race.
    async with open_cluster(seaweed, store, overrides, replicas={"access": 2}) as h:
        expected: dict[str, JobState] = {}  # job uid -> the end it must reach
        reasons: dict[str, str] = {}  # failed and cancelled jobs: why they must have ended
        started = time.monotonic()
        flows = anyio.Semaphore(24)  # jobs in flight at once (2 cores)

        async def completes(n: int) -> None:
            async with flows:
                job_uid, final = await h.run(CHECKSUM)
            expected[job_uid] = JobState.COMPLETED
            assert final == "completed", (job_uid, final)

        async def fails(n: int) -> None:
            async with flows:
                job_uid, final = await h.run(sleep_request(0.1, exit_code=3))
            expected[job_uid] = JobState.FAILED
            reasons[job_uid] = "exited with code 3"
            assert final == "failed", (job_uid, final)

        async def expires(n: int) -> None:
            # Never uploaded, never started: its deadline expires it past its 4 s lifetime.
            sheet = await h.submit(CHECKSUM, lifetime_s=4)
            expected[sheet.job_uid] = JobState.EXPIRED
            ended = await h.client.wait_until(
                sheet.job_uid, frozenset({JobState.EXPIRED}), timeout=60
            )
            assert ended.state is JobState.EXPIRED, (sheet.job_uid, ended.state)

        async def cancelled_before_start(n: int) -> None:
            async with flows:
                job_uid, run = await h.ready(CHECKSUM)
                reply = await h.control(run).stop()
            expected[job_uid] = JobState.CANCELLED
            reasons[job_uid] = "stopped before it started"
            assert (reply.accepted, reply.state) == (True, "cancelled"), reply

        async def cancelled_while_running(n: int) -> None:
            async with flows:
                job_uid, run = await h.ready(sleep_request(30))
                control = h.control(run)
                assert (await control.start()).accepted  # claimed: the job is running
                assert (await control.stop()).accepted
                final = await control.wait(timeout=30)
            expected[job_uid] = JobState.CANCELLED
            reasons[job_uid] = "stopped through the run PAR"  # the running sleep was stopped
            assert final.state == "cancelled", (job_uid, final)

        mix: list[tuple[Callable[[int], Coroutine[Any, Any, None]], int]] = [
            (expires, 20),  # first: their lifetime runs while the others work
            (completes, 40),
            (fails, 20),
            (cancelled_before_start, 10),
            (cancelled_while_running, 10),
        ]
        with anyio.fail_after(150):
            async with anyio.create_task_group() as group:
                for flow, count in mix:
                    for n in range(count):
                        group.start_soon(flow, n)
        ran = time.monotonic() - started

        assert len(expected) == 100
        assert Counter(expected.values()) == {
            JobState.COMPLETED: 40,
            JobState.FAILED: 20,
            JobState.EXPIRED: 20,
            JobState.CANCELLED: 20,
        }
        assert await h.job_uids() == set(expected), "a job the flows did not make exists"
        # Access settles each end as its event arrives (or its sweep does).
        await eventually(
            lambda: ledger_state_settled(h, set(expected)), "every ended job is settled"
        )

        books = await check_books(h)
        assert {uid: sheet.state for uid, sheet in books.sheets.items()} == expected
        for job_uid, reason in reasons.items():
            assert reason in (books.sheets[job_uid].reason or ""), books.sheets[job_uid]
        assert set(books.settles) == set(expected)  # each held value settled, exactly once
        for job_uid, state in expected.items():
            charge = books.charges[job_uid]
            if state is JobState.COMPLETED:
                assert ZERO < charge < expected_hold("checksum"), (job_uid, charge)
            else:
                assert charge == ZERO, (job_uid, state, charge)
        charged = sum(books.charges.values(), ZERO)
        assert await h.accounts.balance(ACCOUNT) == DEPOSIT - charged
        assert await h.accounts.balance(ACCESS) == charged
        assert await h.accounts.balance(HELD) == ZERO
        assert await h.accounts.verify_books() == []

        code, output = await h.ledger_verify_cli()
        assert code == 0, output
        assert "the books balance" in output, output
        print(f"100 mixed jobs in {ran:.1f}s; charged {charged} in all")


# --- 3. the access service killed while it cashes or settles ------------------------------------


@pytest.mark.parametrize("late", [False, True], ids=["restarted-at-once", "after-the-window"])
async def test_access_killed_between_the_hold_and_the_jobs_creation_is_repaired(
    seaweed: LocalSeaweed, store: ObjectStore, late: bool
) -> None:
    """SIGSTOP the access service as soon as a hold lands in the ledger; if its job's log does not
    exist yet, SIGKILL it there: value held for no job. The submit message was never acked, so
    the restarted service gets it again and finishes the job on the hold already made, even if it
    restarts after the authorisation's window has passed (`late`: the checks are judged as of
    the hold, or the redelivered submit would be refused as stale and strand the hold)."""
    window_s = 3 if late else 300
    async with open_cluster(seaweed, store, {"PARJOBS_AUTH_WINDOW_S": str(window_s)}) as h:
        ledger = h.ledger()
        caught: Transaction | None = None
        attempts = 0
        async with anyio.create_task_group() as group:
            submitted: dict[int, JobSheetState] = {}

            async def submit(attempt: int) -> None:
                submitted[attempt] = await h.submit(CHECKSUM)

            while caught is None and attempts < 20:
                attempts += 1
                next_key = ledger.entry_key((await ledger.state()).seq + 1)
                signed_at = time.monotonic()
                group.start_soon(submit, attempts)
                deadline = time.monotonic() + 20
                while await h.store.head(next_key) is None:  # as tight as the store answers
                    assert time.monotonic() < deadline, "no hold was made"
                os.killpg(h.cluster.pid("access"), signal.SIGSTOP)
                tx = Transaction.model_validate_json(await h.store.get(next_key))
                assert tx.kind == "hold"
                assert tx.job_uid is not None
                # Let a write the frozen process had already sent land before looking.
                await anyio.sleep(0.3)
                if await h.log.read(tx.job_uid):
                    # Too late: the job exists already. Let it go on, and try again.
                    os.killpg(h.cluster.pid("access"), signal.SIGCONT)
                    await eventually(partial(_answered, submitted, attempts), "the submit")
                    continue
                caught = tx
                assert await h.cluster.kill("access") == -signal.SIGKILL

            assert caught is not None, f"never stopped between hold and job in {attempts} tries"
            assert caught.job_uid is not None
            orphan = caught.job_uid
            # The crash left value held for a job that does not exist: the books say so.
            assert await h.log.read(orphan) == []
            assert await h.accounts.verify_books() == [
                f"value is held for job {orphan}, which has no log"
            ]
            if late:  # the restart comes after the authorisation's window: wait it out
                await anyio.sleep(max(0.0, window_s + 1 - (time.monotonic() - signed_at)))
            h.cluster._spawn("access")
            await h.cluster.wait_ready("access")
            await eventually(partial(_answered, submitted, attempts), "the redelivered submit")

        assert caught is not None
        repaired = submitted[attempts]
        assert repaired.job_uid == orphan, "the redelivered submit made another job"
        assert repaired.payment is not None
        assert repaired.payment.ledger_seq == caught.seq  # the hold made before the crash
        holds = [tx for tx in await h.transactions() if tx.kind == "hold"]
        assert len(holds) == attempts  # one per submission, none made twice
        assert [tx for tx in holds if tx.job_uid == orphan] == [caught]
        assert len(submitted) == attempts
        assert await h.job_uids() == {sheet.job_uid for sheet in submitted.values()}
        books = await check_books(h)
        assert orphan not in books.settles  # alive (ready), its value still held
        ready = await h.client.wait_until(orphan, READY, timeout=30)
        assert ready.state is JobState.READY
        waited = time.monotonic() - signed_at
        print(f"stopped between the hold and the job at attempt {attempts}; {waited:.1f}s down")


async def _answered(submitted: dict[int, JobSheetState], attempt: int) -> bool:
    return attempt in submitted


async def test_access_killed_between_a_jobs_end_and_its_settlement_settles_after_restart(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    overrides = {"PARJOBS_SWEEP_INTERVAL_S": "0.5"}
    async with open_cluster(seaweed, store, overrides) as h:
        completing_uid, completing = await h.ready(CHECKSUM)
        cancelling_uid, cancelling = await h.ready(CHECKSUM)
        endings = h.broker.topology.work_queue("access").name

        # Freeze access, then end both jobs (through compute: access is not needed for that).
        os.killpg(h.cluster.pid("access"), signal.SIGSTOP)
        completed = h.control(completing)
        assert (await completed.start()).accepted
        assert (await completed.wait(timeout=30)).state == "completed"
        assert (await h.control(cancelling).stop()).state == "cancelled"
        for job_uid in (completing_uid, cancelling_uid):
            assert is_terminal((await h.log.load(job_uid)).state)

        async def delivered_to_frozen_access() -> bool:
            return await h.queue_counts(endings) == (0, 1)  # both ends taken, not acked

        await eventually(delivered_to_frozen_access, "both ends delivered to access")
        # Kill it there: the jobs have ended, their value is still held.
        assert await h.cluster.kill("access") == -signal.SIGKILL
        state = await h.ledger().state()
        assert {completing_uid, cancelling_uid} <= set(state.holds)
        assert sorted(await h.accounts.verify_books()) == sorted(
            [
                f"job {completing_uid} ended completed but is not settled",
                f"job {cancelling_uid} ended cancelled but is not settled",
            ]
        )

        h.cluster._spawn("access")
        await h.cluster.wait_ready("access")
        await eventually(
            lambda: ledger_state_settled(h, {completing_uid, cancelling_uid}),
            "both ended jobs settled after the restart",
        )
        books = await check_books(h)
        assert books.charges[cancelling_uid] == ZERO
        assert ZERO < books.charges[completing_uid] < expected_hold("checksum")
        assert await h.accounts.balance(ACCOUNT) == DEPOSIT - books.charges[completing_uid]
        code, output = await h.ledger_verify_cli()
        assert code == 0, output


async def test_access_sigkilled_at_random_moments_leaves_the_books_balanced(
    seaweed: LocalSeaweed, store: ObjectStore
) -> None:
    """A stream of submissions and job ends while access is SIGKILLed four times, each at a random
    instant just after a submission was sent (cashing) or a job's end was published (settling),
    and restarted. Then every job has ended, been settled once, and the books balance."""
    # PARJOBS_TEST_KILL_SEED replays a run: the seed is printed (shown when the test fails).
    seed = int(os.environ.get("PARJOBS_TEST_KILL_SEED") or secrets.randbits(32))
    print(f"kill seed {seed}")
    rng = random.Random(seed)  # noqa: S311 - when to kill, not a secret
    overrides = {"PARJOBS_MAX_RUNS": "6", "PARJOBS_SWEEP_INTERVAL_S": "0.5"}
    async with open_cluster(seaweed, store, overrides) as h:
        expected: dict[str, JobState] = {}
        delays = {n: rng.uniform(0, 9) for n in range(32)}  # submissions spread over the kills
        ends_published = 0  # job ends seen on the events exchange (as access sees them)

        async def job(n: int) -> None:
            await anyio.sleep(delays[n])
            if n % 4 == 3:  # never started: expires (settled with a full refund)
                sheet = await h.submit(CHECKSUM, lifetime_s=3)
                expected[sheet.job_uid] = JobState.EXPIRED
                await h.client.wait_until(sheet.job_uid, frozenset({JobState.EXPIRED}))
                return
            request = sleep_request(0.2, exit_code=3) if n % 4 == 2 else CHECKSUM
            job_uid, final = await h.run(request)
            expected[job_uid] = JobState.FAILED if n % 4 == 2 else JobState.COMPLETED
            assert final == expected[job_uid].value, (job_uid, final)

        async def watch_ends(ready: anyio.Event) -> None:
            nonlocal ends_published
            # The user's own view: her events queue, bound to her jobs' events.
            ids = Identities(h.broker.topology)
            url = h.broker.settings.amqp_url.get_secret_value()
            connection = await aio_pika.connect(url)
            async with connection:  # its exclusive queue goes with it
                channel = await connection.channel()
                spec = ids.events_queue(h.broker.username, uuid.uuid4().hex)
                queue = await channel.declare_queue(spec.name, exclusive=True)
                for state in ENDED_EVENTS:
                    key = f"job.{h.broker.username}.*.{state}"
                    await queue.bind(h.broker.topology.events.name, key)
                ready.set()
                async with queue.iterator(no_ack=True) as messages:
                    async for _ in messages:
                        ends_published += 1

        async def moment(came: Callable[[], bool]) -> bool:
            """Wait (5 s at most) until `came()`; whether it did."""
            deadline = time.monotonic() + 5
            while not came():
                if time.monotonic() > deadline:
                    return False
                await anyio.sleep(0.002)
            return True

        kills: list[str] = []
        killed_at: list[datetime] = []

        async def killer() -> None:
            started = time.monotonic()
            for target in ("cashing", "settling", "cashing", "settling"):
                await anyio.sleep(rng.uniform(0.3, 1.5))
                if target == "cashing":
                    came = await moment(lambda: h.submitting > 0)
                else:
                    seen = ends_published
                    came = await moment(lambda: ends_published > seen)  # noqa: B023 - now
                await anyio.sleep(rng.uniform(0, 0.04))  # somewhere inside its handling
                killed_at.append(datetime.now(UTC))
                assert await h.cluster.kill("access") == -signal.SIGKILL
                at = f"{time.monotonic() - started:.1f}s"
                kills.append(f"{at} {target}" if came else f"{at} idle ({target} never came)")
                await anyio.sleep(rng.uniform(0, 0.5))
                h.cluster._spawn("access")
                await h.cluster.wait_ready("access")

        with anyio.fail_after(150):
            async with anyio.create_task_group() as watching:
                watching_ready = anyio.Event()
                watching.start_soon(watch_ends, watching_ready)
                await watching_ready.wait()
                async with anyio.create_task_group() as group:
                    group.start_soon(killer)
                    for n in delays:
                        group.start_soon(job, n)
                watching.cancel_scope.cancel()
        assert len(kills) == 4, f"seed {seed}"
        assert len(expected) == 32
        assert await h.job_uids() == set(expected), f"seed {seed}: a job nobody submitted"

        await eventually(
            lambda: ledger_state_settled(h, set(expected)),
            f"every ended job settled (seed {seed})",
        )
        books = await check_books(h)
        assert {uid: sheet.state for uid, sheet in books.sheets.items()} == expected
        assert await h.accounts.balance(HELD) == ZERO
        assert await h.operator.dead_letters() == [], f"seed {seed}: a message was given up"
        code, output = await h.ledger_verify_cli()
        assert code == 0, output

        # What the kills interrupted: a job whose hold was made before a kill (it is dated when
        # its checks passed) and its log after it, or whose end came before a kill and its
        # settlement after it.
        def across_a_kill(before: datetime, after: datetime) -> bool:
            return any(before < kill < after for kill in killed_at)

        cashing = [
            u for u, s in books.sheets.items() if across_a_kill(books.holds[u].time, s.created_at)
        ]
        settling = [
            u for u, s in books.sheets.items() if across_a_kill(s.updated_at, books.settles[u].time)
        ]
        print(
            f"seed {seed}: access SIGKILLed at {'; '.join(kills)}; admitted across a kill: "
            f"{len(cashing)} job(s), settled across a kill: {len(settling)}"
        )
