"""Minting PARs: presign on S3, seal for the recipient, record for the issuer.

This is the issuing side that storage and compute services share. Every URL inside a PAR is one
the S3 server itself enforces (signature, expiry, and for POST policies the key prefix and size).

A PAR minted for a job's event (`job=JobPARs(...)`) is recorded in that event: its uid leads to
the job and its proof of possession is left in `JobPARs.proofs` for the event to carry, so
minting writes nothing. Any other PAR gets a record object in the registry.
"""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.core.keys import PublicKeys
from orchestrator.core.par_rules import capability_proof, validate_key, validate_prefix
from orchestrator.errors import InvalidPARError
from orchestrator.par.par import PAR, new_par_uid
from orchestrator.store.base import ObjectStore
from orchestrator.store.registry import PARRegistry, job_par_uid
from schemas.par import Capability, PARKind, PARRecord

DEFAULT_LIFETIME = timedelta(hours=1)
MAX_LIFETIME = timedelta(days=7)  # SigV4 presigned URLs cannot outlive this
MAX_MANIFEST_OBJECTS = 1000


@dataclass
class JobPARs:
    """The PARs minted for one event of job `job_uid`, whose records that event carries: each
    one's uid leads to the job (`job_par_uid`), and its proof of possession is put in `proofs`
    (the event's `proofs`) instead of a record object in the registry."""

    job_uid: str
    proofs: dict[str, str] = field(default_factory=dict)


class PARIssuer:
    """Mints PARs on behalf of the service called `name`."""

    def __init__(
        self,
        store: ObjectStore,
        registry: PARRegistry,
        *,
        name: str,
        default_lifetime: timedelta = DEFAULT_LIFETIME,
    ) -> None:
        self._store = store
        self.registry = registry
        self.name = name
        self.default_lifetime = default_lifetime

    async def object_par(
        self,
        key: str,
        recipient: PublicKeys,
        *,
        readable: bool = True,
        writeable: bool = False,
        lifetime: timedelta | None = None,
        max_size: int | None = None,
        sha256: str | None = None,
        job: JobPARs | None = None,
    ) -> PAR:
        """Read and/or write one object. With `sha256`, S3 accepts only that content."""
        validate_key(key)
        seconds, expires_at = self._expiry(lifetime)
        get_url = await self._store.presign_get(key, seconds) if readable else None
        put_url: str | None = None
        put_headers: dict[str, str] = {}
        if writeable:
            pin = base64.b64encode(bytes.fromhex(sha256)).decode() if sha256 else None
            put_url, put_headers = await self._store.presign_put(key, seconds, sha256_b64=pin)
        capability = Capability(get_url=get_url, put_url=put_url, put_headers=put_headers)
        return await self._mint(
            capability,
            PARKind.OBJECT,
            recipient,
            expires_at,
            is_readable=readable,
            is_writeable=writeable,
            job=job,
            key=key,
            max_size=max_size,
            sha256=sha256,
        )

    async def bucket_write_par(
        self,
        prefix: str,
        recipient: PublicKeys,
        *,
        max_size: int,
        min_size: int = 0,
        lifetime: timedelta | None = None,
        job: JobPARs | None = None,
    ) -> PAR:
        """Write any key under `prefix`, each object `min_size`..`max_size` bytes (S3-enforced)."""
        validate_prefix(prefix)
        if not 0 <= min_size <= max_size:
            raise InvalidPARError(f"size range {min_size}..{max_size} is empty")
        seconds, expires_at = self._expiry(lifetime)
        post = await self._store.presign_post(prefix, seconds, min_size=min_size, max_size=max_size)
        capability = Capability(post_url=post.url, post_fields=post.fields)
        return await self._mint(
            capability,
            PARKind.BUCKET,
            recipient,
            expires_at,
            is_writeable=True,
            job=job,
            prefix=prefix,
            max_size=max_size,
            min_size=min_size,
        )

    async def bucket_read_par(
        self,
        prefix: str,
        recipient: PublicKeys,
        *,
        lifetime: timedelta | None = None,
        objects: Sequence[str] | None = None,
        job: JobPARs | None = None,
    ) -> PAR:
        """Read the objects under `prefix` that exist now: a sealed manifest of presigned GETs.

        S3 cannot presign "any key under a prefix" for reading, so the honest form is a list
        fixed at minting; objects written later are not readable through this PAR. `objects`:
        their keys relative to `prefix`, when the caller knows them (it has just written them),
        so none are listed.
        """
        validate_prefix(prefix)
        seconds, expires_at = self._expiry(lifetime)
        if objects is None:
            keys = [info.key for info in await self._store.list(prefix)]
        else:
            keys = [validate_key(prefix + name) for name in objects]
        if len(keys) > MAX_MANIFEST_OBJECTS:
            raise InvalidPARError(
                f"{len(keys)} objects under {prefix!r}; a read PAR lists at most "
                f"{MAX_MANIFEST_OBJECTS}, mint one per sub-prefix"
            )
        manifest = {key[len(prefix) :]: await self._store.presign_get(key, seconds) for key in keys}
        return await self._mint(
            Capability(manifest=manifest),
            PARKind.BUCKET,
            recipient,
            expires_at,
            is_readable=True,
            job=job,
            prefix=prefix,
        )

    async def calculation_par(
        self,
        resource: str,
        recipient: PublicKeys,
        *,
        lifetime: timedelta | None = None,
        job: JobPARs | None = None,
    ) -> PAR:
        """Execute (start or stop) the run of `resource`: a run token the compute service checks."""
        _, expires_at = self._expiry(lifetime)
        uid = new_par_uid() if job is None else job_par_uid(job.job_uid)
        run_url = f"parjobs-run://{self.name}/{uid}?token={secrets.token_urlsafe(32)}"
        return await self._mint(
            Capability(run_url=run_url),
            PARKind.CALCULATION,
            recipient,
            expires_at,
            is_executable=True,
            job=job,
            resource=resource,
            uid=uid,
        )

    def _expiry(self, lifetime: timedelta | None) -> tuple[int, datetime]:
        lifetime = self.default_lifetime if lifetime is None else lifetime
        if not timedelta(0) < lifetime <= MAX_LIFETIME:
            raise InvalidPARError(f"a PAR lives between 1 s and 7 days, not {lifetime}")
        seconds = math.ceil(lifetime.total_seconds())
        return seconds, datetime.now(UTC) + timedelta(seconds=seconds)

    async def _mint(
        self,
        capability: Capability,
        kind: PARKind,
        recipient: PublicKeys,
        expires_at: datetime,
        *,
        job: JobPARs | None,
        uid: str | None = None,
        **spec: Any,  # the PAR.seal keywords: permissions, target, sizes
    ) -> PAR:
        target = {k: str(v) for k, v in spec.items() if k in ("key", "prefix", "resource") and v}
        driver_details = {"bucket": self._store.bucket, "issuer": self.name, **target}
        if uid is None and job is not None:
            uid = job_par_uid(job.job_uid)
        par = PAR.seal(
            capability,
            kind=kind,
            recipient=recipient,
            issuer=self.name,
            expires_at=expires_at,
            driver_details=driver_details,
            uid=uid,
            **spec,
        )
        proof = capability_proof(capability)
        if job is not None:
            job.proofs[par.uid] = proof  # the record travels in the job's event
            return par
        await self.registry.register(
            PARRecord(
                uid=par.uid,
                kind=kind,
                issuer=self.name,
                recipient=recipient.fingerprint,
                proof=proof,
                created_at=par.data.created_at,
                expires_at=expires_at,
                driver_details=driver_details,
            )
        )
        return par
