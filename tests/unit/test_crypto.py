"""Sealing, passphrase protection and checksums, without any server."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from orchestrator import PassphraseError, TamperedError
from orchestrator.core.crypto import (
    checksum,
    decrypt_with_passphrase,
    encrypt_with_passphrase,
    seal,
    unseal,
)


def test_checksum_is_sha256_hex_of_bytes_and_utf8_text() -> None:
    assert checksum(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert checksum("é") == hashlib.sha256("é".encode()).hexdigest()


def test_seal_round_trip_with_matching_info() -> None:
    key = X25519PrivateKey.generate()
    sealed = seal(b"secret url", key.public_key(), info=b"purpose|uid")
    assert b"secret url" not in sealed
    assert unseal(sealed, key, info=b"purpose|uid") == b"secret url"


def test_seal_is_randomised() -> None:
    key = X25519PrivateKey.generate()
    assert seal(b"x", key.public_key(), info=b"i") != seal(b"x", key.public_key(), info=b"i")


def test_unseal_with_other_info_is_refused_as_tampered() -> None:
    key = X25519PrivateKey.generate()
    sealed = seal(b"secret", key.public_key(), info=b"par-1")
    with pytest.raises(TamperedError):
        unseal(sealed, key, info=b"par-2")


def test_unseal_with_other_key_or_flipped_bit_is_refused() -> None:
    key = X25519PrivateKey.generate()
    sealed = seal(b"secret", key.public_key(), info=b"i")
    with pytest.raises(TamperedError):
        unseal(sealed, X25519PrivateKey.generate(), info=b"i")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(TamperedError):
        unseal(bytes(flipped), key, info=b"i")
    with pytest.raises(TamperedError):
        unseal(b"short", key, info=b"i")


def test_passphrase_round_trip_and_wrong_passphrase() -> None:
    blob = encrypt_with_passphrase(b"private keys", "correct horse", aad=b"ctx")
    assert decrypt_with_passphrase(blob, "correct horse", aad=b"ctx") == b"private keys"
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        decrypt_with_passphrase(blob, "wrong", aad=b"ctx")
    with pytest.raises(PassphraseError):
        decrypt_with_passphrase(blob, "correct horse", aad=b"other context")


@pytest.mark.parametrize("blob", [b"", b"PJP1", b"XXXX" + bytes(60)])
def test_corrupt_passphrase_blob_is_refused(blob: bytes) -> None:
    with pytest.raises(PassphraseError, match=r"corrupt|truncated"):
        decrypt_with_passphrase(blob, "pw")


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(PassphraseError, match="empty"):
        encrypt_with_passphrase(b"x", "")
