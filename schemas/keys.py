"""Wire forms of key material: public key bundles and passphrase-protected key files."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas._base import B64Bytes, WireModel

Raw32 = Annotated[B64Bytes, Field(min_length=32, max_length=32)]


class PublicKeyData(WireModel):
    """A party's public keys: X25519 to seal payloads for it, Ed25519 to verify its signatures."""

    schema_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=200)
    x25519: Raw32
    ed25519: Raw32


class KeyFileData(WireModel):
    """A key pair at rest: public part in clear, private part under a passphrase (scrypt+GCM)."""

    schema_version: Literal[1] = 1
    kind: Literal["parjobs-keypair"] = "parjobs-keypair"
    public: PublicKeyData
    protected: B64Bytes
