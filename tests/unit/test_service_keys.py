"""The operator's service keys file: written, loaded, and every way it can be wrong."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli._app import app
from orchestrator.core.keys import KeyPair
from orchestrator.core.service_keys import ServiceKeys, is_service_role
from orchestrator.errors import ConfigurationError
from orchestrator.settings import ServiceSettings
from schemas.signing import SERVICE_ROLES

ACCESS, STORAGE, COMPUTE = (KeyPair.generate(role) for role in ("access", "storage", "compute"))
OLD_COMPUTE = KeyPair.generate("compute-2029")


def configured() -> ServiceKeys:
    return ServiceKeys(
        {
            "access": ACCESS.public,
            "storage": STORAGE.public,
            "compute": [COMPUTE.public, OLD_COMPUTE.public],
        }
    )


def test_saved_keys_load_back_with_their_order(tmp_path: Path) -> None:
    path = tmp_path / "service-keys.json"
    configured().save(path)
    loaded = ServiceKeys.load(path)
    assert loaded.keys_for("access") == (ACCESS.public,)
    assert loaded.keys_for("compute") == (COMPUTE.public, OLD_COMPUTE.public)
    assert loaded.current("compute") == COMPUTE.public
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["service-keys.json"]  # no temporary left


def test_saving_again_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "service-keys.json"
    configured().save(path)
    ServiceKeys(
        {"access": ACCESS.public, "storage": STORAGE.public, "compute": OLD_COMPUTE.public}
    ).save(path)
    assert ServiceKeys.load(path).keys_for("compute") == (OLD_COMPUTE.public,)


def test_users_and_strangers_have_no_service_keys() -> None:
    keys = configured()
    assert keys.keys_for(ACCESS.fingerprint) == ()
    assert keys.keys_for("user:alice") == ()
    assert keys.keys_for("") == ()
    assert is_service_role("storage")
    assert not is_service_role("Storage")


def test_a_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"cannot read.*PARJOBS_SERVICE_KEYS_FILE"):
        ServiceKeys.load(tmp_path / "nowhere.json")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "Invalid JSON"),
        ("[]", "<file>"),
        (json.dumps({"roles": {"access": [{"name": "x"}]}}), "roles.access.0"),
        (json.dumps({"kind": "parjobs-keypair", "roles": {}}), "kind"),
    ],
)
def test_a_corrupt_file_is_refused_saying_where(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "service-keys.json"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=f"not a parjobs service keys file.*{why}"):
        ServiceKeys.load(path)


def test_a_role_outside_the_three_is_refused(tmp_path: Path) -> None:
    data = configured().to_wire().model_dump(mode="json")
    data["roles"]["billing"] = data["roles"]["access"]
    path = tmp_path / "service-keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigurationError, match=r"roles\.billing"):
        ServiceKeys.load(path)


@pytest.mark.parametrize("role", ["access", "storage", "compute"])
def test_every_role_needs_a_key(tmp_path: Path, role: str) -> None:
    data = configured().to_wire().model_dump(mode="json")
    data["roles"][role] = []
    path = tmp_path / "service-keys.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigurationError, match=f"no key for {role}"):
        ServiceKeys.load(path)


def test_one_key_for_two_roles_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="both access and storage"):
        ServiceKeys({"access": ACCESS.public, "storage": ACCESS.public, "compute": COMPUTE.public})


def test_the_setting_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "service-keys.json"
    configured().save(path)
    monkeypatch.setenv("PARJOBS_SERVICE_KEYS_FILE", str(path))
    configured_path = ServiceSettings().service_keys_file
    assert configured_path == path
    assert ServiceKeys.load(configured_path).current("access") == ACCESS.public


def test_the_operator_writes_the_service_keys_file_from_each_roles_public_key(
    tmp_path: Path,
) -> None:
    pairs = {role: KeyPair.generate(role) for role in SERVICE_ROLES}
    options = []
    for role, pair in pairs.items():
        public = tmp_path / f"{role}.key.pub"
        public.write_text(json.dumps(pair.public.to_data()))
        options += [f"--{role}", str(public)]
    target = tmp_path / "service-keys.json"
    result = CliRunner().invoke(app, ["keys", "services", str(target), *options])
    assert result.exit_code == 0, result.output
    written = ServiceKeys.load(target)
    assert {role: written.current(role) for role in pairs} == {
        role: pair.public for role, pair in pairs.items()
    }
