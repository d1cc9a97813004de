"""parjobs' user-facing API: PARs and the classes that read and write through them.

from orchestrator import PAR, ObjectReader, ObjectWriter, BucketReader, BucketWriter, KeyPair
"""

from orchestrator._access import BucketReader, BucketWriter, ObjectReader, ObjectWriter
from orchestrator._auth import request_fingerprint, sign_authorisation, write_cheque
from orchestrator._broker import Broker
from orchestrator._client import ParjobsClient
from orchestrator._control import PARControl, use_par_control
from orchestrator._exceptions import (
    ConfigurationError,
    CryptoError,
    IntegrityError,
    InvalidPARError,
    KeyFileError,
    LocalFileNotFoundError,
    NullPARError,
    ObjectExistsError,
    ObjectKeyError,
    ObjectNotFoundError,
    ObjectStoreError,
    OutsidePrefixError,
    PARClosedError,
    PARDataError,
    PARError,
    PARExpiredError,
    ParjobsError,
    PARPermissionError,
    PassphraseError,
    RemoteObjectNotFoundError,
    RemoteRejectedError,
    TamperedError,
    TransferError,
    UploadTooLargeError,
    UploadTooSmallError,
    WrongKeyError,
)
from orchestrator._issuer import PARIssuer
from orchestrator._jobsheet import JobSheet
from orchestrator._keys import KeyPair, PublicKeys
from orchestrator._objectstore import ObjectStore
from orchestrator._par import PAR, RunControl
from orchestrator._registry import PARRegistry
from orchestrator._settings import AMQPSettings, S3Settings
from orchestrator._transfer import PARTransport, TransferResult
from schemas.par import PARKind, PARState

__all__ = [
    "PAR",
    "AMQPSettings",
    "Broker",
    "BucketReader",
    "BucketWriter",
    "ConfigurationError",
    "CryptoError",
    "IntegrityError",
    "InvalidPARError",
    "JobSheet",
    "KeyFileError",
    "KeyPair",
    "LocalFileNotFoundError",
    "NullPARError",
    "ObjectExistsError",
    "ObjectKeyError",
    "ObjectNotFoundError",
    "ObjectReader",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectWriter",
    "OutsidePrefixError",
    "PARClosedError",
    "PARControl",
    "PARDataError",
    "PARError",
    "PARExpiredError",
    "PARIssuer",
    "PARKind",
    "PARPermissionError",
    "PARRegistry",
    "PARState",
    "PARTransport",
    "ParjobsClient",
    "ParjobsError",
    "PassphraseError",
    "PublicKeys",
    "RemoteObjectNotFoundError",
    "RemoteRejectedError",
    "RunControl",
    "S3Settings",
    "TamperedError",
    "TransferError",
    "TransferResult",
    "UploadTooLargeError",
    "UploadTooSmallError",
    "WrongKeyError",
    "request_fingerprint",
    "sign_authorisation",
    "use_par_control",
    "write_cheque",
]
