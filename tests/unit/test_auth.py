"""Authorisations and cheques, pure: signing, the canonical encoding, and every refusal alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from pydantic import JsonValue, ValidationError

from orchestrator.core.keys import KeyPair
from orchestrator.core.signing import (
    check_authorisation,
    check_cheque,
    request_fingerprint,
    sign_authorisation,
    write_cheque,
)
from orchestrator.errors import (
    AuthorisationError,
    ChequeError,
    ChequePayerMismatchError,
    ExpiredChequeError,
    ForgedAuthorisationError,
    ForgedChequeError,
    InsufficientChequeError,
    MismatchedAuthorisationError,
    StaleAuthorisationError,
    WrongRecipientError,
    WrongResourceError,
)
from schemas.auth import AUTHORISATION_PURPOSE, CHEQUE_PURPOSE, Authorisation, Cheque
from schemas.events import JobRequest
from schemas.signing import canonical_bytes

ALICE = KeyPair.generate("alice")
MALLORY = KeyPair.generate("mallory")
NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
WINDOW = timedelta(minutes=5)
REQUEST = JobRequest(
    calculation="checksum",
    parameters={"algorithm": "sha256", "chunks": [1, 2.5, None], "label": "naïve ✓"},
    input_sha256="ab" * 32,
)
RESOURCE = request_fingerprint(REQUEST)
PRICE = Decimal("1.250000")

Signed = TypeVar("Signed", Authorisation, Cheque)


def authorise(key: KeyPair = ALICE, request: JobRequest = REQUEST) -> Authorisation:
    return sign_authorisation(key, request, now=NOW)


def cheque(key: KeyPair = ALICE, **changes: Any) -> Cheque:
    terms: dict[str, Any] = {
        "payer": "alice",
        "recipient": "access",
        "max_spend": Decimal("2.5"),
        "resource": RESOURCE,
        "lifetime": timedelta(hours=1),
        "now": NOW,
    }
    return write_cheque(key, **(terms | changes))


def check_auth(auth: Authorisation, request: JobRequest = REQUEST, **overrides: Any) -> None:
    arguments: dict[str, Any] = {"now": NOW, "window": WINDOW} | overrides
    check_authorisation(auth, request, ALICE.public, **arguments)


def check(signed: Cheque, **overrides: Any) -> None:
    arguments: dict[str, Any] = {
        "payer_key": ALICE.public,
        "job_owner": "alice",
        "recipient": "access",
        "resource": RESOURCE,
        "price": PRICE,
        "now": NOW,
    } | overrides
    check_cheque(signed, **arguments)


def tampered(message: Signed, **changes: Any) -> Signed:
    """`message` as it would arrive with fields changed on the wire and the signature kept."""
    return type(message).model_validate(message.model_dump() | changes)


def resigned(message: Signed, signature: bytes) -> Signed:
    return type(message).model_validate(message.model_dump() | {"signature": signature})


def shuffled_json(message: Authorisation | Cheque, **changes: Any) -> str:
    """The message's JSON with its fields in reverse order, pretty-printed."""
    data = json.loads(message.model_dump_json()) | changes
    return json.dumps(dict(reversed(list(data.items()))), indent=4)


# --- the canonical encoding ---------------------------------------------------------------------


def test_canonical_bytes_are_sorted_compact_utf8_json() -> None:
    request = JobRequest(calculation="é", parameters={"b": 1, "a": [1.5, None, "✓"]})
    assert (
        canonical_bytes(request)
        == (
            '{"calculation":"é","input_sha256":null,"parameters":{"a":[1.5,null,"✓"],"b":1}}'
        ).encode()
    )


def test_canonical_bytes_ignore_field_order_and_whitespace() -> None:
    text = '{ "parameters": {"z": [2, 1], "a": {"y": 1, "x": 2}},\n  "calculation": "sum" }'
    reordered = JobRequest.model_validate_json(text)
    direct = JobRequest(calculation="sum", parameters={"a": {"x": 2, "y": 1}, "z": [2, 1]})
    assert canonical_bytes(reordered) == canonical_bytes(direct)
    assert request_fingerprint(reordered) == request_fingerprint(direct)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (float("nan"), "nan is not representable"),
        (float("inf"), "inf is not representable"),
        (2**53, "exceeds safe integer domain"),
        ([-(2**53)], "exceeds safe integer domain"),
        ({"nested": "\udead"}, "non-UTF-8"),
    ],
)
def test_a_request_without_a_canonical_form_is_refused_as_it_is_read(
    value: JsonValue, why: str
) -> None:
    # It could be neither signed nor fingerprinted: refused before anyone tries.
    with pytest.raises(ValidationError, match=why):
        JobRequest(calculation="sum", parameters={"x": value})
    with pytest.raises(ValueError, match=why):
        canonical_bytes(JobRequest.model_construct(calculation="sum", parameters={"x": value}))


def test_the_safe_integer_edges_are_accepted() -> None:
    edges = JobRequest(calculation="sum", parameters={"x": [2**53 - 1, -(2**53 - 1)]})
    assert b'"x":[9007199254740991,-9007199254740991]' in canonical_bytes(edges)


def test_request_fingerprint_covers_the_inputs_digest_and_every_parameter() -> None:
    fingerprints = {
        RESOURCE,
        request_fingerprint(REQUEST.model_copy(update={"input_sha256": "cd" * 32})),
        request_fingerprint(REQUEST.model_copy(update={"input_sha256": None})),
        request_fingerprint(REQUEST.model_copy(update={"parameters": {"algorithm": "md5"}})),
        request_fingerprint(REQUEST.model_copy(update={"calculation": "csv-summary"})),
    }
    assert len(fingerprints) == 5


def test_signed_bytes_are_the_purpose_tag_then_the_canonical_fields_but_the_signature() -> None:
    auth = authorise()
    assert auth.signed_bytes() == (
        b"parjobs-authorisation-v1\x00"
        + json.dumps(
            {
                "nonce": auth.nonce,
                "request_fingerprint": RESOURCE,
                "schema_version": 1,
                "timestamp": "2030-01-02T03:04:05.678901Z",
                "user": ALICE.fingerprint,
            },
            separators=(",", ":"),
        ).encode()
    )
    signed = cheque()
    assert signed.signed_bytes().startswith(CHEQUE_PURPOSE + b"\x00{")
    assert b'"max_spend":"2.500000"' in signed.signed_bytes()
    assert b"signature" not in signed.signed_bytes()


# --- authorisations -----------------------------------------------------------------------------


def test_an_authorisation_survives_the_wire_and_is_accepted() -> None:
    auth = authorise()
    assert auth.user == ALICE.fingerprint
    assert auth.request_fingerprint == RESOURCE
    received = Authorisation.model_validate_json(shuffled_json(auth))
    assert received == auth
    check_auth(received)


def test_a_timestamp_written_in_another_zone_still_verifies() -> None:
    auth = authorise()
    elsewhere = shuffled_json(auth, timestamp="2030-01-02T05:04:05.678901+02:00")
    check_auth(Authorisation.model_validate_json(elsewhere))


def test_each_authorisation_has_a_fresh_nonce() -> None:
    assert len({authorise().nonce for _ in range(20)}) == 20


def test_an_authorisation_signed_by_another_key_is_forged() -> None:
    # Mallory signs an authorisation that names Alice: her key does not verify it.
    draft = authorise()
    forged = tampered(resigned(draft, MALLORY.sign(draft.signed_bytes())), user=ALICE.fingerprint)
    with pytest.raises(ForgedAuthorisationError, match="does not verify"):
        check_auth(forged)


def test_an_authorisation_naming_another_user_is_forged() -> None:
    # Valid as Mallory's, but submitted as if it were Alice's.
    with pytest.raises(ForgedAuthorisationError, match="names user"):
        check_auth(authorise(MALLORY))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("user", MALLORY.fingerprint, id="user-mallory"),
        ("request_fingerprint", "0" * 64),
        ("timestamp", NOW + timedelta(seconds=1)),
        ("timestamp", NOW + timedelta(microseconds=1)),
        ("nonce", "0" * 32),
        ("signature", b"\x00" * 64),
    ],
)
def test_tampering_any_field_of_an_authorisation_is_refused(field: str, value: object) -> None:
    with pytest.raises(ForgedAuthorisationError):
        check_auth(tampered(authorise(), **{field: value}))


def test_a_flipped_signature_bit_is_refused() -> None:
    auth = authorise()
    flipped = bytes([auth.signature[0] ^ 1]) + auth.signature[1:]
    with pytest.raises(ForgedAuthorisationError):
        check_auth(resigned(auth, flipped))


@pytest.mark.parametrize(("sign", "direction"), [(-1, "behind"), (1, "ahead of")])
def test_an_authorisation_outside_the_window_is_stale(sign: int, direction: str) -> None:
    offset = sign * (WINDOW + timedelta(seconds=90))  # the timestamp minus the service's now
    with pytest.raises(StaleAuthorisationError, match=f"390 s {direction}") as refused:
        check_auth(authorise(), now=NOW - offset)
    assert refused.value.offset == offset
    assert refused.value.window == WINDOW


@pytest.mark.parametrize("sign", [-1, 1])
def test_the_window_edge_is_accepted_and_one_microsecond_past_it_refused(sign: int) -> None:
    check_auth(authorise(), now=NOW + sign * WINDOW)
    with pytest.raises(StaleAuthorisationError):
        check_auth(authorise(), now=NOW + sign * (WINDOW + timedelta(microseconds=1)))


def test_an_authorisation_for_another_request_is_mismatched() -> None:
    other = JobRequest(calculation="sleep", parameters={"seconds": 1})
    with pytest.raises(MismatchedAuthorisationError, match="signed for request"):
        check_auth(authorise(), other)


def test_an_authorisation_for_other_input_content_is_mismatched() -> None:
    other_input = REQUEST.model_copy(update={"input_sha256": "cd" * 32})
    with pytest.raises(MismatchedAuthorisationError):
        check_auth(authorise(), other_input)


def test_a_negative_window_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="window"):
        check_auth(authorise(), window=timedelta(seconds=-1))


def test_authorisation_refusals_share_one_base() -> None:
    for refusal in (
        ForgedAuthorisationError,
        StaleAuthorisationError,
        MismatchedAuthorisationError,
    ):
        assert issubclass(refusal, AuthorisationError)


# --- cheques ------------------------------------------------------------------------------------


def test_a_cheque_survives_the_wire_and_is_accepted() -> None:
    signed = cheque()
    assert signed.payer_key == ALICE.fingerprint
    assert signed.max_spend == Decimal("2.5")
    assert signed.expires_at == NOW + timedelta(hours=1)
    received = Cheque.model_validate_json(shuffled_json(signed, max_spend="2.5"))
    assert received == signed
    check(received)


@pytest.mark.parametrize("price", [Decimal(0), Decimal("2.5"), Decimal("2.500000")])
def test_a_price_up_to_the_maximum_spend_is_accepted(price: Decimal) -> None:
    check(cheque(), price=price)


def test_a_cheque_signed_by_another_key_is_forged() -> None:
    draft = cheque()
    with pytest.raises(ForgedChequeError, match="does not verify"):
        check(resigned(draft, MALLORY.sign(draft.signed_bytes())))


def test_a_cheque_from_another_payers_key_is_forged() -> None:
    # Mallory's own, valid cheque, naming Alice's account as payer.
    with pytest.raises(ForgedChequeError):
        check(cheque(MALLORY))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cheque_id", "0" * 32),
        ("payer", "bob"),
        pytest.param("payer_key", MALLORY.fingerprint, id="payer_key-mallory"),
        ("recipient", "storage"),
        ("max_spend", Decimal("2500")),
        ("max_spend", Decimal("2.500001")),
        ("resource", "0" * 64),
        ("expires_at", NOW + timedelta(days=365)),
        ("signature", b"\x00" * 64),
    ],
)
def test_tampering_any_field_of_a_cheque_is_refused(field: str, value: object) -> None:
    with pytest.raises(ForgedChequeError):
        check(tampered(cheque(), **{field: value}))


def test_a_cheque_pays_only_for_its_payers_own_job() -> None:
    # Mallory's own, valid cheque for this very request, offered with a job Alice authorised.
    bobs = cheque(MALLORY, payer="mallory")
    check(bobs, payer_key=MALLORY.public, job_owner="mallory")
    with pytest.raises(
        ChequePayerMismatchError, match=r"written by 'mallory'.*authorised by 'alice'"
    ):
        check(bobs, payer_key=MALLORY.public, job_owner="alice")


def test_a_cheque_payable_to_another_account_is_refused() -> None:
    with pytest.raises(WrongRecipientError, match="'storage'"):
        check(cheque(recipient="storage"))


def test_a_cheque_for_another_resource_is_refused() -> None:
    other = request_fingerprint(JobRequest(calculation="sleep"))
    with pytest.raises(WrongResourceError, match="pays for request"):
        check(cheque(resource=other))


def test_a_cheque_is_refused_from_the_instant_it_expires() -> None:
    signed = cheque()
    check(signed, now=signed.expires_at - timedelta(microseconds=1))
    with pytest.raises(ExpiredChequeError, match="expired at"):
        check(signed, now=signed.expires_at)


def test_a_price_over_the_maximum_spend_is_refused_naming_both() -> None:
    price = Decimal("2.500001")
    with pytest.raises(InsufficientChequeError, match=r"2\.500001.*2\.500000") as refused:
        check(cheque(), price=price)
    assert refused.value.price == price
    assert refused.value.limit == Decimal("2.5")


@pytest.mark.parametrize("price", [Decimal(-1), Decimal("NaN"), Decimal("Infinity")])
def test_a_price_that_is_no_price_is_a_programming_error(price: Decimal) -> None:
    with pytest.raises(ValueError, match="price"):
        check(cheque(), price=price)


def test_a_cheque_needs_a_positive_lifetime() -> None:
    with pytest.raises(ValueError, match="lifetime"):
        cheque(lifetime=timedelta(0))


@pytest.mark.parametrize("amount", ["0", "-1", "1.5e30", "NaN", 2.5])
def test_a_cheque_needs_a_positive_exact_amount(amount: object) -> None:
    with pytest.raises(ValidationError, match="max_spend"):
        tampered(cheque(), max_spend=amount)


def test_cheque_refusals_share_one_base() -> None:
    for refusal in (
        ForgedChequeError,
        ChequePayerMismatchError,
        WrongRecipientError,
        WrongResourceError,
        ExpiredChequeError,
        InsufficientChequeError,
    ):
        assert issubclass(refusal, ChequeError)


# --- signatures cannot change purpose -----------------------------------------------------------


def test_an_authorisations_signature_moved_onto_a_cheque_is_refused() -> None:
    with pytest.raises(ForgedChequeError):
        check(resigned(cheque(), authorise().signature))


def test_a_cheques_signature_moved_onto_an_authorisation_is_refused() -> None:
    with pytest.raises(ForgedAuthorisationError):
        check_auth(resigned(authorise(), cheque().signature))


def test_the_same_fields_signed_for_the_other_purpose_do_not_verify() -> None:
    # Even a signature over these very fields is refused if it was made for the other purpose:
    # the tag, not the fields, says what was signed.
    signed, auth = cheque(), authorise()
    cheque_fields = canonical_bytes(signed, exclude={"signature"})
    auth_fields = canonical_bytes(auth, exclude={"signature"})
    with pytest.raises(ForgedChequeError):
        check(resigned(signed, ALICE.sign(AUTHORISATION_PURPOSE + b"\x00" + cheque_fields)))
    with pytest.raises(ForgedChequeError):
        check(resigned(signed, ALICE.sign(cheque_fields)))
    with pytest.raises(ForgedAuthorisationError):
        check_auth(resigned(auth, ALICE.sign(CHEQUE_PURPOSE + b"\x00" + auth_fields)))
    with pytest.raises(ForgedAuthorisationError):
        check_auth(resigned(auth, ALICE.sign(auth_fields)))
