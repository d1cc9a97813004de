"""Settings read from the environment (pydantic-settings), one model per external service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from aiobotocore.config import AioConfig
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.broker.topology import check_prefix
from orchestrator.core.keys import KeyPair
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import ConfigurationError


class S3Settings(BaseSettings):
    """Where the object store is and how to sign for it (`PARJOBS_S3_*`)."""

    model_config = SettingsConfigDict(env_prefix="PARJOBS_S3_", extra="ignore", frozen=True)

    endpoint_url: str | None = None
    """None means the local SeaweedFS the project starts (`LocalSeaweed`)."""
    public_endpoint_url: str | None = None
    """Host presigned URLs are signed for, when users reach S3 elsewhere than services do."""
    region: str = "us-east-1"
    # Optional so that "no settings" can mean "start a local server"; checked at client creation.
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    bucket: str = "parjobs"

    @field_validator("endpoint_url", "public_endpoint_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _both_keys_or_neither(self) -> S3Settings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both PARJOBS_S3_ACCESS_KEY_ID and PARJOBS_S3_SECRET_ACCESS_KEY")
        return self

    @property
    def presign_endpoint_url(self) -> str | None:
        """The endpoint presigned URLs are signed for."""
        return self.public_endpoint_url or self.endpoint_url

    def require_endpoint(self) -> str:
        """The service endpoint, or ConfigurationError saying how to set one."""
        if self.endpoint_url is None:
            raise ConfigurationError(
                "no S3 endpoint: set PARJOBS_S3_ENDPOINT_URL, or use the settings of a "
                "LocalSeaweed (`parjobs dev` starts one)"
            )
        return self.endpoint_url

    def require_credentials(self) -> tuple[str, str]:
        """(access key id, secret access key), or ConfigurationError naming the variables."""
        if self.access_key_id is None or self.secret_access_key is None:
            raise ConfigurationError(
                "no S3 credentials: set PARJOBS_S3_ACCESS_KEY_ID and PARJOBS_S3_SECRET_ACCESS_KEY"
            )
        return self.access_key_id, self.secret_access_key.get_secret_value()

    def client_config(self) -> AioConfig:
        """botocore client config: SigV4, path-style addressing (SeaweedFS, MinIO and AWS)."""
        return AioConfig(
            region_name=self.region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        )


def _amqp_node(url: str) -> tuple[str | None, str | None, str]:
    """(user, password, virtual host) of one node's AMQP URL: what a cluster's nodes share."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(
            "PARJOBS_AMQP_URL must be an amqp:// or amqps:// URL with a host (or several, "
            "separated by commas)"
        )
    return parts.username, parts.password, parts.path.lstrip("/") or "/"


class AMQPSettings(BaseSettings):
    """Where RabbitMQ is and how parjobs uses it (`PARJOBS_AMQP_URL`, `PARJOBS_PREFIX`, ...)."""

    model_config = SettingsConfigDict(env_prefix="PARJOBS_", extra="ignore", frozen=True)

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    """One node's URL, or the URLs of a cluster's nodes separated by commas (same user, password
    and virtual host; they differ in host and port). A connection tries them in that order and,
    when its node goes, moves to the next. A secret because it usually carries the password;
    `display_url` is the loggable form."""
    prefix: str = "parjobs"
    """Every exchange, queue and stream name starts with `<prefix>.`, so deployments and test runs
    sharing one broker never collide."""
    prefetch: int = Field(default=16, ge=1, le=2000)  # 2000: RabbitMQ's cap for quorum queues
    """Unacknowledged deliveries per consumer, which is also its number of concurrent handlers."""
    delivery_limit: int = Field(default=5, ge=1)
    """Failed deliveries a work queue allows before the broker dead-letters the message."""
    retry_delay: float = Field(default=0.5, ge=0)
    """Pause before a failed message goes back to its queue; doubles per failure, 30 s at most."""
    reconnect_interval: float = Field(default=1.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    publish_timeout: float = Field(default=30.0, gt=0)
    """How long a publish may wait for a confirm, including waiting out a reconnection."""

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, url: SecretStr) -> SecretStr:
        nodes = [part.strip() for part in url.get_secret_value().split(",")]
        # Every node must be the same user in the same virtual host: a connection that moves
        # must stay who it was (its `user_id` is checked on every publish).
        if len({_amqp_node(node) for node in nodes}) > 1:
            raise ValueError(
                "the URLs in PARJOBS_AMQP_URL must share their user, password and virtual host "
                "(they name the nodes of one cluster)"
            )
        return SecretStr(",".join(nodes))

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        return check_prefix(prefix)

    @property
    def urls(self) -> tuple[str, ...]:
        """Each node's URL (secret values), in the order connections try them."""
        return tuple(self.amqp_url.get_secret_value().split(","))

    @property
    def username(self) -> str:
        """The broker user the URL connects as (aio-pika's default, `guest`, if it names none):
        every message this connection publishes carries it as its `user_id`."""
        username = urlsplit(self.urls[0]).username
        return unquote(username) if username else "guest"

    @property
    def display_url(self) -> str:
        """The URL(s) with the password masked, for messages and logs."""
        return ",".join(masked_url(url) for url in self.urls)


def masked_url(url: str) -> str:
    """`url` with its password masked, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return parts.geturl()
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class ManagementSettings(BaseSettings):
    """RabbitMQ's management HTTP API and the operator's credentials for it
    (`PARJOBS_MANAGEMENT_*`): what provisions the broker users of roles and users."""

    model_config = SettingsConfigDict(env_prefix="PARJOBS_MANAGEMENT_", extra="ignore", frozen=True)

    url: str = "http://127.0.0.1:15672"
    """The API's base (the plugin: `rabbitmq-plugins enable rabbitmq_management`)."""
    username: str = "guest"
    """An administrator: RabbitMQ's `guest` serves the operator's set-up on localhost only."""
    password: SecretStr = SecretStr("guest")
    timeout: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("PARJOBS_MANAGEMENT_URL must be an http(s) URL")
        return url.rstrip("/")


class ServiceSettings(BaseSettings):
    """How the three daemons run (`PARJOBS_*`); shared so `parjobs dev` can set them once."""

    model_config = SettingsConfigDict(env_prefix="PARJOBS_", extra="ignore", frozen=True)

    data_root: str = ""
    """Key prefix for everything parjobs keeps in the bucket (jobs, registry, users, ledger)."""
    key_file: Path | None = None
    """This daemon's own role key file (`parjobs keys new`): it signs the role's replies and
    seals the events it appends; compute's also opens what is sealed for compute (bucket-write
    PARs, run commands)."""
    key_passphrase: SecretStr | None = None
    """The passphrase of the daemon's key file."""
    key_passphrase_file: Path | None = None
    """A file holding that passphrase instead (a container secret, e.g. compose's
    `/run/secrets/...`): one trailing newline is dropped. Set one of the two, not both."""
    service_keys_file: Path | None = None
    """The operator's file of each service role's public keys (`ServiceKeys`): what replies and
    events are checked against, by services, clients and `parjobs replay`."""
    job_lifetime_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    """How long a job waits for its input and start before it expires (and its PARs with it)."""
    sweep_interval_s: float = Field(default=600.0, gt=0)
    """How often access's safety net runs over the active jobs (the deadlines come by message)."""
    auth_window_s: float = Field(default=300.0, gt=0)
    """How far an authorisation's timestamp may be from the access service's clock."""
    time_limit_s: float = Field(default=600.0, gt=0)
    memory_limit_bytes: int = Field(default=2**30, ge=2**24)
    progress_snapshot_s: float = Field(default=30.0, gt=0)
    """How often at most compute overwrites a running job's progress snapshot (one object per
    job); the progress itself reaches the job's owner live, over the broker."""
    max_runs: int = Field(default=2, ge=1)
    """Calculations one compute daemon runs at once (its run queue's slots)."""
    max_queued_runs: int = Field(default=1000, ge=1, le=2000)  # RabbitMQ caps a prefetch at 2000
    """Starts one compute daemon takes at once (its prefetch on the run queue): each is answered
    as accepted and waits, unacked, for one of the `max_runs` slots."""
    sandbox: Literal["bwrap", "none"] = "bwrap"
    """How compute runs calculations: `bwrap`, each in a bubblewrap sandbox (compute refuses to
    start if it cannot make one); `none`, unsandboxed with compute's own user and view of the
    machine (an explicit choice, warned about at every start)."""
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    """On SIGTERM, how long in-flight work may take to finish before it is requeued."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve /healthz, /readyz and /metrics on this port; None: no health endpoint."""
    health_host: str = "127.0.0.1"
    """The address the health port binds: 0.0.0.0 in a container, for its healthcheck and
    Prometheus to reach it from outside."""
    warm_sandboxes: int | None = Field(default=None, ge=0)
    """Sandboxes compute keeps spawned ahead of need, one job each, so a run does not wait for
    one to start (`bwrap` only); None: as many as `max_runs`; 0: each run starts its own."""

    def service_keys(self) -> ServiceKeys:
        """The operator's service keys (PARJOBS_SERVICE_KEYS_FILE), or ConfigurationError."""
        if self.service_keys_file is None:
            raise ConfigurationError(
                "set PARJOBS_SERVICE_KEYS_FILE to the operator's service keys file (each role's "
                "public keys: what replies and events are checked against)"
            )
        return ServiceKeys.load(self.service_keys_file)

    def role_key(self, role: str) -> KeyPair:
        """The daemon's own key pair (PARJOBS_KEY_FILE, and PARJOBS_KEY_PASSPHRASE or
        PARJOBS_KEY_PASSPHRASE_FILE)."""
        if self.key_file is None or (self.key_passphrase is None) == (
            self.key_passphrase_file is None
        ):
            raise ConfigurationError(
                f"set PARJOBS_KEY_FILE to the {role} service's key file (parjobs keys new), and "
                "its passphrase in PARJOBS_KEY_PASSPHRASE or a file named by "
                "PARJOBS_KEY_PASSPHRASE_FILE (one of the two)"
            )
        return KeyPair.load(self.key_file, self._passphrase())

    def _passphrase(self) -> str:
        if self.key_passphrase is not None:
            return self.key_passphrase.get_secret_value()
        assert self.key_passphrase_file is not None
        try:
            text = self.key_passphrase_file.read_text()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read PARJOBS_KEY_PASSPHRASE_FILE {self.key_passphrase_file}: "
                f"{exc.strerror}"
            ) from exc
        return text.removesuffix("\n")
