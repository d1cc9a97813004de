"""S3Settings without a server: environment parsing, validation and the client config."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from orchestrator.errors import ConfigurationError
from orchestrator.settings import S3Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own PARJOBS_S3_* variables must not leak into these tests."""
    for name in S3Settings.model_fields:
        monkeypatch.delenv(f"PARJOBS_S3_{name.upper()}", raising=False)


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
