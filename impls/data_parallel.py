"""The data-parallel training step's contract, framework-free (imports no framework).

Each `impls/<framework>_data_parallel.py` module exposes:

    FRAMEWORK: str
    EXECUTIONS: tuple[str, ...]          # execution modes supported under data parallelism, default first
    def configure_devices(devices, device)   # called by the worker right after import, before the framework
                                             # starts its runtime (JAX: host devices; TF: logical CPUs)
    def available_devices(device) -> int    # devices this process can offer (after configure_devices)
    def build_data_parallel(config, weights=None, *, devices, device="cpu", precision="fp32",
                            execution=<default>, impl="idiomatic") -> DataParallelModel

A DataParallelModel (duck-typed; see DataParallelModel below) runs one training step over `devices`
replicas in the framework's own engine (torch DistributedDataParallel, tf.distribute.MirroredStrategy,
jax.sharding under jax.jit). Semantics, the same in all three:

- the global batch (N, H, W, 3) is split into `devices` contiguous shards of N / devices images, shard r on
  replica r;
- batch norm uses per-replica batch statistics (each framework's default under data parallelism);
- the loss is the mean over replicas of each replica's loss (sum over stacks of the mean squared error on
  its shard), and the gradient the mean over replicas of each replica's gradient: what DDP's all-reduce
  average gives. `shardwise_reference` computes the same thing shard by shard on one device.

`allreduce_profile(batch_size, seed=0, steps=5)` profiles `steps` of those steps (after PROFILE_WARMUP_STEPS
untimed ones, on benchmark_step's inputs) with the framework's own profiler and returns an AllreduceProfile:
how long the gradient all-reduce ops ran per step, beside the profiled steps' wall clock. The pieces every
framework shares (argument checks, which event names are all-reduces, interval overlap, the result) are
below; reading each profiler's trace is the framework module's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol, TypedDict

import numpy as np

from impls.base import DEVICES, AbstractHourglassModel, check_step_args, check_train_batch, smallest_train_batch
from impls.config import HourglassConfig

PROFILE_WARMUP_STEPS = 2  # untimed steps allreduce_profile runs before the profiled ones (first-call work, caches)


class AllreduceProfile(TypedDict):
    """What allreduce_profile returns (a plain dict). Times are per step, in ms."""

    allreduce_ms: float | None  # time in the gradient all-reduce ops: sum of their durations / steps (per replica)
    step_ms: float  # wall clock of the profiled steps / steps, profiler on
    allreduce_share: float | None  # allreduce_ms / step_ms: of all-reduce op time, not of exposed time
    method: str  # one line: the profiler, the op names counted, whether they overlap compute; why None
    ops: list[str]  # the distinct op/event names counted


class DataParallelModel(Protocol):
    """What build_data_parallel returns. Arrays cross as numpy in canonical layouts, as in AbstractHourglassModel."""

    devices: int

    def num_params(self) -> int:
        """Trainable parameters of one replica (every replica holds the same)."""

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The data-parallel step on the global batch x (N, H, W, 3), target (N, H/4, W/4, K): the loss and the
        all-reduced (replica-mean) gradient of every trainable parameter under canonical names and layouts."""

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0):  # -> Callable[[], None]
        """A zero-argument callable running one data-parallel forward_backward step on the global batch
        impls.spec.random_batch(config, batch_size, seed), inputs placed on every replica beforehand. A call
        returns when every replica's gradients are all-reduced and its device work is complete."""

    def close(self) -> None:
        """Release every replica (ends rank processes where there are any). Idempotent."""

    def allreduce_profile(self, batch_size: int, seed: int = 0, steps: int = 5) -> AllreduceProfile:
        """`steps` data-parallel steps on benchmark_step's inputs, profiled by the framework's own profiler after
        PROFILE_WARMUP_STEPS untimed ones: the gradient all-reduce's time per step and its share of the step.
        Changes no state beyond what that many training steps change."""


def check_device_count(devices: object) -> None:
    """ValueError unless `devices` is a positive int (not a bool)."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}; pass how many replicas to run")


def check_device_name(device: object) -> None:
    """ValueError unless `device` is one of impls.base.DEVICES."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")


def check_offered(devices: int, device: str, available: int, framework: str, module: str) -> None:
    """ValueError unless `devices` is a positive count no larger than the `available` devices `framework` sees;
    on a CPU the fix is to configure them (`module`'s configure_devices) before the framework starts."""
    check_device_count(devices)
    if devices > available:
        fix = (f"call impls.{module}.configure_devices({devices}, 'cpu') right after import, before {framework} starts"
               if device == "cpu" else f"use --devices {available} or fewer")  # fmt: skip
        raise ValueError(f"asked for {devices} {device} devices but {framework} sees {available}; {fix}")


def check_data_parallel_args(devices: int, phase: str, batch_size: int) -> int:
    """ValueError naming a bad device count, phase or global batch; returns the per-device batch."""
    check_step_args(phase, batch_size)
    check_device_count(devices)
    if phase != "forward_backward":
        raise ValueError(f"data parallelism is a training step: phase must be 'forward_backward', got {phase!r}")
    if batch_size % devices:
        raise ValueError(
            f"the global batch {batch_size} does not split over {devices} devices; "
            f"use a multiple of {devices} (per-device batch = global / devices)"
        )
    return batch_size // devices


def check_global_batch(config: HourglassConfig, x: np.ndarray, target: np.ndarray, devices: int,
                       what: str) -> int:  # fmt: skip
    """ValueError naming a bad x (N, H, W, 3) or target (N, H/4, W/4, K), a global batch that does not split
    over `devices`, or a per-replica batch too small for train-mode batch norm; returns the per-replica batch.
    `what` names the call in the message ("loss_and_grads")."""
    h, w = config.input_hw
    shapes = {"x": (x, (h, w, 3)), "target": (target, (*config.heatmap_hw, config.num_keypoints))}
    for name, (array, tail) in shapes.items():
        if array.ndim != 1 + len(tail) or tuple(array.shape[1:]) != tail:
            raise ValueError(f"{what}: {name} must have shape (N, {', '.join(map(str, tail))}), got "
                             f"{tuple(array.shape)}; the model was built for input_hw={config.input_hw}")  # fmt: skip
    if len(target) != len(x):
        raise ValueError(f"{what}: x has {len(x)} images but target {len(target)}; pass one target per image")
    per_replica = check_data_parallel_args(devices, "forward_backward", len(x))
    try:
        check_train_batch(config, per_replica)  # each replica's BN sees only its own shard
    except ValueError as error:
        raise ValueError(
            f"{what}: batch norm is per replica, and a global batch of {len(x)} over {devices} replicas gives "
            f"each {per_replica}: {error} per replica (a global batch of at least "
            f"{devices * smallest_train_batch(config)})"
        ) from None
    return per_replica


def shards(array: np.ndarray, devices: int) -> list[np.ndarray]:
    """`array` split along its first (batch) axis into `devices` contiguous, equal shards."""
    if array.shape[0] % devices:
        raise ValueError(f"a batch of {array.shape[0]} does not split into {devices} equal shards")
    size = array.shape[0] // devices
    return [array[r * size:(r + 1) * size] for r in range(devices)]


def shardwise_reference(
    model: AbstractHourglassModel, x: np.ndarray, target: np.ndarray, devices: int
) -> tuple[float, dict[str, np.ndarray]]:
    """The data-parallel step computed shard by shard on one device: the mean of the per-shard losses and of
    the per-shard gradients, each shard with its own train-mode batch statistics (per-replica BN)."""
    losses, grads_sum = [], None
    for x_r, t_r in zip(shards(x, devices), shards(target, devices), strict=True):
        loss_r, grads_r = model.loss_and_grads(x_r, t_r)
        losses.append(float(loss_r))
        # Accumulate in float64 so the reference adds no rounding of its own beyond the model's.
        if grads_sum is None:
            grads_sum = {k: np.asarray(v, dtype=np.float64).copy() for k, v in grads_r.items()}
        else:
            for k, v in grads_r.items():
                grads_sum[k] += np.asarray(v, dtype=np.float64)
    assert grads_sum is not None
    dtype = next(iter(grads_r.values())).dtype
    return float(np.mean(losses)), {k: (v / devices).astype(dtype) for k, v in grads_sum.items()}


# ---------------------------------------------------------------------------------- all-reduce profiles


def check_allreduce_profile_args(config: HourglassConfig, devices: int, batch_size: int, steps: object) -> int:
    """ValueError naming a bad global batch (as benchmark_step's) or step count; returns the per-replica batch."""
    per_replica = check_data_parallel_args(devices, "forward_backward", batch_size)
    check_train_batch(config, per_replica)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}; profile at least one step")
    return per_replica


def is_allreduce(name: str) -> bool:
    """Whether a profiler event or op name is an all-reduce, whatever the framework spells it: gloo:all_reduce,
    c10d::allreduce_, nccl:all_reduce and NCCL's AllReduce kernels (torch), XLA's all-reduce.N and
    all-reduce-start.N (JAX, TF under XLA), CollectiveReduceV2 and NcclAllReduce (TensorFlow)."""
    flat = name.lower().replace("-", "").replace("_", "")
    return "allreduce" in flat or flat.startswith("collectivereduce")


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """`intervals` (start, end) merged into disjoint ones, in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap_fraction(collective: Iterable[tuple[float, float]], compute: Iterable[tuple[float, float]]) -> float | None:
    """The share of the time covered by `collective` intervals during which some `compute` interval ran too
    (both (start, end) in one clock); None when the collective intervals cover no time."""
    ours, theirs = _union(collective), _union(compute)
    covered = sum(end - start for start, end in ours)
    if covered <= 0:
        return None
    shared, j = 0.0, 0
    for start, end in ours:
        while j < len(theirs) and theirs[j][1] <= start:
            j += 1
        k = j
        while k < len(theirs) and theirs[k][0] < end:
            shared += min(end, theirs[k][1]) - max(start, theirs[k][0])
            k += 1
    return shared / covered


def describe_overlap(fraction: float | None, whose: str) -> str:
    """The method-line phrase "X% of that time <whose> compute ran beside them"."""
    if fraction is None:
        return "no all-reduce time to overlap"
    return f"{fraction:.0%} of that time {whose} compute ran beside them"


def allreduce_result(allreduce_ms: float | None, wall_ms: Sequence[float], method: str,
                     ops: Iterable[str]) -> AllreduceProfile:  # fmt: skip
    """The AllreduceProfile for all-reduce time `allreduce_ms` per step (None: not exposed by the profile) and
    the profiled steps' wall times `wall_ms`."""
    if not wall_ms:
        raise ValueError("no profiled step: wall_ms is empty")
    step_ms = sum(wall_ms) / len(wall_ms)
    if not math.isfinite(step_ms) or step_ms <= 0:
        raise ValueError(f"the profiled steps' wall clock is not a positive time: {list(wall_ms)} ms")
    share = None if allreduce_ms is None else allreduce_ms / step_ms
    return AllreduceProfile(allreduce_ms=allreduce_ms, step_ms=step_ms, allreduce_share=share, method=method,
                            ops=sorted(set(ops)))  # fmt: skip
