"""A message union per queue: each queue takes its own bodies, and anything else is a validation
failure the consumer dead-letters; the topology says which union each queue takes."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, TypeAdapter

from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import DELAY_BUCKETS_S, RPC_REQUESTS, Topology
from orchestrator.core.codec import decode
from orchestrator.core.jobstate import fold
from orchestrator.errors import InvalidMessageError
from schemas.events import JobEvent, JobRequest, Submitted
from schemas.keys import PublicKeyData
from schemas.messages import (
    ACCESS_REQUESTS,
    ACCESS_RESPONSES,
    COMPUTE_REQUESTS,
    COMPUTE_RESPONSES,
    DEADLINES,
    JOB_EVENTS,
    JOB_UPDATES,
    RUN_STARTS,
    ClosePAR,
    Envelope,
    ErrorReply,
    EventPublished,
    GetJob,
    GetOutputs,
    GetPARState,
    GetRunStatus,
    JobReply,
    MessageBody,
    MessageUnion,
    OutputsReply,
    PARStateReply,
    RunReply,
    StartRun,
    StopRun,
)
from schemas.par import PARState

UID = "0123456789abcdef" * 2
SEALED = bytes(64)  # a sealed run capability: what the wire carries, whatever it holds
SUBMITTED = JobEvent(
    job_uid=UID,
    seq=1,
    actor="access",
    payload=Submitted(
        request=JobRequest(calculation="checksum"),
        owner="ada",
        user="f" * 64,
        user_key=PublicKeyData(name="user", x25519=bytes(32), ed25519=bytes(32)),
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    ),
)

# One body of each type a service reads (a request or an event), and where each belongs.
REQUESTS: dict[str, BaseModel] = {
    "get_job": GetJob(job_uid=UID),
    "get_outputs": GetOutputs(job_uid=UID),
    "close_par": ClosePAR(uid=UID, proof="0" * 64),
    "get_par_state": GetPARState(uid=UID),
    "start_run": StartRun(job_uid=UID, sealed=SEALED),
    "stop_run": StopRun(job_uid=UID, sealed=SEALED),
    "get_run_status": GetRunStatus(job_uid=UID, sealed=SEALED),
}
TAKES = {
    "access requests": {"submit_job", "get_job", "get_outputs", "close_par", "get_par_state"},
    "compute requests": {"stop_run", "get_run_status"},
    "run starts": {"start_run"},
    "job events": {"event"},
    "job updates": {"event", "progress_report"},
    "job deadlines": {"job_deadline"},
    "access responses": {"job", "outputs", "par_state", "error"},
    "compute responses": {"run", "error"},
}
UNIONS = [
    ACCESS_REQUESTS,
    COMPUTE_REQUESTS,
    RUN_STARTS,
    JOB_EVENTS,
    JOB_UPDATES,
    DEADLINES,
    ACCESS_RESPONSES,
    COMPUTE_RESPONSES,
]


def _tag(body: type[BaseModel]) -> str:
    tag = body.model_fields["type"].default
    assert isinstance(tag, str)
    return tag


def _sent(body: BaseModel) -> bytes:
    return Envelope(sender="test", body=body).model_dump_json().encode()


@pytest.mark.parametrize("union", UNIONS, ids=lambda union: union.name)
def test_each_union_names_its_bodies(union: MessageUnion[object]) -> None:
    assert {_tag(body) for body in union.bodies} == TAKES[union.name]


@pytest.mark.parametrize(
    ("union", "body"),
    [
        (ACCESS_REQUESTS, REQUESTS[tag])
        for tag in ("get_job", "get_outputs", "close_par", "get_par_state")
    ]
    + [(COMPUTE_REQUESTS, REQUESTS[tag]) for tag in ("stop_run", "get_run_status")]
    + [(RUN_STARTS, REQUESTS["start_run"])],
    ids=lambda value: getattr(value, "name", None) or getattr(value, "type", "?"),
)
def test_a_queue_takes_its_own_bodies(union: MessageUnion[object], body: BaseModel) -> None:
    assert decode(union.envelope, _sent(body)).body == body


@pytest.mark.parametrize(
    ("union", "tag"),
    [
        (union, tag)
        for union in (ACCESS_REQUESTS, COMPUTE_REQUESTS)
        for tag in sorted(REQUESTS)
        if tag not in TAKES[union.name]
    ],
    ids=lambda value: getattr(value, "name", value),
)
def test_a_request_for_another_queue_is_an_unknown_type_there(
    union: MessageUnion[object], tag: str
) -> None:
    with pytest.raises(InvalidMessageError, match=tag) as refused:
        decode(union.envelope, _sent(REQUESTS[tag]))
    assert refused.value.dead_letter_reason == "unknown-type"


@pytest.mark.parametrize("union", [RUN_STARTS, JOB_EVENTS], ids=lambda union: union.name)
def test_a_queue_of_one_type_refuses_any_other(union: MessageUnion[object]) -> None:
    (taken,) = TAKES[union.name]
    for tag, body in REQUESTS.items():
        if tag != taken:
            with pytest.raises(InvalidMessageError, match="type") as refused:
                decode(union.envelope, _sent(body))
            assert refused.value.dead_letter_reason == "invalid"


def test_a_work_queue_takes_job_events() -> None:
    received = decode(JOB_EVENTS.envelope, _sent(EventPublished(event=SUBMITTED)))
    assert received.body.event == SUBMITTED


def test_replies_are_read_as_what_the_service_answers() -> None:
    job = JobReply(sheet=fold([SUBMITTED]))
    assert decode(ACCESS_RESPONSES.envelope, _sent(job)).body == job
    run = RunReply(job_uid=UID, state="running", accepted=True)
    assert decode(COMPUTE_RESPONSES.envelope, _sent(run)).body == run
    with pytest.raises(InvalidMessageError) as refused:
        decode(COMPUTE_RESPONSES.envelope, _sent(job))  # compute never answers with a job
    assert refused.value.dead_letter_reason == "unknown-type"


def test_a_bare_envelope_holds_any_body() -> None:
    for body in [*REQUESTS.values(), PARStateReply(uid=UID, state=PARState.OPEN)]:
        assert decode(TypeAdapter(Envelope), _sent(body)).body == body


def test_every_body_type_has_a_queue_or_a_reply_that_takes_it() -> None:
    everything = typing.get_args(typing.get_args(MessageBody)[0])
    assert {_tag(body) for body in everything} == set().union(*TAKES.values())
    assert OutputsReply in ACCESS_RESPONSES.bodies
    assert ErrorReply in ACCESS_RESPONSES.bodies
    assert ErrorReply in COMPUTE_RESPONSES.bodies


# --- the topology says which union each queue takes -----------------------------------------------


def test_each_rpc_service_takes_its_requests_and_names_its_replies() -> None:
    assert dict(RPC_REQUESTS) == {
        "access": ACCESS_REQUESTS,
        "compute": COMPUTE_REQUESTS,
        "runs": RUN_STARTS,
    }
    assert ACCESS_REQUESTS.replies is ACCESS_RESPONSES
    assert COMPUTE_REQUESTS.replies is COMPUTE_RESPONSES
    assert RUN_STARTS.replies is COMPUTE_RESPONSES


def test_every_queue_a_daemon_consumes_says_what_it_takes() -> None:
    topology = Topology("p")
    ids = Identities(topology)
    queues = ids.service_queues()
    taken = {spec.name: spec.accepts for specs in queues.values() for spec in specs}
    assert taken == {
        "p.rpc.access": ACCESS_REQUESTS,
        "p.access": JOB_EVENTS,
        "p.storage": JOB_EVENTS,
        "p.compute": JOB_EVENTS,
        "p.rpc.compute": COMPUTE_REQUESTS,
        "p.rpc.runs": RUN_STARTS,
        "p.deadlines": DEADLINES,
        **{f"p.delay.{bound}": DEADLINES for bound in DELAY_BUCKETS_S},
    }
    assert ids.stops_queue("d1").accepts is JOB_EVENTS
    # Only the events exchange feeds the queues that take job events; nothing binds the
    # deadlines' queues (only access publishes there, through the default exchange).
    fed_by = {JOB_EVENTS: {"p.events"}, DEADLINES: set()}
    for specs in queues.values():
        for spec in specs:
            exchanges = {binding.exchange for binding in spec.bindings}
            assert exchanges == fed_by.get(spec.accepts, {"p.commands"}), spec.name
