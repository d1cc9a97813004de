"""Settings read from the environment (pydantic-settings), one model per external service."""

from __future__ import annotations

from aiobotocore.config import AioConfig
from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator._exceptions import ConfigurationError


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
