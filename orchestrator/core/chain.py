"""Each job's events as a hash chain, sealed by the service roles: sealing and checking (pure).

Sealing an event (`seal_event`) sets `prev_hash` to the hash of the job's previous event and signs
it with the appending role's key, over `signed_bytes(EVENT_PURPOSE, RFC 8785 JSON of the event
less its signature)`. `event_hash` covers the whole event, signature included. So:

- an event edited after sealing no longer verifies against its signer's key;
- an event edited and re-signed with some role's key breaks the link the next event holds (or is
  signed by a role that may not emit its type: `EMITTERS`);
- an event removed from the middle leaves a gap in the seqs and a broken link.

A log that lost its last events still verifies on its own: replay finds those by the signed
stream records the stored log lacks.

The signed bytes are the event's JSON as this schema version writes it, so a field added to
`JobEvent` later comes with a new `schema_version`, or old signatures would stop verifying.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from orchestrator.core.keys import KeyPair
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import (
    EventSequenceError,
    ForbiddenSignerError,
    ForgedSignatureError,
    UnsignedError,
)
from schemas.events import JobEvent
from schemas.signing import EVENT_PURPOSE, ServiceRole, canonical_bytes, signed_bytes

_ACCESS: frozenset[ServiceRole] = frozenset({"access"})
_STORAGE: frozenset[ServiceRole] = frozenset({"storage"})
_COMPUTE: frozenset[ServiceRole] = frozenset({"compute"})

EMITTERS: Mapping[str, frozenset[ServiceRole]] = MappingProxyType(
    {
        "submitted": _ACCESS,  # on the user's behalf: its actor is `user:<name>`
        "storage_contracted": _STORAGE,
        "compute_contracted": _COMPUTE,
        "queued": _COMPUTE,
        "run_started": _COMPUTE,
        "progress": _COMPUTE,
        "completed": _COMPUTE,
        "failed": _COMPUTE,  # a calculation compute rejects, or a run that fails
        # Stopped through the run PAR (compute), or by its user through the access service.
        "cancelled": _COMPUTE | _ACCESS,
        "expired": _ACCESS,  # the access service's sweep
    }
)
"""Every event type -> the service roles that may sign it."""


class ChainFault(StrEnum):
    """What is wrong with one event of a log."""

    UNSIGNED = "unsigned"
    FORGED = "signature invalid"
    FORBIDDEN_SIGNER = "signer not allowed"
    EDITED = "edited"  # a verified later event was chained to another version of it
    BROKEN_LINK = "prev_hash mismatch"  # names no event that comes before it
    SEQ_GAP = "seq gap"
    FOREIGN = "another job's event"


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """One problem of a job's log, named by the event it concerns."""

    job_uid: str
    seq: int
    event_id: str
    fault: ChainFault
    detail: str

    def __str__(self) -> str:
        return f"event {self.seq} ({self.event_id}): {self.fault.value}: {self.detail}"


def event_bytes(event: JobEvent) -> bytes:
    """Exactly what an event's signature signs: every field but the signature."""
    return signed_bytes(EVENT_PURPOSE, canonical_bytes(event, exclude={"signature"}))


def event_hash(event: JobEvent) -> str:
    """SHA-256 (hex) of the whole event's canonical JSON, signature included: the chain's link."""
    return hashlib.sha256(canonical_bytes(event)).hexdigest()


def seal_event(event: JobEvent, prev: JobEvent | None, key: KeyPair, role: ServiceRole) -> JobEvent:
    """`event` chained to `prev` (None: it starts the log) and signed by `role` with `key`.

    Refuses an event that does not follow `prev`, or whose type `role` may not emit: sealing it
    would only make a log that fails its own checks.
    """
    if prev is None and event.seq != 1:
        raise EventSequenceError(f"job {event.job_uid}: only event 1 follows no event")
    if prev is not None and (prev.job_uid, prev.seq + 1) != (event.job_uid, event.seq):
        raise EventSequenceError(
            f"event {event.seq} of job {event.job_uid} does not follow event {prev.seq} of "
            f"job {prev.job_uid}"
        )
    if role not in EMITTERS[event.payload.type]:
        raise ForbiddenSignerError(
            f"{role} may not emit {event.payload.type!r} events; "
            f"{' or '.join(sorted(EMITTERS[event.payload.type]))} may"
        )
    draft = event.model_copy(
        update={
            "prev_hash": None if prev is None else event_hash(prev),
            "signer": role,
            "signature": None,
        }
    )
    return draft.model_copy(update={"signature": key.sign(event_bytes(draft))})


def check_seal(event: JobEvent, keys: ServiceKeys) -> ChainProblem | None:
    """What is wrong with the event's own seal, if anything: its signature, then its signer.

    Says nothing of its link to the event before it: that is `verify_log`'s, against the log.
    """
    if event.signer is None or event.signature is None:
        return _problem(event, ChainFault.UNSIGNED, "it carries no signature")
    data = event_bytes(event)
    if not any(key.verify(event.signature, data) for key in keys.keys_for(event.signer)):
        detail = (
            f"its signature does not verify against the {event.signer} keys: it was edited "
            "after it was signed, or signed by someone else"
        )
        return _problem(event, ChainFault.FORGED, detail)
    if event.signer not in EMITTERS[event.payload.type]:
        detail = f"it is signed by {event.signer}, which may not emit {event.payload.type!r} events"
        return _problem(event, ChainFault.FORBIDDEN_SIGNER, detail)
    return None


def verify_event(event: JobEvent, keys: ServiceKeys) -> ServiceRole:
    """The role that sealed `event`, once its signature verifies and the role may emit it.

    For one event as it arrives (a consumer, the client), raising the matching `SignatureError`.
    """
    problem = check_seal(event, keys)
    if problem is None:
        assert event.signer is not None  # a verified seal names its signer
        return event.signer
    message = f"event {event.seq} ({event.event_id}) of job {event.job_uid}: {problem.detail}"
    if problem.fault is ChainFault.UNSIGNED:
        raise UnsignedError(message)
    if problem.fault is ChainFault.FORGED:
        raise ForgedSignatureError(message)
    raise ForbiddenSignerError(message)


def verify_log(
    events: Iterable[JobEvent], keys: ServiceKeys, *, after: JobEvent | None = None
) -> list[ChainProblem]:
    """Every problem of one job's log, in seq order; [] if every event is sealed and chained.

    `events` are the job's events in seq order, from seq 1, or from the one after `after` (an
    event already checked): so a reader that keeps what it checked verifies only what is new.
    """
    problems: list[ChainProblem] = []
    prev = after
    for event in events:
        prev_hash = None if prev is None else event_hash(prev)
        problems.extend(_event_problems(prev, prev_hash, event, keys))
        prev = event
    return problems


def check_log(events: list[JobEvent], keys: ServiceKeys) -> tuple[list[ChainProblem], list[str]]:
    """`verify_log` of a whole log (from seq 1), and each event's `event_hash`: what a caller
    that also needs the links (replay) gets with each event canonicalized for its hash once."""
    problems: list[ChainProblem] = []
    hashes: list[str] = []
    for n, event in enumerate(events):
        prev = events[n - 1] if n else None
        problems.extend(_event_problems(prev, hashes[-1] if n else None, event, keys))
        hashes.append(event_hash(event))
    return problems, hashes


def _problem(event: JobEvent, fault: ChainFault, detail: str) -> ChainProblem:
    return ChainProblem(event.job_uid, event.seq, event.event_id, fault, detail)


def _event_problems(
    prev: JobEvent | None, prev_hash: str | None, event: JobEvent, keys: ServiceKeys
) -> list[ChainProblem]:
    """`event`'s problems after `prev`, whose `event_hash` is `prev_hash`."""
    seal = check_seal(event, keys)
    problems = [] if seal is None else [seal]
    if prev is None:
        if event.seq != 1:
            detail = f"the log starts at event {event.seq}: events 1 to {event.seq - 1} are gone"
            problems.append(_problem(event, ChainFault.SEQ_GAP, detail))
        elif event.prev_hash is not None:
            detail = "the job's first event names a previous one"
            problems.append(_problem(event, ChainFault.BROKEN_LINK, detail))
    elif event.job_uid != prev.job_uid:
        detail = f"it belongs to job {event.job_uid}, not to job {prev.job_uid}"
        problems.append(_problem(event, ChainFault.FOREIGN, detail))
    elif event.seq != prev.seq + 1:
        detail = f"it follows event {prev.seq}: the events between them are gone"
        if event.seq <= prev.seq:
            detail = f"it follows event {prev.seq}: the log repeats or reorders a seq"
        problems.append(_problem(event, ChainFault.SEQ_GAP, detail))
    elif seal is None and event.prev_hash != prev_hash:
        # A verified event vouches for the one before it; an unverified link proves nothing.
        detail = (
            f"event {event.seq}, verified, was chained to another version of it: it was "
            f"edited or replaced after event {event.seq} was written"
        )
        problems.append(_problem(prev, ChainFault.EDITED, detail))
    return problems
