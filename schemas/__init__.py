"""The wire contract of parjobs: pydantic v2 models only, no I/O."""

from schemas._base import B64Bytes, WireModel
from schemas.keys import KeyFileData, PublicKeyData
from schemas.par import Capability, PARData, PARKind, PARRecord, PARState, PARTombstone

__all__ = [
    "B64Bytes",
    "Capability",
    "KeyFileData",
    "PARData",
    "PARKind",
    "PARRecord",
    "PARState",
    "PARTombstone",
    "PublicKeyData",
    "WireModel",
]
