"""Cryptographic primitives, each a pure function over bytes.

Sealing is HPKE (RFC 9180) base mode, X25519 / HKDF-SHA256 / AES-256-GCM. Passphrase protection is
scrypt + AES-256-GCM. Checksums are SHA-256. Nothing here touches a file or the network.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from orchestrator.errors import PassphraseError, TamperedError

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

# scrypt cost: ~90 ms per derivation on these machines; the blob records it, so it can be raised.
_SCRYPT_LOG2_N = 15
_SCRYPT_R = 8
_SCRYPT_P = 1
_PASSPHRASE_MAGIC = b"PJP1"
_HEADER = struct.Struct(">4sBBB16s12s")  # magic, log2 n, r, p, salt, nonce


def checksum(data: bytes | str) -> str:
    """SHA-256 of `data` (str is UTF-8 encoded), as lowercase hex."""
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()


def seal(plaintext: bytes, recipient: X25519PublicKey, *, info: bytes) -> bytes:
    """Encrypt `plaintext` so only the holder of `recipient`'s private key can read it.

    `info` is bound into the key schedule: the ciphertext opens only with the same `info`, which
    is how a sealed URL is tied to its PAR (purpose, uid and metadata).
    """
    return _SUITE.encrypt(plaintext, recipient, info=info)


def unseal(ciphertext: bytes, private_key: X25519PrivateKey, *, info: bytes) -> bytes:
    """Open a payload made by `seal`; `TamperedError` if it, or `info`, was changed."""
    try:
        return _SUITE.decrypt(ciphertext, private_key, info=info)
    except (InvalidTag, ValueError) as exc:
        raise TamperedError(
            "the sealed payload does not open: it, or the metadata bound to it, was changed "
            "(or it was sealed for another key)"
        ) from exc


def _scrypt_key(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p)
    return kdf.derive(passphrase.encode())


def encrypt_with_passphrase(plaintext: bytes, passphrase: str, *, aad: bytes = b"") -> bytes:
    """Encrypt with a key derived from `passphrase` (scrypt); the blob carries salt and cost."""
    if not passphrase:
        raise PassphraseError("an empty passphrase protects nothing; give a non-empty one")
    salt, nonce = os.urandom(16), os.urandom(12)
    key = _scrypt_key(passphrase, salt, _SCRYPT_LOG2_N, _SCRYPT_R, _SCRYPT_P)
    header = _HEADER.pack(_PASSPHRASE_MAGIC, _SCRYPT_LOG2_N, _SCRYPT_R, _SCRYPT_P, salt, nonce)
    return header + AESGCM(key).encrypt(nonce, plaintext, header + aad)


def decrypt_with_passphrase(blob: bytes, passphrase: str, *, aad: bytes = b"") -> bytes:
    """Reverse `encrypt_with_passphrase`; `PassphraseError` for a wrong passphrase or bad blob."""
    if len(blob) < _HEADER.size + 16:
        raise PassphraseError("the passphrase-protected data is truncated or not parjobs data")
    header = blob[: _HEADER.size]
    magic, log2_n, r, p, salt, nonce = _HEADER.unpack(header)
    if magic != _PASSPHRASE_MAGIC or not (10 <= log2_n <= 22) or r > 32 or p > 16:
        raise PassphraseError("the passphrase-protected data is corrupt or not parjobs data")
    key = _scrypt_key(passphrase, salt, log2_n, r, p)
    try:
        return AESGCM(key).decrypt(nonce, blob[_HEADER.size :], header + aad)
    except InvalidTag as exc:
        raise PassphraseError("wrong passphrase, or the protected data was changed") from exc
