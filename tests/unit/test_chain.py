"""The per-job hash chain: sealing, and every way a stored log can be tampered with, named."""

from __future__ import annotations

from datetime import timedelta, timezone
from typing import Any

import pytest

from orchestrator.core.chain import (
    EMITTERS,
    ChainFault,
    ChainProblem,
    event_bytes,
    event_hash,
    seal_event,
    verify_event,
    verify_log,
)
from orchestrator.core.jobstate import TRANSITIONS
from orchestrator.core.keys import KeyPair
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import (
    EventSequenceError,
    ForbiddenSignerError,
    ForgedSignatureError,
    UnsignedError,
)
from schemas.events import Completed, JobEvent, JobState, Progress
from schemas.signing import SERVICE_ROLES, ServiceRole
from tests.unit.test_jobstate import JOB, PATHS, SAMPLES, event

KEYS = {role: KeyPair.generate(role) for role in SERVICE_ROLES}
SERVICE_KEYS = ServiceKeys({role: key.public for role, key in KEYS.items()})

# Who appends what today (access.py, workers/storage.py, workers/compute.py), written out apart
# from EMITTERS so a slip in the table shows up here.
APPENDED_BY: dict[str, ServiceRole] = {
    "submitted": "access",
    "storage_contracted": "storage",
    "compute_contracted": "compute",
    "queued": "compute",
    "run_started": "compute",
    "progress": "compute",
    "completed": "compute",
    "failed": "compute",
    "cancelled": "compute",
    "expired": "access",
}
COMPLETED_PATH = [*PATHS[JobState.COMPLETED][:-1], "progress", "progress", "completed"]


def sealed_log(types: list[str], *, job: str = JOB) -> list[JobEvent]:
    """A job's log as the services append it: each event sealed by its role onto the last."""
    log: list[JobEvent] = []
    for seq, name in enumerate(types, start=1):
        role = APPENDED_BY[name]
        unsealed = event(seq, SAMPLES[name], job=job, actor=role)
        log.append(seal_event(unsealed, log[-1] if log else None, KEYS[role], role))
    return log


def edited(sealed: JobEvent, **changes: Any) -> JobEvent:
    """`sealed` as it reads after someone changed it in the store, keeping its seal."""
    return JobEvent.model_validate(sealed.model_dump() | changes)


def resigned(sealed: JobEvent, role: ServiceRole, **changes: Any) -> JobEvent:
    """`sealed`, changed, then signed again with `role`'s genuine key."""
    draft = edited(sealed, signer=role, signature=None, **changes)
    return draft.model_copy(update={"signature": KEYS[role].sign(event_bytes(draft))})


def faults(problems: list[ChainProblem]) -> list[tuple[int, ChainFault]]:
    return [(problem.seq, problem.fault) for problem in problems]


# --- the rule table ------------------------------------------------------------------------------


def test_every_event_type_has_its_emitters_and_they_are_the_appenders_of_today() -> None:
    assert EMITTERS.keys() == TRANSITIONS.keys()
    for event_type, role in APPENDED_BY.items():
        assert role in EMITTERS[event_type]
    # Besides compute, only access may cancel (a user cancelling through it); nothing else is
    # shared between roles.
    shared = {t: r for t, r in EMITTERS.items() if len(r) > 1}
    assert shared == {"cancelled": frozenset({"compute", "access"})}


# --- sealing -------------------------------------------------------------------------------------


def test_a_sealed_log_verifies() -> None:
    for path in [*PATHS.values(), COMPLETED_PATH]:
        assert verify_log(sealed_log(path), SERVICE_KEYS) == []


def test_each_event_names_its_signer_and_the_hash_of_the_one_before() -> None:
    log = sealed_log(COMPLETED_PATH)
    assert log[0].prev_hash is None
    assert [e.prev_hash for e in log[1:]] == [event_hash(e) for e in log[:-1]]
    assert [e.signer for e in log] == [APPENDED_BY[e.payload.type] for e in log]
    assert [verify_event(e, SERVICE_KEYS) for e in log] == [e.signer for e in log]


def test_a_sealed_log_survives_the_wire() -> None:
    # Stored and read back as JSON, with its times in another zone: every seal still holds.
    log = sealed_log(COMPLETED_PATH)
    elsewhere = timezone(timedelta(hours=5, minutes=30))
    relocated = [edited(e, time=e.time.astimezone(elsewhere)) for e in log]
    assert [event_hash(e) for e in relocated] != [event_hash(e) for e in log]  # other bytes
    assert (
        verify_log([JobEvent.model_validate_json(e.model_dump_json()) for e in log], SERVICE_KEYS)
        == []
    )
    assert faults(verify_log(relocated, SERVICE_KEYS))[0] == (1, ChainFault.FORGED)


def test_the_hash_covers_the_signature() -> None:
    first = sealed_log(["submitted"])[0]
    assert event_hash(first) != event_hash(first.model_copy(update={"signature": bytes(64)}))


def test_an_event_signature_is_for_events_only() -> None:
    assert event_bytes(sealed_log(["submitted"])[0]).startswith(b"parjobs-event-v1\x00{")


def test_a_role_cannot_seal_another_roles_event() -> None:
    submitted = event(1, SAMPLES["submitted"], actor="storage")
    with pytest.raises(ForbiddenSignerError, match=r"storage may not emit 'submitted'.*access may"):
        seal_event(submitted, None, KEYS["storage"], "storage")


def test_an_event_is_sealed_only_onto_the_one_it_follows() -> None:
    log = sealed_log(PATHS[JobState.READY])
    run_started = event(4, SAMPLES["run_started"], actor="compute")
    with pytest.raises(EventSequenceError, match="only event 1"):
        seal_event(run_started, None, KEYS["compute"], "compute")
    with pytest.raises(EventSequenceError, match="does not follow event 2"):
        seal_event(run_started, log[1], KEYS["compute"], "compute")
    other_job = sealed_log(PATHS[JobState.READY], job="b" * 32)
    with pytest.raises(EventSequenceError, match="does not follow"):
        seal_event(run_started, other_job[2], KEYS["compute"], "compute")


# --- one event as it arrives --------------------------------------------------------------------


def test_an_unsealed_event_is_refused() -> None:
    with pytest.raises(UnsignedError, match="carries no signature"):
        verify_event(event(1, SAMPLES["submitted"]), SERVICE_KEYS)


def test_an_edited_event_is_refused_as_forged() -> None:
    completed = sealed_log(COMPLETED_PATH)[-1]
    with pytest.raises(ForgedSignatureError, match="does not verify against the compute keys"):
        verify_event(edited(completed, payload=Completed(cpu_seconds=0.0)), SERVICE_KEYS)


def test_an_event_signed_by_a_stranger_claiming_a_role_is_forged() -> None:
    draft = event(1, SAMPLES["submitted"]).model_copy(update={"signer": "access"})
    forged = draft.model_copy(
        update={"signature": KeyPair.generate("access").sign(event_bytes(draft))}
    )
    with pytest.raises(ForgedSignatureError):
        verify_event(forged, SERVICE_KEYS)


def test_a_genuine_role_signing_another_roles_event_is_refused() -> None:
    progress = resigned(sealed_log(COMPLETED_PATH)[4], "storage")
    with pytest.raises(ForbiddenSignerError, match=r"signed by storage.*'progress'"):
        verify_event(progress, SERVICE_KEYS)


def test_an_older_key_of_the_role_still_verifies() -> None:
    log = sealed_log(COMPLETED_PATH)
    rotated = ServiceKeys(
        {
            "access": [KeyPair.generate("access-2031").public, KEYS["access"].public],
            "storage": KEYS["storage"].public,
            "compute": [KeyPair.generate("compute-2031").public, KEYS["compute"].public],
        }
    )
    assert verify_log(log, rotated) == []


# --- a stored log tampered with -----------------------------------------------------------------


def test_an_edited_event_is_named_by_its_own_seal_and_by_the_next_events_link() -> None:
    log = sealed_log(COMPLETED_PATH)
    log[1] = edited(log[1], actor="storage:elsewhere")
    problems = verify_log(log, SERVICE_KEYS)
    assert faults(problems) == [(2, ChainFault.FORGED), (2, ChainFault.EDITED)]
    assert problems[0].event_id == log[1].event_id
    assert "event 3, verified, was chained to another version of it" in str(problems[1])


def test_an_edited_last_event_is_named_by_its_seal() -> None:
    log = sealed_log(COMPLETED_PATH)
    log[-1] = edited(log[-1], payload=Completed(cpu_seconds=0.0))
    assert faults(verify_log(log, SERVICE_KEYS)) == [(len(log), ChainFault.FORGED)]


def test_an_event_edited_and_resigned_by_the_wrong_role_is_named_twice() -> None:
    log = sealed_log(COMPLETED_PATH)
    log[4] = resigned(log[4], "storage", payload=Progress(message="all is well", fraction=1.0))
    assert faults(verify_log(log, SERVICE_KEYS)) == [
        (5, ChainFault.FORBIDDEN_SIGNER),
        (5, ChainFault.EDITED),
    ]


def test_an_event_edited_with_its_own_roles_key_breaks_the_next_link() -> None:
    # Even a stolen compute key cannot rewrite history under a later, verified event.
    log = sealed_log(COMPLETED_PATH)
    log[4] = resigned(log[4], "compute", payload=Progress(message="rewritten"))
    problems = verify_log(log, SERVICE_KEYS)
    assert faults(problems) == [(5, ChainFault.EDITED)]
    assert problems[0].event_id == log[4].event_id


def test_an_unverified_event_vouches_for_nothing_before_it() -> None:
    # Event 6's link edited: event 6 is named (its seal, and event 7's link to it), while event
    # 5, which the forged link disowns, is not blamed.
    log = sealed_log(COMPLETED_PATH)
    log[5] = edited(log[5], prev_hash="0" * 64)
    assert faults(verify_log(log, SERVICE_KEYS)) == [(6, ChainFault.FORGED), (6, ChainFault.EDITED)]


def test_a_removed_event_is_a_gap() -> None:
    log = sealed_log(COMPLETED_PATH)
    problems = verify_log(log[:2] + log[3:], SERVICE_KEYS)
    assert faults(problems) == [(4, ChainFault.SEQ_GAP)]
    assert "follows event 2: the events between them are gone" in problems[0].detail


def test_a_removed_first_event_is_a_gap() -> None:
    problems = verify_log(sealed_log(COMPLETED_PATH)[1:], SERVICE_KEYS)
    assert faults(problems) == [(2, ChainFault.SEQ_GAP)]
    assert "events 1 to 1 are gone" in problems[0].detail


def test_a_repeated_seq_is_named() -> None:
    log = sealed_log(COMPLETED_PATH)
    problems = verify_log([*log[:3], log[2]], SERVICE_KEYS)
    assert faults(problems) == [(3, ChainFault.SEQ_GAP)]
    assert "repeats or reorders" in problems[0].detail


def test_unsealed_events_are_named() -> None:
    log = sealed_log(PATHS[JobState.READY])
    log[1] = edited(log[1], signer=None, signature=None)
    assert faults(verify_log(log, SERVICE_KEYS)) == [
        (2, ChainFault.UNSIGNED),
        (2, ChainFault.EDITED),
    ]


def test_a_first_event_naming_a_previous_one_is_named() -> None:
    first = resigned(sealed_log(["submitted"])[0], "access", prev_hash="ab" * 32)
    assert faults(verify_log([first], SERVICE_KEYS)) == [(1, ChainFault.BROKEN_LINK)]


def test_another_jobs_event_is_named() -> None:
    mine, theirs = sealed_log(COMPLETED_PATH), sealed_log(COMPLETED_PATH, job="b" * 32)
    problems = verify_log([*mine[:3], theirs[3]], SERVICE_KEYS)
    assert faults(problems) == [(4, ChainFault.FOREIGN)]
    assert problems[0].job_uid == "b" * 32


def test_a_log_is_checked_from_where_the_reader_left_it() -> None:
    log = sealed_log(COMPLETED_PATH)
    assert verify_log(log[3:], SERVICE_KEYS, after=log[2]) == []
    assert faults(verify_log(log[4:], SERVICE_KEYS, after=log[2])) == [(5, ChainFault.SEQ_GAP)]
    assert faults(verify_log(log[3:], SERVICE_KEYS, after=edited(log[2], actor="x"))) == [
        (3, ChainFault.EDITED)
    ]
