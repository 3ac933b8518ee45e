"""The contract every framework's model honours. Imports no framework.

Each `impls/<framework>_hourglass.py` module exposes:

    FRAMEWORK: str                      # "torch" | "tensorflow" | "jax"
    EXECUTIONS: tuple[str, ...]         # execution modes, the first is the default
    PRECISIONS: tuple[str, ...]         # ("fp32", "bf16", "fp64")
    IMPLS: tuple[str, ...]              # implementation variants, the first ("idiomatic") is the default
    def build(config, weights=None, *, device="cpu", precision="fp32", execution=<default>, impl="idiomatic",
              **options)
        -> AbstractHourglassModel       # <Framework>Hourglass(config, weights, *, device, precision, execution)
    def runtime_info() -> dict          # version, devices, threads and the settings that change speed
    def gpu_available() -> bool
    def conv_benchmark(input_shape, c_out, *, kernel_size=3, device="cpu", precision="fp32", seed=0)
    def gemm_benchmark(m, k, n, *, device="cpu", precision="fp32", seed=0)   # calibration probes
    def profile(config, *, phase, batch_size, execution, trace_dir, ...) -> impls.profiling.ProfileResult
    def heatmap_loss(heatmaps, target)  # the training loss in the framework's own tensors

Inputs of timed work come from impls.spec (random_batch, conv_probe_arrays, gemm_probe_arrays) and
arguments are checked here (check_build_args, check_device_args, check_step_args, check_profile_args), so
the three frameworks draw the same numbers and reject the same mistakes with the same words.

Precision "bf16" means the whole model runs in bfloat16: parameters, activations and BN are cast to
bfloat16 (pure bf16, not mixed precision), inputs are cast on the way in and outputs come back as float32.
Precision "fp64" runs everything in float64 (JAX with x64 enabled for that model's calls only), and
arrays cross the interface as float64 both ways (`io_dtype`): the equivalence proof compares frameworks to
a relative 1e-9, which a float32 round trip at the boundary would make impossible.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

import numpy as np

from impls import spec
from impls.config import HourglassConfig

PHASES: tuple[str, ...] = ("forward", "forward_backward")
DEVICES: tuple[str, ...] = ("cpu", "gpu")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp64")


def io_dtype(precision: str) -> type[np.floating]:
    """The numpy dtype of arrays crossing the interface at `precision`: float64 for fp64, else float32."""
    return np.float64 if precision == "fp64" else np.float32
# How fp32 convolutions and matmuls run on a GPU: "ieee" is full fp32; "tf32" lets cuBLAS/cuDNN/XLA use
# TensorFloat-32 (10-bit mantissa) on Ampere and later, which all three frameworks allow by default.
FP32_MATH: tuple[str, ...] = ("ieee", "tf32")


def _check_choice(what: str, value: object, choices: tuple[str, ...], context: str = "") -> None:
    """ValueError naming the unknown `value` of `what` and the choices, in one string."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}{context}; choose one of: {', '.join(choices)}")


def _check_count(what: str, value: object, minimum: int, fix: str) -> None:
    """ValueError unless `value` is an int (not a bool) of at least `minimum`; the message ends with `fix`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what} must be {kind}, got {value!r}; {fix}")


def check_device_args(framework: str, precision: str, device: str, gpu_available: Callable[[], bool]) -> None:
    """Raise ValueError naming a bad precision or device, or RuntimeError when a GPU is asked for and the
    framework sees none: the checks every model and calibration probe make before touching its framework."""
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("device", device, DEVICES)
    if device == "gpu" and not gpu_available():
        raise RuntimeError(f"no GPU visible to {framework}; use --device cpu")


def check_math_args(fp32_math: str) -> None:
    """fp32_math is one of FP32_MATH."""
    _check_choice("fp32_math", fp32_math, FP32_MATH)


def check_build_args(
    framework: str, executions: tuple[str, ...], execution: str, precision: str, device: str,
    gpu_available: Callable[[], bool], options: Mapping[str, object] | None = None, known_options: tuple[str, ...] = (),
    impl: str = "idiomatic", impls: tuple[str, ...] = ("idiomatic",),
) -> None:
    """Raise ValueError naming a bad execution, implementation variant, precision, device or unknown build
    option, or RuntimeError when a GPU is asked for and the framework sees none: the checks every `build`
    makes before touching its framework. `options` are the keyword arguments build() did not recognise;
    `known_options` the ones it takes; `impls` the framework's variants."""
    if options:
        takes = f"it takes only {', '.join(known_options)}" if known_options else "it takes none"
        raise ValueError(f"unknown build option(s) {', '.join(sorted(options))} for {framework}; {takes}; remove them")
    _check_choice("execution", execution, executions, f" for {framework}")
    _check_choice("impl", impl, impls, f" for {framework}")
    check_device_args(framework, precision, device, gpu_available)


def check_step_args(phase: str, batch_size: int) -> None:
    """Raise ValueError naming a bad phase or batch size: the checks every `benchmark_step` makes."""
    _check_choice("phase", phase, PHASES)
    _check_count("batch_size", batch_size, 1, "pass the number of images per step")


def smallest_train_batch(config: HourglassConfig) -> int:
    """The smallest batch whose train-mode BN sees more than one value per channel everywhere.

    The innermost hourglass level is (H, W) / (4 * 2^depth); at 1x1, a batch of 1 gives every BN there a
    single value, whose batch variance is 0 and whose x - mean is exactly 0. PyTorch refuses that ("Expected
    more than 1 value per channel when training"); TensorFlow and JAX would return the BN's bias. All three
    refuse it alike (check_train_batch), so the frameworks never differ in what they accept.
    """
    divisor = 4 * 2**config.depth
    return 2 if (config.input_hw[0] // divisor) * (config.input_hw[1] // divisor) == 1 else 1


def check_train_batch(config: HourglassConfig, batch_size: int) -> None:
    """ValueError when train-mode BN would normalise a single value per channel (see smallest_train_batch)."""
    if batch_size < smallest_train_batch(config):
        h, w = config.input_hw
        divisor = 4 * 2**config.depth
        raise ValueError(
            f"train-mode batch norm needs more than one value per channel, but a batch of {batch_size} at "
            f"{h}x{w} leaves one value at the innermost (1x1) level of a depth-{config.depth} hourglass; "
            f"use a batch of at least 2, or an input of at least {2 * divisor} on one side"
        )


def check_profile_args(
    framework: str, executions: tuple[str, ...], gpu_available: Callable[[], bool], *, phase: str,
    batch_size: int, execution: str, precision: str, device: str, warmup: int, steps: int, top_k: int,
    impl: str = "idiomatic", impls: tuple[str, ...] = ("idiomatic",),
) -> None:
    """Raise ValueError (or RuntimeError for a missing GPU) naming the first bad argument of `profile()`."""
    check_step_args(phase, batch_size)
    _check_count("steps", steps, 1, "profile at least one step (steps are both timed and profiled)")
    _check_count("warmup", warmup, 0, "pass 0 to profile without warm-up steps")
    _check_count("top_k", top_k, 1, "keep at least one row of the op table")
    check_build_args(framework, executions, execution, precision, device, gpu_available, impl=impl, impls=impls)


def resolve_weights(config: HourglassConfig, weights: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """`weights` checked against the config, or the canonical impls.init_weights(config, seed=0)."""
    if weights is None:
        return spec.init_weights(config, seed=0)
    spec.check_weights(config, weights)
    return weights


class AbstractHourglassModel(abc.ABC):
    """A built Stacked Hourglass network in one framework, with one execution mode and precision.

    Arrays cross this interface as numpy in canonical layouts: inputs (N, H, W, 3) float32, heatmaps
    (stacks, N, H/4, W/4, K), kernels (kh, kw, c_in, c_out). Everything framework-specific stays inside.
    """

    config: HourglassConfig
    framework: str
    execution: str
    precision: str
    device: str
    impl: str

    def __init__(self, config: HourglassConfig, *, device: str, precision: str, execution: str,
                 impl: str = "idiomatic") -> None:
        """Record what was built; every model is <Framework>Hourglass(config, weights, *, device, precision,
        execution, impl[, framework options]) and calls this first."""
        self.config, self.device, self.precision, self.execution = config, device, precision, execution
        self.impl = impl

    @abc.abstractmethod
    def num_params(self) -> int:
        """Trainable parameters, counted from the framework's own variables."""

    @abc.abstractmethod
    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        """Heatmaps of every stack, (stacks, N, H/4, W/4, K) float32 (float64 for fp64: see io_dtype).

        Eval-mode BN (running statistics) by default; `train_mode=True` normalises with batch statistics
        and updates the running statistics as a training step would.
        """

    @abc.abstractmethod
    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Train-mode loss, sum over stacks of mean((heatmaps_s - target)^2), and the gradient of every
        trainable parameter under its canonical name and layout. Updates the BN running statistics."""

    @abc.abstractmethod
    def export_weights(self) -> dict[str, np.ndarray]:
        """All parameters and BN statistics as float32 numpy (float64 for fp64) under canonical names and layouts."""

    @abc.abstractmethod
    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """A zero-argument callable that runs one `phase` step on inputs already on the device.

        The inputs are made once here, before any timing. Each call ends with a device synchronisation
        (the result is complete when it returns), so a clock read right after it is honest.
        `forward`: eval-mode BN, no gradients. `forward_backward`: train-mode BN, the loss over all stacks
        and the gradients of every trainable parameter, no optimizer update.
        """

    def reset_peak_memory(self) -> bool:
        """Reset the allocator's peak counter; False where the framework has none (then a later peak still
        counts everything before)."""
        return False

    def peak_memory_bytes(self) -> int | None:
        """Allocator peak since the last reset for this model's device, or None where not measurable."""
        return None

    def memory_analysis(self, phase: str, batch_size: int, seed: int = 0) -> dict[str, int] | None:
        """The compiled step's own memory plan (arguments, outputs, temporaries, in bytes) where the compiler
        reports one (XLA: JAX), else None."""
        return None

    def settings(self) -> dict[str, object]:
        """Settings of this model that change speed (layout, compile mode, precision details)."""
        return {"execution": self.execution, "impl": self.impl, "precision": self.precision, "device": self.device}
