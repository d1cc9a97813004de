"""Message bodies: pydantic models to JSON bytes and back, with a classified refusal."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError

from orchestrator.errors import InvalidMessageError

if TYPE_CHECKING:
    from pydantic import BaseModel, TypeAdapter

T = TypeVar("T")

CONTENT_TYPE = "application/json"
_MAX_ERRORS = 5


def encode(message: BaseModel) -> bytes:
    """The JSON body of `message`."""
    return message.model_dump_json().encode()


def decode(adapter: TypeAdapter[T], body: bytes) -> T:
    """`body` validated against `adapter`, or InvalidMessageError coded undecodable (not JSON),
    unknown-type (a discriminated union found no member for the tag) or invalid."""
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        kinds = {error["type"] for error in errors}
        if "json_invalid" in kinds:
            code = "undecodable"
        elif "union_tag_invalid" in kinds or "union_tag_not_found" in kinds:
            code = "unknown-type"
        else:
            code = "invalid"
        details = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<body>'}: {error['msg']}"
            for error in errors[:_MAX_ERRORS]
        )
        more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
        raise InvalidMessageError(
            f"{code} message: {details}{more}", dead_letter_reason=code
        ) from exc
