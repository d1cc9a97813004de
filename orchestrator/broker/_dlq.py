"""The dead-letter queue: what goes in (with its reason), how to look at it, how to re-drive it.

Two roads lead here and both end in the one queue `<prefix>.dlq`:
- a consumer found the message can never succeed (not JSON, invalid, unknown type, or its
  handler raised PoisonMessageError): it publishes a copy with `x-parjobs-*` reason headers,
  confirmed, then acks the original;
- a work queue's delivery limit ran out: the broker dead-letters it through the DLX (at least
  once), recording why in the standard `x-death` header.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from aio_pika import DeliveryMode, Message
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from orchestrator.broker.base import DeadLetter, DeadLetterReason
from orchestrator.errors import PublishError

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, HeadersType

    from orchestrator.broker._publish import Publisher

log = logging.getLogger("parjobs.broker")

REASON_HEADER = "x-parjobs-reason"
CODE_HEADER = "x-parjobs-reason-code"
QUEUE_HEADER = "x-parjobs-original-queue"
EXCHANGE_HEADER = "x-parjobs-original-exchange"
ROUTING_KEY_HEADER = "x-parjobs-original-routing-key"
TIME_HEADER = "x-parjobs-dead-lettered-at"
REDRIVEN_HEADER = "x-parjobs-redriven-at"
_MAX_REASON = 1024
# Headers that describe a past life in the DLQ; a re-driven message starts clean.
_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count", "x-parjobs-")


_BROKER_REASONS = {
    "delivery_limit": DeadLetterReason.DELIVERY_LIMIT,
    "rejected": DeadLetterReason.REJECTED,
    "expired": DeadLetterReason.EXPIRED,
    "maxlen": DeadLetterReason.MAX_LENGTH,
}


def _own_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        key: value for key, value in (headers or {}).items() if not key.startswith(_DEATH_HEADERS)
    }


def dead_letter_headers(
    headers: Mapping[str, Any] | None,
    *,
    queue: str,
    exchange: str,
    routing_key: str,
    code: str,
    reason: str,
) -> dict[str, Any]:
    """The headers of the copy a consumer sends to the DLQ: the message's own, and its reason in
    `x-parjobs-*` headers."""
    return {
        **_own_headers(headers),
        CODE_HEADER: code,
        REASON_HEADER: reason[:_MAX_REASON],
        QUEUE_HEADER: queue,
        EXCHANGE_HEADER: exchange,
        ROUTING_KEY_HEADER: routing_key,
        TIME_HEADER: datetime.now(UTC).isoformat(),
    }


def redriven_headers(letter: DeadLetter) -> dict[str, Any]:
    """The headers a re-driven letter goes back with: its own, marked as re-driven."""
    return {**letter.headers, REDRIVEN_HEADER: datetime.now(UTC).isoformat()}


def dead_letter_copy(
    message: AbstractIncomingMessage, queue: str, code: str, reason: str
) -> Message:
    """The copy of `message` a consumer sends to the DLQ, its reason in `x-parjobs-*` headers."""
    headers = dead_letter_headers(
        message.headers,
        queue=queue,
        exchange=message.exchange or "",
        routing_key=message.routing_key or "",
        code=code,
        reason=reason,
    )
    return _copy(message, headers)


def _copy(message: AbstractIncomingMessage, headers: HeadersType) -> Message:
    # Not copied: expiration (it would expire in the DLQ) and user_id (RabbitMQ refuses a
    # user_id other than the publishing connection's: the publisher sets its own).
    return Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def _reason(code: str) -> DeadLetterReason:
    try:
        return DeadLetterReason(code)
    except ValueError:
        return DeadLetterReason.UNKNOWN


async def _hand_back(messages: Iterable[AbstractIncomingMessage]) -> None:
    # A channel already gone has handed them back to the queue by itself.
    with contextlib.suppress(ChannelInvalidStateError, AMQPError):
        for message in messages:
            await message.nack(requeue=True)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def read_letter(message_id: str | None, body: bytes, headers: Mapping[str, Any]) -> DeadLetter:
    """What the dead-letter queue says about the message of that id, body and headers: the
    consumer's `x-parjobs-*` reason, or else the broker's latest `x-death` record."""
    own = _own_headers(headers)
    if CODE_HEADER in headers:
        code = _text(headers[CODE_HEADER]) or ""
        at = _text(headers.get(TIME_HEADER))
        return DeadLetter(
            message_id=message_id,
            code=_reason(code),
            reason=_text(headers.get(REASON_HEADER)) or code,
            original_queue=_text(headers.get(QUEUE_HEADER)),
            original_exchange=_text(headers.get(EXCHANGE_HEADER)),
            original_routing_key=_text(headers.get(ROUTING_KEY_HEADER)),
            dead_lettered_at=datetime.fromisoformat(at) if at else None,
            body=body,
            headers=own,
        )
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]  # the most recent
        broker_reason = _text(death.get("reason")) or "unknown"
        keys = death.get("routing-keys")
        queue = _text(death.get("queue"))
        time = death.get("time")
        return DeadLetter(
            message_id=message_id,
            code=_BROKER_REASONS.get(broker_reason, DeadLetterReason.UNKNOWN),
            reason=f"dead-lettered by RabbitMQ from {queue}: {broker_reason}",
            original_queue=queue,
            original_exchange=_text(death.get("exchange")),
            original_routing_key=_text(keys[0]) if isinstance(keys, list) and keys else None,
            dead_lettered_at=time if isinstance(time, datetime) else None,
            body=body,
            headers=own,
        )
    return DeadLetter(
        message_id=message_id,
        code=DeadLetterReason.UNKNOWN,
        reason="no dead-letter headers (published to the dead-letter queue directly?)",
        original_queue=None,
        original_exchange=None,
        original_routing_key=None,
        dead_lettered_at=None,
        body=body,
        headers=own,
    )


def parse(message: AbstractIncomingMessage) -> DeadLetter:
    """What the dead-letter queue says about `message`."""
    return read_letter(message.message_id, message.body, message.headers or {})


async def peek(channel: AbstractRobustChannel, dlq: str, limit: int) -> list[DeadLetter]:
    """Up to `limit` dead letters, oldest first, left in the queue.

    Each is fetched without ack and all are handed back at the end (nack, requeue): handing one
    back at once could let the next fetch return it again.
    """
    queue = await channel.declare_queue(dlq, passive=True, robust=False)
    held: list[AbstractIncomingMessage] = []
    try:
        while len(held) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
        return [parse(message) for message in held]
    finally:
        await _hand_back(held)


async def redrive(
    channel: AbstractRobustChannel,
    publisher: Publisher,
    dlq: str,
    message_ids: Collection[str] | Literal["all"],
) -> int:
    """Send the chosen dead letters back to the queues they came from; the number re-driven.

    A letter goes to its original *queue* (through the default exchange), not its original
    exchange: a topic exchange would deliver it again to every other bound queue and the events
    stream. Each is acked from the DLQ only after the broker confirmed the re-publish; one that
    cannot be re-driven (no origin, or its queue is gone) stays, and is logged.
    """
    if isinstance(message_ids, str) and message_ids != "all":
        raise ValueError('message_ids must be a collection of ids, or "all"')
    queue = await channel.declare_queue(dlq, passive=True, robust=False)
    held: list[AbstractIncomingMessage] = []
    sent: set[str] = set()
    redriven = 0
    try:
        # Until the queue has nothing left to give: the held ones are not given twice, and a
        # letter re-driven here that fails again and comes back is held, not sent round again.
        # (The queue's declared message count cannot bound this loop: it lags behind.)
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            letter = parse(message)
            key = letter.message_id or hashlib.sha256(letter.body).hexdigest()
            chosen = message_ids == "all" or letter.message_id in message_ids
            if not chosen or key in sent:
                held.append(message)
                continue
            if letter.original_queue is None:
                log.warning("dead letter %s has no origin; left in %s", letter.message_id, dlq)
                held.append(message)
                continue
            try:
                await publisher.send(
                    "", letter.original_queue, _copy(message, redriven_headers(letter))
                )
            except PublishError as exc:
                log.warning("dead letter %s not re-driven: %s", letter.message_id, exc)
                held.append(message)
                continue
            await message.ack()
            sent.add(key)
            redriven += 1
            log.info("re-drove %s to %s", letter.message_id, letter.original_queue)
    finally:
        await _hand_back(held)
    return redriven
