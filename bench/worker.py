"""One measurement in a fresh process: `python -m bench.worker SPEC.json RESULT.json`.

The only module of `bench` that loads a framework (through `impls.load`). The parent writes a JSON spec;
this process runs one of these modes and writes a JSON result atomically:

- `cell`: build the model, time the first call alone, warm up, time every iteration; memory figures.
- `equivalence`: heatmaps of the canonical weights on the parent's input, saved as .npy.
- `calibrate`: the framework's 3x3 conv at the model's dominant shape (needs `conv_benchmark`).
- `info`: the framework's runtime_info() (for `bench list` and run.json).
- `overhead`: the harness's loop against a bare loop on the same model (`python -m bench overhead`).

A Python exception becomes a result with status failed or oom and the traceback's tail; a hard crash
writes nothing and the parent reads the exit status and stderr instead. Progress markers go to stderr
("hgbench-worker: stage ..."), so a timeout says where the worker was.
"""

from __future__ import annotations

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

from bench import nvml
from bench.atomic import write_json_atomic
from bench.calibration import ConvShape
from bench.timing import measure

# Test hook: a module whose load(framework) returns a stand-in for an impls module (tests/fake_backend.py).
BACKEND_OVERRIDE_ENV = "HGBENCH_BACKEND_OVERRIDE"
ERROR_TAIL_LINES = 15
STAGE_PREFIX = "hgbench-worker: stage "

# How each framework words allocator exhaustion (torch CUDA, TF/XLA RESOURCE_EXHAUSTED, JAX).
OOM_MARKERS = ("out of memory", "resource_exhausted", "resourceexhausted", "outofmemory", "oom when allocating")


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


def _config(spec: dict[str, Any]) -> Any:
    from impls import HourglassConfig

    fields = dict(spec["config"])
    fields["input_hw"] = tuple(fields["input_hw"])
    return HourglassConfig(**fields)


def _device(backend: ModuleType, spec: dict[str, Any]) -> str:
    """The device to build on; under --device auto a framework that sees no GPU falls back to the CPU."""
    device = spec["device"]
    if device == "gpu" and spec.get("device_requested") == "auto" and not backend.gpu_available():
        return "cpu"
    return device


class _MemoryProbe:
    """NVML readings (process and device used bytes) taken at each stage; keeps the largest."""

    def __init__(self, device: str, runtime: dict[str, Any]) -> None:
        # Match the framework's GPU by UUID: its own report when it gives one, else CUDA's device 0.
        self.uuid = (runtime.get("gpu_uuid") or nvml.visible_gpu_uuid()) if device == "gpu" else None
        self.process: int | None = None
        self.device: int | None = None

    def read(self) -> None:
        process, device = nvml.memory_used(self.uuid, os.getpid())
        self.process = _max_or_none(self.process, process)
        self.device = _max_or_none(self.device, device)


def _max_or_none(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _timed(spec: dict[str, Any], step: Callable[[], None], on_stage: Callable[[str], None]) -> dict[str, Any]:
    timings = measure(
        step,
        warmup=spec["warmup"],
        max_iters=spec["iters"],
        min_time_s=spec["min_time_s"],
        min_iters=spec["min_iters"],
        on_stage=on_stage,
    )
    return {
        "first_call_ms": timings.first_call_ns / 1e6,
        "warmup_calls": timings.warmup_calls,
        "samples_ns": timings.samples_ns,
    }


def run_cell(backend: ModuleType, spec: dict[str, Any]) -> dict[str, Any]:
    """Build, time and measure one cell."""
    config = _config(spec)
    device = _device(backend, spec)
    runtime = runtime_record(backend)
    probe = _MemoryProbe(device, runtime)
    stage("build")
    t0 = time.perf_counter()
    model = backend.build(config, device=device, precision=spec["precision"], execution=spec["execution"])
    build_s = time.perf_counter() - t0
    # One fresh process per cell, so the allocator peak covers inputs, compilation and the timed steps
    # of this cell alone (JAX has no reset; the fresh process gives it the same meaning).
    model.reset_peak_memory()
    stage("setup")
    t0 = time.perf_counter()
    step = model.benchmark_step(spec["phase"], spec["batch_size"], spec["seed"])
    setup_s = time.perf_counter() - t0

    def on_stage(name: str) -> None:
        probe.read()
        stage(name)

    result = _timed(spec, step, on_stage)
    probe.read()
    result.update(
        device=device,
        build_s=build_s,
        setup_s=setup_s,
        gpu_allocator_peak_bytes=model.peak_memory_bytes(),
        nvml_process_used_bytes=probe.process,
        nvml_device_used_bytes=probe.device,
        model_settings=model.settings(),
        runtime_info=runtime,
    )
    return result


def run_equivalence(backend: ModuleType, spec: dict[str, Any]) -> dict[str, Any]:
    """Heatmaps of the canonical weights (seed 0) on the parent's input, saved to spec['output_npy']."""
    from impls import init_weights

    config = _config(spec)
    device = _device(backend, spec)
    stage("build")
    model = backend.build(
        config, init_weights(config, seed=0), device=device, precision="fp32", execution=spec["execution"]
    )
    stage("predict")
    heatmaps = np.asarray(model.predict(np.load(spec["input_npy"])), dtype=np.float32)  # (S, 1, H/4, W/4, K)
    np.save(spec["output_npy"], heatmaps)
    return {"device": device, "output_npy": spec["output_npy"], "runtime_info": runtime_record(backend)}


def run_calibration(backend: ModuleType, spec: dict[str, Any]) -> dict[str, Any]:
    """Time the framework's 3x3 conv at the dominant shape for every batch size and precision."""
    device = _device(backend, spec)
    if not hasattr(backend, "conv_benchmark"):
        return {
            "status": "skipped",
            "device": device,
            "error": f"{backend.__name__} has no conv_benchmark(input_shape, c_out, *, kernel_size, device, "
            "precision, seed) yet, so this framework's conv ceiling is not measured",
        }
    shape = ConvShape(**spec["conv_shape"])
    measurements = []
    for precision in spec["precisions"]:
        for batch_size in spec["batch_sizes"]:
            stage(f"calibrate {precision} b{batch_size}")
            step = backend.conv_benchmark(
                (batch_size, shape.height, shape.width, shape.c_in),
                shape.c_out,
                kernel_size=shape.kernel_size,
                device=device,
                precision=precision,
                seed=spec["seed"],
            )
            entry = _timed(spec, step, stage)
            entry.update(precision=precision, batch_size=batch_size)
            measurements.append(entry)
    return {"device": device, "measurements": measurements, "runtime_info": runtime_record(backend)}


def run_overhead(backend: ModuleType, spec: dict[str, Any]) -> dict[str, Any]:
    """The harness's sampling loop and a bare loop on the same step in this process, rounds alternated.

    The bare loop is what a user would write: `t0 = perf_counter(); step(); times.append(perf_counter() - t0)`.
    Alternating rounds spreads any drift (thermal, other load) over both.
    """
    from bench.timing import sample

    config = _config(spec)
    device = _device(backend, spec)
    model = backend.build(config, device=device, precision=spec["precision"], execution=spec["execution"])
    step = model.benchmark_step(spec["phase"], spec["batch_size"], spec["seed"])
    for _ in range(spec["warmup"] + 1):
        step()
    harness: list[int] = []
    bare: list[float] = []
    for _ in range(spec["rounds"]):
        stage("harness round")
        harness += sample(step, max_iters=spec["iters"])
        stage("bare round")
        for _ in range(spec["iters"]):
            t0 = time.perf_counter()
            step()
            bare.append(time.perf_counter() - t0)
    return {"device": device, "harness_samples_ns": harness, "bare_samples_ns": [int(t * 1e9) for t in bare]}


def run_info(backend: ModuleType, spec: dict[str, Any]) -> dict[str, Any]:
    """The framework's runtime record plus its module surface."""
    return {
        "runtime_info": runtime_record(backend),
        "executions": list(backend.EXECUTIONS),
        "precisions": list(backend.PRECISIONS),
        "gpu_available": bool(backend.gpu_available()),
        "has_conv_benchmark": hasattr(backend, "conv_benchmark"),
    }


MODES: dict[str, Callable[[ModuleType, dict[str, Any]], dict[str, Any]]] = {
    "cell": run_cell,
    "equivalence": run_equivalence,
    "calibrate": run_calibration,
    "info": run_info,
    "overhead": run_overhead,
}


def execute(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's mode; every exception becomes a result with a status and the error's tail."""
    result: dict[str, Any] = {"mode": spec["mode"], "framework": spec["framework"], "status": "ok", "error": ""}
    try:
        stage("import")
        t0 = time.perf_counter()
        backend = load_backend(spec["framework"])
        result["import_s"] = time.perf_counter() - t0
        result.update(MODES[spec["mode"]](backend, spec))
    except Exception as err:  # failures are data: the parent turns this into a row
        result.update(status=classify_exception(err), error=error_tail(err))
    result["host_peak_rss_bytes"] = host_peak_rss_bytes()
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the spec, run it, write the result; exit 0 whenever a result was written."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    result = execute(spec)
    stage("write")
    write_json_atomic(Path(args[1]), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
