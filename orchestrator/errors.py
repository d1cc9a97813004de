"""Every error parjobs raises, drawn in one place.

Each class names a situation a user can act on; the message says what to do. Callers catch
`ParjobsError` for "anything parjobs refused" or a leaf class for one specific refusal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import timedelta
    from decimal import Decimal


class ParjobsError(Exception):
    """Base of every error parjobs raises on purpose."""


class ConfigurationError(ParjobsError):
    """A setting is missing or wrong, or a needed server/binary is not available."""


# --- keys and cryptography -------------------------------------------------------------------


class CryptoError(ParjobsError):
    """A cryptographic check failed."""


class WrongKeyError(CryptoError):
    """The private key given is not the one the payload was sealed for."""


class TamperedError(CryptoError):
    """A sealed payload or the metadata bound to it was changed after sealing."""


class PassphraseError(CryptoError):
    """The passphrase is wrong, or the passphrase-protected blob is corrupt."""


class KeyFileError(CryptoError):
    """A key file is missing, unreadable or not a parjobs key file."""


class SignatureError(CryptoError):
    """A signed message or event was refused; the subclass says why."""


class UnsignedError(SignatureError):
    """The message or event carries no signature where one is required."""


class ForgedSignatureError(SignatureError):
    """The signature does not verify against the key of the signer it names: forged, made with
    another key, or the signed content was altered after signing."""


class StaleSignatureError(SignatureError):
    """The signed time is outside the accepted window around the receiver's clock.

    `offset` is the signed time minus the receiver's now: negative in the past, positive ahead.
    """

    def __init__(self, message: str, *, offset: timedelta, window: timedelta) -> None:
        super().__init__(message)
        self.offset = offset
        self.window = window


class UnknownSignerError(SignatureError, LookupError):
    """The signer named has no key here: neither a configured service role nor a registered user."""


class ForbiddenSignerError(SignatureError):
    """The signature is genuine, but its signer may not sign this: a service role emitting an event
    type that belongs to another role."""


# --- object keys -------------------------------------------------------------------------------


class ObjectKeyError(ParjobsError, ValueError):
    """An object key is empty, too long, absolute, or tries to climb out of its prefix."""


# --- PARs ---------------------------------------------------------------------------------------


class PARError(ParjobsError):
    """A pre-authenticated request cannot be used as asked."""


class InvalidPARError(PARError, ValueError):
    """The PAR's kind and permissions are an illegal combination, or a required field is missing."""


class NullPARError(PARError):
    """The PAR is null (made with no arguments) and grants nothing."""


class PARExpiredError(PARError):
    """The PAR has expired (or is within its safety buffer of expiring)."""


class PARPermissionError(PARError, PermissionError):
    """The PAR does not grant this operation (for example a write through a read-only PAR)."""


class PARClosedError(PARError):
    """The PAR was closed; closing again or using it is refused."""


class PARDataError(PARError, ValueError):
    """A serialised PAR (`to_data` output) is corrupt or not a PAR at all."""


# --- transfers through PARs ---------------------------------------------------------------------


class TransferError(ParjobsError):
    """Moving bytes through a PAR failed."""


class LocalFileNotFoundError(TransferError, FileNotFoundError):
    """The local file to upload does not exist."""


class UploadTooLargeError(TransferError):
    """The upload is bigger than the PAR allows; nothing was stored."""


class UploadTooSmallError(TransferError):
    """The upload is smaller than the PAR's minimum size; nothing was stored."""


class OutsidePrefixError(TransferError, PermissionError):
    """A bucket write PAR was asked to write a key outside its prefix."""


class IntegrityError(TransferError):
    """The bytes received do not match their checksum; the partial result was discarded."""


class RemoteRejectedError(TransferError):
    """The S3 server refused the request; `code` and `status` say why."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RemoteObjectNotFoundError(TransferError):
    """The object the PAR points at does not exist (yet)."""


# --- the object store (service side) ------------------------------------------------------------


class ObjectStoreError(ParjobsError):
    """The object store refused or failed an operation."""


class ObjectExistsError(ObjectStoreError):
    """A conditional create lost: the object already exists."""


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """No object at that key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "object not found"


# --- jobs and their event log -------------------------------------------------------------------


class JobError(ParjobsError):
    """A job's event log refused an event, or cannot be read."""


class IllegalTransitionError(JobError):
    """The event is not legal in the job's current state; `legal` lists what would be."""

    def __init__(
        self, message: str, *, job_uid: str, state: str | None, event_type: str, legal: list[str]
    ) -> None:
        super().__init__(message)
        self.job_uid = job_uid
        self.state = state  # None: the job has no events yet
        self.event_type = event_type
        self.legal = legal


class EventSequenceError(JobError):
    """The event does not continue this job's log: another job's, or its seq is not last + 1."""


class AppendConflictError(JobError):
    """Another writer appended this sequence number first; reload the log and retry."""


class JobExistsError(AppendConflictError):
    """A job with this uid was already created."""


class JobNotFoundError(JobError, LookupError):
    """No events are stored for this job uid."""


class JobNotCompletedError(JobError):
    """Outputs are only handed out once a job has completed."""


class RunRefusedError(JobError):
    """The run PAR is valid but the run cannot start or stop now; the message says why."""


class EventLogCorruptError(JobError):
    """A stored event is unreadable, or is not the event its key says it is."""


# --- authorisation and cheques -----------------------------------------------------------------


class AuthorisationError(ParjobsError):
    """A job's authorisation was refused; nothing was created for it."""


class ForgedAuthorisationError(AuthorisationError):
    """The signature does not verify, or was made by another key than the user it names."""


class StaleAuthorisationError(AuthorisationError):
    """The authorisation's timestamp is outside the accepted window around the service's clock.

    `offset` is timestamp minus the service's now: negative in the past, positive in the future.
    """

    def __init__(self, message: str, *, offset: timedelta, window: timedelta) -> None:
        super().__init__(message)
        self.offset = offset
        self.window = window


class MismatchedAuthorisationError(AuthorisationError):
    """The authorisation was signed for a different job request than the one it came with."""


class ReplayedAuthorisationError(AuthorisationError):
    """The authorisation's nonce was already used by another submission: sign a new one."""


class ChequeError(ParjobsError):
    """A cheque was refused; no value moved."""


class ForgedChequeError(ChequeError):
    """The cheque's signature does not verify against the payer's registered key."""


class ChequePayerMismatchError(ChequeError):
    """The cheque's payer is not the user who authorised the job: a cheque pays only for its
    payer's own jobs."""


class WrongRecipientError(ChequeError):
    """The cheque is payable to another account than the one cashing it."""


class WrongResourceError(ChequeError):
    """The cheque pays for another job request than the one it came with."""


class ExpiredChequeError(ChequeError):
    """The cheque's expiry has passed."""


class InsufficientChequeError(ChequeError):
    """The price of the calculation is more than the cheque's maximum spend."""

    def __init__(self, message: str, *, price: Decimal, limit: Decimal) -> None:
        super().__init__(message)
        self.price = price
        self.limit = limit


class UserError(ParjobsError):
    """A user registration was refused, or no such user is registered."""


class UserExistsError(UserError):
    """The name, or the public key, is already registered (to another key, or another name)."""


class UnknownUserError(UserError, LookupError):
    """No user is registered under this name or key fingerprint."""


# --- calculations -------------------------------------------------------------------------------


class CalculationError(ParjobsError):
    """A calculation cannot be found, loaded, parameterised or launched."""


class UnknownCalculationError(CalculationError, LookupError):
    """No calculation has this name; `available` lists the names that exist."""

    def __init__(self, message: str, *, name: str, available: list[str]) -> None:
        super().__init__(message)
        self.name = name
        self.available = available


class DuplicateCalculationError(CalculationError):
    """Two calculations (for example from two distributions) claim the same name."""


class CalculationLoadError(CalculationError):
    """An entry point of `parjobs.calculations` fails to import, or is not a valid calculation."""


class InvalidParametersError(CalculationError, ValueError):
    """The parameters do not fit the calculation's model; `errors` holds pydantic's details."""

    def __init__(self, message: str, *, calculation: str, errors: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.calculation = calculation
        self.errors = errors


class CalculationLaunchError(CalculationError):
    """The calculation's program cannot be started (not found on the child's PATH)."""


# --- the broker (RabbitMQ) ----------------------------------------------------------------------


class BrokerError(ParjobsError):
    """RabbitMQ refused or failed an operation."""


class BrokerUnavailableError(BrokerError):
    """RabbitMQ cannot be reached, or the connection stayed down past the operation's deadline."""


class TopologyError(BrokerError):
    """An exchange or queue is missing, or exists with other arguments than the ones declared."""


class PublishError(BrokerError):
    """The broker did not take responsibility for a published message."""

    def __init__(self, message: str, *, exchange: str, routing_key: str) -> None:
        super().__init__(message)
        self.exchange = exchange
        self.routing_key = routing_key


class UnroutableError(PublishError):
    """No queue is bound for the routing key, or the exchange does not exist: nothing was stored."""


class PublishNackedError(PublishError):
    """The broker refused the message (a negative confirm), e.g. a full reject-publish queue."""


class RequestTimeoutError(BrokerError, TimeoutError):
    """No reply to a request arrived in time."""


class StreamStalledError(BrokerError, TimeoutError):
    """A stream read stopped receiving messages before it reached the stream's tail."""


class PoisonMessageError(ParjobsError):
    """Raised by a message handler: this message can never succeed, so dead-letter it (once).

    The message is the reason recorded with the dead letter; `code` classifies it.
    """

    code = "poison"


class InvalidMessageError(PoisonMessageError, ValueError):
    """A message is not JSON ("undecodable"), fails validation ("invalid"), or has an unknown type
    ("unknown-type"); `code` says which."""

    def __init__(self, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


# --- payments: accounts and the ledger ---------------------------------------------------------


class PaymentError(ParjobsError):
    """An account or ledger operation was refused, or the ledger cannot be read."""


class InvalidAccountError(PaymentError, ValueError):
    """Not a valid account name, or one of the service's accounts where a user's must be."""


class InvalidAmountError(PaymentError, ValueError):
    """Not an amount of money: a float, not finite, not a number, too large, or not positive."""


class LedgerRuleError(PaymentError):
    """The transaction would break one of the ledger's invariants; nothing was written."""


class UnbalancedTransactionError(LedgerRuleError):
    """Debits and credits differ, a side is missing, or an amount is not positive."""


class MalformedTransactionError(LedgerRuleError):
    """The transaction moves money between accounts its kind may not (a deposit into "held")."""


class InsufficientFundsError(LedgerRuleError):
    """The transaction would take `account` below its limit: it has `balance`, `amount` would go."""

    def __init__(self, message: str, *, account: str, balance: Decimal, amount: Decimal) -> None:
        super().__init__(message)
        self.account = account
        self.balance = balance
        self.amount = amount


class ChequeAlreadyCashedError(LedgerRuleError):
    """Cheque `cheque_id` was already cashed, for job `job_uid`: a cheque pays exactly once."""

    def __init__(self, message: str, *, cheque_id: str, job_uid: str) -> None:
        super().__init__(message)
        self.cheque_id = cheque_id
        self.job_uid = job_uid


class DuplicateHoldError(LedgerRuleError):
    """Value is already held (or was held and settled) for this job: a job is paid for once."""


class UnknownHoldError(LedgerRuleError, LookupError):
    """A settle for a job that has no hold: nothing was ever held for it."""


class AlreadySettledError(LedgerRuleError):
    """The job's hold was already settled: its value was charged or refunded once, for good."""


class SettlementMismatchError(LedgerRuleError):
    """A settle must release exactly the held value, as a charge to "access" and a refund to the
    payer (charge + refund = hold); a charge above the hold or below zero is refused."""


class DuplicateTransactionError(LedgerRuleError):
    """The transaction id is already in the ledger, for a different transaction."""


class LedgerSequenceError(LedgerRuleError):
    """The transaction does not continue the ledger: its seq is not the next one, or the balances
    it records are not the ones it leaves."""


class LedgerConflictError(PaymentError):
    """Other writers kept appending first, past the retry limit; nothing written: retry later."""


class LedgerCorruptError(PaymentError):
    """A stored transaction is unreadable, is not the one its key says, or breaks the rules."""
