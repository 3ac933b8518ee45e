"""JAX data parallelism (impls/jax_data_parallel.py) on 2 host CPU devices, against impls.data_parallel's
shard-by-shard reference on one device.

JAX fixes its host CPU device count when its backend starts, and other tests in this pytest process start it
with one device, so the data-parallel work runs in fresh subprocesses that call configure_devices(2, "cpu")
before any JAX operation. Each writes its arrays to an .npz and its scalars and error messages to a .json;
the tests below assert on those. The two precisions run as two processes side by side: nearly all the time
is XLA compiling three programs of the tiny network in each, single-threaded per program.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import impls
from impls import spec
from tests.conftest import FP32_GRAD_RTOL, FP32_LOSS_RTOL, assert_close, assert_grads_close
from tests.numpy_reference import NumpyHourglass

pytest.importorskip("jax")
pytest.importorskip("flax")

REPO = Path(__file__).resolve().parents[1]
FP64_TOL = 1e-10
WORKER_TIMEOUT_S = 600  # a guard against a hung worker, not a speed check (about a minute on 2 idle cores)
WEIGHT_SEED, INPUT_SEED = 5, 11  # impls.init_weights and impls.spec.random_batch seeds, here and in the worker
GLOBAL_BATCH = 4  # 2 images per replica on 2 devices; tiny's innermost BN is 2x2, so 1 would do (smallest_train_batch)

# Runs in a fresh interpreter. argv: precision, output directory, global batch, weight seed, input seed.
# Writes <precision>.npz (gradients "<run>_grad/<name>", running statistics) and <precision>.json (the rest).
_WORKER = r"""
import json, sys
import numpy as np
from impls import jax_data_parallel as jdp

jdp.configure_devices(2, "cpu")  # before any JAX operation: the host device count is fixed at backend start

import impls
from impls import jax_hourglass, spec
from impls.data_parallel import shardwise_reference

precision, out = sys.argv[1], sys.argv[2]
config = impls.get_preset("tiny")
weights = impls.init_weights(config, seed=int(sys.argv[4]))
x, target = spec.random_batch(config, int(sys.argv[3]), seed=int(sys.argv[5]))
arrays, facts = {}, {"available_cpu": jdp.available_devices("cpu"), "available_gpu": jdp.available_devices("gpu")}

def keep(prefix, loss, grads):
    facts[prefix + "loss"] = loss
    arrays.update({f"{prefix}grad/{k}": v for k, v in grads.items()})

def error_of(call):
    try:
        call()
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None

single = jax_hourglass.build(config, weights, precision=precision)
stats0 = single.export_weights()
keep("ref_", *shardwise_reference(single, x, target, 2))  # per-shard loss_and_grads, then the means

with jdp.build_data_parallel(config, weights, devices=2, precision=precision) as dp:
    keep("dp2_", *dp.loss_and_grads(x, target))
    after = dp.export_weights()
    arrays.update({f"dp2_stats/{k}": after[k] for k in after if k.endswith((".mean", ".var"))})
    function, args = dp.step_program(len(x), seed=3)
    xd = args[2]
    facts["x_shape"] = list(xd.shape)
    facts["x_spec"] = [str(axis) for axis in xd.sharding.spec]
    facts["x_shard_shapes"] = [list(s.data.shape) for s in xd.addressable_shards]
    facts["x_shard_devices"] = sorted(str(s.device) for s in xd.addressable_shards)
    with dp.scope():
        facts["hlo_has_all_reduce"] = "all-reduce" in function.lower(*args).compile().as_text()
    step = dp.benchmark_step("forward_backward", len(x), seed=3)
    for _ in range(3):
        step()
    facts["bench_calls"] = 3
    if precision == "fp32":  # the step compiled above: a trace of three steps and two warm-ups
        facts["allreduce"] = dp.allreduce_profile(len(x), seed=3, steps=3)
    # After the benchmark steps and the profile: neither updates any state.
    facts["weights_unchanged_by_bench"] = all(np.array_equal(v, dp.export_weights()[k]) for k, v in after.items())
    facts["num_params"] = dp.num_params()
    facts["errors"] = {
        "batch_not_divisible": error_of(lambda: dp.loss_and_grads(x[:3], target[:3])),
        "bench_batch_not_divisible": error_of(lambda: dp.benchmark_step("forward_backward", 3)),
        "phase_forward": error_of(lambda: dp.benchmark_step("forward", len(x))),
    }
facts["errors"].update({
    "devices_0": error_of(lambda: jdp.build_data_parallel(config, devices=0)),
    "devices_3": error_of(lambda: jdp.build_data_parallel(config, devices=3)),
    "configure_more_after_start": error_of(lambda: jdp.configure_devices(4, "cpu")),
    "configure_same_after_start": error_of(lambda: jdp.configure_devices(2, "cpu")),
    "closed": error_of(lambda: dp.loss_and_grads(x, target)),
})
facts["count_params"] = impls.count_params(config)

if precision == "fp64":
    # Running statistics: the replica-mean of the per-replica updates. B_r (shard r's batch statistics) from
    # two more single-device steps, s1 = d*s0 + (1-d)*B_0 and s2 = d*s1 + (1-d)*B_1 (params do not change).
    names = [k for k in stats0 if k.endswith((".mean", ".var"))]
    s0 = single.export_weights()
    single.loss_and_grads(x[:2], target[:2])
    s1 = single.export_weights()
    single.loss_and_grads(x[2:], target[2:])
    s2 = single.export_weights()
    d = spec.BN_DECAY
    for k in names:
        b0, b1 = (s1[k] - d * s0[k]) / (1 - d), (s2[k] - d * s1[k]) / (1 - d)
        arrays[f"want_stats/{k}"] = d * stats0[k] + (1 - d) * (b0 + b1) / 2
    with jdp.build_data_parallel(config, weights, devices=2, precision=precision, impl="tuned") as tuned:
        keep("tuned_", *tuned.loss_and_grads(x, target))
else:
    # One device: the same program shape on a 1-device mesh must be the single-device model's step.
    with jdp.build_data_parallel(config, weights, devices=1, precision=precision) as dp1:
        keep("dp1_", *dp1.loss_and_grads(x[:2], target[:2]))
    keep("single_", *single.loss_and_grads(x[:2], target[:2]))  # compiled already for the reference's shards

np.savez(f"{out}/{precision}.npz", **arrays)
with open(f"{out}/{precision}.json", "w") as f:
    json.dump(facts, f)
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """Per precision, (facts, arrays) from the worker: both precisions' processes run at once."""
    out = tmp_path_factory.mktemp("jax_data_parallel")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
           os.environ.get("PYTHONPATH")]))}  # fmt: skip
    env.pop("XLA_FLAGS", None)  # a forced host device count there would fight configure_devices
    argv = [str(out), str(GLOBAL_BATCH), str(WEIGHT_SEED), str(INPUT_SEED)]
    procs = {
        p: subprocess.Popen([sys.executable, "-c", _WORKER, p, *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for p in ("fp64", "fp32")
    }  # fmt: skip
    found = {}
    for precision, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
                other.communicate()
            pytest.fail(f"the {precision} data-parallel worker ran past {WORKER_TIMEOUT_S} s")
        assert proc.returncode == 0, f"{precision} worker failed (rc {proc.returncode}):\n{stdout}\n{stderr[-4000:]}"
        facts = json.loads((out / f"{precision}.json").read_text())
        with np.load(out / f"{precision}.npz") as npz:
            found[precision] = (facts, {k: npz[k] for k in npz.files})
    return found


def _grads(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(prefix + "grad/")}


def test_fp64_two_devices_match_shardwise_reference(results) -> None:
    facts, arrays = results["fp64"]
    assert abs(facts["dp2_loss"] - facts["ref_loss"]) <= FP64_TOL * abs(facts["ref_loss"])
    got, want = _grads(arrays, "dp2_"), _grads(arrays, "ref_")
    assert got and all(g.dtype == np.float64 for g in got.values())
    assert_grads_close(got, want, FP64_TOL, "jax 2-device fp64 vs shardwise reference")
    for name in want:  # every parameter on its own too, where it has a gradient to speak of
        if np.linalg.norm(want[name]) > 1e-8:
            assert_close(got[name], want[name], FP64_TOL, f"grad {name}")


def test_fp64_tuned_variant_matches_shardwise_reference(results) -> None:
    facts, arrays = results["fp64"]
    assert abs(facts["tuned_loss"] - facts["ref_loss"]) <= FP64_TOL * abs(facts["ref_loss"])
    assert_grads_close(_grads(arrays, "tuned_"), _grads(arrays, "ref_"), FP64_TOL, "jax tuned 2-device fp64")


def test_fp32_two_devices_match_shardwise_reference(results) -> None:
    facts, arrays = results["fp32"]
    assert abs(facts["dp2_loss"] - facts["ref_loss"]) <= FP32_LOSS_RTOL * abs(facts["ref_loss"])
    got = _grads(arrays, "dp2_")
    assert all(g.dtype == np.float32 for g in got.values())
    assert_grads_close(got, _grads(arrays, "ref_"), FP32_GRAD_RTOL, "jax 2-device fp32 vs shardwise reference")


def test_batch_norm_uses_per_replica_statistics(results) -> None:
    # Synchronised BN (statistics over the global batch) would give the one-device full-batch loss instead;
    # this shows that the reference comparisons above tell the two apart on this batch.
    facts, _ = results["fp32"]
    config = impls.get_preset("tiny")
    x, target = spec.random_batch(config, GLOBAL_BATCH, seed=INPUT_SEED)
    global_bn = spec.loss_numpy(
        NumpyHourglass(config, impls.init_weights(config, seed=WEIGHT_SEED), train_mode=True)(x), target
    )
    assert abs(facts["dp2_loss"] - global_bn) > 1e-3 * abs(global_bn), (facts["dp2_loss"], global_bn)
    assert abs(facts["ref_loss"] - global_bn) > 1e-3 * abs(global_bn)


def test_running_statistics_are_the_replica_mean_update(results) -> None:
    _, arrays = results["fp64"]
    want = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("want_stats/")}
    assert want
    for name, value in want.items():
        assert_close(arrays[f"dp2_stats/{name}"], value, 1e-9, f"running statistic {name}")


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_step_input_is_sharded_over_two_devices_and_compiler_all_reduces(results, precision: str) -> None:
    facts, _ = results[precision]
    assert facts["available_cpu"] == 2
    assert facts["x_shape"] == [2, GLOBAL_BATCH // 2, 32, 32, 3]  # (replicas, per-replica batch, H, W, 3)
    assert facts["x_spec"] == ["data"]  # axis 0 split over the mesh axis "data", the rest whole
    assert facts["x_shard_shapes"] == [[1, GLOBAL_BATCH // 2, 32, 32, 3]] * 2
    assert len(set(facts["x_shard_devices"])) == 2
    assert facts["hlo_has_all_reduce"], "the compiled step has no all-reduce: the gradients are not reduced"


def test_one_device_matches_single_device_model(results) -> None:
    facts, arrays = results["fp32"]
    assert abs(facts["dp1_loss"] - facts["single_loss"]) <= FP32_LOSS_RTOL * abs(facts["single_loss"])
    assert_grads_close(_grads(arrays, "dp1_"), _grads(arrays, "single_"), FP32_GRAD_RTOL, "1-device vs single")


def test_benchmark_step_runs_without_updating_state(results) -> None:
    facts, _ = results["fp32"]
    assert facts["bench_calls"] == 3
    assert facts["weights_unchanged_by_bench"]
    assert facts["num_params"] == facts["count_params"]


def test_allreduce_profile_times_the_gradient_all_reduce(results) -> None:
    """XLA:CPU's all-reduce thunks show in the jax.profiler trace, per device; the one carrying gradients counts."""
    result = results["fp32"][0]["allreduce"]
    assert set(result) == {"allreduce_ms", "step_ms", "allreduce_share", "method", "ops"}
    assert np.isfinite(result["step_ms"]) and result["step_ms"] > 0
    assert 0 < result["allreduce_share"] < 1, result
    assert result["ops"] and all(op.startswith("all-reduce") for op in result["ops"]), result
    assert result["allreduce_ms"] == pytest.approx(result["allreduce_share"] * result["step_ms"])
    assert "jax.profiler" in result["method"] and "gradients" in result["method"]


@pytest.mark.parametrize(
    ("case", "kind", "words"),
    [
        ("batch_not_divisible", "ValueError", "does not split over 2 devices"),
        ("bench_batch_not_divisible", "ValueError", "does not split over 2 devices"),
        ("phase_forward", "ValueError", "phase must be 'forward_backward'"),
        ("devices_0", "ValueError", "devices must be a positive integer, got 0"),
        ("devices_3", "ValueError", "asked for 3 cpu devices but JAX sees 2; call"),
        ("configure_more_after_start", "RuntimeError", "already initialised with 2 device(s)"),
        ("closed", "RuntimeError", "is closed"),
    ],
)
def test_bad_arguments_raise_clear_errors(results, case: str, kind: str, words: str) -> None:
    facts, _ = results["fp32"]
    error = facts["errors"][case]
    assert error is not None, f"{case}: no error raised"
    assert error[0] == kind and words in error[1], error


def test_configure_devices_again_with_the_same_count_is_accepted(results) -> None:
    facts, _ = results["fp32"]
    assert facts["errors"]["configure_same_after_start"] is None
    assert facts["available_gpu"] == 0  # JAX_PLATFORMS=cpu: no GPU backend, reported as 0, not an error
