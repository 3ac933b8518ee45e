"""Data-parallel Stacked Hourglass training step in JAX: jax.sharding under one jax.jit (impls/data_parallel.py).

The single-device model (impls/jax_hourglass.py) is built once and split into (graphdef, params, stats);
params and BN statistics are placed replicated on a one-axis Mesh ("data") over the first `devices` devices,
and the global batch (N, H, W, 3) is reshaped to (devices, N / devices, H, W, 3) with axis 0 sharded over
"data", so replica r holds the contiguous shard x[r*b:(r+1)*b].

Per-replica batch norm. Plain jit over an (N, ...) batch sharded along N would still be one program over the
global batch: every BN would reduce over all N images, and the partitioner would insert an all-reduce for its
statistics (synchronised BN). DDP and MirroredStrategy normalise each replica by its own batch, so here the
single-device loss is jax.vmap-ed over the replica axis (params and stats in_axes=None): inside the vmap a
BN's reductions cover (b, H, W) of one replica only. The loss is the mean over replicas of the per-replica
losses and jax.value_and_grad differentiates that mean, so the gradient is the replica-mean of per-replica
gradients by linearity. Where a parameter meets the sharded replica axis, its gradient is a sum over that
axis, which the SPMD partitioner turns into per-device partial sums and one all-reduce: the compiler, not
this file, writes the gradient reduction (the tests find "all-reduce" in the compiled HLO).

vmap, not jax.shard_map with lax.pmean: the vmapped function is exactly the single-device model's
apply_module/heatmap_loss, with no collective written by hand, and the same program runs on 1 or many
devices. vmap of the loss (then one grad), rather than vmap of value_and_grad: the batching rule folds the
replica axis into the convolutions' batch dimension, so each weight gradient is one ordinary convolution
over all b * devices images; vmap of per-replica gradients would batch both operands of each
weight-gradient convolution, which JAX's batching rule rewrites as a grouped convolution.

BN running statistics: each replica computes the single-device update from its own batch statistics; the
model keeps their replica-mean. The update is linear (new = 0.9 * old + 0.1 * batch), so this is the
single-device update applied to the replica-mean of the batch statistics, which is what
MirroredStrategy's ON_READ/MEAN moving averages give (DDP instead keeps rank 0's and broadcasts it).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from impls import base, spec
from impls.base import check_build_args, resolve_weights
from impls.config import HourglassConfig
from impls.data_parallel import (
    PROFILE_WARMUP_STEPS,
    AllreduceProfile,
    allreduce_result,
    check_allreduce_profile_args,
    check_data_parallel_args,
    check_device_count,
    check_device_name,
    check_global_batch,
    check_offered,
    describe_overlap,
    is_allreduce,
    overlap_fraction,
)
from impls.jax_hourglass import (
    IMPLS,
    _to_numpy,
    apply_module,
    gpu_available,
    heatmap_loss,
    x64_scope,
)
from impls.jax_hourglass import build as build_single

FRAMEWORK = "jax"
EXECUTIONS: tuple[str, ...] = ("jit",)
AXIS = "data"  # the mesh axis the replicas (and the batch's leading replica axis) lie along
_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp64": jnp.float64}
_HOST_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ---------------------------------------------------------------------------------------------- devices
def configure_devices(devices: int, device: str) -> None:
    """Make JAX expose `devices` host CPU devices (device "cpu"; "gpu": nothing to do). Call it right after
    import, before any JAX operation: XLA fixes the host device count when its CPU backend starts."""
    check_device_count(devices)
    check_device_name(device)
    if device != "cpu":
        return  # a GPU's devices are the GPUs the process sees; nothing to create
    if hasattr(jax.config, "jax_num_cpu_devices"):
        try:
            # Raises RuntimeError once the backend is up, unless the value is unchanged.
            jax.config.update("jax_num_cpu_devices", devices)
            return
        except RuntimeError:
            pass  # already initialised: fine if it already has enough devices, checked below
    else:  # an older JAX: the XLA flag, read when the CPU backend starts
        flags = re.sub(rf"{_HOST_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_HOST_COUNT_FLAG}={devices}"])
    have = available_devices("cpu")  # initialises the backend if it was not yet (then with the new count)
    if have < devices:
        raise RuntimeError(
            f"JAX's CPU backend is already initialised with {have} device(s), so it cannot expose {devices}; "
            f"call impls.jax_data_parallel.configure_devices({devices}, 'cpu') right after importing the module, "
            "before any JAX operation (the host device count is fixed when the backend starts), or run in a "
            "fresh process"
        )


def available_devices(device: str) -> int:
    """How many `device` devices JAX sees in this process (0 when it has no such backend)."""
    check_device_name(device)
    try:
        return len(jax.devices(device))
    except RuntimeError:  # no backend of that platform (e.g. "gpu" on a CPU-only jaxlib)
        return 0


# ------------------------------------------------------------------------------------------- the step
def _data_parallel_step(graphdef: nnx.GraphDef) -> Callable:
    """The pure step (params, stats, x (D, b, H, W, 3), target (D, b, h, w, K)) -> (loss, grads, new stats)."""

    def replica_loss(params, stats, x, target):
        # One replica, exactly the single-device loss: x (b, H, W, 3), heatmaps (S, b, h, w, K), BN over b.
        heatmaps, new_stats = apply_module(graphdef, params, stats, (x,), True)
        return heatmap_loss(heatmaps, target), new_stats

    def mean_loss(params, stats, x, target):
        # losses (D,); every new-stats leaf (D, C): one row per replica.
        losses, new_stats = jax.vmap(replica_loss, in_axes=(None, None, 0, 0))(params, stats, x, target)
        # Means over the sharded replica axis: the compiler reduces them across devices.
        return jnp.mean(losses), jax.tree.map(lambda s: jnp.mean(s, axis=0), new_stats)

    def step(params, stats, x, target):
        (loss, new_stats), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, stats, x, target)
        return loss, grads, new_stats  # grads: the replica-mean gradient, same tree as params

    return step


class JaxDataParallel:
    """The Stacked Hourglass training step over `devices` replicas of one Mesh, under one jax.jit."""

    framework = FRAMEWORK

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], *, devices: int, device: str,
                 precision: str, execution: str, impl: str) -> None:  # fmt: skip
        self.config, self.devices, self.device = config, devices, device
        self.precision, self.execution, self.impl = precision, execution, impl
        self._dtype = _DTYPES[precision]
        self._io_dtype = base.io_dtype(precision)
        self.mesh = Mesh(np.array(jax.devices(device)[:devices]), (AXIS,))
        self._replicated = NamedSharding(self.mesh, P())  # every device holds the whole array
        self._batch_sharding = NamedSharding(self.mesh, P(AXIS))  # axis 0 (replicas) split over "data"
        with self.scope():
            # The single-device model checks the weights and its nnx paths against the canonical names;
            # its module is split again here so the replicated state is ours, not that model's.
            single = build_single(config, weights, device=device, precision=precision, impl=impl)
            graphdef, params, stats = nnx.split(single.module(), nnx.Param, nnx.BatchStat)
            self._params = jax.device_put(params, self._replicated)
            self._stats = jax.device_put(stats, self._replicated)
        # Inputs arrive sharded (device_put); outputs replicated, so each device ends with the reduced result.
        self._step = jax.jit(_data_parallel_step(graphdef), out_shardings=self._replicated)
        self._closed = False

    # -------------------------------------------------------------------------------------- interface
    def scope(self) -> contextlib.AbstractContextManager:
        """The context every call into JAX for this model runs in: x64 for fp64 (jax_hourglass.x64_scope)."""
        return x64_scope(self.precision)

    def num_params(self) -> int:
        """Elements of every nnx.Param leaf of one replica (BN running statistics are not counted)."""
        return sum(leaf.size for leaf in jax.tree.leaves(self._live()[0]))

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The data-parallel step on the global batch: replica-mean loss and canonical float32 (fp64: float64)
        replica-mean gradients; stores the replica-mean of the replicas' updated BN running statistics."""
        params, stats = self._live()
        xd, td = self._inputs(x, target, "loss_and_grads")
        with self.scope():
            loss, grads, self._stats = self._step(params, stats, xd, td)
            return float(loss), _to_numpy(grads, self._io_dtype)

    def step_program(self, batch_size: int, seed: int = 0) -> tuple[Callable, tuple]:
        """The jitted step and its device-resident arguments (params, stats, x (D, b, H, W, 3), target
        (D, b, h, w, K)) for the global batch impls.spec.random_batch(config, batch_size, seed).

        For fp64 call (or lower) the function inside self.scope()."""
        check_data_parallel_args(self.devices, "forward_backward", batch_size)
        params, stats = self._live()
        xd, td = self._inputs(*spec.random_batch(self.config, batch_size, seed), "benchmark_step")
        return self._step, (params, stats, xd, td)

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """One jitted data-parallel forward_backward step on inputs sharded beforehand, ending in
        jax.block_until_ready on its outputs (loss, the all-reduced gradients, new BN statistics), so a
        call returns when every device's work is complete. No state is updated (as jax_hourglass's step)."""
        check_data_parallel_args(self.devices, phase, batch_size)
        function, args = self.step_program(batch_size, seed)  # bound now: no lookups inside the timed call

        def step() -> None:
            jax.block_until_ready(function(*args))  # waits on every shard of every output

        if self.precision != "fp64":
            return step

        def step_x64() -> None:
            with jax.enable_x64(True):
                step()

        return step_x64

    def allreduce_profile(self, batch_size: int, seed: int = 0, steps: int = 5) -> AllreduceProfile:
        """`steps` calls of benchmark_step's step under jax.profiler.trace, after PROFILE_WARMUP_STEPS untimed ones:
        the time each device spends in the all-reduce ops that carry gradients, per step, averaged over the
        devices. No state changes (benchmark_step's step updates none)."""
        from impls.profilers.jax_profiling import _profiled_steps  # here: a benchmark run loads no profiler

        check_allreduce_profile_args(self.config, self.devices, batch_size, steps)
        step = self.benchmark_step("forward_backward", batch_size, seed)
        for _ in range(PROFILE_WARMUP_STEPS):
            step()
        function, args = self.step_program(batch_size, seed)
        with self.scope():
            hlo = function.lower(*args).compile().as_text()  # jit's cache: the program the steps run
        with tempfile.TemporaryDirectory(prefix="hgbench-jax-allreduce-") as trace_dir:
            wall_ms, files, _ = _profiled_steps(step, steps, Path(trace_dir))
            perfetto = next(Path(trace_dir, f) for f in files if f.endswith("perfetto_trace.json.gz"))
            events = _hlo_events(perfetto)
        return _allreduce_profile(events, _gradient_allreduces(hlo), wall_ms, steps, self.devices)

    def export_weights(self) -> dict[str, np.ndarray]:
        """Parameters and running statistics (identical on every replica) as canonical numpy."""
        params, stats = self._live()
        return {**_to_numpy(params, self._io_dtype), **_to_numpy(stats, self._io_dtype)}

    def settings(self) -> dict[str, object]:
        """What was built and how it runs: the mesh, the sharding and the BN semantics."""
        return {
            "execution": self.execution, "impl": self.impl, "precision": self.precision, "device": self.device,
            "devices": self.devices, "mesh": f"Mesh(({self.devices},), ('{AXIS}',)) over "
                                             f"{[str(d) for d in self.mesh.devices.flat]}",
            "engine": "jax.jit over jax.sharding; params replicated P(), batch (D, N/D, ...) sharded P('data'); "
                      "jax.vmap of the single-device loss over replicas; the compiler all-reduces gradients",
            "bn": "per-replica batch statistics; running statistics: replica-mean of the per-replica updates",
        }  # fmt: skip

    def close(self) -> None:
        """Drop the replicated state (its device buffers are freed with it). Idempotent."""
        self._closed = True
        self._params = self._stats = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    # ---------------------------------------------------------------------------------------- helpers
    def _live(self) -> tuple[nnx.State, nnx.State]:
        """(params, stats), or RuntimeError after close()."""
        if self._closed:
            raise RuntimeError("this JaxDataParallel model is closed; build a new one with build_data_parallel")
        return self._params, self._stats

    def _inputs(self, x: np.ndarray, target: np.ndarray, what: str) -> tuple[jax.Array, jax.Array]:
        """x (N, H, W, 3) and target (N, h, w, K) checked, cast, reshaped to (D, N/D, ...) and sharded on axis 0."""
        x, target = np.asarray(x), np.asarray(target)
        per_replica = check_global_batch(self.config, x, target, self.devices, what)
        # Row-major reshape (N, ...) -> (D, N/D, ...): replica r gets the contiguous shard x[r*b:(r+1)*b].
        with self.scope():
            return tuple(
                jax.device_put(a.astype(self._dtype).reshape(self.devices, per_replica, *a.shape[1:]),
                               self._batch_sharding)
                for a in (x, target)
            )  # fmt: skip


# ------------------------------------------------------------------------------------ all-reduce profile
# One HLO instruction: its name, then its opcode (the first "word(" after the result shape).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = .*? ([\w-]+)\(")


def _gradient_allreduces(hlo: str) -> dict[str, bool]:
    """Every all-reduce instruction of compiled HLO text -> whether it carries gradients.

    XLA's all-reduce combiner packs the step's cross-replica reductions into few tuple all-reduces: the
    replica-mean of the gradients (their op_name metadata names the backward pass, "transpose(jvp(...))"),
    of the loss and of the BN running statistics ("jvp(...)/reduce_sum"), in whatever mix it chooses.
    """
    found: dict[str, bool] = {}
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if match and is_allreduce(match.group(2)):
            found[match.group(1)] = "transpose(" in line
    return found


def _hlo_events(perfetto_path: Path) -> list[dict[str, Any]]:
    """The executed HLO ops of a jax.profiler perfetto trace: {"op", "device", "start_us", "end_us"}.

    As impls.profilers.jax_profiling._op_events reads it, plus the device: XLA:CPU's thunks carry a
    device_ordinal; on a GPU the kernels lie on one /device: row per GPU, which replace the host's launches.
    """
    with gzip.open(perfetto_path, "rt") as file:
        events = json.load(file)["traceEvents"]
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and str(e.get("args", {}).get("name", "")).startswith("/device:")}  # fmt: skip
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    ops = [e for e in ops if e["pid"] in device_pids] or ops
    return [{"op": e["args"]["hlo_op"], "device": e["args"].get("device_ordinal", e["pid"]), "start_us": e["ts"],
             "end_us": e["ts"] + e["dur"]} for e in ops]  # fmt: skip


def _allreduce_profile(events: list[dict[str, Any]], gradient: dict[str, bool], wall_ms: list[float], steps: int,
                       devices: int) -> AllreduceProfile:  # fmt: skip
    """The AllreduceProfile of the trace's HLO op events over `steps` steps on `devices` devices."""
    allreduce = [e for e in events if is_allreduce(e["op"])]
    if not allreduce:
        why = ("one device: the compiled step has no all-reduce" if devices == 1 else
               f"the trace holds no all-reduce among its {len(events)} HLO op events")  # fmt: skip
        return allreduce_result(None, wall_ms, f"jax.profiler.trace: {why}", [])

    def carries_gradients(op: str) -> bool:  # all-reduce-start.3 / -done.3 are all-reduce.3's async halves
        return gradient.get(op, gradient.get(re.sub(r"-(start|done)", "", op), False))

    counted = [e for e in allreduce if carries_gradients(e["op"])]
    left_out = sorted({e["op"] for e in allreduce} - {e["op"] for e in counted})
    if not counted:  # no metadata to tell them apart: every all-reduce
        counted, left_out, which = allreduce, [], "every all-reduce (HLO metadata did not say which carry gradients)"
    else:
        which = "the all-reduces whose operands include gradients (HLO op_name metadata)"
    shown = len({e["device"] for e in counted})
    overlaps = [overlap_fraction([(e["start_us"], e["end_us"]) for e in counted if e["device"] == device],
                                 [(e["start_us"], e["end_us"]) for e in events
                                  if e["device"] == device and not is_allreduce(e["op"])])
                for device in {e["device"] for e in counted}]  # fmt: skip
    overlaps = [o for o in overlaps if o is not None]
    overlap = sum(overlaps) / len(overlaps) if overlaps else None
    left_out_ms = sum(e["end_us"] - e["start_us"] for e in allreduce if e["op"] in left_out) / 1e3 / steps / shown
    names = sorted({e["op"] for e in counted})
    method = (f"jax.profiler.trace (perfetto trace): durations of the XLA ops {', '.join(names)} ({which}; "
              f"XLA's all-reduce combiner may pack other replica-means, of the loss or BN running statistics, "
              f"into the same op, which the trace cannot split), "
              f"summed per device and averaged over the {shown} devices' thunk events"
              + (f"; left out: {', '.join(left_out)} (no gradient among its operands, {left_out_ms:.3g} ms per step)"
                 if left_out else "")
              + "; each includes waiting at the rendezvous for the other devices; "
              f"{describe_overlap(overlap, 'the same device')} (other HLO ops of that device)")  # fmt: skip
    total_ms = sum(e["end_us"] - e["start_us"] for e in counted) / 1e3
    return allreduce_result(total_ms / steps / shown, wall_ms, method, names)


def build_data_parallel(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, devices: int,
                        device: str = "cpu", precision: str = "fp32", execution: str = EXECUTIONS[0],
                        impl: str = IMPLS[0]) -> JaxDataParallel:  # fmt: skip
    """A JaxDataParallel over the first `devices` JAX devices of `device`; weights default to
    impls.spec.init_weights(config, seed=0); impl as in impls.jax_hourglass ("idiomatic" or "tuned")."""
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available, impl=impl, impls=IMPLS)
    check_offered(devices, device, available_devices(device), "JAX", "jax_data_parallel")
    weights = resolve_weights(config, weights)
    return JaxDataParallel(config, weights, devices=devices, device=device, precision=precision,
                           execution=execution, impl=impl)  # fmt: skip
