"""The `command` calculation: runs a program the operator allow-listed, never an argv from the user.

The operator sets `PARJOBS_COMMANDS` to a JSON object mapping a command name to an argv template,
for example `{"wc": ["wc", "-l", "{input}"], "head": ["head", "-n", "{lines}", "{input}"]}`.
The worker fills `{input}` and `{output_dir}` with absolute paths; the user names a command and
gives a value for each other placeholder. Those values are simple tokens (letters, digits and
`._+-`, not starting with `-`): no path, no option, no whitespace. There is no shell, and each
template element stays exactly one argv element whatever the values.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from orchestrator.core.calculations import (
    Calculation,
    CalculationParams,
    Invocation,
    Price,
    invalid_parameters,
)
from orchestrator.errors import ConfigurationError

PATH_PLACEHOLDERS = frozenset({"input", "output_dir"})
"""Placeholders the worker fills; a user can never set them."""

_PLACEHOLDER = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")

CommandName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
PlaceholderName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")]
"""A user's value for a placeholder: cannot start an option (`-`), name a path or hold spaces."""


def _placeholders(element: str) -> list[str]:
    names = []
    for _, name, spec, conversion in string.Formatter().parse(element):
        if name is None:
            continue
        # Plain `{name}` only: `{a.b}`, `{a[0]}`, `{a!r}` and `{a:>9}` are refused outright.
        if not _PLACEHOLDER.match(name) or spec or conversion:
            raise ValueError(f"{element!r}: placeholders must be plain {{name}} in lower case")
        names.append(name)
    return names


def _check_template(argv: tuple[str, ...]) -> tuple[str, ...]:
    if not argv:
        raise ValueError("an argv template needs at least the program")
    if _placeholders(argv[0]):
        raise ValueError(f"the program {argv[0]!r} must be literal, not a placeholder")
    for element in argv[1:]:
        _placeholders(element)
    return argv


ArgvTemplate = Annotated[tuple[str, ...], AfterValidator(_check_template)]


def user_placeholders(template: Sequence[str]) -> frozenset[str]:
    """The placeholders of `template` the user must give values for."""
    names = frozenset(name for element in template for name in _placeholders(element))
    return names - PATH_PLACEHOLDERS


def render(template: Sequence[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """The argv: each element of `template` with its placeholders replaced (no str.format)."""
    argv = []
    for element in template:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(element):
            parts.append(literal)
            if name is not None:
                parts.append(values[name])
        argv.append("".join(parts))
    return tuple(argv)


class CommandSettings(BaseSettings):
    """The operator's allow-list (`PARJOBS_COMMANDS`, JSON: name -> argv template)."""

    model_config = SettingsConfigDict(env_prefix="PARJOBS_", extra="ignore", frozen=True)

    commands: dict[CommandName, ArgvTemplate] = Field(default_factory=dict)


class CommandParams(CalculationParams):
    command: CommandName
    args: dict[PlaceholderName, Token] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _allowed(self, info: ValidationInfo) -> CommandParams:
        # The allow-list is the worker's configuration, passed as validation context; without it
        # nothing is allowed (fail closed).
        commands = info.context.get("commands") if isinstance(info.context, dict) else None
        if not isinstance(commands, dict) or self.command not in commands:
            allowed = ", ".join(sorted(commands or {})) or "none are configured"
            raise ValueError(f"command {self.command!r} is not allowed; allowed: {allowed}")
        expected = user_placeholders(commands[self.command])
        if missing := expected - self.args.keys():
            raise ValueError(f"missing values for {', '.join(sorted(missing))}")
        if unexpected := self.args.keys() - expected:
            raise ValueError(
                f"{self.command!r} takes no {', '.join(sorted(unexpected))}"
                f" (it takes: {', '.join(sorted(expected)) or 'nothing'})"
            )
        return self


class Command(Calculation[CommandParams]):
    """Runs one of the operator's allow-listed commands."""

    name = "command"
    Params = CommandParams
    price = Price(fixed=Decimal("0.01"), per_cpu_second=Decimal("0.001"))
    summary = "run a command from the operator's allow-list (PARJOBS_COMMANDS)"

    def __init__(self, settings: CommandSettings | None = None) -> None:
        try:
            self.settings = settings if settings is not None else CommandSettings()
        except SettingsError:
            raise ConfigurationError("PARJOBS_COMMANDS is not valid JSON") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc'][1:]) or '(top level)'}: "
                f"{error['msg']}"
                for error in exc.errors(include_url=False)
            )
            raise ConfigurationError(
                f"PARJOBS_COMMANDS is not a valid allow-list: {problems}"
            ) from None

    def parse_params(self, raw: Mapping[str, object]) -> CommandParams:
        return CommandParams.model_validate(raw, context={"commands": self.settings.commands})

    def invocation(
        self, params: CommandParams, *, input_path: Path, output_dir: Path
    ) -> Invocation:
        # Check again: the params may have been validated against another worker's allow-list.
        try:
            checked = self.parse_params(params.model_dump())
        except ValidationError as exc:
            raise invalid_parameters(self.name, exc) from None
        values = {
            **checked.args,
            "input": str(input_path.absolute()),
            "output_dir": str(output_dir.absolute()),
        }
        return Invocation(argv=render(self.settings.commands[checked.command], values))
