"""The publisher's answer to a negative confirm, on fake channels: send again on a new channel.

RabbitMQ 3.10 keeps nacking a channel that was publishing to a quorum queue whose leader died
with its node, where a new channel is confirmed; tests/integration/test_cluster.py shows it on a
real cluster.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from aio_pika import Message
from aio_pika.abc import AbstractRobustChannel
from aio_pika.exceptions import DeliveryError
from pamqp.commands import Basic

from orchestrator.broker._publish import Publisher
from orchestrator.errors import PublishNackedError


class FakeChannel:
    """Nacks its first `nacks` publishes, then confirms; counts what it was asked."""

    def __init__(self, nacks: float, *, delay: float = 0.0) -> None:
        self.nacks = nacks
        self.delay = delay
        self.published: list[str | None] = []
        self.closed = False

    async def ready(self) -> None:
        return None

    async def get_exchange(self, name: str, *, ensure: bool) -> FakeChannel:
        return self

    async def publish(self, message: Message, routing_key: str, *, mandatory: bool) -> None:
        assert not self.closed, "published on a closed channel"
        self.published.append(message.message_id)
        await asyncio.sleep(self.delay)
        if len(self.published) <= self.nacks:
            raise DeliveryError(None, Basic.Nack(delivery_tag=len(self.published)))

    async def close(self) -> None:
        self.closed = True


class Channels:
    """Opens the given fake channels in turn, as the publisher asks for them."""

    def __init__(self, *channels: FakeChannel) -> None:
        self.waiting = list(channels)
        self.opened: list[FakeChannel] = []

    async def open(self) -> AbstractRobustChannel:
        channel = self.waiting.pop(0)
        self.opened.append(channel)
        return cast(AbstractRobustChannel, channel)


async def publisher(channels: Channels, publish_timeout: float = 5.0) -> Publisher:
    started = Publisher(channels.open, timeout=publish_timeout, user_id="svc")
    await started.start()
    return started


async def test_a_nacked_publish_goes_again_on_a_new_channel_and_the_old_one_closes() -> None:
    stale, fresh = FakeChannel(nacks=float("inf")), FakeChannel(nacks=0)
    channels = Channels(stale, fresh)
    sent = Message(b"x", message_id="m1")
    await (await publisher(channels)).send("ex", "key", sent)
    assert channels.opened == [stale, fresh]
    assert (stale.published, fresh.published) == (["m1"], ["m1"])  # the same message id
    assert stale.closed
    assert not fresh.closed


async def test_concurrent_nacks_open_one_new_channel_closed_after_its_last_send() -> None:
    stale, fresh = FakeChannel(nacks=float("inf"), delay=0.05), FakeChannel(nacks=0)
    channels = Channels(stale, fresh)
    sender = await publisher(channels)
    await asyncio.gather(*(sender.send("ex", "key", Message(b"x")) for _ in range(5)))
    assert channels.opened == [stale, fresh]  # not one channel per nacked send
    assert len(stale.published) == 5
    assert len(fresh.published) == 5
    assert stale.closed


async def test_nacks_that_do_not_pass_raise_once_the_timeout_is_spent() -> None:
    channels = Channels(*(FakeChannel(nacks=float("inf")) for _ in range(10)))
    sender = await publisher(channels, publish_timeout=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PublishNackedError, match=r"refused the message .* for 0\.5s"):
        await sender.send("ex", "key", Message(b"x"))
    assert loop.time() - started < 1.0
    assert len(channels.opened) >= 2  # each nack: a new channel for the next attempt
