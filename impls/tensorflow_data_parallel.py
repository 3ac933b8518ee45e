"""Data-parallel Stacked Hourglass training step in TensorFlow: tf.distribute.MirroredStrategy (impls/data_parallel.py).

One MirroredStrategy over the first `devices` logical CPUs (configure_devices splits the physical CPU) or GPUs.
The single-device model (impls/tensorflow_hourglass.py) is built once inside strategy.scope(), so each of its
tf.Variables is created as a distributed variable with one component per replica device; its network
(StackedHourglass) and heatmap_loss are then called unchanged inside strategy.run, where every variable read
resolves to the running replica's component. The global batch (N, H, W, 3) is split into `devices` contiguous
shards (impls.data_parallel.shards); shard r is copied onto replica r's device beforehand.

Per replica: the single-device train-mode loss on its shard, batch norm over that shard only (per-replica BN,
MirroredStrategy's default) and tf.GradientTape gradients; then one replica-context all_reduce(MEAN) of the
gradient list, so every replica ends holding the replica-mean gradient, as DDP's all-reduce average gives. The
cross-device ops are MirroredStrategy's default: CollectiveAllReduce, with its RING implementation over CPU
devices (logical ones included; float64 and bfloat16 work) and NCCL over physical GPUs.

Variables. Trainable variables (kernels, biases, BN scales and offsets) are MirroredVariables (ON_WRITE, never
written here: no optimizer step). BN running statistics are the only variables the step writes, from replica
context. As MirroredVariables they would need an aggregation, and every assign would then synchronise the
replicas (two cross-replica reductions per BN per step, which DDP does not do, and collectives inside the
per-replica XLA function). They are created instead, through a variable-creator scope (no change to the
single-device module), as SyncOnRead variables with aggregation MEAN, as tf.keras (Keras 2)'s
BatchNormalization creates its moving statistics: each replica updates its own copy from its own batch
statistics, with no communication, and a read outside replica context (export_weights) gives their mean. The
update being linear (new = 0.9 * old + 0.1 * batch), that is the single-device update applied to the
replica-mean of the batch statistics (DDP instead keeps rank 0's and broadcasts it).

Executions: "function" runs strategy.run inside one tf.function; "xla" compiles each replica's loss and
gradient (forward, backward, BN updates) as a tf.function(jit_compile=True) called inside strategy.run, with
the all-reduce outside the compiled cluster: jit_compile of the whole strategy.run puts every replica in one
XLA cluster on one device, which cannot reach the other replicas' variables ("Trying to access resource
.../replica_1 located in device CPU:1 from device CPU:0"). "eager" is not offered: strategy.run works
eagerly, but MirroredStrategy then runs each replica's ops from its own Python thread, handing control back
and forth through merge_call at every collective, and TensorFlow warns that this has significant overhead
and to wrap strategy.run in a tf.function; a timing of it would measure that thread machinery, not data
parallelism.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the import: hides TF's info logs

import numpy as np
import tensorflow as tf

from impls import base, registry, spec
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
    is_allreduce,
    shards,
)
from impls.tensorflow_hourglass import IMPLS, TensorFlowHourglass, gpu_available, heatmap_loss

FRAMEWORK = "tensorflow"
EXECUTIONS: tuple[str, ...] = registry.DATA_PARALLEL_EXECUTIONS[FRAMEWORK]  # ("function", "xla"): no "eager"
_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp64": tf.float64}
_KINDS = {"cpu": "CPU", "gpu": "GPU"}  # tf.config's device type for each of impls.base.DEVICES


# ---------------------------------------------------------------------------------------------- devices
def configure_devices(devices: int, device: str) -> None:
    """Split the physical CPU into `devices` logical CPU devices (device "cpu"; "gpu": nothing, the GPUs are
    the devices). Call it right after import, before any TensorFlow operation: TensorFlow fixes its logical
    devices when its runtime starts."""
    check_device_count(devices)
    check_device_name(device)
    if device != "cpu" or devices == 1:
        return  # the physical CPU is one logical device already; leaving it alone is safe at any time
    cpu = tf.config.list_physical_devices("CPU")[0]  # lists without starting the runtime
    try:
        # Every logical CPU shares the one physical CPU's thread pools; each is a separate placement target
        # with its own executor, which is what MirroredStrategy needs for one replica per device.
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError as error:  # the runtime is up, with another configuration (the same one is accepted)
        raise RuntimeError(
            f"TensorFlow's runtime is already initialised with {available_devices('cpu')} logical CPU device(s), "
            f"so it cannot be split into {devices}; call "
            f"impls.tensorflow_data_parallel.configure_devices({devices}, 'cpu') right after importing the "
            f"module, before any TensorFlow operation, or run in a fresh process ({error})"
        ) from None


def available_devices(device: str) -> int:
    """How many logical `device` devices TensorFlow lists (starts its runtime if it was not yet)."""
    check_device_name(device)
    return len(tf.config.list_logical_devices(_KINDS[device]))


# One MirroredStrategy per device list per process. Each new MirroredStrategy numbers its collectives
# (CollectiveAllReduce's group and instance keys) from the same start, and TensorFlow's collective executor
# remembers a key's dtype and shape for the life of the process: a second strategy's float32 all-reduce under
# a key a first one used for float64 fails ("Collective instance 100 expected ... data_type 2 but got ...
# data_type 1") and aborts every later collective in the process. One strategy keeps its keys unique.
_STRATEGIES: dict[tuple[str, ...], tf.distribute.MirroredStrategy] = {}


def _strategy(device_names: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """This process's MirroredStrategy over `device_names`, created on first use."""
    if device_names not in _STRATEGIES:
        _STRATEGIES[device_names] = tf.distribute.MirroredStrategy(devices=list(device_names))
    return _STRATEGIES[device_names]


def _bn_statistics_on_read(next_creator: Callable[..., tf.Variable], **kwargs: object) -> tf.Variable:
    """Variable creator: non-trainable variables (the BN running statistics, the only ones) become
    SyncOnRead with MEAN aggregation, per replica (see the module docstring); trainable ones pass unchanged."""
    if kwargs.get("trainable") is False:
        kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
        kwargs["aggregation"] = tf.VariableAggregation.MEAN
    return next_creator(**kwargs)


def _variable_named(root: tf.Module, name: str) -> tf.Variable:
    """The variable under canonical `name` (stem.res1.conv1.kernel), by attribute walk from the network."""
    obj: object = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- the model
class TensorflowDataParallel:
    """The Stacked Hourglass training step over `devices` replicas of one tf.distribute.MirroredStrategy."""

    framework = FRAMEWORK

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], *, devices: int, device: str,
                 precision: str, execution: str, impl: str) -> None:  # fmt: skip
        self.config, self.devices, self.device = config, devices, device
        self.precision, self.execution, self.impl = precision, execution, impl
        self._dtype = _DTYPES[precision]
        self._io_dtype = base.io_dtype(precision)  # numpy at the interface: float64 for fp64
        self.device_names = [d.name for d in tf.config.list_logical_devices(_KINDS[device])[:devices]]
        self.strategy = _strategy(tuple(self.device_names))
        with self.strategy.scope(), tf.variable_creator_scope(_bn_statistics_on_read):
            # Built for its variables (one component per replica, created under the scope) and its network;
            # the single-device model's own compiled functions are never called, as they pin one device.
            # `execution` still matters to it: under "xla" the tuned variant keeps the unfused batch norm.
            self._single = TensorFlowHourglass(config, weights, device=device, precision=precision,
                                               execution=execution, impl=impl)  # fmt: skip
        self.net = self._single.net
        self._trainable_names = spec.trainable_names(config)
        self._trainable = [_variable_named(self.net, name) for name in self._trainable_names]
        self._all_names = list(spec.param_shapes(config))
        # Per replica: forward, loss, backward and BN updates; XLA-compiled as one cluster per replica for "xla".
        replica = self._replica_loss_and_grads
        self._replica_compute = tf.function(replica, jit_compile=True) if execution == "xla" else replica
        # One graph for all replicas; traced once per input shape (a PerReplica's shapes are in its spec).
        self._step = tf.function(self._run_step, reduce_retracing=True)
        self._closed = False

    # -------------------------------------------------------------------------------------- the step
    def _replica_loss_and_grads(self, x: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """One replica's train-mode loss and gradients (not reduced), exactly the single-device computation on
        its shard: x (b, H, W, 3), target (b, h, w, K); updates this replica's BN running statistics."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._trainable)  # this replica's components of the parameters, not BN statistics
            heatmaps = self.net(x, True)  # (S, b, h, w, K), BN over this replica's b images
            with tf.name_scope("loss"):
                loss = heatmap_loss(heatmaps, target)
        return loss, tape.gradient(loss, self._trainable)

    def _replica_step(self, x: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """In replica context: the replica's loss and the replica-mean gradients (all-reduced, on every replica)."""
        loss, grads = self._replica_compute(x, target)
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, grads)
        return loss, grads

    def _run_step(self, x: tf.distribute.DistributedValues,
                  target: tf.distribute.DistributedValues) -> tuple[object, list[object]]:  # fmt: skip
        """Cross-replica: every replica's step; PerReplica loss and gradients (the gradients equal on all)."""
        return self.strategy.run(self._replica_step, (x, target))

    # -------------------------------------------------------------------------------------- interface
    def num_params(self) -> int:
        """Elements of every trainable variable of one replica (BN running statistics are not trainable)."""
        self._live()
        return int(sum(np.prod(v.shape) for v in self._trainable))

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The data-parallel step on the global batch: the replica-mean loss and the replica-mean gradients,
        float32 (fp64: float64) under canonical names; updates every replica's BN running statistics."""
        xd, td = self._inputs(x, target, "loss_and_grads")
        losses, grads = self._step(xd, td)
        local = self.strategy.experimental_local_results
        loss = float(np.mean([np.float64(v.numpy()) for v in local(losses)]))
        # After the all-reduce every replica holds the same gradients: read replica 0's.
        return loss, {n: tf.cast(local(g)[0], self._io_dtype).numpy() for n, g in zip(self._trainable_names, grads,
                                                                                        strict=True)}  # fmt: skip

    def step_program(self, batch_size: int, seed: int = 0) -> tuple[Callable, tuple]:
        """The step's tf.function and its arguments, x and target as PerReplica values already on each
        replica's device, for the global batch impls.spec.random_batch(config, batch_size, seed)."""
        self._live()
        x, target = spec.random_batch(self.config, batch_size, seed)
        return self._step, self._inputs(x, target, "benchmark_step")

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """One data-parallel forward_backward step on inputs placed on the replicas beforehand, ending with
        sync_devices, so a call returns when every replica's all-reduced gradients are computed. No optimizer
        update; the BN running statistics are updated, as in tensorflow_hourglass's step."""
        check_data_parallel_args(self.devices, phase, batch_size)
        function, args = self.step_program(batch_size, seed)  # bound now: no lookups inside the timed call
        # The same sync as tensorflow_hourglass: sync_devices() runs SyncDevice on every logical device (a GPU
        # stream drain; a no-op op on a CPU, where the function's call already returned its outputs).
        sync = tf.test.experimental.sync_devices

        def step() -> None:
            # Every replica's loss and all-reduced gradients are outputs of the function, so graph pruning
            # can skip none of them; they stay referenced until the sync returns.
            _outputs = function(*args)
            sync()

        return step

    def allreduce_profile(self, batch_size: int, seed: int = 0, steps: int = 5) -> AllreduceProfile:
        """`steps` calls of benchmark_step's step under the TensorFlow profiler, after PROFILE_WARMUP_STEPS untimed
        ones: the time each replica's gradient all-reduce op (CollectiveReduceV2 on CPUs) ran per step, averaged
        over the replicas. The BN running statistics move as in that many training steps; nothing else changes."""
        # here: a benchmark run loads no profiler
        from impls.profilers.tensorflow_profiling import _op_events, _profiled_steps

        check_allreduce_profile_args(self.config, self.devices, batch_size, steps)
        step = self.benchmark_step("forward_backward", batch_size, seed)
        for _ in range(PROFILE_WARMUP_STEPS):
            step()
        function, args = self.step_program(batch_size, seed)
        graph = function.get_concrete_function(*args).graph  # the trace the steps ran: no retrace
        with tempfile.TemporaryDirectory(prefix="hgbench-tf-allreduce-") as trace_dir:
            wall_ms, _, events, _ = _profiled_steps(step, steps, Path(trace_dir))
        return _allreduce_profile(_op_events(events), graph, wall_ms, steps, self.devices)

    def export_weights(self) -> dict[str, np.ndarray]:
        """Parameters (identical on every replica) and the replica-mean of the BN running statistics, as
        float32 (fp64: float64) numpy under canonical names."""
        self._live()
        with self.strategy.scope():  # cross-replica context: a SyncOnRead read aggregates (MEAN)
            return {name: tf.cast(_variable_named(self.net, name).read_value(), self._io_dtype).numpy()
                    for name in self._all_names}  # fmt: skip

    def settings(self) -> dict[str, object]:
        """What was built and how it runs: the strategy, its devices and cross-device ops, the BN semantics."""
        # The strategy's own choice (a private attribute: MirroredStrategy has no public getter for it)
        cross = getattr(self.strategy.extended, "_cross_device_ops", None)
        return {
            "execution": self.execution, "impl": self.impl, "precision": self.precision, "device": self.device,
            "devices": self.devices, "replica_devices": list(self.device_names),
            "engine": "tf.distribute.MirroredStrategy; strategy.run inside one tf.function; per-replica "
                      "GradientTape then replica_context.all_reduce(MEAN) of the gradients",
            "compile": {"function": "tf.function graph (Grappler)",
                        "xla": "per-replica loss and gradients tf.function(jit_compile=True); all-reduce outside"
                        }[self.execution],
            "cross_device_ops": type(cross).__name__,
            "bn": "per-replica batch statistics; running statistics SyncOnRead (MEAN): replica-mean on read",
            "batch_norm": self._single.settings()["batch_norm"],
            "sync": "tf.test.experimental.sync_devices()",
        }  # fmt: skip

    def close(self) -> None:
        """Drop the model, its variables and compiled functions (freed with the last reference; the process keeps
        its MirroredStrategy for later models). Idempotent."""
        self._closed = True
        self._step = self._replica_compute = None
        self._single = self.net = self.strategy = None
        self._trainable = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    # ---------------------------------------------------------------------------------------- helpers
    def _live(self) -> None:
        """RuntimeError after close()."""
        if self._closed:
            raise RuntimeError("this TensorflowDataParallel model is closed; build a new one with build_data_parallel")

    def _inputs(self, x: np.ndarray, target: np.ndarray,
                what: str) -> tuple[tf.distribute.DistributedValues, tf.distribute.DistributedValues]:  # fmt: skip
        """x (N, H, W, 3) and target (N, h, w, K) checked, cut into `devices` contiguous shards, and shard r
        copied onto replica r's device in the model's dtype: two PerReplica values."""
        self._live()
        x, target = np.asarray(x), np.asarray(target)
        check_global_batch(self.config, x, target, self.devices, what)

        def distribute(array: np.ndarray) -> tf.distribute.DistributedValues:
            pieces = shards(array, self.devices)  # (N / devices, ...) each

            def on_replica(ctx: tf.distribute.experimental.ValueContext) -> tf.Tensor:
                r = ctx.replica_id_in_sync_group
                with tf.device(self.device_names[r]):
                    # identity runs on the device, so the shard lives there even when cast is a no-op (fp32)
                    return tf.identity(tf.cast(tf.convert_to_tensor(pieces[r], self._io_dtype), self._dtype))

            return self.strategy.experimental_distribute_values_from_function(on_replica)

        return distribute(x), distribute(target)


# ------------------------------------------------------------------------------------ all-reduce profile
def _allreduce_profile(ops: list[dict[str, Any]], graph: tf.Graph, wall_ms: list[float], steps: int,
                       devices: int) -> AllreduceProfile:  # fmt: skip
    """The AllreduceProfile of the trace's op executions (impls.profilers.tensorflow_profiling._op_events) over
    `steps` steps on `devices` replicas; `graph` is the step's traced graph, whose all-reduce ops say how
    each replica's gradients reach them."""
    in_graph = [op for op in graph.get_operations() if is_allreduce(op.type)]
    allreduce = [o for o in ops if is_allreduce(o["op"])]
    if not allreduce:
        if not in_graph:
            why = "one replica: the step's graph has no all-reduce op" if devices == 1 else "the step's graph has no all-reduce op"
        else:
            why = (f"the step's graph has {', '.join(sorted({op.type for op in in_graph}))} ops, but the trace "
                   f"shows no execution of them among its {len(ops)} op events")  # fmt: skip
        return allreduce_result(None, wall_ms, f"TensorFlow profiler (tf.profiler.experimental): {why}", [])
    names = sorted({f"{o['scope']}:{o['op']}" if o["scope"] else o["op"] for o in allreduce})
    per_replica = len(allreduce) / steps / devices
    packed = bool(in_graph) and all(t.op.type in ("ConcatV2", "Pack") for op in in_graph for t in op.inputs[:1])
    if packed:
        overlap = ("each replica's gradients are packed (ConcatV2) into one tensor before its all-reduce, so it "
                   "starts only after that replica's whole backward: no overlap with its backward")  # fmt: skip
    else:
        overlap = ("each starts when its gradients are ready, so it may overlap the rest of that replica's "
                   "backward (TensorFlow's executor runs ready ops at once)")  # fmt: skip
    method = (f"TensorFlow profiler (tf.profiler.experimental) over {devices} replicas: durations of the op "
              f"executions {', '.join(names)} (the collective's kernel on the collective executor's thread, from "
              f"its start to done; its parameter resolution before it not counted), {per_replica:g} per replica "
              f"per step, averaged over the replicas; each includes waiting for the other replicas to join it; "
              f"{overlap}")  # fmt: skip
    total_ms = sum(o["total_ms"] for o in allreduce)
    return allreduce_result(total_ms / steps / devices, wall_ms, method, names)


def build_data_parallel(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, devices: int,
                        device: str = "cpu", precision: str = "fp32", execution: str = EXECUTIONS[0],
                        impl: str = IMPLS[0]) -> TensorflowDataParallel:  # fmt: skip
    """A TensorflowDataParallel over the first `devices` logical devices of `device`; weights default to
    impls.spec.init_weights(config, seed=0); impl as in impls.tensorflow_hourglass ("idiomatic" or "tuned")."""
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available, impl=impl, impls=IMPLS)
    check_offered(devices, device, available_devices(device), "TensorFlow", "tensorflow_data_parallel")
    weights = resolve_weights(config, weights)
    return TensorflowDataParallel(config, weights, devices=devices, device=device, precision=precision,
                                  execution=execution, impl=impl)  # fmt: skip
