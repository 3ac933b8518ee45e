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
    shared = [p for p in (ROOT / "impls").glob("*.py") if not p.name.endswith(("_hourglass.py", "_data_parallel.py"))]
    assert ROOT / "impls" / "data_parallel.py" in shared  # the data-parallel contract itself is framework-free
    offenders = {str(p.relative_to(ROOT)): _imported_frameworks(p) for p in [*shared, *(ROOT / "bench").rglob("*.py")]}
    assert {k: v for k, v in offenders.items() if v} == {}


# ---------------------------------------------------------------- the dependency direction

# Packages of bench/ by rank: a module may import its own package and packages of a lower rank only
# (core <- engine <- jobs <- report/regress <- experiments <- cli). impls/ sits below all of bench/.
BENCH_RANKS: dict[str, int] = {
    "bench.core": 0,
    "bench.engine": 1,
    "bench.run": 2,
    "bench.profile": 2,
    "bench.report": 3,
    "bench.regress": 3,
    "bench.experiments": 4,
    "bench.cli": 5,
    "bench.__main__": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for package in ("bench", "impls") for p in (ROOT / package).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere in it (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            module = target
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module and module != name:
                found.add(module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _project_modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _rank(module: str) -> tuple[str, int] | None:
    for package, rank in BENCH_RANKS.items():
        if module == package or module.startswith(package + "."):
            return package, rank
    return None


def test_every_bench_module_belongs_to_a_ranked_package() -> None:
    unranked = [m for m in _project_modules() if m.startswith("bench.") and _rank(m) is None]
    assert unranked == [], f"add these to a package of BENCH_RANKS: {unranked}"


def test_no_module_imports_upward() -> None:
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if module.startswith("impls") and target.startswith("bench"):
                upward.append(f"{module} -> {target} (impls/ never imports bench/)")
                continue
            mine, theirs = _rank(module), _rank(target)
            if mine and theirs and mine[0] != theirs[0] and theirs[1] >= mine[1]:
                upward.append(f"{module} ({mine[0]}, rank {mine[1]}) -> {target} ({theirs[0]}, rank {theirs[1]})")
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package's __init__ naming its own submodule is no cycle
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_layout_rules_catch_a_violation(tmp_path: Path) -> None:
    """The rank check is not vacuous: an import of bench.report from bench.core would be flagged."""
    fake = tmp_path / "mod.py"
    fake.write_text("from bench.report import plots\n")
    known = set(_project_modules())
    targets = _imports(fake, "bench.core.fake", known)
    assert targets == {"bench.report.plots"}
    assert _rank("bench.report.plots")[1] >= _rank("bench.core.fake")[1]


def test_bench_imports_no_ray_until_a_run_asks_for_it() -> None:
    """Ray is an optional extra: the CLI, the runner and the executors import it only inside a Ray run."""
    import subprocess
    import sys

    code = ("import sys, bench.cli, bench.run.runner, bench.engine.ray_executor, bench.regress.compare, "
            "bench.report.run_report; assert 'ray' not in sys.modules, 'ray was imported'")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
