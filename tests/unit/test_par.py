"""The PAR object without a server: sealing, opening, serialising, and every refusal."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator import (
    PAR,
    ConfigurationError,
    InvalidPARError,
    KeyPair,
    NullPARError,
    ObjectReader,
    PARClosedError,
    PARDataError,
    PARExpiredError,
    PARKind,
    PARPermissionError,
    PARState,
    PassphraseError,
    TamperedError,
    WrongKeyError,
)
from orchestrator.core.par_rules import capability_proof
from schemas.par import Capability

CAPABILITY = Capability(get_url="http://s3.invalid/b/k?X-Amz-Signature=abc")


def make_par(owner: KeyPair, *, lifetime: timedelta = timedelta(hours=1), **kw: Any) -> PAR:
    spec: dict[str, Any] = {"kind": PARKind.OBJECT, "is_readable": True, "key": "jobs/1/input"}
    spec.update(kw)
    return PAR.seal(
        CAPABILITY,
        recipient=owner.public,
        issuer="storage",
        expires_at=datetime.now(UTC) + lifetime,
        driver_details={"bucket": "b"},
        **spec,
    )


@pytest.fixture(scope="module")
def alice() -> KeyPair:
    return KeyPair.generate("alice")


def test_open_gives_back_the_capability(alice: KeyPair) -> None:
    par = make_par(alice)
    assert par.open(alice) == CAPABILITY
    assert par.key() == "jobs/1/input"
    assert not par.is_null()
    assert 3500 < par.seconds_remaining() <= 3570
    assert "X-Amz-Signature" not in json.dumps(par.to_data())


def test_null_par(alice: KeyPair) -> None:
    par = PAR()
    assert par.is_null()
    assert par.to_data() == {}
    assert PAR.from_data({}).is_null()
    assert par.driver_details() == {}
    with pytest.raises(NullPARError):
        par.key()
    with pytest.raises(NullPARError):
        par.open(alice)


def test_checksum_is_static_sha256() -> None:
    assert PAR.checksum("abc") == PAR.checksum(b"abc")
    assert len(PAR.checksum(b"")) == 64


def test_illegal_combination_raises_invalid_par(alice: KeyPair) -> None:
    with pytest.raises(InvalidPARError, match="never execute"):
        make_par(alice, is_executable=True)
    with pytest.raises(InvalidPARError, match="never both"):
        make_par(alice, kind=PARKind.BUCKET, key=None, prefix="p/", is_writeable=True)


def test_bucket_par_has_no_key(alice: KeyPair) -> None:
    par = make_par(alice, kind=PARKind.BUCKET, key=None, prefix="out/")
    assert par.key() is None


def test_driver_details_stay_on_the_creating_side(alice: KeyPair) -> None:
    par = make_par(alice)
    assert par.driver_details() == {"bucket": "b"}
    assert "bucket" not in json.dumps(par.to_data())
    assert PAR.from_data(par.to_data()).driver_details() == {}


def test_to_data_round_trip_through_json(alice: KeyPair) -> None:
    par = make_par(alice)
    again = PAR.from_data(json.loads(json.dumps(par.to_data())))
    assert again.uid == par.uid
    assert again.open(alice) == CAPABILITY


def test_to_data_with_passphrase_hides_everything(alice: KeyPair) -> None:
    par = make_par(alice)
    data = par.to_data(passphrase="s3cret")
    assert par.uid not in json.dumps(data)
    assert PAR.from_data(data, passphrase="s3cret").open(alice) == CAPABILITY
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        PAR.from_data(data, passphrase="guess")
    with pytest.raises(PassphraseError, match="pass the passphrase"):
        PAR.from_data(data)


@pytest.mark.parametrize(
    "data",
    [
        {"uid": "nope"},
        {"protected_par": "!!!not base64"},
        {"protected_par": base64.b64encode(b"garbage").decode()},
    ],
)
def test_corrupt_data_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises((PARDataError, PassphraseError)):
        PAR.from_data(data, passphrase="pw")


def test_non_dict_data_is_refused() -> None:
    with pytest.raises(PARDataError, match="must be a dict"):
        PAR.from_data("a string")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key", "jobs/2/input"),
        ("expires_at", "2099-01-01T00:00:00Z"),
        ("is_writeable", True),
        ("issuer", "mallory"),
        ("max_size", 10**12),
    ],
)
def test_tampered_metadata_makes_the_seal_refuse(alice: KeyPair, field: str, value: Any) -> None:
    data = make_par(alice).to_data()
    data[field] = value
    with pytest.raises(TamperedError):
        PAR.from_data(data).open(alice)


def test_tampered_sealed_bytes_are_refused(alice: KeyPair) -> None:
    data = make_par(alice).to_data()
    raw = bytearray(base64.b64decode(data["sealed"]))
    raw[40] ^= 0xFF
    data["sealed"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(TamperedError):
        PAR.from_data(data).open(alice)


def test_sealed_capability_cannot_move_into_another_par(alice: KeyPair) -> None:
    victim, other = make_par(alice).to_data(), make_par(alice).to_data()
    other["sealed"] = victim["sealed"]
    with pytest.raises(TamperedError):
        PAR.from_data(other).open(alice)


def test_wrong_private_key_is_named(alice: KeyPair) -> None:
    with pytest.raises(WrongKeyError, match="sealed for key"):
        make_par(alice).open(KeyPair.generate("mallory"))


def test_expired_par_is_refused_locally_with_buffer(alice: KeyPair) -> None:
    par = make_par(alice, lifetime=timedelta(seconds=20))
    assert par.seconds_remaining() == 0.0
    assert par.seconds_remaining(buffer=0) > 0
    with pytest.raises(PARExpiredError, match="expired"):
        par.open(alice)


def test_execute_only_on_calculation_pars(alice: KeyPair) -> None:
    with pytest.raises(PARPermissionError, match="runs nothing"):
        make_par(alice).execute(alice)


class InMemoryIssuer:
    """A `PARControl` that keeps closes in a dict: the registry's part of a close, without S3."""

    def __init__(self) -> None:
        self.proofs: dict[str, str] = {}

    async def close(self, uid: str, proof: str) -> None:
        if uid in self.proofs:
            raise PARClosedError(f"PAR {uid} is already closed")
        self.proofs[uid] = proof

    async def state(self, uid: str) -> PARState:
        return PARState.CLOSED if uid in self.proofs else PARState.OPEN


async def test_close_proves_possession_and_leaves_a_null_par(alice: KeyPair) -> None:
    issuer = InMemoryIssuer()
    par = make_par(alice)
    uid = par.uid
    await par.close(alice, control=issuer)
    assert issuer.proofs == {uid: capability_proof(CAPABILITY)}
    assert par.is_null()
    assert par.to_data() == {}
    assert par.to_data(passphrase="pw") == {}
    assert par.driver_details() == {}
    assert par.uid == uid  # still names what was closed
    assert repr(par) == f"PAR(closed, uid={uid})"


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(lambda par, key: par.key(), id="key"),
        pytest.param(lambda par, key: par.seconds_remaining(), id="seconds_remaining"),
        pytest.param(lambda par, key: par.open(key), id="open"),
        pytest.param(lambda par, key: par.open(key, allow_expired=True), id="open-expired"),
        pytest.param(lambda par, key: par.execute(key), id="execute"),
        pytest.param(lambda par, key: ObjectReader(par, key), id="reader"),
        pytest.param(lambda par, key: par.expires_at, id="expires_at"),
    ],
)
async def test_every_use_of_a_closed_par_is_refused(
    alice: KeyPair, use: Callable[[PAR, KeyPair], object]
) -> None:
    par = make_par(alice)
    await par.close(alice, control=InMemoryIssuer())
    with pytest.raises(PARClosedError, match=f"PAR {par.uid} was closed"):
        use(par, alice)


async def test_closing_twice_is_refused_without_asking_the_issuer(alice: KeyPair) -> None:
    issuer = InMemoryIssuer()
    par = make_par(alice)
    await par.close(alice, control=issuer)
    with pytest.raises(PARClosedError, match="already closed"):
        await par.close(alice)  # no control given: refused before one is looked for


async def test_a_refused_close_leaves_the_par_usable(alice: KeyPair) -> None:
    par = make_par(alice)
    with pytest.raises(WrongKeyError):
        await par.close(KeyPair.generate("mallory"), control=InMemoryIssuer())
    with pytest.raises(ConfigurationError, match="use_par_control"):
        await par.close(alice)
    assert not par.is_null()
    assert par.open(alice) == CAPABILITY


async def test_closing_a_null_par_is_refused(alice: KeyPair) -> None:
    with pytest.raises(NullPARError):
        await PAR().close(alice, control=InMemoryIssuer())
