"""The failover connection without a server: where each attempt goes, what an outage says.

Moving to another node of a live cluster, consumers and all, is tests/integration/test_cluster.py.
"""

from __future__ import annotations

import socket

import pytest
from pydantic import SecretStr

from orchestrator.broker._failover import FailoverConnection, connect_failover
from orchestrator.broker.amqp import AMQPBroker
from orchestrator.errors import BrokerUnavailableError
from orchestrator.settings import AMQPSettings


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nodes(*ports: int) -> AMQPSettings:
    urls = ",".join(f"amqp://svc:s3cret@127.0.0.1:{port}/" for port in ports)
    return AMQPSettings(amqp_url=SecretStr(urls), connect_timeout=2, reconnect_interval=0.05)


async def test_a_failed_attempt_moves_the_connection_to_the_next_node() -> None:
    first, second = closed_port(), closed_port()
    connection = FailoverConnection(nodes(first, second).urls)
    assert connection.node == f"amqp://svc:***@127.0.0.1:{first}/"
    with pytest.raises(ConnectionError):
        await connection.connect(timeout=2)
    assert connection.node == f"amqp://svc:***@127.0.0.1:{second}/"
    await connection.close()


async def test_one_node_stays_where_it_is() -> None:
    port = closed_port()
    connection = FailoverConnection(nodes(port).urls)
    with pytest.raises(ConnectionError):
        await connection.connect(timeout=2)
    assert connection.node == f"amqp://svc:***@127.0.0.1:{port}/"
    await connection.close()


async def test_no_node_answering_names_every_node_and_no_password() -> None:
    ports = closed_port(), closed_port(), closed_port()
    with pytest.raises(BrokerUnavailableError) as raised:
        await connect_failover(nodes(*ports), name="t")
    message = str(raised.value)
    assert all(f"127.0.0.1:{port}/" in message for port in ports), message
    assert "s3cret" not in message


async def test_the_broker_says_the_same_when_no_node_answers() -> None:
    with pytest.raises(
        BrokerUnavailableError, match="RabbitMQ not reachable at amqp://svc:\\*\\*\\*@"
    ):
        await AMQPBroker(nodes(closed_port(), closed_port())).connect()
