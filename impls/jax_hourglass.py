"""Stacked Hourglass in JAX with Flax NNX: the module tree of impls.spec, run through plain jax.jit.

The modules mirror the PyTorch implementation attribute for attribute, so an nnx state path such as
('hourglass_0', 'up1', 'conv1', 'kernel') is the canonical name "hourglass_0.up1.conv1.kernel" and
nnx's HWIO kernels are already the canonical layout. The model is split once into
(graphdef, params, stats); the jitted functions are pure in those and merge the module inside the trace,
so calls pay no nnx graph traversal.

Variants (impl): "idiomatic" is every convolution an nnx.Conv and every pool flax's, as flax users write
it; "tuned" writes each 1x1 stride-1 convolution (134 of the 194 of the seed network, two thirds of its
FLOPs) as a matrix product over channels (PointwiseConv): XLA's CPU backend keeps a 1x1 convolution a
convolution, and its convolution kernels, above all the weight gradients, are much slower than its dot;
and each 2x2 pool as a reduction over a reshape (_max_pool_reshaped), whose gradient avoids XLA:CPU's slow
select-and-scatter. Same parameters under the same names and layouts (kernel (1, 1, C_in, C_out)), same
sums and maxima in exact arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

from impls import base, profiling, registry, spec
from impls.base import (
    AbstractHourglassModel,
    check_build_args,
    check_device_args,
    check_step_args,
    check_train_batch,
    resolve_weights,
)
from impls.config import HourglassConfig

FRAMEWORK = "jax"
EXECUTIONS: tuple[str, ...] = registry.EXECUTIONS[FRAMEWORK]
IMPLS: tuple[str, ...] = registry.IMPLS[FRAMEWORK]
PRECISIONS: tuple[str, ...] = base.PRECISIONS
_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp64": jnp.float64}

HW = tuple[int, int]


def x64_scope(precision: str) -> contextlib.AbstractContextManager:
    """Where a `precision` model's JAX work runs: float64 needs x64, which is off by default.

    jax_enable_x64 is process-wide when set with jax.config.update, and it changes more than fp64 models
    (default integer and float types, how Python scalars and numpy float64 arrays are taken in), so fp32
    work in the same process (the test suite's, a profile) would no longer be the computation it was.
    jax.enable_x64 is the same switch as a thread-local context: an fp64 model enters it around every
    call into JAX (build, predict, gradients, export, each benchmark step) and leaves it after; jit keys
    its caches on it, so fp32 programs are never shared with or changed by fp64 ones. Entering it costs
    about a microsecond per timed fp64 step; fp32 and bf16 steps run without it.
    """
    return jax.enable_x64(True) if precision == "fp64" else contextlib.nullcontext()
# Kernels start at zero: the real weights always come from a canonical dict (impls.spec.init_weights),
# and a random initialiser would compile one XLA program per kernel shape (seconds at build time).
_ZEROS = nnx.initializers.zeros_init()


# ----------------------------------------------------------------------------------------------- modules
class PointwiseConv(nnx.Module):
    """A 1x1 stride-1 convolution as a matrix product over channels: (N, H, W, C_in) -> (N, H, W, C_out).

    The parameters are nnx.Conv's, under the same names and in the same layout (kernel (1, 1, C_in, C_out),
    bias (C_out,)), so weights, gradients and exports are those of the idiomatic model; y[n, h, w, :] =
    x[n, h, w, :] @ kernel[0, 0] (+ bias) is exactly what the convolution sums.
    """

    def __init__(self, c_in: int, c_out: int, *, bias: bool) -> None:
        self.kernel = nnx.Param(jnp.zeros((1, 1, c_in, c_out)))
        self.bias = nnx.Param(jnp.zeros((c_out,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # dot_general contracts the channel axis: XLA:CPU emits one GEMM of (N*H*W, C_in) @ (C_in, C_out)
        y = jax.lax.dot_general(x, self.kernel[...][0, 0], (((3,), (0,)), ((), ())))  # (N, H, W, C_out)
        return y if self.bias is None else y + self.bias[...]


def _conv(config: HourglassConfig, hw: HW, c_in: int, c_out: int, k: int, *, rngs: nnx.Rngs,
          stride: int = 1, bias: bool = True, tuned: bool = False) -> nnx.Conv | PointwiseConv:
    """An nnx.Conv with the explicit padding of impls.spec (frameworks disagree on SAME for stride 2); for the
    tuned variant a 1x1 stride-1 conv (always unpadded) is a PointwiseConv."""
    pad = spec.conv_padding(config, hw, k, stride)
    if tuned and k == 1 and stride == 1:
        return PointwiseConv(c_in, c_out, bias=bias)
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


def _windows_2x2(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, 2, W/2, 2, C): each 2x2 window's four values on axes 2 and 4 (H, W even,
    as impls.config guarantees at every pooled level); a reshape, no copy."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_reshaped(x: jax.Array) -> jax.Array:
    """The tuned variant's 2x2/2 max pool: the max of the same four values, as a reduction over a reshape.
    Its gradient is elementwise compares; reduce_window's is a select-and-scatter, which XLA:CPU runs ~5x
    slower. On a tie the two route the gradient differently (all to the first maximum vs shared); tied
    maxima here are post-ReLU zeros, whose gradient the ReLU stops, or equal by chance (rare in fp32 and
    fp64, less rare in bf16)."""
    return _windows_2x2(x).max(axis=(2, 4))  # (N, H/2, W/2, C)


def _avg_pool_reshaped(x: jax.Array) -> jax.Array:
    """The tuned variant's 2x2/2 average pool: the mean of the same four values, as a reduction over a reshape."""
    return _windows_2x2(x).mean(axis=(2, 4))  # (N, H/2, W/2, C)


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)  # (N, 2H, 2W, C)


class Residual(nnx.Module):
    """Bottleneck residual block: "postact" (conv-BN-ReLU x3, c/4) or "preact" (BN-ReLU-conv x3, c/2)."""

    def __init__(self, config: HourglassConfig, hw: HW, c_in: int, c_out: int, *, rngs: nnx.Rngs,
                 tuned: bool = False) -> None:
        self.preact = config.block == "preact"
        cb = config.conv_bias
        mid = c_out // 2 if self.preact else c_out // 4
        self.conv1 = _conv(config, hw, c_in, mid, 1, bias=cb, rngs=rngs, tuned=tuned)
        self.bn1 = _bn(c_in if self.preact else mid, rngs=rngs)  # preact normalises the block's input
        self.conv2 = _conv(config, hw, mid, mid, 3, bias=cb, rngs=rngs, tuned=tuned)
        self.bn2 = _bn(mid, rngs=rngs)
        self.conv3 = _conv(config, hw, mid, c_out, 1, bias=cb, rngs=rngs, tuned=tuned)
        self.bn3 = _bn(mid if self.preact else c_out, rngs=rngs)
        self.has_skip = c_in != c_out
        if self.has_skip:
            self.skip_conv = _conv(config, hw, c_in, c_out, 1, bias=cb, rngs=rngs, tuned=tuned)
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

    def __init__(self, config: HourglassConfig, hw: HW, depth: int, *, rngs: nnx.Rngs, tuned: bool = False) -> None:
        c = config.channels
        low_hw = (hw[0] // 2, hw[1] // 2)
        self.up1 = Residual(config, hw, c, c, rngs=rngs, tuned=tuned)
        self.low1 = Residual(config, low_hw, c, c, rngs=rngs, tuned=tuned)
        self.low2 = (Hourglass(config, low_hw, depth - 1, rngs=rngs, tuned=tuned) if depth > 1
                     else Residual(config, low_hw, c, c, rngs=rngs, tuned=tuned))
        self.low3 = Residual(config, low_hw, c, c, rngs=rngs, tuned=tuned)
        self.pool = _max_pool_reshaped if tuned else _max_pool

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        up1 = self.up1(x, train)  # (N, H, W, C)
        low = self.low1(self.pool(x), train)  # (N, H/2, W/2, C)
        low = self.low3(self.low2(low, train), train)
        return up1 + _upsample_nearest_2x(low)


class Stem(nnx.Module):
    """7x7/2 conv-BN-ReLU, residual, 2x2 pool, two residuals: (N, H, W, 3) -> (N, H/4, W/4, C)."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs, tuned: bool = False) -> None:
        c_stem, c_half = config.stem_channels
        hw = config.heatmap_hw
        conv_hw = (hw[0] * 2, hw[1] * 2)
        self.conv = _conv(config, config.input_hw, 3, c_stem, 7, stride=2, bias=config.conv_bias, rngs=rngs)
        self.bn = _bn(c_stem, rngs=rngs)
        self.res1 = Residual(config, conv_hw, c_stem, c_half, rngs=rngs, tuned=tuned)
        if tuned:
            self.pool = _avg_pool_reshaped if config.stem_pool == "avg" else _max_pool_reshaped
        else:
            self.pool = _avg_pool if config.stem_pool == "avg" else _max_pool
        self.res2 = Residual(config, hw, c_half, c_half, rngs=rngs, tuned=tuned)
        self.res3 = Residual(config, hw, c_half, config.channels, rngs=rngs, tuned=tuned)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))  # (N, H/2, W/2, C/4)
        x = self.res1(x, train)  # (N, H/2, W/2, C/2)
        x = self.pool(x)  # (N, H/4, W/4, C/2)
        return self.res3(self.res2(x, train), train)  # (N, H/4, W/4, C)


class Head(nnx.Module):
    """Residual, 1x1 conv-BN-ReLU, then the linear 1x1 heatmap conv."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs, tuned: bool = False) -> None:
        c, hw = config.channels, config.heatmap_hw
        self.res = Residual(config, hw, c, c, rngs=rngs, tuned=tuned)
        self.lin_conv = _conv(config, hw, c, c, 1, bias=config.conv_bias, rngs=rngs, tuned=tuned)
        self.lin_bn = _bn(c, rngs=rngs)
        self.heatmap_conv = _conv(config, hw, c, config.num_keypoints, 1, rngs=rngs, tuned=tuned)

    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        y = self.res(x, train)
        previous = jax.nn.relu(self.lin_bn(self.lin_conv(y), use_running_average=not train))  # (N, h, w, C)
        return previous, self.heatmap_conv(previous)  # heatmaps (N, h, w, K)


class Merge(nnx.Module):
    """Feeds a stack's features and heatmaps back into the next stack's input."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs, tuned: bool = False) -> None:
        c, k, hw = config.channels, config.num_keypoints, config.heatmap_hw
        self.feature_conv = _conv(config, hw, c, c, 1, rngs=rngs, tuned=tuned)
        self.heatmap_conv = _conv(config, hw, k, c, 1, rngs=rngs, tuned=tuned)

    def __call__(self, x: jax.Array, previous: jax.Array, heatmaps: jax.Array) -> jax.Array:
        return x + self.feature_conv(previous) + self.heatmap_conv(heatmaps)


class StackedHourglass(nnx.Module):
    """Stem, then num_stacks hourglass+head pairs joined by merges; returns every stack's heatmaps."""

    def __init__(self, config: HourglassConfig, *, rngs: nnx.Rngs, tuned: bool = False) -> None:
        self.num_stacks = config.num_stacks
        self.stem = Stem(config, rngs=rngs, tuned=tuned)
        for i in range(config.num_stacks):
            setattr(self, f"hourglass_{i}", Hourglass(config, config.heatmap_hw, config.depth, rngs=rngs, tuned=tuned))
            setattr(self, f"head_{i}", Head(config, rngs=rngs, tuned=tuned))
            if i < config.num_stacks - 1:
                setattr(self, f"merge_{i}", Merge(config, rngs=rngs, tuned=tuned))

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


def _to_numpy(state: nnx.State, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Canonical name -> `dtype` numpy for every variable of `state`."""
    return {_canonical(path): np.asarray(var.get_value(), dtype) for path, var in nnx.to_flat_state(state)}


# ------------------------------------------------------------------------------------------------- model
class JaxHourglass(AbstractHourglassModel):
    """A StackedHourglass held as (graphdef, params, stats) with its jitted pure functions."""

    framework = FRAMEWORK

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], *, device: str, precision: str,
                 execution: str, impl: str = IMPLS[0]) -> None:
        super().__init__(config, device=device, precision=precision, execution=execution, impl=impl)
        self.jax_device = jax.devices(device)[0]
        self._dtype = _DTYPES[precision]
        self._io_dtype = base.io_dtype(precision)  # numpy at the interface: float64 for fp64
        with self.scope(), jax.default_device(self.jax_device):  # the placeholder zeros never touch another device
            module = StackedHourglass(config, rngs=nnx.Rngs(0), tuned=impl == "tuned")
            graphdef, init_params, init_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
            names = {_canonical(p) for p, _ in [*nnx.to_flat_state(init_params), *nnx.to_flat_state(init_stats)]}
            differ = sorted(names ^ set(spec.param_shapes(config)))
            if differ:  # a bug in the module tree, not a user error
                raise RuntimeError(f"nnx state paths differ from impls.spec's canonical names: {differ[:5]}")
            self._params = _fill_state(init_params, weights, self._dtype, self.jax_device)
            self._stats = _fill_state(init_stats, weights, self._dtype, self.jax_device)
        self._graphdef = graphdef  # kept for module(): profile()'s per-stage functions
        self._forward_eval, self._forward_train, self._loss_and_grads = _jitted_functions(graphdef)

    def scope(self) -> contextlib.AbstractContextManager:
        """The context every call into JAX for this model runs in: x64 for fp64 (see x64_scope), else none."""
        return x64_scope(self.precision)

    def num_params(self) -> int:
        """Elements of every nnx.Param leaf (BN running statistics are nnx.BatchStat, not counted)."""
        return sum(leaf.size for leaf in jax.tree.leaves(self._params))

    def _input(self, x: np.ndarray, what: str, shape: tuple[int, ...]) -> jax.Array:
        """`x` checked against `shape` (any batch size), cast to the model's dtype, on its device."""
        x = np.asarray(x)
        if x.ndim != len(shape) or tuple(x.shape[1:]) != shape[1:]:
            raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape[1:]))}), got {tuple(x.shape)}; "
                             f"the model was built for input_hw={self.config.input_hw}")
        with self.scope():
            return jax.device_put(x.astype(self._dtype), self.jax_device)

    def _x_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.config.input_hw, 3)

    def _target_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.config.heatmap_hw, self.config.num_keypoints)

    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        """Heatmaps (S, N, h, w, K) float32 (fp64: float64); train mode uses batch statistics and updates the running ones."""
        if train_mode:
            check_train_batch(self.config, len(x))
        xd = self._input(x, "x", self._x_shape(len(x)))
        with self.scope():
            if train_mode:
                heatmaps, self._stats = self._forward_train(self._params, self._stats, xd)
            else:
                heatmaps = self._forward_eval(self._params, self._stats, xd)
            return np.asarray(heatmaps.astype(self._io_dtype))

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Train-mode loss and canonical float32 (fp64: float64) gradients of every nnx.Param; updates running stats."""
        check_train_batch(self.config, len(x))
        xd = self._input(x, "x", self._x_shape(len(x)))
        td = self._input(target, "target", self._target_shape(len(x)))
        with self.scope():
            loss, grads, self._stats = self._loss_and_grads(self._params, self._stats, xd, td)
            return float(loss), _to_numpy(grads, self._io_dtype)

    def export_weights(self) -> dict[str, np.ndarray]:
        """Parameters and running statistics as canonical float32 (fp64: float64) numpy."""
        return {**_to_numpy(self._params, self._io_dtype), **_to_numpy(self._stats, self._io_dtype)}

    def module(self) -> StackedHourglass:
        """A copy of the nnx module tree holding the current parameters and statistics (changes stay there).

        For fp64, call it and use it inside self.scope()."""
        return nnx.merge(self._graphdef, self._params, self._stats, copy=True)

    def step_inputs(self, batch_size: int, seed: int) -> tuple[jax.Array, jax.Array]:
        """impls.spec.random_batch on the device: x (N, H, W, 3) and target (N, H/4, W/4, K)."""
        x, target = spec.random_batch(self.config, batch_size, seed)
        return (self._input(x, "x", self._x_shape(batch_size)),
                self._input(target, "target", self._target_shape(batch_size)))  # fmt: skip

    def step_program(self, phase: str, batch_size: int, seed: int) -> tuple[Callable, tuple]:
        """The jitted function a `phase` step calls and its device-resident arguments (params, stats, x[, target]).

        For fp64 the function must be called inside self.scope() (benchmark_step does so)."""
        check_step_args(phase, batch_size)
        if phase == "forward_backward":
            check_train_batch(self.config, batch_size)
        x, target = self.step_inputs(batch_size, seed)
        if phase == "forward":
            return self._forward_eval, (self._params, self._stats, x)
        return self._loss_and_grads, (self._params, self._stats, x, target)

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """One jitted step on inputs already on the device, ending in jax.block_until_ready.

        forward_backward computes the train-mode new running statistics and returns them from the jitted
        function (so XLA cannot drop that work) but does not store them: no state update is timed.
        """
        function, args = self.step_program(phase, batch_size, seed)  # bound now: no lookups inside the timed call

        def step() -> None:
            jax.block_until_ready(function(*args))  # forward: heatmaps; forward_backward: loss, grads, new stats
        return _scoped(step, self.precision)  # fp64: inside x64_scope

    def peak_memory_bytes(self) -> int | None:
        """XLA allocator peak on the GPU since process start (JAX has no reset); None on CPU."""
        if self.device == "cpu":
            return None
        memory = self.jax_device.memory_stats()  # None where the backend keeps no allocator statistics
        return None if memory is None else int(memory.get("peak_bytes_in_use", 0))

    def reset_peak_memory(self) -> bool:
        """False: JAX exposes no peak reset, so the peak counts from process start (one process per cell)."""
        return False

    def memory_analysis(self, phase: str, batch_size: int, seed: int = 0) -> dict[str, int] | None:
        """XLA's memory plan of the compiled step: argument, output and temporary bytes (what the allocator peak
        cannot separate, since JAX cannot reset it)."""
        function, args = self.step_program(phase, batch_size, seed)
        analysis = function.lower(*args).compile().memory_analysis()
        if analysis is None:  # a backend that reports no plan
            return None
        return {"argument_bytes": int(analysis.argument_size_in_bytes), "output_bytes": int(analysis.output_size_in_bytes),
                "temp_bytes": int(analysis.temp_size_in_bytes)}  # fmt: skip

    def settings(self) -> dict[str, object]:
        """Layout, jit mode, dtype and XLA settings that change speed."""
        return {
            **super().settings(),
            "layout": "NHWC activations, HWIO kernels",
            "compile": "jax.jit of pure functions over (params, stats), made at build time, compiled on the "
                       "first call per input shape; nnx.merge runs only at trace time",
            "dtype": str(jnp.dtype(self._dtype)),
            "bn": "flax nnx.BatchNorm, two-pass variance (use_fast_variance=False)",
            "pointwise_convs": ("1x1 stride-1 convolutions as dot_general over channels (PointwiseConv)"
                                if self.impl == "tuned" else "nnx.Conv"),
            "matmul_precision": jax.config.jax_default_matmul_precision,
            "tf32": ("XLA may use TF32 for fp32 convs on Ampere+ GPUs at the default precision"
                     if self.device == "gpu" and self.precision == "fp32" else "n/a"),
            "jax_enable_x64": self.precision == "fp64" or bool(jax.config.jax_enable_x64),
            "x64_scope": "jax.enable_x64(True) around every call of this model" if self.precision == "fp64" else None,
            "platform": self.jax_device.platform,
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


def heatmap_loss(heatmaps: jax.Array, target: jax.Array) -> jax.Array:
    """Sum over stacks of mean((heatmaps_s - target)^2); heatmaps (S, N, h, w, K), target (N, h, w, K)."""
    with jax.named_scope("loss"):
        return jnp.sum(jnp.mean(jnp.square(heatmaps - target), axis=(1, 2, 3, 4)))


def apply_module(graphdef: nnx.GraphDef, params: nnx.State, stats: nnx.State, inputs: tuple,
                 train: bool) -> tuple[Any, nnx.State]:  # fmt: skip
    """A pure call of the module split as (graphdef, params, stats): (its output, its BN statistics after).

    For jax.jit and jax.vjp: the module is merged inside the trace, so a jitted call pays no nnx graph
    traversal. Merge takes no training flag (it has no BN); every other module takes `train` last.
    """
    # copy=True: fresh Variables at this trace level, so BN may update its stats inside value_and_grad
    module = nnx.merge(graphdef, params, stats, copy=True)
    with _bf16_stats_downcast_allowed():
        out = module(*inputs) if isinstance(module, Merge) else module(*inputs, train)
    return out, nnx.state(module, nnx.BatchStat)


def _jitted_functions(graphdef: nnx.GraphDef) -> tuple[Callable, Callable, Callable]:
    """forward_eval, forward_train and loss_and_grads as jax.jit of pure functions of (params, stats, ...)."""

    def loss_fn(params, stats, x, target):
        heatmaps, new_stats = apply_module(graphdef, params, stats, (x,), True)  # (S, N, h, w, K)
        return heatmap_loss(heatmaps, target), new_stats

    def loss_and_grads(params, stats, x, target):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, target)
        return loss, grads, new_stats

    def forward_eval(params, stats, x):
        return apply_module(graphdef, params, stats, (x,), False)[0]

    def forward_train(params, stats, x):
        return apply_module(graphdef, params, stats, (x,), True)

    return jax.jit(forward_eval), jax.jit(forward_train), jax.jit(loss_and_grads)


# ------------------------------------------------------------------------------------------ module level
def gpu_available() -> bool:
    """True when JAX sees at least one GPU."""
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:  # no GPU backend (CPU-only jaxlib or no driver)
        return False


def configure_math(fp32_math: str = "ieee", autotune: bool = True) -> dict[str, object]:
    """Pin this process's GPU math: XLA's default precision for fp32 dots and convolutions "highest" (full
    fp32) or "tensorfloat32" (XLA uses TF32 by default on Ampere and later). Autotuning is an XLA flag read
    when the backend starts (--xla_gpu_autotune_level, set by the worker before JAX loads); returns the
    settings now in force."""
    base.check_math_args(fp32_math)
    jax.config.update("jax_default_matmul_precision", "highest" if fp32_math == "ieee" else "tensorfloat32")
    return {"fp32_math": fp32_math, "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
            "xla_flags": os.environ.get("XLA_FLAGS"), "autotune_requested": autotune}  # fmt: skip


def build(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, device: str = "cpu",
          precision: str = "fp32", execution: str = EXECUTIONS[0], impl: str = IMPLS[0],
          **options: object) -> JaxHourglass:
    """A JaxHourglass; weights default to impls.spec.init_weights(config, seed=0); impl: see the module doc."""
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available, options, impl=impl,
                     impls=IMPLS)  # fmt: skip
    weights = resolve_weights(config, weights)
    return JaxHourglass(config, weights, device=device, precision=precision, execution=execution, impl=impl)


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


def _device_array(a: np.ndarray, device: str, precision: str) -> jax.Array:
    """A numpy array on `device` in `precision`'s dtype."""
    with x64_scope(precision):
        return jax.device_put(a.astype(_DTYPES[precision]), jax.devices(device)[0])


def _scoped(step: Callable[[], None], precision: str) -> Callable[[], None]:
    """`step` itself, or for fp64 `step` run inside x64_scope (its arrays are float64)."""
    if precision != "fp64":
        return step

    def step_x64() -> None:
        with jax.enable_x64(True):
            step()

    return step_x64


def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                   precision: str = "fp32", seed: int = 0) -> Callable[[], None]:
    """One stride-1 SAME conv without bias, on device-resident random data: the conv-ceiling probe.

    Jitted, as the model is; each call ends in jax.block_until_ready.
    """
    check_device_args(FRAMEWORK, precision, device, gpu_available)
    x, kernel = (_device_array(a, device, precision) for a in spec.conv_probe_arrays(input_shape, c_out, kernel_size, seed))
    conv = jax.jit(lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

    def step() -> None:
        jax.block_until_ready(conv(x, kernel))  # (N, H, W, c_out)

    return _scoped(step, precision)


def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32",
                   seed: int = 0) -> Callable[[], None]:
    """(m, k) @ (k, n) on device-resident random data: the matmul-ceiling probe.

    Jitted, as the model is; each call ends in jax.block_until_ready.
    """
    check_device_args(FRAMEWORK, precision, device, gpu_available)
    a, b = (_device_array(operand, device, precision) for operand in spec.gemm_probe_arrays(m, k, n, seed))
    matmul = jax.jit(jnp.matmul)

    def step() -> None:
        jax.block_until_ready(matmul(a, b))  # (m, n)

    return _scoped(step, precision)


# profile(config, *, phase, batch_size, execution, trace_dir, ...) -> impls.profiling.ProfileResult; it runs
# impls/profilers/jax_profiling.py, imported on the first call.
profile = profiling.framework_profile(FRAMEWORK, gpu_available)
