"""Each implementation's `profile()` honours the contract in impls/profiling.py on the tiny preset.

Every framework's profile lists every stage by its shared name, stage times are positive and sum to no
more than the step they partition, the op table is non-empty, traces are written, the framework's own FLOP
count agrees with the analytic count on convolutions within 1%, and the timed loop recompiles nothing.
The result is a ProfileResult whose to_dict() is the JSON form the parent process checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import impls
from impls import profiling
from impls.profiling import CompileInfo, FlopCount, ProfileRequest, ProfileResult, StageTiming

TINY = impls.PRESETS["tiny"]
# Analytic vs framework-reported convolution FLOPs: they count the same convolutions, so only a counter's
# rounding or a missed conv can tell them apart.
CONV_FLOPS_TOL = 0.01

# The contract's keys and the JSON types of their values (impls/profiling.py's docstring).
TOP_LEVEL_TYPES = {
    "framework": str, "execution": str, "phase": str, "batch_size": int, "precision": str, "device": str,
    "step_ms": float, "stage_method": str, "stage_step_ms": float, "stage_note": str, "stages": list,
    "ops": list, "op_step_ms": float, "trace_files": list, "flops": dict, "compile": dict, "impl": str,
}  # fmt: skip
FLOPS_KEYS = ["source", "conv_flops", "total_flops", "note"]
COMPILE_KEYS = ["first_call_ms", "trace_compile_ms", "recompilations_in_timed_loop", "program_size",
                "program_size_unit", "note"]  # fmt: skip


def _profile(backend, tmp_path: Path, phase: str, execution: str | None = None, **kwargs) -> ProfileResult:
    loop = {"batch_size": 2, "warmup": 1, "steps": 2, **kwargs}
    return backend.profile(TINY, phase=phase, execution=execution or backend.EXECUTIONS[0], trace_dir=str(tmp_path), **loop)


@pytest.mark.parametrize("phase", impls.PHASES)
def test_profile_honours_the_contract(backend, tmp_path: Path, phase: str) -> None:
    result = _profile(backend, tmp_path, phase)
    assert isinstance(result, ProfileResult)
    profiling.check_profile(result, TINY, phase)  # raises naming the broken promise
    names = [row.stage for row in result.stages]
    assert set(profiling.stage_names(TINY)) <= set(names)
    assert result.trace_files, "no trace file written"
    for name in result.trace_files:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, f"trace file {path} missing or empty"
    assert all(row.calls > 0 and row.total_ms >= row.self_ms >= 0 for row in result.ops)
    assert (result.framework, result.phase, result.batch_size) == (backend.FRAMEWORK, phase, 2)


def test_profile_result_crosses_json_with_the_contracts_keys_and_types(backend, tmp_path: Path) -> None:
    result = _profile(backend, tmp_path, "forward_backward")
    plain = json.loads(json.dumps(result.to_dict()))
    assert plain == result.to_dict() == dict(result)
    assert list(plain) == list(TOP_LEVEL_TYPES)
    for key, kind in TOP_LEVEL_TYPES.items():
        assert isinstance(plain[key], kind), f"{key}: {type(plain[key]).__name__}, expected {kind.__name__}"
    assert list(plain["flops"]) == FLOPS_KEYS and list(plain["compile"]) == COMPILE_KEYS
    assert all(list(row) == ["stage", "ms"] for row in plain["stages"])
    assert all(list(row) == ["op", "calls", "total_ms", "self_ms"] for row in plain["ops"])
    profiling.check_profile(plain, TINY, "forward_backward")  # the parent's check of the JSON form
    assert plain["impl"] == backend.IMPL  # the variant asked for is the one profiled


@pytest.mark.parametrize("phase", impls.PHASES)
def test_reported_conv_flops_match_the_analytic_count(backend, tmp_path: Path, phase: str) -> None:
    result = _profile(backend, tmp_path, phase)
    reported = result.flops.conv_flops
    assert reported is not None, f"{backend.FRAMEWORK} reported no conv FLOPs: {result.flops.note}"
    analytic = impls.count_flops(TINY, batch_size=2, phase=phase)
    assert abs(reported - analytic) <= CONV_FLOPS_TOL * analytic, (
        f"{backend.FRAMEWORK} {phase}: {result.flops.source} says {reported} conv FLOPs, analytic {analytic}"
    )


def test_every_execution_mode_profiles_without_recompiling(backend, tmp_path: Path) -> None:
    for execution in backend.EXECUTIONS:
        result = _profile(backend, tmp_path / execution, "forward", execution)
        profiling.check_profile(result, TINY, "forward")
        recompiles = result.compile.recompilations_in_timed_loop
        assert recompiles in (0, None), f"{backend.FRAMEWORK} {execution}: {recompiles} recompilations while timing"
        assert result.compile.first_call_ms > 0


def test_profile_rejects_bad_input(backend, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown phase 'backward_only'; choose one of: forward, forward_backward"):
        _profile(backend, tmp_path, "backward_only")
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got 0; profile at least one step"):
        _profile(backend, tmp_path, "forward", steps=0)
    with pytest.raises(ValueError, match=rf"unknown execution 'turbo' for {backend.FRAMEWORK}; choose one of"):
        _profile(backend, tmp_path, "forward", "turbo")
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        _profile(backend, tmp_path, "forward", batch_size=0)
    assert not list(tmp_path.iterdir()), "a rejected call wrote traces"


def test_profile_is_the_framework_modules_own(backend) -> None:
    """impls.load(framework).profile is the module's own, made by impls.profiling.framework_profile."""
    module = impls.load(backend.FRAMEWORK)
    assert module.profile.__module__ == module.__name__
    assert "Returns the ProfileResult" in module.profile.__doc__


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


def _result(stage_ms: dict[str, float]) -> ProfileResult:
    """A ProfileResult of the tiny config built by the shared builder, as each framework builds its own."""
    request = ProfileRequest(TINY, "forward_backward", 3, "eager", Path("traces"), steps=2, top_k=2)
    events = [{"op": "conv", "total_ms": 2.0, "self_ms": 1.5}, {"op": "conv", "total_ms": 2.0},
              {"op": "add", "total_ms": 0.5}, {"op": "relu", "total_ms": 0.1}]  # fmt: skip
    return profiling.profile_result(
        "torch", request, step_ms=9.0, stages=StageTiming("staged", 10.0, "note", stage_ms), op_events=events,
        op_step_ms=9.5, trace_files=["t.json"], flops=FlopCount("counter", 12, None, "n"),
        compile_info=CompileInfo(5.0, None, 0, None, "", "c"),
    )  # fmt: skip


def test_profile_result_orders_stages_and_tables_ops() -> None:
    names = profiling.stage_names(TINY)
    result = _result({"loss": 0.5, **{name: 1.0 for name in reversed(names)}})
    assert [row.stage for row in result.stages] == [*names, "loss"]
    assert [(row.op, row.calls, row.total_ms, row.self_ms) for row in result.ops] == [
        ("conv", 1.0, 2.0, 1.75), ("add", 0.5, 0.25, 0.25)]  # per step of 2; top_k 2 by self time
    assert (result.framework, result.phase, result.batch_size, result.stage_step_ms) == ("torch", "forward_backward", 3, 10.0)
    profiling.check_profile(result, TINY, "forward_backward")


def test_profile_result_is_a_read_only_mapping_of_its_dict() -> None:
    result = _result({name: 1.0 for name in profiling.stage_names(TINY)})
    plain = result.to_dict()
    assert dict(result) == plain and len(result) == len(plain) and list(result) == list(plain)
    assert plain["stages"][0] == {"stage": "stem", "ms": 1.0}
    assert plain["flops"] == {"source": "counter", "conv_flops": 12, "total_flops": None, "note": "n"}
    assert plain["trace_files"] == ["t.json"] and isinstance(plain["ops"], list)
    with pytest.raises(KeyError):
        result["stage"]
    with pytest.raises(AttributeError):
        result.step_ms = 1.0  # type: ignore[misc]
    assert math.isclose(json.loads(json.dumps(plain))["op_step_ms"], 9.5)


def test_profile_result_keeps_an_unknown_stage_for_check_profile_to_name() -> None:
    result = _result({"warp": 1.0, **{name: 1.0 for name in profiling.stage_names(TINY)}})
    assert result.stages[-1].stage == "warp"
    with pytest.raises(profiling.ProfileContractError, match="stages"):
        profiling.check_profile(result, TINY, "forward_backward")
