"""pytest-benchmark suite: one benchmark per framework x variant x execution x phase on the `tiny` preset.

Benchmarks are grouped so that like is compared with like: one group per phase and kind of execution
(`eager`: op by op; `compiled`: torch.compile, tf.function, XLA, jax.jit), so a table never sets
TensorFlow's eager mode against JAX's jit. Each framework's variants (`impls.IMPLS`) sit side by side in
their group.

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

# Which group an execution mode belongs to: op by op, or traced and compiled.
EAGER_EXECUTIONS = ("eager",)
# A variant runs only in the phases where its code differs from the default's (registry.IMPL_PHASES), as in
# `bench run`: elsewhere its benchmark would time the idiomatic code again under another name.
CELLS = [
    (fw, impl, ex, phase)
    for fw in impls.FRAMEWORKS
    for impl in impls.IMPLS[fw]
    for ex in impls.registry.EXECUTIONS[fw]
    for phase in impls.registry.IMPL_PHASES.get((fw, impl), impls.PHASES)
]

_models: dict[tuple[str, str, str], Any] = {}


def _model(framework: str, impl: str, execution: str) -> Any:
    """The fp32 CPU model of CONFIG in this variant and execution, built once per session."""
    key = (framework, impl, execution)
    if key not in _models:
        backend = impls.load(framework)
        model = backend.build(CONFIG, impls.init_weights(CONFIG, seed=0), device="cpu", execution=execution, impl=impl)
        _models[key] = (backend, model)
    return _models[key]


@pytest.mark.parametrize(("framework", "impl", "execution", "phase"), CELLS, ids=["-".join(c) for c in CELLS])
def test_benchmark_step_tiny(benchmark: Any, framework: str, impl: str, execution: str, phase: str) -> None:
    if not impls.is_installed(framework):
        pytest.skip(f"{framework} is not installed ({impls.install_command(framework)})")
    backend, model = _model(framework, impl, execution)
    step = model.benchmark_step(phase, BATCH_SIZE, seed=0)
    kind = "eager" if execution in EAGER_EXECUTIONS else "compiled"
    benchmark.group = f"{phase}, {kind}"  # like with like: torch compile, tf function/xla and jax jit together
    benchmark.extra_info.update(
        config=CONFIG.to_dict(),
        preset="tiny",
        framework=framework,
        impl=impl,
        version=str(backend.runtime_info().get("version")),
        execution=model.execution,
        precision=model.precision,
        device=model.device,
        batch_size=BATCH_SIZE,
        phase=phase,
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    assert benchmark.stats.stats.min > 0  # every round ran and was timed
