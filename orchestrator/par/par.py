"""`PAR`: an encrypted, expiring pre-authenticated request, as on the seed page.

A PAR holds public metadata (kind, permissions, key or prefix, expiry, recipient) and a sealed
capability (presigned S3 URLs, a POST policy, or a run token) that only the recipient's private key
opens. The issuing service mints PARs (`orchestrator.par.issuer`); holders use them through
`ObjectReader` & co. (`orchestrator.par.io`).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from orchestrator.core import crypto, par_rules
from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.errors import (
    ConfigurationError,
    NullPARError,
    PARClosedError,
    PARDataError,
    PARExpiredError,
    PARPermissionError,
    PassphraseError,
    WrongKeyError,
)
from orchestrator.par.control import PARControl, RunService, resolve_par_control
from schemas.messages import RunReply
from schemas.par import Capability, PARData, PARKind

_PROTECTED_FIELD = "protected_par"
_PROTECTED_AAD = b"parjobs-par-data-v1"


def new_par_uid() -> str:
    return secrets.token_hex(16)


def _now() -> datetime:
    return datetime.now(UTC)


class PAR:
    """A pre-authenticated request. `PAR()` is the null PAR, which grants nothing.

    A successful `close()` makes the PAR null too (the seed page: it "closes and deletes" the
    PAR): its data and driver details are dropped, `to_data()` is `{}`, and every use is refused
    with `PARClosedError`. Only `uid` still answers, so the holder can name what they closed.
    """

    def __init__(
        self, data: PARData | None = None, *, driver_details: dict[str, str] | None = None
    ):
        self._data = data
        # Only the creating service holds these; never serialised, `{}` everywhere else.
        self._driver_details = dict(driver_details or {})
        # Set by a successful close: the uid of the PAR this was (it is null from then on).
        self._closed_uid: str | None = None

    # --- minting ----------------------------------------------------------------------------

    @classmethod
    def seal(
        cls,
        capability: Capability,
        *,
        kind: PARKind,
        recipient: PublicKeys,
        issuer: str,
        expires_at: datetime,
        is_readable: bool = False,
        is_writeable: bool = False,
        is_executable: bool = False,
        key: str | None = None,
        prefix: str | None = None,
        resource: str | None = None,
        max_size: int | None = None,
        min_size: int = 0,
        sha256: str | None = None,
        driver_details: dict[str, str] | None = None,
        uid: str | None = None,
    ) -> PAR:
        """Create a PAR whose capability only `recipient` can open; used by issuing services."""
        par_rules.check_combination(
            kind,
            readable=is_readable,
            writeable=is_writeable,
            executable=is_executable,
            key=key,
            prefix=prefix,
            resource=resource,
        )
        unsealed = PARData(
            uid=uid or new_par_uid(),
            kind=kind,
            is_readable=is_readable,
            is_writeable=is_writeable,
            is_executable=is_executable,
            key=key,
            prefix=prefix,
            resource=resource,
            max_size=max_size,
            min_size=min_size,
            sha256=sha256,
            issuer=issuer,
            recipient=recipient.fingerprint,
            created_at=_now(),
            expires_at=expires_at,
            sealed=b"",
        )
        sealed = crypto.seal(
            capability.model_dump_json().encode(),
            recipient.sealing,
            info=par_rules.sealing_info(unsealed),
        )
        return cls(unsealed.model_copy(update={"sealed": sealed}), driver_details=driver_details)

    # --- the seed page's methods --------------------------------------------------------------

    @staticmethod
    def checksum(data: bytes | str) -> str:
        """SHA-256 (hex) of `data`: validates data, and proves a holder could open a capability."""
        return crypto.checksum(data)

    def is_null(self) -> bool:
        return self._data is None

    def key(self) -> str | None:
        """The object key this PAR accesses; None for a bucket or calculation PAR."""
        return self.data.key

    def seconds_remaining(self, buffer: float = 30) -> float:
        """Seconds left before expiry, minus `buffer`; 0.0 once expired (renew below ~60)."""
        return par_rules.seconds_remaining(self.data.expires_at, _now(), buffer)

    def driver_details(self) -> dict[str, str]:
        """Issuer-side details (bucket, key...): only on the creating service, else `{}`."""
        return dict(self._driver_details)

    def to_data(self, passphrase: str | None = None) -> dict[str, Any]:
        """A JSON-serialisable dict; with `passphrase`, the whole PAR is encrypted (scrypt+GCM)."""
        if self._data is None:
            return {}
        if passphrase is None:
            return self._data.model_dump(mode="json")
        blob = crypto.encrypt_with_passphrase(
            self._data.model_dump_json().encode(), passphrase, aad=_PROTECTED_AAD
        )
        return {_PROTECTED_FIELD: base64.b64encode(blob).decode()}

    @classmethod
    def from_data(cls, data: dict[str, Any], passphrase: str | None = None) -> PAR:
        """Rebuild a PAR from `to_data` output; `PARDataError` if it is not one."""
        if not isinstance(data, dict):
            raise PARDataError(
                f"PAR data must be a dict from PAR.to_data, not {type(data).__name__}"
            )
        if not data:
            return cls()
        if _PROTECTED_FIELD in data:
            if passphrase is None:
                raise PassphraseError("this PAR data is passphrase-protected; pass the passphrase")
            try:
                blob = base64.b64decode(data[_PROTECTED_FIELD], validate=True)
            except (binascii.Error, TypeError) as exc:
                raise PARDataError("the protected PAR data is not valid base64") from exc
            raw = crypto.decrypt_with_passphrase(blob, passphrase, aad=_PROTECTED_AAD)
            try:
                return cls(PARData.model_validate_json(raw))
            except ValidationError as exc:
                raise PARDataError(f"protected PAR data is not a PAR: {exc}") from exc
        try:
            return cls(PARData.model_validate(data))
        except ValidationError as exc:
            raise PARDataError(
                f"not a valid PAR ({exc.error_count()} problem(s)): {exc.errors()[0]['msg']}"
            ) from exc

    async def close(self, decrypt_key: KeyPair, control: PARControl | None = None) -> None:
        """Close this PAR at its issuer, proving possession of `decrypt_key`; refused twice.

        Once the issuer has closed it, this object is the null PAR (see the class docstring).
        """
        if self._closed_uid is not None:
            raise PARClosedError(f"PAR {self._closed_uid} is already closed")
        uid = self.uid
        proof = par_rules.capability_proof(self.open(decrypt_key, allow_expired=True))
        await resolve_par_control(control).close(uid, proof)
        self._closed_uid = uid
        self._data = None
        self._driver_details = {}

    def execute(self, decrypt_key: KeyPair, control: PARControl | None = None) -> RunControl:
        """The object that controls the run this calculation PAR grants."""
        if self.data.kind is not PARKind.CALCULATION or not self.data.is_executable:
            raise PARPermissionError(
                f"PAR {self.uid} is a {self.data.kind.value} PAR; it runs nothing"
            )
        capability = self.open(decrypt_key)
        assert capability.run_url is not None
        return RunControl(self, capability.run_url, resolve_par_control(control))

    # --- helpers the access classes use ------------------------------------------------------

    @property
    def data(self) -> PARData:
        if self._closed_uid is not None:
            raise PARClosedError(f"PAR {self._closed_uid} was closed")
        if self._data is None:
            raise NullPARError("this is a null PAR: it grants nothing")
        return self._data

    @property
    def uid(self) -> str:
        """The PAR's id; still answers after `close()` (it names the issuer's tombstone)."""
        return self._closed_uid or self.data.uid

    @property
    def kind(self) -> PARKind:
        return self.data.kind

    @property
    def is_readable(self) -> bool:
        return self.data.is_readable

    @property
    def is_writeable(self) -> bool:
        return self.data.is_writeable

    @property
    def is_executable(self) -> bool:
        return self.data.is_executable

    @property
    def expires_at(self) -> datetime:
        return self.data.expires_at

    def open(self, decrypt_key: KeyPair, *, allow_expired: bool = False) -> Capability:
        """Unseal the capability; refuses if closed, expired (with the 30 s buffer) or not ours."""
        data = self.data
        if not allow_expired and self.seconds_remaining() <= 0:
            raise PARExpiredError(
                f"PAR {data.uid} expired (or is within 30 s of expiry) at "
                f"{data.expires_at.isoformat()}; ask its issuer for a new one"
            )
        if decrypt_key.fingerprint != data.recipient:
            raise WrongKeyError(
                f"PAR {data.uid} was sealed for key {data.recipient[:16]}…, not for "
                f"{decrypt_key.name!r} ({decrypt_key.fingerprint[:16]}…)"
            )
        plaintext = crypto.unseal(
            data.sealed, decrypt_key.sealing, info=par_rules.sealing_info(data)
        )
        return Capability.model_validate_json(plaintext)

    def __repr__(self) -> str:
        if self._closed_uid is not None:
            return f"PAR(closed, uid={self._closed_uid})"
        if self._data is None:
            return "PAR(null)"
        d = self._data
        target = d.key or d.prefix or d.resource
        perms = par_rules.permission_letters(d)
        return f"PAR({d.kind.value} {perms} {target!r}, uid={d.uid}, expires={d.expires_at:%FT%TZ})"


@dataclass(frozen=True)
class RunControl:
    """What `PAR.execute` returns: the holder's handle on the run a calculation PAR grants.

    It carries the opened run capability, which travels only sealed for compute, bound to the
    action, the job and the holder's key; compute checks it (signature in the issuer's registry,
    not expired, not closed, not used for another run) before acting.
    """

    par: PAR
    run_url: str
    control: PARControl

    @property
    def job_uid(self) -> str:
        """The job whose run the PAR grants (its `resource`)."""
        job_uid = self.par.data.resource
        if job_uid is None:
            raise PARDataError(f"calculation PAR {self.par.uid} names no job to run")
        return job_uid

    def _runs(self) -> RunService:
        if not isinstance(self.control, RunService):
            raise ConfigurationError(
                "starting or stopping a run needs a connection to parjobs: use a "
                "ParjobsClient as the PAR control"
            )
        return self.control

    async def start(self) -> RunReply:
        """Start the calculation (the job's input must be uploaded first)."""
        return await self._runs().run_command("start", self.job_uid, self.run_url)

    async def stop(self) -> RunReply:
        """Stop the run (or cancel the job if it has not started)."""
        return await self._runs().run_command("stop", self.job_uid, self.run_url)

    async def status(self) -> RunReply:
        """The job's state and its last progress message."""
        return await self._runs().run_command("status", self.job_uid, self.run_url)

    async def wait(self, *, timeout: float = 3600) -> RunReply:  # noqa: ASYNC109
        """The job's end, as its events tell it (no polling): its state, and why it failed or
        was cancelled, else its last progress message; TimeoutError after `timeout` seconds."""
        sheet = await self._runs().wait_until(self.job_uid, frozenset(), timeout=timeout)
        detail = sheet.reason or sheet.progress or ""
        return RunReply(
            job_uid=sheet.job_uid, state=sheet.state.value, accepted=True, detail=detail
        )
