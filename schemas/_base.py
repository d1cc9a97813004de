"""The base every wire model shares: immutable, and strict about unknown fields."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer


class WireModel(BaseModel):
    """A message or record that crosses a process boundary.

    Frozen so a validated value cannot drift; `extra="forbid"` so a typo or a field from a newer
    schema is an error rather than silently dropped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")


def _decode_b64(value: object) -> object:
    # Raw bytes pass through (Python callers); text must be strict standard base64 (the wire).
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not valid base64: {exc}") from exc
    return value


B64Bytes = Annotated[
    bytes,
    BeforeValidator(_decode_b64),
    PlainSerializer(lambda raw: base64.b64encode(raw).decode(), return_type=str, when_used="json"),
]
"""Bytes that travel as standard base64 text in JSON and stay raw bytes in Python."""
