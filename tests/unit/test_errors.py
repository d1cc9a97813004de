"""Errors on the wire: every class of the one tree has a stable code, says whether it is a refusal
and whether a retry may succeed, and crosses the wire as an `ErrorReply` the client rebuilds into
the very same error."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from orchestrator import errors
from orchestrator.client.client import raise_error_reply
from orchestrator.errors import ParjobsError, error_classes
from schemas.messages import ACCESS_RESPONSES, COMPUTE_RESPONSES, Envelope, ErrorReply

CLASSES = sorted(
    (
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, ParjobsError)
    ),
    key=lambda cls: cls.__name__,
)

# The wire codes, checked in: a code that changes breaks every client that knows the old one.
CODES = {
    "AlreadySettledError": "ledger.already_settled",
    "AppendConflictError": "job.append_conflict",
    "AuthorisationError": "auth",
    "BrokerError": "broker",
    "BrokerUnavailableError": "broker.unavailable",
    "CalculationError": "calculation",
    "CalculationLaunchError": "calculation.launch",
    "CalculationLoadError": "calculation.load",
    "ChequeAlreadyCashedError": "ledger.cheque_already_cashed",
    "ChequeError": "cheque",
    "ChequePayerMismatchError": "cheque.payer_mismatch",
    "ConfigurationError": "configuration",
    "CryptoError": "crypto",
    "DuplicateCalculationError": "calculation.duplicate",
    "DuplicateHoldError": "ledger.duplicate_hold",
    "DuplicateTransactionError": "ledger.duplicate_transaction",
    "EventLogCorruptError": "job.log_corrupt",
    "EventSequenceError": "job.event_sequence",
    "ExpiredChequeError": "cheque.expired",
    "ForbiddenSignerError": "signature.forbidden_signer",
    "ForgedAuthorisationError": "auth.forged",
    "ForgedChequeError": "cheque.forged",
    "ForgedSignatureError": "signature.forged",
    "IllegalTransitionError": "job.illegal_transition",
    "InsufficientChequeError": "cheque.insufficient",
    "InsufficientFundsError": "ledger.insufficient_funds",
    "IntegrityError": "transfer.integrity",
    "InvalidAccountError": "payment.invalid_account",
    "InvalidAmountError": "payment.invalid_amount",
    "InvalidMessageError": "message.invalid",
    "InvalidPARError": "par.invalid",
    "InvalidParametersError": "calculation.invalid_parameters",
    "JobCancelledError": "job.cancelled",
    "JobEndedError": "job.ended",
    "JobError": "job",
    "JobExistsError": "job.exists",
    "JobExpiredError": "job.expired",
    "JobFailedError": "job.failed",
    "JobNotCompletedError": "job.not_completed",
    "JobNotFoundError": "job.not_found",
    "KeyFileError": "crypto.key_file",
    "LedgerConflictError": "ledger.conflict",
    "LedgerCorruptError": "ledger.corrupt",
    "LedgerRuleError": "ledger.rule",
    "LedgerSequenceError": "ledger.sequence",
    "LocalFileNotFoundError": "transfer.no_local_file",
    "MalformedTransactionError": "ledger.malformed",
    "MismatchedAuthorisationError": "auth.mismatched",
    "NullPARError": "par.null",
    "ObjectExistsError": "store.exists",
    "ObjectKeyError": "object_key",
    "ObjectNotFoundError": "store.not_found",
    "ObjectStoreError": "store",
    "OutsidePrefixError": "transfer.outside_prefix",
    "PARClosedError": "par.closed",
    "PARDataError": "par.data",
    "PARError": "par",
    "PARExpiredError": "par.expired",
    "PARNotFoundError": "par.not_found",
    "PARPermissionError": "par.permission",
    "ParjobsError": "error",
    "PassphraseError": "crypto.passphrase",
    "PaymentError": "payment",
    "PoisonMessageError": "message.poison",
    "PublishError": "broker.publish",
    "PublishNackedError": "broker.nacked",
    "RemoteObjectNotFoundError": "transfer.remote_not_found",
    "RemoteRejectedError": "transfer.remote_rejected",
    "ReplayedAuthorisationError": "auth.replayed",
    "RequesterMismatchError": "auth.requester_mismatch",
    "RequestTimeoutError": "broker.request_timeout",
    "RunRefusedError": "job.run_refused",
    "SettlementMismatchError": "ledger.settlement_mismatch",
    "SignatureError": "signature",
    "StaleAuthorisationError": "auth.stale",
    "StaleSignatureError": "signature.stale",
    "StreamStalledError": "broker.stream_stalled",
    "TamperedError": "crypto.tampered",
    "TopologyError": "broker.topology",
    "TransferError": "transfer",
    "UnbalancedTransactionError": "ledger.unbalanced",
    "UnknownCalculationError": "calculation.unknown",
    "UnknownHoldError": "ledger.unknown_hold",
    "UnknownSignerError": "signature.unknown_signer",
    "UnknownUserError": "user.unknown",
    "UnroutableError": "broker.unroutable",
    "UnsignedError": "signature.missing",
    "UploadTooLargeError": "transfer.too_large",
    "UploadTooSmallError": "transfer.too_small",
    "UserError": "user",
    "UserExistsError": "user.exists",
    "WrongKeyError": "crypto.wrong_key",
    "WrongRecipientError": "cheque.wrong_recipient",
    "WrongResourceError": "cheque.wrong_resource",
}

# What a service answers a request with (and is done), rather than have the broker deliver the
# message again: these families, less the lost races.
REFUSED_FAMILIES = (
    errors.PARError,
    errors.CryptoError,
    errors.JobError,
    errors.CalculationError,
    errors.ObjectKeyError,
    errors.AuthorisationError,
    errors.ChequeError,
    errors.UserError,
    errors.LedgerRuleError,
    errors.InvalidAccountError,
    errors.InvalidAmountError,
)
RETRIABLE = {
    "AppendConflictError",
    "JobExistsError",
    "LedgerConflictError",
    "BrokerUnavailableError",
    "PublishNackedError",
    "RequestTimeoutError",
    "StreamStalledError",
}

_PUBLISH: dict[str, object] = {"exchange": "p.events", "routing_key": "job.0123.submitted"}
# Keyword arguments for the classes whose constructors take them (JSON-clean where a JSON value
# is typed loosely, so the rebuilt attribute equals the original).
SAMPLES: dict[type[ParjobsError], dict[str, object]] = {
    errors.RemoteRejectedError: {"status": 403, "s3_code": "AccessDenied"},
    errors.IllegalTransitionError: {
        "job_uid": "a" * 32,
        "state": "ready",
        "event_type": "submitted",
        "legal": ["run_started", "cancelled", "expired"],
    },
    errors.StaleAuthorisationError: {
        "offset": -timedelta(minutes=7, microseconds=5),
        "window": timedelta(minutes=5),
    },
    errors.StaleSignatureError: {"offset": timedelta(seconds=-400), "window": timedelta(minutes=5)},
    errors.InsufficientChequeError: {"price": Decimal("1.500000"), "limit": Decimal("0.25")},
    errors.UnknownCalculationError: {"name": "nope", "available": ["checksum", "sleep"]},
    errors.InvalidParametersError: {
        "calculation": "sleep",
        "errors": [{"type": "missing", "loc": ["seconds"], "msg": "Field required", "input": {}}],
    },
    errors.PublishError: _PUBLISH,
    errors.UnroutableError: _PUBLISH,
    errors.PublishNackedError: _PUBLISH,
    errors.InvalidMessageError: {"dead_letter_reason": "unknown-type"},
    errors.InsufficientFundsError: {
        "account": "alice",
        "balance": Decimal("2.000000"),
        "amount": Decimal("3.5"),
    },
    errors.ChequeAlreadyCashedError: {"cheque_id": "c" * 32, "job_uid": "b" * 32},
    **{
        ended: {"job_uid": "d" * 32, "reason": "calculation exited with status 3"}
        for ended in (
            errors.JobEndedError,
            errors.JobFailedError,
            errors.JobCancelledError,
            errors.JobExpiredError,
        )
    },
}


def _over_the_wire(reply: ErrorReply) -> ErrorReply:
    """`reply` sent in an envelope as JSON bytes and read back as a client reads an answer."""
    sent = Envelope(sender="access@test", body=reply).model_dump_json().encode()
    received = ACCESS_RESPONSES.envelope.validate_json(sent).body
    assert isinstance(received, ErrorReply)
    assert COMPUTE_RESPONSES.envelope.validate_json(sent).body == received
    return received


def test_every_class_has_its_checked_in_code() -> None:
    assert {cls.__name__: cls.code for cls in CLASSES} == CODES


def test_codes_are_unique_and_name_their_class() -> None:
    assert len(set(CODES.values())) == len(CODES)
    for cls in CLASSES:
        assert error_classes()[cls.code] is cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_crosses_the_wire_and_comes_back_the_same(cls: type[ParjobsError]) -> None:
    arguments = SAMPLES.get(cls, {})
    error = cls(f"{cls.__name__} happened: do something about it", **arguments)
    reply = error.to_reply()
    assert (reply.code, reply.retriable) == (CODES[cls.__name__], cls.__name__ in RETRIABLE)

    rebuilt = ParjobsError.from_reply(_over_the_wire(reply))

    assert type(rebuilt) is cls
    assert str(rebuilt) == str(error)
    assert rebuilt.details == error.details == reply.details
    assert rebuilt.retriable == error.retriable
    assert rebuilt.code == error.code
    for name, value in arguments.items():
        assert getattr(rebuilt, name) == value, name
        assert type(getattr(rebuilt, name)) is type(value), name


def test_details_are_the_keyword_arguments_as_json() -> None:
    error = errors.StaleAuthorisationError(
        "too old", offset=-timedelta(minutes=7), window=timedelta(minutes=5)
    )
    assert error.details == {"offset": "-PT7M", "window": "PT5M"}
    cashed = errors.InsufficientChequeError("costs more", price=Decimal("1.50"), limit=Decimal(1))
    assert cashed.details == {"price": "1.50", "limit": "1"}
    assert errors.PARExpiredError("expired").details == {}


def test_a_state_of_none_survives_the_wire() -> None:
    error = errors.IllegalTransitionError(
        "no job yet", job_uid="a" * 32, state=None, event_type="run_started", legal=["submitted"]
    )
    rebuilt = ParjobsError.from_reply(_over_the_wire(error.to_reply()))
    assert isinstance(rebuilt, errors.IllegalTransitionError)
    assert rebuilt.state is None
    assert rebuilt.legal == ["submitted"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_refusals_are_the_refused_families_less_lost_races(cls: type[ParjobsError]) -> None:
    expected = issubclass(cls, REFUSED_FAMILIES) and cls.__name__ not in RETRIABLE
    assert cls.refusal is expected


def test_an_unknown_code_becomes_a_plain_error_carrying_it() -> None:
    reply = ErrorReply(
        code="quota.exceeded", message="too many jobs today", retriable=True, details={"limit": 9}
    )
    error = ParjobsError.from_reply(_over_the_wire(reply))
    assert type(error) is ParjobsError
    assert str(error) == "too many jobs today"
    assert (error.code, error.retriable, error.details) == ("quota.exceeded", True, {"limit": 9})
    assert error.to_reply() == reply


def test_a_known_code_with_details_it_cannot_use_keeps_what_was_said() -> None:
    reply = ErrorReply(code="cheque.insufficient", message="costs more", details={"price": "1"})
    error = ParjobsError.from_reply(reply)
    assert type(error) is ParjobsError
    assert (error.code, error.details) == ("cheque.insufficient", {"price": "1"})


def test_the_client_raises_the_rebuilt_error() -> None:
    sent = errors.InsufficientFundsError(
        "account 'alice' has 2, too little for 3",
        account="alice",
        balance=Decimal(2),
        amount=Decimal(3),
    )
    with pytest.raises(errors.InsufficientFundsError) as raised:
        raise_error_reply(sent.to_reply())
    assert (raised.value.account, raised.value.balance, raised.value.amount) == (
        "alice",
        Decimal(2),
        Decimal(3),
    )


def test_a_class_without_a_fresh_code_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match="is PARExpiredError's already"):

        class _Twin(errors.PARError, code="par.expired"):
            pass

    with pytest.raises(TypeError, match="not a dotted lower-case error code"):

        class _Shouting(errors.PARError, code="PAR Expired"):
            pass

    assert error_classes()["par.expired"] is errors.PARExpiredError


def test_error_reply_version_1_is_refused() -> None:
    with pytest.raises(ValidationError):
        ErrorReply.model_validate(
            {"type": "error", "error": "PARExpiredError", "detail": "the PAR has expired"}
        )
    with pytest.raises(ValidationError):
        ErrorReply(code="Not A Code", message="m")
