"""The published contract: parjobs on the broker as an AsyncAPI 3.0 document, generated.

Generated from the data the runtime runs on, never written by hand: the topology (exchanges,
queues, their arguments and bindings, the union each queue takes), the broker identities (who
publishes what, routing keys, client queues, permissions) and the pydantic models (each union's
JSON Schema). Kept apart from the runtime as FastStream keeps `specified.py` apart from
`usecase.py`: nothing that runs imports this module. `parjobs asyncapi` prints the document and
`docs/asyncapi.json` is a copy the tests hold equal to it.

Channels are the three exchanges (their routing keys as addresses) and every queue (its name as
address); each has its own messages, one per union. Operations say who does what: users send
requests to the commands exchange and receive their replies and their own jobs' events; each
service receives its queues and sends events, replies and dead letters; the operator reads the
dead letters and the events stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, get_args

from aio_pika import DeliveryMode
from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from orchestrator.broker._dlq import (
    CODE_HEADER,
    EXCHANGE_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    REDRIVEN_HEADER,
    ROUTING_KEY_HEADER,
    TIME_HEADER,
)
from orchestrator.broker.base import DeadLetterReason
from orchestrator.broker.identities import (
    DEATH_HEADER,
    EVENT_ROUTING_KEY_PATTERN,
    MAX_INSTANCE_LENGTH,
    Grant,
    Identities,
    Kind,
    Role,
)
from orchestrator.broker.topology import (
    RPC_REQUESTS,
    ExchangeSpec,
    QueueSpec,
    Topology,
)
from orchestrator.core.codec import CONTENT_TYPE
from orchestrator.core.message_signing import message_bytes
from schemas.events import EventPayload, Expired
from schemas.ledger import PLACES
from schemas.messages import EventPublished, MessageUnion
from schemas.signing import EVENT_PURPOSE, MESSAGE_PURPOSE

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING_VERSION = "0.3.0"
DEAD_LETTER = "deadLetter"
"""The message of the dead-letter exchange and queue: whatever could not be processed."""

JsonObject = dict[str, Any]
_SCHEMAS = "#/components/schemas/"


def asyncapi_document(topology: Topology, *, version: str) -> JsonObject:
    """The AsyncAPI 3.0 document of a deployment of `topology` (each service consuming the queues
    `Identities.service_queues` gives it), titled with `version`."""
    return _Contract(topology).document(version)


def to_json(document: JsonObject) -> str:
    """The document as the checked-in copy spells it: indented, keys in generation order."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# --- JSON Schema of the wire forms ----------------------------------------------------------------


class _WireSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, in the AsyncAPI Schema dialect and with the wire's own forms.

    AsyncAPI's Schema Object is JSON Schema draft 07 plus a `discriminator` that is a property
    name, so pydantic's OpenAPI discriminator object travels as the extension `x-discriminator`
    (every member's `type` tag says the same). Bytes travel as standard base64 text
    (`schemas._base.B64Bytes`) and decimals as Money's fixed-point string, not as the binary and
    number-or-string pydantic would say.
    """

    def bytes_schema(self, schema: core_schema.BytesSchema) -> JsonSchemaValue:
        return {"type": "string", "contentEncoding": "base64"}

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> JsonSchemaValue:
        return {"type": "string", "pattern": _money_pattern(signed=True)}

    def tagged_union_schema(self, schema: core_schema.TaggedUnionSchema) -> JsonSchemaValue:
        json_schema = super().tagged_union_schema(schema)
        if "discriminator" in json_schema:
            json_schema["x-discriminator"] = json_schema.pop("discriminator")
        return json_schema


def _money_pattern(*, signed: bool) -> str:
    """Money's JSON form (`schemas.ledger.Money`): a decimal string with exactly PLACES places,
    `-` allowed if `signed`; else not zero either (an amount that must be greater than 0)."""
    if signed:
        return rf"^-?[0-9]+\.[0-9]{{{PLACES}}}$"
    return rf"^(?=.*[1-9])[0-9]+\.[0-9]{{{PLACES}}}$"


def _base64_length(raw: int) -> int:
    return 4 * math.ceil(raw / 3)


def _wire_constraints(node: Any) -> Any:
    """`node` with the constraints pydantic put on bytes and decimals restated for their text:
    a length in bytes as the length of its base64, `gt: 0` on Money (pydantic's own keyword, no
    JSON Schema's) as the pattern of a positive amount."""
    if isinstance(node, list):
        return [_wire_constraints(item) for item in node]
    if not isinstance(node, dict):
        return node
    restated = {key: _wire_constraints(value) for key, value in node.items()}
    if restated.get("contentEncoding") == "base64":
        for keyword in ("minLength", "maxLength"):
            if keyword in restated:
                restated[keyword] = _base64_length(restated[keyword])
    if restated.get("pattern") == _money_pattern(signed=True) and "gt" in restated:
        if restated.pop("gt") != 0:
            raise ValueError("only Money greater than 0 has a pattern here")
        restated["pattern"] = _money_pattern(signed=False)
    return restated


def _envelope_schemas(
    unions: Iterable[MessageUnion[Any]],
) -> tuple[dict[str, JsonObject], JsonObject]:
    """Each union's envelope schema (the message payloads, by union name), and the schemas they
    share (components/schemas), all in one set of definitions so a model is defined once.

    Schemas of what a receiver validates (pydantic's validation mode: a field with a default may
    be left out), in the forms parjobs writes: Money as its string, bytes as base64, which is
    also what signatures cover.
    """
    unions = list(unions)
    keyed, definitions = TypeAdapter.json_schemas(
        [(union.name, "validation", union.envelope) for union in unions],
        ref_template=_SCHEMAS + "{model}",
        schema_generator=_WireSchema,
    )
    shared: JsonObject = _wire_constraints(definitions.get("$defs", {}))
    payloads: dict[str, JsonObject] = {}
    for union in unions:
        reference = keyed[(union.name, "validation")]["$ref"]
        # The envelope is the message itself: its schema is the payload, not a shared component.
        payload = shared.pop(reference.removeprefix(_SCHEMAS))
        payload["title"] = f"Envelope of {union.name}"
        payloads[union.name] = payload
    return payloads, shared


# --- names with parameters ------------------------------------------------------------------------


def _placeholder(parameter: str) -> str:
    """A word every name check takes, standing for an AsyncAPI parameter while a name is made."""
    return f"0{parameter.lower()}0"


def _parameterised(text: str, *parameters: str) -> str:
    """`text`, made with `_placeholder`s, with `{parameter}` in their place.

    The names come from the very functions the runtime names things with (`Identities`,
    `Topology`), so the document follows when they change.
    """
    for parameter in parameters:
        text = text.replace(_placeholder(parameter), "{" + parameter + "}")
    return text


# --- the document ---------------------------------------------------------------------------------

_CLIENT_REPLIES = "client.reply"
_CLIENT_EVENTS = "client.events"
_CLIENT_PARAMETERS = ("username", "instance")
_COMPUTE_STOPS = "stops"
"""Each compute daemon's own queue of `cancelled` events (`{instance}`: the daemon)."""
_EVENT_PARAMETERS = ("owner", "jobUid", "eventType")
_SERVICE_PARAMETER = "service"


def _message_id(union: MessageUnion[Any]) -> str:
    """`access requests` -> `accessRequests`: a union's name as an AsyncAPI component key."""
    first, *rest = union.name.split()
    return first + "".join(word.capitalize() for word in rest)


def _ref(*path: str) -> JsonObject:
    return {"$ref": "#/" + "/".join(path)}


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _event_types() -> list[str]:
    """Every event payload's `type` tag: the last word of an event's routing key."""
    members = get_args(get_args(EventPayload)[0])
    return [member.model_fields["type"].default for member in members]


def _signed_fields() -> list[str]:
    """The fields a message's signature covers, read from what `message_bytes` signs."""
    signed = message_bytes(
        message_id="0" * 32,
        sent_at=datetime.now(UTC),
        nonce="0" * 32,
        signer=Role.ACCESS.value,
        body=Expired(),
    )
    return list(json.loads(signed.partition(b"\x00")[2]))


def _queue_description(queue: QueueSpec) -> str:
    arguments = queue.arguments()
    kind = arguments["x-queue-type"]
    text = "A stream" if kind == "stream" else f"A {kind} queue"
    text += ", exclusive to one connection and deleted with it" if queue.exclusive else ", durable"
    if "x-delivery-limit" in arguments:
        text += (
            f"; a message that fails {arguments['x-delivery-limit']} deliveries is "
            f"dead-lettered to `{arguments['x-dead-letter-exchange']}`"
        )
    elif "x-dead-letter-routing-key" in arguments:
        text += (
            "; a message whose TTL runs out at the head of the queue is dead-lettered, through "
            f"the default exchange, to `{arguments['x-dead-letter-routing-key']}`"
        )
    return text + "."


class _Contract:
    """One deployment's channels, operations and messages, as the AsyncAPI document says them."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.identities = Identities(topology)
        self.services = self.identities.service_queues()
        service_queues = [queue for queues in self.services.values() for queue in queues]
        self.queues = {
            self._short(queue.name): queue for queue in (*topology.shared_queues, *service_queues)
        }
        client = [_placeholder(parameter) for parameter in _CLIENT_PARAMETERS]
        self.queues[_CLIENT_REPLIES] = self.identities.reply_queue(*client)
        self.queues[_CLIENT_EVENTS] = self.identities.events_queue(*client)
        self.queues[_COMPUTE_STOPS] = self.identities.stops_queue(_placeholder("instance"))
        accepted = [queue.accepts for queue in self.queues.values() if queue.accepts is not None]
        self.requests = {
            _message_id(union): union for union in accepted if union.replies is not None
        }
        self.replies = {
            _message_id(union.replies): union.replies
            for union in self.requests.values()
            if union.replies is not None
        }
        self.unions = {**{_message_id(union): union for union in accepted}, **self.replies}

    def _short(self, name: str) -> str:
        """A name without the prefix: a channel's id."""
        return name.removeprefix(self.topology.prefix + ".")

    # --- what travels where ---------------------------------------------------------------------

    def _exchange_messages(self, exchange: ExchangeSpec) -> list[str]:
        """What reaches `exchange`: the unions of the queues bound to it; dead letters, the
        dead-letter exchange."""
        if exchange == self.topology.dead_letter_exchange:
            return [DEAD_LETTER]
        return _unique(
            _message_id(queue.accepts)
            for queue in self.queues.values()
            if queue.accepts is not None
            and any(binding.exchange == exchange.name for binding in queue.bindings)
        )

    def _queue_messages(self, channel: str) -> list[str]:
        """What a queue holds: its union; else what its exchanges route to it; the replies to
        every request, a client's reply queue."""
        queue = self.queues[channel]
        if queue.accepts is not None:
            return [_message_id(queue.accepts)]
        if channel == _CLIENT_REPLIES:
            return list(self.replies)
        exchanges = {exchange.name: exchange for exchange in self.topology.exchanges}
        return _unique(
            message
            for binding in queue.bindings
            for message in self._exchange_messages(exchanges[binding.exchange])
        )

    def _request_key(self, message: str) -> str:
        """The routing key a request of `message`'s union is sent with."""
        return next(
            binding.routing_key
            for queue in self.queues.values()
            if queue.accepts is self.requests[message]
            for binding in queue.bindings
            if binding.exchange == self.topology.commands.name
        )

    def _consumer(self, channel: str) -> str:
        if channel == _CLIENT_REPLIES:
            return "A user's connection gets the replies to its requests here."
        if channel == _CLIENT_EVENTS:
            return "A user's connection follows the events of the user's jobs here."
        if any(self._short(queue.name) == channel for queue in self.topology.delay_queues):
            return "Nobody consumes it: each job's deadline waits out its TTL here."
        for role, queues in self.services.items():
            if any(self._short(queue.name) == channel for queue in queues):
                return f"The {role} service consumes it."
        return "The operator reads it."

    # --- names of the trust model ---------------------------------------------------------------

    def _user_username(self) -> str:
        return _parameterised(self.identities.user_username(_placeholder("name")), "name")

    def _client_namespace(self) -> str:
        namespace = self.identities.client_namespace(_placeholder("username"))
        return _parameterised(namespace, "username")

    def _own_events(self) -> str:
        """The topic permission that confines a user's bindings to their own jobs' events."""
        (events,) = self.identities.user_grant(_placeholder("name")).topic_permissions
        return events.read

    # --- channels -------------------------------------------------------------------------------

    def channels(self) -> JsonObject:
        channels = {
            self._short(exchange.name): self._exchange_channel(exchange)
            for exchange in self.topology.exchanges
        }
        for channel in self.queues:
            if channel in channels:
                raise ValueError(f"a queue and an exchange are both named {channel!r}")
            channels[channel] = self._queue_channel(channel)
        return channels

    def _messages(self, messages: Iterable[str]) -> JsonObject:
        return {message: _ref("components", "messages", message) for message in messages}

    def _exchange_channel(self, exchange: ExchangeSpec) -> JsonObject:
        topology = self.topology
        address, parameters, carries = {
            topology.events.name: self._events_routing,
            topology.commands.name: self._commands_routing,
            topology.dead_letter_exchange.name: self._dead_letter_routing,
        }[exchange.name]()
        channel: JsonObject = {
            "address": address,
            "title": exchange.name,
            "description": f"The durable {exchange.kind} exchange `{exchange.name}`: {carries}",
            "messages": self._messages(self._exchange_messages(exchange)),
        }
        if parameters:
            channel["parameters"] = parameters
        channel["bindings"] = {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange.name,
                    "type": exchange.kind.value,
                    "durable": True,
                    "autoDelete": False,
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        }
        return channel

    def _events_routing(self) -> tuple[str, JsonObject, str]:
        key = self.identities.event_routing_key(*map(_placeholder, _EVENT_PARAMETERS))
        return (
            _parameterised(key, *_EVENT_PARAMETERS),
            {
                "owner": {
                    "description": f"The broker username of the job's owner "
                    f"(`{self._user_username()}`): a user may bind only to their own jobs' "
                    f"events (`{self._own_events()}`).",
                },
                "jobUid": {"description": "The job's uid: 32 lower-case hex digits."},
                "eventType": {"description": "The event's payload type.", "enum": _event_types()},
            },
            "every job event, published by the service that appended it to the job's log, and "
            "compute's progress reports of a run (`progress_report`, event type `progress`, "
            "never logged) (routing keys match "
            f"`{EVENT_ROUTING_KEY_PATTERN}`). Services bind their queues to the event types they "
            "act on, the events stream keeps them all, a user's queue takes their own jobs' "
            "events and progress reports.",
        )

    def _commands_routing(self) -> tuple[str, JsonObject, str]:
        key = self.topology.rpc_routing_key(_placeholder(_SERVICE_PARAMETER))
        keys = {self._request_key(message) for message in self.requests}
        services = [name for name in RPC_REQUESTS if self.topology.rpc_routing_key(name) in keys]
        return (
            _parameterised(key, _SERVICE_PARAMETER),
            {
                _SERVICE_PARAMETER: {
                    "description": "The service a request is for: its RPC queue is bound with "
                    "this key.",
                    "enum": services,
                }
            },
            "requests for one service, each answered on the requester's reply queue.",
        )

    def _dead_letter_routing(self) -> tuple[str, JsonObject, str]:
        return (
            self.topology.dead_letter_routing_key,
            {},
            "what can never be processed: dead-lettered by the broker when a quorum queue's "
            "delivery limit runs out, or by a consumer (with the reason) when a message is not "
            "JSON, not valid, of a type its queue does not take, or poison.",
        )

    def _queue_channel(self, channel: str) -> JsonObject:
        queue = self.queues[channel]
        address = _parameterised(queue.name, *_CLIENT_PARAMETERS)
        described: JsonObject = {
            "address": address,
            "title": address,
            "description": f"{_queue_description(queue)} {self._consumer(channel)}",
            "messages": self._messages(self._queue_messages(channel)),
        }
        parameters = {
            "username": {
                "description": f"The user's broker username (`{self._user_username()}`): "
                f"a user may declare queues only under `{self._client_namespace()}.`.",
            },
            "instance": {
                "description": f"One connection's id (up to {MAX_INSTANCE_LENGTH} letters, "
                "digits, `_` or `-`).",
            },
        }
        present = {name: text for name, text in parameters.items() if f"{{{name}}}" in address}
        if present:
            described["parameters"] = present
        amqp: JsonObject = {
            "is": "queue",
            "queue": {
                "name": address,
                "durable": queue.durable,
                "exclusive": queue.exclusive,
                "autoDelete": False,
            },
            "bindingVersion": AMQP_BINDING_VERSION,
            "x-arguments": queue.arguments(),
        }
        if queue.bindings:
            amqp["x-bindings"] = [
                {
                    "exchange": binding.exchange,
                    "routingKey": _parameterised(binding.routing_key, *_CLIENT_PARAMETERS),
                }
                for binding in queue.bindings
            ]
        described["bindings"] = {"amqp": amqp}
        return described

    # --- operations -----------------------------------------------------------------------------

    def operations(self) -> JsonObject:
        user = Kind.USER
        operations: JsonObject = {}
        for message, union in self.requests.items():
            operations[f"{user}.send.{message}"] = self._operation(
                user,
                "send",
                self._short(self.topology.commands.name),
                [message],
                f"A user sends {union.name} with routing key `{self._request_key(message)}`; "
                "the answer comes to their reply queue.",
                reply=union,
            )
        operations[f"{user}.receive.{_CLIENT_EVENTS}"] = self._operation(
            user,
            "receive",
            _CLIENT_EVENTS,
            self._queue_messages(_CLIENT_EVENTS),
            "A user follows the events of their own jobs and their runs' progress.",
        )
        delays = {queue.name for queue in self.topology.delay_queues}
        for role, queues in self.services.items():
            for queue in queues:
                channel = self._short(queue.name)
                if queue.name in delays:
                    operations[f"{role}.send.{channel}"] = self._operation(
                        role,
                        "send",
                        channel,
                        self._queue_messages(channel),
                        f"The {role} service sends each job's deadline here through the default "
                        "exchange, with the TTL (`expiration`) that makes it due as the job "
                        "expires.",
                    )
                    continue
                answers = queue.accepts if queue.accepts and queue.accepts.replies else None
                takes = "the events it acts on."
                if answers:
                    takes = "requests and answers each."
                elif queue.name == self.topology.deadlines.name:
                    takes = "each job's deadline it sent itself, once due."
                operations[f"{role}.receive.{channel}"] = self._operation(
                    role,
                    "receive",
                    channel,
                    self._queue_messages(channel),
                    f"The {role} service takes {takes}",
                    reply=answers,
                )
            operations[f"{role}.send.events"] = self._operation(
                role,
                "send",
                self._short(self.topology.events.name),
                self._exchange_messages(self.topology.events),
                f"The {role} service publishes each event it appends to a job's log.",
            )
            operations[f"{role}.send.dlx"] = self._operation(
                role,
                "send",
                self._short(self.topology.dead_letter_exchange.name),
                [DEAD_LETTER],
                f"The {role} service dead-letters what it can never process, with the reason.",
            )
        operator = Role.OPERATOR
        for queue in self.topology.shared_queues:
            channel = self._short(queue.name)
            operations[f"{operator}.receive.{channel}"] = self._operation(
                operator,
                "receive",
                channel,
                self._queue_messages(channel),
                f"The operator reads `{queue.name}`.",
            )
        return operations

    def _operation(
        self,
        party: Role | Kind,
        action: str,
        channel: str,
        messages: Iterable[str],
        summary: str,
        *,
        reply: MessageUnion[Any] | None = None,
    ) -> JsonObject:
        operation: JsonObject = {
            "action": action,
            "channel": _ref("channels", channel),
            "summary": summary,
            "messages": [_ref("channels", channel, "messages", message) for message in messages],
            "tags": [{"name": party.value}],
        }
        if reply is not None and reply.replies is not None:
            answer = _message_id(reply.replies)
            operation["reply"] = {
                "channel": _ref("channels", _CLIENT_REPLIES),
                "messages": [_ref("channels", _CLIENT_REPLIES, "messages", answer)],
            }
        amqp: JsonObject
        if action == "send":
            amqp = {
                "userId": self._user_username()
                if party is Kind.USER
                else self.identities.role_username(Role(party)),
                "deliveryMode": DeliveryMode.PERSISTENT.value,
                "mandatory": True,
                "timestamp": True,
            }
        else:
            amqp = {"ack": True}
        operation["bindings"] = {"amqp": {**amqp, "bindingVersion": AMQP_BINDING_VERSION}}
        return operation

    # --- messages -------------------------------------------------------------------------------

    def messages(self) -> JsonObject:
        payloads, schemas = _envelope_schemas(self.unions.values())
        messages = {
            message: self._message(message, payloads[union.name])
            for message, union in self.unions.items()
        }
        messages[DEAD_LETTER] = _dead_letter()
        return {"schemas": schemas, "messages": messages}

    def _message(self, message: str, payload: JsonObject) -> JsonObject:
        union = self.unions[message]
        if message in self.requests:
            kind = "Requests a user sends"
        elif message in self.replies:
            kind = "Replies a service sends to the requester's reply queue"
        else:
            kind = "Messages the services publish"
        described: JsonObject = {
            "name": message,
            "title": union.name.capitalize(),
            "summary": " | ".join(body.__name__ for body in union.bodies),
            "description": f"{kind}: an envelope whose body is one of {len(union.bodies)} "
            "types, told apart by its `type`.",
            "contentType": CONTENT_TYPE,
            "payload": payload,
        }
        if message in self.requests or message in self.replies:
            described["correlationId"] = {
                "description": "The AMQP correlation_id property.",
                "location": "$message.header#/correlation_id",
            }
        described["bindings"] = {
            "amqp": {
                "bindingVersion": AMQP_BINDING_VERSION,
                "x-properties": self._properties(message),
            }
        }
        described["x-parjobs-signature"] = self._signature(message, union)
        return described

    def _properties(self, message: str) -> JsonObject:
        """The AMQP properties a message of `message`'s union is published with, as JSON
        Schema (AsyncAPI's AMQP message binding has no field for them)."""
        text = {"type": "string"}
        properties: JsonObject = {
            "content_type": {"const": CONTENT_TYPE},
            "delivery_mode": {"const": DeliveryMode.PERSISTENT.value},
            "message_id": {
                **text,
                "description": "Unique per message (an event's is its event_id): receivers "
                "de-duplicate by it.",
            },
            "timestamp": {"type": "integer", "description": "When it was published (seconds)."},
            "app_id": {**text, "description": "The publishing connection's name."},
            "user_id": {
                **text,
                "description": "The publisher's broker username, which RabbitMQ checks is the "
                "connection's own: a service learns who sent a request from it.",
            },
        }
        required = ["content_type", "delivery_mode", "message_id"]
        if message in self.requests:
            reply_queue = _parameterised(self.queues[_CLIENT_REPLIES].name, *_CLIENT_PARAMETERS)
            properties["reply_to"] = {
                **text,
                "description": f"The requester's own reply queue (`{reply_queue}`).",
            }
            properties["correlation_id"] = {
                **text,
                "description": "Chosen by the requester; the reply carries it back.",
            }
            required += ["user_id", "reply_to", "correlation_id"]
        elif message in self.replies:
            properties["correlation_id"] = {**text, "description": "The request's."}
            required.append("correlation_id")
        return {"type": "object", "properties": properties, "required": required}

    def _signature(self, message: str, union: MessageUnion[Any]) -> JsonObject:
        """How a message of `union` is signed: AsyncAPI has no security scheme for it."""
        if message in self.requests:
            signer = "The requesting user; signer is their registered key's fingerprint."
        else:
            signer = "The service role that sends it; signer is the role."
        signature: JsonObject = {
            "field": "signature",
            "signer": signer,
            "algorithm": "Ed25519",
            "signs": f"{MESSAGE_PURPOSE.decode()}, a NUL byte, then the RFC 8785 JSON of one "
            "object of the fields in `covers`: message_id, sent_at (in UTC, "
            "`YYYY-MM-DDTHH:MM:SS.ffffffZ`, the fraction exactly six digits and left out when "
            "it is zero) and body from the envelope, signer and nonce from the signature",
            "covers": _signed_fields(),
        }
        if EventPublished in union.bodies:
            # An event's envelope is not signed (signature null): the event inside is sealed.
            signature["events"] = (
                "The envelope of an `event` body is not signed (signature is null): the job "
                "event inside is sealed instead, by the role that appended it: prev_hash "
                "chains it to the job's previous event, and signature signs "
                f"{EVENT_PURPOSE.decode()}, a NUL byte, then the RFC 8785 JSON of the event "
                "without its signature."
            )
        return signature

    # --- security -------------------------------------------------------------------------------

    def security_scheme(self) -> JsonObject:
        grants: list[Grant] = [
            *self.identities.role_grants().values(),
            self.identities.user_grant(_placeholder("name")),
        ]
        roles = ", ".join(f"`{self.identities.role_username(role)}`" for role in self.services)
        return {
            "type": "userPassword",
            "description": "Every party connects as a broker user of its own, and RabbitMQ's "
            "permissions and topic permissions confine it (x-parjobs-grants: `{name}` stands "
            "for a registered user's name; RabbitMQ expands `{username}`). A service "
            f"({roles}) declares and reads only its own queues and publishes events and dead "
            f"letters; a user (`{self._user_username()}`) publishes only to the commands "
            f"exchange, declares queues only under `{self._client_namespace()}.` and binds only "
            "to their own jobs' events; the operator "
            f"(`{self.identities.role_username(Role.OPERATOR)}`) declares the topology and reads "
            "the dead letters and the events stream.",
            "x-parjobs-grants": [
                json.loads(_parameterised(json.dumps(dataclasses.asdict(grant)), "name"))
                for grant in grants
            ],
        }

    # --- the whole ------------------------------------------------------------------------------

    def document(self, version: str) -> JsonObject:
        components = self.messages()
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": {
                "title": "parjobs",
                "version": version,
                "description": self._description(),
                "license": {"name": "Apache-2.0"},
            },
            "defaultContentType": CONTENT_TYPE,
            "servers": {
                "rabbitmq": {
                    "host": "{host}:{port}",
                    "protocol": "amqp",
                    "protocolVersion": "0.9.1",
                    "title": "RabbitMQ",
                    "description": "The broker `PARJOBS_AMQP_URL` names (amqps:// for TLS).",
                    "variables": {"host": {"default": "127.0.0.1"}, "port": {"default": "5672"}},
                    "security": [_ref("components", "securitySchemes", "brokerUser")],
                }
            },
            "channels": self.channels(),
            "operations": self.operations(),
            "components": {
                **components,
                "securitySchemes": {"brokerUser": self.security_scheme()},
            },
        }

    def _description(self) -> str:
        return "\n\n".join(
            (
                "parjobs runs jobs over RabbitMQ: a user submits a signed, paid-for request; the "
                "access, storage and compute services act on each other's job events; the user "
                "follows their job's events and fetches its output through a read PAR.",
                "Every name starts with the deployment's prefix (`PARJOBS_PREFIX`, here "
                f"`{self.topology.prefix}`), and quorum queues have the deployment's delivery "
                f"limit (`PARJOBS_DELIVERY_LIMIT`, here {self.topology.delivery_limit}).",
                "Every message is a JSON envelope whose body is one of its channel's union, "
                "told apart by its `type`; a queue dead-letters, with the reason, any message it "
                "does not take.",
                "Every message is signed with Ed25519 over RFC 8785 canonical JSON, which any "
                "language can reproduce (x-parjobs-signature on each message): a request by its "
                "user, a reply or an event by the service role that made it. Who may publish "
                "and read what on the broker is the security scheme.",
            )
        )


def _dead_letter() -> JsonObject:
    text = {"type": "string"}
    moment = {**text, "format": "date-time"}
    return {
        "name": DEAD_LETTER,
        "title": "Dead letter",
        "summary": "What could not be processed, as it was published, and why.",
        "description": "A message of any channel, byte for byte, with its AMQP properties: one "
        "a consumer refused carries the reason in x-parjobs-* headers, one the broker "
        f"dead-lettered RabbitMQ's `{DEATH_HEADER}` header.",
        "headers": {
            "type": "object",
            "properties": {
                CODE_HEADER: {
                    **text,
                    "enum": [reason.value for reason in DeadLetterReason],
                    "description": "Why, as a code.",
                },
                REASON_HEADER: {**text, "description": "Why, in words."},
                QUEUE_HEADER: {**text, "description": "The queue that refused it."},
                EXCHANGE_HEADER: {**text, "description": "The exchange it was published to."},
                ROUTING_KEY_HEADER: {**text, "description": "The key it was published with."},
                TIME_HEADER: moment,
                REDRIVEN_HEADER: {**moment, "description": "When the operator re-drove it."},
                DEATH_HEADER: {
                    "type": "array",
                    "items": {"type": "object"},
                    "description": "RabbitMQ's record of each time it dead-lettered it.",
                },
            },
        },
        "payload": {"description": "The message's body as it was: not necessarily JSON."},
    }
