"""The network written out as data: every conv and BN layer with its canonical name, shape and padding.

This is the single description the three implementations are checked against. It gives the canonical
parameter names and layouts (NHWC activations, HWIO kernels), the analytic parameter and FLOP counts,
and the framework-free canonical weights and random inputs. Imports numpy only.

Canonical names mirror the module tree that every implementation builds with the same attribute names:

    stem.{conv, bn, res1, res2, res3}
    hourglass_{i}.{up1, low1, low2, low3}        low2 is a nested hourglass until depth 1, then a residual
    head_{i}.{res, lin_conv, lin_bn, heatmap_conv}
    merge_{i}.{feature_conv, heatmap_conv}       between stacks only (i < num_stacks - 1)
    residual: {conv1, bn1, conv2, bn2, conv3, bn3} plus {skip_conv[, skip_bn]} when widths differ

Parameters: conv `kernel` (kh, kw, c_in, c_out) and `bias` (c_out,); BN `scale`, `bias` (trainable) and
`mean`, `var` (running statistics, not trainable).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from impls.config import HourglassConfig

Pad = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))

BN_EPSILON = 1e-5
# Running statistics: new = BN_DECAY * old + (1 - BN_DECAY) * batch. This is Keras/Flax momentum 0.9 and
# PyTorch momentum 0.1 (PyTorch weights the *new* batch by its momentum).
BN_DECAY = 0.9


@dataclass(frozen=True)
class ConvSpec:
    """One 2-D convolution: canonical name, geometry and explicit padding."""

    name: str
    kernel_size: int
    stride: int
    c_in: int
    c_out: int
    bias: bool
    pad: Pad
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    feeds_bn: bool = False  # the conv's output goes straight into a BN (its bias is then redundant)

    @property
    def macs_per_image(self) -> int:
        """Multiply-adds for one image: every output element sums k*k*c_in products."""
        return self.out_hw[0] * self.out_hw[1] * self.kernel_size**2 * self.c_in * self.c_out


@dataclass(frozen=True)
class BatchNormSpec:
    """One batch normalisation over `channels` features."""

    name: str
    channels: int


def same_padding(in_size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: the odd pixel goes after, not before.

    For a 7x7 stride-2 conv of an even input this is (2, 3); a symmetric padding of 3 shifts the sampling
    grid by one pixel and gives different numbers.
    """
    out_size = -(-in_size // stride)
    total = max((out_size - 1) * stride + kernel_size - in_size, 0)
    return (total // 2, total - total // 2)


def conv_padding(config: HourglassConfig, in_hw: tuple[int, int], kernel_size: int, stride: int) -> Pad:
    """Explicit padding for a conv under the config's padding rule."""
    if config.padding == "same":
        return (same_padding(in_hw[0], kernel_size, stride), same_padding(in_hw[1], kernel_size, stride))
    half = kernel_size // 2  # Torch7: pad (k-1)/2 on every side
    return ((half, half), (half, half))


class _Walker:
    """Walks the network in forward order and records every conv and BN."""

    def __init__(self, config: HourglassConfig) -> None:
        self.config = config
        self.layers: list[ConvSpec | BatchNormSpec] = []

    def conv(
        self, name: str, in_hw: tuple[int, int], c_in: int, c_out: int, k: int, stride: int, bias: bool,
        feeds_bn: bool = False,
    ) -> tuple[int, int]:
        pad = conv_padding(self.config, in_hw, k, stride)
        out_hw = tuple((in_hw[a] + sum(pad[a]) - k) // stride + 1 for a in range(2))
        self.layers.append(ConvSpec(name, k, stride, c_in, c_out, bias, pad, in_hw, out_hw, feeds_bn))  # type: ignore[arg-type]
        return out_hw  # type: ignore[return-value]

    def bn(self, name: str, channels: int) -> None:
        self.layers.append(BatchNormSpec(name, channels))

    def residual(self, name: str, hw: tuple[int, int], c_in: int, c_out: int) -> None:
        cb = self.config.conv_bias
        if self.config.block == "postact":
            mid = c_out // 4  # seed: conv-BN-ReLU x3 with a c/4 bottleneck
            self.conv(f"{name}.conv1", hw, c_in, mid, 1, 1, cb, feeds_bn=True)
            self.bn(f"{name}.bn1", mid)
            self.conv(f"{name}.conv2", hw, mid, mid, 3, 1, cb, feeds_bn=True)
            self.bn(f"{name}.bn2", mid)
            self.conv(f"{name}.conv3", hw, mid, c_out, 1, 1, cb, feeds_bn=True)
            self.bn(f"{name}.bn3", c_out)
            if c_in != c_out:
                self.conv(f"{name}.skip_conv", hw, c_in, c_out, 1, 1, cb, feeds_bn=True)
                self.bn(f"{name}.skip_bn", c_out)
        else:
            mid = c_out // 2  # paper: BN-ReLU-conv x3 with a c/2 bottleneck
            self.bn(f"{name}.bn1", c_in)
            self.conv(f"{name}.conv1", hw, c_in, mid, 1, 1, cb, feeds_bn=True)
            self.bn(f"{name}.bn2", mid)
            self.conv(f"{name}.conv2", hw, mid, mid, 3, 1, cb, feeds_bn=True)
            self.bn(f"{name}.bn3", mid)
            self.conv(f"{name}.conv3", hw, mid, c_out, 1, 1, cb)
            if c_in != c_out:
                self.conv(f"{name}.skip_conv", hw, c_in, c_out, 1, 1, cb)  # plain 1x1, no BN, no ReLU

    def hourglass(self, name: str, hw: tuple[int, int], depth: int) -> None:
        c = self.config.channels
        low_hw = (hw[0] // 2, hw[1] // 2)
        self.residual(f"{name}.up1", hw, c, c)
        self.residual(f"{name}.low1", low_hw, c, c)
        if depth > 1:
            self.hourglass(f"{name}.low2", low_hw, depth - 1)
        else:
            self.residual(f"{name}.low2", low_hw, c, c)
        self.residual(f"{name}.low3", low_hw, c, c)

    def network(self) -> list[ConvSpec | BatchNormSpec]:
        cfg = self.config
        c, k = cfg.channels, cfg.num_keypoints
        c_stem, c_half = cfg.stem_channels
        hw = self.conv("stem.conv", cfg.input_hw, 3, c_stem, 7, 2, cfg.conv_bias, feeds_bn=True)
        self.bn("stem.bn", c_stem)
        self.residual("stem.res1", hw, c_stem, c_half)
        hw = (hw[0] // 2, hw[1] // 2)  # 2x2 stride-2 pool
        self.residual("stem.res2", hw, c_half, c_half)
        self.residual("stem.res3", hw, c_half, c)
        for i in range(cfg.num_stacks):
            self.hourglass(f"hourglass_{i}", hw, cfg.depth)
            self.residual(f"head_{i}.res", hw, c, c)
            self.conv(f"head_{i}.lin_conv", hw, c, c, 1, 1, cfg.conv_bias, feeds_bn=True)
            self.bn(f"head_{i}.lin_bn", c)
            self.conv(f"head_{i}.heatmap_conv", hw, c, k, 1, 1, True)
            if i < cfg.num_stacks - 1:
                self.conv(f"merge_{i}.feature_conv", hw, c, c, 1, 1, True)
                self.conv(f"merge_{i}.heatmap_conv", hw, k, c, 1, 1, True)
        return self.layers


def layers(config: HourglassConfig) -> list[ConvSpec | BatchNormSpec]:
    """Every conv and BN of the network, in forward order, with canonical names."""
    return _Walker(config).network()


def convs(config: HourglassConfig) -> list[ConvSpec]:
    """The convolutions only, in forward order."""
    return [layer for layer in layers(config) if isinstance(layer, ConvSpec)]


def param_shapes(config: HourglassConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Canonical name -> (shape, trainable) for every parameter and BN running statistic."""
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {}
    for layer in layers(config):
        if isinstance(layer, ConvSpec):
            shapes[f"{layer.name}.kernel"] = ((layer.kernel_size, layer.kernel_size, layer.c_in, layer.c_out), True)
            if layer.bias:
                shapes[f"{layer.name}.bias"] = ((layer.c_out,), True)
        else:
            for field, trainable in (("scale", True), ("bias", True), ("mean", False), ("var", False)):
                shapes[f"{layer.name}.{field}"] = ((layer.channels,), trainable)
    return shapes


def trainable_names(config: HourglassConfig) -> list[str]:
    """Names of the trainable parameters (those that get gradients), in forward order."""
    return [name for name, (_, trainable) in param_shapes(config).items() if trainable]


def bn_cancelled_biases(config: HourglassConfig) -> list[str]:
    """Conv biases whose gradient is zero in train mode, because a BN subtracts the batch mean and so
    removes any per-channel constant they add.

    Post-activation: the biases of convs fed straight into a BN (only present with conv_bias=True; the
    newell preset keeps them because the Torch7 network has them, and they still count as parameters);
    a ReLU stands between every other bias and the next BN. Pre-activation: every conv bias except the
    heatmap convs' (head_i.heatmap_conv.bias). There a per-channel constant passes identity skips, 1x1
    convs, pooling, upsampling and the merges unchanged (as another constant) until a BN removes it, and
    the heatmaps, the only output, come from relu(lin_bn(...)), after such a BN; the merge biases, which
    every config has, vanish too. Checked in float64 against every framework's gradient by
    tests/test_fp64_proof.py."""
    if config.block == "preact":
        return [f"{cv.name}.bias" for cv in convs(config)
                if cv.bias and not (cv.name.startswith("head_") and cv.name.endswith(".heatmap_conv"))]  # fmt: skip
    return [f"{cv.name}.bias" for cv in convs(config) if cv.bias and cv.feeds_bn]


def _residual_params(config: HourglassConfig, c_in: int, c_out: int) -> int:
    """Closed-form trainable parameter count of one residual block (BN: scale and bias)."""
    b = 1 if config.conv_bias else 0
    if config.block == "postact":
        m = c_out // 4
        n = (c_in * m + b * m + 2 * m) + (9 * m * m + b * m + 2 * m) + (m * c_out + b * c_out + 2 * c_out)
        if c_in != c_out:
            n += c_in * c_out + b * c_out + 2 * c_out
        return n
    m = c_out // 2
    n = 2 * c_in + (c_in * m + b * m) + 2 * m + (9 * m * m + b * m) + 2 * m + (m * c_out + b * c_out)
    if c_in != c_out:
        n += c_in * c_out + b * c_out
    return n


def count_params(config: HourglassConfig) -> int:
    """Trainable parameters from a closed-form formula (no layer walk, no framework).

    Counts conv kernels and biases and BN scale and offset; BN running mean and variance are state, not
    parameters, and are not counted.
    """
    b = 1 if config.conv_bias else 0
    c, k, s = config.channels, config.num_keypoints, config.num_stacks
    c_stem, c_half = config.stem_channels
    res = _residual_params(config, c, c)
    stem = (49 * 3 * c_stem + b * c_stem + 2 * c_stem) + _residual_params(config, c_stem, c_half)
    stem += _residual_params(config, c_half, c_half) + _residual_params(config, c_half, c)
    hourglass = (3 * config.depth + 1) * res  # up1, low1, low3 per level plus the innermost low2
    head = res + (c * c + b * c + 2 * c) + (c * k + k)
    merge = (c * c + c) + (k * c + c)
    return stem + s * (hourglass + head) + (s - 1) * merge


def count_flops(config: HourglassConfig, batch_size: int = 1, phase: str = "forward") -> int:
    """Convolution FLOPs (2 per multiply-add) for `batch_size` images.

    Counted: every convolution's multiply-adds. Not counted: bias adds, BN, ReLU, pooling, upsampling,
    residual adds and the loss (together a few percent of the convolutions at the seed preset).
    phase "forward_backward" adds, per conv, the weight gradient (same MACs as the forward) and the input
    gradient (same again), except the first conv's input gradient, which no one needs.
    """
    if phase not in ("forward", "forward_backward"):
        raise ValueError(f"phase must be 'forward' or 'forward_backward', got {phase!r}")
    conv_list = convs(config)
    macs = sum(cv.macs_per_image for cv in conv_list)
    if phase == "forward_backward":
        macs = 3 * macs - conv_list[0].macs_per_image
    return 2 * macs * batch_size


def init_weights(config: HourglassConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical float32 weights drawn from `seed`: canonical names and layouts (HWIO kernels).

    Kernels are He-normal (std sqrt(2 / fan_in)); the linear heatmap conv uses std sqrt(1 / fan_in).
    Biases and BN parameters and statistics are drawn near their usual initial values rather than at
    them, so that a swapped or dropped parameter changes the output and equivalence tests catch it.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, (shape, _) in param_shapes(config).items():
        field = name.rsplit(".", 1)[1]
        layer = name.rsplit(".", 1)[0]
        if field == "kernel":
            fan_in = shape[0] * shape[1] * shape[2]
            gain = 1.0 if layer.endswith("heatmap_conv") else 2.0
            value = rng.normal(0.0, np.sqrt(gain / fan_in), size=shape)
        elif field == "bias":
            value = rng.normal(0.0, 0.05, size=shape)
        elif field == "scale":
            value = rng.uniform(0.8, 1.2, size=shape)
        elif field == "mean":
            value = rng.normal(0.0, 0.05, size=shape)
        else:  # var
            value = rng.uniform(0.8, 1.2, size=shape)
        weights[name] = value.astype(np.float32)
    return weights


def check_weights(config: HourglassConfig, weights: dict[str, np.ndarray]) -> None:
    """Raise ValueError when `weights` lacks, adds or misshapes a canonical entry."""
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(
            f"weights do not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}; build them with impls.init_weights(config)"
        )
    for name, (shape, _) in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")


def loss_numpy(heatmaps: np.ndarray, target: np.ndarray) -> float:
    """The training loss: sum over stacks of mean((heatmaps_s - target)^2); heatmaps (S, N, h, w, K)."""
    return float(sum(np.mean((h.astype(np.float64) - target) ** 2) for h in heatmaps))


def random_arrays(seed: int, *shapes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Standard-normal float32 arrays of `shapes`, drawn in order from one generator seeded with `seed`.

    The one place inputs for timed work are drawn, so every framework gets the same numbers for a seed.
    Drawn directly as float32 (not float64 then cast): a later array never changes an earlier one.
    """
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape, dtype=np.float32) for shape in shapes)


def random_batch(config: HourglassConfig, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A benchmark step's inputs: x (N, H, W, 3) then target (N, H/4, W/4, K), float32, drawn from `seed`."""
    x, target = random_arrays(
        seed, (batch_size, *config.input_hw, 3), (batch_size, *config.heatmap_hw, config.num_keypoints)
    )
    return x, target


def conv_probe_arrays(
    input_shape: tuple[int, int, int, int], c_out: int, kernel_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The conv probe's input (N, H, W, c_in) then kernel (k, k, c_in, c_out), float32, drawn from `seed`."""
    c_in = input_shape[3]
    x, kernel = random_arrays(seed, tuple(input_shape), (kernel_size, kernel_size, c_in, c_out))
    return x, kernel


def gemm_probe_arrays(m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The GEMM probe's operands a (m, k) then b (k, n), float32, drawn from `seed`."""
    a, b = random_arrays(seed, (m, k), (k, n))
    return a, b
