"""The services' public keys as the operator configures them: whom replies and events come from.

Each service role (access, storage, compute) signs with a key of its own. Users, consumers and
`parjobs replay` learn the roles' public keys from one JSON file the operator hands out
(`PARJOBS_SERVICE_KEYS_FILE`), never from the channel a signed message came on: a key that came
with the message would prove nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeGuard

from pydantic import ValidationError

from orchestrator.core.keys import PublicKeys
from orchestrator.errors import ConfigurationError
from schemas.signing import SERVICE_ROLES, ServiceKeysData, ServiceRole


def is_service_role(name: str) -> TypeGuard[ServiceRole]:
    """True if `name` is a service role's (a user signs under their key's fingerprint)."""
    return name in SERVICE_ROLES


class ServiceKeys:
    """Each service role's public keys: the current one first, then any it signed with before."""

    def __init__(self, keys: Mapping[ServiceRole, PublicKeys | Sequence[PublicKeys]]) -> None:
        by_role = {
            role: (given,) if isinstance(given, PublicKeys) else tuple(given)
            for role, given in keys.items()
        }
        if missing := [role for role in SERVICE_ROLES if not by_role.get(role)]:
            raise ConfigurationError(
                f"the service keys name no key for {', '.join(missing)}: every role "
                f"({', '.join(SERVICE_ROLES)}) needs its public key"
            )
        owner: dict[PublicKeys, ServiceRole] = {}
        for role, role_keys in by_role.items():
            for key in role_keys:
                # One key signing for two roles would let either role speak as the other.
                if owner.setdefault(key, role) != role:
                    raise ConfigurationError(
                        f"key {key.fingerprint[:16]}… is listed for both {owner[key]} and "
                        f"{role}: each role needs a key of its own"
                    )
        self._keys = by_role

    def keys_for(self, signer: str) -> tuple[PublicKeys, ...]:
        """The keys `signer` may sign with; () if it is no service role."""
        return self._keys[signer] if is_service_role(signer) else ()

    def current(self, role: ServiceRole) -> PublicKeys:
        """The key `role` signs with now (and the one to seal for it)."""
        return self._keys[role][0]

    def to_wire(self) -> ServiceKeysData:
        return ServiceKeysData(
            roles={role: tuple(key.to_wire() for key in keys) for role, keys in self._keys.items()}
        )

    @classmethod
    def from_wire(cls, data: ServiceKeysData) -> ServiceKeys:
        return cls(
            {role: [PublicKeys.from_wire(key) for key in keys] for role, keys in data.roles.items()}
        )

    def save(self, path: Path) -> None:
        """Write the file the services, clients and replay load; replaces it whole or not at all."""
        path = Path(path)
        text = self.to_wire().model_dump_json(indent=2)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as out:
            out.write(text)
        os.chmod(out.name, 0o644)  # public keys: anyone who checks signatures may read them
        os.replace(out.name, path)

    @classmethod
    def load(cls, path: Path) -> ServiceKeys:
        """The service keys in `path`; ConfigurationError saying what is wrong with the file."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the service keys file {path}: {exc.strerror}; set "
                "PARJOBS_SERVICE_KEYS_FILE to the file the operator gave you"
            ) from exc
        try:
            data = ServiceKeysData.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or '<file>'}: {error['msg']}"
                for error in exc.errors(include_url=False, include_input=False)[:3]
            )
            raise ConfigurationError(
                f"{path} is not a parjobs service keys file ({problems})"
            ) from exc
        return cls.from_wire(data)

    def __repr__(self) -> str:
        roles = ", ".join(f"{role}={len(keys)}" for role, keys in self._keys.items())
        return f"ServiceKeys({roles})"
