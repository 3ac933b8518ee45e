"""Import rules inside impls/, the profilers included: only a framework's own modules import it.

tests/test_layout.py checks the top of impls/ and bench/; this file adds the profilers package and the
rule that keeps it lazy: a model module never imports its profiler (the profiler imports the model module,
and a benchmark run should not load a profiler).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_layout import _imported_frameworks

IMPLS = Path(__file__).resolve().parent.parent / "impls"
FRAMEWORKS = ("torch", "tensorflow", "jax")
FRAMEWORK_MODULES = {IMPLS / f"{fw}_hourglass.py" for fw in FRAMEWORKS} | {
    IMPLS / "profilers" / f"{fw}_profiling.py" for fw in FRAMEWORKS
} | {IMPLS / f"{fw}_data_parallel.py" for fw in FRAMEWORKS}


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name an import statement anywhere in `path` names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_profiler_module_imports_exactly_its_framework(framework: str) -> None:
    assert _imported_frameworks(IMPLS / "profilers" / f"{framework}_profiling.py") == {framework}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_data_parallel_module_imports_exactly_its_framework(framework: str) -> None:
    assert _imported_frameworks(IMPLS / f"{framework}_data_parallel.py") == {framework}


def test_every_other_impls_module_imports_no_framework() -> None:
    shared = [path for path in sorted(IMPLS.rglob("*.py")) if path not in FRAMEWORK_MODULES]
    assert IMPLS / "profilers" / "__init__.py" in shared
    offenders = {str(path.relative_to(IMPLS)): _imported_frameworks(path) for path in shared}
    assert {name: found for name, found in offenders.items() if found} == {}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_model_module_never_imports_a_profiler(framework: str) -> None:
    imported = _imported_modules(IMPLS / f"{framework}_hourglass.py")
    assert not [name for name in imported if name.startswith("impls.profilers")]
