"""A framework-free stand-in for an impls module, for fast tests of the runner (numpy only).

Selected with HGBENCH_BACKEND_OVERRIDE=tests.fake_backend (read only by bench/worker.py): the worker then
calls `load(framework)` here instead of `impls.load(framework)`. Faults are injected with
HGBENCH_FAKE_FAULTS, a comma list of KIND@SELECTOR; SELECTOR is a framework ("jax") or an fnmatch pattern
over "framework/execution/phase" ("torch/*/forward_backward"). Kinds:

    crash     the process aborts (SIGABRT) in the first step
    exit      the process exits with code 3 in the first step
    oom       a CUDA-style out-of-memory RuntimeError in the first step
    hang      the first step never returns
    slow      every step sleeps 20 ms
    error     benchmark_step() raises ValueError (a Python exception while setting up)
    disagree  predict() returns heatmaps 10% off
    noconv    the module has no conv_benchmark
HGBENCH_FAKE_THREADS=torch=4 makes runtime_info report 4 intra-op threads for torch (default 1).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

from impls.base import AbstractHourglassModel
from impls.config import HourglassConfig
from impls.spec import init_weights

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
    ) -> None:
        self.framework, self.config, self.weights = framework, config, weights
        self.device, self.precision, self.execution = device, precision, execution

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
        return 0.0, {name: np.zeros_like(w) for name, w in self.weights.items()}

    def export_weights(self) -> dict[str, np.ndarray]:
        return dict(self.weights)

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        kinds = _faults(self.framework, self.execution, phase)
        if "error" in kinds:
            raise ValueError(f"fake setup failure for {self.framework}/{self.execution}/{phase}")
        size = 48 if phase == "forward" else 64
        calls = [0]

        def step() -> None:
            calls[0] += 1
            if calls[0] == 1:
                if "crash" in kinds:
                    os.abort()
                if "exit" in kinds:
                    os._exit(3)
                if "oom" in kinds:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
                if "hang" in kinds:
                    time.sleep(3600)
            if "slow" in kinds:
                time.sleep(0.02)
            _work(size)

        return step

    def peak_memory_bytes(self) -> int | None:
        return 1 << 20 if self.device == "gpu" else None


def load(framework: str) -> SimpleNamespace:
    """An impls-module look-alike for `framework`."""

    def build(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, device: str = "cpu",
              precision: str = "fp32", execution: str = EXECUTIONS[framework][0], **options: object) -> FakeModel:  # fmt: skip
        weights = weights if weights is not None else init_weights(config)
        return FakeModel(framework, config, weights, device=device, precision=precision, execution=execution)

    def runtime_info() -> dict[str, object]:
        threads = dict(item.split("=") for item in filter(None, os.environ.get("HGBENCH_FAKE_THREADS", "").split(",")))
        return {"framework": framework, "version": "0-fake", "devices": ["cpu:0"], "gpu_available": False,
                "intra_op_threads": int(threads.get(framework, 1)), "inter_op_threads": 1}  # fmt: skip

    def conv_benchmark(input_shape: tuple[int, int, int, int], c_out: int, *, kernel_size: int = 3, device: str = "cpu",
                       precision: str = "fp32", seed: int = 0) -> Callable[[], None]:  # fmt: skip
        return lambda: _work(32)

    def gemm_benchmark(m: int, k: int, n: int, *, device: str = "cpu", precision: str = "fp32",
                       seed: int = 0) -> Callable[[], None]:  # fmt: skip
        return lambda: _work(24)

    module = SimpleNamespace(
        __name__=f"tests.fake_backend[{framework}]",
        FRAMEWORK=framework,
        EXECUTIONS=EXECUTIONS[framework],
        PRECISIONS=("fp32", "bf16"),
        build=build,
        runtime_info=runtime_info,
        gpu_available=lambda: False,
    )
    if "noconv" not in _faults(framework):
        module.conv_benchmark = conv_benchmark
        module.gemm_benchmark = gemm_benchmark
    return module
