"""impls/tensorflow_data_parallel.py: the MirroredStrategy step is the shard-by-shard reference, on two logical CPUs.

TensorFlow fixes its logical devices when its runtime starts, and other tests in this pytest process may have
started it already, so the data-parallel checks run in one child process (this file run as a module:
`python -m tests.test_data_parallel_tensorflow OUT`) that calls configure_devices(2, "cpu") first, computes
everything, and pickles the raw results; the tests here assert on them. One child for all checks: each new
step costs a trace (and for "xla" a compile) of the tiny network's gradient, seconds each on two cores.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import impls
from impls import spec
from impls.data_parallel import shardwise_reference
from tests.conftest import FP32_GRAD_RTOL, FP32_LOSS_RTOL, assert_close, assert_grads_close

CONFIG = impls.get_preset("tiny")  # 2 stacks, depth 2, 16 channels, 5 keypoints, 32x32: innermost BN 2x2
GLOBAL_BATCH = 4  # 2 images per replica on 2 devices (smallest_train_batch(tiny) is 1)
WEIGHT_SEED, BATCH_SEED = 5, 11
FP64_RTOL = 1e-10  # float64: the same per-shard arithmetic, only the all-reduce's and the mean's rounding differ
_REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- the child process
class _Recording:
    """A single-device model whose BN statistics are exported after each loss_and_grads (one per shard)."""

    def __init__(self, model) -> None:
        self.model, self.stats = model, [_statistics(model.export_weights())]

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray):
        result = self.model.loss_and_grads(x, target)
        self.stats.append(_statistics(self.model.export_weights()))
        return result


def _statistics(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The BN running statistics (canonical names ending .mean or .var) of an export_weights() dict."""
    return {n: v for n, v in weights.items() if n.endswith((".mean", ".var"))}


def _error(call) -> tuple[str, str] | None:
    """(exception type, message) raised by call(), or None when it returns."""
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return None


def _child(out: Path) -> None:
    """Every data-parallel computation the tests assert on, pickled to `out`."""
    from impls import tensorflow_data_parallel as dp

    dp.configure_devices(2, "cpu")  # before anything starts TensorFlow's runtime
    from impls import tensorflow_hourglass as single

    weights = impls.init_weights(CONFIG, seed=WEIGHT_SEED)
    x, target = spec.random_batch(CONFIG, GLOBAL_BATCH, BATCH_SEED)  # (4, 32, 32, 3), (4, 8, 8, 5)
    results: dict[str, object] = {"available": dp.available_devices("cpu")}
    errors: dict[str, tuple[str, str] | None] = {}

    # References. One float64 single-device model (function mode: its signature's batch is dynamic, so the
    # shards and the full batch share one trace) gives the shard-by-shard step, the BN statistics before and
    # after each shard, and the full-batch step that one replica must reproduce.
    recording = _Recording(single.build(CONFIG, weights, precision="fp64", execution="function"))
    results["ref/fp64"] = shardwise_reference(recording, x, target, 2)
    results["ref/fp64/stats"] = recording.stats  # [before, after shard 0, after shard 1]
    results["ref/fp64/full"] = recording.model.loss_and_grads(x, target)
    results["ref/fp32/function"] = shardwise_reference(single.build(CONFIG, weights), x, target, 2)

    cases = {"fp64/function": ("fp64", "function", 2), "fp64/xla": ("fp64", "xla", 2),
             "fp32/function": ("fp32", "function", 2), "fp64/function/1": ("fp64", "function", 1)}  # fmt: skip
    for key, (precision, execution, devices) in cases.items():
        with dp.build_data_parallel(CONFIG, weights, devices=devices, precision=precision,
                                    execution=execution) as model:  # fmt: skip
            results[key] = model.loss_and_grads(x, target)
            results[f"{key}/stats"] = _statistics(model.export_weights())
            results[f"{key}/num_params"] = model.num_params()
            if devices == 2 and key != "fp64/function":  # the same global batch: no new trace or compile
                step = model.benchmark_step("forward_backward", GLOBAL_BATCH, seed=0)
                for _ in range(3):
                    step()
                results[f"{key}/benchmark_calls"] = 3
            if key == "fp32/function":  # the benchmark step's batch again: no new trace
                results[f"{key}/allreduce"] = model.allreduce_profile(GLOBAL_BATCH, seed=0, steps=3)
            model.close()  # a second close (the with block's) must be harmless

            if key == "fp32/function":  # a two-device model, now closed
                errors["closed"] = _error(lambda m=model: m.loss_and_grads(x, target))
    # Bad arguments, on a two-device model (a global batch must split over it): rejected before any trace.
    with dp.build_data_parallel(CONFIG, weights, devices=2) as model:
        errors |= {
            "batch_not_divisible": _error(lambda: model.loss_and_grads(x[:3], target[:3])),
            "step_not_divisible": _error(lambda: model.benchmark_step("forward_backward", 3)),
            "phase_forward": _error(lambda: model.benchmark_step("forward", GLOBAL_BATCH)),
            "bad_target": _error(lambda: model.loss_and_grads(x, target[:, :4])),
        }
    errors |= {
        "more_devices_than_configured": _error(lambda: dp.build_data_parallel(CONFIG, devices=3)),
        "configure_after_start": _error(lambda: dp.configure_devices(3, "cpu")),
        "configure_same_after_start": _error(lambda: dp.configure_devices(2, "cpu")),
        "configure_one_after_start": _error(lambda: dp.configure_devices(1, "cpu")),
    }
    results["errors"] = errors
    out.write_bytes(pickle.dumps(results))


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The child's results; fails with its stderr when it does not finish."""
    out = tmp_path_factory.mktemp("tf_data_parallel") / "results.pkl"
    child = subprocess.run([sys.executable, "-m", "tests.test_data_parallel_tensorflow", str(out)], cwd=_REPO,
                           capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert child.returncode == 0, f"child exited {child.returncode}:\n{child.stderr[-6000:]}"
    return pickle.loads(out.read_bytes())


def _assert_step_matches(got: tuple[float, dict], want: tuple[float, dict], rtol: float, grad_rtol: float,
                         what: str) -> None:  # fmt: skip
    (loss, grads), (want_loss, want_grads) = got, want
    assert isinstance(loss, float)
    assert abs(loss - want_loss) <= rtol * abs(want_loss), f"{what}: loss {loss!r} vs {want_loss!r}"
    assert sorted(grads) == sorted(spec.trainable_names(CONFIG)), what
    assert all(g.dtype == next(iter(want_grads.values())).dtype for g in grads.values()), what
    assert_grads_close(grads, want_grads, grad_rtol, what)


@pytest.mark.parametrize("execution", ["function", "xla"])
def test_fp64_step_equals_shardwise_reference(results: dict, execution: str) -> None:
    got = results[f"fp64/{execution}"]
    _assert_step_matches(got, results["ref/fp64"], FP64_RTOL, FP64_RTOL, f"fp64 {execution} vs shardwise")
    assert next(iter(got[1].values())).dtype == np.float64


def test_fp64_step_is_not_the_full_batch_step(results: dict) -> None:
    """Per-replica BN: two replicas of 2 images differ from one BN over 4 (so the check above can fail)."""
    (loss, _), (full_loss, _) = results["fp64/function"], results["ref/fp64/full"]
    assert abs(loss - full_loss) > 1e-6 * abs(full_loss)


def test_fp32_step_matches_shardwise_reference(results: dict) -> None:
    got = results["fp32/function"]
    _assert_step_matches(got, results["ref/fp32/function"], FP32_LOSS_RTOL, FP32_GRAD_RTOL, "fp32 function")
    assert next(iter(got[1].values())).dtype == np.float32


def test_one_device_equals_single_device_model(results: dict) -> None:
    _assert_step_matches(results["fp64/function/1"], results["ref/fp64/full"], FP64_RTOL, FP64_RTOL, "devices=1")


@pytest.mark.parametrize("execution", ["function", "xla"])
def test_running_statistics_are_replica_mean_of_updates(results: dict, execution: str) -> None:
    """Each replica updates its own statistics from its shard; the model reads their mean (SyncOnRead MEAN)."""
    before, after_0, after_1 = results["ref/fp64/stats"]
    got = results[f"fp64/{execution}/stats"]
    decay = spec.BN_DECAY
    assert sorted(got) == sorted(before)
    for name in before:
        # The reference ran the shards one after another: after_0 = decay * before + (1 - decay) * batch_0,
        # after_1 = decay * after_0 + (1 - decay) * batch_1; the replicas each start from `before`.
        update_0 = after_0[name] - decay * before[name]  # (1 - decay) * batch_0, (C,)
        update_1 = after_1[name] - decay * after_0[name]
        want = decay * before[name] + (update_0 + update_1) / 2
        assert_close(got[name], want, FP64_RTOL, f"{name} ({execution})")


def test_num_params_equals_analytic_count(results: dict) -> None:
    assert results["fp64/function/num_params"] == impls.count_params(CONFIG)


def test_benchmark_step_runs(results: dict) -> None:
    assert results["fp64/xla/benchmark_calls"] == 3
    assert results["fp32/function/benchmark_calls"] == 3


def test_allreduce_profile_times_collective_reduce(results: dict) -> None:
    """The TensorFlow profiler shows each replica's CollectiveReduceV2 on logical CPUs: a share of the step."""
    result = results["fp32/function/allreduce"]
    assert set(result) == {"allreduce_ms", "step_ms", "allreduce_share", "method", "ops"}
    assert np.isfinite(result["step_ms"]) and result["step_ms"] > 0
    assert 0 < result["allreduce_share"] < 1, result
    assert result["ops"] and all(op.endswith(":CollectiveReduceV2") for op in result["ops"]), result
    assert result["allreduce_ms"] == pytest.approx(result["allreduce_share"] * result["step_ms"])
    assert "tf.profiler" in result["method"] and "overlap" in result["method"]


_EXPECTED_ERRORS = {
    "batch_not_divisible": ("ValueError", r"global batch 3 does not split over 2 devices; use a multiple of 2"),
    "step_not_divisible": ("ValueError", r"global batch 3 does not split over 2 devices"),
    "phase_forward": ("ValueError", r"phase must be 'forward_backward', got 'forward'"),
    "bad_target": ("ValueError", r"target must have shape \(N, 8, 8, 5\), got \(4, 4, 8, 5\)"),
    "closed": ("RuntimeError", r"closed; build a new one"),
    "more_devices_than_configured": ("ValueError", r"asked for 3 cpu devices but TensorFlow sees 2; "
                                                   r"call impls\.tensorflow_data_parallel\.configure_devices\(3"),
    "configure_after_start": ("RuntimeError", r"already initialised with 2 logical CPU device\(s\).*before any "
                                              r"TensorFlow operation"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_EXPECTED_ERRORS))
def test_bad_use_raises_clear_error(results: dict, case: str) -> None:
    kind, pattern = _EXPECTED_ERRORS[case]
    got = results["errors"][case]
    assert got is not None, f"{case}: nothing raised"
    assert got[0] == kind and re.search(pattern, got[1]), got


def test_configure_devices_again_is_harmless(results: dict) -> None:
    """The same split, or one device, after the runtime started: no error, still two devices."""
    assert results["errors"]["configure_same_after_start"] is None
    assert results["errors"]["configure_one_after_start"] is None
    assert results["available"] == 2


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"devices": 0}, r"devices must be a positive integer, got 0"),
        ({"devices": True}, r"devices must be a positive integer, got True"),
        (
            {"devices": 2, "execution": "eager"},
            r"unknown execution 'eager' for tensorflow; choose one of: function, xla",
        ),
        ({"devices": 2, "precision": "fp16"}, r"unknown precision 'fp16'"),
    ],
)
def test_build_rejects_bad_arguments(kwargs: dict, pattern: str) -> None:
    """Checked before TensorFlow's runtime starts, so safe in this process."""
    from impls import tensorflow_data_parallel as dp

    with pytest.raises(ValueError, match=pattern):
        dp.build_data_parallel(CONFIG, **kwargs)


def test_configure_devices_rejects_bad_arguments() -> None:
    from impls import tensorflow_data_parallel as dp

    with pytest.raises(ValueError, match=r"devices must be a positive integer, got 0"):
        dp.configure_devices(0, "cpu")
    with pytest.raises(ValueError, match=r"unknown device 'tpu'"):
        dp.configure_devices(2, "tpu")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
