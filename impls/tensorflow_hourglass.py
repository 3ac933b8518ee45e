"""Stacked Hourglass in TensorFlow: small tf.Module layers, NHWC activations, HWIO kernels, explicit padding.

Executions: "eager" (op by op), "function" (one tf.function graph per pass, optimised by Grappler) and
"xla" (the same functions with jit_compile=True). Keras is not used: Keras 3 adds per-layer overhead in
eager mode and hides the padding and BN momentum conventions that impls.spec fixes explicitly.

Variants (impl): "idiomatic" writes every convolution with its explicit padding list and batch norm as
tf.nn.batch_normalization over moments, as Keras 3 does; "tuned" is the same computation as TensorFlow
runs it fastest: padding="SAME" wherever the spec's padding is SAME's (every conv of padding="same"
configs; TensorFlow sends explicit-padding backward convolutions to its generic Eigen kernels instead of
oneDNN's), and outside XLA the fused batch-norm op (FusedBatchNormV3): in training one op forward and one
backward per BN instead of dozens; in eval mode Grappler's remapper folds each conv, its BN and the ReLU
after it into one oneDNN convolution. Under XLA the fused op measured slower (README "Implementation
variants"), so XLA keeps the unfused batch norm. The fused op has no float64 kernel, so an fp64 tuned model
keeps the unfused batch norm too.
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the import: hides TF's info logs

import numpy as np
import tensorflow as tf

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

FRAMEWORK = "tensorflow"
EXECUTIONS: tuple[str, ...] = registry.EXECUTIONS[FRAMEWORK]
IMPLS: tuple[str, ...] = registry.IMPLS[FRAMEWORK]
PRECISIONS: tuple[str, ...] = base.PRECISIONS
_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp64": tf.float64}
_DEVICES = {"cpu": "/CPU:0", "gpu": "/GPU:0"}


class _Context:
    """What every layer constructor needs: the layer specs by canonical name, the weights and the dtype."""

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], dtype: tf.DType,
                 impl: str = "idiomatic", execution: str = "eager") -> None:
        self.config = config
        self.specs = {layer.name: layer for layer in spec.layers(config)}
        self.weights = weights
        self.dtype = dtype
        self.tuned = impl == "tuned"
        # FusedBatchNormV3 has no float64 kernel, and under XLA it measured slower than the unfused ops
        self.fused_bn = self.tuned and dtype != tf.float64 and execution != "xla"

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
        self.padding: str | list[list[int]] = [[0, 0], [top, bottom], [left, right], [0, 0]]
        if ctx.tuned and conv.pad == _same_pad(conv):
            self.padding = "SAME"  # the same pads, named: TensorFlow then picks its oneDNN backward kernels

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = tf.nn.conv2d(x, self.kernel, self.stride, self.padding)
        return y if self.bias is None else tf.nn.bias_add(y, self.bias)


def _same_pad(conv: spec.ConvSpec) -> spec.Pad:
    """The padding TensorFlow's padding="SAME" gives this conv: ((top, bottom), (left, right))."""
    return tuple(spec.same_padding(conv.in_hw[a], conv.kernel_size, conv.stride) for a in range(2))  # type: ignore[return-value]


class BatchNorm2d(tf.Module):
    """Batch norm over (N, H, W): batch statistics (biased variance) in training, running ones otherwise."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name.rsplit(".", 1)[-1])
        self.scale = ctx.variable(f"{name}.scale")
        self.bias = ctx.variable(f"{name}.bias")
        self.mean = ctx.variable(f"{name}.mean", trainable=False)
        self.var = ctx.variable(f"{name}.var", trainable=False)
        self.fused = ctx.fused_bn  # outside XLA and float64: see the module docstring

    def __call__(self, x: tf.Tensor, train: bool) -> tf.Tensor:
        if self.fused:
            return self._fused_train(x) if train else self._fused_eval(x)
        if train:
            mean, var = batch_moments(x)  # (C,) each; the biased variance, as tf.nn.moments gives
            # new = 0.9 * old + 0.1 * batch (Keras momentum 0.9 = PyTorch momentum 0.1)
            self.mean.assign(spec.BN_DECAY * self.mean + (1.0 - spec.BN_DECAY) * mean)
            self.var.assign(spec.BN_DECAY * self.var + (1.0 - spec.BN_DECAY) * var)
        else:
            mean, var = self.mean, self.var
        return tf.nn.batch_normalization(x, mean, var, self.bias, self.scale, spec.BN_EPSILON)

    def _fused_eval(self, x: tf.Tensor) -> tf.Tensor:
        """The same eval-mode batch norm as one FusedBatchNormV3 op over the running statistics (x (N, H, W, C)).

        Grappler's remapper folds a conv, this op and a following ReLU into one oneDNN convolution
        (_FusedConv2D with FusedBatchNorm, Relu), as torch's tuned variant folds BN into the conv weights.
        """
        f32 = lambda t: tf.cast(t, tf.float32)  # noqa: E731 -- a no-op for float32 variables
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=f32(self.scale), offset=f32(self.bias), mean=f32(self.mean), variance=f32(self.var),
            epsilon=spec.BN_EPSILON, exponential_avg_factor=1.0, data_format="NHWC", is_training=False,
        )  # fmt: skip
        return y

    def _fused_train(self, x: tf.Tensor) -> tf.Tensor:
        """The same train-mode batch norm as one FusedBatchNormV3 op (x (N, H, W, C); its gradient is one op too).

        Called through tf.raw_ops because tf.nn.fused_batch_norm raises epsilon to at least 1.001e-5 (cuDNN's
        floor, with margin), which would not be the spec's 1e-5. The op wants float32 scale, offset and
        statistics even for bfloat16 activations. In training it normalises with the biased batch variance
        and returns the variance times n/(n-1) (Bessel's correction, for running averages); the spec's
        running variance takes the biased one, so that factor is undone before the update.
        """
        f32 = lambda t: tf.cast(t, tf.float32)  # noqa: E731 -- a no-op for float32 variables
        empty = tf.constant([], tf.float32)
        y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=f32(self.scale), offset=f32(self.bias), mean=empty, variance=empty,
            epsilon=spec.BN_EPSILON, exponential_avg_factor=1.0, data_format="NHWC", is_training=True,
        )  # fmt: skip
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)  # N * H * W values per channel
        biased = tf.stop_gradient(var) * (n - 1.0) / n  # (C,); stop_gradient: statistics take no gradient
        mean = tf.stop_gradient(mean)
        self.mean.assign(spec.BN_DECAY * self.mean + (1.0 - spec.BN_DECAY) * tf.cast(mean, self.mean.dtype))
        self.var.assign(spec.BN_DECAY * self.var + (1.0 - spec.BN_DECAY) * tf.cast(biased, self.var.dtype))
        return y


def _mean_over_nhw(x: tf.Tensor) -> tf.Tensor:
    """Mean of (N, H, W, C) over N, H and W, one axis at a time: (C,)."""
    return tf.reduce_mean(tf.reduce_mean(tf.reduce_mean(x, axis=2), axis=1), axis=0)  # (N, H, C) -> (N, C) -> (C,)


def batch_moments(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """tf.nn.moments(x, axes=[0, 1, 2]) summed one axis at a time: the batch mean and biased variance, (C,) each.

    tf.nn.moments reduces N, H and W in one op, and TensorFlow's CPU kernel for a reduction over leading axes
    adds the N*H*W rows into one float32 accumulator in turn, so its rounding grows with N*H*W: the mean of
    the squares of 16x64x64x32 values comes out 2.3e-6 off, 20 times torch's and JAX's error on the same
    data (~1e-7). Reducing W, then H, then N keeps every float32 sum to at most max(N, H, W) terms: the same
    statistics in exact arithmetic, ~1e-7 off in float32. Over 32 generated train-mode configs
    (tests/fp32_vs_fp64.py) this took TensorFlow's median fp32 distance from float64 from 1.9e-5 to 7.0e-6
    on the heatmaps and from 1.4e-4 to 4.1e-5 on the whole gradient (PyTorch: 1.4e-5 and 1.2e-4; JAX: 8.4e-6
    and 3.3e-5). As in tf.nn.moments, the variance does not differentiate through the mean (that term is zero).
    """
    mean = _mean_over_nhw(x)
    var = _mean_over_nhw(tf.math.squared_difference(x, tf.stop_gradient(mean)))
    return mean, var


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

    def __call__(self, x: tf.Tensor, train: bool) -> tf.Tensor:
        relu = tf.nn.relu
        if self.preact:
            y = self.conv1(relu(self.bn1(x, train)))
            y = self.conv2(relu(self.bn2(y, train)))
            y = self.conv3(relu(self.bn3(y, train)))
            return y + (x if self.skip_conv is None else self.skip_conv(x))
        y = relu(self.bn1(self.conv1(x), train))
        y = relu(self.bn2(self.conv2(y), train))
        y = relu(self.bn3(self.conv3(y), train))
        skip = x if self.skip_conv is None else relu(self.skip_bn(self.skip_conv(x), train))
        return relu(y + skip)


class Hourglass(tf.Module):
    """One hourglass level: a full-resolution branch plus a half-resolution branch that recurses."""

    def __init__(self, name: str, depth: int, ctx: _Context) -> None:
        super().__init__(name=name.rsplit(".", 1)[-1])
        self.up1 = Residual(f"{name}.up1", ctx)
        self.low1 = Residual(f"{name}.low1", ctx)
        self.low2 = Hourglass(f"{name}.low2", depth - 1, ctx) if depth > 1 else Residual(f"{name}.low2", ctx)
        self.low3 = Residual(f"{name}.low3", ctx)

    def __call__(self, x: tf.Tensor, train: bool) -> tf.Tensor:
        up1 = self.up1(x, train)
        low = self.low1(tf.nn.max_pool2d(x, 2, 2, "VALID"), train)  # (N, H/2, W/2, C)
        low = self.low3(self.low2(low, train), train)
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

    def __call__(self, x: tf.Tensor, train: bool) -> tf.Tensor:
        x = tf.nn.relu(self.bn(self.conv(x), train))  # (N, H/2, W/2, C/4)
        x = self.res1(x, train)  # (N, H/2, W/2, C/2)
        x = self.pool(x, 2, 2, "VALID")  # (N, H/4, W/4, C/2)
        return self.res3(self.res2(x, train), train)  # (N, H/4, W/4, C)


class Head(tf.Module):
    """Per-stack output: features for the next stack (`previous`) and K heatmaps."""

    def __init__(self, name: str, ctx: _Context) -> None:
        super().__init__(name=name)
        self.res = Residual(f"{name}.res", ctx)
        self.lin_conv, self.lin_bn = Conv2d(f"{name}.lin_conv", ctx), BatchNorm2d(f"{name}.lin_bn", ctx)
        self.heatmap_conv = Conv2d(f"{name}.heatmap_conv", ctx)

    def __call__(self, x: tf.Tensor, train: bool) -> tuple[tf.Tensor, tf.Tensor]:
        previous = tf.nn.relu(self.lin_bn(self.lin_conv(self.res(x, train)), train))  # (N, h, w, C)
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

    def __call__(self, x: tf.Tensor, train: bool) -> tf.Tensor:
        # Each stage runs in a name scope named after it, so profiled graph ops read "stem/...",
        # "gradient_tape/head_0/...". Graph modes pay for scopes at trace time only; eager, a few µs per step.
        with tf.name_scope("stem"):
            x = self.stem(x, train)  # (N, h, w, C) with h, w = H/4, W/4
        outputs = []
        for i in range(self.num_stacks):
            with tf.name_scope(f"hourglass_{i}"):
                y = getattr(self, f"hourglass_{i}")(x, train)
            with tf.name_scope(f"head_{i}"):
                previous, heatmaps = getattr(self, f"head_{i}")(y, train)
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


def heatmap_loss(heatmaps: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
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

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], *, device: str, precision: str,
                 execution: str, impl: str = IMPLS[0]) -> None:
        super().__init__(config, device=device, precision=precision, execution=execution, impl=impl)
        self.tf_device = _DEVICES[device]
        self._dtype = _DTYPES[precision]
        self._io_dtype = tf.as_dtype(base.io_dtype(precision))  # numpy at the interface: float64 for fp64
        with tf.device(self.tf_device):
            self.net = StackedHourglass(_Context(config, weights, self._dtype, impl, execution))
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
        self._forward_eval = self._compile(lambda x: self._run_forward(x, False), [x_spec])
        self._forward_train = self._compile(lambda x: self._run_forward(x, True), [x_spec])
        self._loss_and_grads = self._compile(self._run_loss_and_grads, [x_spec, target_spec])

    def _compile(self, fn: Callable, signature: list[tf.TensorSpec]) -> Callable:
        """`fn` itself in eager mode, else one tf.function (XLA-compiled for "xla") with a fixed signature."""
        if self.execution == "eager":
            return fn
        # The batch dimension is dynamic in the signature, so one trace serves every batch size; XLA
        # still compiles once per concrete shape at run time.
        return tf.function(fn, input_signature=signature, jit_compile=self.execution == "xla")

    def _run_forward(self, x: tf.Tensor, train: bool) -> tf.Tensor:
        """Heatmaps (S, N, h, w, K) of x (N, H, W, 3) on the model's device."""
        with tf.device(self.tf_device):
            return self.net(x, train)

    def _run_loss_and_grads(self, x: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Train-mode loss and the gradient of every trainable variable, in self._trainable's order."""
        with tf.device(self.tf_device):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(self._trainable)  # exactly the parameters that get gradients, not BN statistics
                heatmaps = self.net(x, True)  # (S, N, h, w, K)
                with tf.name_scope("loss"):
                    loss = heatmap_loss(heatmaps, target)
            return loss, tape.gradient(loss, self._trainable)

    def _input(self, a: np.ndarray) -> tf.Tensor:
        """A numpy array as a tensor on the model's device in the model's dtype."""
        with tf.device(self.tf_device):
            # identity runs on the device, so the result lives there even when cast is a no-op (fp32)
            return tf.identity(tf.cast(tf.convert_to_tensor(a, self._io_dtype), self._dtype))

    def _check_input(self, x: np.ndarray, target: np.ndarray | None = None) -> None:
        """ValueError naming the shape expected when x (or target) does not fit the config."""
        h, w = self.config.input_hw
        if np.ndim(x) != 4 or tuple(np.shape(x)[1:]) != (h, w, 3):
            raise ValueError(f"input must be (N, {h}, {w}, 3) NHWC, got shape {np.shape(x)}")
        want = (np.shape(x)[0], *self.config.heatmap_hw, self.config.num_keypoints)
        if target is not None and tuple(np.shape(target)) != want:
            raise ValueError(f"target must be {want} (N, H/4, W/4, K), got shape {np.shape(target)}")

    def num_params(self) -> int:
        """Elements of every trainable tf.Variable (BN running statistics are not trainable)."""
        return int(sum(np.prod(v.shape) for v in self.net.trainable_variables))

    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        """Heatmaps (S, N, h, w, K) float32 (fp64: float64); train_mode uses batch statistics and updates the running ones."""
        if train_mode:
            check_train_batch(self.config, len(x))
        self._check_input(x)
        forward = self._forward_train if train_mode else self._forward_eval
        heatmaps = forward(self._input(x))  # (S, N, h, w, K)
        return tf.cast(heatmaps, self._io_dtype).numpy()

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Train-mode loss and every trainable parameter's gradient, float32 (fp64: float64) under canonical names."""
        check_train_batch(self.config, len(x))
        self._check_input(x, target)
        loss, grads = self._loss_and_grads(self._input(x), self._input(target))
        return float(loss), {
            n: tf.cast(g, self._io_dtype).numpy() for n, g in zip(self._trainable_names, grads, strict=True)
        }

    def export_weights(self) -> dict[str, np.ndarray]:
        """Every variable (parameters and BN statistics) as float32 (fp64: float64) numpy under canonical names."""
        dtype = self._io_dtype.as_numpy_dtype
        return {name: np.array(tf.cast(v, self._io_dtype).numpy(), dtype=dtype) for name, v in self._variables.items()}

    def step_inputs(self, batch_size: int, seed: int) -> tuple[tf.Tensor, tf.Tensor]:
        """impls.spec.random_batch on the device: x (N, H, W, 3) and target (N, H/4, W/4, K)."""
        x, target = spec.random_batch(self.config, batch_size, seed)
        return self._input(x), self._input(target)

    def step_program(self, phase: str, batch_size: int, seed: int) -> tuple[Callable, tuple[tf.Tensor, ...]]:
        """The function a `phase` step calls (a tf.function unless eager) and its device-resident arguments:
        (x,) for forward, (x, target) for forward_backward."""
        check_step_args(phase, batch_size)
        if phase == "forward_backward":
            check_train_batch(self.config, batch_size)
        x, target = self.step_inputs(batch_size, seed)
        return (self._forward_eval, (x,)) if phase == "forward" else (self._loss_and_grads, (x, target))

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """One call of the step's function on device-resident inputs, ending with a device sync."""
        function, args = self.step_program(phase, batch_size, seed)  # bound now: no lookups inside the timed call
        # Sync: sync_devices() blocks until the device's stream has drained (a no-op op on CPU). It is the
        # cheapest honest choice: fetching a scalar that depends on every gradient would add one reduction
        # kernel per parameter (hundreds at the seed preset). The outputs stay referenced until it returns.
        sync = tf.test.experimental.sync_devices

        def step() -> None:
            # forward: heatmaps (S, N, h, w, K); forward_backward: the loss and every gradient, each an output
            # of the function, so graph pruning cannot skip any.
            _outputs = function(*args)
            sync()

        return step

    def reset_peak_memory(self) -> bool:
        """Reset TensorFlow's GPU allocator peak (nothing to reset on the CPU: False)."""
        if self.device != "gpu":
            return False
        tf.config.experimental.reset_memory_stats("GPU:0")
        return True

    def peak_memory_bytes(self) -> int | None:
        """TensorFlow's GPU allocator peak since the last reset; None on the CPU."""
        if self.device != "gpu":
            return None
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])

    def settings(self) -> dict[str, object]:
        """Device, layout, compile mode, dtype, BN and thread settings of this model."""
        compile_mode = {
            "eager": "op by op (no tf.function)",
            "function": "tf.function graph, Grappler default optimisations",
            "xla": "tf.function(jit_compile=True)",
        }[self.execution]
        return {
            **super().settings(),
            "tf_device": self.tf_device,
            "layout": "NHWC (Grappler may transpose to NCHW on GPU in function mode)",
            "compile": compile_mode,
            "input_signature": "batch dimension dynamic, one trace per pass",
            "dtype": self._dtype.name,
            "batch_norm": self._batch_norm_kind(),
            "padding": self._padding_kind(),
            "sync": "tf.test.experimental.sync_devices()",
            "tf32_enabled": tf.config.experimental.tensor_float_32_execution_enabled(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        }

    def _batch_norm_kind(self) -> str:
        """How this model's batch norms run, for settings()."""
        if self.net.stem.bn.fused:
            return ("fused, tf.raw_ops.FusedBatchNormV3: train mode one op per BN and per gradient; eval mode over "
                    "the running statistics, which Grappler's remapper (tf.function graphs) folds into the conv "
                    "before it and a ReLU after")
        return "batch statistics reduced one axis at a time (batch_moments) + tf.nn.batch_normalization (unfused ops)"

    def _padding_kind(self) -> str:
        """How this model's convolutions pad, for settings(): SAME where it equals the spec's pads, else explicit."""
        pads = [m.padding for m in self.net.submodules if isinstance(m, Conv2d)]
        named = sum(p == "SAME" for p in pads)
        return f'padding="SAME" in {named} of {len(pads)} convolutions, explicit pad lists in the rest'


def gpu_available() -> bool:
    """True when TensorFlow sees at least one GPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def configure_math(fp32_math: str = "ieee", autotune: bool = True) -> dict[str, object]:
    """Pin this process's GPU math: TensorFloat-32 off ("ieee") or on ("tf32"; TensorFlow's default is on).
    cuDNN autotuning is read from TF_CUDNN_USE_AUTOTUNE when the GPU starts, so the worker sets it before
    TensorFlow loads; returns the settings now in force."""
    base.check_math_args(fp32_math)
    tf.config.experimental.enable_tensor_float_32_execution(fp32_math == "tf32")
    return {"fp32_math": fp32_math, "tf32_enabled": tf.config.experimental.tensor_float_32_execution_enabled(),
            "cudnn_autotune": os.environ.get("TF_CUDNN_USE_AUTOTUNE", "1") != "0", "autotune_requested": autotune}  # fmt: skip


def runtime_info() -> dict[str, object]:
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


def build(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, device: str = "cpu",
          precision: str = "fp32", execution: str = EXECUTIONS[0], impl: str = IMPLS[0],
          **options: object) -> TensorFlowHourglass:
    """A TensorFlowHourglass; weights default to impls.spec.init_weights(config, seed=0); impl: see the module doc."""
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available, options, impl=impl,
                     impls=IMPLS)  # fmt: skip
    weights = resolve_weights(config, weights)
    return TensorFlowHourglass(config, weights, device=device, precision=precision, execution=execution, impl=impl)


def _constant(a: np.ndarray, device: str, precision: str) -> tf.Tensor:
    """A numpy array as a constant on `device` in `precision`'s dtype."""
    with tf.device(_DEVICES[device]):
        return tf.cast(tf.constant(a), _DTYPES[precision])


def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                   precision: str = "fp32", seed: int = 0) -> Callable[[], None]:
    """One stride-1 SAME conv without bias, on device-resident random data: the conv-ceiling probe.

    Runs as a tf.function (the graph path the model's fastest modes use); each call ends with sync_devices.
    """
    check_device_args(FRAMEWORK, precision, device, gpu_available)
    x, kernel = (_constant(a, device, precision) for a in spec.conv_probe_arrays(input_shape, c_out, kernel_size, seed))
    with tf.device(_DEVICES[device]):
        conv = tf.function(lambda a, k: tf.nn.conv2d(a, k, strides=1, padding="SAME"))

    def step() -> None:
        with tf.device(_DEVICES[device]):
            _y = conv(x, kernel)  # (N, H, W, c_out), kept referenced until the sync
        tf.test.experimental.sync_devices()

    return step


def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32",
                   seed: int = 0) -> Callable[[], None]:  # fmt: skip
    """One (m, k) @ (k, n) matmul on device-resident random data, as a tf.function; each call ends synced."""
    check_device_args(FRAMEWORK, precision, device, gpu_available)
    a, b = (_constant(operand, device, precision) for operand in spec.gemm_probe_arrays(m, k, n, seed))
    with tf.device(_DEVICES[device]):
        matmul = tf.function(tf.linalg.matmul)

    def step() -> None:
        with tf.device(_DEVICES[device]):
            _c = matmul(a, b)  # (m, n), kept referenced until the sync
        tf.test.experimental.sync_devices()

    return step


# profile(config, *, phase, batch_size, execution, trace_dir, ...) -> impls.profiling.ProfileResult; it runs
# impls/profilers/tensorflow_profiling.py, imported on the first call.
profile = profiling.framework_profile(FRAMEWORK, gpu_available)
