"""Signed messages, pure: the bytes signed, and every refusal alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from orchestrator.core.keys import KeyPair
from orchestrator.core.message_signing import message_bytes, sign_message, verify_message
from orchestrator.errors import (
    ForgedSignatureError,
    SignatureError,
    StaleSignatureError,
    UnknownSignerError,
    UnsignedError,
)
from schemas.messages import GetJob, SubmitJob
from schemas.signing import MessageSignature, canonical_json
from tests.unit.test_auth import REQUEST, authorise, cheque

ALICE = KeyPair.generate("alice")
MALLORY = KeyPair.generate("mallory")
ACCESS = KeyPair.generate("access")
STORAGE = KeyPair.generate("storage")
NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
WINDOW = timedelta(minutes=5)
MESSAGE_ID = "0123456789abcdef0123456789abcdef"
BODY = GetJob(job_uid="fe" * 16, with_events=True)


def signed(
    key: KeyPair = ALICE, signer: str | None = None, body: GetJob = BODY
) -> MessageSignature:
    return sign_message(
        key, signer or key.fingerprint, message_id=MESSAGE_ID, sent_at=NOW, body=body
    )


def verify(signature: MessageSignature | None, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "message_id": MESSAGE_ID,
        "sent_at": NOW,
        "body": BODY,
        "keys": [ALICE.public],
        "now": NOW,
        "window": WINDOW,
    } | overrides
    return verify_message(signature, **arguments)


def test_a_users_message_verifies_as_that_user() -> None:
    assert verify(signed()) == ALICE.fingerprint


def test_a_services_reply_verifies_as_its_role() -> None:
    assert verify(signed(ACCESS, "access"), keys=[ACCESS.public]) == "access"


def test_an_older_key_of_the_role_still_verifies() -> None:
    rotated = [KeyPair.generate("access-2031").public, ACCESS.public]
    assert verify(signed(ACCESS, "access"), keys=rotated) == "access"


def test_the_signed_bytes_are_the_tag_and_the_rfc8785_json_of_five_fields() -> None:
    signature = signed()
    expected_json = (
        '{"body":{"job_uid":"' + "fe" * 16 + '","type":"get_job",'
        '"with_events":true,"with_progress":false},'
        f'"message_id":"{MESSAGE_ID}","nonce":"{signature.nonce}",'
        f'"sent_at":"2030-01-02T03:04:05.678901Z","signer":"{ALICE.fingerprint}"}}'
    )
    data = message_bytes(
        message_id=MESSAGE_ID,
        sent_at=NOW,
        nonce=signature.nonce,
        signer=ALICE.fingerprint,
        body=BODY,
    )
    assert data == b"parjobs-message-v1\x00" + expected_json.encode()
    assert ALICE.public.verify(signature.signature, data)


def test_a_message_survives_the_wire() -> None:
    # Reordered, pretty-printed JSON and a time written in another zone still verify.
    signature = MessageSignature.model_validate_json(
        json.dumps(dict(reversed(json.loads(signed().model_dump_json()).items())), indent=3)
    )
    body = GetJob.model_validate_json('{"with_events": true, "job_uid": "' + "fe" * 16 + '"}')
    elsewhere = NOW.astimezone(timezone(timedelta(hours=-7)))
    assert verify(signature, body=body, sent_at=elsewhere) == ALICE.fingerprint


def test_a_body_with_money_and_parameters_verifies_after_travelling() -> None:
    body = SubmitJob(request=REQUEST, authorisation=authorise(), cheque=cheque())
    signature = sign_message(
        ALICE, ALICE.fingerprint, message_id=MESSAGE_ID, sent_at=NOW, body=body
    )
    received = SubmitJob.model_validate_json(body.model_dump_json())
    assert verify(signature, body=received) == ALICE.fingerprint


def test_each_signature_has_a_fresh_nonce() -> None:
    assert len({signed().nonce for _ in range(20)}) == 20


@pytest.mark.parametrize(
    "overrides",
    [
        {"message_id": "f" * 32},
        {"sent_at": NOW + timedelta(microseconds=1)},
        {"body": GetJob(job_uid="fe" * 16)},
        {"body": GetJob(job_uid="ef" * 16, with_events=True)},
    ],
)
def test_changing_what_the_envelope_says_is_forgery(overrides: dict[str, Any]) -> None:
    with pytest.raises(ForgedSignatureError, match="does not verify"):
        verify(signed(), **overrides)


@pytest.mark.parametrize(
    "changes", [{"nonce": "0" * 32}, {"signature": b"\x00" * 64}, {"signer": "storage"}]
)
def test_changing_the_signature_block_is_forgery(changes: dict[str, Any]) -> None:
    tampered = signed(ACCESS, "access").model_copy(update=changes)
    with pytest.raises(ForgedSignatureError):
        verify(tampered, keys=[ACCESS.public, STORAGE.public])


def test_a_role_name_does_not_lend_its_authority() -> None:
    # Mallory signs as "access": the configured access key does not verify her signature.
    with pytest.raises(ForgedSignatureError, match="key of access"):
        verify(signed(MALLORY, "access"), keys=[ACCESS.public])


def test_a_user_cannot_sign_as_another_user() -> None:
    forged = signed(MALLORY).model_copy(update={"signer": ALICE.fingerprint})
    with pytest.raises(ForgedSignatureError):
        verify(forged, keys=[ALICE.public, MALLORY.public])
    with pytest.raises(ValueError, match="fingerprint"):
        sign_message(MALLORY, ALICE.fingerprint, message_id=MESSAGE_ID, sent_at=NOW, body=BODY)


def test_a_key_not_of_the_named_user_is_not_used() -> None:
    # Even if a caller looked up the wrong key, it is not the named user's, so it proves nothing.
    with pytest.raises(ForgedSignatureError):
        verify(signed(), keys=[MALLORY.public])


def test_a_signature_moved_to_another_message_is_forgery() -> None:
    other = signed(body=GetJob(job_uid="ab" * 16))
    with pytest.raises(ForgedSignatureError):
        verify(other)


def test_a_signature_without_the_purpose_tag_is_forgery() -> None:
    nonce = "1" * 32
    fields = message_bytes(
        message_id=MESSAGE_ID, sent_at=NOW, nonce=nonce, signer=ALICE.fingerprint, body=BODY
    ).split(b"\x00", 1)[1]
    untagged = MessageSignature(signer=ALICE.fingerprint, nonce=nonce, signature=ALICE.sign(fields))
    with pytest.raises(ForgedSignatureError):
        verify(untagged)
    assert fields == canonical_json(json.loads(fields))


def test_an_unknown_signer_is_named() -> None:
    with pytest.raises(UnknownSignerError, match="signed by storage, who has no key here"):
        verify(signed(STORAGE, "storage"), keys=())
    with pytest.raises(UnknownSignerError, match=f"user {ALICE.fingerprint[:16]}"):
        verify(signed(), keys=[])


def test_an_unsigned_message_is_refused() -> None:
    with pytest.raises(UnsignedError, match="not signed"):
        verify(None)


@pytest.mark.parametrize(("sign", "direction"), [(-1, "behind"), (1, "ahead of")])
def test_a_message_outside_the_window_is_stale(sign: int, direction: str) -> None:
    offset = sign * (WINDOW + timedelta(seconds=90))  # the signed time minus the receiver's now
    with pytest.raises(StaleSignatureError, match=f"390 s {direction}") as refused:
        verify(signed(), now=NOW - offset)
    assert refused.value.offset == offset
    assert refused.value.window == WINDOW


@pytest.mark.parametrize("sign", [-1, 1])
def test_the_window_edge_is_accepted_and_one_microsecond_past_it_refused(sign: int) -> None:
    verify(signed(), now=NOW + sign * WINDOW)
    with pytest.raises(StaleSignatureError):
        verify(signed(), now=NOW + sign * (WINDOW + timedelta(microseconds=1)))


def test_a_forgery_is_named_forged_even_when_it_is_also_stale() -> None:
    with pytest.raises(ForgedSignatureError):
        verify(signed(MALLORY, "access"), keys=[ACCESS.public], now=NOW + timedelta(days=1))


def test_a_negative_window_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="window"):
        verify(signed(), window=timedelta(seconds=-1))


def test_signature_refusals_share_one_base() -> None:
    for refusal in (UnsignedError, ForgedSignatureError, StaleSignatureError, UnknownSignerError):
        assert issubclass(refusal, SignatureError)
