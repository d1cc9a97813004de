"""Every error parjobs raises, drawn in one place, and how each one crosses the wire.

Each class names a situation a user can act on; the message says what to do. Callers catch
`ParjobsError` for "anything parjobs refused" or a leaf class for one specific refusal.

Each class statement also says, once, what services and clients do with the error:
- `code`: its stable name on the wire (`par.expired`). Written here, never derived from the class
  name, so renaming a class changes nothing on the wire; a code taken twice fails at import.
- `refusal`: raised while answering a request, the error is the answer (an `ErrorReply`, and the
  message is done). Anything else a handler raises is a failure: the broker delivers the message
  again. Inherited, so a family (every `PARError`) is refused at once.
- `retriable`: a lost race or an outage; the same call may succeed if made again.
- `details`: the constructor's keyword arguments, as JSON. Every class keeps each keyword argument
  as the attribute of the same name, so code, message and details rebuild the very error on the
  other side (`ParjobsError.from_reply(error.to_reply())`).
"""

from __future__ import annotations

import inspect
import re
import typing

# Decimal and timedelta at run time: they type the details of the classes that take them.
from datetime import timedelta
from decimal import Decimal
from typing import Any, ClassVar

from pydantic import JsonValue, TypeAdapter, ValidationError

from schemas.messages import ERROR_CODE_PATTERN, ErrorReply

_CODE = re.compile(ERROR_CODE_PATTERN)
_BY_CODE: dict[str, type[ParjobsError]] = {}


class ParjobsError(Exception):
    """Base of every error parjobs raises on purpose.

    Also what an `ErrorReply` becomes when its code is not known here (a newer service): a plain
    ParjobsError that carries the reply's code, retriable flag and details.
    """

    code: str = "error"
    refusal: ClassVar[bool] = False
    retriable: bool = False
    _received_details: dict[str, JsonValue] | None = None

    def __init_subclass__(
        cls,
        *,
        code: str,
        refusal: bool | None = None,
        retriable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if not _CODE.fullmatch(code):
            raise TypeError(f"{cls.__qualname__}: {code!r} is not a dotted lower-case error code")
        taken = _BY_CODE.setdefault(code, cls)
        if taken is not cls:
            raise TypeError(f"{cls.__qualname__}: code {code!r} is {taken.__qualname__}'s already")
        cls.code = code
        if refusal is not None:
            cls.refusal = refusal
        if retriable is not None:
            cls.retriable = retriable

    @property
    def details(self) -> dict[str, JsonValue]:
        """The constructor's keyword arguments as JSON values ({} for a class that takes none)."""
        if self._received_details is not None:
            return dict(self._received_details)
        return {
            name: adapter.dump_python(getattr(self, name), mode="json")
            for name, adapter in _detail_types(type(self))
        }

    def to_reply(self) -> ErrorReply:
        """This error as the answer to a request."""
        return ErrorReply(
            code=self.code, message=str(self), retriable=self.retriable, details=self.details
        )

    @staticmethod
    def from_reply(reply: ErrorReply) -> ParjobsError:
        """The error `reply` describes: the class of its code, rebuilt with its message and
        details; a plain ParjobsError carrying the code if the code (or its details) are not
        what this side knows."""
        known = _BY_CODE.get(reply.code)
        if known is not None:
            try:
                arguments = {
                    name: adapter.validate_python(reply.details[name])
                    for name, adapter in _detail_types(known)
                }
                return known(reply.message, **arguments)
            except (KeyError, ValidationError):
                pass  # details of another version of the class: keep what was said, below
        error = ParjobsError(reply.message)
        error.code = reply.code
        error.retriable = reply.retriable
        error._received_details = dict(reply.details)
        return error


_BY_CODE[ParjobsError.code] = ParjobsError


def error_classes() -> dict[str, type[ParjobsError]]:
    """Every error class by its code (a copy): what may arrive in an `ErrorReply`."""
    return dict(_BY_CODE)


_DETAIL_TYPES: dict[type[ParjobsError], tuple[tuple[str, TypeAdapter[Any]], ...]] = {}


def _detail_types(cls: type[ParjobsError]) -> tuple[tuple[str, TypeAdapter[Any]], ...]:
    """The keyword-only parameters of `cls`'s constructor, each with an adapter for its type
    (worked out on first use: most processes never send or read an error)."""
    found = _DETAIL_TYPES.get(cls)
    if found is None:
        parameters = inspect.signature(cls.__init__).parameters.values()
        names = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        hints = typing.get_type_hints(cls.__init__) if names else {}
        found = _DETAIL_TYPES[cls] = tuple((name, TypeAdapter(hints[name])) for name in names)
    return found


class ConfigurationError(ParjobsError, code="configuration"):
    """A setting is missing or wrong, or a needed server/binary is not available."""


# --- keys and cryptography -------------------------------------------------------------------


class CryptoError(ParjobsError, code="crypto", refusal=True):
    """A cryptographic check failed."""


class WrongKeyError(CryptoError, code="crypto.wrong_key"):
    """The private key given is not the one the payload was sealed for."""


class TamperedError(CryptoError, code="crypto.tampered"):
    """A sealed payload or the metadata bound to it was changed after sealing."""


class PassphraseError(CryptoError, code="crypto.passphrase"):
    """The passphrase is wrong, or the passphrase-protected blob is corrupt."""


class KeyFileError(CryptoError, code="crypto.key_file"):
    """A key file is missing, unreadable or not a parjobs key file."""


class SignatureError(CryptoError, code="signature"):
    """A signed message or event was refused; the subclass says why."""


class UnsignedError(SignatureError, code="signature.missing"):
    """The message or event carries no signature where one is required."""


class ForgedSignatureError(SignatureError, code="signature.forged"):
    """The signature does not verify against the key of the signer it names: forged, made with
    another key, or the signed content was altered after signing."""


class StaleSignatureError(SignatureError, code="signature.stale"):
    """The signed time is outside the accepted window around the receiver's clock.

    `offset` is the signed time minus the receiver's now: negative in the past, positive ahead.
    """

    def __init__(self, message: str, *, offset: timedelta, window: timedelta) -> None:
        super().__init__(message)
        self.offset = offset
        self.window = window


class UnknownSignerError(SignatureError, LookupError, code="signature.unknown_signer"):
    """The signer named has no key here: neither a configured service role nor a registered user."""


class ForbiddenSignerError(SignatureError, code="signature.forbidden_signer"):
    """The signature is genuine, but its signer may not sign this: a service role emitting an event
    type that belongs to another role."""


# --- object keys -------------------------------------------------------------------------------


class ObjectKeyError(ParjobsError, ValueError, code="object_key", refusal=True):
    """An object key is empty, too long, absolute, or tries to climb out of its prefix."""


# --- PARs ---------------------------------------------------------------------------------------


class PARError(ParjobsError, code="par", refusal=True):
    """A pre-authenticated request cannot be used as asked."""


class InvalidPARError(PARError, ValueError, code="par.invalid"):
    """The PAR's kind and permissions are an illegal combination, or a required field is missing."""


class NullPARError(PARError, code="par.null"):
    """The PAR is null (made with no arguments) and grants nothing."""


class PARExpiredError(PARError, code="par.expired"):
    """The PAR has expired (or is within its safety buffer of expiring)."""


class PARNotFoundError(PARError, LookupError, code="par.not_found"):
    """No PAR with this uid was issued to the asker (none at all, or another user's)."""


class PARPermissionError(PARError, PermissionError, code="par.permission"):
    """The PAR does not grant this operation (for example a write through a read-only PAR)."""


class PARClosedError(PARError, code="par.closed"):
    """The PAR was closed; closing again or using it is refused."""


class PARDataError(PARError, ValueError, code="par.data"):
    """A serialised PAR (`to_data` output) is corrupt or not a PAR at all."""


# --- transfers through PARs ---------------------------------------------------------------------


class TransferError(ParjobsError, code="transfer"):
    """Moving bytes through a PAR failed."""


class LocalFileNotFoundError(TransferError, FileNotFoundError, code="transfer.no_local_file"):
    """The local file to upload does not exist."""


class UploadTooLargeError(TransferError, code="transfer.too_large"):
    """The upload is bigger than the PAR allows; nothing was stored."""


class UploadTooSmallError(TransferError, code="transfer.too_small"):
    """The upload is smaller than the PAR's minimum size; nothing was stored."""


class OutsidePrefixError(TransferError, PermissionError, code="transfer.outside_prefix"):
    """A bucket write PAR was asked to write a key outside its prefix."""


class IntegrityError(TransferError, code="transfer.integrity"):
    """The bytes received do not match their checksum; the partial result was discarded."""


class RemoteRejectedError(TransferError, code="transfer.remote_rejected"):
    """The S3 server refused the request; `status` and S3's error code `s3_code` say why."""

    def __init__(self, message: str, *, status: int, s3_code: str) -> None:
        super().__init__(message)
        self.status = status
        self.s3_code = s3_code


class RemoteObjectNotFoundError(TransferError, code="transfer.remote_not_found"):
    """The object the PAR points at does not exist (yet)."""


# --- the object store (service side) ------------------------------------------------------------


class ObjectStoreError(ParjobsError, code="store"):
    """The object store refused or failed an operation."""


class ObjectExistsError(ObjectStoreError, code="store.exists"):
    """A conditional create lost: the object already exists."""


class ObjectNotFoundError(ObjectStoreError, KeyError, code="store.not_found"):
    """No object at that key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "object not found"


# --- jobs and their event log -------------------------------------------------------------------


class JobError(ParjobsError, code="job", refusal=True):
    """A job's event log refused an event, or cannot be read."""


class IllegalTransitionError(JobError, code="job.illegal_transition"):
    """The event is not legal in the job's current state; `legal` lists what would be."""

    def __init__(
        self, message: str, *, job_uid: str, state: str | None, event_type: str, legal: list[str]
    ) -> None:
        super().__init__(message)
        self.job_uid = job_uid
        self.state = state  # None: the job has no events yet
        self.event_type = event_type
        self.legal = legal


class EventSequenceError(JobError, code="job.event_sequence"):
    """The event does not continue this job's log: another job's, or its seq is not last + 1."""


class AppendConflictError(JobError, code="job.append_conflict", refusal=False, retriable=True):
    """Another writer appended this sequence number first; reload the log and retry."""


class JobExistsError(AppendConflictError, code="job.exists"):
    """A job with this uid was already created."""


class JobNotFoundError(JobError, LookupError, code="job.not_found"):
    """No events are stored for this job uid."""


class JobNotCompletedError(JobError, code="job.not_completed"):
    """Outputs are only handed out once a job has completed."""


class RunRefusedError(JobError, code="job.run_refused"):
    """The run PAR is valid but the run cannot start or stop now; the message says why."""


class EventLogCorruptError(JobError, code="job.log_corrupt"):
    """A stored event is unreadable, or is not the event its key says it is."""


class JobEndedError(JobError, code="job.ended"):
    """The job ended without completing (`Job.result()`); the subclass says how, `reason` why."""

    def __init__(self, message: str, *, job_uid: str, reason: str | None) -> None:
        super().__init__(message)
        self.job_uid = job_uid
        self.reason = reason


class JobFailedError(JobEndedError, code="job.failed"):
    """The job failed: its calculation, or a service on its behalf, gave up on it."""


class JobCancelledError(JobEndedError, code="job.cancelled"):
    """The job was cancelled (its run stopped through the run PAR) before it completed."""


class JobExpiredError(JobEndedError, code="job.expired"):
    """The job's lifetime ran out before it completed."""


# --- authorisation and cheques -----------------------------------------------------------------


class AuthorisationError(ParjobsError, code="auth", refusal=True):
    """A job's authorisation was refused; nothing was created for it."""


class ForgedAuthorisationError(AuthorisationError, code="auth.forged"):
    """The signature does not verify, or was made by another key than the user it names."""


class StaleAuthorisationError(AuthorisationError, code="auth.stale"):
    """The authorisation's timestamp is outside the accepted window around the service's clock.

    `offset` is timestamp minus the service's now: negative in the past, positive in the future.
    """

    def __init__(self, message: str, *, offset: timedelta, window: timedelta) -> None:
        super().__init__(message)
        self.offset = offset
        self.window = window


class MismatchedAuthorisationError(AuthorisationError, code="auth.mismatched"):
    """The authorisation was signed for a different job request than the one it came with."""


class ReplayedAuthorisationError(AuthorisationError, code="auth.replayed"):
    """The authorisation's nonce was already used by another submission: sign a new one."""


class RequesterMismatchError(AuthorisationError, code="auth.requester_mismatch"):
    """A request (or the authorisation it carries) is signed by another user than the one the
    broker says sent it: a user sends only what they signed themselves."""


class ChequeError(ParjobsError, code="cheque", refusal=True):
    """A cheque was refused; no value moved."""


class ForgedChequeError(ChequeError, code="cheque.forged"):
    """The cheque's signature does not verify against the payer's registered key."""


class ChequePayerMismatchError(ChequeError, code="cheque.payer_mismatch"):
    """The cheque's payer is not the user who authorised the job: a cheque pays only for its
    payer's own jobs."""


class WrongRecipientError(ChequeError, code="cheque.wrong_recipient"):
    """The cheque is payable to another account than the one cashing it."""


class WrongResourceError(ChequeError, code="cheque.wrong_resource"):
    """The cheque pays for another job request than the one it came with."""


class ExpiredChequeError(ChequeError, code="cheque.expired"):
    """The cheque's expiry has passed."""


class InsufficientChequeError(ChequeError, code="cheque.insufficient"):
    """The price of the calculation is more than the cheque's maximum spend."""

    def __init__(self, message: str, *, price: Decimal, limit: Decimal) -> None:
        super().__init__(message)
        self.price = price
        self.limit = limit


class UserError(ParjobsError, code="user", refusal=True):
    """A user registration was refused, or no such user is registered."""


class UserExistsError(UserError, code="user.exists"):
    """The name, or the public key, is already registered (to another key, or another name)."""


class UnknownUserError(UserError, LookupError, code="user.unknown"):
    """No user is registered under this name or key fingerprint."""


# --- calculations -------------------------------------------------------------------------------


class CalculationError(ParjobsError, code="calculation", refusal=True):
    """A calculation cannot be found, loaded, parameterised or launched."""


class UnknownCalculationError(CalculationError, LookupError, code="calculation.unknown"):
    """No calculation has this name; `available` lists the names that exist."""

    def __init__(self, message: str, *, name: str, available: list[str]) -> None:
        super().__init__(message)
        self.name = name
        self.available = available


class DuplicateCalculationError(CalculationError, code="calculation.duplicate"):
    """Two calculations (for example from two distributions) claim the same name."""


class CalculationLoadError(CalculationError, code="calculation.load"):
    """An entry point of `parjobs.calculations` fails to import, or is not a valid calculation."""


class InvalidParametersError(CalculationError, ValueError, code="calculation.invalid_parameters"):
    """The parameters do not fit the calculation's model; `errors` holds pydantic's details."""

    def __init__(self, message: str, *, calculation: str, errors: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.calculation = calculation
        self.errors = errors


class CalculationLaunchError(CalculationError, code="calculation.launch"):
    """The calculation's program cannot be started (not found on the child's PATH)."""


# --- the broker (RabbitMQ) ----------------------------------------------------------------------


class BrokerError(ParjobsError, code="broker"):
    """RabbitMQ refused or failed an operation."""


class BrokerUnavailableError(BrokerError, code="broker.unavailable", retriable=True):
    """RabbitMQ cannot be reached, or the connection stayed down past the operation's deadline."""


class TopologyError(BrokerError, code="broker.topology"):
    """An exchange or queue is missing, or exists with other arguments than the ones declared."""


class PublishError(BrokerError, code="broker.publish"):
    """The broker did not take responsibility for a published message."""

    def __init__(self, message: str, *, exchange: str, routing_key: str) -> None:
        super().__init__(message)
        self.exchange = exchange
        self.routing_key = routing_key


class UnroutableError(PublishError, code="broker.unroutable"):
    """No queue is bound for the routing key, or the exchange does not exist: nothing was stored."""


class PublishNackedError(PublishError, code="broker.nacked", retriable=True):
    """The broker refused the message (a negative confirm), e.g. a full reject-publish queue."""


class RequestTimeoutError(BrokerError, TimeoutError, code="broker.request_timeout", retriable=True):
    """No reply to a request arrived in time."""


class StreamStalledError(BrokerError, TimeoutError, code="broker.stream_stalled", retriable=True):
    """A stream read stopped receiving messages before it reached the stream's tail."""


class PoisonMessageError(ParjobsError, code="message.poison"):
    """Raised by a message handler: this message can never succeed, so dead-letter it (once).

    The message is the reason recorded with the dead letter; `dead_letter_reason` classifies it.
    """

    dead_letter_reason = "poison"


class InvalidMessageError(PoisonMessageError, ValueError, code="message.invalid"):
    """A message is not JSON ("undecodable"), fails validation ("invalid"), or has a type its queue
    does not take ("unknown-type"); `dead_letter_reason` says which."""

    def __init__(self, message: str, *, dead_letter_reason: str = "invalid") -> None:
        super().__init__(message)
        self.dead_letter_reason = dead_letter_reason


# --- payments: accounts and the ledger ---------------------------------------------------------


class PaymentError(ParjobsError, code="payment"):
    """An account or ledger operation was refused, or the ledger cannot be read."""


class InvalidAccountError(PaymentError, ValueError, code="payment.invalid_account", refusal=True):
    """Not a valid account name, or one of the service's accounts where a user's must be."""


class InvalidAmountError(PaymentError, ValueError, code="payment.invalid_amount", refusal=True):
    """Not an amount of money: a float, not finite, not a number, too large, or not positive."""


class LedgerRuleError(PaymentError, code="ledger.rule", refusal=True):
    """The transaction would break one of the ledger's invariants; nothing was written."""


class UnbalancedTransactionError(LedgerRuleError, code="ledger.unbalanced"):
    """Debits and credits differ, a side is missing, or an amount is not positive."""


class MalformedTransactionError(LedgerRuleError, code="ledger.malformed"):
    """The transaction moves money between accounts its kind may not (a deposit into "held")."""


class InsufficientFundsError(LedgerRuleError, code="ledger.insufficient_funds"):
    """The transaction would take `account` below its limit: it has `balance`, `amount` would go."""

    def __init__(self, message: str, *, account: str, balance: Decimal, amount: Decimal) -> None:
        super().__init__(message)
        self.account = account
        self.balance = balance
        self.amount = amount


class ChequeAlreadyCashedError(LedgerRuleError, code="ledger.cheque_already_cashed"):
    """Cheque `cheque_id` was already cashed, for job `job_uid`: a cheque pays exactly once."""

    def __init__(self, message: str, *, cheque_id: str, job_uid: str) -> None:
        super().__init__(message)
        self.cheque_id = cheque_id
        self.job_uid = job_uid


class DuplicateHoldError(LedgerRuleError, code="ledger.duplicate_hold"):
    """Value is already held (or was held and settled) for this job: a job is paid for once."""


class UnknownHoldError(LedgerRuleError, LookupError, code="ledger.unknown_hold"):
    """A settle for a job that has no hold: nothing was ever held for it."""


class AlreadySettledError(LedgerRuleError, code="ledger.already_settled"):
    """The job's hold was already settled: its value was charged or refunded once, for good."""


class SettlementMismatchError(LedgerRuleError, code="ledger.settlement_mismatch"):
    """A settle must release exactly the held value, as a charge to "access" and a refund to the
    payer (charge + refund = hold); a charge above the hold or below zero is refused."""


class DuplicateTransactionError(LedgerRuleError, code="ledger.duplicate_transaction"):
    """The transaction id is already in the ledger, for a different transaction."""


class LedgerSequenceError(LedgerRuleError, code="ledger.sequence"):
    """The transaction does not continue the ledger: its seq is not the next one, or the balances
    it records are not the ones it leaves."""


class LedgerConflictError(PaymentError, code="ledger.conflict", retriable=True):
    """Other writers kept appending first, past the retry limit; nothing written: retry later."""


class LedgerCorruptError(PaymentError, code="ledger.corrupt"):
    """A stored transaction is unreadable, is not the one its key says, or breaks the rules."""
