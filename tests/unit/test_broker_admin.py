"""The provisioning client without a server: URLs, credentials, and the API being off."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from yarl import URL

from orchestrator.broker.admin import (
    ENABLE_COMMAND,
    BrokerAdmin,
    Credentials,
    new_password,
    vhost_of,
)
from orchestrator.errors import ConfigurationError
from orchestrator.settings import ManagementSettings


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "/"),
        ("amqp://guest:guest@127.0.0.1:5672", "/"),
        ("amqps://u:p@broker/prod", "prod"),
        ("amqp://u:p@broker/%2Fprod", "/prod"),
        ("amqp://u:p@mq1/prod,amqp://u:p@mq2/prod", "prod"),  # a cluster's nodes
    ],
)
def test_the_vhost_is_read_from_the_amqp_url_as_aio_pika_reads_it(url: str, vhost: str) -> None:
    assert vhost_of(url) == vhost


def test_credentials_replace_the_urls_own_and_survive_quoting() -> None:
    credentials = Credentials("user:alice.x@acme:prod", SecretStr("p@ss:w/rd"))
    url = credentials.amqp_url(SecretStr("amqp://guest:guest@[::1]:5672/prod")).get_secret_value()
    parsed = URL(url)  # how aio-pika reads it
    assert (parsed.user, parsed.password) == ("user:alice.x@acme:prod", "p@ss:w/rd")
    assert (parsed.host, parsed.port, parsed.path) == ("::1", 5672, "/prod")
    assert "guest" not in url
    without_credentials = credentials.amqp_url("amqp://broker/").get_secret_value()
    assert URL(without_credentials).user == "user:alice.x@acme:prod"


def test_credentials_replace_those_of_every_node_of_a_cluster() -> None:
    credentials = Credentials("svc", SecretStr("pw"))
    urls = credentials.amqp_url("amqp://guest:guest@mq1:5672/v,amqp://mq2:5673/v")
    assert urls.get_secret_value() == "amqp://svc:pw@mq1:5672/v,amqp://svc:pw@mq2:5673/v"


def test_fresh_passwords_are_long_and_never_repeat() -> None:
    passwords = {new_password().get_secret_value() for _ in range(100)}
    assert len(passwords) == 100
    assert min(len(password) for password in passwords) >= 40


async def test_an_api_that_does_not_answer_names_the_plugin_to_enable() -> None:
    settings = ManagementSettings(url="http://127.0.0.1:9", timeout=2)
    async with BrokerAdmin(settings) as admin:
        with pytest.raises(ConfigurationError, match=ENABLE_COMMAND):
            await admin.check()


def test_the_management_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        ManagementSettings(url="amqp://127.0.0.1:15672")
    assert ManagementSettings(url="http://h:15672/").url == "http://h:15672"
