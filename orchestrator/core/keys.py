"""Key pairs for users and services: X25519 to receive sealed payloads, Ed25519 to sign.

A key pair is saved as one JSON file: the public keys in clear, the private keys encrypted under a
passphrase. Public keys travel on their own (`PublicKeys.to_data`) to whoever seals for, or
verifies, their owner.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from orchestrator.core.crypto import decrypt_with_passphrase, encrypt_with_passphrase
from orchestrator.errors import CryptoError, KeyFileError
from schemas.keys import KeyFileData, PublicKeyData

_KEY_FILE_AAD = b"parjobs-keypair-v1"


def _raw(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class PublicKeys:
    """The public half of a `KeyPair`: what others need to seal for, or verify, its owner."""

    def __init__(self, name: str, sealing: X25519PublicKey, verifying: Ed25519PublicKey) -> None:
        self.name = name
        self.sealing = sealing
        self.verifying = verifying

    @property
    def fingerprint(self) -> str:
        """SHA-256 over both raw public keys, hex: names the key pair in PARs and registries."""
        return hashlib.sha256(_raw(self.sealing) + _raw(self.verifying)).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if `signature` is this owner's Ed25519 signature over `data`."""
        try:
            self.verifying.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def to_data(self) -> dict[str, Any]:
        return self.to_wire().model_dump(mode="json")

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> PublicKeys:
        try:
            wire = PublicKeyData.model_validate(data)
        except ValidationError as exc:
            raise KeyFileError(f"not a parjobs public key: {exc.error_count()} problem(s)") from exc
        return cls.from_wire(wire)

    @classmethod
    def load(cls, path: Path) -> PublicKeys:
        """Public keys from a `.pub` file, or the clear public half of a key file."""
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"cannot read public keys from {path}: {exc}") from exc
        if isinstance(document, dict) and document.get("kind") == "parjobs-keypair":
            document = document.get("public")
        if not isinstance(document, dict):
            raise KeyFileError(f"{path} holds no parjobs public key")
        return cls.from_data(document)

    def to_wire(self) -> PublicKeyData:
        return PublicKeyData(
            name=self.name, x25519=_raw(self.sealing), ed25519=_raw(self.verifying)
        )

    @classmethod
    def from_wire(cls, wire: PublicKeyData) -> PublicKeys:
        return cls(
            wire.name,
            X25519PublicKey.from_public_bytes(wire.x25519),
            Ed25519PublicKey.from_public_bytes(wire.ed25519),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKeys) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"PublicKeys(name={self.name!r}, fingerprint={self.fingerprint[:16]}…)"


class KeyPair:
    """A user's or service's private keys. Pass it wherever a `decrypt_key` is asked for."""

    def __init__(self, name: str, sealing: X25519PrivateKey, signing: Ed25519PrivateKey) -> None:
        self.name = name
        self.sealing = sealing
        self.signing = signing
        self.public = PublicKeys(name, sealing.public_key(), signing.public_key())

    @classmethod
    def generate(cls, name: str) -> KeyPair:
        return cls(name, X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def sign(self, data: bytes) -> bytes:
        return self.signing.sign(data)

    def to_file_data(self, passphrase: str) -> KeyFileData:
        secret = self.sealing.private_bytes_raw() + self.signing.private_bytes_raw()
        protected = encrypt_with_passphrase(secret, passphrase, aad=_KEY_FILE_AAD)
        return KeyFileData(public=self.public.to_wire(), protected=protected)

    @classmethod
    def from_file_data(cls, data: KeyFileData, passphrase: str) -> KeyPair:
        secret = decrypt_with_passphrase(data.protected, passphrase, aad=_KEY_FILE_AAD)
        if len(secret) != 64:
            raise KeyFileError("the key file's private part has the wrong length")
        pair = cls(
            data.public.name,
            X25519PrivateKey.from_private_bytes(secret[:32]),
            Ed25519PrivateKey.from_private_bytes(secret[32:]),
        )
        if pair.public != PublicKeys.from_wire(data.public):
            raise CryptoError("the key file's public and private parts do not belong together")
        return pair

    def save(self, path: Path, passphrase: str, *, overwrite: bool = False) -> None:
        """Write the key file with owner-only permissions; refuses to replace one unless asked."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError as exc:
            raise KeyFileError(f"{path} exists; choose another path or pass overwrite") from exc
        with os.fdopen(fd, "w") as out:
            out.write(self.to_file_data(passphrase).model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path, passphrase: str) -> KeyPair:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
        try:
            data = KeyFileData.model_validate_json(text)
        except ValidationError as exc:
            raise KeyFileError(f"{path} is not a parjobs key file") from exc
        return cls.from_file_data(data, passphrase)

    def __repr__(self) -> str:
        return f"KeyPair(name={self.name!r}, fingerprint={self.fingerprint[:16]}…)"
