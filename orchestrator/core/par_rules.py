"""The PAR's rules as pure functions: legal kinds, safe object keys, expiry, seal binding."""

from __future__ import annotations

from datetime import datetime

from orchestrator.core.crypto import checksum
from orchestrator.errors import InvalidPARError, ObjectKeyError
from schemas.par import Capability, PARData, PARKind

MAX_KEY_BYTES = 1024  # S3's own limit on a key's UTF-8 length


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise `ObjectKeyError`.

    Refused: empty, over 1024 bytes, absolute, backslashes, control characters, and any empty,
    `.` or `..` segment, so no key can climb out of the prefix it is joined to.
    """
    if not isinstance(key, str) or not key:
        raise ObjectKeyError("an object key must be a non-empty string")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ObjectKeyError(f"object key is {len(key.encode())} bytes; the limit is 1024")
    if key.startswith("/"):
        raise ObjectKeyError(f"object key {key!r} is absolute; give a relative key")
    if "\\" in key:
        raise ObjectKeyError(f"object key {key!r} contains a backslash; use '/' between parts")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise ObjectKeyError(f"object key {key!r} contains a control character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ObjectKeyError(
                f"object key {key!r} has an empty, '.' or '..' part; such keys could escape "
                "their prefix"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A key prefix is a safe key followed by exactly one '/'."""
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise ObjectKeyError(f"a key prefix must end with '/': {prefix!r}")
    validate_key(prefix[:-1])
    return prefix


def join_key(prefix: str, relative_key: str) -> str:
    """The full key of `relative_key` inside `prefix`; both are validated."""
    full = validate_prefix(prefix) + validate_key(relative_key)
    if len(full.encode()) > MAX_KEY_BYTES:
        raise ObjectKeyError(f"key {full!r} is over 1024 bytes once joined to its prefix")
    return full


def check_combination(
    kind: PARKind,
    *,
    readable: bool,
    writeable: bool,
    executable: bool,
    key: str | None,
    prefix: str | None,
    resource: str | None,
) -> None:
    """Refuse kind/permission/target combinations a PAR cannot honestly grant."""
    if kind is PARKind.OBJECT:
        if executable or not (readable or writeable):
            raise InvalidPARError("an object PAR is read, write or read+write; never execute")
        if key is None or prefix is not None or resource is not None:
            raise InvalidPARError("an object PAR needs a key, and no prefix or resource")
        validate_key(key)
    elif kind is PARKind.BUCKET:
        if executable or readable == writeable:
            raise InvalidPARError(
                "a bucket PAR is either write (a POST policy on a prefix) or read (a manifest of "
                "the objects present when minted); never both, never execute"
            )
        if prefix is None or key is not None or resource is not None:
            raise InvalidPARError("a bucket PAR needs a prefix, and no key or resource")
        validate_prefix(prefix)
    else:
        if not executable or readable or writeable:
            raise InvalidPARError("a calculation PAR is execute only: it cannot read or write data")
        if resource is None or key is not None or prefix is not None:
            raise InvalidPARError("a calculation PAR needs a resource, and no key or prefix")


def seconds_remaining(expires_at: datetime, now: datetime, buffer: float = 30) -> float:
    """Seconds of validity left after subtracting `buffer`; 0.0 once that is gone."""
    return max(0.0, (expires_at - now).total_seconds() - buffer)


def permission_letters(par: PARData) -> str:
    """'r', 'w' and 'x' for the permissions a PAR grants, e.g. "rw"."""
    granted = (par.is_readable, par.is_writeable, par.is_executable)
    return "".join(letter for letter, on in zip("rwx", granted, strict=True) if on)


def sealing_info(par: PARData) -> bytes:
    """The HPKE `info` for a PAR's capability: purpose, uid and a digest of all public metadata.

    Because it covers every clear field, moving a sealed capability into another PAR, or editing
    any metadata (key, expiry, permissions, recipient), makes the seal refuse to open.
    """
    digest = checksum(par.model_dump_json(exclude={"sealed"}))
    return f"parjobs-par-v1|{par.kind.value}|{permission_letters(par)}|{par.uid}|{digest}".encode()


def capability_proof(capability: Capability) -> str:
    """The checksum a holder shows to prove it opened a PAR; the registry stores the same."""
    return checksum(capability.model_dump_json())
