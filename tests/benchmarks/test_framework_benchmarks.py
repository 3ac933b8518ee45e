"""pytest-benchmark suite: one benchmark per framework x phase on the `tiny` preset, frameworks side by side.

Not part of the plain test run (see conftest.py). Commands:
    python -m pytest tests/benchmarks --benchmark-autosave                 # save .benchmarks/<machine>/0001_*.json
    python -m pytest tests/benchmarks --benchmark-compare                  # compare against the latest saved run
    python -m pytest tests/benchmarks --benchmark-compare=0001 --benchmark-compare-fail=median:10%
Each benchmark's `extra_info` carries the config, framework, version, execution, precision and batch size,
so a saved JSON says what was measured. `bench compare` is the statistically careful check; this suite
is for pytest-benchmark's own tooling (tables, histograms, saved history).
"""

from __future__ import annotations

from typing import Any

import pytest

import impls

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install -e '.[dev]')")

CONFIG = impls.PRESETS["tiny"]  # 2 stacks, depth 2, 16 channels, 32x32: milliseconds per step on a CPU
BATCH_SIZE = 1
ROUNDS = 20
WARMUP_ROUNDS = 3  # the first call of a compiled mode (jit, function) is its trace/compile: kept out

_models: dict[str, Any] = {}


def _model(framework: str) -> Any:
    """The framework's default-execution fp32 CPU model of CONFIG, built once per session."""
    if framework not in _models:
        backend = impls.load(framework)
        _models[framework] = (backend, backend.build(CONFIG, impls.init_weights(CONFIG, seed=0), device="cpu"))
    return _models[framework]


@pytest.mark.parametrize("phase", impls.PHASES)
@pytest.mark.parametrize("framework", impls.FRAMEWORKS)
def test_benchmark_step_tiny(benchmark: Any, framework: str, phase: str) -> None:
    if not impls.is_installed(framework):
        pytest.skip(f"{framework} is not installed ({impls.install_command(framework)})")
    backend, model = _model(framework)
    step = model.benchmark_step(phase, BATCH_SIZE, seed=0)
    benchmark.group = phase  # the table lists torch, tensorflow and jax of one phase together
    benchmark.extra_info.update(
        config=CONFIG.to_dict(),
        preset="tiny",
        framework=framework,
        version=str(backend.runtime_info().get("version")),
        execution=model.execution,
        precision=model.precision,
        device=model.device,
        batch_size=BATCH_SIZE,
        phase=phase,
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    assert benchmark.stats.stats.min > 0  # every round ran and was timed
