"""What a calculation is, and the registry that finds them through the `parjobs.calculations` group.

A calculation only *describes* a run: it validates its parameters and turns them into an argv. The
code that does the work runs in a child process started by `run_calculation`, never in the worker.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from decimal import Decimal
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import (
    CalculationLoadError,
    DuplicateCalculationError,
    InvalidParametersError,
    UnknownCalculationError,
)
from schemas._base import WireModel

ENTRY_POINT_GROUP = "parjobs.calculations"
"""Distributions add calculations here: `name = "package.module:CalculationSubclass"` (the
registry instantiates a class with no arguments; an entry point may also name an instance)."""

_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}\Z")


class Price(WireModel):
    """What one run costs: a fixed part plus a part per CPU-second the child used."""

    fixed: Decimal = Field(default=Decimal(0), ge=0)
    per_cpu_second: Decimal = Field(default=Decimal(0), ge=0)

    def cost(self, cpu_seconds: float | Decimal) -> Decimal:
        """The exact cost of a run that used `cpu_seconds` (rounding is the ledger's business)."""
        # str() first: Decimal(0.1) would carry the binary float's error into the money.
        return self.fixed + self.per_cpu_second * Decimal(str(cpu_seconds))


class CalculationParams(BaseModel):
    """A convenient base for parameter models: frozen, and unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Invocation(BaseModel):
    """How to run a calculation: the child's argv, the files it promises, extra environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    argv: tuple[str, ...] = Field(min_length=1)
    outputs: tuple[str, ...] = ()
    """File names (relative to the output directory) the calculation declares it writes."""
    env: dict[str, str] = Field(default_factory=dict)
    """Added to the child's clean environment (for example a PYTHONPATH the child needs)."""


P = TypeVar("P", bound=BaseModel)


class Calculation(ABC, Generic[P]):
    """A named calculation. Subclasses set the class attributes and implement `invocation`.

    `Params` must forbid extra fields, so a misspelt parameter is an error rather than ignored.
    Entry points name the subclass; the registry instantiates it with no arguments.
    """

    name: str
    Params: type[P]
    price: Price
    summary: str = ""
    """One line for listings."""

    def parse_params(self, raw: Mapping[str, object]) -> P:
        """Validate raw parameters (raises pydantic's ValidationError)."""
        return self.Params.model_validate(raw)

    @abstractmethod
    def invocation(self, params: P, *, input_path: Path, output_dir: Path) -> Invocation:
        """The argv that runs this calculation on `input_path`, writing into `output_dir`."""


class CalculationRegistry:
    """The calculations a worker can run, by name."""

    def __init__(self) -> None:
        self._calculations: dict[str, Calculation[Any]] = {}
        self._sources: dict[str, str] = {}

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> CalculationRegistry:
        """Every calculation installed in `group`: the built-ins (registered by parjobs itself
        under the same group) and any third party's. A broken entry point is an error, not a
        silently missing calculation."""
        registry = cls()
        for entry_point in sorted(entry_points(group=group), key=lambda ep: ep.name):
            registry.register(_load(entry_point), source=_describe(entry_point))
        return registry

    def register(self, calculation: Calculation[Any], *, source: str = "direct") -> None:
        """Add one calculation; a second one with the same name is refused."""
        name = getattr(calculation, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise CalculationLoadError(
                f"{source}: calculation name {name!r} must be lower-case letters, digits and "
                "dashes, starting with a letter"
            )
        _check_shape(calculation, source)
        if name in self._calculations:
            raise DuplicateCalculationError(
                f"two calculations are named {name!r}: {self._sources[name]} and {source}; "
                "uninstall one of them or rename it"
            )
        self._calculations[name] = calculation
        self._sources[name] = source

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._calculations)

    def __iter__(self) -> Iterator[Calculation[Any]]:
        return (self._calculations[name] for name in self.names())

    def get(self, name: str) -> Calculation[Any]:
        """The calculation called `name`, or UnknownCalculationError listing what exists."""
        try:
            return self._calculations[name]
        except KeyError:
            available = self.names()
            raise UnknownCalculationError(
                f"no calculation named {name!r}; available: {', '.join(available) or 'none'}",
                name=name,
                available=available,
            ) from None

    def validate(self, name: str, params: Mapping[str, object]) -> BaseModel:
        """`params` validated by the calculation's model, or InvalidParametersError."""
        calculation = self.get(name)
        try:
            validated: BaseModel = calculation.parse_params(params)
        except ValidationError as exc:
            raise invalid_parameters(name, exc) from None
        return validated

    def invocation(
        self, name: str, params: Mapping[str, object], *, input_path: Path, output_dir: Path
    ) -> Invocation:
        """Validate `params` and describe the run, in one step (what a compute worker does)."""
        validated = self.validate(name, params)
        return self.get(name).invocation(validated, input_path=input_path, output_dir=output_dir)


def invalid_parameters(calculation: str, exc: ValidationError) -> InvalidParametersError:
    """pydantic's complaint as an InvalidParametersError: one line per error, details kept."""
    errors = exc.errors(include_url=False, include_context=False)
    details = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(parameters)'}: {error['msg']}"
        for error in errors
    )
    return InvalidParametersError(
        f"invalid parameters for {calculation!r}: {details}",
        calculation=calculation,
        errors=[dict(error) for error in errors],
    )


def _load(entry_point: EntryPoint) -> Calculation[Any]:
    source = _describe(entry_point)
    try:
        loaded = entry_point.load()
        calculation = loaded() if isinstance(loaded, type) else loaded
    except Exception as exc:  # a third party's import error must name the culprit
        raise CalculationLoadError(f"{source} failed to load: {exc!r}") from exc
    if not isinstance(calculation, Calculation):
        raise CalculationLoadError(f"{source} is not a parjobs Calculation subclass")
    if calculation.name != entry_point.name:
        raise CalculationLoadError(
            f"{source} is registered as {entry_point.name!r} but calls itself "
            f"{calculation.name!r}; the two must agree"
        )
    return calculation


def _describe(entry_point: EntryPoint) -> str:
    dist = entry_point.dist.name if entry_point.dist is not None else "an unknown distribution"
    return f"entry point {entry_point.name!r} ({entry_point.value}) of {dist}"


def _check_shape(calculation: Calculation[Any], source: str) -> None:
    params = getattr(calculation, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise CalculationLoadError(f"{source}: Params must be a pydantic model class")
    if params.model_config.get("extra") != "forbid":
        raise CalculationLoadError(
            f"{source}: {params.__name__} must set extra='forbid' so unknown parameters are errors"
        )
    if not isinstance(getattr(calculation, "price", None), Price):
        raise CalculationLoadError(f"{source}: price must be a parjobs Price")
