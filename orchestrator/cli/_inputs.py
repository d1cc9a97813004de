"""The CLI's value types: each argument and option is checked, and converted, as it is parsed.

A parser here raises `typer.BadParameter`, which the CLI reports as one line naming the option
("error: Invalid value for '--max-spend': ..."), before the command's body runs and so before
anything connects. A value that travels on the wire is checked by its wire field's own rules, so
the CLI refuses exactly what the services would refuse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError

from orchestrator.cli._exit import reason
from orchestrator.core.keys import PublicKeys
from orchestrator.core.ledger_rules import account_kind, user_account
from orchestrator.errors import ParjobsError
from schemas.auth import Cheque
from schemas.events import JobRequest
from schemas.ledger import Note
from schemas.messages import GetJob, SubmitJob

T = TypeVar("T")

MAX_CHEQUE_LIFETIME_S = 366 * 24 * 3600  # a cheque pays for one job; a year is far past any job's


def _valid_unicode(text: str) -> str:
    # Argument bytes that are not UTF-8 arrive as lone surrogates: nothing can sign or send them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise typer.BadParameter(f"{text!r} is not valid UTF-8") from None
    return text


def checked(check: Callable[[str], T]) -> Callable[[object], T]:
    """A parser from `check`: its ValueError, or a parjobs refusal, is the value's error."""

    def parse(value: object) -> T:
        text = value if isinstance(value, str) else str(value)  # a default comes as it is typed
        try:
            return check(_valid_unicode(text))
        except (ValueError, ParjobsError) as exc:
            raise typer.BadParameter(str(exc)) from None

    return parse


def wire_field(model: type[BaseModel], field: str, what: str) -> Callable[[object], Any]:
    """A parser accepting what `model.field` accepts; otherwise it says `what` was expected."""
    adapter: TypeAdapter[Any] = TypeAdapter(model.model_fields[field].rebuild_annotation())

    def check(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise ValueError(f"{text!r} is not {what}: {reason(exc.errors()[0])}") from None

    return checked(check)


# --- JSON --------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large a number")
    return number


def strict_json(text: str) -> JsonValue:
    """`text` as JSON that can be signed and sent: no NaN or Infinity, no lone surrogates."""
    try:
        value: JsonValue = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the JSON holds a lone surrogate (\\ud800-\\udfff), not text") from None
    return value


def _kind_of(value: JsonValue) -> str:
    match value:
        case list():
            return "an array"
        case str():
            return "a string"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case _:
            return "null"


def _json_object(text: str) -> dict[str, JsonValue]:
    value = strict_json(text)
    if not isinstance(value, dict):
        raise ValueError(f'must be a JSON object such as {{"n": 3}}, not {_kind_of(value)}')
    return value


@dataclass(frozen=True)
class Parameter:
    """One `--param NAME=VALUE`: VALUE is JSON if it parses as JSON, else the string itself."""

    name: str
    value: JsonValue


def _parameter(text: str) -> Parameter:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise ValueError(f"{text!r} is not NAME=VALUE")
    try:
        return Parameter(name, strict_json(raw))  # numbers, booleans, lists...
    except ValueError:
        return Parameter(name, raw)  # ... anything else is a string


# --- files and names ------------------------------------------------------------------------------


def _new_key_path(text: str) -> Path:
    path = Path(text)
    for target in (path, path.with_name(f"{path.name}.pub")):
        if target.exists() or target.is_symlink():
            raise ValueError(f"{target} exists; choose another path")
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent} is not a directory")
    return path


def _account(text: str) -> str:
    account_kind(text)  # InvalidAccountError for what is no account name
    return text


# --- the parsers the commands use --------------------------------------------------------------

JOB_UID = wire_field(GetJob, "job_uid", "a job uid (32 hex digits)")
CALCULATION = wire_field(JobRequest, "calculation", "a calculation's name")
JOB_LIFETIME = wire_field(SubmitJob, "lifetime_s", "a job lifetime in seconds")
MAX_SPEND = wire_field(Cheque, "max_spend", "an amount of money above 0")
DEPOSIT = wire_field(Note, "amount", "an amount of money above 0")
REQUEST_FINGERPRINT = wire_field(Cheque, "resource", "a job request's fingerprint (64 hex digits)")
PARAMS_JSON = checked(_json_object)
PARAMETER = checked(_parameter)
ACCOUNT = checked(_account)
USER_ACCOUNT = checked(user_account)
PUBLIC_KEYS = checked(lambda text: PublicKeys.load(Path(text)))
NEW_KEY_PATH = checked(_new_key_path)
