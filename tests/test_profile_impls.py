"""Each implementation's `profile()` honours the contract in impls/profiling.py on the tiny preset.

Every framework's profile lists every stage by its shared name, stage times are positive and sum to no
more than the step they partition, the op table is non-empty, traces are written, the framework's own FLOP
count agrees with the analytic count on convolutions within 1%, and the timed loop recompiles nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import impls
from impls import profiling

TINY = impls.PRESETS["tiny"]
CONV_FLOPS_TOL = 0.01  # the bar: analytic vs framework-reported convolution FLOPs


def _profile(backend, tmp_path: Path, phase: str, execution: str | None = None, **kwargs) -> dict:
    loop = {"warmup": 1, "steps": 2, **kwargs}
    return backend.profile(
        TINY, phase=phase, batch_size=2, execution=execution or backend.EXECUTIONS[0], trace_dir=str(tmp_path), **loop
    )


@pytest.mark.parametrize("phase", impls.PHASES)
def test_profile_honours_the_contract(backend, tmp_path: Path, phase: str) -> None:
    result = _profile(backend, tmp_path, phase)
    profiling.check_profile(result, TINY, phase)  # raises naming the broken promise
    names = [row["stage"] for row in result["stages"]]
    assert set(profiling.stage_names(TINY)) <= set(names)
    assert result["trace_files"], "no trace file written"
    for name in result["trace_files"]:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, f"trace file {path} missing or empty"
    assert all(row["calls"] > 0 and row["total_ms"] >= row["self_ms"] >= 0 for row in result["ops"])


@pytest.mark.parametrize("phase", impls.PHASES)
def test_reported_conv_flops_match_the_analytic_count(backend, tmp_path: Path, phase: str) -> None:
    result = _profile(backend, tmp_path, phase)
    reported = result["flops"]["conv_flops"]
    assert reported is not None, f"{backend.FRAMEWORK} reported no conv FLOPs: {result['flops']['note']}"
    analytic = impls.count_flops(TINY, batch_size=2, phase=phase)
    assert abs(reported - analytic) <= CONV_FLOPS_TOL * analytic, (
        f"{backend.FRAMEWORK} {phase}: {result['flops']['source']} says {reported} conv FLOPs, analytic {analytic}"
    )


def test_every_execution_mode_profiles_without_recompiling(backend, tmp_path: Path) -> None:
    for execution in backend.EXECUTIONS:
        result = _profile(backend, tmp_path / execution, "forward", execution)
        profiling.check_profile(result, TINY, "forward")
        recompiles = result["compile"]["recompilations_in_timed_loop"]
        assert recompiles in (0, None), f"{backend.FRAMEWORK} {execution}: {recompiles} recompilations while timing"
        assert result["compile"]["first_call_ms"] > 0


def test_profile_rejects_bad_input(backend, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="phase"):
        _profile(backend, tmp_path, "backward_only")
    with pytest.raises(ValueError, match="steps"):
        _profile(backend, tmp_path, "forward", steps=0)
    with pytest.raises(ValueError, match="execution"):
        _profile(backend, tmp_path, "forward", "turbo")


def test_gemm_benchmark_runs_synchronised(backend) -> None:
    step = backend.gemm_benchmark(64, 32, 16, device="cpu", precision="fp32", seed=0)
    assert step() is None


def test_time_staged_sums_labels_and_never_exceeds_the_step() -> None:
    calls = [("a", lambda s: s + 1), ("b", lambda s: s * 2), ("a", lambda s: s - 1)]
    per_label, step_ms = profiling.time_staged(calls, 1, lambda s: None, warmup=1, steps=3)
    assert set(per_label) == {"a", "b"}
    assert sum(per_label.values()) <= step_ms * (1 + 1e-9) + 1e-6


def test_stage_conv_flops_sum_to_count_flops() -> None:
    for phase in impls.PHASES:
        per_stage = profiling.stage_conv_flops(TINY, 3, phase)
        assert list(per_stage) == profiling.stage_names(TINY)
        assert sum(per_stage.values()) == impls.count_flops(TINY, 3, phase)


def test_check_profile_names_the_broken_promise() -> None:
    stages = [{"stage": name, "ms": 1.0} for name in profiling.stage_names(TINY)]
    good = {
        "framework": "x", "execution": "e", "step_ms": 10.0, "stage_method": "staged", "stage_step_ms": 10.0,
        "stages": stages, "ops": [{"op": "conv", "calls": 1, "total_ms": 1, "self_ms": 1}], "op_step_ms": 10.0,
        "trace_files": ["t.json"], "flops": {"conv_flops": 1, "total_flops": None}, "compile": {},
    }  # fmt: skip
    profiling.check_profile(good, TINY, "forward")
    with pytest.raises(profiling.ProfileContractError, match="sum to"):
        profiling.check_profile({**good, "stage_step_ms": 1.0}, TINY, "forward")
    with pytest.raises(profiling.ProfileContractError, match="stages"):
        profiling.check_profile({**good, "stages": stages[1:]}, TINY, "forward")
    with pytest.raises(profiling.ProfileContractError, match="positive time"):
        profiling.check_profile({**good, "stages": [{**stages[0], "ms": 0.0}, *stages[1:]]}, TINY, "forward")
    with pytest.raises(profiling.ProfileContractError, match="op table"):
        profiling.check_profile({**good, "ops": []}, TINY, "forward")
