"""The calculation registry, parameter validation and the command allow-list (no subprocesses)."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.errors import (
    CalculationLoadError,
    ConfigurationError,
    DuplicateCalculationError,
    InvalidParametersError,
    UnknownCalculationError,
)
from workers.calculations import (
    Calculation,
    CalculationParams,
    CalculationRegistry,
    Command,
    CommandParams,
    CommandSettings,
    Invocation,
    Price,
)
from workers.calculations._builtins import Sleep, SleepParams

BUILT_INS = {"checksum", "command", "csv-summary", "sleep"}
PATHS = {"input_path": Path("/jobs/1/input"), "output_dir": Path("/jobs/1/output")}


@pytest.fixture
def registry() -> CalculationRegistry:
    return CalculationRegistry.from_entry_points()


def _commands(**templates: list[str]) -> Command:
    return Command(CommandSettings(commands=templates))


def _command_registry(**templates: list[str]) -> CalculationRegistry:
    registry = CalculationRegistry()
    registry.register(_commands(**templates))
    return registry


# --- the registry -------------------------------------------------------------------------------


def test_built_ins_come_through_the_entry_point_group(registry: CalculationRegistry) -> None:
    assert set(registry.names()) >= BUILT_INS
    assert [calculation.name for calculation in registry] == registry.names()
    assert all(isinstance(calculation.price, Price) for calculation in registry)


def test_unknown_name_lists_what_exists(registry: CalculationRegistry) -> None:
    with pytest.raises(UnknownCalculationError, match="no calculation named 'bogus'") as info:
        registry.get("bogus")
    assert set(info.value.available) >= BUILT_INS
    assert "checksum" in str(info.value)


def test_validate_returns_the_parameter_model(registry: CalculationRegistry) -> None:
    params = registry.validate("sleep", {"seconds": 1.5})
    assert params == SleepParams(seconds=1.5, exit_code=0)


@pytest.mark.parametrize(
    ("params", "location", "message"),
    [
        ({}, "seconds", "Field required"),
        ({"seconds": -1}, "seconds", "greater than or equal to 0"),
        ({"seconds": "soon"}, "seconds", "valid number"),
        ({"seconds": 1, "shell": "rm -rf /"}, "shell", "Extra inputs are not permitted"),
    ],
)
def test_invalid_parameters_carry_pydantics_messages(
    registry: CalculationRegistry, params: dict[str, object], location: str, message: str
) -> None:
    with pytest.raises(InvalidParametersError) as info:
        registry.validate("sleep", params)
    assert info.value.calculation == "sleep"
    assert [error["loc"] for error in info.value.errors] == [(location,)]
    assert message in str(info.value)
    assert str(info.value).startswith(f"invalid parameters for 'sleep': {location}: ")


def test_a_second_calculation_with_the_same_name_is_refused() -> None:
    registry = CalculationRegistry()
    registry.register(Sleep(), source="first")
    with pytest.raises(DuplicateCalculationError, match="'sleep': first and second"):
        registry.register(Sleep(), source="second")


class _LaxParams(CalculationParams):
    model_config = CalculationParams.model_config | {"extra": "ignore"}


class _Lax(Calculation[_LaxParams]):
    name = "lax"
    Params = _LaxParams
    price = Price()

    def invocation(self, params: _LaxParams, *, input_path: Path, output_dir: Path) -> Invocation:
        return Invocation(argv=("true",))


def test_a_params_model_that_ignores_unknown_fields_is_refused() -> None:
    with pytest.raises(CalculationLoadError, match="extra='forbid'"):
        CalculationRegistry().register(_Lax())


def test_names_are_simple() -> None:
    lax = _Lax()
    lax.name = "Not Simple!"
    with pytest.raises(CalculationLoadError, match="lower-case letters"):
        CalculationRegistry().register(lax)


def test_price_is_exact_decimal() -> None:
    price = Price(fixed=Decimal("0.01"), per_cpu_second=Decimal("0.001"))
    assert price.cost(1.5) == Decimal("0.0115")
    assert price.cost(0.1) == Decimal("0.0101")  # no binary-float residue
    assert Price.model_validate_json(price.model_dump_json()) == price
    with pytest.raises(ValidationError):
        Price(fixed=Decimal(-1))


def test_builtin_invocations_run_a_script_of_the_package(registry: CalculationRegistry) -> None:
    invocation = registry.invocation("checksum", {}, **PATHS)
    assert invocation.argv[:3] == (sys.executable, "-I", "-u")
    assert Path(invocation.argv[3]).is_file()
    assert invocation.argv[4:6] == ("/jobs/1/input", "/jobs/1/output")
    assert invocation.outputs == ("summary.json",)


@pytest.mark.parametrize("delimiter", ['"', "\n", "ab", ""])
def test_csv_delimiter_must_be_one_usable_character(
    registry: CalculationRegistry, delimiter: str
) -> None:
    with pytest.raises(InvalidParametersError, match="delimiter"):
        registry.validate("csv-summary", {"delimiter": delimiter})


# --- the command allow-list ---------------------------------------------------------------------


def test_allow_list_comes_from_parjobs_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARJOBS_COMMANDS", json.dumps({"count": ["wc", "-l", "{input}"]}))
    registry = CalculationRegistry.from_entry_points()
    invocation = registry.invocation("command", {"command": "count"}, **PATHS)
    assert invocation.argv == ("wc", "-l", "/jobs/1/input")


def test_placeholders_are_filled_into_single_argv_elements() -> None:
    registry = _command_registry(head=["head", "--lines={lines}", "{input}", "{output_dir}/x"])
    invocation = registry.invocation(
        "command", {"command": "head", "args": {"lines": "10"}}, **PATHS
    )
    assert invocation.argv == ("head", "--lines=10", "/jobs/1/input", "/jobs/1/output/x")


def test_unknown_command_is_refused_listing_the_allowed_ones() -> None:
    registry = _command_registry(count=["wc", "-l", "{input}"], head=["head", "{input}"])
    with pytest.raises(InvalidParametersError, match=r"'rm' is not allowed; allowed: count, head"):
        registry.validate("command", {"command": "rm"})


def test_nothing_is_allowed_without_configuration() -> None:
    with pytest.raises(InvalidParametersError, match="none are configured"):
        _command_registry().validate("command", {"command": "count"})
    # Validated without the allow-list in its context, a command is refused too (fail closed).
    with pytest.raises(ValidationError, match="not allowed"):
        CommandParams.model_validate({"command": "count"})


@pytest.mark.parametrize(
    "params",
    [
        {"command": "head", "argv": ["rm", "-rf", "/"], "args": {"lines": "1"}},
        {"command": "head; rm -rf /", "args": {"lines": "1"}},
        {"command": "head", "args": {"lines": "-n100000"}},  # an option
        {"command": "head", "args": {"lines": "--help"}},
        {"command": "head", "args": {"lines": "../../etc/passwd"}},  # a path
        {"command": "head", "args": {"lines": "/etc/passwd"}},
        {"command": "head", "args": {"lines": "1 /etc/passwd"}},  # a second argument
        {"command": "head", "args": {"lines": "$(id)"}},
        {"command": "head", "args": {"lines": "1;id"}},
        {"command": "head", "args": {"lines": "1\nid"}},
        {"command": "head", "args": {"lines": ""}},
        {"command": "head", "args": {"lines": "1", "input": "/etc/passwd"}},  # worker's own
        {"command": "head", "args": {"lines": "1", "extra": "2"}},
        {"command": "head", "args": {}},
        {"command": "head", "args": {"lines": 5}},
    ],
)
def test_users_cannot_inject_argv_options_paths_or_shell(params: dict[str, object]) -> None:
    registry = _command_registry(head=["head", "-n", "{lines}", "{input}"])
    with pytest.raises(InvalidParametersError):
        registry.validate("command", params)


@pytest.mark.parametrize(
    ("template", "complaint"),
    [
        ([], "at least the program"),
        (["{program}", "{input}"], "must be literal"),
        (["cat", "{input!r}"], "plain {name}"),
        (["cat", "{input:>99}"], "plain {name}"),
        (["cat", "{input.__class__}"], "plain {name}"),
        (["cat", "{args[0]}"], "plain {name}"),
        (["cat", "{0}"], "plain {name}"),
        (["cat", "{}"], "plain {name}"),
        (["cat", "{input"], "expected '}'"),
    ],
)
def test_bad_templates_are_configuration_errors(
    monkeypatch: pytest.MonkeyPatch, template: list[str], complaint: str
) -> None:
    monkeypatch.setenv("PARJOBS_COMMANDS", json.dumps({"bad": template}))
    with pytest.raises(ConfigurationError, match="PARJOBS_COMMANDS") as info:
        Command()
    assert complaint in str(info.value)


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (json.dumps({"Not OK": ["true"]}), "should match pattern"),
        (json.dumps(["wc", "-l"]), "(top level): Input should be a valid dictionary"),
        ("{wc: [wc]}", "not valid JSON"),
    ],
)
def test_bad_allow_lists_are_configuration_errors(
    monkeypatch: pytest.MonkeyPatch, value: str, complaint: str
) -> None:
    monkeypatch.setenv("PARJOBS_COMMANDS", value)
    with pytest.raises(ConfigurationError, match="PARJOBS_COMMANDS") as info:
        Command()
    assert complaint in str(info.value)


def test_invocation_checks_against_this_workers_allow_list() -> None:
    registry = _command_registry(count=["wc", "-l", "{input}"])
    params = registry.validate("command", {"command": "count"})
    other = _commands(head=["head", "{input}"])
    with pytest.raises(InvalidParametersError, match="'count' is not allowed"):
        other.invocation(params, **PATHS)  # type: ignore[arg-type]


# --- third-party calculations through a real distribution ----------------------------------------


def _install_distribution(
    site: Path, dist: str, entry_points: dict[str, str], module: str, source: str
) -> None:
    """A minimal installed distribution: a module and a dist-info with entry_points.txt."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[parjobs.calculations]\n{lines}")


_THIRD_PARTY = """
    from decimal import Decimal
    from pathlib import Path

    from workers.calculations import Calculation, CalculationParams, Invocation, Price


    class ReverseParams(CalculationParams):
        lines: int = 10


    class Reverse(Calculation[ReverseParams]):
        name = "{name}"
        Params = ReverseParams
        price = Price(fixed=Decimal("0.5"))

        def invocation(self, params: ReverseParams, *, input_path: Path, output_dir: Path):
            return Invocation(argv=("tac", str(input_path)))
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path that importlib.metadata scans for distributions."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _module() -> str:
    return f"thirdparty_{uuid.uuid4().hex[:8]}"  # fresh each time: sys.modules remembers


def test_third_party_calculation_is_discovered(site: Path) -> None:
    module = _module()
    _install_distribution(
        site,
        "parjobs-reverse",
        {"reverse": f"{module}:Reverse"},
        module,
        _THIRD_PARTY.replace("{name}", "reverse"),
    )
    registry = CalculationRegistry.from_entry_points()
    assert set(registry.names()) == BUILT_INS | {"reverse"}
    assert registry.validate("reverse", {"lines": 3}).model_dump() == {"lines": 3}
    assert registry.get("reverse").price.fixed == Decimal("0.5")
    with pytest.raises(InvalidParametersError, match="Extra inputs"):
        registry.validate("reverse", {"line": 3})


def test_third_party_cannot_take_a_built_in_name(site: Path) -> None:
    module = _module()
    source = _THIRD_PARTY.replace("{name}", "checksum")
    _install_distribution(site, "evil-checksum", {"checksum": f"{module}:Reverse"}, module, source)
    with pytest.raises(DuplicateCalculationError, match="'checksum'") as info:
        CalculationRegistry.from_entry_points()
    assert "of parjobs" in str(info.value)
    assert "of evil-checksum" in str(info.value)


@pytest.mark.parametrize(
    ("value", "source", "complaint"),
    [
        ("{module}:Reverse", "raise ImportError('no numpy here')", "no numpy here"),
        ("{module}:Missing", "", "failed to load"),
        ("{module}:thing", "thing = 42", "not a parjobs Calculation"),
        ("{module}:Reverse", _THIRD_PARTY.replace("{name}", "other"), "calls itself 'other'"),
    ],
)
def test_broken_third_party_entry_points_are_named(
    site: Path, value: str, source: str, complaint: str
) -> None:
    module = _module()
    value = value.replace("{module}", module)
    _install_distribution(site, "parjobs-broken", {"reverse": value}, module, source)
    with pytest.raises(CalculationLoadError, match="of parjobs-broken") as info:
        CalculationRegistry.from_entry_points()
    assert complaint in str(info.value)
