"""A robust connection over the nodes of a RabbitMQ cluster: when its node goes, the next one.

aio-pika's robust connection reconnects to the one URL it was given (its issue #141: no list of
hosts). `FailoverConnection` keeps that machinery — channels, exchanges, queues, bindings and
consumers restored on the new connection, exclusive reply queues declared again there — and only
changes where each attempt goes: aio-pika reports both a lost connection and a failed attempt
through `_on_connection_close`, so that is where the next node's URL is taken, round-robin.

Quorum queues and streams live on every node, so a consumer restored on another node finds its
queue as it was, with the deliveries the lost connection had not acknowledged back in it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aio_pika import RobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from orchestrator.errors import BrokerUnavailableError
from orchestrator.settings import masked_url

if TYPE_CHECKING:
    from collections.abc import Sequence

    from orchestrator.settings import AMQPSettings

log = logging.getLogger("parjobs.broker")


class FailoverConnection(RobustConnection):
    """A robust connection that moves to the next of `urls` whenever its connection is lost
    or an attempt fails (one URL: the robust connection as aio-pika makes it)."""

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self._urls = tuple(URL(url) for url in urls)
        self._node = 0
        super().__init__(self._urls[0], **kwargs)

    @property
    def node(self) -> str:
        """The URL this connection is on, or tries next (password masked)."""
        return masked_url(str(self.url))

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not (self.is_closed or self._close_called) and len(self._urls) > 1:
            self._node = (self._node + 1) % len(self._urls)
            self.url = self._urls[self._node]
            log.warning("broker connection lost or refused; next attempt at %s", self.node)
        await super()._on_connection_close(closing)


async def connect_failover(settings: AMQPSettings, *, name: str) -> FailoverConnection:
    """A `FailoverConnection` to the first node of `settings.urls` that answers (each tried once,
    in order); BrokerUnavailableError naming every node if none does."""
    urls = settings.urls
    failures = []
    for first in range(len(urls)):
        connection = FailoverConnection(
            urls[first:] + urls[:first],
            client_properties={"connection_name": name},
            reconnect_interval=settings.reconnect_interval,
        )
        try:
            await connection.connect(timeout=settings.connect_timeout)
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            await connection.close()
            failures.append(f"{masked_url(urls[first])}: {exc}")
            continue
        return connection
    raise BrokerUnavailableError(f"RabbitMQ not reachable at {'; '.join(failures)}")
