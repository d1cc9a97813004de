"""Pure PAR rules: legal combinations, safe keys, expiry arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestrator import InvalidPARError, ObjectKeyError, PARKind
from orchestrator.core.par_rules import (
    check_combination,
    join_key,
    seconds_remaining,
    validate_key,
    validate_prefix,
)


@pytest.mark.parametrize(
    "key",
    ["input", "jobs/1/input", "a b/ü.txt", "x" * 1024, "dots..in.name", ".hidden"],
)
def test_safe_keys_are_accepted(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "non-empty"),
        ("/etc/passwd", "absolute"),
        ("../secret", r"'\.\.'"),
        ("a/../../b", r"'\.\.'"),
        ("a/./b", r"'\.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("a\\..\\b", "backslash"),
        ("a\x00b", "control"),
        ("x" * 1025, "1024"),
        ("é" * 513, "1024"),
    ],
)
def test_unsafe_keys_are_refused_with_reason(key: str, reason: str) -> None:
    with pytest.raises(ObjectKeyError, match=reason):
        validate_key(key)


def test_prefix_must_end_with_slash_and_be_safe() -> None:
    assert validate_prefix("jobs/1/output/") == "jobs/1/output/"
    with pytest.raises(ObjectKeyError, match="end with"):
        validate_prefix("jobs/1/output")
    with pytest.raises(ObjectKeyError):
        validate_prefix("../output/")


def test_join_key_keeps_keys_inside_their_prefix() -> None:
    assert join_key("out/", "a/b.txt") == "out/a/b.txt"
    with pytest.raises(ObjectKeyError):
        join_key("out/", "../elsewhere")
    with pytest.raises(ObjectKeyError, match="once joined"):
        join_key("p" * 1000 + "/", "k" * 100)


LEGAL = [
    (PARKind.OBJECT, (True, False, False), {"key": "k"}),
    (PARKind.OBJECT, (False, True, False), {"key": "k"}),
    (PARKind.OBJECT, (True, True, False), {"key": "k"}),
    (PARKind.BUCKET, (False, True, False), {"prefix": "p/"}),
    (PARKind.BUCKET, (True, False, False), {"prefix": "p/"}),
    (PARKind.CALCULATION, (False, False, True), {"resource": "job"}),
]


@pytest.mark.parametrize(("kind", "perms", "target"), LEGAL)
def test_legal_combinations(
    kind: PARKind, perms: tuple[bool, bool, bool], target: dict[str, str]
) -> None:
    r, w, x = perms
    check_combination(
        kind,
        readable=r,
        writeable=w,
        executable=x,
        key=target.get("key"),
        prefix=target.get("prefix"),
        resource=target.get("resource"),
    )


@pytest.mark.parametrize(
    ("kind", "perms", "target", "reason"),
    [
        (PARKind.OBJECT, (False, False, False), {"key": "k"}, "never execute"),
        (PARKind.OBJECT, (True, False, True), {"key": "k"}, "never execute"),
        (PARKind.OBJECT, (True, False, False), {}, "needs a key"),
        (PARKind.OBJECT, (True, False, False), {"key": "../k"}, r"'\.\.'"),
        (PARKind.BUCKET, (True, True, False), {"prefix": "p/"}, "never both"),
        (PARKind.BUCKET, (False, False, True), {"prefix": "p/"}, "never both"),
        (PARKind.BUCKET, (False, True, False), {"key": "k"}, "needs a prefix"),
        (PARKind.CALCULATION, (True, False, True), {"resource": "j"}, "execute only"),
        (PARKind.CALCULATION, (False, False, True), {"key": "k"}, "needs a resource"),
    ],
)
def test_illegal_combinations_are_refused(
    kind: PARKind, perms: tuple[bool, bool, bool], target: dict[str, str], reason: str
) -> None:
    r, w, x = perms
    with pytest.raises((InvalidPARError, ObjectKeyError), match=reason):
        check_combination(
            kind,
            readable=r,
            writeable=w,
            executable=x,
            key=target.get("key"),
            prefix=target.get("prefix"),
            resource=target.get("resource"),
        )


def test_seconds_remaining_subtracts_buffer_and_floors_at_zero() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert seconds_remaining(now + timedelta(seconds=100), now) == pytest.approx(70.0)
    assert seconds_remaining(now + timedelta(seconds=100), now, buffer=0) == pytest.approx(100.0)
    assert seconds_remaining(now + timedelta(seconds=10), now) == 0.0
    assert seconds_remaining(now - timedelta(days=1), now, buffer=0) == 0.0
    assert isinstance(seconds_remaining(now, now), float)
