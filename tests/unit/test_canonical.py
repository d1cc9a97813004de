"""The canonical encoding is RFC 8785: the RFC's own examples, byte for byte."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pydantic import JsonValue

from orchestrator.core.signing import request_fingerprint
from schemas.events import JobRequest
from schemas.ledger import Money
from schemas.signing import UtcDatetime, canonical_bytes, canonical_json
from schemas.signing import signed_bytes as tagged


def test_the_rfcs_serialisation_example() -> None:
    # RFC 8785, section 3.2.2: numbers, escapes and literals, as another implementation reads them.
    text = r"""{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"""
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    assert canonical_json(json.loads(text)) == expected


def test_the_rfcs_sorting_example() -> None:
    # RFC 8785, section 3.2.3: members sort by UTF-16 code units, so the emoji (a surrogate
    # pair, 0xD83D...) sorts before U+FB33 although its code point is larger.
    text = r"""{
      "\u20ac": "Euro Sign",
      "\r": "Carriage Return",
      "\ufb33": "Hebrew Letter Dalet With Dagesh",
      "1": "One",
      "\ud83d\ude00": "Emoji: Grinning Face",
      "\u0080": "Control",
      "\u00f6": "Latin Small Letter O With Diaeresis"
    }"""
    expected = (
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
        '"ö":"Latin Small Letter O With Diaeresis","€":"Euro Sign",'
        '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    ).encode()
    assert canonical_json(json.loads(text)) == expected


@pytest.mark.parametrize(
    ("ieee_hex", "expected"),
    [
        # RFC 8785, appendix B: IEEE 754 doubles (big-endian hex) and their canonical text.
        ("0000000000000000", "0"),
        ("8000000000000000", "0"),
        ("0000000000000001", "5e-324"),
        ("8000000000000001", "-5e-324"),
        ("7fefffffffffffff", "1.7976931348623157e+308"),
        ("ffefffffffffffff", "-1.7976931348623157e+308"),
        ("4340000000000000", "9007199254740992"),
        ("c340000000000000", "-9007199254740992"),
        ("4430000000000000", "295147905179352830000"),
        ("44b52d02c7e14af5", "9.999999999999997e+22"),
        ("44b52d02c7e14af6", "1e+23"),
        ("44b52d02c7e14af7", "1.0000000000000001e+23"),
        ("444b1ae4d6e2ef4e", "999999999999999700000"),
        ("444b1ae4d6e2ef4f", "999999999999999900000"),
        ("444b1ae4d6e2ef50", "1e+21"),
        ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
        ("3eb0c6f7a0b5ed8d", "0.000001"),
        ("41b3de4355555553", "333333333.3333332"),
        ("41b3de4355555554", "333333333.33333325"),
        ("41b3de4355555555", "333333333.3333333"),
        ("41b3de4355555556", "333333333.3333334"),
        ("41b3de4355555557", "333333333.33333343"),
        ("becbf647612f3696", "-0.0000033333333333333333"),
        ("43143ff3c1cb0959", "1424953923781206.2"),
    ],
)
def test_the_rfcs_number_samples(ieee_hex: str, expected: str) -> None:
    (number,) = struct.unpack(">d", bytes.fromhex(ieee_hex))
    assert canonical_json(number) == expected.encode()


@pytest.mark.parametrize("ieee_hex", ["7fffffffffffffff", "7ff0000000000000"])
def test_the_rfcs_numbers_without_a_form_are_refused(ieee_hex: str) -> None:
    # Appendix B's NaN and Infinity: I-JSON has no way to write them.
    (number,) = struct.unpack(">d", bytes.fromhex(ieee_hex))
    with pytest.raises(ValueError, match="not representable"):
        canonical_json(number)


def test_a_model_encodes_as_its_json_dump_money_and_times_as_strings() -> None:
    class Priced(JobRequest):
        amount: Money
        due: UtcDatetime

    request = Priced(
        calculation="é",
        parameters={"b": 1, "a": [1.5, None, "✓"]},
        amount=Decimal("2.5"),
        due=datetime(2030, 1, 2, 5, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2))),
    )
    expected = (
        '{"amount":"2.500000","calculation":"é","due":"2030-01-02T03:04:05.678901Z",'
        '"input_sha256":null,"parameters":{"a":[1.5,null,"✓"],"b":1}}'
    )
    assert canonical_bytes(request) == expected.encode()
    assert canonical_bytes(request, exclude={"amount", "due", "parameters"}) == (
        b'{"calculation":"\xc3\xa9","input_sha256":null}'
    )


@pytest.mark.parametrize(
    ("parameters", "same_as"),
    [
        ({"x": 1.0}, {"x": 1}),  # one JSON number, whatever the language calls it
        ({"x": 1e21}, {"x": 1000000000000000000000.0}),
    ],
)
def test_equal_json_numbers_give_one_fingerprint(
    parameters: dict[str, JsonValue], same_as: dict[str, JsonValue]
) -> None:
    one = JobRequest(calculation="sum", parameters=parameters)
    other = JobRequest(calculation="sum", parameters=same_as)
    assert request_fingerprint(one) == request_fingerprint(other)


def test_signed_bytes_are_the_tag_a_nul_and_the_canonical_json() -> None:
    assert tagged(b"parjobs-x-v1", canonical_json({"b": [], "a": {}})) == (
        b'parjobs-x-v1\x00{"a":{},"b":[]}'
    )
