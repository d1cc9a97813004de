"""Key pairs: generation, files under a passphrase, public key exchange, signatures."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from orchestrator import CryptoError, KeyFileError, KeyPair, PassphraseError, PublicKeys


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    pair = KeyPair.generate("alice")
    path = tmp_path / "alice.key"
    pair.save(path, "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = KeyPair.load(path, "pw")
    assert loaded.fingerprint == pair.fingerprint
    assert loaded.name == "alice"
    assert "PRIVATE" not in path.read_text()


def test_load_with_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    KeyPair.generate("a").save(path, "right")
    with pytest.raises(PassphraseError):
        KeyPair.load(path, "wrong")


def test_save_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = KeyPair.generate("a")
    first.save(path, "pw")
    with pytest.raises(KeyFileError, match="exists"):
        KeyPair.generate("b").save(path, "pw")
    assert KeyPair.load(path, "pw").fingerprint == first.fingerprint


def test_missing_or_foreign_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyPair.load(tmp_path / "nope", "pw")
    (tmp_path / "junk").write_text('{"hello": 1}')
    with pytest.raises(KeyFileError, match="not a parjobs key file"):
        KeyPair.load(tmp_path / "junk", "pw")


def test_swapped_public_part_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "k"
    KeyPair.generate("a").save(path, "pw")
    doc = json.loads(path.read_text())
    doc["public"] = KeyPair.generate("a").public.to_data()
    path.write_text(json.dumps(doc))
    with pytest.raises(CryptoError, match="do not belong together"):
        KeyPair.load(path, "pw")


def test_public_keys_travel_and_verify_signatures() -> None:
    pair = KeyPair.generate("svc")
    public = PublicKeys.from_data(json.loads(json.dumps(pair.public.to_data())))
    assert public == pair.public
    signature = pair.sign(b"message")
    assert public.verify(signature, b"message")
    assert not public.verify(signature, b"other message")
    assert not KeyPair.generate("x").public.verify(signature, b"message")


def test_public_key_data_with_wrong_length_is_refused() -> None:
    data = KeyPair.generate("a").public.to_data()
    data["x25519"] = "AAAA"
    with pytest.raises(KeyFileError, match="not a parjobs public key"):
        PublicKeys.from_data(data)
