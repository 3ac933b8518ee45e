"""The project's structural promises: bench/ imports no framework, each impls file imports exactly one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORK_MODULES = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax", "flax": "jax"}


def _imported_frameworks(path: Path) -> set[str]:
    """Frameworks named by any import statement in `path` (flax counts as jax)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {FRAMEWORK_MODULES[n.split(".")[0]] for n in names if n.split(".")[0] in FRAMEWORK_MODULES}
    return found


@pytest.mark.parametrize("framework", ["torch", "tensorflow", "jax"])
def test_impl_module_imports_exactly_its_framework(framework: str) -> None:
    path = ROOT / "impls" / f"{framework}_hourglass.py"
    assert _imported_frameworks(path) == {framework}


def test_framework_free_modules_import_no_framework() -> None:
    shared = [p for p in (ROOT / "impls").glob("*.py") if not p.name.endswith("_hourglass.py")]
    offenders = {str(p.relative_to(ROOT)): _imported_frameworks(p) for p in [*shared, *(ROOT / "bench").glob("*.py")]}
    assert {k: v for k, v in offenders.items() if v} == {}
