"""The layers depend one way: schemas <- core <- store, broker <- par <- services, client <- workers
<- cli. Every import of the project's own packages is checked, those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN = ("schemas", "orchestrator", "workers")

# Layer of a module (longest matching prefix) -> the layers it may import from.
BASE = {"schemas", "orchestrator.errors", "orchestrator.metrics"}
ADAPTERS = BASE | {"orchestrator.core", "orchestrator.settings"}
SEAMS = ADAPTERS | {"orchestrator.store", "orchestrator.broker"}
ALLOWED: dict[str, set[str]] = {
    "schemas": {"schemas"},
    "orchestrator.errors": {"schemas"},
    "orchestrator.metrics": set(),
    "orchestrator.core": BASE | {"orchestrator.core"},
    "orchestrator.settings": ADAPTERS | {"orchestrator.broker"},
    "orchestrator.store": ADAPTERS | {"orchestrator.store"},
    "orchestrator.broker": ADAPTERS | {"orchestrator.broker"},
    "orchestrator.par": ADAPTERS
    | {"orchestrator.store", "orchestrator.broker", "orchestrator.par"},
    "orchestrator.services": ADAPTERS
    | {"orchestrator.store", "orchestrator.broker", "orchestrator.par", "orchestrator.services"},
    "orchestrator.client": ADAPTERS
    | {"orchestrator.store", "orchestrator.broker", "orchestrator.par", "orchestrator.client"},
    "orchestrator.cli": {"schemas", "orchestrator", "workers"},
    "orchestrator": {"schemas", "orchestrator"},  # the public surface re-exports from below
    "workers": {"schemas", "orchestrator", "workers"},
}


def _layer(module: str) -> str:
    candidates = [name for name in ALLOWED if module == name or module.startswith(name + ".")]
    return max(candidates, key=len)


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from orchestrator import errors` imports the module errors; `from x import Y`, x
            submodules = [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, name) for name in submodules if _is_module(name)] or [
                (node.lineno, node.module)
            ]
    return [(line, name) for line, name in found if name.split(".")[0] in OWN]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _allows(layer: str, imported: str) -> bool:
    if _within(imported, "orchestrator.cli") and layer != "orchestrator.cli":
        return False  # the CLI is the top: nothing below it may use it
    return any(_within(imported, allowed) for allowed in ALLOWED[layer])


def _sources() -> list[Path]:
    return sorted(p for package in OWN for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    module = _module_of(path)
    layer = _layer(module)
    wrong = [
        f"line {line}: {imported}"
        for line, imported in _imports(ast.parse(path.read_text(), str(path)))
        if not _allows(layer, imported)
    ]
    assert not wrong, f"{module} ({layer}) imports against the layers: {wrong}"


def test_the_rule_catches_an_upward_import_inside_a_function() -> None:
    tree = ast.parse("def f():\n    from workers.daemons import run_daemon\n")
    layer = _layer("orchestrator.services.access")
    assert [name for _, name in _imports(tree) if not _allows(layer, name)] == ["workers.daemons"]
