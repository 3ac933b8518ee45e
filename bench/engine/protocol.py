"""The parent-worker protocol: what crosses the process boundary, typed, and the switches both sides read.

The parent writes one spec (a frozen dataclass per worker mode) as JSON; the worker
(`python -m bench.engine.worker SPEC RESULT`) writes one result (a dataclass per mode) back. Both sides
import this module, so a field added here is added to both; a key that is not a field of the mode's
dataclass is a ProtocolError, never silently ignored. Like torch.utils.benchmark's TaskSpec ->
Measurement: what to measure is kept apart from what came back.

Imports no framework, pandas or rich: the worker imports it before loading a framework.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bench.core.settings import LoopSettings

# ---------------------------------------------------------------- switches and markers

# Environment of every worker, set in this one place and recorded in run.json.
# Allocator knobs: JAX would otherwise preallocate 75% of the GPU and TF map all of it, so the memory
# figures would describe the allocator's policy, not the model. Compile caches off: torch.compile keeps an
# on-disk cache across processes, which made a second run's first_call_ms 6 s instead of 30 s; a
# first-call figure must not depend on what ran before (JAX's and TF's persistent caches are off by
# default). TF_CPP_MIN_LOG_LEVEL=2 keeps TF's info banners out of the error tails.
WORKER_ENV: dict[str, str] = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
# Set by the worker, before a framework loads, when a cell spec names a compile cache (rounds after the first
# reuse the first round's compilations): torch inductor's on-disk caches and JAX's persistent compilation
# cache, every entry kept (JAX otherwise skips programs that compile in under a second). TensorFlow has no
# persistent cache of its XLA programs, so its later rounds compile again.
def compile_cache_env(cache_dir: str) -> dict[str, str]:
    """The environment that points torch inductor and JAX at `cache_dir`."""
    return {
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0",
        "TORCHINDUCTOR_CACHE_DIR": f"{cache_dir}/inductor",
        "JAX_COMPILATION_CACHE_DIR": f"{cache_dir}/jax",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def gpu_math_env(autotune: bool, xla_flags: str) -> dict[str, str]:
    """Autotuning switches that TensorFlow and XLA read when the GPU starts, so the worker sets them before a
    framework loads (torch's cudnn.benchmark is set in the process, by configure_math)."""
    level = "--xla_gpu_autotune_level=" + ("4" if autotune else "0")
    kept = " ".join(flag for flag in xla_flags.split() if not flag.startswith("--xla_gpu_autotune_level"))
    return {"TF_CUDNN_USE_AUTOTUNE": "1" if autotune else "0", "XLA_FLAGS": f"{kept} {level}".strip()}


# Test hook: a module whose load(framework) returns a stand-in for an impls module (tests/fake_backend.py).
BACKEND_OVERRIDE_ENV = "HGBENCH_BACKEND_OVERRIDE"
# Set by the worker to the run's temp folder: where impls' data-parallel engines keep scratch files (rank
# folders), so that the run's clean-up, and --resume after a killed run, removes them.
SCRATCH_ENV = "HGBENCH_SCRATCH_DIR"
# Test switch: lengthen every timed model step by this fraction of its own duration (busy wait), so the
# regression checks can be shown to catch a known slowdown. Recorded in the result and flagged by the runner.
SLOWDOWN_ENV = "HGBENCH_TEST_SLOWDOWN"
MAX_SLOWDOWN = 10.0


def injected_slowdown(environ: Mapping[str, str]) -> float:
    """The test switch's fraction (0 when unset); ValueError for a malformed value, never a silent zero.

    The parent checks it before a run starts (exit 2), the worker reads it for each cell."""
    text = environ.get(SLOWDOWN_ENV, "").strip()
    if not text:
        return 0.0
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= MAX_SLOWDOWN:
        raise ValueError(f"{SLOWDOWN_ENV}={text!r} is not a fraction between 0 and {MAX_SLOWDOWN:g} "
                         "(e.g. 0.25 for 25% slower); unset it or fix it")  # fmt: skip
    return fraction

# Progress markers on the worker's stderr ("hgbench-worker: stage timed"): a timeout or crash row says
# where the worker was.
STAGE_PREFIX = "hgbench-worker: stage "
ERROR_TAIL_LINES = 15
# How each framework words allocator exhaustion (torch CUDA, TF/XLA RESOURCE_EXHAUSTED, JAX).
OOM_MARKERS = ("out of memory", "resource_exhausted", "resourceexhausted", "outofmemory", "oom when allocating")


class ProtocolError(ValueError):
    """A spec or result that does not match its mode's dataclass (an unknown mode, a missing or unknown key)."""


# ---------------------------------------------------------------- specs: what the parent asks for


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What every worker needs: the framework and, for the modes that build a model, where and what."""

    MODE: ClassVar[str] = ""
    framework: str
    config: dict[str, Any] = field(default_factory=dict)  # HourglassConfig.to_dict()
    device: str = "cpu"  # resolved: cpu or gpu
    device_requested: str = "cpu"  # what --device said: under "auto" a framework without a GPU falls back
    seed: int = 0  # seeds inputs and the canonical weights
    fp32_math: str = "ieee"  # on a GPU: full fp32 (ieee) or TF32 (tf32); the equivalence check is always ieee
    autotune: bool = True  # on a GPU: cuDNN / XLA autotuning on or off, alike in every framework
    impl: str = "idiomatic"  # the implementation variant built (impls.registry.IMPLS)


@dataclass(frozen=True, kw_only=True)
class InfoSpec(WorkerSpec):
    """`info`: the framework's runtime record and module surface (bench list, run.json)."""

    MODE: ClassVar[str] = "info"


@dataclass(frozen=True, kw_only=True)
class CellSpec(WorkerSpec):
    """`cell`: build the model, time the first call alone, warm up, time every iteration; memory figures."""

    MODE: ClassVar[str] = "cell"
    execution: str
    precision: str
    batch_size: int
    phase: str
    loop: LoopSettings
    # A run's own compilation cache, shared by the rounds of its cells: round 1 finds it empty (a cold first
    # call), later rounds reuse what round 1 compiled. Empty: every compilation cache off (WORKER_ENV).
    compile_cache_dir: str = ""
    # Data-parallel replicas (batch_size is the global batch): above 1 the worker builds the framework's
    # data-parallel model (impls/<framework>_data_parallel.py) instead of the single-device one.
    devices: int = 1


@dataclass(frozen=True, kw_only=True)
class EquivalenceSpec(WorkerSpec):
    """`equivalence`: heatmaps of the canonical weights on one input, saved as .npy.

    The worker draws the input itself (impls.spec.random_arrays from `seed`, the same numbers in every
    framework): an input sized by --input-size is allocated in a worker, never in the parent."""

    MODE: ClassVar[str] = "equivalence"
    execution: str
    input_shape: list[int]  # (1, H, W, 3): drawn float32 by the worker
    output_npy: str  # written by the worker: (stacks, 1, H/4, W/4, K) float32


@dataclass(frozen=True, kw_only=True)
class CalibrationWorkload:
    """One calibration workload: kind (conv3x3, gemm, reference_conv), its shape, batch size, precision, FLOPs."""

    kind: str
    shape: dict[str, int]  # ConvShape.to_dict() or GemmShape.to_dict()
    batch_size: int
    precision: str
    flops: int


@dataclass(frozen=True, kw_only=True)
class CalibrationSpec(WorkerSpec):
    """`calibrate`: time the framework's conv and GEMM probes on the given workloads."""

    MODE: ClassVar[str] = "calibrate"
    workloads: list[CalibrationWorkload]
    loop: LoopSettings


@dataclass(frozen=True, kw_only=True)
class OverheadSpec(WorkerSpec):
    """`overhead`: the harness's sampling loop against a bare loop on one model, rounds alternated."""

    MODE: ClassVar[str] = "overhead"
    execution: str
    precision: str
    batch_size: int
    phase: str
    warmup: int
    iters: int  # calls per round of each loop
    rounds: int


@dataclass(frozen=True, kw_only=True)
class ProfileSpec(WorkerSpec):
    """`profile`: the implementation's own profile() of one cell (contract: impls/profiling.py)."""

    MODE: ClassVar[str] = "profile"
    execution: str
    precision: str
    batch_size: int
    phase: str
    warmup: int
    steps: int
    top_k: int
    trace_dir: str


# ---------------------------------------------------------------- results: what came back


@dataclass(kw_only=True)
class WorkerResult:
    """What every worker reports: how it ended, what it cost, and the framework's runtime record."""

    mode: str
    framework: str
    status: str = "ok"  # ok | failed | oom (a worker that writes no result is classified by the parent)
    error: str = ""
    import_s: float | None = None
    host_peak_rss_bytes: int | None = None
    device: str | None = None  # where it actually built (a fallback under --device auto shows here)
    runtime_info: dict[str, Any] | None = None
    math: dict[str, Any] | None = None  # the GPU math settings the framework put in force (configure_math)


@dataclass(kw_only=True)
class InfoResult(WorkerResult):
    """The `info` mode's answer."""

    executions: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)
    gpu_available: bool | None = None
    has_conv_benchmark: bool | None = None


@dataclass(kw_only=True)
class CellResult(WorkerResult):
    """One cell's raw times and memory figures (every sample kept; statistics are the parent's job)."""

    first_call_ms: float | None = None
    warmup_calls: int | None = None
    samples_ns: list[int] = field(default_factory=list)
    build_s: float | None = None
    setup_s: float | None = None
    gpu_allocator_peak_bytes: int | None = None  # build to the end of the timed loop
    gpu_allocator_setup_peak_bytes: int | None = None  # first call and warm-up (compilation, autotuning scratch)
    gpu_allocator_timed_peak_bytes: int | None = None  # the timed loop alone; None where no reset exists (JAX)
    compiled_argument_bytes: int | None = None  # XLA's memory plan of the compiled step (JAX)
    compiled_output_bytes: int | None = None
    compiled_temp_bytes: int | None = None
    nvml_process_used_bytes: int | None = None
    nvml_process_lookup: str | None = None  # pid | device_minus_baseline | not_found | no_nvml (bench.core.nvml)
    nvml_device_used_bytes: int | None = None
    model_settings: dict[str, Any] | None = None
    num_params: int | None = None
    injected_slowdown: float | None = None
    # Data-parallel cells: the gradient all-reduce's share of a step from the framework's own profiler,
    # taken after the timed loop (impls.data_parallel.AllreduceProfile); None where it is not exposed.
    allreduce_ms: float | None = None
    allreduce_share: float | None = None
    allreduce_method: str | None = None


@dataclass(kw_only=True)
class EquivalenceResult(WorkerResult):
    """Where the heatmaps were saved."""

    output_npy: str | None = None


@dataclass(kw_only=True)
class CalibrationMeasurement:
    """One timed calibration workload."""

    kind: str
    precision: str
    batch_size: int
    first_call_ms: float
    warmup_calls: int
    samples_ns: list[int]


@dataclass(kw_only=True)
class CalibrationFailure:
    """One calibration workload that raised (an allocation too large for its batch size): the others go on."""

    kind: str
    precision: str
    batch_size: int
    status: str  # failed | oom
    error: str


@dataclass(kw_only=True)
class CalibrationResult(WorkerResult):
    """Every workload the backend could time, the ones that failed, and the kinds it has no probe for."""

    measurements: list[CalibrationMeasurement] = field(default_factory=list)
    failures: list[CalibrationFailure] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class OverheadResult(WorkerResult):
    """Samples of the harness loop and of the bare loop, alternated in one process."""

    harness_samples_ns: list[int] = field(default_factory=list)
    bare_samples_ns: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class ProfileResult(WorkerResult):
    """The implementation's profile() as a JSON dict; the parent checks it against impls.profiling's contract."""

    profile: dict[str, Any] = field(default_factory=dict)


SPEC_TYPES: dict[str, type[WorkerSpec]] = {
    cls.MODE: cls for cls in (InfoSpec, CellSpec, EquivalenceSpec, CalibrationSpec, OverheadSpec, ProfileSpec)
}
RESULT_TYPES: dict[str, type[WorkerResult]] = {
    "info": InfoResult,
    "cell": CellResult,
    "equivalence": EquivalenceResult,
    "calibrate": CalibrationResult,
    "overhead": OverheadResult,
    "profile": ProfileResult,
}


# ---------------------------------------------------------------- encoding


def spec_to_json(spec: WorkerSpec) -> dict[str, Any]:
    """The spec as a JSON object, with its mode."""
    return {"mode": spec.MODE, **dataclasses.asdict(spec)}


def _nested_type(annotation: Any) -> tuple[type | None, bool]:
    """(dataclass the field holds, whether as a list of them), or (None, False) for plain JSON values."""
    origin = typing.get_origin(annotation)
    if origin is list:
        inner = typing.get_args(annotation)[0]
        return (inner, True) if dataclasses.is_dataclass(inner) else (None, False)
    if origin in (typing.Union, types.UnionType):
        return None, False
    return (annotation, False) if dataclasses.is_dataclass(annotation) else (None, False)


def decode(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass `cls` from a JSON object; unknown or missing keys are a ProtocolError."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProtocolError(f"{where}: {cls.__name__} has no field(s) {', '.join(unknown)}")
    values = {}
    for name, raw in data.items():
        nested, is_list = _nested_type(hints[name])
        if nested is not None and is_list:
            values[name] = [decode(nested, item, f"{where}.{name}[{i}]") for i, item in enumerate(raw)]
        elif nested is not None:
            values[name] = decode(nested, raw, f"{where}.{name}")
        else:
            values[name] = raw
    try:
        return cls(**values)
    except TypeError as err:  # a required field missing
        raise ProtocolError(f"{where}: {err}") from None


def spec_from_json(data: dict[str, Any]) -> WorkerSpec:
    """The typed spec a parent wrote; ProtocolError for an unknown mode or keys."""
    payload = dict(data)
    mode = payload.pop("mode", None)
    if mode not in SPEC_TYPES:
        raise ProtocolError(f"unknown worker mode {mode!r}; expected one of {', '.join(SPEC_TYPES)}")
    return decode(SPEC_TYPES[mode], payload, f"{mode} spec")


def result_to_json(result: WorkerResult) -> dict[str, Any]:
    """The result as a JSON object."""
    return dataclasses.asdict(result)


def result_from_json(mode: str, data: dict[str, Any]) -> WorkerResult:
    """The typed result a worker of `mode` wrote; ProtocolError when it does not match that mode's dataclass."""
    return decode(RESULT_TYPES[mode], data, f"{mode} result")


def empty_result(spec: WorkerSpec, status: str, error: str) -> WorkerResult:
    """The result of a worker that wrote none (a crash, a timeout): only how it ended."""
    return RESULT_TYPES[spec.MODE](mode=spec.MODE, framework=spec.framework, status=status, error=error)


# ---------------------------------------------------------------- gradient check (fp64, before timing)


@dataclass(frozen=True, kw_only=True)
class GradientCheckSpec(WorkerSpec):
    """`gradient_check`: one train-mode step of the canonical weights on impls.spec.random_batch(config,
    batch_size, seed), in `precision`: the loss and every parameter's gradient, saved as .npz."""

    MODE: ClassVar[str] = "gradient_check"
    execution: str
    precision: str
    batch_size: int
    output_npz: str  # written by the worker: canonical parameter name -> gradient


@dataclass(kw_only=True)
class GradientCheckResult(WorkerResult):
    """The loss of the step and where the gradients were saved."""

    loss: float | None = None
    output_npz: str | None = None


SPEC_TYPES[GradientCheckSpec.MODE] = GradientCheckSpec
RESULT_TYPES[GradientCheckSpec.MODE] = GradientCheckResult


# ---------------------------------------------------------------- data-parallel check (before timing)


@dataclass(frozen=True, kw_only=True)
class DataParallelCheckSpec(WorkerSpec):
    """`data_parallel_check`: one data-parallel training step of the canonical weights on `devices` replicas
    (impls.spec.random_batch(config, batch_size, seed), the global batch), and the same step computed shard
    by shard on one device (impls.data_parallel.shardwise_reference); both gradients saved as .npz."""

    MODE: ClassVar[str] = "data_parallel_check"
    execution: str
    precision: str
    batch_size: int
    devices: int
    output_npz: str  # the data-parallel step's gradients: canonical parameter name -> gradient
    reference_npz: str  # the shard-by-shard reference's


@dataclass(kw_only=True)
class DataParallelCheckResult(WorkerResult):
    """Both losses; the gradients are in the spec's files."""

    loss: float | None = None
    reference_loss: float | None = None


SPEC_TYPES[DataParallelCheckSpec.MODE] = DataParallelCheckSpec
RESULT_TYPES[DataParallelCheckSpec.MODE] = DataParallelCheckResult


def spec_devices(spec: WorkerSpec) -> int:
    """The data-parallel replicas a spec asks for (1 for every mode without any)."""
    return int(getattr(spec, "devices", 1))
