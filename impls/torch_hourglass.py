"""The Stacked Hourglass network in PyTorch: an nn.Module tree named as in impls.spec, behind the hgbench contract.

Inside, activations are NCHW tensors (stored channels_last by default, which is oneDNN's and cuDNN's fast
layout); at the numpy boundary they are NHWC as everywhere in hgbench. Kernels are (c_out, c_in, kh, kw)
here and (kh, kw, c_in, c_out) canonically.

Variants (impl): "idiomatic" is the torch.nn module tree as its users write it, channels_last already (the
layout torch's own tuning guides recommend on CPUs and GPUs). "tuned" is the same network with every
eval-mode batch norm that directly follows a convolution folded into that convolution's weights and bias
(torch.nn.utils.fusion.fuse_conv_bn_weights, what torch.ao's conv-BN fusion and inference exporters do):
w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta, the same affine map in
exact arithmetic, one op fewer per pair. Training normalises with batch statistics, which cannot be folded,
so the tuned training step is the idiomatic one (impls.registry.IMPL_PHASES: no run measures it twice).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

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

FRAMEWORK = "torch"
EXECUTIONS: tuple[str, ...] = registry.EXECUTIONS[FRAMEWORK]
IMPLS: tuple[str, ...] = registry.IMPLS[FRAMEWORK]
PRECISIONS: tuple[str, ...] = base.PRECISIONS

# PyTorch weights the *new* batch statistic by `momentum`: 0.1 here is spec.BN_DECAY = 0.9 in Keras/Flax.
# Seam: torch updates running_var with the UNBIASED batch variance (times n/(n-1)), Keras and Flax with the
# biased one; normalisation itself uses the biased variance everywhere. Left as PyTorch does it.
BN_MOMENTUM = 0.1
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
# True only inside stage_scopes(): record_function costs a little even with no profiler listening, and under
# torch.compile dynamo guards on this global, so flipping it would recompile the model.
_stage_scopes_enabled = False


@contextlib.contextmanager
def stage_scopes() -> Iterator[None]:
    """Within the block, every stage (and the loss) runs inside a torch.profiler range named after it."""
    global _stage_scopes_enabled  # noqa: PLW0603 -- the module flag _in_scope reads
    _stage_scopes_enabled = True
    try:
        yield
    finally:
        _stage_scopes_enabled = False


def _in_scope(name: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """fn(*args), inside a profiler range called `name` while stage_scopes() is on."""
    if not _stage_scopes_enabled:
        return fn(*args)
    with torch.profiler.record_function(name):
        return fn(*args)


class Conv2d(nn.Conv2d):
    """nn.Conv2d with explicit ((top, bottom), (left, right)) padding.

    Symmetric pairs go into the conv's own `padding`; asymmetric ones (TF SAME for the 7x7/2 stem conv
    pads (2, 3)) are applied with F.pad in front of an unpadded conv, since nn.Conv2d pads both sides equally.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, pad: spec.Pad, bias: bool) -> None:
        (top, bottom), (left, right) = pad
        symmetric = top == bottom and left == right
        super().__init__(c_in, c_out, kernel_size, stride, padding=(top, left) if symmetric else 0, bias=bias)
        self.pad = pad
        self.pre_pad = None if symmetric else (left, right, top, bottom)  # F.pad order: last dim first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad asymmetrically where needed, then convolve."""
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)  # (N, C, H + top + bottom, W + left + right)
        return super().forward(x)


def _conv(config: HourglassConfig, hw: tuple[int, int], c_in: int, c_out: int, k: int, stride: int = 1, bias: bool | None = None) -> Conv2d:
    """A conv with the spec's padding for input size `hw`; bias defaults to config.conv_bias (convs feeding a BN)."""
    pad = spec.conv_padding(config, hw, k, stride)
    return Conv2d(c_in, c_out, k, stride, pad, config.conv_bias if bias is None else bias)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=spec.BN_EPSILON, momentum=BN_MOMENTUM)


class Residual(nn.Module):
    """Bottleneck residual: postact (conv-BN-ReLU x3, c_out/4) or preact (BN-ReLU-conv x3, c_out/2)."""

    def __init__(self, config: HourglassConfig, hw: tuple[int, int], c_in: int, c_out: int) -> None:
        super().__init__()
        self.preact = config.block == "preact"
        mid = c_out // 2 if self.preact else c_out // 4
        self.conv1 = _conv(config, hw, c_in, mid, 1)
        self.bn1 = _bn(c_in if self.preact else mid)
        self.conv2 = _conv(config, hw, mid, mid, 3)
        self.bn2 = _bn(mid)
        self.conv3 = _conv(config, hw, mid, c_out, 1)
        self.bn3 = _bn(mid if self.preact else c_out)
        self.skip_conv = _conv(config, hw, c_in, c_out, 1) if c_in != c_out else None
        self.skip_bn = _bn(c_out) if c_in != c_out and not self.preact else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, c_in, H, W) -> (N, c_out, H, W)."""
        if self.preact:
            y = self.conv1(F.relu(self.bn1(x), inplace=True))
            y = self.conv2(F.relu(self.bn2(y), inplace=True))
            y = self.conv3(F.relu(self.bn3(y), inplace=True))
            skip = self.skip_conv(x) if self.skip_conv is not None else x
            return y + skip
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = F.relu(self.bn3(self.conv3(y)), inplace=True)
        skip = F.relu(self.skip_bn(self.skip_conv(x)), inplace=True) if self.skip_conv is not None else x
        return F.relu(y + skip, inplace=True)


class Hourglass(nn.Module):
    """One hourglass level: up1(x) + upsample2x(low3(low2(low1(maxpool2x2(x))))), recursing `depth` times."""

    def __init__(self, config: HourglassConfig, hw: tuple[int, int], depth: int) -> None:
        super().__init__()
        c = config.channels
        low_hw = (hw[0] // 2, hw[1] // 2)
        self.up1 = Residual(config, hw, c, c)
        self.low1 = Residual(config, low_hw, c, c)
        self.low2 = Hourglass(config, low_hw, depth - 1) if depth > 1 else Residual(config, low_hw, c, c)
        self.low3 = Residual(config, low_hw, c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        low = self.low3(self.low2(self.low1(F.max_pool2d(x, 2))))  # (N, C, H/2, W/2)
        return self.up1(x) + F.interpolate(low, scale_factor=2, mode="nearest")


class Stem(nn.Module):
    """7x7/2 conv-BN-ReLU, res1, 2x2 pool, res2, res3: (N, 3, H, W) -> (N, C, H/4, W/4)."""

    def __init__(self, config: HourglassConfig) -> None:
        super().__init__()
        c_stem, c_half = config.stem_channels
        hw = config.input_hw
        self.conv = _conv(config, hw, 3, c_stem, 7, stride=2)
        self.bn = _bn(c_stem)
        hw = (hw[0] // 2, hw[1] // 2)
        self.res1 = Residual(config, hw, c_stem, c_half)
        self.pool = nn.AvgPool2d(2) if config.stem_pool == "avg" else nn.MaxPool2d(2)
        hw = (hw[0] // 2, hw[1] // 2)
        self.res2 = Residual(config, hw, c_half, c_half)
        self.res3 = Residual(config, hw, c_half, config.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, H/4, W/4)."""
        x = F.relu(self.bn(self.conv(x)), inplace=True)  # (N, C/4, H/2, W/2)
        x = self.pool(self.res1(x))  # (N, C/2, H/4, W/4)
        return self.res3(self.res2(x))


class Head(nn.Module):
    """Per-stack head: residual, 1x1 conv-BN-ReLU ("previous") and the linear 1x1 heatmap conv."""

    def __init__(self, config: HourglassConfig) -> None:
        super().__init__()
        c, hw = config.channels, config.heatmap_hw
        self.res = Residual(config, hw, c, c)
        self.lin_conv = _conv(config, hw, c, c, 1)
        self.lin_bn = _bn(c)
        self.heatmap_conv = _conv(config, hw, c, config.num_keypoints, 1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, h, w) -> (previous (N, C, h, w), heatmaps (N, K, h, w))."""
        previous = F.relu(self.lin_bn(self.lin_conv(self.res(x))), inplace=True)
        return previous, self.heatmap_conv(previous)


class Merge(nn.Module):
    """Feeds a stack's features and heatmaps back into the next stack's input."""

    def __init__(self, config: HourglassConfig) -> None:
        super().__init__()
        c, k, hw = config.channels, config.num_keypoints, config.heatmap_hw
        self.feature_conv = _conv(config, hw, c, c, 1, bias=True)
        self.heatmap_conv = _conv(config, hw, k, c, 1, bias=True)

    def forward(self, x: torch.Tensor, previous: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        """next_x = x + feature_conv(previous) + heatmap_conv(heatmaps), all (N, C, h, w)."""
        return x + self.feature_conv(previous) + self.heatmap_conv(heatmaps)


class StackedHourglass(nn.Module):
    """Stem, then num_stacks hourglass + head pairs joined by merges; every stack emits heatmaps."""

    def __init__(self, config: HourglassConfig) -> None:
        super().__init__()
        self.num_stacks = config.num_stacks
        self.stem = Stem(config)
        for i in range(config.num_stacks):
            self.add_module(f"hourglass_{i}", Hourglass(config, config.heatmap_hw, config.depth))
            self.add_module(f"head_{i}", Head(config))
            if i < config.num_stacks - 1:
                self.add_module(f"merge_{i}", Merge(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> heatmaps of every stack, (S, N, K, H/4, W/4)."""
        x = _in_scope("stem", self.stem, x)  # (N, C, H/4, W/4)
        outputs = []
        for i in range(self.num_stacks):
            y = _in_scope(f"hourglass_{i}", getattr(self, f"hourglass_{i}"), x)
            previous, heatmaps = _in_scope(f"head_{i}", getattr(self, f"head_{i}"), y)
            outputs.append(heatmaps)
            if i < self.num_stacks - 1:
                x = _in_scope(f"merge_{i}", getattr(self, f"merge_{i}"), x, previous, heatmaps)
        return torch.stack(outputs)


def conv_bn_pairs(net: StackedHourglass) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where the BN normalises the conv's output directly, so that an
    eval-mode BN can be folded into the conv: every conv-BN of a postact block, conv1-bn2 and conv2-bn3 of a
    preact block (its bn1 follows the block's input), the stem's conv and each head's lin_conv."""
    pairs = []
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Residual):
            if module.preact:
                pairs += [(f"{prefix}conv1", f"{prefix}bn2"), (f"{prefix}conv2", f"{prefix}bn3")]
            else:
                pairs += [(f"{prefix}conv{i}", f"{prefix}bn{i}") for i in (1, 2, 3)]
                if module.skip_conv is not None:
                    pairs.append((f"{prefix}skip_conv", f"{prefix}skip_bn"))
        elif isinstance(module, Stem):
            pairs.append((f"{prefix}conv", f"{prefix}bn"))
        elif isinstance(module, Head):
            pairs.append((f"{prefix}lin_conv", f"{prefix}lin_bn"))
    return pairs


def fold_batch_norms(net: StackedHourglass, memory_format: torch.memory_format) -> StackedHourglass:
    """An eval-mode copy of `net` with every BN of conv_bn_pairs folded into its conv (and replaced by an
    identity); `net` is untouched. The folding runs in float64 (weights of any dtype are rounded once, on the
    way back), so a bf16 or fp32 model gets the nearest representable folded weights."""
    dtype = next(net.parameters()).dtype
    folded = copy.deepcopy(net).eval()
    with torch.no_grad():
        for conv_name, bn_name in conv_bn_pairs(folded):
            conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
            bias = conv.bias.double() if conv.bias is not None else None
            weight, bias = fuse_conv_bn_weights(conv.weight.double(), bias, bn.running_mean.double(),
                                                bn.running_var.double(), bn.eps, bn.weight.double(), bn.bias.double())  # fmt: skip
            conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
            parent_name, _, attr = bn_name.rpartition(".")
            setattr(folded.get_submodule(parent_name), attr, nn.Identity())
    return folded.to(memory_format=memory_format)


def heatmap_loss(heatmaps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over stacks of mean((heatmaps_s - target)^2); heatmaps (S, N, K, h, w), target (N, K, h, w)."""
    return (heatmaps - target).square().mean(dim=(1, 2, 3, 4)).sum()


def _canonical_tensors(net: StackedHourglass, config: HourglassConfig) -> dict[str, torch.Tensor]:
    """Canonical name -> the live torch parameter or BN buffer, checking each layer against impls.spec."""
    out: dict[str, torch.Tensor] = {}
    for layer in spec.layers(config):
        m = net.get_submodule(layer.name)
        if isinstance(layer, spec.ConvSpec):
            shape = (layer.c_out, layer.c_in, layer.kernel_size, layer.kernel_size)
            if m.pad != layer.pad or tuple(m.weight.shape) != shape or (m.bias is not None) != layer.bias:
                raise AssertionError(f"{layer.name}: module disagrees with impls.spec ({m} vs {layer})")
            out[f"{layer.name}.kernel"] = m.weight
            if layer.bias:
                out[f"{layer.name}.bias"] = m.bias
        else:
            out[f"{layer.name}.scale"] = m.weight
            out[f"{layer.name}.bias"] = m.bias
            out[f"{layer.name}.mean"] = m.running_mean
            out[f"{layer.name}.var"] = m.running_var
    return out


def _to_canonical(name: str, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """A torch tensor as a fresh `dtype` numpy array in canonical layout (kernels (kh, kw, c_in, c_out))."""
    if name.endswith(".kernel"):
        t = t.permute(2, 3, 1, 0)  # (c_out, c_in, kh, kw) -> (kh, kw, c_in, c_out)
    return t.detach().to("cpu", dtype, copy=True, memory_format=torch.contiguous_format).numpy()


class TorchHourglass(AbstractHourglassModel):
    """A StackedHourglass on one device and precision, run eagerly or through torch.compile."""

    framework = FRAMEWORK

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], *, device: str, precision: str,
                 execution: str, channels_last: bool = True, impl: str = IMPLS[0]) -> None:
        super().__init__(config, device=device, precision=precision, execution=execution, impl=impl)
        self.channels_last = channels_last
        self.torch_device = _torch_device(device)
        self._dtype = _DTYPES[precision]
        self._io_dtype = torch.float64 if precision == "fp64" else torch.float32  # numpy at the interface: base.io_dtype
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format

        self.net = StackedHourglass(config).to(self._io_dtype)  # a no-op for fp32 and bf16
        # Load in the interface dtype on the CPU, then convert: export of fp32 weights is bitwise exact, and
        # fp64 weights are not rounded through float32 on the way in.
        with torch.no_grad():
            for name, t in _canonical_tensors(self.net, config).items():
                value = torch.from_numpy(np.asarray(weights[name], dtype=base.io_dtype(precision)))
                t.copy_(value.permute(3, 2, 0, 1) if name.endswith(".kernel") else value)
        self.net.to(self.torch_device, self._dtype, memory_format=self._memory_format)
        self._tensors = _canonical_tensors(self.net, config)  # after .to(): BN buffers are new tensors
        self._trainable = spec.trainable_names(config)
        # Built once and reused: torch.compile caches one graph per (train/eval, grad mode, shape) guard set.
        self._fn: Callable[[torch.Tensor], torch.Tensor] = torch.compile(self.net) if execution == "compile" else self.net

    def num_params(self) -> int:
        """Trainable parameters counted from the module's own nn.Parameters."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    def _input(self, a: np.ndarray) -> torch.Tensor:
        """NHWC numpy -> NCHW tensor on the model's device, dtype and memory format."""
        if a.ndim != 4:
            raise ValueError(f"expected an NHWC array (N, H, W, C), got shape {a.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=base.io_dtype(self.precision))).permute(0, 3, 1, 2)  # (N, C, H, W) view
        return t.to(self.torch_device, self._dtype, memory_format=self._memory_format)

    def sync(self) -> None:
        """Block until the device has finished all queued work (nothing to wait for on the CPU)."""
        _sync(self.torch_device)

    def set_mode(self, train: bool) -> None:
        """Train-mode BN (batch statistics) when `train`, else eval mode (running statistics)."""
        if self.net.training != train:  # O(1) check; .train() walks every module
            self.net.train(train)

    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        """Heatmaps (S, N, H/4, W/4, K) float32 (fp64: float64); train_mode uses batch statistics and updates running ones."""
        if train_mode:
            check_train_batch(self.config, len(x))
        self.set_mode(train_mode)
        with torch.no_grad() if train_mode else torch.inference_mode():
            fn = self._fn if train_mode else self._eval_fn()
            heatmaps = fn(self._input(x))  # (S, N, K, h, w)
        return _to_canonical("heatmaps", heatmaps.permute(0, 1, 3, 4, 2), self._io_dtype)  # (S, N, h, w, K)

    def eval_module(self) -> StackedHourglass:
        """The module an eval-mode forward runs: the network itself, or for the tuned variant a copy with the
        batch norms folded into the convs, from the weights and running statistics as they are now."""
        return fold_batch_norms(self.net, self._memory_format) if self.impl == "tuned" else self.net

    def _eval_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The eval-mode forward as the execution runs it (eval_module, compiled under "compile")."""
        if self.impl != "tuned":
            return self._fn
        folded = self.eval_module()
        return torch.compile(folded) if self.execution == "compile" else folded

    def _train_step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Train-mode forward, loss and backward; gradients land in each parameter's .grad."""
        self.set_mode(True)
        self.net.zero_grad(set_to_none=True)
        loss = _in_scope("loss", heatmap_loss, self._fn(x), target)
        loss.backward()
        return loss

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Train-mode loss and every trainable parameter's gradient in canonical layout."""
        check_train_batch(self.config, len(x))
        loss = self._train_step(self._input(x), self._input(target))
        grads = {name: _to_canonical(name, self._tensors[name].grad, self._io_dtype) for name in self._trainable}
        return loss.item(), grads

    def export_weights(self) -> dict[str, np.ndarray]:
        """Every parameter and BN statistic as float32 (fp64: float64) numpy under canonical names and layouts."""
        return {name: _to_canonical(name, t, self._io_dtype) for name, t in self._tensors.items()}

    def step_inputs(self, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """impls.spec.random_batch on the device: x (N, 3, H, W) and target (N, K, H/4, W/4)."""
        x, target = spec.random_batch(self.config, batch_size, seed)
        return self._input(x), self._input(target)

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """A zero-argument step on device-resident random inputs; it returns after a device sync."""
        check_step_args(phase, batch_size)
        if phase == "forward_backward":
            check_train_batch(self.config, batch_size)
        x, target = self.step_inputs(batch_size, seed)
        fn, sync = self._fn, self.sync

        if phase == "forward":
            fn = self._eval_fn()  # the weights stay fixed while a forward step is timed

            def step() -> None:
                self.set_mode(False)
                with torch.inference_mode():
                    fn(x)
                sync()
        else:
            def step() -> None:
                self._train_step(x, target)  # gradients stay alive in .grad until the next step
                sync()
        return step

    def reset_peak_memory(self) -> bool:
        """Reset the CUDA allocator's peak counter (nothing to reset on the CPU: False)."""
        if self.torch_device.type != "cuda":
            return False
        torch.cuda.reset_peak_memory_stats(self.torch_device)
        return True

    def peak_memory_bytes(self) -> int | None:
        """CUDA allocator peak since the last reset; None on the CPU."""
        return int(torch.cuda.max_memory_allocated(self.torch_device)) if self.torch_device.type == "cuda" else None

    def settings(self) -> dict[str, object]:
        """Layout, compile mode, precision, TF32 and thread settings of this model."""
        return {
            **super().settings(),
            "layout": "channels_last" if self.channels_last else "contiguous",
            "compile": {"backend": "inductor", "mode": "default"} if self.execution == "compile" else None,
            "dtype": str(self._dtype),
            "torch_device": str(self.torch_device),
            **_speed_settings(),
        }


def _torch_device(device: str) -> torch.device:
    """The torch device for an hgbench device name: "gpu" is CUDA device 0."""
    return torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")


def _sync(device: torch.device) -> None:
    """Wait for `device`'s queued kernels; CPU ops are already complete when they return."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_available() -> bool:
    """True when torch sees a CUDA device."""
    return torch.cuda.is_available()


def configure_math(fp32_math: str = "ieee", autotune: bool = True) -> dict[str, object]:
    """Pin this process's GPU math: fp32 matmuls and convolutions in full fp32 ("ieee") or TF32 ("tf32"), and
    cuDNN's autotuning (benchmark mode) on or off; returns the settings now in force."""
    base.check_math_args(fp32_math)
    tf32 = fp32_math == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32  # on by default in torch: convolutions would use TF32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.benchmark = autotune
    return {"fp32_math": fp32_math, "cuda_matmul_allow_tf32": tf32, "cudnn_allow_tf32": tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "cudnn_benchmark": autotune}  # fmt: skip


def _gpu_uuid() -> str | None:
    """CUDA device 0's UUID as NVML writes it ("GPU-..."), or None without a GPU or where torch hides it."""
    if not gpu_available():
        return None
    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    return None if uuid is None else f"GPU-{uuid}"


def runtime_info() -> dict[str, object]:
    """Torch version, devices, threads and the backend settings that change speed."""
    gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] if gpu_available() else []
    return {
        "framework": FRAMEWORK,
        "version": torch.__version__,
        "devices": ["cpu", *gpus],
        "gpu_available": gpu_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "cuda_version": torch.version.cuda,
        "gpu_uuid": _gpu_uuid(),  # NVML's name for device 0, so memory readings match it, not CUDA's ordering
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **_speed_settings(),
    }


def _speed_settings() -> dict[str, object]:
    """The process-wide torch settings that change speed: TF32, cuDNN autotuning, matmul precision, threads."""
    return {
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
    }


def build(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, device: str = "cpu",
          precision: str = "fp32", execution: str = EXECUTIONS[0], channels_last: bool | None = None,
          impl: str = IMPLS[0], **options: object) -> TorchHourglass:
    """A TorchHourglass; weights default to impls.spec.init_weights(config, seed=0).

    channels_last (None -> True): model and inputs in torch.channels_last, 1.6-1.8x faster on oneDNN CPUs.
    """
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available, options, ("channels_last",),
                     impl=impl, impls=IMPLS)  # fmt: skip
    weights = resolve_weights(config, weights)
    return TorchHourglass(config, weights, device=device, precision=precision, execution=execution,
                          channels_last=True if channels_last is None else channels_last, impl=impl)  # fmt: skip


def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                   precision: str = "fp32", seed: int = 0, channels_last: bool = True) -> Callable[[], None]:
    """One stride-1 SAME conv without bias, on device-resident random data: the conv-ceiling probe.

    Same layout, precision and backend settings as build(); each call ends synchronised like benchmark_step.
    """
    check_device_args(FRAMEWORK, precision, device, gpu_available)
    dev, dtype = _torch_device(device), _DTYPES[precision]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x, kernel = spec.conv_probe_arrays(input_shape, c_out, kernel_size, seed)
    x_dev = torch.from_numpy(x).permute(0, 3, 1, 2).to(dev, dtype, memory_format=memory_format)  # (N, C, H, W)
    conv = nn.Conv2d(x.shape[3], c_out, kernel_size, padding=kernel_size // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))  # (k, k, c_in, c_out) -> (c_out, c_in, k, k)
    conv = conv.to(dev, dtype, memory_format=memory_format).eval()

    def step() -> None:
        with torch.inference_mode():
            conv(x_dev)  # (N, c_out, H, W)
        _sync(dev)

    return step


def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> Callable[[], None]:
    """(m, k) @ (k, n) on device-resident random matrices: the matmul-ceiling probe; each call ends synchronised."""
    check_device_args(FRAMEWORK, precision, device, gpu_available)
    dev, dtype = _torch_device(device), _DTYPES[precision]
    a, b = (torch.from_numpy(operand).to(dev, dtype) for operand in spec.gemm_probe_arrays(m, k, n, seed))

    def step() -> None:
        with torch.inference_mode():
            torch.matmul(a, b)  # (m, n)
        _sync(dev)

    return step


# profile(config, *, phase, batch_size, execution, trace_dir, ...) -> impls.profiling.ProfileResult; it runs
# impls/profilers/torch_profiling.py, imported on the first call.
profile = profiling.framework_profile(FRAMEWORK, gpu_available)
