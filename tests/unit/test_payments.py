"""Admission and settlement on the in-memory store (no broker): every refusal creates and moves
nothing; every ended job is charged or refunded exactly once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import JsonValue

from orchestrator import PAR, KeyPair, ObjectWriter
from orchestrator.core.ledger_rules import ACCESS, HELD
from orchestrator.core.signing import request_fingerprint, sign_authorisation, write_cheque
from orchestrator.errors import (
    ChequePayerMismatchError,
    ExpiredChequeError,
    ForgedAuthorisationError,
    ForgedChequeError,
    InsufficientChequeError,
    InsufficientFundsError,
    MismatchedAuthorisationError,
    ParjobsError,
    ReplayedAuthorisationError,
    StaleAuthorisationError,
    UnknownUserError,
    WrongRecipientError,
    WrongResourceError,
)
from orchestrator.store.base import ObjectStore
from schemas.auth import Cheque
from schemas.events import JobRequest, JobState
from schemas.messages import StopRun, SubmitJob
from tests.unit.test_services import FUNDS, Services

REQUEST = JobRequest(calculation="checksum")


@pytest.fixture
async def services(store: ObjectStore, prefix: str, http: httpx.AsyncClient) -> Services:
    ready = Services(store, prefix, http)
    await ready.onboard()
    return ready


async def _nothing_happened(services: Services, job_uid: str, ledger_seq: int) -> None:
    """No job log, and not a single ledger entry more."""
    assert await services.log.read(job_uid) == []
    assert (await services.accounts.ledger.state()).seq == ledger_seq
    assert await services.accounts.balance("user") == FUNDS


async def _refused(services: Services, command: SubmitJob, error: type[ParjobsError]) -> None:
    message_id = uuid.uuid4().hex
    job_uid = services.access_job_uid(message_id)
    before = (await services.accounts.ledger.state()).seq
    with pytest.raises(error):
        await services.access.submit(command, message_id=message_id)
    await _nothing_happened(services, job_uid, before)


def _command(services: Services, **changes: object) -> SubmitJob:
    command = services.submit_command()
    return command.model_copy(update=changes)


# --- authorisation ------------------------------------------------------------------------------


async def test_forged_authorisation_is_refused(services: Services) -> None:
    mallory = KeyPair.generate("mallory")
    forged = sign_authorisation(mallory, REQUEST).model_copy(
        update={"user": services.user.fingerprint}
    )
    await _refused(services, _command(services, authorisation=forged), ForgedAuthorisationError)


async def test_stale_authorisation_is_refused(services: Services) -> None:
    old = sign_authorisation(services.user, REQUEST, now=datetime.now(UTC) - timedelta(hours=1))
    await _refused(services, _command(services, authorisation=old), StaleAuthorisationError)


async def test_authorisation_for_another_request_is_refused(services: Services) -> None:
    other = sign_authorisation(services.user, JobRequest(calculation="sleep"))
    await _refused(services, _command(services, authorisation=other), MismatchedAuthorisationError)


async def test_replayed_authorisation_is_refused_forever(services: Services) -> None:
    command = services.submit_command()
    await services.access.submit(command, message_id=uuid.uuid4().hex)
    fresh_cheque = services.cheque(REQUEST)
    await _replay_refused(services, command.model_copy(update={"cheque": fresh_cheque}))


async def _replay_refused(services: Services, command: SubmitJob) -> None:
    before = (await services.accounts.ledger.state()).seq
    balance = await services.accounts.balance("user")
    with pytest.raises(ReplayedAuthorisationError):
        await services.access.submit(command, message_id=uuid.uuid4().hex)
    assert (await services.accounts.ledger.state()).seq == before
    assert await services.accounts.balance("user") == balance


async def test_unknown_user_is_refused(services: Services) -> None:
    stranger = KeyPair.generate("stranger")
    auth = sign_authorisation(stranger, REQUEST)
    await _refused(services, _command(services, authorisation=auth), UnknownUserError)


# --- cheques ------------------------------------------------------------------------------------


def _cheque(services: Services, **overrides: Any) -> Cheque:
    arguments: dict[str, Any] = {
        "payer": "user",
        "recipient": ACCESS,
        "max_spend": Decimal(5),
        "resource": request_fingerprint(REQUEST),
        "lifetime": timedelta(hours=1),
    }
    arguments.update(overrides)
    return write_cheque(services.user, **arguments)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"recipient": "someone-else"}, WrongRecipientError),
        ({"resource": "0" * 64}, WrongResourceError),
        ({"max_spend": Decimal("0.01")}, InsufficientChequeError),
        (
            {"lifetime": timedelta(seconds=1), "now": datetime.now(UTC) - timedelta(seconds=5)},
            ExpiredChequeError,
        ),
    ],
)
async def test_bad_cheques_move_nothing(
    services: Services, overrides: dict[str, Any], error: type[ParjobsError]
) -> None:
    await _refused(services, _command(services, cheque=_cheque(services, **overrides)), error)


async def test_cheque_signed_by_another_key_is_forged(services: Services) -> None:
    cheque = write_cheque(
        KeyPair.generate("mallory"),
        payer="user",
        recipient=ACCESS,
        max_spend=Decimal(5),
        resource=request_fingerprint(REQUEST),
        lifetime=timedelta(hours=1),
    )
    await _refused(services, _command(services, cheque=cheque), ForgedChequeError)


async def test_cheque_of_another_user_pays_for_nothing(services: Services) -> None:
    # Bob's genuine cheque for this very request, presented with a job the user authorised.
    bob = KeyPair.generate("bob")
    await services.accounts.add_user("bob", bob.public)
    await services.accounts.deposit("bob", FUNDS)
    bobs = write_cheque(
        bob,
        payer="bob",
        recipient=ACCESS,
        max_spend=Decimal(5),
        resource=request_fingerprint(REQUEST),
        lifetime=timedelta(hours=1),
    )
    await _refused(services, _command(services, cheque=bobs), ChequePayerMismatchError)
    assert await services.accounts.balance("bob") == FUNDS


async def test_cheque_beyond_the_balance_moves_nothing(services: Services) -> None:
    await services.accounts.ledger.hold(uuid.uuid4().hex, uuid.uuid4().hex, "user", FUNDS)
    before = (await services.accounts.ledger.state()).seq
    with pytest.raises(InsufficientFundsError):
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    assert (await services.accounts.ledger.state()).seq == before


# --- settlement ---------------------------------------------------------------------------------


async def test_completed_job_pays_its_cpu_and_gets_the_rest_back(services: Services) -> None:
    job_uid, held = await _run_to_end(services, "checksum", {})
    sheet = await services.log.load(job_uid)
    assert sheet.state is JobState.COMPLETED
    price = services.access_price("checksum")
    charge = price.cost(sheet.cpu_seconds).quantize(Decimal("0.000001"))
    assert Decimal(0) < charge <= held
    assert await services.accounts.balance("user") == FUNDS - charge
    assert await services.accounts.balance(ACCESS) == charge
    assert await services.accounts.balance(HELD) == 0
    # Settling again (a redelivered end) moves nothing more.
    await services.access.settle(job_uid)
    assert await services.accounts.balance("user") == FUNDS - charge
    assert await services.accounts.verify_books() == []


async def test_failed_and_cancelled_jobs_are_refunded_in_full(services: Services) -> None:
    failed, _ = await _run_to_end(services, "sleep", {"seconds": 0, "exit_code": 3})
    assert (await services.log.load(failed)).state is JobState.FAILED
    cancelled = await _cancel_before_start(services)
    assert (await services.log.load(cancelled)).state is JobState.CANCELLED
    assert await services.accounts.balance("user") == FUNDS
    assert await services.accounts.balance(ACCESS) == 0
    assert await services.accounts.verify_books() == []


async def _run_to_end(
    services: Services, calculation: str, parameters: dict[str, JsonValue]
) -> tuple[str, Decimal]:
    command = services.submit_command(calculation=calculation, parameters=parameters)
    submitted = (await services.access.submit(command, message_id=uuid.uuid4().hex)).events[0]
    contracted = await services.storage.on_submitted(submitted)
    assert contracted is not None
    ready = await services.compute.on_storage_contracted(contracted)
    assert ready is not None
    sheet = await services.log.load(submitted.job_uid)
    assert sheet.upload_par is not None
    assert sheet.run_par is not None
    assert sheet.payment is not None
    writer = ObjectWriter(PAR(sheet.upload_par), services.user, transport=services.transport)
    await writer.set_object(b"data\n")

    async def ignore(_: object) -> None:
        return None

    await services.run(PAR(sheet.run_par), ignore)
    await services.access.settle(submitted.job_uid)
    return submitted.job_uid, sheet.payment.held


async def _cancel_before_start(services: Services) -> str:
    submitted = (
        await services.access.submit(services.submit_command(), message_id=uuid.uuid4().hex)
    ).events[0]
    contracted = await services.storage.on_submitted(submitted)
    assert contracted is not None
    await services.compute.on_storage_contracted(contracted)
    sheet = await services.log.load(submitted.job_uid)
    assert sheet.run_par is not None
    stop = services.run_command("stop", PAR(sheet.run_par))
    assert isinstance(stop, StopRun)
    await services.compute.stop(stop, requester=services.user.fingerprint)
    await services.access.settle(submitted.job_uid)
    return submitted.job_uid
