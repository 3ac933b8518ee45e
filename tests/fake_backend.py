"""A framework-free stand-in for an impls module, for fast tests of the runner (numpy only).

Selected with HGBENCH_BACKEND_OVERRIDE=tests.fake_backend (read only by bench/engine/worker.py): the worker then
calls `load(framework)` here instead of `impls.load(framework)`. Faults are injected with
HGBENCH_FAKE_FAULTS, a comma list of KIND@SELECTOR; SELECTOR is a framework ("jax") or an fnmatch pattern
over "framework/execution/phase" ("torch/*/forward_backward"). Kinds:

    crash     the process aborts (SIGABRT) in the first step
    sigkill   the process is sent SIGKILL in the first step (as by a person, not the out-of-memory killer)
    exit      the process exits with code 3 in the first step
    oom       a CUDA-style out-of-memory RuntimeError in the first step
    hang      the first step never returns
    slow      every step sleeps 20 ms
    error     benchmark_step() raises ValueError (a Python exception while setting up)
    disagree  predict() returns heatmaps 10% off
    graddisagree  loss_and_grads() returns gradients 1e-6 off (far inside fp32 rounding, far outside fp64's)
    noconv    the module has no conv_benchmark
    noprofile the module has no profile
    badprofile  profile() returns stage times that sum to more than the step they partition
    recompile profile() reports 2 recompilations in the timed loop
    dpdisagree  the data-parallel loss_and_grads() returns gradients 1e-6 off its shard-by-shard reference
crash, sigkill, exit, oom, hang and error also hit profile() (before its first step).
`load_data_parallel(framework)` stands in for impls/<framework>_data_parallel.py: its step is the
single-device fake step (the faults above strike it alike), its gradients the shard-by-shard reference's.
Like the real modules, a benchmark step and the calibration probes allocate their inputs for the batch
size they are given (impls.spec), so a huge batch or input size fails with the same MemoryError.
HGBENCH_FAKE_THREADS=torch=4 makes runtime_info report 4 intra-op threads for torch (default 1).
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from impls.base import AbstractHourglassModel
from impls.config import HourglassConfig
from impls.data_parallel import check_data_parallel_args, shardwise_reference
from impls.registry import DATA_PARALLEL_EXECUTIONS, IMPLS
from impls.spec import conv_probe_arrays, gemm_probe_arrays, init_weights, random_batch, trainable_names

EXECUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("eager", "compile"),
    "tensorflow": ("eager", "function", "xla"),
    "jax": ("jit",),
}


def _faults(framework: str, execution: str = "*", phase: str = "*") -> set[str]:
    """Fault kinds whose selector matches this framework/execution/phase."""
    kinds = set()
    for item in filter(None, os.environ.get("HGBENCH_FAKE_FAULTS", "").split(",")):
        kind, _, selector = item.partition("@")
        pattern = selector if "/" in selector else f"{selector}/*/*"
        if fnmatch.fnmatch(f"{framework}/{execution}/{phase}", pattern):
            kinds.add(kind)
    return kinds


def _work(size: int) -> None:
    """A little real compute so timings are not zero."""
    a = np.ones((size, size), dtype=np.float32)
    a @ a


class FakeModel(AbstractHourglassModel):
    """Heatmaps from a cheap deterministic function of the weights and the input."""

    def __init__(
        self,
        framework: str,
        config: HourglassConfig,
        weights: dict[str, np.ndarray],
        *,
        device: str,
        precision: str,
        execution: str,
        impl: str = "idiomatic",
    ) -> None:
        self.framework, self.config, self.weights = framework, config, weights
        self.device, self.precision, self.execution, self.impl = device, precision, execution, impl

    def num_params(self) -> int:
        return sum(w.size for w in self.weights.values())

    def predict(self, x: np.ndarray, train_mode: bool = False) -> np.ndarray:
        n, h, w, _ = x.shape
        pooled = x.reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4, 5))  # (N, H/4, W/4)
        stacks = []
        for s in range(self.config.num_stacks):
            gain = self.weights[f"head_{s}.heatmap_conv.kernel"].sum(axis=(0, 1, 2))  # (K,)
            stacks.append(pooled[..., None] * gain)
        out = np.stack(stacks).astype(np.float32)  # (S, N, H/4, W/4, K)
        return out * 1.1 if "disagree" in _faults(self.framework, self.execution) else out

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """A deterministic stand-in: every trainable parameter's gradient is the parameter times a function of
        the inputs, in float64 for fp64 (as the real contract says)."""
        dtype = np.float64 if self.precision == "fp64" else np.float32
        scale = float(np.mean(np.asarray(x, np.float64) * 0.5) + np.mean(np.asarray(target, np.float64) ** 2))
        if "graddisagree" in _faults(self.framework, self.execution):
            scale *= 1 + 1e-6
        grads = {name: (self.weights[name].astype(np.float64) * scale).astype(dtype) for name in trainable_names(self.config)}
        return scale, grads

    def export_weights(self) -> dict[str, np.ndarray]:
        return dict(self.weights)

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        kinds = _faults(self.framework, self.execution, phase)
        if "error" in kinds:
            raise ValueError(f"fake setup failure for {self.framework}/{self.execution}/{phase}")
        size = 48 if phase == "forward" else 64
        calls = [0]
        random_batch(self.config, batch_size, seed)  # allocated as a real step does: a huge batch fails here

        def step() -> None:
            calls[0] += 1
            if calls[0] == 1:
                _inject(kinds)
            if "slow" in kinds:
                time.sleep(0.02)
            _work(size)

        return step

    def peak_memory_bytes(self) -> int | None:
        return 1 << 20 if self.device == "gpu" else None


def _inject(kinds: set[str]) -> None:
    """The faults that strike at the first step (of a benchmark step or of profile())."""
    if "crash" in kinds:
        os.abort()
    if "sigkill" in kinds:
        os.kill(os.getpid(), signal.SIGKILL)
    if "exit" in kinds:
        os._exit(3)
    if "oom" in kinds:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    if "hang" in kinds:
        time.sleep(3600)


def _fake_profile(framework: str) -> Callable[..., dict]:
    """A profile() honouring impls/profiling.py: each stage is a little timed numpy work, with a Chrome trace."""
    from impls import PHASES, count_flops
    from impls.profiling import op_table, stage_names, time_staged

    def profile(config: HourglassConfig, *, phase: str, batch_size: int, execution: str, trace_dir: str,
                device: str = "cpu", precision: str = "fp32", warmup: int = 2, steps: int = 5, seed: int = 0,
                top_k: int = 25, impl: str = "idiomatic") -> dict:  # fmt: skip
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if execution not in EXECUTIONS[framework]:
            raise ValueError(f"{framework} has no execution {execution!r}")
        kinds = _faults(framework, execution, phase)
        if "error" in kinds:
            raise ValueError(f"fake profile failure for {framework}/{execution}/{phase}")
        _inject(kinds)
        names = stage_names(config) + (["loss"] if phase == "forward_backward" else [])
        sizes = {name: 24 + 8 * (index % 3) for index, name in enumerate(names)}
        calls = [(name, lambda state, n=sizes[name]: (_work(n), state)[1]) for name in names]
        t0 = time.perf_counter_ns()
        for _, call in calls:
            call(None)
        first_call_ms = (time.perf_counter_ns() - t0) / 1e6
        stage_ms, stage_step_ms = time_staged(calls, None, lambda state: None, warmup=warmup, steps=steps)
        fused = []
        for _ in range(steps):  # the ordinary step: the same work with no clock between stages
            t0 = time.perf_counter_ns()
            for _, call in calls:
                call(None)
            fused.append((time.perf_counter_ns() - t0) / 1e6)
        if "badprofile" in kinds:
            stage_step_ms = sum(stage_ms.values()) / 2
        events = [{"op": f"fake::matmul{sizes[name]}", "total_ms": ms * steps, "self_ms": ms * steps}
                  for name, ms in stage_ms.items()]  # fmt: skip
        trace = {"displayTimeUnit": "ms", "traceEvents": [
            {"name": name, "ph": "X", "ts": 0, "dur": ms * 1e3, "pid": 0, "tid": 0} for name, ms in stage_ms.items()
        ]}  # fmt: skip
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        (Path(trace_dir) / "fake.trace.json").write_text(json.dumps(trace))
        return {
            "framework": framework, "execution": execution, "impl": impl, "phase": phase, "batch_size": batch_size,
            "precision": precision, "device": device, "step_ms": sorted(fused)[(len(fused) - 1) // 2],
            "stage_method": "profiler" if execution == "eager" else "staged", "stage_step_ms": stage_step_ms,
            "stage_note": "fake backend: numpy work per stage, timed with impls.profiling.time_staged",
            "stages": [{"stage": name, "ms": ms} for name, ms in stage_ms.items()],
            "ops": op_table(events, steps, top_k), "op_step_ms": stage_step_ms, "trace_files": ["fake.trace.json"],
            "flops": {"source": "fake: the analytic count", "conv_flops": count_flops(config, batch_size, phase),
                      "total_flops": None, "note": ""},
            "compile": {"first_call_ms": first_call_ms, "trace_compile_ms": None if execution == "eager" else first_call_ms,
                        "recompilations_in_timed_loop": 2 if "recompile" in kinds else 0, "program_size": None,
                        "program_size_unit": "", "note": "fake"},
        }  # fmt: skip

    return profile


def load(framework: str) -> SimpleNamespace:
    """An impls-module look-alike for `framework`."""

    def build(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, device: str = "cpu",
              precision: str = "fp32", execution: str = EXECUTIONS[framework][0], impl: str = "idiomatic",
              **options: object) -> FakeModel:  # fmt: skip
        if impl not in IMPLS[framework]:
            raise ValueError(f"unknown impl {impl!r} for {framework}; choose one of: {', '.join(IMPLS[framework])}")
        weights = weights if weights is not None else init_weights(config)
        return FakeModel(framework, config, weights, device=device, precision=precision, execution=execution,
                         impl=impl)

    def runtime_info() -> dict[str, object]:
        threads = dict(item.split("=") for item in filter(None, os.environ.get("HGBENCH_FAKE_THREADS", "").split(",")))
        return {"framework": framework, "version": "0-fake", "devices": ["cpu:0"], "gpu_available": False,
                "intra_op_threads": int(threads.get(framework, 1)), "inter_op_threads": 1}  # fmt: skip

    def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                       precision: str = "fp32", seed: int = 0) -> Callable[[], None]:  # fmt: skip
        x, kernel = conv_probe_arrays(input_shape, c_out, kernel_size, seed)
        return lambda: (x, kernel, _work(32))[2]

    def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32",
                       seed: int = 0) -> Callable[[], None]:  # fmt: skip
        a, b = gemm_probe_arrays(m, k, n, seed)
        return lambda: (a, b, _work(24))[2]

    module = SimpleNamespace(
        __name__=f"tests.fake_backend[{framework}]",
        FRAMEWORK=framework,
        EXECUTIONS=EXECUTIONS[framework],
        IMPLS=IMPLS[framework],
        PRECISIONS=("fp32", "bf16", "fp64"),
        build=build,
        runtime_info=runtime_info,
        gpu_available=lambda: False,
    )
    if "noconv" not in _faults(framework):
        module.conv_benchmark = conv_benchmark
        module.gemm_benchmark = gemm_benchmark
    if "noprofile" not in _faults(framework):
        module.profile = _fake_profile(framework)
    return module


class FakeDataParallel:
    """A data-parallel look-alike over a FakeModel: the reference's own arithmetic, so it agrees unless told not to."""

    def __init__(self, single: FakeModel, devices: int) -> None:
        self.single, self.devices = single, devices

    def num_params(self) -> int:
        return self.single.num_params()

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        loss, grads = shardwise_reference(self.single, x, target, self.devices)
        if "dpdisagree" in _faults(self.single.framework, self.single.execution):
            grads = {name: g * (1 + 1e-6) for name, g in grads.items()}
        return loss, grads

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        check_data_parallel_args(self.devices, phase, batch_size)
        return self.single.benchmark_step(phase, batch_size, seed)

    def close(self) -> None:
        pass


def load_data_parallel(framework: str) -> SimpleNamespace:
    """An impls/<framework>_data_parallel.py look-alike."""

    def build_data_parallel(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, devices: int,
                            device: str = "cpu", precision: str = "fp32",
                            execution: str = DATA_PARALLEL_EXECUTIONS[framework][0],
                            impl: str = "idiomatic") -> FakeDataParallel:  # fmt: skip
        single = load(framework).build(config, weights, device=device, precision=precision, execution=execution, impl=impl)
        return FakeDataParallel(single, devices)

    return SimpleNamespace(
        FRAMEWORK=framework,
        EXECUTIONS=DATA_PARALLEL_EXECUTIONS[framework],
        configure_devices=lambda devices, device: None,
        available_devices=lambda device: os.cpu_count() or 1,
        build_data_parallel=build_data_parallel,
    )
