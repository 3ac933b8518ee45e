"""The Stacked Hourglass network in PyTorch: an nn.Module tree named as in impls.spec, behind the hgbench contract.

Inside, activations are NCHW tensors (stored channels_last by default, which is oneDNN's and cuDNN's fast
layout); at the numpy boundary they are NHWC as everywhere in hgbench. Kernels are (c_out, c_in, kh, kw)
here and (kh, kw, c_in, c_out) canonically.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from impls import base, profiling, registry, spec
from impls.base import PHASES, AbstractHourglassModel, check_build_args, resolve_weights
from impls.config import HourglassConfig

FRAMEWORK = "torch"
EXECUTIONS: tuple[str, ...] = registry.EXECUTIONS[FRAMEWORK]
PRECISIONS: tuple[str, ...] = base.PRECISIONS

# PyTorch weights the *new* batch statistic by `momentum`: 0.1 here is spec.BN_DECAY = 0.9 in Keras/Flax.
# Seam: torch updates running_var with the UNBIASED batch variance (times n/(n-1)), Keras and Flax with the
# biased one; normalisation itself uses the biased variance everywhere. Left as PyTorch does it.
BN_MOMENTUM = 0.1
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Set only while profile() runs: record_function costs a little even with no profiler listening, and under
# torch.compile dynamo guards on this global, so flipping it would recompile the model.
_stage_scopes_enabled = False


def _in_scope(name: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """fn(*args), inside a profiler range called `name` while profile() enables the stage scopes."""
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

    def __init__(self, config: HourglassConfig, c_in: int, c_out: int, hw: tuple[int, int]) -> None:
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

    def __init__(self, config: HourglassConfig, depth: int, hw: tuple[int, int]) -> None:
        super().__init__()
        c = config.channels
        low_hw = (hw[0] // 2, hw[1] // 2)
        self.up1 = Residual(config, c, c, hw)
        self.low1 = Residual(config, c, c, low_hw)
        self.low2 = Hourglass(config, depth - 1, low_hw) if depth > 1 else Residual(config, c, c, low_hw)
        self.low3 = Residual(config, c, c, low_hw)

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
        self.res1 = Residual(config, c_stem, c_half, hw)
        self.pool = nn.AvgPool2d(2) if config.stem_pool == "avg" else nn.MaxPool2d(2)
        hw = (hw[0] // 2, hw[1] // 2)
        self.res2 = Residual(config, c_half, c_half, hw)
        self.res3 = Residual(config, c_half, config.channels, hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, H/4, W/4)."""
        x = F.relu(self.bn(self.conv(x)), inplace=True)  # (N, C/4, H/2, W/2)
        x = self.pool(self.res1(x))  # (N, C/2, H/4, W/4)
        return self.res3(self.res2(x))


class Head(nn.Module):
    """Per-stack head: residual, 1x1 conv-BN-ReLU ("previous") and the linear 1x1 heatmap conv."""

    def __init__(self, config: HourglassConfig, hw: tuple[int, int]) -> None:
        super().__init__()
        c = config.channels
        self.res = Residual(config, c, c, hw)
        self.lin_conv = _conv(config, hw, c, c, 1)
        self.lin_bn = _bn(c)
        self.heatmap_conv = _conv(config, hw, c, config.num_keypoints, 1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, h, w) -> (previous (N, C, h, w), heatmaps (N, K, h, w))."""
        previous = F.relu(self.lin_bn(self.lin_conv(self.res(x))), inplace=True)
        return previous, self.heatmap_conv(previous)


class Merge(nn.Module):
    """Feeds a stack's features and heatmaps back into the next stack's input."""

    def __init__(self, config: HourglassConfig, hw: tuple[int, int]) -> None:
        super().__init__()
        c, k = config.channels, config.num_keypoints
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
        hw = config.heatmap_hw
        self.stem = Stem(config)
        for i in range(config.num_stacks):
            self.add_module(f"hourglass_{i}", Hourglass(config, config.depth, hw))
            self.add_module(f"head_{i}", Head(config, hw))
            if i < config.num_stacks - 1:
                self.add_module(f"merge_{i}", Merge(config, hw))

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


def _to_canonical(name: str, t: torch.Tensor) -> np.ndarray:
    """A torch tensor as a fresh float32 numpy array in canonical layout (kernels (kh, kw, c_in, c_out))."""
    if name.endswith(".kernel"):
        t = t.permute(2, 3, 1, 0)  # (c_out, c_in, kh, kw) -> (kh, kw, c_in, c_out)
    return t.detach().to("cpu", torch.float32, copy=True, memory_format=torch.contiguous_format).numpy()


class TorchHourglassModel(AbstractHourglassModel):
    """A StackedHourglass on one device and precision, run eagerly or through torch.compile."""

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], device: str, precision: str,
                 execution: str, channels_last: bool) -> None:
        self.config, self.framework = config, FRAMEWORK
        self.device, self.precision, self.execution = device, precision, execution
        self.channels_last = channels_last
        self._device = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
        self._dtype = _DTYPES[precision]
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format

        self.net = StackedHourglass(config)
        with torch.no_grad():  # load in fp32 on the CPU, then convert: export of fp32 weights is bitwise exact
            for name, t in _canonical_tensors(self.net, config).items():
                value = torch.from_numpy(np.asarray(weights[name], dtype=np.float32))
                t.copy_(value.permute(3, 2, 0, 1) if name.endswith(".kernel") else value)
        self.net.to(self._device, self._dtype, memory_format=self._memory_format)
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
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(0, 3, 1, 2)  # (N, C, H, W) view
        return t.to(self._device, self._dtype, memory_format=self._memory_format)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _set_mode(self, train: bool) -> None:
        if self.net.training != train:  # O(1) check; .train() walks every module
            self.net.train(train)

    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        """Heatmaps (S, N, H/4, W/4, K) float32; train_mode uses batch statistics and updates running ones."""
        self._set_mode(train_mode)
        with torch.no_grad() if train_mode else torch.inference_mode():
            heatmaps = self._fn(self._input(x))  # (S, N, K, h, w)
        return _to_canonical("heatmaps", heatmaps.permute(0, 1, 3, 4, 2))  # (S, N, h, w, K)

    def _train_step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Train-mode forward, loss and backward; gradients land in each parameter's .grad."""
        self._set_mode(True)
        self.net.zero_grad(set_to_none=True)
        loss = _in_scope("loss", heatmap_loss, self._fn(x), target)
        loss.backward()
        return loss

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Train-mode loss and every trainable parameter's gradient in canonical layout."""
        loss = self._train_step(self._input(x), self._input(target))
        grads = {name: _to_canonical(name, self._tensors[name].grad) for name in self._trainable}
        return loss.item(), grads

    def export_weights(self) -> dict[str, np.ndarray]:
        """Every parameter and BN statistic as float32 numpy under canonical names and layouts."""
        return {name: _to_canonical(name, t) for name, t in self._tensors.items()}

    def _step_inputs(self, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (x (N, 3, H, W), target (N, K, H/4, W/4)) on the device, drawn from `seed`."""
        rng = np.random.default_rng(seed)
        (h, w), (hh, hw) = self.config.input_hw, self.config.heatmap_hw
        x = self._input(rng.standard_normal((batch_size, h, w, 3), dtype=np.float32))
        target = self._input(rng.standard_normal((batch_size, hh, hw, self.config.num_keypoints), dtype=np.float32))
        return x, target

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """A zero-argument step on device-resident random inputs; it returns after a device sync."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        x, target = self._step_inputs(batch_size, seed)
        fn, sync = self._fn, self._sync

        if phase == "forward":
            def step() -> None:
                self._set_mode(False)
                with torch.inference_mode():
                    fn(x)
                sync()
        else:
            def step() -> None:
                self._train_step(x, target)  # gradients stay alive in .grad until the next step
                sync()
        return step

    def reset_peak_memory(self) -> None:
        """Reset the CUDA allocator's peak counter (nothing to reset on the CPU)."""
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def peak_memory_bytes(self) -> int | None:
        """CUDA allocator peak since the last reset; None on the CPU."""
        return int(torch.cuda.max_memory_allocated(self._device)) if self._device.type == "cuda" else None

    def settings(self) -> dict[str, object]:
        """Layout, compile mode, precision, TF32 and thread settings of this model."""
        return {
            **super().settings(),
            "layout": "channels_last" if self.channels_last else "contiguous",
            "compile": {"backend": "inductor", "mode": "default"} if self.execution == "compile" else None,
            "dtype": str(self._dtype),
            "torch_device": str(self._device),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "intra_op_threads": torch.get_num_threads(),
            "inter_op_threads": torch.get_num_interop_threads(),
        }


def gpu_available() -> bool:
    """True when torch sees a CUDA device."""
    return torch.cuda.is_available()


def runtime_info() -> dict:
    """Torch version, devices, threads and the backend settings that change speed."""
    gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] if gpu_available() else []
    return {
        "framework": FRAMEWORK,
        "version": torch.__version__,
        "devices": ["cpu", *gpus],
        "gpu_available": gpu_available(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def build(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, device: str = "cpu",
          precision: str = "fp32", execution: str = EXECUTIONS[0], channels_last: bool | None = None,
          **options: object) -> TorchHourglassModel:
    """A TorchHourglassModel; weights default to impls.spec.init_weights(config, seed=0).

    channels_last (None -> True): model and inputs in torch.channels_last, 1.6-1.8x faster on oneDNN CPUs.
    """
    if options:
        raise ValueError(f"unknown torch build options {sorted(options)}; the only option is channels_last")
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available)
    weights = resolve_weights(config, weights)
    return TorchHourglassModel(config, weights, device, precision, execution, True if channels_last is None else channels_last)


def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                   precision: str = "fp32", seed: int = 0, channels_last: bool = True) -> Callable[[], None]:
    """One stride-1 SAME conv without bias, on device-resident random data: the conv-ceiling probe.

    Same layout, precision and backend settings as build(); each call ends synchronised like benchmark_step.
    """
    if device == "gpu" and not gpu_available():
        raise RuntimeError("no GPU visible to torch; use --device cpu")
    dev = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    rng = np.random.default_rng(seed)
    n, h, w, c_in = input_shape
    x = torch.from_numpy(rng.standard_normal((n, h, w, c_in), dtype=np.float32)).permute(0, 3, 1, 2)  # (N, C, H, W)
    x = x.to(dev, _DTYPES[precision], memory_format=memory_format)
    conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
    conv = conv.to(dev, _DTYPES[precision], memory_format=memory_format).eval()

    def step() -> None:
        with torch.inference_mode():
            conv(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return step


def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> Callable[[], None]:
    """(m, k) @ (k, n) on device-resident random matrices: the matmul-ceiling probe; each call ends synchronised."""
    check_build_args(FRAMEWORK, EXECUTIONS, EXECUTIONS[0], precision, device, gpu_available)
    dev = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
    rng = np.random.default_rng(seed)
    a = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(dev, _DTYPES[precision])
    b = torch.from_numpy(rng.standard_normal((k, n), dtype=np.float32)).to(dev, _DTYPES[precision])

    def step() -> None:
        with torch.inference_mode():
            torch.matmul(a, b)  # (m, n)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return step


# ---------------------------------------------------------------------------------------------------------
# Profiling (issue 6): the contract is in impls/profiling.py.

_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
_StagePlan = list[tuple[str, tuple[str, ...], tuple[str, ...]]]


def _time_ms(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter_ns()
    fn()  # ends synchronised (benchmark_step's promise)
    return (time.perf_counter_ns() - t0) / 1e6


def _lower_median_index(values: list[float]) -> int:
    """Index of the lower median, as impls.profiling.time_staged picks its step."""
    return sorted(range(len(values)), key=values.__getitem__)[(len(values) - 1) // 2]


def _compile_counts() -> tuple[int, float, list[Any]]:
    """(dynamo graphs so far, dynamo compile seconds so far, inductor-generated modules loaded) in this process."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    from torch._inductor.codecache import PyCodeCache

    # Dynamo's whole compile of a frame, plus AOTAutograd's lazy backward compile (first backward call).
    timers = ("_compile.compile_inner", "backward._backward_impl")
    compile_s = sum(sum(compilation_time_metrics.get(timer, [])) for timer in timers)
    return counters["stats"]["unique_graphs"], compile_s, list(getattr(PyCodeCache, "modules", []))


def _profile_steps(model: TorchHourglassModel, step: Callable[[], None], steps: int, trace_path: Path) -> tuple[list[float], Any]:
    """Run `steps` steps under torch.profiler; (their wall times in ms, the profiler's FunctionEvents)."""
    global _stage_scopes_enabled  # noqa: PLW0603 -- the module flag _in_scope reads
    activities = [torch.profiler.ProfilerActivity.CPU]
    if model._device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    wall_ms: list[float] = []
    # Scopes only in eager: in a compiled region they would not bound inductor's fused kernels, and dynamo
    # guards on the flag, so turning it on would recompile the model.
    _stage_scopes_enabled = model.execution == "eager"
    try:
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            wall_ms = [_time_ms(step) for _ in range(steps)]
    finally:
        _stage_scopes_enabled = False
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    return wall_ms, prof.events()


def _event_ms(event: Any, cuda: bool) -> tuple[float, float]:
    """(total, self) ms of a CPU-side event: its CUDA kernels' time on gpu, its CPU time otherwise."""
    if cuda:
        total_us, self_us = event.device_time_total, event.self_device_time_total
    else:
        total_us, self_us = event.cpu_time_total, event.self_cpu_time_total
    # Clock rounding can make a child outlast its parent by a microsecond, giving a parent negative self time.
    return total_us / 1e3, min(max(self_us, 0.0), total_us) / 1e3


def _descendants(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _profiler_stages(events: Any, names: list[str], step_index: int, cuda: bool) -> dict[str, float]:
    """Stage ms in profiled step `step_index`: each stage's scope range plus, for forward_backward, the
    backward nodes created by the forward ops inside it (a node's evaluate_function event carries the
    sequence number of the forward op that recorded it)."""
    from torch.autograd import DeviceType

    stage_ms = dict.fromkeys(names, 0.0)
    stage_of_seq: dict[int, str] = {}
    ranges = sorted((e for e in events if e.name in stage_ms and e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)
    seen: Counter[str] = Counter()
    for scope in ranges:  # each scope opens once per step, so a name's k-th range belongs to step k
        seen[scope.name] += 1
        if seen[scope.name] - 1 == step_index:
            stage_ms[scope.name] += _event_ms(scope, cuda)[0]
            stage_of_seq.update((op.sequence_nr, scope.name) for op in _descendants(scope) if op.sequence_nr >= 0)
    for event in events:
        if event.name.startswith(_BACKWARD_PREFIX) and event.sequence_nr in stage_of_seq:
            stage_ms[stage_of_seq[event.sequence_nr]] += _event_ms(event, cuda)[0]
    return {name: ms for name, ms in stage_ms.items() if ms > 0}


def _op_events(events: Any, skip: set[str], cuda: bool) -> Iterator[dict[str, Any]]:
    """One {"op", "total_ms", "self_ms"} per CPU-side aten/runtime op call, stage scopes left out."""
    from torch.autograd import DeviceType

    for event in events:
        if event.device_type == DeviceType.CPU and event.name not in skip:
            total_ms, self_ms = _event_ms(event, cuda)
            yield {"op": event.name, "total_ms": total_ms, "self_ms": self_ms}


def _stage_plan(config: HourglassConfig) -> _StagePlan:
    """(stage, activations it reads, activations it writes) in StackedHourglass.forward's order."""
    plan: _StagePlan = [("stem", ("input",), ("x_0",))]
    for i in range(config.num_stacks):
        plan.append((f"hourglass_{i}", (f"x_{i}",), (f"y_{i}",)))
        plan.append((f"head_{i}", (f"y_{i}",), (f"previous_{i}", f"heatmaps_{i}")))
        if i < config.num_stacks - 1:
            plan.append((f"merge_{i}", (f"x_{i}", f"previous_{i}", f"heatmaps_{i}"), (f"x_{i + 1}",)))
    return plan


def _staged_calls(model: TorchHourglassModel, phase: str, target: torch.Tensor) -> list[tuple[str, Callable[[Any], Any]]]:
    """The step as one torch.compile'd call per stage (then, for forward_backward, the loss and each stage's
    backward in reverse), for impls.profiling.time_staged; the state is a dict of named activations."""
    train = phase == "forward_backward"
    plan = _stage_plan(model.config)
    compiled = {name: torch.compile(getattr(model.net, name)) for name, _, _ in plan}

    def forward(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Callable[[Any], Any]:
        def call(state: Any) -> dict[str, torch.Tensor]:
            state = state if isinstance(state, dict) else {"input": state}  # the first stage starts a step
            with torch.enable_grad() if train else torch.inference_mode():
                result = compiled[name](*(state[key] for key in inputs))
            for key, out in zip(outputs, result if isinstance(result, tuple) else (result,), strict=True):
                # Detached leaves end this stage's autograd graph, so its backward can run as its own call;
                # a leaf read by two stages (x_i, heatmaps_i) sums both gradients in .grad.
                state["graph:" + key] = out
                state[key] = out.detach().requires_grad_() if train else out
            return state
        return call

    def loss(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model.net.zero_grad(set_to_none=True)  # as _train_step does, before this step's backward writes .grad
        heatmaps = torch.stack([state[f"heatmaps_{i}"] for i in range(model.config.num_stacks)])  # (S, N, K, h, w)
        heatmap_loss(heatmaps, target).backward()
        return state

    def backward(outputs: tuple[str, ...]) -> Callable[[Any], Any]:
        def call(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            used = [key for key in outputs if state[key].grad is not None]  # the last head's `previous` is unused
            torch.autograd.backward([state["graph:" + key] for key in used], [state[key].grad for key in used])
            return state
        return call

    calls = [(name, forward(name, inputs, outputs)) for name, inputs, outputs in plan]
    if train:
        calls.append(("loss", loss))
        calls += [(name, backward(outputs)) for name, _, outputs in reversed(plan)]
    return calls


def _count_flops(model: TorchHourglassModel, phase: str, x: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """FlopCounterMode over one eager step of the model's module (the step's aten ops, before any fusion)."""
    from torch.utils.flop_counter import FlopCounterMode

    model._set_mode(phase == "forward_backward")
    with FlopCounterMode(display=False) as counter:
        if phase == "forward":
            with torch.inference_mode():
                model.net(x)
        else:
            model.net.zero_grad(set_to_none=True)
            heatmap_loss(model.net(x), target).backward()
    per_op = {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}
    conv = {op: flops for op, flops in per_op.items() if "conv" in op}
    other = sorted(op for op in per_op if op not in conv)
    return {
        "source": "torch.utils.flop_counter.FlopCounterMode",
        "conv_flops": sum(conv.values()),
        "total_flops": sum(per_op.values()),
        "note": (
            f"one eager {phase} step of the same module under FlopCounterMode (it counts aten ops; inductor's "
            f"fused kernels are not aten ops); conv_flops = {' + '.join(sorted(conv)) or 'none'}, 2 FLOPs per "
            "multiply-add; convolution_backward counts only the gradients it computes (output_mask), so the "
            "first conv's input gradient, which the input does not require, is not counted. total_flops = every "
            f"op FlopCounterMode has a formula for: besides convolutions {', '.join(other) or 'none'}; it has "
            "no formula for BN, ReLU, adds, pooling, upsampling or the loss, which are left out"
        ),
    }


def _compile_info(model: TorchHourglassModel, before: tuple, after_first: tuple, after_loops: tuple, first_call_ms: float) -> dict[str, Any]:
    """The `compile` entry: dynamo's compile time and graphs, and recompilations during the timed loops."""
    if model.execution == "eager":
        return {"first_call_ms": first_call_ms, "trace_compile_ms": None, "recompilations_in_timed_loop": None,
                "program_size": None, "program_size_unit": "",
                "note": "eager: nothing is compiled; the first call pays allocator warm-up and oneDNN/cuDNN setup"}
    graphs = after_first[0] - before[0]
    new_modules = after_first[2][len(before[2]):]
    code_chars = sum(len(Path(module.__file__).read_text()) for module in new_modules) if new_modules else None
    return {
        "first_call_ms": first_call_ms,
        "trace_compile_ms": (after_first[1] - before[1]) * 1e3,
        "recompilations_in_timed_loop": after_loops[0] - after_first[0],
        "program_size": code_chars,
        "program_size_unit": "chars" if code_chars else "",
        "note": (
            f"torch.compile (inductor): the first call captured {graphs} dynamo graph(s) and loaded "
            f"{len(new_modules)} inductor-generated module(s) (forward_backward: a forward and a backward one)"
            + ("; nothing was compiled because this process had already compiled an identically shaped model "
               "(dynamo caches per code object, with parameters as inputs)" if graphs == 0 else "")
            + "; trace_compile_ms = dynamo's _compile.compile_inner time (tracing, AOTAutograd, inductor codegen, "
            "FX-graph-cache lookups) plus the lazy backward compile (backward._backward_impl) in the first call; "
            "recompilations = change of torch._dynamo counters['stats']['unique_graphs'] across the timed and "
            "profiled loops; program_size = characters of the inductor-generated Python modules loaded in the first call"
        ),
    }


def _time_compiled_stages(model: TorchHourglassModel, phase: str, x: torch.Tensor, target: torch.Tensor,
                          warmup: int, steps: int) -> tuple[dict[str, float], float]:
    """impls.profiling.time_staged over one torch.compile'd call per stage; (ms per stage, staged step ms)."""
    model._set_mode(phase == "forward_backward")  # train-mode BN for forward_backward, as benchmark_step
    calls = _staged_calls(model, phase, target)
    # At least one untimed staged step: it compiles every stage.
    return profiling.time_staged(calls, x, lambda _: model._sync(), warmup=max(warmup, 1), steps=steps)


def _staged_note(phase: str) -> str:
    backward = (" (forward stages on detached inputs, the loss, then each stage's backward in reverse, summed with "
                "its forward)" if phase == "forward_backward" else "")
    return (
        "torch.compile fuses within and around stages and record_function ranges inside a compiled region do not "
        "bound inductor's kernels, so each stage module was torch.compile'd on its own and the stages run as one "
        f"call each with a device sync after every call{backward}; stage_step_ms differs from step_ms by what one "
        "whole-model graph saves over per-stage graphs"
    )


def _profiler_note(phase: str, unattributed_ms: float, cuda: bool) -> str:
    train = phase == "forward_backward"
    backward = (", plus the backward nodes its forward ops created, matched through autograd sequence numbers; "
                "'loss' = the loss range and its backward" if train else "")
    return (
        f"torch.profiler: each stage's record_function range ({'CUDA kernel time' if cuda else 'CPU time'}) in the "
        f"median profiled step{backward}; {unattributed_ms:.3f} ms of that step's wall time is in no stage (python, "
        f"stacking the outputs{', zero_grad, AccumulateGrad' if train else ''}, profiler overhead"
        f"{', GPU idle time' if cuda else ''})"
    )


def profile(config: HourglassConfig, *, phase: str, batch_size: int, execution: str, trace_dir: str,
            device: str = "cpu", precision: str = "fp32", warmup: int = 2, steps: int = 5, seed: int = 0,
            top_k: int = 25) -> dict:
    """Time, profile and stage-attribute one phase's step; the dict documented in impls/profiling.py."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (the number of timed and profiled steps), got {steps}")
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available)
    model = build(config, device=device, precision=precision, execution=execution)
    step = model.benchmark_step(phase, batch_size, seed)
    compiled = execution == "compile"

    before = _compile_counts() if compiled else ()
    first_call_ms = _time_ms(step)
    after_first = _compile_counts() if compiled else ()
    for _ in range(warmup):
        step()
    step_ms = statistics.median(_time_ms(step) for _ in range(steps))
    trace_name = "torch_trace.json"
    profiled_ms, events = _profile_steps(model, step, steps, Path(trace_dir) / trace_name)
    after_loops = _compile_counts() if compiled else ()

    median_index = _lower_median_index(profiled_ms)
    op_step_ms = profiled_ms[median_index]
    names = profiling.stage_names(config) + (["loss"] if phase == "forward_backward" else [])
    cuda = model._device.type == "cuda"
    if compiled:
        x, target = model._step_inputs(batch_size, seed)
        stage_ms, stage_step_ms = _time_compiled_stages(model, phase, x, target, warmup, steps)
        stage_method, stage_note = "staged", _staged_note(phase)
    else:
        stage_ms = _profiler_stages(events, names, median_index, cuda)
        stage_method, stage_step_ms = "profiler", op_step_ms
        stage_note = _profiler_note(phase, op_step_ms - sum(stage_ms.values()), cuda)
    return {
        "framework": FRAMEWORK, "execution": execution, "phase": phase, "batch_size": batch_size,
        "precision": precision, "device": device,
        "step_ms": step_ms,
        "stage_method": stage_method,
        "stage_step_ms": stage_step_ms,
        "stage_note": stage_note,
        "stages": [{"stage": name, "ms": stage_ms[name]} for name in names if name in stage_ms],
        "ops": profiling.op_table(_op_events(events, set(names), cuda), steps, top_k),
        "op_step_ms": op_step_ms,
        "trace_files": [trace_name],
        "flops": _count_flops(model, phase, *model._step_inputs(batch_size, seed)),
        "compile": _compile_info(model, before, after_first, after_loops, first_call_ms),
    }
