"""The published contract: the AsyncAPI document generated from the topology and the schemas
passes the official parser (@asyncapi/parser, run with the machine's Node.js), the checked-in copy
is what the code generates, and every exchange, queue, union and body is in it as it runs."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import subprocess
import typing
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from pydantic import BaseModel
from typer.testing import CliRunner

from orchestrator import KeyPair, request_fingerprint, sign_authorisation, write_cheque
from orchestrator.broker.asyncapi import DEAD_LETTER, JsonObject, asyncapi_document, to_json
from orchestrator.broker.identities import Identities
from orchestrator.broker.topology import QueueSpec, Topology
from orchestrator.cli import app
from orchestrator.cli._contract import CHECKED_IN, REGENERATE, published
from schemas.events import EventPayload, JobEvent, JobRequest, Progress
from schemas.messages import (
    ACCESS_REQUESTS,
    JOB_EVENTS,
    Envelope,
    ErrorReply,
    EventPublished,
    MessageBody,
    MessageUnion,
    SubmitJob,
)

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = ROOT / "scripts" / "validate-asyncapi.mjs"
PARSER = ROOT / "node_modules" / "@asyncapi" / "parser"
TOPOLOGY = Topology()
QUEUES = [
    *TOPOLOGY.shared_queues,
    *itertools.chain(*Identities(TOPOLOGY).service_queues().values()),
]
UID = "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def node() -> str:
    """The machine's Node.js, with the parser `npm ci` installs from package-lock.json."""
    found = shutil.which("node")
    if found is None:
        pytest.fail(
            "node is not installed: install Node.js 20 or later with npm, then run "
            "bash scripts/bootstrap.sh (it runs npm ci)"
        )
    if not PARSER.is_dir():
        pytest.fail(
            f"the AsyncAPI parser is not installed ({PARSER} is missing): run "
            "bash scripts/bootstrap.sh (or npm ci)"
        )
    return found


@pytest.fixture(scope="module")
def document() -> JsonObject:
    return published()


def _parse(node: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(VALIDATOR), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def _diagnostics(output: str, severity: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"{severity} ")]


# --- the official parser --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["json", "yaml"])
def test_what_parjobs_asyncapi_prints_passes_the_official_parser(
    node: str, tmp_path: Path, document: JsonObject, form: str
) -> None:
    written = tmp_path / f"asyncapi.{form}"
    result = CliRunner().invoke(app, ["asyncapi", "--format", form, "--output", str(written)])
    assert result.exit_code == 0, result.output
    parsed = _parse(node, written)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    assert _diagnostics(parsed.stdout, "error") == []
    assert _diagnostics(parsed.stdout, "warning") == []
    assert "a valid AsyncAPI 3.0.0 document" in parsed.stdout
    assert yaml.safe_load(written.read_text(encoding="utf-8")) == document


def test_the_parser_fails_a_document_that_breaks_the_rules(
    node: str, tmp_path: Path, document: JsonObject
) -> None:
    broken = copy.deepcopy(document)
    del broken["channels"]["events"]["parameters"]["owner"]
    broken["channels"]["dlq"]["bindings"]["amqp"]["is"] = "exchange"
    written = tmp_path / "broken.json"
    written.write_text(to_json(broken), encoding="utf-8")
    parsed = _parse(node, written)
    assert parsed.returncode == 1
    errors = "\n".join(_diagnostics(parsed.stdout, "error"))
    assert "asyncapi3-channel-parameters at channels.events" in errors
    assert "channels.dlq.bindings.amqp" in errors


def test_the_checked_in_copy_is_what_the_code_generates(document: JsonObject) -> None:
    checked_in = (ROOT / CHECKED_IN).read_text(encoding="utf-8")
    assert checked_in == to_json(document), (
        f"{CHECKED_IN} is not what the code generates: regenerate it with `{REGENERATE}`"
    )


def test_the_document_prints_to_stdout_by_default(document: JsonObject) -> None:
    result = CliRunner().invoke(app, ["asyncapi"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == document


# --- what is in it --------------------------------------------------------------------------------


def _queue_channel(document: JsonObject, name: str) -> JsonObject:
    (channel,) = [
        channel
        for channel in document["channels"].values()
        if channel["bindings"]["amqp"].get("queue", {}).get("name") == name
    ]
    return typing.cast("JsonObject", channel)


def _bodies(document: JsonObject, message: str) -> set[str]:
    """The body types of a message's envelope, by the component schemas they refer to."""
    body = document["components"]["messages"][message]["payload"]["properties"]["body"]
    members = body.get("oneOf", [body])
    return {member["$ref"].rpartition("/")[2] for member in members}


@pytest.mark.parametrize("queue", QUEUES, ids=lambda queue: queue.name)
def test_every_queue_is_a_channel_with_its_bindings_and_union(
    document: JsonObject, queue: QueueSpec
) -> None:
    channel = _queue_channel(document, queue.name)
    assert channel["address"] == queue.name
    amqp = channel["bindings"]["amqp"]
    assert amqp["is"] == "queue"
    assert amqp["queue"] == {
        "name": queue.name,
        "durable": queue.durable,
        "exclusive": queue.exclusive,
        "autoDelete": False,
    }
    assert amqp["x-arguments"] == queue.arguments()
    assert amqp.get("x-bindings", []) == [
        {"exchange": binding.exchange, "routingKey": binding.routing_key}
        for binding in queue.bindings
    ]
    if queue.accepts is not None:
        (message,) = channel["messages"]
        assert _bodies(document, message) == {body.__name__ for body in queue.accepts.bodies}


def test_every_exchange_is_a_channel_of_its_type(document: JsonObject) -> None:
    exchanges = {
        channel["bindings"]["amqp"]["exchange"]["name"]: channel["bindings"]["amqp"]
        for channel in document["channels"].values()
        if channel["bindings"]["amqp"]["is"] == "routingKey"
    }
    assert {name: amqp["exchange"]["type"] for name, amqp in exchanges.items()} == {
        exchange.name: exchange.kind.value for exchange in TOPOLOGY.exchanges
    }


def test_the_events_channel_is_addressed_by_owner_job_and_event_type(document: JsonObject) -> None:
    channel = document["channels"]["events"]
    assert channel["address"] == "job.{owner}.{jobUid}.{eventType}"
    members = typing.get_args(typing.get_args(EventPayload)[0])
    tags = [member.model_fields["type"].default for member in members]
    assert channel["parameters"]["eventType"]["enum"] == tags


def test_a_users_queues_are_in_their_own_namespace(document: JsonObject) -> None:
    prefix = f"{TOPOLOGY.prefix}.client.{{username}}"
    reply = _queue_channel(document, f"{prefix}.reply.{{instance}}")
    events = _queue_channel(document, f"{prefix}.events.{{instance}}")
    assert _bodies(document, "accessResponses") | _bodies(document, "computeResponses") == {
        body for message in reply["messages"] for body in _bodies(document, message)
    }
    assert events["bindings"]["amqp"]["x-bindings"] == [
        {"exchange": TOPOLOGY.events.name, "routingKey": "job.{username}.#"}
    ]


def test_every_message_body_type_appears(document: JsonObject) -> None:
    every_body = typing.get_args(typing.get_args(MessageBody)[0])
    messages = set(document["components"]["messages"]) - {DEAD_LETTER}
    carried = {body for message in messages for body in _bodies(document, message)}
    assert {body.__name__ for body in every_body} <= carried
    assert {body.__name__ for body in every_body} <= set(document["components"]["schemas"])


def test_requests_answer_on_the_reply_queue_and_everyone_sends_as_their_broker_user(
    document: JsonObject,
) -> None:
    operations = document["operations"]
    submit = operations["user.send.accessRequests"]
    assert submit["reply"]["channel"] == {"$ref": "#/channels/client.reply"}
    assert submit["bindings"]["amqp"]["userId"] == f"user:{{name}}@{TOPOLOGY.prefix}"
    assert operations["storage.send.events"]["bindings"]["amqp"]["userId"] == (
        f"role:storage@{TOPOLOGY.prefix}"
    )
    scheme = document["components"]["securitySchemes"]["brokerUser"]
    assert scheme["type"] == "userPassword"
    assert {grant["username"] for grant in scheme["x-parjobs-grants"]} == {
        f"role:{role}@{TOPOLOGY.prefix}" for role in ("access", "storage", "compute", "operator")
    } | {f"user:{{name}}@{TOPOLOGY.prefix}"}


# --- the payloads describe the messages parjobs sends ---------------------------------------------


def _validator(document: JsonObject, union: MessageUnion[Any]) -> Draft7Validator:
    """A validator of the payload of the message `union`'s queue carries."""
    queue = next(queue for queue in QUEUES if queue.accepts is union)
    (message,) = _queue_channel(document, queue.name)["messages"]
    payload = f"#/components/messages/{message}/payload"
    return Draft7Validator({"$ref": payload, "components": document["components"]})


def _wire(body: BaseModel) -> Any:
    return json.loads(Envelope(sender="test", body=body).model_dump_json())


def _submission() -> SubmitJob:
    alice = KeyPair.generate("alice")
    request = JobRequest(calculation="checksum", parameters={"n": 1})
    return SubmitJob(
        request=request,
        authorisation=sign_authorisation(alice, request),
        cheque=write_cheque(
            alice,
            payer="alice",
            recipient="parjobs",
            max_spend=Decimal("2.5"),
            resource=request_fingerprint(request),
            lifetime=timedelta(hours=1),
        ),
    )


def test_a_signed_submission_with_money_matches_its_payload_schema(document: JsonObject) -> None:
    validator = _validator(document, ACCESS_REQUESTS)
    sent = _wire(_submission())
    assert list(validator.iter_errors(sent)) == []

    for field, wrong in (("max_spend", "2.5"), ("max_spend", "0.000000"), ("signature", "AAAA")):
        altered = copy.deepcopy(sent)
        altered["body"]["cheque"][field] = wrong
        assert not validator.is_valid(altered), (field, wrong)


def test_an_event_matches_its_payload_schema(document: JsonObject) -> None:
    event = JobEvent(
        job_uid=UID, seq=2, actor="compute", payload=Progress(message="half", fraction=0.5)
    )
    validator = _validator(document, JOB_EVENTS)
    assert list(validator.iter_errors(_wire(EventPublished(event=event)))) == []


def test_an_error_reply_matches_the_replies_schema(document: JsonObject) -> None:
    reply = _wire(ErrorReply(code="job.not_found", message="no such job", details={"uid": UID}))
    payload = "#/components/messages/accessResponses/payload"
    validator = Draft7Validator({"$ref": payload, "components": document["components"]})
    assert list(validator.iter_errors(reply)) == []


def test_the_document_follows_the_deployments_prefix_and_delivery_limit() -> None:
    topology = Topology("acme.prod", delivery_limit=3)
    document = asyncapi_document(topology, version="1")
    amqp = [channel["bindings"]["amqp"] for channel in document["channels"].values()]
    names = {binding.get("queue", binding.get("exchange"))["name"] for binding in amqp}
    assert len(names) == len(TOPOLOGY.exchanges) + len(QUEUES) + 3  # a user's two, compute's stops
    assert all(name.startswith("acme.prod.") for name in names)
    queues = [binding for binding in amqp if binding["is"] == "queue"]
    limits = {binding["x-arguments"].get("x-delivery-limit") for binding in queues}
    assert limits == {3, None}  # the work queues' limit; none on the DLQ, stream, client queues
    assert "user:{name}@acme:prod" in json.dumps(document["components"]["securitySchemes"])
