"""Stacked Hourglass in TensorFlow: small tf.Module layers, NHWC activations, HWIO kernels, explicit padding.

Executions: "eager" (op by op), "function" (one tf.function graph per pass, optimised by Grappler) and
"xla" (the same functions with jit_compile=True). Keras is not used: Keras 3 adds per-layer overhead in
eager mode and hides the padding and BN momentum conventions that impls.spec fixes explicitly.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the import: hides TF's info logs

import numpy as np
import tensorflow as tf

from impls import base, profiling, registry, spec
from impls.base import PHASES, AbstractHourglassModel, check_build_args, resolve_weights
from impls.config import HourglassConfig

FRAMEWORK = "tensorflow"
EXECUTIONS: tuple[str, ...] = registry.EXECUTIONS[FRAMEWORK]
PRECISIONS: tuple[str, ...] = base.PRECISIONS
_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16}
_DEVICES = {"cpu": "/CPU:0", "gpu": "/GPU:0"}


class _Context:
    """What every layer constructor needs: the layer specs by canonical name, the weights and the dtype."""

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], dtype: tf.DType) -> None:
        self.config = config
        self.specs = {layer.name: layer for layer in spec.layers(config)}
        self.weights = weights
        self.dtype = dtype

    def variable(self, name: str, trainable: bool = True) -> tf.Variable:
        """A variable holding canonical weight `name`; its TF name is the canonical one with '/' for '.'."""
        value = tf.cast(self.weights[name], self.dtype)  # fp32 -> fp32 is a no-op: the bits are kept
        return tf.Variable(value, trainable=trainable, name=name.replace(".", "/"))


class Conv2d(tf.Module):
    """2-D convolution with the spec's explicit (possibly asymmetric) padding; kernel (kh, kw, c_in, c_out)."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name.rsplit(".", 1)[-1])
        conv: spec.ConvSpec = ctx.specs[name]
        self.kernel = ctx.variable(f"{name}.kernel")
        self.bias = ctx.variable(f"{name}.bias") if conv.bias else None
        self.stride = conv.stride
        (top, bottom), (left, right) = conv.pad
        self.padding = [[0, 0], [top, bottom], [left, right], [0, 0]]

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = tf.nn.conv2d(x, self.kernel, self.stride, self.padding)
        return y if self.bias is None else tf.nn.bias_add(y, self.bias)


class BatchNorm2d(tf.Module):
    """Batch norm over (N, H, W): batch statistics (biased variance) in training, running ones otherwise."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name.rsplit(".", 1)[-1])
        self.scale = ctx.variable(f"{name}.scale")
        self.bias = ctx.variable(f"{name}.bias")
        self.mean = ctx.variable(f"{name}.mean", trainable=False)
        self.var = ctx.variable(f"{name}.var", trainable=False)

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        if training:
            mean, var = tf.nn.moments(x, axes=[0, 1, 2])  # (C,) each; moments' variance is the biased one
            # new = 0.9 * old + 0.1 * batch (Keras momentum 0.9 = PyTorch momentum 0.1)
            self.mean.assign(spec.BN_DECAY * self.mean + (1.0 - spec.BN_DECAY) * mean)
            self.var.assign(spec.BN_DECAY * self.var + (1.0 - spec.BN_DECAY) * var)
        else:
            mean, var = self.mean, self.var
        return tf.nn.batch_normalization(x, mean, var, self.bias, self.scale, spec.BN_EPSILON)


class Residual(tf.Module):
    """Bottleneck residual block, post-activation (seed) or pre-activation (Newell) per config.block."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name.rsplit(".", 1)[-1])
        self.preact = ctx.config.block == "preact"
        self.conv1, self.bn1 = Conv2d(f"{name}.conv1", ctx), BatchNorm2d(f"{name}.bn1", ctx)
        self.conv2, self.bn2 = Conv2d(f"{name}.conv2", ctx), BatchNorm2d(f"{name}.bn2", ctx)
        self.conv3, self.bn3 = Conv2d(f"{name}.conv3", ctx), BatchNorm2d(f"{name}.bn3", ctx)
        # The spec lists a skip conv only where c_in != c_out; only post-activation blocks normalise it.
        self.skip_conv = Conv2d(f"{name}.skip_conv", ctx) if f"{name}.skip_conv" in ctx.specs else None
        self.skip_bn = BatchNorm2d(f"{name}.skip_bn", ctx) if f"{name}.skip_bn" in ctx.specs else None

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        relu = tf.nn.relu
        if self.preact:
            y = self.conv1(relu(self.bn1(x, training)))
            y = self.conv2(relu(self.bn2(y, training)))
            y = self.conv3(relu(self.bn3(y, training)))
            return y + (x if self.skip_conv is None else self.skip_conv(x))
        y = relu(self.bn1(self.conv1(x), training))
        y = relu(self.bn2(self.conv2(y), training))
        y = relu(self.bn3(self.conv3(y), training))
        skip = x if self.skip_conv is None else relu(self.skip_bn(self.skip_conv(x), training))
        return relu(y + skip)


class Hourglass(tf.Module):
    """One hourglass level: a full-resolution branch plus a half-resolution branch that recurses."""

    def __init__(self, name: str, depth: int, ctx: _Context) -> None:
        super().__init__(name=name.rsplit(".", 1)[-1])
        self.up1 = Residual(f"{name}.up1", ctx)
        self.low1 = Residual(f"{name}.low1", ctx)
        self.low2 = Hourglass(f"{name}.low2", depth - 1, ctx) if depth > 1 else Residual(f"{name}.low2", ctx)
        self.low3 = Residual(f"{name}.low3", ctx)

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        up1 = self.up1(x, training)
        low = self.low1(tf.nn.max_pool2d(x, 2, 2, "VALID"), training)  # (N, H/2, W/2, C)
        low = self.low3(self.low2(low, training), training)
        return up1 + _upsample_nearest_2x(low)  # (N, H, W, C)


class Stem(tf.Module):
    """7x7/2 conv-BN-ReLU, a residual, a 2x2 pool and two residuals: (N, H, W, 3) -> (N, H/4, W/4, C)."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name)
        self.conv, self.bn = Conv2d(f"{name}.conv", ctx), BatchNorm2d(f"{name}.bn", ctx)
        self.res1 = Residual(f"{name}.res1", ctx)
        self.res2 = Residual(f"{name}.res2", ctx)
        self.res3 = Residual(f"{name}.res3", ctx)
        self.pool = tf.nn.avg_pool2d if ctx.config.stem_pool == "avg" else tf.nn.max_pool2d

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        x = tf.nn.relu(self.bn(self.conv(x), training))  # (N, H/2, W/2, C/4)
        x = self.res1(x, training)  # (N, H/2, W/2, C/2)
        x = self.pool(x, 2, 2, "VALID")  # (N, H/4, W/4, C/2)
        return self.res3(self.res2(x, training), training)  # (N, H/4, W/4, C)


class Head(tf.Module):
    """Per-stack output: features for the next stack (`previous`) and K heatmaps."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name)
        self.res = Residual(f"{name}.res", ctx)
        self.lin_conv, self.lin_bn = Conv2d(f"{name}.lin_conv", ctx), BatchNorm2d(f"{name}.lin_bn", ctx)
        self.heatmap_conv = Conv2d(f"{name}.heatmap_conv", ctx)

    def __call__(self, x: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        previous = tf.nn.relu(self.lin_bn(self.lin_conv(self.res(x, training)), training))  # (N, h, w, C)
        return previous, self.heatmap_conv(previous)  # heatmaps (N, h, w, K)


class Merge(tf.Module):
    """Feeds a stack's features and heatmaps back into the next stack's input."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name)
        self.feature_conv = Conv2d(f"{name}.feature_conv", ctx)
        self.heatmap_conv = Conv2d(f"{name}.heatmap_conv", ctx)

    def __call__(self, x: tf.Tensor, previous: tf.Tensor, heatmaps: tf.Tensor) -> tf.Tensor:
        return x + self.feature_conv(previous) + self.heatmap_conv(heatmaps)


class StackedHourglass(tf.Module):
    """The whole network: stem, then num_stacks x (hourglass, head), merged between stacks."""

    def __init__(self, ctx: _Context) -> None:
        super().__init__(name="stacked_hourglass")
        self.num_stacks = ctx.config.num_stacks
        self.stem = Stem("stem", ctx)
        for i in range(self.num_stacks):
            setattr(self, f"hourglass_{i}", Hourglass(f"hourglass_{i}", ctx.config.depth, ctx))
            setattr(self, f"head_{i}", Head(f"head_{i}", ctx))
            if i < self.num_stacks - 1:
                setattr(self, f"merge_{i}", Merge(f"merge_{i}", ctx))

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        # Each stage runs in a name scope named after it, so profiled graph ops read "stem/...",
        # "gradient_tape/head_0/...". Graph modes pay for scopes at trace time only; eager, a few µs per step.
        with tf.name_scope("stem"):
            x = self.stem(x, training)  # (N, h, w, C) with h, w = H/4, W/4
        outputs = []
        for i in range(self.num_stacks):
            with tf.name_scope(f"hourglass_{i}"):
                y = getattr(self, f"hourglass_{i}")(x, training)
            with tf.name_scope(f"head_{i}"):
                previous, heatmaps = getattr(self, f"head_{i}")(y, training)
            outputs.append(heatmaps)
            if i < self.num_stacks - 1:
                with tf.name_scope(f"merge_{i}"):
                    x = getattr(self, f"merge_{i}")(x, previous, heatmaps)
        return tf.stack(outputs)  # (S, N, h, w, K)


def _upsample_nearest_2x(x: tf.Tensor) -> tf.Tensor:
    """Nearest-neighbour 2x upsampling as tile + reshape (its gradient is a plain reduce-sum)."""
    _, h, w, c = x.shape  # static under every execution: only the batch dimension may be unknown
    y = tf.tile(x[:, :, None, :, None, :], [1, 1, 2, 1, 2, 1])  # (N, h, 2, w, 2, C)
    return tf.reshape(y, [-1, 2 * h, 2 * w, c])  # (N, 2h, 2w, C)


def _loss(heatmaps: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Sum over stacks of mean((heatmaps_s - target)^2); heatmaps (S, N, h, w, K), target (N, h, w, K)."""
    return tf.reduce_sum(tf.reduce_mean(tf.square(heatmaps - target), axis=[1, 2, 3, 4]))


def _variable_at(root: tf.Module, name: str) -> tf.Variable:
    """The variable under canonical `name`, found by walking attribute names (stem.res1.conv1.kernel)."""
    obj: object = root
    for part in name.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, tf.Variable):
        raise TypeError(f"canonical name {name!r} leads to {type(obj).__name__}, not a tf.Variable")
    return obj


class TensorFlowHourglass(AbstractHourglassModel):
    """A built network on one device, with one execution mode and precision; see impls.base for the contract."""

    framework = FRAMEWORK

    def __init__(
        self, config: HourglassConfig, weights: dict[str, np.ndarray], device: str, precision: str, execution: str
    ) -> None:
        self.config, self.device, self.precision, self.execution = config, device, precision, execution
        self._tf_device = _DEVICES[device]
        self._dtype = _DTYPES[precision]
        with tf.device(self._tf_device):
            self.net = StackedHourglass(_Context(config, weights, self._dtype))
        # Canonical name <-> variable, by attribute walk; the count check catches any variable it misses.
        self._variables = {name: _variable_at(self.net, name) for name in spec.param_shapes(config)}
        if len(self._variables) != len(self.net.variables):
            raise AssertionError(f"{len(self.net.variables)} variables in the tree, {len(self._variables)} mapped")
        self._trainable_names = spec.trainable_names(config)
        self._trainable = [self._variables[name] for name in self._trainable_names]

        # Built once per model: separate functions per training flag, so no call ever retraces.
        h, w = config.input_hw
        hh, hw = config.heatmap_hw
        x_spec = tf.TensorSpec([None, h, w, 3], self._dtype)
        target_spec = tf.TensorSpec([None, hh, hw, config.num_keypoints], self._dtype)
        self._forward_eval = self._compile(lambda x: self._forward(x, False), [x_spec])
        self._forward_train = self._compile(lambda x: self._forward(x, True), [x_spec])
        self._loss_grads = self._compile(self._loss_and_grads, [x_spec, target_spec])

    def _compile(self, fn: Callable, signature: list[tf.TensorSpec]) -> Callable:
        """`fn` itself in eager mode, else one tf.function (XLA-compiled for "xla") with a fixed signature."""
        if self.execution == "eager":
            return fn
        # The batch dimension is dynamic in the signature, so one trace serves every batch size; XLA
        # still compiles once per concrete shape at run time.
        return tf.function(fn, input_signature=signature, jit_compile=self.execution == "xla")

    def _forward(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        with tf.device(self._tf_device):
            return self.net(x, training)

    def _loss_and_grads(self, x: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.device(self._tf_device):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(self._trainable)  # exactly the parameters that get gradients, not BN statistics
                heatmaps = self.net(x, True)  # (S, N, h, w, K)
                with tf.name_scope("loss"):
                    loss = _loss(heatmaps, target)
            return loss, tape.gradient(loss, self._trainable)

    def _to_device(self, a: np.ndarray) -> tf.Tensor:
        """A numpy array as a tensor on the model's device in the model's dtype."""
        with tf.device(self._tf_device):
            # identity runs on the device, so the result lives there even when cast is a no-op (fp32)
            return tf.identity(tf.cast(tf.convert_to_tensor(a, tf.float32), self._dtype))

    def _check_input(self, x: np.ndarray, target: np.ndarray | None = None) -> None:
        h, w = self.config.input_hw
        if np.ndim(x) != 4 or tuple(np.shape(x)[1:]) != (h, w, 3):
            raise ValueError(f"input must be (N, {h}, {w}, 3) NHWC, got shape {np.shape(x)}")
        want = (np.shape(x)[0], *self.config.heatmap_hw, self.config.num_keypoints)
        if target is not None and tuple(np.shape(target)) != want:
            raise ValueError(f"target must be {want} (N, H/4, W/4, K), got shape {np.shape(target)}")

    def num_params(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.net.trainable_variables))

    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        self._check_input(x)
        forward = self._forward_train if train_mode else self._forward_eval
        heatmaps = forward(self._to_device(x))  # (S, N, h, w, K)
        return tf.cast(heatmaps, tf.float32).numpy()

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        self._check_input(x, target)
        loss, grads = self._loss_grads(self._to_device(x), self._to_device(target))
        return float(loss), {
            n: tf.cast(g, tf.float32).numpy() for n, g in zip(self._trainable_names, grads, strict=True)
        }

    def export_weights(self) -> dict[str, np.ndarray]:
        return {name: np.array(tf.cast(v, tf.float32).numpy(), dtype=np.float32) for name, v in self._variables.items()}

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        rng = np.random.default_rng(seed)
        h, w = self.config.input_hw
        hh, hw = self.config.heatmap_hw
        x = self._to_device(rng.standard_normal((batch_size, h, w, 3), dtype=np.float32))
        target = self._to_device(rng.standard_normal((batch_size, hh, hw, self.config.num_keypoints), dtype=np.float32))
        # Sync: sync_devices() blocks until the device's stream has drained (a no-op op on CPU). It is the
        # cheapest honest choice: fetching a scalar that depends on every gradient would add one reduction
        # kernel per parameter (hundreds at the seed preset). The outputs stay referenced until it returns.
        sync = tf.test.experimental.sync_devices
        if phase == "forward":
            forward = self._forward_eval

            def step() -> None:
                _heatmaps = forward(x)  # (S, N, h, w, K), kept referenced until the sync
                sync()
        else:
            loss_grads = self._loss_grads

            def step() -> None:
                # Every gradient is an output of the function, so graph pruning cannot skip any.
                _loss, _grads = loss_grads(x, target)
                sync()

        return step

    def reset_peak_memory(self) -> None:
        if self.device == "gpu":
            tf.config.experimental.reset_memory_stats("GPU:0")

    def peak_memory_bytes(self) -> int | None:
        if self.device != "gpu":
            return None
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])

    def settings(self) -> dict[str, object]:
        compile_mode = {
            "eager": "op by op (no tf.function)",
            "function": "tf.function graph, Grappler default optimisations",
            "xla": "tf.function(jit_compile=True)",
        }[self.execution]
        return {
            **super().settings(),
            "tf_device": self._tf_device,
            "layout": "NHWC (Grappler may transpose to NCHW on GPU in function mode)",
            "compile": compile_mode,
            "input_signature": "batch dimension dynamic, one trace per pass",
            "dtype": self._dtype.name,
            "batch_norm": "tf.nn.moments + tf.nn.batch_normalization (unfused ops)",
            "sync": "tf.test.experimental.sync_devices()",
            "tf32_enabled": tf.config.experimental.tensor_float_32_execution_enabled(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        }


def gpu_available() -> bool:
    """True when TensorFlow sees at least one GPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def runtime_info() -> dict:
    """TensorFlow version, devices, threads and the settings that change speed."""
    gpus = tf.config.list_physical_devices("GPU")
    details = [tf.config.experimental.get_device_details(g) for g in gpus]
    build = tf.sysconfig.get_build_info()
    return {
        "framework": FRAMEWORK,
        "version": tf.__version__,
        "devices": [d.name for d in tf.config.list_physical_devices()],
        "gpu_available": bool(gpus),
        "gpu_names": [d.get("device_name") for d in details],
        "gpu_compute_capability": [d.get("compute_capability") for d in details],
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),  # 0: TF decides
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),  # 0: TF decides
        "cpu_count": os.cpu_count(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),  # unset: oneDNN on (x86 Linux default)
        "tf32_enabled": tf.config.experimental.tensor_float_32_execution_enabled(),
        "xla_auto_jit": tf.config.optimizer.get_jit(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "TF_XLA_FLAGS": os.environ.get("TF_XLA_FLAGS"),
        "TF_GPU_ALLOCATOR": os.environ.get("TF_GPU_ALLOCATOR"),
        "TF_FORCE_GPU_ALLOW_GROWTH": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
        "TF_DETERMINISTIC_OPS": os.environ.get("TF_DETERMINISTIC_OPS"),
        "TF_SET_ONEDNN_FPMATH_MODE": os.environ.get("TF_SET_ONEDNN_FPMATH_MODE"),  # BF16: oneDNN may round fp32
        "is_cuda_build": build.get("is_cuda_build"),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
    }


def build(
    config: HourglassConfig,
    weights: dict[str, np.ndarray] | None = None,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    execution: str = EXECUTIONS[0],
    **options: object,
) -> TensorFlowHourglass:
    """A TensorFlow Stacked Hourglass for `config`, holding `weights` (default: impls.init_weights(config, 0))."""
    if options:
        raise ValueError(f"tensorflow's build takes no extra options, got {sorted(options)}; remove them")
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available)
    weights = resolve_weights(config, weights)
    return TensorFlowHourglass(config, weights, device, precision, execution)


def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                   precision: str = "fp32", seed: int = 0) -> Callable[[], None]:
    """One stride-1 SAME conv without bias, on device-resident random data: the conv-ceiling probe.

    Runs as a tf.function (the graph path the model's fastest modes use); each call ends with sync_devices.
    """
    if device == "gpu" and not gpu_available():
        raise RuntimeError("no GPU visible to tensorflow; use --device cpu")
    rng = np.random.default_rng(seed)
    n, h, w, c_in = input_shape
    with tf.device(_DEVICES[device]):
        x = tf.cast(tf.constant(rng.standard_normal((n, h, w, c_in), dtype=np.float32)), _DTYPES[precision])
        kernel = tf.cast(
            tf.constant(rng.standard_normal((kernel_size, kernel_size, c_in, c_out), dtype=np.float32)), _DTYPES[precision]
        )
        conv = tf.function(lambda a, k: tf.nn.conv2d(a, k, strides=1, padding="SAME"))

    def step() -> None:
        with tf.device(_DEVICES[device]):
            _y = conv(x, kernel)  # (N, H, W, c_out), kept referenced until the sync
        tf.test.experimental.sync_devices()

    return step


def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32",
                   seed: int = 0) -> Callable[[], None]:  # fmt: skip
    """One (m, k) @ (k, n) matmul on device-resident random data, as a tf.function; each call ends synced."""
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(_DTYPES)}")
    if device not in _DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(_DEVICES)}")
    if device == "gpu" and not gpu_available():
        raise RuntimeError("no GPU visible to tensorflow; use --device cpu")
    rng = np.random.default_rng(seed)
    with tf.device(_DEVICES[device]):
        a = tf.cast(tf.constant(rng.standard_normal((m, k), dtype=np.float32)), _DTYPES[precision])  # (m, k)
        b = tf.cast(tf.constant(rng.standard_normal((k, n), dtype=np.float32)), _DTYPES[precision])  # (k, n)
        matmul = tf.function(tf.linalg.matmul)

    def step() -> None:
        with tf.device(_DEVICES[device]):
            _c = matmul(a, b)  # (m, n), kept referenced until the sync
        tf.test.experimental.sync_devices()

    return step


# ---------------------------------------------------------------------------------------------------------------
# profile(): the contract is in impls/profiling.py.

_TRACE_JSON = "tensorflow_trace.json"  # Chrome trace: opens in https://ui.perfetto.dev
_LOGDIR = "tensorflow_logdir"  # TensorBoard logdir: plugins/profile/<run>/<host>.xplane.pb
_STEP_EVENT = "hgbench_step"  # TraceMe around each profiled step: the step windows in the trace
_EAGER_PREFIX = "EagerLocalExecute: "
_Window = tuple[int, int]  # (start_ps, end_ps) of one profiled step in the trace's clock


def profile(config: HourglassConfig, *, phase: str, batch_size: int, execution: str, trace_dir: str,
            device: str = "cpu", precision: str = "fp32", warmup: int = 2, steps: int = 5, seed: int = 0,
            top_k: int = 25) -> dict:  # fmt: skip
    """Time and profile `steps` steady-state `phase` steps with the TensorFlow profiler (see impls.profiling)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}; profile at least one step")
    model = build(config, device=device, precision=precision, execution=execution)
    step = model.benchmark_step(phase, batch_size, seed)
    fn = None if execution == "eager" else model._forward_eval if phase == "forward" else model._loss_grads
    first_call_ms = _time_ms(step)
    for _ in range(warmup):
        step()
    traces_before = fn.experimental_get_tracing_count() if fn is not None else None
    step_ms = statistics.median(_time_ms(step) for _ in range(steps))
    wall_ms, windows, events, trace_files = _profile_steps(step, steps, Path(trace_dir))
    recompilations = fn.experimental_get_tracing_count() - traces_before if fn is not None else None

    op_events = _op_events(events)
    op_step_ms = statistics.median(wall_ms)
    method, stage_ms, stage_step_ms, note = _stages(model, phase, batch_size, seed, op_events, windows, wall_ms,
                                                    warmup, steps)  # fmt: skip
    return {
        "framework": FRAMEWORK, "execution": execution, "phase": phase, "batch_size": batch_size,
        "precision": precision, "device": device, "step_ms": step_ms, "stage_method": method,
        "stage_step_ms": stage_step_ms, "stage_note": note,
        "stages": [{"stage": name, "ms": ms} for name, ms in stage_ms.items()],
        "ops": profiling.op_table(op_events, steps, top_k), "op_step_ms": op_step_ms, "trace_files": trace_files,
        "flops": _graph_flops(model, phase, batch_size),
        "compile": _compile_info(model, fn, first_call_ms, recompilations, batch_size),
    }  # fmt: skip


def _stages(model: TensorFlowHourglass, phase: str, batch_size: int, seed: int, op_events: list[dict[str, Any]],
            windows: list[_Window], wall_ms: list[float], warmup: int,
            steps: int) -> tuple[str, dict[str, float], float, str]:  # fmt: skip
    """(method, ms per stage, stage_step_ms, note): the profiler's scopes where the trace has them, else staged."""
    median = sorted(range(steps), key=wall_ms.__getitem__)[(steps - 1) // 2]  # lower median, as time_staged
    stage_ms, reason = _profiler_stages(model.config, model.execution, op_events, windows, median, steps)
    if reason is None:
        attributed = sum(stage_ms.values()) / wall_ms[median]
        note = (f"ops' wall time attributed to the stage name scope in their names (forward and gradient ops), "
                f"time of ops of several stages running at once split evenly between them; {attributed:.0%} "
                f"of the median profiled step is attributed, the rest is executor overhead and unscoped ops")
        return "profiler", stage_ms, statistics.median(wall_ms), note  # stage_step_ms = op_step_ms
    # XLA compiles each stage once (its first call); the warm-up step keeps that out of the timed steps.
    stage_ms, staged_ms = _time_staged_stages(model, phase, batch_size, seed, max(warmup, 1), steps)
    how = {"eager": "called eagerly", "function": "each a tf.function", "xla": "each a tf.function(jit_compile=True)"}
    note = f"{reason}; stages {how[model.execution]}, timed one after another with a device sync between them"
    if phase == "forward_backward":
        note += "; backward: one GradientTape per stage, its gradient taken in reverse stage order"
    return "staged", stage_ms, staged_ms, note


def _time_ms(step: Callable[[], None]) -> float:
    """Wall time of one synced call in ms."""
    t0 = time.perf_counter_ns()
    step()
    return (time.perf_counter_ns() - t0) / 1e6


def _profile_steps(step: Callable[[], None], steps: int,
                   trace_dir: Path) -> tuple[list[float], list[_Window], list[dict[str, Any]], list[str]]:  # fmt: skip
    """Run `steps` steps under the profiler; (wall ms per step, step windows in ps, events, trace files)."""
    logdir = trace_dir / _LOGDIR
    before = {p: p.stat().st_mtime_ns for p in logdir.rglob("*.xplane.pb")}
    wall_ms = []
    tf.profiler.experimental.start(str(logdir))
    try:
        for index in range(steps):
            t0 = time.perf_counter_ns()
            with tf.profiler.experimental.Trace(_STEP_EVENT, step_num=index, _r=1):
                step()
            wall_ms.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        tf.profiler.experimental.stop()
    written = [p for p in logdir.rglob("*.xplane.pb") if before.get(p) != p.stat().st_mtime_ns]
    if not written:
        raise RuntimeError(f"the TensorFlow profiler wrote no .xplane.pb under {logdir}; is the directory writable?")
    events = _read_xspace(written[0])
    windows = sorted((e["start_ps"], e["start_ps"] + e["dur_ps"]) for e in events if e["name"] == _STEP_EVENT)
    _write_chrome_trace(events, trace_dir / _TRACE_JSON)
    return wall_ms, windows, events, [_TRACE_JSON, str(written[0].relative_to(trace_dir))]


def _read_xspace(path: Path) -> list[dict[str, Any]]:
    """Every timed event of an XSpace file: plane/line ids, name, op type, absolute start and duration in ps."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF's own copy of the profiler's proto

    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    events = []
    for pid, plane in enumerate(space.planes):
        for tid, line in enumerate(plane.lines):
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                stats = {plane.stat_metadata[s.metadata_id].name: _stat_value(plane, s) for s in event.stats}
                events.append({
                    "plane": plane.name, "line": line.name, "pid": pid, "tid": tid, "name": meta.name,
                    "type": meta.display_name, "start_ps": line.timestamp_ns * 1000 + event.offset_ps,
                    "dur_ps": event.duration_ps, "stats": stats,
                })  # fmt: skip
    return events


def _stat_value(plane: Any, stat: Any) -> object:
    """An XStat's value as a plain JSON-able Python value (a ref_value is a name in the plane's stat table)."""
    kind = stat.WhichOneof("value")
    if kind == "ref_value":
        return plane.stat_metadata[stat.ref_value].name
    value = getattr(stat, kind) if kind else None
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _write_chrome_trace(events: list[dict[str, Any]], path: Path) -> None:
    """The events as a Chrome trace JSON (µs), so Perfetto opens the trace without TensorBoard."""
    t0_ps = min((e["start_ps"] for e in events), default=0)
    trace = [{"name": e["name"], "ph": "X", "ts": (e["start_ps"] - t0_ps) / 1e6, "dur": e["dur_ps"] / 1e6,
              "pid": e["pid"], "tid": e["tid"], **({"args": e["stats"]} if e["stats"] else {})}
             for e in events if e["dur_ps"] > 0]  # fmt: skip
    names = {(e["pid"], e["tid"]): (e["plane"], e["line"]) for e in events}
    for (pid, tid), (plane, line) in names.items():
        trace.append({"name": "process_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": plane}})
        trace.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": line}})
    path.write_text(json.dumps({"displayTimeUnit": "ms", "traceEvents": trace}))


def _op_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The op executions among `events`, {"op", "scope", "start_ps", "end_ps", "total_ms", "self_ms"}.

    Graph ops are named "<scope>/<name>:<type>"; eager ops "EagerLocalExecute: <type>" (no scope); XLA's
    HLO instructions carry an "hlo_op" stat. On a GPU, the device plane's kernels (with their "tf_op") are
    the step's work, so they replace the host's op events, which only time the launches.
    """
    ops = []
    for e in events:
        name, on_gpu = e["name"], e["plane"].startswith("/device:GPU")
        if "hlo_op" in e["stats"]:
            scope, op = "", str(e["stats"]["hlo_op"])  # XLA fuses across stages: no scope
        elif on_gpu:
            # tf_op: the launching op's annotation, nested ones joined by "::" ("<fn>:<fn>::stem/Conv2D:Conv2D")
            scope, _, op = str(e["stats"].get("tf_op", "")).split("::")[-1].rpartition(":")
            if not op or op.startswith("__"):
                scope, op = "", name  # a kernel outside any TF op, or inside a whole XLA program
        elif e["type"] and name.endswith(":" + e["type"]):
            scope, op = name[: -len(e["type"]) - 1], e["type"]
        elif name.startswith(_EAGER_PREFIX):
            scope, op = "", name[len(_EAGER_PREFIX):]
        else:
            continue
        if op.startswith("__"):
            continue  # a call of a whole function ("__inference_...", an XLA program): its own ops are listed
        ops.append({"op": op, "scope": scope, "start_ps": e["start_ps"], "end_ps": e["start_ps"] + e["dur_ps"],
                    "key": (e["pid"], e["tid"]), "device": on_gpu})  # fmt: skip
    if any(o["device"] for o in ops):
        ops = [o for o in ops if o["device"]]
    _set_self_times(ops)
    return ops


def _set_self_times(ops: list[dict[str, Any]]) -> None:
    """total_ms and self_ms (total less the ops nested inside it on the same thread) of every op, in place."""
    stack: list[dict[str, Any]] = []
    for op in sorted(ops, key=lambda o: (o["key"], o["start_ps"], -o["end_ps"])):
        op["total_ms"] = op["self_ms"] = (op["end_ps"] - op["start_ps"]) / 1e9
        while stack and (stack[-1]["key"] != op["key"] or stack[-1]["end_ps"] <= op["start_ps"]):
            stack.pop()
        if stack and op["end_ps"] <= stack[-1]["end_ps"]:
            stack[-1]["self_ms"] -= op["total_ms"]
        stack.append(op)


_NO_SCOPES = {
    "eager": "the trace's eager op events carry no name scope",
    "function": "the trace's graph op events carry no name scope",
    "xla": "XLA fuses across stage boundaries and its HLO op events carry no name scope",
}


def _profiler_stages(config: HourglassConfig, execution: str, ops: list[dict[str, Any]], windows: list[_Window],
                     median: int, steps: int) -> tuple[dict[str, float], str | None]:  # fmt: skip
    """Stage ms of the median profiled step from the ops' scoped names, or ({}, why that is impossible)."""
    names = profiling.stage_names(config)
    if not any(o["scope"] for o in ops):
        return {}, _NO_SCOPES[execution]
    if len(windows) != steps:
        return {}, f"the trace holds {len(windows)} '{_STEP_EVENT}' windows for {steps} steps"
    start_ps, end_ps = windows[median]
    owned = [(max(o["start_ps"], start_ps), min(o["end_ps"], end_ps), _stage_in_scope(o["scope"], names))
             for o in ops if o["end_ps"] > start_ps and o["start_ps"] < end_ps]  # fmt: skip
    stage_ms = _split_concurrent(owned)
    missing = [n for n in names if stage_ms.get(n, 0.0) <= 0]
    if missing:
        return {}, f"no op in the trace carries the name scope of {missing}"
    return {n: stage_ms[n] for n in [*names, *profiling.EXTRA_STAGES] if stage_ms.get(n, 0.0) > 0}, None


def _stage_in_scope(scope: str, names: list[str]) -> str:
    """The first component of "gradient_tape/head_0/res/Conv2D" that is a stage name (or "loss"), else ""."""
    return next((part for part in scope.split("/") if part in names or part in profiling.EXTRA_STAGES), "")


def _split_concurrent(intervals: list[tuple[int, int, str]]) -> dict[str, float]:
    """ms per owner of (start_ps, end_ps, owner) intervals; time where owners overlap is split evenly.

    TF's executor runs independent ops on several threads at once, so plain sums of op times could exceed
    the step; this split makes the owners' times sum to the union of the intervals, at most the window.
    """
    edges = sorted([(s, 1, owner) for s, e, owner in intervals] + [(e, -1, owner) for s, e, owner in intervals])
    active: dict[str, int] = {}
    owned_ps: dict[str, float] = {}
    previous_ps = edges[0][0] if edges else 0
    for t_ps, change, owner in edges:
        if active:
            for name in active:
                owned_ps[name] = owned_ps.get(name, 0.0) + (t_ps - previous_ps) / len(active)
        previous_ps = t_ps
        active[owner] = active.get(owner, 0) + change
        if not active[owner]:
            del active[owner]
    return {owner: ps / 1e9 for owner, ps in owned_ps.items() if owner}


def _time_staged_stages(model: TensorFlowHourglass, phase: str, batch_size: int, seed: int, warmup: int,
                        steps: int) -> tuple[dict[str, float], float]:  # fmt: skip
    """Per-stage ms and staged-step ms: one callable per stage (and per stage backward), synced between them."""
    training = phase == "forward_backward"
    rng = np.random.default_rng(seed)
    h, w = model.config.input_hw
    hh, hw = model.config.heatmap_hw
    x = model._to_device(rng.standard_normal((batch_size, h, w, 3), dtype=np.float32))  # (N, H, W, 3)
    target = model._to_device(rng.standard_normal((batch_size, hh, hw, model.config.num_keypoints), dtype=np.float32))
    graph = _stage_graph(model.net, model.config.num_stacks, training, target)
    calls = []
    for name, ins, outs, body in graph:
        variables = list(getattr(model.net, name).trainable_variables) if name != "loss" else []
        calls.append((name, _stage_forward(_stage_function(model, name, body), name, ins, outs, variables, training)))
    if training:
        calls += [(name, _stage_backward(name, ins, outs)) for name, ins, outs, _ in reversed(graph)]
    # One tf.function per stage from one closure makes TF warn about "retracing"; each is traced once, by design.
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")
    try:
        return profiling.time_staged(
            calls, x, lambda _state: tf.test.experimental.sync_devices(), warmup=warmup, steps=steps
        )
    finally:
        logger.setLevel(level)


def _stage_graph(net: StackedHourglass, stacks: int, training: bool,
                 target: tf.Tensor) -> list[tuple[str, list[str], list[str], Callable]]:  # fmt: skip
    """(stage, input keys, output keys, body) in execution order; keys name the values passed between stages.

    x<i>: stack i's input (N, h, w, C); y<i>: its hourglass output; p<i>, h<i>: its head's features and
    heatmaps (N, h, w, K). The loss stage (training only) takes every h<i>, as StackedHourglass + _loss do.
    """
    graph = [("stem", ["input"], ["x0"], functools.partial(net.stem, training=training))]
    for i in range(stacks):
        hourglass, head = getattr(net, f"hourglass_{i}"), getattr(net, f"head_{i}")
        graph.append((f"hourglass_{i}", [f"x{i}"], [f"y{i}"], functools.partial(hourglass, training=training)))
        graph.append((f"head_{i}", [f"y{i}"], [f"p{i}", f"h{i}"], functools.partial(head, training=training)))
        if i < stacks - 1:
            graph.append((f"merge_{i}", [f"x{i}", f"p{i}", f"h{i}"], [f"x{i + 1}"], getattr(net, f"merge_{i}")))
    if training:
        heads = [f"h{i}" for i in range(stacks)]
        graph.append(("loss", heads, ["loss"], lambda *hs: _loss(tf.stack(hs), target)))  # stack: (S, N, h, w, K)
    return graph


def _stage_function(model: TensorFlowHourglass, name: str, body: Callable) -> Callable:
    """`body` in the stage's name scope on the model's device, compiled as the model's execution mode is."""

    def run(*args: tf.Tensor) -> tuple[tf.Tensor, ...]:
        with tf.device(model._tf_device), tf.name_scope(name):
            out = body(*args)
        return out if isinstance(out, tuple) else (out,)

    return run if model.execution == "eager" else tf.function(run, jit_compile=model.execution == "xla")


def _stage_forward(fn: Callable, name: str, ins: list[str], outs: list[str], variables: list[tf.Variable],
                   training: bool) -> Callable:  # fmt: skip
    """A time_staged call running one stage forward; in training it keeps a tape for the stage's backward."""

    def call(state: Any) -> dict:
        state = {"env": {"input": state}, "tapes": {}, "cotangents": {}, "grads": []} if name == "stem" else state
        args = [state["env"][key] for key in ins]
        # The network input needs no gradient (the analytic count leaves out the first conv's input gradient).
        if training:
            sources = ([] if name == "stem" else args) + variables
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(sources)
                values = fn(*args)
            state["tapes"][name] = (tape, sources, values)
        else:
            values = fn(*args)
        state["env"].update(zip(outs, values, strict=True))
        return state

    return call


def _stage_backward(name: str, ins: list[str], outs: list[str]) -> Callable:
    """A time_staged call running one stage's backward: its output cotangents to input and variable gradients."""

    def call(state: dict) -> dict:
        tape, sources, values = state["tapes"].pop(name)
        cotangents = state["cotangents"]
        # The loss starts the backward (cotangent None means ones); outputs nobody consumed get none.
        pairs = [(v, cotangents.pop(k, None)) for k, v in zip(outs, values, strict=True)
                 if name == "loss" or k in cotangents]  # fmt: skip
        output_gradients = None if name == "loss" else [g for _, g in pairs]
        grads = tape.gradient([v for v, _ in pairs], sources, output_gradients=output_gradients,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)  # fmt: skip
        n_inputs = 0 if name == "stem" else len(ins)
        for key, grad in zip(ins[:n_inputs], grads[:n_inputs], strict=True):
            cotangents[key] = cotangents[key] + grad if key in cotangents else grad
        state["grads"].extend(grads[n_inputs:])  # the parameter gradients, kept until the step ends
        return state

    return call


def _graph_flops(model: TensorFlowHourglass, phase: str, batch_size: int) -> dict:
    """The TF profiler's float_operation count over the step's graph, ops the outputs depend on only."""
    h, w = model.config.input_hw
    hh, hw = model.config.heatmap_hw
    x_spec = tf.TensorSpec([batch_size, h, w, 3], model._dtype)  # fully defined: flop stats need static shapes
    target_spec = tf.TensorSpec([batch_size, hh, hw, model.config.num_keypoints], model._dtype)
    if phase == "forward":
        concrete = tf.function(lambda x: model._forward(x, False)).get_concrete_function(x_spec)
    else:
        concrete = tf.function(model._loss_and_grads).get_concrete_function(x_spec, target_spec)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    tree = tf.compat.v1.profiler.profile(graph=concrete.graph, options=options)
    live = _live_op_names(concrete.graph)
    by_type: dict[str, int] = {}
    nodes, pruned_flops = list(tree.children), 0
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.float_ops and node.name in live:
            op_type = concrete.graph.get_operation_by_name(node.name).type
            by_type[op_type] = by_type.get(op_type, 0) + int(node.float_ops)
        elif node.float_ops:
            pruned_flops += int(node.float_ops)
    dead = (f"{pruned_flops} FLOPs of dead ops left out (the gradient builder also emits the first conv's input "
            f"gradient, which nothing uses and Grappler prunes before running); " if pruned_flops else "")
    conv_flops = sum(f for t, f in by_type.items() if "Conv2D" in t)  # Conv2D, Conv2DBackpropInput/Filter
    others = ", ".join(f"{t} {f}" for t, f in sorted(by_type.items(), key=lambda kv: -kv[1]) if "Conv2D" not in t)
    note = (f"tf.compat.v1.profiler float_operation() on the step's graph traced at batch {batch_size} (the same "
            f"graph for every execution mode; 2 FLOPs per multiply-add), summed per op type over the ops the "
            f"outputs and side effects depend on; {dead}"
            f"conv_flops = Conv2D + Conv2DBackpropInput + Conv2DBackpropFilter; total_flops also counts "
            f"{others or 'nothing else'} (ReLU and copies have no registered FLOP statistics)")  # fmt: skip
    return {"source": "tf.compat.v1.profiler.profile(float_operation)", "conv_flops": conv_flops,
            "total_flops": sum(by_type.values()), "note": note}  # fmt: skip


def _live_op_names(graph: tf.Graph) -> set[str]:
    """Names of the ops that the function's outputs and control outputs (variable updates) depend on."""
    stack = [t.op for t in graph.outputs] + list(graph.control_outputs)
    live: set[str] = set()
    while stack:
        op = stack.pop()
        if op.name not in live:
            live.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return live


def _compile_info(model: TensorFlowHourglass, fn: Any, first_call_ms: float, recompilations: int | None,
                  batch_size: int) -> dict:  # fmt: skip
    """first_call_ms, tracing time, retraces in the timed loops and program size of the step's function."""
    if fn is None:
        return {"first_call_ms": first_call_ms, "trace_compile_ms": None, "recompilations_in_timed_loop": None,
                "program_size": None, "program_size_unit": "",
                "note": "eager: ops run one by one, nothing is traced or compiled"}  # fmt: skip
    # Tracing alone, timed on a fresh copy of the step's tf.function so the model's own stays untouched.
    copy = tf.function(fn.python_function, input_signature=fn.input_signature)
    t0 = time.perf_counter_ns()
    copy.get_concrete_function()
    trace_ms = (time.perf_counter_ns() - t0) / 1e6
    if model.execution == "xla":
        rng = np.random.default_rng(0)
        args = [model._to_device(rng.standard_normal([batch_size, *spec_.shape[1:]], dtype=np.float32))
                for spec_ in fn.input_signature]  # fmt: skip
        size, unit = len(fn.experimental_get_compiler_ir(*args)(stage="hlo")), "chars of HLO text"
    else:
        size, unit = len(fn.get_concrete_function().graph.get_operations()), "ops"
    what = "XLA compilation" if model.execution == "xla" else "Grappler's graph optimisation"
    return {"first_call_ms": first_call_ms, "trace_compile_ms": trace_ms,
            "recompilations_in_timed_loop": recompilations, "program_size": size, "program_size_unit": unit,
            "note": (f"trace_compile_ms is Python tracing alone (a fresh copy of the step's tf.function); "
                     f"{what} happens inside the first call; recompilations count retraces "
                     f"(experimental_get_tracing_count) over the timed and profiled loops")}  # fmt: skip
