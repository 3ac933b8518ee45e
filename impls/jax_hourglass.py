"""Stacked Hourglass in JAX with Flax NNX: the module tree of impls.spec, run through plain jax.jit.

The modules mirror the PyTorch implementation attribute for attribute, so an nnx state path such as
('hourglass_0', 'up1', 'conv1', 'kernel') is the canonical name "hourglass_0.up1.conv1.kernel" and
nnx's HWIO kernels are already the canonical layout. The model is split once into
(graphdef, params, stats); the jitted functions are pure in those and merge the module inside the trace,
so calls pay no nnx graph traversal.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

from impls import base, profiling, registry, spec
from impls.base import PHASES, AbstractHourglassModel, check_build_args, resolve_weights
from impls.config import HourglassConfig

FRAMEWORK = "jax"
EXECUTIONS: tuple[str, ...] = registry.EXECUTIONS[FRAMEWORK]
PRECISIONS: tuple[str, ...] = base.PRECISIONS
_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}

HW = tuple[int, int]
# Kernels start at zero: the real weights always come from a canonical dict (impls.spec.init_weights),
# and a random initialiser would compile one XLA program per kernel shape (seconds at build time).
_ZEROS = nnx.initializers.zeros_init()


# ----------------------------------------------------------------------------------------------- modules
def _conv(config: HourglassConfig, hw: HW, c_in: int, c_out: int, k: int, *, rngs: nnx.Rngs,
          stride: int = 1, bias: bool = True) -> nnx.Conv:
    """An nnx.Conv with the explicit padding of impls.spec (frameworks disagree on SAME for stride 2)."""
    pad = spec.conv_padding(config, hw, k, stride)
    return nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=pad, use_bias=bias, rngs=rngs, kernel_init=_ZEROS)


def _bn(channels: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm with the spec's decay (flax momentum 0.9 = torch 0.1) and epsilon.

    use_fast_variance=False: two-pass variance, E[(x - mean)^2], as PyTorch and the numpy oracle do;
    flax's default E[x^2] - E[x]^2 loses digits when activations have a large mean.
    """
    return nnx.BatchNorm(channels, momentum=spec.BN_DECAY, epsilon=spec.BN_EPSILON,
                         use_fast_variance=False, rngs=rngs)


def _max_pool(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # (N, H/2, W/2, C)


def _avg_pool(x: jax.Array) -> jax.Array:
    return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # (N, H/2, W/2, C)


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)  # (N, 2H, 2W, C)


class Residual(nnx.Module):
    """Bottleneck residual block: "postact" (conv-BN-ReLU x3, c/4) or "preact" (BN-ReLU-conv x3, c/2)."""

    def __init__(self, config: HourglassConfig, hw: HW, c_in: int, c_out: int, *, rngs: nnx.Rngs) -> None:
        self.preact = config.block == "preact"
        cb = config.conv_bias
        mid = c_out // 2 if self.preact else c_out // 4
        self.conv1 = _conv(config, hw, c_in, mid, 1, bias=cb, rngs=rngs)
        self.bn1 = _bn(c_in if self.preact else mid, rngs=rngs)  # preact normalises the block's input
        self.conv2 = _conv(config, hw, mid, mid, 3, bias=cb, rngs=rngs)
        self.bn2 = _bn(mid, rngs=rngs)
        self.conv3 = _conv(config, hw, mid, c_out, 1, bias=cb, rngs=rngs)
        self.bn3 = _bn(mid if self.preact else c_out, rngs=rngs)
        self.has_skip = c_in != c_out
        if self.has_skip:
            self.skip_conv = _conv(config, hw, c_in, c_out, 1, bias=cb, rngs=rngs)
            if not self.preact:
                self.skip_bn = _bn(c_out, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        relu = jax.nn.relu
        if self.preact:
            y = self.conv1(relu(self.bn1(x, use_running_average=ura)))
            y = self.conv2(relu(self.bn2(y, use_running_average=ura)))
            y = self.conv3(relu(self.bn3(y, use_running_average=ura)))
            skip = self.skip_conv(x) if self.has_skip else x
            return y + skip
        y = relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = relu(self.bn3(self.conv3(y), use_running_average=ura))
        skip = relu(self.skip_bn(self.skip_conv(x), use_running_average=ura)) if self.has_skip else x
        return relu(y + skip)


class Hourglass(nnx.Module):
    """One hourglass level: a full-resolution branch plus pool -> (nested hourglass) -> upsample."""

    def __init__(self, config: HourglassConfig, hw: HW, depth: int, *, rngs: nnx.Rngs) -> None:
        c = config.channels
        low_hw = (hw[0] // 2, hw[1] // 2)
        self.up1 = Residual(config, hw, c, c, rngs=rngs)
        self.low1 = Residual(config, low_hw, c, c, rngs=rngs)
        self.low2 = (Hourglass(config, low_hw, depth - 1, rngs=rngs) if depth > 1
                     else Residual(config, low_hw, c, c, rngs=rngs))
        self.low3 = Residual(config, low_hw, c, c, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        up1 = self.up1(x, train)  # (N, H, W, C)
        low = self.low1(_max_pool(x), train)  # (N, H/2, W/2, C)
        low = self.low3(self.low2(low, train), train)
        return up1 + _upsample_nearest_2x(low)


class Stem(nnx.Module):
    """7x7/2 conv-BN-ReLU, residual, 2x2 pool, two residuals: (N, H, W, 3) -> (N, H/4, W/4, C)."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs) -> None:
        c_stem, c_half = config.stem_channels
        hw = config.heatmap_hw
        conv_hw = (hw[0] * 2, hw[1] * 2)
        self.conv = _conv(config, config.input_hw, 3, c_stem, 7, stride=2, bias=config.conv_bias, rngs=rngs)
        self.bn = _bn(c_stem, rngs=rngs)
        self.res1 = Residual(config, conv_hw, c_stem, c_half, rngs=rngs)
        self.pool = _avg_pool if config.stem_pool == "avg" else _max_pool
        self.res2 = Residual(config, hw, c_half, c_half, rngs=rngs)
        self.res3 = Residual(config, hw, c_half, config.channels, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))  # (N, H/2, W/2, C/4)
        x = self.res1(x, train)  # (N, H/2, W/2, C/2)
        x = self.pool(x)  # (N, H/4, W/4, C/2)
        return self.res3(self.res2(x, train), train)  # (N, H/4, W/4, C)


class Head(nnx.Module):
    """Residual, 1x1 conv-BN-ReLU, then the linear 1x1 heatmap conv."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs) -> None:
        c, hw = config.channels, config.heatmap_hw
        self.res = Residual(config, hw, c, c, rngs=rngs)
        self.lin_conv = _conv(config, hw, c, c, 1, bias=config.conv_bias, rngs=rngs)
        self.lin_bn = _bn(c, rngs=rngs)
        self.heatmap_conv = _conv(config, hw, c, config.num_keypoints, 1, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        y = self.res(x, train)
        previous = jax.nn.relu(self.lin_bn(self.lin_conv(y), use_running_average=not train))  # (N, h, w, C)
        return previous, self.heatmap_conv(previous)  # heatmaps (N, h, w, K)


class Merge(nnx.Module):
    """Feeds a stack's features and heatmaps back into the next stack's input."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs) -> None:
        c, k, hw = config.channels, config.num_keypoints, config.heatmap_hw
        self.feature_conv = _conv(config, hw, c, c, 1, rngs=rngs)
        self.heatmap_conv = _conv(config, hw, k, c, 1, rngs=rngs)

    def __call__(self, x: jax.Array, previous: jax.Array, heatmaps: jax.Array) -> jax.Array:
        return x + self.feature_conv(previous) + self.heatmap_conv(heatmaps)


class StackedHourglass(nnx.Module):
    """Stem, then num_stacks hourglass+head pairs joined by merges; returns every stack's heatmaps."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs) -> None:
        self.num_stacks = config.num_stacks
        self.stem = Stem(config, rngs=rngs)
        for i in range(config.num_stacks):
            setattr(self, f"hourglass_{i}", Hourglass(config, config.heatmap_hw, config.depth, rngs=rngs))
            setattr(self, f"head_{i}", Head(config, rngs=rngs))
            if i < config.num_stacks - 1:
                setattr(self, f"merge_{i}", Merge(config, rngs=rngs))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self._stage("stem", x, train)  # (N, h, w, C)
        outputs = []
        for i in range(self.num_stacks):
            y = self._stage(f"hourglass_{i}", x, train)
            previous, heatmaps = self._stage(f"head_{i}", y, train)
            outputs.append(heatmaps)
            if i < self.num_stacks - 1:
                x = self._stage(f"merge_{i}", x, previous, heatmaps)
        return jnp.stack(outputs)  # (S, N, h, w, K)

    def _stage(self, name: str, *args: Any) -> Any:
        # named_scope only labels the HLO ops' metadata at trace time: the compiled program is unchanged
        with jax.named_scope(name):
            return getattr(self, name)(*args)


# ------------------------------------------------------------------------------------ state <-> canonical
def _canonical(path: tuple) -> str:
    """nnx state path -> canonical name: the attribute names are the canonical ones, so join with dots."""
    return ".".join(str(part) for part in path)


def _fill_state(template: nnx.State, weights: dict[str, np.ndarray], dtype, device) -> nnx.State:
    """`template`'s paths and Variable types holding the canonical `weights`, as `dtype`, on `device`."""
    return nnx.from_flat_state([
        (path, var.copy(jax.device_put(np.asarray(weights[_canonical(path)]).astype(dtype), device)))
        for path, var in nnx.to_flat_state(template)
    ])


def _to_numpy(state: nnx.State) -> dict[str, np.ndarray]:
    """Canonical name -> float32 numpy for every variable of `state`."""
    return {_canonical(path): np.asarray(var.get_value(), np.float32) for path, var in nnx.to_flat_state(state)}


# ------------------------------------------------------------------------------------------------- model
class JaxHourglass(AbstractHourglassModel):
    """A StackedHourglass held as (graphdef, params, stats) with its jitted pure functions."""

    framework = FRAMEWORK

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], device: str,
                 precision: str, execution: str) -> None:
        self.config, self.device, self.precision, self.execution = config, device, precision, execution
        self._device = jax.devices(device)[0]
        self._dtype = _DTYPES[precision]
        with jax.default_device(self._device):  # the placeholder zeros never touch another device
            module = StackedHourglass(config, rngs=nnx.Rngs(0))
        graphdef, init_params, init_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
        names = {_canonical(p) for p, _ in [*nnx.to_flat_state(init_params), *nnx.to_flat_state(init_stats)]}
        differ = sorted(names ^ set(spec.param_shapes(config)))
        if differ:  # a bug in the module tree, not a user error
            raise RuntimeError(f"nnx state paths differ from impls.spec's canonical names: {differ[:5]}")
        self._params = _fill_state(init_params, weights, self._dtype, self._device)
        self._stats = _fill_state(init_stats, weights, self._dtype, self._device)
        self._graphdef = graphdef  # kept for profile()'s per-stage functions
        self._forward_eval, self._forward_train, self._loss_and_grads = _jitted_functions(graphdef)

    def num_params(self) -> int:
        """Elements of every nnx.Param leaf (BN running statistics are nnx.BatchStat, not counted)."""
        return sum(leaf.size for leaf in jax.tree.leaves(self._params))

    def _input(self, x: np.ndarray, what: str, shape: tuple[int, ...]) -> jax.Array:
        """`x` checked against `shape` (any batch size), cast to the model's dtype, on its device."""
        x = np.asarray(x)
        if x.ndim != len(shape) or tuple(x.shape[1:]) != shape[1:]:
            raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape[1:]))}), got {tuple(x.shape)}; "
                             f"the model was built for input_hw={self.config.input_hw}")
        return jax.device_put(x.astype(self._dtype), self._device)

    def _x_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.config.input_hw, 3)

    def _target_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.config.heatmap_hw, self.config.num_keypoints)

    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        """Heatmaps (S, N, h, w, K) float32; train mode uses batch statistics and updates the running ones."""
        xd = self._input(x, "x", self._x_shape(len(x)))
        if train_mode:
            heatmaps, self._stats = self._forward_train(self._params, self._stats, xd)
        else:
            heatmaps = self._forward_eval(self._params, self._stats, xd)
        return np.asarray(heatmaps.astype(jnp.float32))

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Train-mode loss and canonical float32 gradients of every nnx.Param; updates running stats."""
        xd = self._input(x, "x", self._x_shape(len(x)))
        td = self._input(target, "target", self._target_shape(len(x)))
        loss, grads, self._stats = self._loss_and_grads(self._params, self._stats, xd, td)
        return float(loss), _to_numpy(grads)

    def export_weights(self) -> dict[str, np.ndarray]:
        """Parameters and running statistics as canonical float32 numpy."""
        return {**_to_numpy(self._params), **_to_numpy(self._stats)}

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """One jitted step on inputs already on the device, ending in jax.block_until_ready.

        forward_backward computes the train-mode new running statistics and returns them from the jitted
        function (so XLA cannot drop that work) but does not store them: no state update is timed.
        """
        function, args = self._step_program(phase, batch_size, seed)  # bound now: no lookups inside the timed call

        def step() -> None:
            jax.block_until_ready(function(*args))  # forward: heatmaps; forward_backward: loss, grads, new stats
        return step

    def _step_program(self, phase: str, batch_size: int, seed: int) -> tuple[Callable, tuple]:
        """The jitted function a `phase` step calls and its device-resident arguments (params, stats, x[, target])."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        rng = np.random.default_rng(seed)
        x = self._input(rng.standard_normal(self._x_shape(batch_size), np.float32), "x", self._x_shape(batch_size))
        if phase == "forward":
            return self._forward_eval, (self._params, self._stats, x)
        shape = self._target_shape(batch_size)
        target = self._input(rng.standard_normal(shape, np.float32), "target", shape)
        return self._loss_and_grads, (self._params, self._stats, x, target)

    def peak_memory_bytes(self) -> int | None:
        """XLA allocator peak on the GPU since process start (JAX has no reset); None on CPU."""
        if self.device == "cpu":
            return None
        memory = self._device.memory_stats()  # None where the backend keeps no allocator statistics
        return None if memory is None else int(memory.get("peak_bytes_in_use", 0))

    def reset_peak_memory(self) -> None:
        """No-op: JAX exposes no peak reset, so the peak counts from process start (one process per cell)."""

    def settings(self) -> dict[str, object]:
        """Layout, jit mode, dtype and XLA settings that change speed."""
        return {
            **super().settings(),
            "layout": "NHWC activations, HWIO kernels",
            "compile": "jax.jit of pure functions over (params, stats), made at build time, compiled on the "
                       "first call per input shape; nnx.merge runs only at trace time",
            "dtype": str(jnp.dtype(self._dtype)),
            "bn": "flax nnx.BatchNorm, two-pass variance (use_fast_variance=False)",
            "matmul_precision": jax.config.jax_default_matmul_precision,
            "tf32": ("XLA may use TF32 for fp32 convs on Ampere+ GPUs at the default precision"
                     if self.device == "gpu" and self.precision == "fp32" else "n/a"),
            "jax_enable_x64": bool(jax.config.jax_enable_x64),
            "platform": self._device.platform,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "peak_memory": "device.memory_stats()['peak_bytes_in_use'] since process start (no reset in JAX)",
            **_thread_info(),
        }


@contextlib.contextmanager
def _bf16_stats_downcast_allowed() -> Iterator[None]:
    # bf16: flax computes batch statistics in float32 and writes them into the bf16 running stats,
    # which JAX warns is an implicit downcast. That rounding is what pure bf16 means; it also keeps
    # the stats' dtype, so the next call does not retrace.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "scatter inputs have incompatible types", FutureWarning)
        yield


def _loss(heatmaps: jax.Array, target: jax.Array) -> jax.Array:
    """Sum over stacks of the mean squared error: heatmaps (S, N, h, w, K), target (N, h, w, K)."""
    with jax.named_scope("loss"):
        return jnp.sum(jnp.mean(jnp.square(heatmaps - target), axis=(1, 2, 3, 4)))


def _jitted_functions(graphdef: nnx.GraphDef) -> tuple[Callable, Callable, Callable]:
    """forward_eval, forward_train and loss_and_grads as jax.jit of pure functions of (params, stats, ...)."""

    def forward(params, stats, x, train: bool):
        # copy=True: fresh Variables at this trace level, so BN may update its stats inside value_and_grad
        model = nnx.merge(graphdef, params, stats, copy=True)
        with _bf16_stats_downcast_allowed():
            heatmaps = model(x, train=train)  # (S, N, h, w, K)
        return heatmaps, nnx.state(model, nnx.BatchStat)

    def loss_fn(params, stats, x, target):
        heatmaps, new_stats = forward(params, stats, x, True)
        return _loss(heatmaps, target), new_stats

    def loss_and_grads(params, stats, x, target):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, target)
        return loss, grads, new_stats

    def forward_eval(params, stats, x):
        return forward(params, stats, x, False)[0]

    def forward_train(params, stats, x):
        return forward(params, stats, x, True)

    return jax.jit(forward_eval), jax.jit(forward_train), jax.jit(loss_and_grads)


# ------------------------------------------------------------------------------------------ module level
def gpu_available() -> bool:
    """True when JAX sees at least one GPU."""
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:  # no GPU backend (CPU-only jaxlib or no driver)
        return False


def build(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, device: str = "cpu",
          precision: str = "fp32", execution: str = EXECUTIONS[0], **options: object) -> JaxHourglass:
    """A JaxHourglass on `device` holding `weights` (default impls.spec.init_weights(config, seed=0))."""
    if options:
        raise ValueError(f"unknown option(s) {sorted(options)} for jax; it takes none")
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available)
    weights = resolve_weights(config, weights)
    return JaxHourglass(config, weights, device, precision, execution)


def _thread_info() -> dict[str, object]:
    """XLA:CPU runs its own pool, one thread per schedulable core unless XLA_FLAGS says otherwise.

    JAX has no thread setting of its own; inter-op parallelism is XLA's internal business (None here).
    """
    flags = os.environ.get("XLA_FLAGS") or ""
    thread_flags = [f for f in flags.split() if "multi_thread_eigen" in f or "intra_op_parallelism" in f]
    schedulable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"intra_op_threads": schedulable, "inter_op_threads": None, "cpu_count": os.cpu_count(),
            "xla_thread_flags": thread_flags}


def runtime_info() -> dict[str, object]:
    """JAX, jaxlib and flax versions, devices and the environment settings that change speed."""
    return {
        "framework": FRAMEWORK,
        "version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "platform": jax.default_backend(),
        "gpu_available": gpu_available(),
        **_thread_info(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }


def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                   precision: str = "fp32", seed: int = 0) -> Callable[[], None]:
    """One stride-1 SAME conv without bias, on device-resident random data: the conv-ceiling probe.

    Jitted, as the model is; each call ends in jax.block_until_ready.
    """
    if device == "gpu" and not gpu_available():
        raise RuntimeError("no GPU visible to jax; use --device cpu")
    dev = jax.devices(device)[0]
    rng = np.random.default_rng(seed)
    n, h, w, c_in = input_shape
    dtype = _DTYPES[precision]
    x = jax.device_put(rng.standard_normal((n, h, w, c_in), dtype=np.float32).astype(dtype), dev)
    kernel = jax.device_put(rng.standard_normal((kernel_size, kernel_size, c_in, c_out), dtype=np.float32).astype(dtype), dev)
    conv = jax.jit(lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

    def step() -> None:
        jax.block_until_ready(conv(x, kernel))

    return step


def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32",
                   seed: int = 0) -> Callable[[], None]:
    """(m, k) @ (k, n) on device-resident random data: the matmul-ceiling probe.

    Jitted, as the model is; each call ends in jax.block_until_ready.
    """
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(_DTYPES)}")
    if device == "gpu" and not gpu_available():
        raise RuntimeError("no GPU visible to jax; use --device cpu")
    dev = jax.devices(device)[0]
    rng = np.random.default_rng(seed)
    dtype = _DTYPES[precision]
    a = jax.device_put(rng.standard_normal((m, k), dtype=np.float32).astype(dtype), dev)
    b = jax.device_put(rng.standard_normal((k, n), dtype=np.float32).astype(dtype), dev)
    matmul = jax.jit(jnp.matmul)

    def step() -> None:
        jax.block_until_ready(matmul(a, b))  # (m, n)

    return step


# -------------------------------------------------------------------------------------------- profiling
def profile(config: HourglassConfig, *, phase: str, batch_size: int, execution: str, trace_dir: str,
            device: str = "cpu", precision: str = "fp32", warmup: int = 2, steps: int = 5, seed: int = 0,
            top_k: int = 25) -> dict[str, Any]:
    """Time, trace (jax.profiler), stage-time and FLOP-count one `phase` step: the dict of impls.profiling."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    model = build(config, device=device, precision=precision, execution=execution)
    step = model.benchmark_step(phase, batch_size, seed)
    function, args = model._step_program(phase, batch_size, seed)  # what `step` calls, for cache and HLO
    with _compile_seconds() as compile_seconds:
        first_call_ms = _call_ms(step)  # trace + lower + XLA compile + one run
    for _ in range(warmup):
        step()
    cache_entries = function._cache_size()
    step_ms = float(np.median([_call_ms(step) for _ in range(steps)]))
    profiled_ms, trace_files, events = _traced_steps(step, steps, Path(trace_dir))
    recompilations = function._cache_size() - cache_entries
    first_input = {"x": args[2], "target": args[-1]}  # image (N, H, W, 3), target (N, h, w, K) (forward: unused)
    stage_ms, stage_step_ms = profiling.time_staged(
        _staged_calls(model, phase), first_input,
        lambda env: jax.block_until_ready(env["last"]), warmup=max(warmup, 1), steps=steps)  # fmt: skip
    flops, program_info = _program_facts(function, args, config, batch_size, phase)
    return {
        "framework": FRAMEWORK, "execution": execution, "phase": phase, "batch_size": batch_size,
        "precision": precision, "device": device, "step_ms": step_ms,
        "stage_method": "staged", "stage_step_ms": stage_step_ms, "stage_note": _STAGE_NOTE[phase],
        "stages": [{"stage": name, "ms": ms} for name, ms in stage_ms.items()],
        "ops": profiling.op_table(events, steps, top_k), "op_step_ms": float(np.median(profiled_ms)),
        "trace_files": trace_files, "flops": flops,
        "compile": {"first_call_ms": first_call_ms,
                    "trace_compile_ms": 1e3 * sum(compile_seconds) if compile_seconds else None,
                    "recompilations_in_timed_loop": recompilations, **program_info},
    }  # fmt: skip


_STAGE_NOTE = {
    "forward": "staged: XLA fuses across stage boundaries and the jax.profiler trace names only each executed "
               "HLO op (hlo_module, hlo_op), not its named_scope, so each stage (eval-mode BN) is its own "
               "jax.jit, called in order with jax.block_until_ready after each; the staged step pays a "
               "dispatch and a sync per stage and loses cross-stage fusion, which is how stage_step_ms "
               "differs from step_ms.",
    "forward_backward": "staged: XLA fuses across stage boundaries and the jax.profiler trace names only each "
                        "executed HLO op, not its named_scope, so each stage is its own jax.jit: forward stages "
                        "in order (train-mode BN) each return their output and jax.vjp residuals (no "
                        "recomputation), then a 'loss' call (value and gradient w.r.t. the heatmaps), then each "
                        "stage's VJP in reverse order, timed under the stage's name (forward + backward "
                        "summed), with jax.block_until_ready after every call; stage_step_ms differs from "
                        "step_ms by the per-call dispatch and syncs and by cross-stage fusion and scheduling.",
}


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def _compile_seconds() -> Iterator[list[float]]:
    """Seconds JAX itself reports tracing, lowering and XLA-compiling inside the block (jax.monitoring)."""
    seconds: list[float] = []

    def listener(event: str, duration_secs: float, **kwargs: Any) -> None:
        if event in _COMPILE_EVENTS:
            seconds.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _call_ms(call: Callable[[], None]) -> float:
    t0 = time.perf_counter_ns()
    call()  # ends synchronised
    return (time.perf_counter_ns() - t0) / 1e6


def _traced_steps(step: Callable[[], None], steps: int, trace_dir: Path) -> tuple[list[float], list[str], list[dict]]:
    """Wall ms of `steps` calls under jax.profiler.trace, the trace files written (relative) and its op events."""
    before = set(trace_dir.rglob("*"))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would triple the events and slow the traced steps
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True, profiler_options=options):
        wall_ms = [_call_ms(step) for _ in range(steps)]
    written = sorted(path for path in trace_dir.rglob("*") if path.is_file() and path not in before)
    perfetto = [path for path in written if path.name == "perfetto_trace.json.gz"]
    if not perfetto:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}; it wrote {written}")
    return wall_ms, [str(path.relative_to(trace_dir)) for path in written], _op_events(perfetto[0])


def _op_events(perfetto_path: Path) -> list[dict[str, Any]]:
    """One {"op", "total_ms", "self_ms"} per executed XLA op (thunk/fusion/kernel) in a perfetto trace.

    XLA tags those events with args hlo_module/hlo_op; dispatch and runtime events carry neither. The op is
    the HLO instruction name without its ".N" suffix ("convolution", "add_maximum_fusion"), one row per kind.
    On GPU the kernels on the /device: rows are kept, so the host-side launch events are not counted twice.
    """
    with gzip.open(perfetto_path, "rt") as file:
        events = json.load(file)["traceEvents"]
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    ops = [e for e in ops if e["pid"] in device_pids] or ops
    rows: list[dict[str, Any]] = []
    ops.sort(key=lambda e: (e["pid"], e["tid"], e["ts"], -e["dur"]))
    open_ops: list[tuple[tuple, float, dict]] = []  # (thread, end_us, row): enclosing ops, for self time
    for e in ops:
        thread = (e["pid"], e["tid"])
        while open_ops and (open_ops[-1][0] != thread or e["ts"] >= open_ops[-1][1]):
            open_ops.pop()
        row = {"op": re.sub(r"\.\d+$", "", e["args"]["hlo_op"]), "total_ms": e["dur"] / 1e3, "self_ms": e["dur"] / 1e3}
        if open_ops:  # nested in the enclosing op (a call/while thunk): not that op's own time
            parent = open_ops[-1][2]
            parent["self_ms"] = max(0.0, parent["self_ms"] - row["total_ms"])
        open_ops.append((thread, e["ts"] + e["dur"], row))
        rows.append(row)
    return rows


def _stage_program(config: HourglassConfig) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(stage, input names, output names) in forward order: StackedHourglass.__call__'s data flow."""
    program = [("stem", ("x",), ("x0",))]
    for i in range(config.num_stacks):
        program += [(f"hourglass_{i}", (f"x{i}",), (f"y{i}",)),
                    (f"head_{i}", (f"y{i}",), (f"previous{i}", f"heatmaps{i}"))]
        if i < config.num_stacks - 1:
            program.append((f"merge_{i}", (f"x{i}", f"previous{i}", f"heatmaps{i}"), (f"x{i + 1}",)))
    return program


def _apply_stage(graphdef: nnx.GraphDef, params, stats, inputs: tuple, train: bool) -> tuple[tuple, nnx.State]:
    """One stage module's outputs (always a tuple) and its BN statistics after the call."""
    module = nnx.merge(graphdef, params, stats, copy=True)
    with _bf16_stats_downcast_allowed():
        out = module(*inputs) if isinstance(module, Merge) else module(*inputs, train)
    return (out if isinstance(out, tuple) else (out,)), nnx.state(module, nnx.BatchStat)


def _staged_calls(model: JaxHourglass, phase: str) -> list[tuple[str, Callable[[dict], dict]]]:
    """The step as (label, call) pairs for profiling.time_staged, one jax.jit per stage.

    Each call maps an environment {tensor name: array} to a new one (never mutated: every staged step starts
    from the same first input); "last" holds the call's own outputs, which the sync waits for.
    """
    program = _stage_program(model.config)
    whole = nnx.merge(model._graphdef, model._params, model._stats)
    parts = {name: nnx.split(getattr(whole, name), nnx.Param, nnx.BatchStat) for name, _, _ in program}
    if phase == "forward":
        return [(name, _forward_call(parts[name], inputs, outputs)) for name, inputs, outputs in program]
    forward = [(name, _vjp_forward_call(name, parts[name], inputs, outputs)) for name, inputs, outputs in program]
    heatmaps = tuple(f"heatmaps{i}" for i in range(model.config.num_stacks))
    backward_jit = jax.jit(_stage_backward)  # one jit: its cache holds one entry per stage structure
    backward = [(name, _backward_call(name, backward_jit, inputs if name != "stem" else (), outputs))
                for name, inputs, outputs in reversed(program)]
    return [*forward, ("loss", _loss_call(heatmaps)), *backward]


def _forward_call(part: tuple, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Callable[[dict], dict]:
    graphdef, params, stats = part
    run = jax.jit(lambda p, s, xs: _apply_stage(graphdef, p, s, xs, False)[0])  # eval-mode BN

    def call(env: dict) -> dict:
        out = run(params, stats, tuple(env[k] for k in inputs))
        return {**env, **dict(zip(outputs, out, strict=True)), "last": out}
    return call


def _vjp_forward_call(name: str, part: tuple, inputs: tuple[str, ...],
                      outputs: tuple[str, ...]) -> Callable[[dict], dict]:
    graphdef, params, stats = part
    wants_input_grads = name != "stem"  # the image needs no gradient (as in loss_and_grads)

    def forward(p, s, xs):  # train-mode BN; returns (outputs, VJP with residuals, new BN stats)
        def apply(p, *grad_xs):
            return _apply_stage(graphdef, p, s, grad_xs if wants_input_grads else xs, True)
        return jax.vjp(apply, p, *(xs if wants_input_grads else ()), has_aux=True)
    run = jax.jit(forward)  # jax.vjp's function is a pytree of residuals, so it can leave the jit

    def call(env: dict) -> dict:
        out, vjp_fn, new_stats = run(params, stats, tuple(env[k] for k in inputs))
        return {**env, **dict(zip(outputs, out, strict=True)), f"vjp:{name}": vjp_fn, "last": (out, new_stats)}
    return call


def _loss_call(heatmaps: tuple[str, ...]) -> Callable[[dict], dict]:
    # value and gradient of the loss w.r.t. each stack's heatmaps (N, h, w, K): the cotangents backward starts from
    run = jax.jit(jax.value_and_grad(lambda hms, target: _loss(jnp.stack(hms), target)))

    def call(env: dict) -> dict:
        loss, cts = run(tuple(env[k] for k in heatmaps), env["target"])
        return {**env, **{f"ct:{k}": ct for k, ct in zip(heatmaps, cts, strict=True)}, "last": (loss, cts)}
    return call


def _stage_backward(vjp_fn, out_cts: tuple, outs: tuple, in_cts: tuple) -> tuple[Any, tuple]:
    """Parameter gradients and input cotangents (added to those already there) of one stage's VJP."""
    # An output no later stage used (the last head's `previous`) has no cotangent: zeros
    out_cts = tuple(jnp.zeros_like(out) if ct is None else ct for ct, out in zip(out_cts, outs, strict=True))
    param_grads, *input_cts = vjp_fn(out_cts)
    return param_grads, tuple(ct if old is None else ct + old for ct, old in zip(input_cts, in_cts, strict=True))


def _backward_call(name: str, backward_jit: Callable, inputs: tuple[str, ...],
                   outputs: tuple[str, ...]) -> Callable[[dict], dict]:
    def call(env: dict) -> dict:
        out_cts = tuple(env.get(f"ct:{k}") for k in outputs)  # None where no later stage used the output
        in_cts = tuple(env.get(f"ct:{k}") for k in inputs)  # None until a consumer's backward has run
        param_grads, in_cts = backward_jit(env[f"vjp:{name}"], out_cts, tuple(env[k] for k in outputs), in_cts)
        return {**env, **{f"ct:{k}": ct for k, ct in zip(inputs, in_cts, strict=True)}, "last": (param_grads, in_cts)}
    return call


# A convolution in StableHLO text: kernel dimension labels ([0, 1, i, o]), then lhs, kernel and output types
_CONV = re.compile(r"stablehlo\.convolution.*?\]x\[([^\]]*)\]->"
                   r".*?: \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>")


def _stablehlo_conv_flops(text: str) -> tuple[int, int]:
    """(2 * multiply-adds, count) of every convolution the program runs, counted densely from its shapes.

    Per output element a convolution sums (kernel elements / output features) products, zero padding and
    dilation holes included, as impls.count_flops counts. Private functions count once per call.
    """
    functions = {re.match(r"\w+ @([\w.$-]+)", chunk).group(1): chunk for chunk in text.split("func.func ")[1:]}

    @functools.cache
    def count(name: str) -> tuple[int, int]:
        flops = convs = 0
        for kernel_labels, _, kernel_type, out_type in _CONV.findall(functions[name]):
            kernel_shape = [int(d) for d in kernel_type.split("x")[:-1]]  # the last part is the dtype
            out_shape = [int(d) for d in out_type.split("x")[:-1]]
            out_features = kernel_shape[[label.strip() for label in kernel_labels.split(",")].index("o")]
            flops += 2 * math.prod(out_shape) * (math.prod(kernel_shape) // out_features)
            convs += 1
        for callee in re.findall(r"call @([\w.$-]+)", functions[name]):
            callee_flops, callee_convs = count(callee)
            flops, convs = flops + callee_flops, convs + callee_convs
        return flops, convs

    return count("main")


def _program_facts(function: Callable, args: tuple, config: HourglassConfig, batch_size: int,
                   phase: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The step program's FLOPs (XLA cost analysis, lowered convolutions) and its compiled size."""
    lowered = function.lower(*args)  # after the first call: jit's caches hand back the same program
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict in older jax
    total_flops = int(cost["flops"]) if cost and "flops" in cost else None
    conv_flops, conv_count = _stablehlo_conv_flops(lowered.as_text())
    analytic = spec.count_flops(config, batch_size, phase)
    flops = {
        "source": "jax: lowered StableHLO convolutions (conv) and compiled.cost_analysis() (total)",
        "conv_flops": conv_flops, "total_flops": total_flops,
        "note": f"conv_flops: 2 x multiply-adds of the {conv_count} stablehlo.convolution ops of the lowered step "
                f"(model: {len(spec.convs(config))} convs; forward_backward adds a weight- and an input-gradient "
                f"conv per conv, no input gradient for the first), counted densely from their shapes "
                f"(output elements x kernel window x input features); analytic count {analytic} "
                f"(ratio {conv_flops / analytic:.4f}). total_flops: XLA's cost analysis of the optimised "
                f"program, which counts convolution taps only where they hit real input (zero padding "
                f"skipped: below the dense count on small maps), 1x1 convs XLA:CPU turned into dots as dots, "
                f"plus BN, ReLU, residual adds, pooling, upsampling, the loss and the BN statistics updates.",
    }  # fmt: skip
    code_bytes = getattr(compiled.memory_analysis(), "generated_code_size_in_bytes", 0) or 0
    size, unit = ((code_bytes, "bytes of generated code") if code_bytes
                  else (len(compiled.as_text()), "chars of optimized HLO"))
    program_info = {
        "program_size": size, "program_size_unit": unit,
        "note": "first_call_ms: the first step (trace, lower, XLA compile, one run). trace_compile_ms: what "
                "jax.monitoring reports for that first call: jaxpr trace + MLIR lowering + XLA backend compile "
                "durations. recompilations: the step's jitted function's _cache_size() after warmup vs after "
                "the timed and profiled loops. program_size: the compiled program (.lower().compile(), served "
                "from jit's cache) as text, or its generated code where memory_analysis() reports a size.",
    }  # fmt: skip
    return flops, program_info
