"""The typed parent-worker protocol: specs and results round-trip, and unknown keys are errors."""

from __future__ import annotations

import pytest

from bench.core.settings import LoopSettings
from bench.engine import protocol


def _cell_spec() -> protocol.CellSpec:
    loop = LoopSettings(warmup=2, max_iters=30, min_time_s=3.0, min_iters=5)
    return protocol.CellSpec(framework="torch", execution="eager", precision="fp32", batch_size=1,
                             phase="forward", loop=loop, config={"depth": 2})  # fmt: skip


def test_protocol_spec_round_trips_through_json_with_its_mode() -> None:
    spec = _cell_spec()
    data = protocol.spec_to_json(spec)
    assert data["mode"] == "cell" and data["loop"]["max_iters"] == 30
    assert protocol.spec_from_json(data) == spec


def test_protocol_calibration_workloads_decode_to_dataclasses() -> None:
    workload = protocol.CalibrationWorkload(kind="gemm", shape={"m_per_image": 4, "k": 2, "n": 3}, batch_size=1,
                                            precision="fp32", flops=48)  # fmt: skip
    spec = protocol.CalibrationSpec(framework="jax", workloads=[workload], loop=_cell_spec().loop)
    decoded = protocol.spec_from_json(protocol.spec_to_json(spec))
    assert isinstance(decoded, protocol.CalibrationSpec) and decoded.workloads == [workload]


def test_protocol_unknown_key_is_an_error_not_ignored() -> None:
    data = protocol.spec_to_json(_cell_spec())
    data["warmpu"] = 3
    with pytest.raises(protocol.ProtocolError, match=r"cell spec: CellSpec has no field\(s\) warmpu"):
        protocol.spec_from_json(data)
    nested = protocol.spec_to_json(_cell_spec())
    nested["loop"]["iters"] = 3
    with pytest.raises(protocol.ProtocolError, match=r"cell spec.loop: LoopSettings has no field\(s\) iters"):
        protocol.spec_from_json(nested)


def test_protocol_missing_key_and_unknown_mode_are_errors() -> None:
    data = protocol.spec_to_json(_cell_spec())
    del data["phase"]
    with pytest.raises(protocol.ProtocolError, match="phase"):
        protocol.spec_from_json(data)
    with pytest.raises(protocol.ProtocolError, match="unknown worker mode 'timing'"):
        protocol.spec_from_json({"mode": "timing", "framework": "torch"})


def test_protocol_result_of_another_mode_is_rejected() -> None:
    result = protocol.CellResult(mode="cell", framework="torch", samples_ns=[1, 2, 3], num_params=7)
    data = protocol.result_to_json(result)
    assert protocol.result_from_json("cell", data) == result
    with pytest.raises(protocol.ProtocolError, match="CalibrationResult has no field"):
        protocol.result_from_json("calibrate", data)


def test_protocol_empty_result_has_the_modes_type() -> None:
    result = protocol.empty_result(_cell_spec(), "timeout", "no result after --timeout 4 s")
    assert isinstance(result, protocol.CellResult) and result.status == "timeout" and result.samples_ns == []


def test_gpu_math_env_sets_autotuning_for_tensorflow_and_xla_keeping_other_flags() -> None:
    env = protocol.gpu_math_env(False, "--xla_gpu_autotune_level=4 --xla_dump_to=/tmp/x")
    assert env == {"TF_CUDNN_USE_AUTOTUNE": "0", "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_gpu_autotune_level=0"}
    assert protocol.gpu_math_env(True, "")["XLA_FLAGS"] == "--xla_gpu_autotune_level=4"


def test_protocol_gradient_check_spec_and_result_round_trip() -> None:
    spec = protocol.GradientCheckSpec(framework="jax", execution="jit", precision="fp64", batch_size=1,
                                      output_npz="/tmp/g.npz", config={"depth": 2})  # fmt: skip
    assert protocol.spec_from_json(protocol.spec_to_json(spec)) == spec
    result = protocol.GradientCheckResult(mode="gradient_check", framework="jax", loss=1.5, output_npz="/tmp/g.npz")
    assert protocol.result_from_json("gradient_check", protocol.result_to_json(result)) == result
