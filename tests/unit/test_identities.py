"""Broker identities as data, without a broker: usernames, routing keys, client queues, grants.

What the grants let each party do on a real broker is in tests/integration/
test_broker_permissions.py; here, that the names are well-formed and the regexes say what they
should (checked with Python's `re`, whose syntax for these regexes is the same as RabbitMQ's).
"""

from __future__ import annotations

import itertools
import re

import pytest

from orchestrator.broker.identities import (
    DEFAULT_EXCHANGE,
    NOTHING,
    Grant,
    Identities,
    Role,
    check_username,
)
from orchestrator.broker.topology import Topology

TOPOLOGY = Topology("acme.prod")
IDS = Identities(TOPOLOGY)
QUEUES = IDS.service_queues()
ALICE = IDS.user_username("alice")
MALLORY = IDS.user_username("mallory")


def allows(regex: str, name: str, username: str = "") -> bool:
    """Whether RabbitMQ's check of `name` against `regex` passes (`{username}` expanded)."""
    return re.search(regex.replace("{username}", username), name) is not None


# --- usernames ------------------------------------------------------------------------------------


def test_usernames_say_kind_name_and_deployment() -> None:
    assert IDS.domain == "acme:prod"
    assert IDS.role_username(Role.STORAGE) == "role:storage@acme:prod"
    assert IDS.role_username(Role.OPERATOR) == "role:operator@acme:prod"
    assert IDS.user_username("alice") == "user:alice@acme:prod"
    assert IDS.user_username("alice.smith") == "user:alice:smith@acme:prod"


def test_a_username_is_one_routing_key_word() -> None:
    for username in (IDS.user_username("a.b-c_d.9"), IDS.role_username(Role.COMPUTE)):
        assert "." not in username
        assert check_username(username) == username


def test_usernames_never_collide() -> None:
    # A user named like a role, the same user in another deployment, dots in either name.
    names = [
        IDS.user_username("storage"),
        IDS.role_username(Role.STORAGE),
        Identities(Topology("acme")).user_username("prod.alice"),
        Identities(Topology("acme.prod.alice")).user_username("x"),
        IDS.user_username("alice"),
        Identities(Topology("acme_prod")).user_username("alice"),
        Identities(Topology("acme-prod")).user_username("alice"),
    ]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", ["", "Alice", "-alice", "al ice", "al*ce", "al#", "a" * 65])
def test_names_outside_the_user_name_rules_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="user name"):
        IDS.user_username(name)


@pytest.mark.parametrize("username", ["", "a.b", "a*", "a#", "a b", "a+b", "a{b}", "x" * 256, "é"])
def test_check_username_refuses_what_a_routing_key_or_regex_would_misread(username: str) -> None:
    with pytest.raises(ValueError, match="one routing-key word"):
        check_username(username)


def test_a_username_is_parsed_back_only_in_its_own_deployment() -> None:
    assert IDS.user_of(IDS.user_username("alice.smith")) == "alice.smith"
    assert IDS.user_of(IDS.role_username(Role.ACCESS)) is None
    assert IDS.role_of(IDS.role_username(Role.ACCESS)) is Role.ACCESS
    assert IDS.role_of(ALICE) is None
    other = Identities(Topology("acme"))
    assert other.user_of(ALICE) is None
    assert other.role_of(IDS.role_username(Role.ACCESS)) is None
    for stranger in ("guest", "user:@acme:prod", "role:boss@acme:prod", "user:Al@acme:prod"):
        assert IDS.user_of(stranger) is None
        assert IDS.role_of(stranger) is None


def test_a_requester_is_a_user_of_this_deployment_on_a_message_not_dead_lettered() -> None:
    assert IDS.requester(ALICE, {}) == "alice"
    assert IDS.requester(None, {}) is None
    assert IDS.requester(IDS.role_username(Role.ACCESS), {}) is None
    assert IDS.requester(Identities(Topology("acme")).user_username("alice"), {}) is None
    # re-routed through a queue's dead-letter exchange: user_id names its first publisher only
    assert IDS.requester(ALICE, {"x-death": [{"reason": "expired"}]}) is None


def test_a_prefix_too_long_for_user_queue_names_is_refused_up_front() -> None:
    Identities(Topology("p" * 68))
    with pytest.raises(ValueError, match="too long for per-user names"):
        Identities(Topology("p" * 69))


# --- routing keys and client queues ---------------------------------------------------------------


def test_an_event_routing_key_names_the_owner_job_and_type() -> None:
    key = IDS.event_routing_key(ALICE, "ab" * 16, "completed")
    assert key == f"job.user:alice@acme:prod.{'ab' * 16}.completed"
    assert key.split(".") == ["job", ALICE, "ab" * 16, "completed"]


@pytest.mark.parametrize(
    ("owner", "job_uid", "event_type"),
    [
        ("a.b", "ab", "completed"),
        (ALICE, "a.b", "completed"),
        (ALICE, "ab", "*"),
        (ALICE, "#", "x"),
    ],
)
def test_an_event_routing_key_refuses_extra_words_and_wildcards(
    owner: str, job_uid: str, event_type: str
) -> None:
    with pytest.raises(ValueError, match="must"):
        IDS.event_routing_key(owner, job_uid, event_type)


def test_binding_keys_for_services_and_users() -> None:
    assert IDS.events_of_type("submitted") == "job.*.*.submitted"
    assert IDS.events_of_owner(ALICE) == "job.user:alice@acme:prod.#"


def test_client_queues_live_in_the_clients_namespace() -> None:
    reply = IDS.reply_queue(ALICE, "f" * 32)
    events = IDS.events_queue(ALICE, "f" * 32)
    assert reply.name == f"acme.prod.client.{ALICE}.reply.{'f' * 32}"
    assert events.name == f"acme.prod.client.{ALICE}.events.{'f' * 32}"
    assert reply.exclusive
    assert events.exclusive
    assert not reply.bindings
    assert [(b.exchange, b.routing_key) for b in events.bindings] == [
        ("acme.prod.events", f"job.{ALICE}.#")
    ]
    assert IDS.owns(ALICE, reply.name)
    assert IDS.owns(ALICE, events.name)
    assert not IDS.owns(MALLORY, reply.name)
    # a username that extends another's is not inside it
    assert not IDS.owns(IDS.user_username("al"), reply.name)
    assert not IDS.owns(ALICE, IDS.client_namespace(ALICE))
    with pytest.raises(ValueError, match="instance"):
        IDS.reply_queue(ALICE, "a.b")


# --- grants ---------------------------------------------------------------------------------------


def test_a_user_configures_only_their_own_namespace() -> None:
    configure = IDS.user_grant("alice").permissions.configure
    assert allows(configure, IDS.reply_queue(ALICE, "x").name)
    assert allows(configure, IDS.events_queue(ALICE, "x").name)
    for other in (
        IDS.reply_queue(MALLORY, "x").name,
        IDS.client_namespace(ALICE),
        TOPOLOGY.rpc_queue("runs").name,
        TOPOLOGY.work_queue("storage").name,
        TOPOLOGY.events.name,
        TOPOLOGY.reply_queue("x").name,
        f"acme.prod.client.{ALICE}x.reply.x",
        f"other.client.{ALICE}.reply.x",
    ):
        assert not allows(configure, other), other


def test_a_user_writes_only_commands_and_reads_only_events_besides_their_own() -> None:
    permissions = IDS.user_grant("alice").permissions
    mine = IDS.events_queue(ALICE, "x").name
    assert allows(permissions.write, TOPOLOGY.commands.name)
    assert allows(permissions.write, mine)
    assert allows(permissions.read, TOPOLOGY.events.name)
    assert allows(permissions.read, mine)
    for exchange in (TOPOLOGY.events.name, DEFAULT_EXCHANGE, TOPOLOGY.dead_letter_exchange.name):
        assert not allows(permissions.write, exchange), exchange
    for queue in (TOPOLOGY.rpc_queue("runs").name, TOPOLOGY.dead_letter_queue.name):
        assert not allows(permissions.read, queue), queue
    assert not allows(permissions.read, TOPOLOGY.commands.name)


def test_a_user_binds_only_to_their_own_jobs_events() -> None:
    (events,) = IDS.user_grant("alice").topic_permissions
    assert events.exchange == TOPOLOGY.events.name
    assert events.write == NOTHING
    assert allows(events.read, f"job.{ALICE}.#", ALICE)
    assert allows(events.read, f"job.{ALICE}.{'a' * 32}.completed", ALICE)
    for key in ("#", "job.#", "job.*.#", f"job.{MALLORY}.#", f"job.{ALICE}x.#", f"x.job.{ALICE}.#"):
        assert not allows(events.read, key, ALICE), key


def _service(role: Role) -> Grant:
    return IDS.service_grant(role, QUEUES[role])


@pytest.mark.parametrize("role", [Role.ACCESS, Role.STORAGE, Role.COMPUTE])
def test_a_service_configures_and_consumes_exactly_its_own_queues(role: Role) -> None:
    permissions = _service(role).permissions
    everyone = {spec.name for spec in itertools.chain(*QUEUES.values(), TOPOLOGY.shared_queues)}
    own = {spec.name for spec in QUEUES[role]}
    for name in everyone:
        assert allows(permissions.configure, name) == (name in own), name
        assert allows(permissions.read, name) == (name in own), name
    for exchange in TOPOLOGY.exchanges:
        assert not allows(permissions.configure, exchange.name)


@pytest.mark.parametrize("role", [Role.ACCESS, Role.STORAGE, Role.COMPUTE])
def test_a_service_publishes_events_and_dead_letters(role: Role) -> None:
    write = _service(role).permissions.write
    assert allows(write, TOPOLOGY.events.name)
    assert allows(write, TOPOLOGY.dead_letter_exchange.name)
    assert not allows(write, TOPOLOGY.commands.name)
    (events,) = _service(role).topic_permissions
    assert allows(events.write, IDS.event_routing_key(ALICE, "a" * 32, "submitted"))
    assert not allows(events.write, "job.abc.submitted")  # the old key, without its owner


def test_only_services_that_take_requests_reply_through_the_default_exchange() -> None:
    assert allows(_service(Role.ACCESS).permissions.write, DEFAULT_EXCHANGE)
    assert allows(_service(Role.COMPUTE).permissions.write, DEFAULT_EXCHANGE)
    assert not allows(_service(Role.STORAGE).permissions.write, DEFAULT_EXCHANGE)


def test_a_service_binds_exactly_the_events_its_queues_are_bound_to() -> None:
    (events,) = _service(Role.STORAGE).topic_permissions
    (binding,) = [b for spec in QUEUES[Role.STORAGE] for b in spec.bindings]
    assert allows(events.read, binding.routing_key)
    assert not allows(events.read, "#")
    assert not allows(events.read, "job.*.completed")
    assert allows(_service(Role.ACCESS).permissions.read, TOPOLOGY.commands.name)
    assert not allows(_service(Role.STORAGE).permissions.read, TOPOLOGY.commands.name)


def test_the_operator_is_not_a_service() -> None:
    with pytest.raises(ValueError, match="operator_grant"):
        IDS.service_grant(Role.OPERATOR, ())


def test_the_operator_manages_the_whole_topology_and_nothing_of_other_deployments() -> None:
    grant = IDS.operator_grant(itertools.chain(*QUEUES.values()))
    assert grant.username == IDS.role_username(Role.OPERATOR)
    assert grant.topic_permissions == ()
    names = [
        *(exchange.name for exchange in TOPOLOGY.exchanges),
        *(spec.name for spec in itertools.chain(*QUEUES.values(), TOPOLOGY.shared_queues)),
        IDS.events_queue(ALICE, "x").name,
    ]
    for regex in (grant.permissions.configure, grant.permissions.write, grant.permissions.read):
        for name in names:
            assert allows(regex, name), name
        for foreign in ("acme.prodx.events", "acme.events", "other.acme.prod.dlq"):
            assert not allows(regex, foreign), foreign
    assert allows(grant.permissions.write, DEFAULT_EXCHANGE)
    assert not allows(grant.permissions.read, DEFAULT_EXCHANGE)


def test_every_resource_regex_is_anchored_at_both_ends() -> None:
    # RabbitMQ reads "" as "nothing", Python's re as "everything": never emit it.
    grants = [
        IDS.user_grant("alice"),
        *(_service(role) for role in (Role.ACCESS, Role.STORAGE, Role.COMPUTE)),
        IDS.operator_grant(()),
    ]
    for grant in grants:
        permissions = grant.permissions
        for regex in (permissions.configure, permissions.write, permissions.read):
            assert regex.startswith("^")
            assert regex.endswith("$")


def test_services_bind_events_of_every_owner_by_type() -> None:
    (storage,) = QUEUES[Role.STORAGE]
    (binding,) = storage.bindings
    key = IDS.event_routing_key(ALICE, "a" * 32, "submitted")
    assert binding.routing_key == IDS.events_of_type("submitted")
    assert re.fullmatch(binding.routing_key.replace("*", "[^.]+").replace(".", r"\."), key)


def test_each_compute_daemon_may_keep_a_stops_queue_of_its_own() -> None:
    grant = IDS.role_grants()[Role.COMPUTE]
    stops = IDS.stops_queue("d1")
    assert stops.exclusive
    assert stops.name == "acme.prod.stops.d1"
    assert [b.routing_key for b in stops.bindings] == [IDS.events_of_type("cancelled")]
    for regex in (grant.permissions.configure, grant.permissions.read, grant.permissions.write):
        assert allows(regex, stops.name)
        assert allows(regex, IDS.stops_queue("another-daemon").name)
        assert not allows(regex, "acme.prod.stopsx.d1")
    (events,) = grant.topic_permissions
    assert allows(events.read, IDS.events_of_type("cancelled"))
    for role in (Role.ACCESS, Role.STORAGE):
        assert not allows(IDS.role_grants()[role].permissions.configure, stops.name)


def test_the_role_grants_are_the_operators_and_each_services() -> None:
    grants = IDS.role_grants()
    assert set(grants) == set(Role)
    assert grants[Role.OPERATOR] == IDS.operator_grant(itertools.chain(*QUEUES.values()))
    assert grants[Role.STORAGE] == IDS.service_grant(Role.STORAGE, QUEUES[Role.STORAGE])
    assert {grant.username for grant in grants.values()} == {
        IDS.role_username(role) for role in Role
    }
