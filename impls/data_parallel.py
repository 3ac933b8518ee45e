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
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from impls.base import DEVICES, AbstractHourglassModel, check_step_args, check_train_batch, smallest_train_batch
from impls.config import HourglassConfig


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
