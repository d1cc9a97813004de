"""The topology as data, without a broker: names, bindings and the real `x-` arguments."""

from __future__ import annotations

import pytest

from orchestrator.broker.topology import (
    Binding,
    ClassicQueueArgs,
    ExchangeKind,
    QuorumQueueArgs,
    StreamQueueArgs,
    Topology,
    check_prefix,
)
from schemas.messages import ACCESS_REQUESTS, COMPUTE_REQUESTS, JOB_EVENTS, RUN_STARTS


def test_quorum_arguments_with_dead_lettering_are_at_least_once() -> None:
    args = QuorumQueueArgs(
        delivery_limit=5, dead_letter_exchange="p.dlx", dead_letter_routing_key="p.dlq"
    )
    assert args.to_arguments() == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "p.dlx",
        "x-dead-letter-routing-key": "p.dlq",
        "x-dead-letter-strategy": "at-least-once",
        # without it RabbitMQ silently falls back to at-most-once dead-lettering
        "x-overflow": "reject-publish",
    }


def test_plain_quorum_queue_and_length_limit() -> None:
    assert QuorumQueueArgs().to_arguments() == {"x-queue-type": "quorum"}
    assert QuorumQueueArgs(max_length=100).to_arguments() == {
        "x-queue-type": "quorum",
        "x-overflow": "reject-publish",  # back-pressure on publishers, never a silent drop
        "x-max-length": 100,
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delivery_limit": 0},
        {"max_length": -1},
        {"dead_letter_routing_key": "p.dlq"},  # a routing key without an exchange
    ],
)
def test_quorum_arguments_refuse_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        QuorumQueueArgs(**kwargs)  # type: ignore[arg-type]


def test_stream_arguments() -> None:
    assert StreamQueueArgs().to_arguments() == {"x-queue-type": "stream"}
    assert StreamQueueArgs(
        max_age="7D", max_length_bytes=10**9, max_segment_size_bytes=10**8
    ).to_arguments() == {
        "x-queue-type": "stream",
        "x-max-age": "7D",
        "x-max-length-bytes": 10**9,
        "x-stream-max-segment-size-bytes": 10**8,
    }


@pytest.mark.parametrize("max_age", ["7", "7d ", "0D", "1w", "D"])
def test_stream_max_age_uses_rabbitmq_units(max_age: str) -> None:
    with pytest.raises(ValueError, match="max_age"):
        StreamQueueArgs(max_age=max_age)


def test_names_derive_from_the_prefix() -> None:
    topology = Topology("acme.prod", delivery_limit=3)
    assert (topology.events.name, topology.events.kind) == ("acme.prod.events", ExchangeKind.TOPIC)
    assert (topology.commands.name, topology.commands.kind) == (
        "acme.prod.commands",
        ExchangeKind.DIRECT,
    )
    assert topology.dead_letter_exchange.name == "acme.prod.dlx"
    assert [exchange.name for exchange in topology.exchanges] == [
        "acme.prod.events",
        "acme.prod.commands",
        "acme.prod.dlx",
    ]
    dlq = topology.dead_letter_queue
    assert dlq.name == "acme.prod.dlq"
    assert dlq.bindings == (Binding("acme.prod.dlx", topology.dead_letter_routing_key),)
    # no delivery limit and no DLX: looking at dead letters never loses or moves one
    assert dlq.arguments() == {"x-queue-type": "quorum"}
    stream = topology.events_stream
    assert stream.name == "acme.prod.events.stream"
    assert stream.bindings == (Binding("acme.prod.events", "#"),)
    assert stream.arguments() == {"x-queue-type": "stream"}
    assert stream.durable


def test_work_queues_take_their_bindings_as_data() -> None:
    topology = Topology("p", delivery_limit=3)
    storage = topology.work_queue("storage", events=["job.submitted", "job.*.expired"])
    assert storage.name == "p.storage"
    assert storage.bindings == (
        Binding("p.events", "job.submitted"),
        Binding("p.events", "job.*.expired"),
    )
    assert storage.arguments() == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 3,
        "x-dead-letter-exchange": "p.dlx",
        "x-dead-letter-routing-key": "p.dlq",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    compute = topology.work_queue("compute", commands=["run.start"])
    assert compute.bindings == (Binding("p.commands", "run.start"),)
    assert topology.work_queue("access").bindings == ()


def test_rpc_and_reply_queues() -> None:
    topology = Topology("p")
    assert topology.rpc_routing_key("access") == "rpc.access"
    rpc = topology.rpc_queue("access")
    assert rpc.name == "p.rpc.access"
    assert rpc.bindings == (Binding("p.commands", "rpc.access"),)
    assert rpc.arguments()["x-queue-type"] == "quorum"
    reply = topology.reply_queue("abc123")
    assert reply.name == "p.reply.abc123"
    assert reply.exclusive
    assert not reply.durable
    assert reply.args == ClassicQueueArgs()
    assert reply.arguments() == {"x-queue-type": "classic"}


@pytest.mark.parametrize("role", ["events", "dlq", "dlx", "commands", "rpc", "reply", "a.b", ""])
def test_work_queue_names_cannot_collide_or_nest(role: str) -> None:
    with pytest.raises(ValueError, match="cannot name"):
        Topology("p").work_queue(role)


@pytest.mark.parametrize("prefix", ["", ".p", "p.", "p..q", "p q", "amq", "amq.x", "x" * 201])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match=r"prefix|reserved"):
        check_prefix(prefix)
    with pytest.raises(ValueError, match=r"prefix|reserved"):
        Topology(prefix)


def test_good_prefixes() -> None:
    for prefix in ("parjobs", "test-0a1b", "acme.prod_2", "A.b-c"):
        assert check_prefix(prefix) == prefix


def test_routing_keys_are_bounded() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        Binding("p.events", "k" * 256)


def test_a_queue_says_which_messages_it_takes() -> None:
    topology = Topology("p")
    assert topology.rpc_queue("access").accepts is ACCESS_REQUESTS
    assert topology.rpc_queue("compute").accepts is COMPUTE_REQUESTS
    assert topology.rpc_queue("runs").accepts is RUN_STARTS
    assert topology.rpc_queue("echo").accepts is None  # not a parjobs service: say it
    assert topology.rpc_queue("echo", accepts=JOB_EVENTS).accepts is JOB_EVENTS
    assert topology.work_queue("storage", events=["job.*.submitted"]).accepts is None
    assert topology.work_queue("storage", accepts=JOB_EVENTS).accepts is JOB_EVENTS
    # What holds whatever reaches it names no union.
    assert topology.dead_letter_queue.accepts is None
    assert topology.events_stream.accepts is None
    assert topology.reply_queue("abc").accepts is None
