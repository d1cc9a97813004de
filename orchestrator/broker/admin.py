"""Provisioning broker users: RabbitMQ's management HTTP API, as the operator's administrator.

Creates a broker user with a password and sets what its `Grant` (orchestrator.broker.identities)
allows: permissions in the virtual host, topic permissions per exchange. RabbitMQ applies new
permissions to new connections; a connection already open may keep what it had.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote, unquote, urlsplit

import httpx
from pydantic import SecretStr

from orchestrator.broker.identities import Grant, check_username
from orchestrator.errors import BrokerError, ConfigurationError
from orchestrator.settings import ManagementSettings

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

    from orchestrator.broker.identities import Permissions, TopicPermission

ENABLE_COMMAND = "rabbitmq-plugins enable rabbitmq_management"


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names, as aio-pika reads it (no path or `/`: `/`); of a
    cluster's comma-separated URLs, the first's (AMQPSettings checks they all name the same)."""
    path = urlsplit(amqp_url.split(",", 1)[0]).path
    return "/" if path in ("", "/") else unquote(path[1:])


def new_password() -> SecretStr:
    """A fresh random password for a broker user (256 bits, URL-safe)."""
    return SecretStr(secrets.token_urlsafe(32))


@dataclass(frozen=True)
class Credentials:
    """A broker user's name and password, as provisioning made them."""

    username: str
    password: SecretStr

    def amqp_url(self, base: str | SecretStr) -> SecretStr:
        """`base` (e.g. PARJOBS_AMQP_URL, one URL or a cluster's, comma-separated) with these
        credentials in place of its own, quoted: usernames hold `:` and `@`, which a URL's user
        part must escape."""
        urls = base.get_secret_value() if isinstance(base, SecretStr) else base
        user = quote(self.username, safe="")
        password = quote(self.password.get_secret_value(), safe="")
        nodes = []
        for url in urls.split(","):
            parts = urlsplit(url)
            host = parts.netloc.rpartition("@")[2]
            nodes.append(parts._replace(netloc=f"{user}:{password}@{host}").geturl())
        return SecretStr(",".join(nodes))


class BrokerAdmin:
    """An async client of RabbitMQ's management API, for one virtual host.

    Use as `async with BrokerAdmin(ManagementSettings(), vhost=vhost_of(amqp_url)) as admin:`;
    `check()` first to learn whether the API answers at all.
    """

    def __init__(self, settings: ManagementSettings | None = None, *, vhost: str = "/") -> None:
        self.settings = settings if settings is not None else ManagementSettings()
        self.vhost = vhost
        self._http = httpx.AsyncClient(
            base_url=f"{self.settings.url}/api/",
            auth=(self.settings.username, self.settings.password.get_secret_value()),
            timeout=self.settings.timeout,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def _call(
        self, method: str, *segments: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        # Every segment is quoted whole: vhost `/` is `%2F`, usernames hold `:` and `@`.
        path = "/".join(quote(segment, safe="") for segment in segments)
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise ConfigurationError(
                f"RabbitMQ's management API does not answer at {self.settings.url} ({exc!r}): "
                f"enable it with `{ENABLE_COMMAND}` (as root on the broker's host), or set "
                "PARJOBS_MANAGEMENT_URL"
            ) from exc
        if response.status_code in (401, 403):
            raise ConfigurationError(
                f"RabbitMQ's management API refused {self.settings.username!r} "
                f"({response.status_code}): set PARJOBS_MANAGEMENT_USERNAME and "
                "PARJOBS_MANAGEMENT_PASSWORD to an administrator's"
            )
        return response

    async def _expect(
        self, method: str, *segments: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        response = await self._call(method, *segments, body=body)
        if response.is_error:
            raise BrokerError(
                f"RabbitMQ's management API: {method} /api/{'/'.join(segments)} answered "
                f"{response.status_code}: {response.text}"
            )
        return response

    async def check(self) -> str:
        """The broker's RabbitMQ version, once the API answered with these credentials."""
        overview = (await self._expect("GET", "overview")).json()
        return str(overview["rabbitmq_version"])

    # --- users ----------------------------------------------------------------------------------

    async def put_user(self, username: str, password: SecretStr) -> None:
        """Create `username`, or set its password if it exists; no tags (no management access)."""
        body = {"password": password.get_secret_value(), "tags": ""}
        await self._expect("PUT", "users", check_username(username), body=body)

    async def delete_user(self, username: str) -> bool:
        """Delete `username` (RabbitMQ closes its connections); False if there was none."""
        response = await self._call("DELETE", "users", username)
        if response.status_code == 404:
            return False
        if response.is_error:
            raise BrokerError(f"cannot delete broker user {username!r}: {response.text}")
        return True

    async def usernames(self, domain: str) -> list[str]:
        """The broker users of one deployment (`...@<domain>`), sorted."""
        users = (await self._expect("GET", "users")).json()
        return sorted(user["name"] for user in users if user["name"].endswith(f"@{domain}"))

    # --- permissions ----------------------------------------------------------------------------

    async def set_permissions(self, username: str, permissions: Permissions) -> None:
        """Replace `username`'s configure/write/read regexes in the virtual host."""
        body = {
            "configure": permissions.configure,
            "write": permissions.write,
            "read": permissions.read,
        }
        await self._expect("PUT", "permissions", self.vhost, username, body=body)

    async def permissions(self, username: str) -> dict[str, str] | None:
        """`username`'s regexes in the virtual host as RabbitMQ holds them, or None."""
        response = await self._call("GET", "permissions", self.vhost, username)
        if response.status_code == 404:
            return None
        if response.is_error:
            raise BrokerError(f"cannot read the permissions of {username!r}: {response.text}")
        held = response.json()
        return {key: str(held[key]) for key in ("configure", "write", "read")}

    async def set_topic_permissions(
        self, username: str, topic_permissions: Iterable[TopicPermission]
    ) -> None:
        """Replace all of `username`'s topic permissions in the virtual host with these."""
        cleared = await self._call("DELETE", "topic-permissions", self.vhost, username)
        if cleared.is_error and cleared.status_code != 404:  # 404: there were none
            raise BrokerError(f"cannot clear the topic permissions of {username!r}: {cleared.text}")
        for topic in topic_permissions:
            body = {"exchange": topic.exchange, "write": topic.write, "read": topic.read}
            await self._expect("PUT", "topic-permissions", self.vhost, username, body=body)

    async def topic_permissions(self, username: str) -> dict[str, tuple[str, str]]:
        """`username`'s topic permissions in the virtual host: exchange -> (write, read)."""
        held = (await self._expect("GET", "users", username, "topic-permissions")).json()
        return {
            entry["exchange"]: (entry["write"], entry["read"])
            for entry in held
            if entry["vhost"] == self.vhost
        }

    # --- the whole of a grant -------------------------------------------------------------------

    async def provision(self, grant: Grant, password: SecretStr | None = None) -> Credentials:
        """Make `grant.username` a broker user with exactly `grant`'s permissions (a fresh random
        password unless one is given); idempotent apart from the password."""
        credentials = Credentials(grant.username, password or new_password())
        await self.put_user(credentials.username, credentials.password)
        await self.set_permissions(grant.username, grant.permissions)
        await self.set_topic_permissions(grant.username, grant.topic_permissions)
        return credentials
