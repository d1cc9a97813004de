"""Settings without a server: environment parsing and validation (S3, AMQP, the daemons' key)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from orchestrator.core.keys import KeyPair
from orchestrator.errors import ConfigurationError
from orchestrator.settings import AMQPSettings, S3Settings, ServiceSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own PARJOBS_* variables must not leak into these tests."""
    for name in S3Settings.model_fields:
        monkeypatch.delenv(f"PARJOBS_S3_{name.upper()}", raising=False)
    for name in ServiceSettings.model_fields:
        monkeypatch.delenv(f"PARJOBS_{name.upper()}", raising=False)


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARJOBS_S3_ENDPOINT_URL", "http://s3.internal:8333/")
    monkeypatch.setenv("PARJOBS_S3_PUBLIC_ENDPOINT_URL", "https://s3.example.com")
    monkeypatch.setenv("PARJOBS_S3_REGION", "eu-west-1")
    monkeypatch.setenv("PARJOBS_S3_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("PARJOBS_S3_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("PARJOBS_S3_BUCKET", "jobs")
    settings = S3Settings()
    assert settings.endpoint_url == "http://s3.internal:8333"  # trailing slash dropped
    assert settings.presign_endpoint_url == "https://s3.example.com"
    assert settings.region == "eu-west-1"
    assert settings.bucket == "jobs"
    assert settings.require_credentials() == ("AKID", "very-secret")
    assert "very-secret" not in repr(settings)


def test_defaults_mean_local_server_and_fail_clearly_at_use() -> None:
    settings = S3Settings()
    assert settings.endpoint_url is None
    assert settings.presign_endpoint_url is None
    assert (settings.region, settings.bucket) == ("us-east-1", "parjobs")
    with pytest.raises(ConfigurationError, match="PARJOBS_S3_ENDPOINT_URL"):
        settings.require_endpoint()
    with pytest.raises(ConfigurationError, match="PARJOBS_S3_SECRET_ACCESS_KEY"):
        settings.require_credentials()


def test_public_endpoint_defaults_to_endpoint() -> None:
    settings = S3Settings(endpoint_url="http://127.0.0.1:8333")
    assert settings.presign_endpoint_url == "http://127.0.0.1:8333"


def test_one_key_without_the_other_is_refused() -> None:
    with pytest.raises(ValidationError, match="set both"):
        S3Settings(access_key_id="AKID")
    with pytest.raises(ValidationError, match="set both"):
        S3Settings(secret_access_key=SecretStr("s"))


@pytest.mark.parametrize("url", ["127.0.0.1:8333", "ftp://host", "s3://bucket"])
def test_endpoint_must_be_http(url: str) -> None:
    with pytest.raises(ValidationError, match="http"):
        S3Settings(endpoint_url=url)


# --- AMQPSettings: one node or a cluster's ------------------------------------------------------


def test_one_amqp_url_is_one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARJOBS_AMQP_URL", "amqp://svc:s3cret@mq:5672/jobs")
    settings = AMQPSettings()
    assert settings.urls == ("amqp://svc:s3cret@mq:5672/jobs",)
    assert settings.username == "svc"
    assert settings.display_url == "amqp://svc:***@mq:5672/jobs"


def test_a_comma_list_names_a_clusters_nodes_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PARJOBS_AMQP_URL",
        "amqp://svc:s3cret@mq1:5672/jobs, amqp://svc:s3cret@mq2:5673/jobs,"
        "amqp://svc:s3cret@mq3/jobs",
    )
    settings = AMQPSettings()
    assert settings.urls == (
        "amqp://svc:s3cret@mq1:5672/jobs",
        "amqp://svc:s3cret@mq2:5673/jobs",
        "amqp://svc:s3cret@mq3/jobs",
    )
    assert settings.username == "svc"
    assert "s3cret" not in settings.display_url
    assert settings.display_url.count("svc:***@") == 3


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ("amqp://a:p@mq1/,amqp://b:p@mq2/", "share their user"),  # another user
        ("amqp://a:p@mq1/,amqp://a:q@mq2/", "share their user"),  # another password
        ("amqp://a:p@mq1/one,amqp://a:p@mq2/two", "share their user"),  # another vhost
        ("amqp://a:p@mq1/,", "amqp:// or amqps://"),  # an empty node
        ("amqp://a:p@mq1/,http://mq2/", "amqp:// or amqps://"),
        ("amqp:///", "with a host"),
    ],
)
def test_a_cluster_is_one_user_in_one_vhost(urls: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AMQPSettings(amqp_url=SecretStr(urls))


# --- ServiceSettings: the role key's passphrase, from the environment or a secret file ----------


@pytest.fixture
def role_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "access.key"
    KeyPair.generate("access").save(path, "pass phrase")
    return path


def test_the_passphrase_may_come_from_a_secret_file(tmp_path: Path, role_key_file: Path) -> None:
    secret = tmp_path / "key-passphrase"
    secret.write_text("pass phrase\n")  # as `echo ... > file` writes it
    settings = ServiceSettings(key_file=role_key_file, key_passphrase_file=secret)
    assert settings.role_key("access").public == KeyPair.load(role_key_file, "pass phrase").public


@pytest.mark.parametrize("how", ["neither", "both"])
def test_exactly_one_passphrase_source(tmp_path: Path, role_key_file: Path, how: str) -> None:
    secret = tmp_path / "key-passphrase"
    secret.write_text("pass phrase")
    sources: dict[str, object] = (
        {} if how == "neither" else {"key_passphrase": "pass phrase", "key_passphrase_file": secret}
    )
    settings = ServiceSettings.model_validate({"key_file": role_key_file, **sources})
    with pytest.raises(ConfigurationError, match="PARJOBS_KEY_PASSPHRASE_FILE"):
        settings.role_key("access")


def test_an_unreadable_passphrase_file_is_named(tmp_path: Path, role_key_file: Path) -> None:
    settings = ServiceSettings(key_file=role_key_file, key_passphrase_file=tmp_path / "missing")
    with pytest.raises(ConfigurationError, match="missing: No such file"):
        settings.role_key("access")
