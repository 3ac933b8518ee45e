"""One measurement in a fresh process: `python -m bench.engine.worker SPEC.json RESULT.json`.

The only module of `bench` that loads a framework (through `impls.load`). The parent writes a typed spec
(bench.engine.protocol); this process runs its mode and writes the mode's typed result atomically:

- `cell`: build the model, time the first call alone, warm up, time every iteration; memory figures.
- `equivalence`: heatmaps of the canonical weights on an input drawn here from the seed, saved as .npy.
- `calibrate`: the framework's 3x3 conv at the model's dominant shape (needs `conv_benchmark`).
- `info`: the framework's runtime_info() (for `bench list` and run.json).
- `overhead`: the harness's loop against a bare loop on the same model (`python -m bench overhead`).
- `profile`: the framework's own profile of one cell (`profile()`, impls/profiling.py; `python -m bench profile`).
- `gradient_check`: one train-mode step's loss and gradients (fp64 in `bench run`), saved as .npz.
- `data_parallel_check`: one data-parallel step's gradients and the shard-by-shard reference's, as .npz.

A spec with `devices` above 1 (a data-parallel cell or check) also loads impls/<framework>_data_parallel.py
and calls its configure_devices first thing after the import, before the framework starts its runtime.

A Python exception becomes a result with status failed or oom and the traceback's tail; a hard crash
writes nothing and the parent reads the exit status and stderr instead. Progress markers go to stderr
("hgbench-worker: stage ..."), so a timeout says where the worker was. The first thing a worker does is
tie its life to its parent's (bench.engine.procs.die_with_parent): no worker outlives the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bench.core import nvml
from bench.core.calibration import ConvShape
from bench.core.files import write_json_atomic
from bench.core.settings import LoopSettings
from bench.engine import procs
from bench.engine import protocol as proto
from bench.engine.protocol import (
    BACKEND_OVERRIDE_ENV,
    ERROR_TAIL_LINES,
    OOM_MARKERS,
    STAGE_PREFIX,
    CalibrationSpec,
    CellSpec,
    EquivalenceSpec,
    GradientCheckSpec,
    InfoSpec,
    OverheadSpec,
    ProfileSpec,
    WorkerSpec,
)
from bench.engine.timing import measure


def stage(name: str) -> None:
    """Announce a stage on stderr so a timeout or crash row can say where the worker was."""
    print(f"{STAGE_PREFIX}{name}", file=sys.stderr, flush=True)


def load_backend(framework: str) -> ModuleType:
    """The framework's impls module, or the test override's stand-in for it."""
    override = os.environ.get(BACKEND_OVERRIDE_ENV)
    if override:
        return importlib.import_module(override).load(framework)
    import impls

    return impls.load(framework)


def load_data_parallel(framework: str) -> ModuleType:
    """The framework's data-parallel module, or the test override's stand-in for it."""
    override = os.environ.get(BACKEND_OVERRIDE_ENV)
    if override:
        return importlib.import_module(override).load_data_parallel(framework)
    from impls.registry import load_data_parallel as load_module

    return load_module(framework)


def classify_exception(err: BaseException) -> str:
    """'oom' for allocator exhaustion (any framework's flavour), else 'failed'."""
    if isinstance(err, MemoryError):
        return "oom"
    text = f"{type(err).__name__} {err}".lower()
    return "oom" if any(marker in text for marker in OOM_MARKERS) else "failed"


def error_tail(err: BaseException, lines: int = ERROR_TAIL_LINES) -> str:
    """The last lines of the formatted traceback, ending with the exception's message."""
    text = "".join(traceback.format_exception(err)).rstrip()
    return "\n".join(text.splitlines()[-lines:])


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def runtime_record(backend: ModuleType) -> dict[str, Any]:
    """backend.runtime_info(), or {"error": ...} when it raises: metadata must not void a measurement."""
    try:
        return dict(backend.runtime_info())
    except Exception as err:  # recorded and warned about by the parent
        return {"error": error_tail(err, lines=1)}


def _config(spec: WorkerSpec) -> Any:
    from impls import HourglassConfig

    fields = dict(spec.config)
    fields["input_hw"] = tuple(fields["input_hw"])
    return HourglassConfig(**fields)


def _device(backend: ModuleType, spec: WorkerSpec) -> str:
    """The device to build on; under --device auto a framework that sees no GPU falls back to the CPU."""
    device = spec.device
    if device == "gpu" and spec.device_requested == "auto" and not backend.gpu_available():
        return "cpu"
    return device


class _MemoryProbe:
    """NVML readings (process and device used bytes) taken at each stage; keeps the largest, and how the
    process figure was found (bench.core.nvml.process_memory: by PID, or device-minus-baseline in a container)."""

    def __init__(self, device: str) -> None:
        # CUDA's device 0 as NVML names it; the framework's own UUID replaces it once it reports one.
        self.uuid = nvml.visible_gpu_uuid() if device == "gpu" else None
        # Device memory in use before this process built anything on the GPU: the container fallback's zero.
        self.baseline = nvml.process_memory(self.uuid, os.getpid(), None)[1]
        self.process: int | None = None
        self.device: int | None = None
        self.lookup = nvml.LOOKUP_NO_NVML

    def match(self, runtime: dict[str, Any]) -> None:
        """Prefer the GPU the framework says it uses (by UUID) over CUDA's device 0."""
        if self.uuid is not None and runtime.get("gpu_uuid"):
            self.uuid = str(runtime["gpu_uuid"])

    def read(self) -> None:
        process, device, self.lookup = nvml.process_memory(self.uuid, os.getpid(), self.baseline)
        self.process = _max_or_none(self.process, process)
        self.device = _max_or_none(self.device, device)


def _max_or_none(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def slowed(step: Callable[[], None], fraction: float) -> Callable[[], None]:
    """`step`, followed by a busy wait of `fraction` times the time it just took (a proportional slowdown)."""
    if fraction <= 0:
        return step

    def slow_step() -> None:
        t0 = time.perf_counter_ns()
        step()
        deadline = time.perf_counter_ns() + int((time.perf_counter_ns() - t0) * fraction)
        while time.perf_counter_ns() < deadline:
            pass

    return slow_step


def _timed(loop: LoopSettings, step: Callable[[], None], on_stage: Callable[[str], None]) -> dict[str, Any]:
    timings = measure(step, **dataclasses.asdict(loop), on_stage=on_stage)
    return {
        "first_call_ms": timings.first_call_ns / 1e6,
        "warmup_calls": timings.warmup_calls,
        "samples_ns": timings.samples_ns,
    }


def run_cell(backend: ModuleType, spec: CellSpec) -> dict[str, Any]:
    """Build, time and measure one cell (on several devices: run_data_parallel_cell)."""
    if spec.devices > 1:
        return run_data_parallel_cell(backend, spec)
    config = _config(spec)
    probe = _MemoryProbe(spec.device)  # before anything of this process is on the GPU
    device = _device(backend, spec)
    runtime = runtime_record(backend)
    probe.match(runtime)
    stage("build")
    t0 = time.perf_counter()
    model = backend.build(config, device=device, precision=spec.precision, execution=spec.execution,
                          impl=spec.impl)
    build_s = time.perf_counter() - t0
    # One fresh process per cell, so the allocator peak covers inputs, compilation and the timed steps
    # of this cell alone (JAX has no reset; the fresh process gives it the same meaning).
    model.reset_peak_memory()
    stage("setup")
    t0 = time.perf_counter()
    step = model.benchmark_step(spec.phase, spec.batch_size, spec.seed)
    setup_s = time.perf_counter() - t0
    slowdown = proto.injected_slowdown(os.environ)
    step = slowed(step, slowdown)

    peaks: dict[str, Any] = {"setup": None, "reset": False}

    def on_stage(name: str) -> None:
        probe.read()
        if name == "timed":  # first call and warm-up are over: their peak, then a fresh count for the loop
            peaks["setup"] = model.peak_memory_bytes()
            peaks["reset"] = model.reset_peak_memory()
        stage(name)

    result = _timed(spec.loop, step, on_stage)
    probe.read()
    timed_peak = model.peak_memory_bytes()
    plan = model.memory_analysis(spec.phase, spec.batch_size, spec.seed) or {}  # after timing: it compiles again
    result.update(
        device=device,
        build_s=build_s,
        setup_s=setup_s,
        # The whole cell's peak, the first call and warm-up's, and the timed loop's alone: unknown (None), not
        # the cell's, where the framework cannot reset its counter (JAX).
        gpu_allocator_peak_bytes=_max_or_none(peaks["setup"], timed_peak),
        gpu_allocator_setup_peak_bytes=peaks["setup"],
        gpu_allocator_timed_peak_bytes=timed_peak if peaks["reset"] else None,
        compiled_argument_bytes=plan.get("argument_bytes"),
        compiled_output_bytes=plan.get("output_bytes"),
        compiled_temp_bytes=plan.get("temp_bytes"),
        nvml_process_used_bytes=probe.process,
        nvml_process_lookup=probe.lookup if device == "gpu" else None,
        nvml_device_used_bytes=probe.device,
        model_settings=model.settings(),
        runtime_info=runtime,
        num_params=model.num_params(),
    )
    if slowdown:
        result["injected_slowdown"] = slowdown
    return result


def _slowest_rank(result: dict[str, Any], model: Any) -> None:
    """Where the replicas are processes of their own (torch DDP), a step ends on each rank at its own time:
    keep, per step, the slowest rank's duration (the first call's too). The other ranks report every call
    they made: the first, the warm-up ones and the timed ones, in order."""
    rank_step_ns = getattr(model, "rank_step_ns", None)
    if rank_step_ns is None:
        return
    samples = result["samples_ns"]
    for calls in rank_step_ns():
        if len(calls) < len(samples) + 1:
            raise RuntimeError(f"a data-parallel rank reported {len(calls)} steps, fewer than the "
                               f"{len(samples) + 1} rank 0 made")  # fmt: skip
        samples = [max(own, other) for own, other in zip(samples, calls[-len(samples):], strict=True)]
        result["first_call_ms"] = max(result["first_call_ms"], calls[0] / 1e6)
    result["samples_ns"] = samples


def run_data_parallel_cell(backend: ModuleType, spec: CellSpec) -> dict[str, Any]:
    """Build the framework's data-parallel model on spec.devices replicas, then time its training step as
    run_cell does. A step ends when every replica's gradients are all-reduced (the module's contract); for
    rank processes the slowest rank's time is the step's. Device memory is not read: the replicas' memory is
    spread over devices and processes (host_peak_rss_bytes is this process's, rank 0's)."""
    dp = load_data_parallel(spec.framework)
    config = _config(spec)
    device = _device(backend, spec)
    runtime = runtime_record(backend)
    stage("build")
    t0 = time.perf_counter()
    model = dp.build_data_parallel(config, devices=spec.devices, device=device, precision=spec.precision,
                                   execution=spec.execution, impl=spec.impl)  # fmt: skip
    build_s = time.perf_counter() - t0
    try:
        stage("setup")
        t0 = time.perf_counter()
        step = model.benchmark_step(spec.phase, spec.batch_size, spec.seed)
        setup_s = time.perf_counter() - t0
        slowdown = proto.injected_slowdown(os.environ)
        result = _timed(spec.loop, slowed(step, slowdown), stage)
        _slowest_rank(result, model)
        result.update(device=device, build_s=build_s, setup_s=setup_s, runtime_info=runtime,
                      num_params=model.num_params())  # fmt: skip
        if hasattr(model, "allreduce_profile"):  # after the timed loop: the profiler never runs while timing
            stage("allreduce_profile")
            profile = model.allreduce_profile(spec.batch_size, spec.seed)
            result.update(allreduce_ms=profile["allreduce_ms"], allreduce_share=profile["allreduce_share"],
                          allreduce_method=profile["method"])  # fmt: skip
        if slowdown:
            result["injected_slowdown"] = slowdown
        return result
    finally:
        stage("close")
        model.close()


def run_data_parallel_check(backend: ModuleType, spec: Any) -> dict[str, Any]:
    """The data-parallel step's loss and gradients on the global batch, and the shard-by-shard reference's
    on one device (per-replica batch norm in both), each saved for the parent to compare."""
    from impls import init_weights
    from impls.data_parallel import shardwise_reference
    from impls.spec import random_batch

    dp = load_data_parallel(spec.framework)
    config = _config(spec)
    device = _device(backend, spec)
    weights = init_weights(config, seed=0)
    x, target = random_batch(config, spec.batch_size, spec.seed)  # (N, H, W, 3), (N, H/4, W/4, K): global
    stage("build")
    model = dp.build_data_parallel(config, weights, devices=spec.devices, device=device, precision=spec.precision,
                                   execution=spec.execution, impl=spec.impl)  # fmt: skip
    try:
        stage("loss_and_grads")
        loss, grads = model.loss_and_grads(x, target)
    finally:
        stage("close")
        model.close()
    stage("reference")
    single = backend.build(config, weights, device=device, precision=spec.precision, execution=spec.execution,
                           impl=spec.impl)  # fmt: skip
    reference_loss, reference = shardwise_reference(single, x, target, spec.devices)
    np.savez(spec.output_npz, **{name: np.asarray(g) for name, g in grads.items()})
    np.savez(spec.reference_npz, **{name: np.asarray(g) for name, g in reference.items()})
    return {"device": device, "loss": float(loss), "reference_loss": float(reference_loss),
            "runtime_info": runtime_record(backend)}  # fmt: skip


def run_equivalence(backend: ModuleType, spec: EquivalenceSpec) -> dict[str, Any]:
    """Heatmaps of the canonical weights (seed 0) on an input drawn from spec.seed, saved to spec.output_npy."""
    from impls import init_weights
    from impls.spec import random_arrays

    config = _config(spec)
    device = _device(backend, spec)
    stage("input")
    (x,) = random_arrays(spec.seed, tuple(spec.input_shape))  # (1, H, W, 3): the same numbers in every framework
    stage("build")
    model = backend.build(
        config, init_weights(config, seed=0), device=device, precision="fp32", execution=spec.execution, impl=spec.impl
    )
    stage("predict")
    heatmaps = np.asarray(model.predict(x), dtype=np.float32)  # (S, 1, H/4, W/4, K)
    np.save(spec.output_npy, heatmaps)
    return {"device": device, "output_npy": spec.output_npy, "runtime_info": runtime_record(backend)}


def run_calibration(backend: ModuleType, spec: CalibrationSpec) -> dict[str, Any]:
    """Time the framework's calibration workloads: each (kind, shape, batch size, precision) in the spec.

    Kinds: "conv3x3" and "reference_conv" go through `conv_benchmark`, "gemm" through `gemm_benchmark`.
    A workload the backend has no probe for is listed in `missing`, not failed. A workload that raises (an
    allocation too large for its batch size) is listed in `failures` with its error, and the others go on:
    one batch size's failure must not void the fixed reference conv.
    """
    device = _device(backend, spec)
    probes = {"conv3x3": "conv_benchmark", "reference_conv": "conv_benchmark", "gemm": "gemm_benchmark"}
    measurements, failures, missing = [], [], []
    for workload in spec.workloads:
        probe = getattr(backend, probes[workload.kind], None)
        if probe is None:
            missing.append(workload.kind)
            continue
        shape, batch_size, precision = workload.shape, workload.batch_size, workload.precision
        name = f"calibrate {workload.kind} {precision} b{batch_size}"  # the parent matches a crash's stage to it
        stage(name)
        try:
            if workload.kind == "gemm":
                step = probe(batch_size * shape["m_per_image"], shape["k"], shape["n"], device=device,
                             precision=precision, seed=spec.seed)  # fmt: skip
            else:
                conv = ConvShape(**shape)
                step = probe((batch_size, conv.height, conv.width, conv.c_in), conv.c_out, kernel_size=conv.kernel_size,
                             device=device, precision=precision, seed=spec.seed)  # fmt: skip
            entry = _timed(spec.loop, step, lambda part, name=name: stage(f"{name}: {part}"))
        except Exception as err:  # failures are data, per workload
            failures.append(proto.CalibrationFailure(kind=workload.kind, precision=precision, batch_size=batch_size,
                                                     status=classify_exception(err), error=error_tail(err)))  # fmt: skip
            continue
        finally:
            step = None  # free this workload's arrays before the next one allocates its own
        measurements.append(proto.CalibrationMeasurement(kind=workload.kind, precision=precision,
                                                         batch_size=batch_size, **entry))  # fmt: skip
    return {"device": device, "measurements": measurements, "failures": failures, "missing": sorted(set(missing)),
            "runtime_info": runtime_record(backend)}  # fmt: skip


def run_overhead(backend: ModuleType, spec: OverheadSpec) -> dict[str, Any]:
    """The harness's sampling loop and a bare loop on the same step in this process, rounds alternated.

    The bare loop is what a user would write: `t0 = perf_counter(); step(); times.append(perf_counter() - t0)`.
    Alternating rounds spreads any drift (thermal, other load) over both.
    """
    from bench.engine.timing import sample

    config = _config(spec)
    device = _device(backend, spec)
    model = backend.build(config, device=device, precision=spec.precision, execution=spec.execution,
                          impl=spec.impl)
    step = model.benchmark_step(spec.phase, spec.batch_size, spec.seed)
    for _ in range(spec.warmup + 1):
        step()
    harness: list[int] = []
    bare: list[float] = []
    for _ in range(spec.rounds):
        stage("harness round")
        harness += sample(step, max_iters=spec.iters)
        stage("bare round")
        for _ in range(spec.iters):
            t0 = time.perf_counter()
            step()
            bare.append(time.perf_counter() - t0)
    return {"device": device, "harness_samples_ns": harness, "bare_samples_ns": [int(t * 1e9) for t in bare]}


def run_profile(backend: ModuleType, spec: ProfileSpec) -> dict[str, Any]:
    """The implementation's profile() of one cell; its traces go to spec.trace_dir, its dict is returned as is.

    The parent checks the dict against the contract (impls.profiling.check_profile): this process only runs it.
    """
    device = _device(backend, spec)
    if not hasattr(backend, "profile"):
        raise NotImplementedError(
            f"{backend.__name__} has no profile(config, *, phase, batch_size, execution, trace_dir, ...) yet "
            "(the contract is in impls/profiling.py), so this framework cannot be profiled"
        )
    stage("profile")
    result = backend.profile(
        _config(spec), phase=spec.phase, batch_size=spec.batch_size, execution=spec.execution,
        trace_dir=spec.trace_dir, device=device, precision=spec.precision, warmup=spec.warmup,
        steps=spec.steps, seed=spec.seed, top_k=spec.top_k, impl=spec.impl,
    )  # fmt: skip
    return {"device": device, "profile": _profile_dict(result), "runtime_info": runtime_record(backend)}


def _profile_dict(result: Any) -> dict[str, Any]:
    """profile()'s result as the JSON dict of the contract (a typed result converts itself)."""
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def run_info(backend: ModuleType, spec: InfoSpec) -> dict[str, Any]:
    """The framework's runtime record plus its module surface."""
    return {
        "runtime_info": runtime_record(backend),
        "executions": list(backend.EXECUTIONS),
        "precisions": list(backend.PRECISIONS),
        "gpu_available": bool(backend.gpu_available()),
        "has_conv_benchmark": hasattr(backend, "conv_benchmark"),
    }


MODES: dict[str, Callable[[ModuleType, Any], dict[str, Any]]] = {
    "cell": run_cell,
    "equivalence": run_equivalence,
    "calibrate": run_calibration,
    "info": run_info,
    "overhead": run_overhead,
    "profile": run_profile,
}


def _configure_math(backend: ModuleType, spec: WorkerSpec) -> dict[str, Any] | None:
    """On a GPU, the framework's fp32 math and autotuning pinned as the run asks (the equivalence check always
    in IEEE fp32, so its tolerance means the same everywhere); None on a CPU, whose fp32 is IEEE anyway."""
    if spec.device != "gpu" or not hasattr(backend, "configure_math"):
        return None
    fp32_math = "ieee" if isinstance(spec, EquivalenceSpec) else spec.fp32_math
    return dict(backend.configure_math(fp32_math, spec.autotune))


def execute(spec: WorkerSpec) -> proto.WorkerResult:
    """Run the spec's mode; every exception becomes a result with a status and the error's tail."""
    envelope: dict[str, Any] = {"mode": spec.MODE, "framework": spec.framework}
    payload: dict[str, Any] = {}
    if spec.device == "gpu":  # read by TensorFlow and XLA when the GPU starts: before the framework loads
        os.environ.update(proto.gpu_math_env(spec.autotune, os.environ.get("XLA_FLAGS", "")))
    if isinstance(spec, CellSpec) and spec.compile_cache_dir:
        os.environ.update(proto.compile_cache_env(spec.compile_cache_dir))  # before the framework reads it
    try:
        stage("import")
        t0 = time.perf_counter()
        backend = load_backend(spec.framework)
        if proto.spec_devices(spec) > 1:  # before the framework starts its runtime (host or logical devices)
            load_data_parallel(spec.framework).configure_devices(proto.spec_devices(spec), spec.device)
        envelope["import_s"] = time.perf_counter() - t0
        envelope["math"] = _configure_math(backend, spec)
        payload = MODES[spec.MODE](backend, spec)
    except Exception as err:  # failures are data: the parent turns this into a row
        envelope.update(status=classify_exception(err), error=error_tail(err))
    envelope["host_peak_rss_bytes"] = host_peak_rss_bytes()
    return proto.RESULT_TYPES[spec.MODE](**envelope, **payload)


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the spec, run it, write the result; exit 0 whenever a result was written."""
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m bench.engine.worker SPEC.json RESULT.json (started by bench run, profile and maxbatch)"
    if args in (["--help"], ["-h"]):
        print(usage)
        return 0
    procs.die_with_parent()  # before any work: no worker outlives its parent, whatever kills the parent
    if len(args) != 2:
        print(f"error: expected two paths, got {len(args)} argument(s); {usage}", file=sys.stderr)
        return 2
    # The spec lies in the run's temp folder: scratch files of the frameworks' data-parallel engines go there
    # too (impls.torch_data_parallel.SCRATCH_ENV), so the run's clean-up removes them even after a kill.
    os.environ[proto.SCRATCH_ENV] = str(Path(args[0]).resolve().parent)
    spec = proto.spec_from_json(json.loads(Path(args[0]).read_text()))
    result = execute(spec)
    stage("write")
    write_json_atomic(Path(args[1]), proto.result_to_json(result))
    return 0


def run_gradient_check(backend: ModuleType, spec: GradientCheckSpec) -> dict[str, Any]:
    """One train-mode step of the canonical weights (seed 0) on impls.spec.random_batch in spec.precision:
    the loss, and every gradient saved to spec.output_npz for the parent to compare across frameworks."""
    from impls import init_weights
    from impls.spec import random_batch

    config = _config(spec)
    device = _device(backend, spec)
    stage("build")
    model = backend.build(config, init_weights(config, seed=0), device=device, precision=spec.precision,
                          execution=spec.execution, impl=spec.impl)  # fmt: skip
    x, target = random_batch(config, spec.batch_size, spec.seed)  # (N, H, W, 3), (N, H/4, W/4, K)
    stage("loss_and_grads")
    loss, grads = model.loss_and_grads(x, target)
    np.savez(spec.output_npz, **{name: np.asarray(g) for name, g in grads.items()})
    return {"device": device, "loss": float(loss), "output_npz": spec.output_npz, "runtime_info": runtime_record(backend)}


MODES[GradientCheckSpec.MODE] = run_gradient_check
MODES[proto.DataParallelCheckSpec.MODE] = run_data_parallel_check


if __name__ == "__main__":
    raise SystemExit(main())
