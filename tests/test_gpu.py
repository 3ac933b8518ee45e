"""GPU paths, each against the CPU or against the GPU's own clock: gradients and train-mode BN, compiled
modes, bf16, TF32 pinning, the step's synchronisation, and the memory and NVML figures of a real cell.

Every test needs a GPU the framework can see: skipped without one, a failure with HGBENCH_REQUIRE_GPU=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import impls
from tests.conftest import SMALL_CONFIGS, Draw, assert_close, assert_grads_close, require_gpu

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu


def _both(backend, execution: str | None = None, precision: str = "fp32"):
    """The same weights built on the CPU (fp32) and on the GPU in IEEE fp32 (TF32 would blur the comparison)."""
    require_gpu(backend)
    backend.configure_math("ieee")
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=11)
    options = {} if execution is None else {"execution": execution}
    cpu = backend.build(config, weights=weights)
    gpu = backend.build(config, weights=weights, device="gpu", precision=precision, **options)
    return config, cpu, gpu


def test_gpu_gradients_and_train_mode_bn_match_cpu(backend, draw: Draw) -> None:
    config, cpu, gpu = _both(backend)
    x, target = draw.inputs(config)
    loss_cpu, grads_cpu = cpu.loss_and_grads(x, target)
    loss_gpu, grads_gpu = gpu.loss_and_grads(x, target)
    assert abs(loss_gpu - loss_cpu) <= 1e-4 * abs(loss_cpu), (loss_gpu, loss_cpu)
    assert_grads_close(grads_gpu, grads_cpu, 1e-3, f"{backend.FRAMEWORK} gpu vs cpu gradients (seed {draw.seed})")
    assert_close(gpu.predict(x, train_mode=True), cpu.predict(x, train_mode=True), 1e-4, "train-mode BN heatmaps")


def test_gpu_compiled_modes_match_cpu(backend, draw: Draw) -> None:
    require_gpu(backend)
    # The compiled modes (torch compile, tf function and xla); JAX's one mode, jit, is the default itself.
    for execution in backend.EXECUTIONS[1:] or backend.EXECUTIONS:
        config, cpu, gpu = _both(backend, execution)
        x, _ = draw.inputs(config)
        assert_close(gpu.predict(x), cpu.predict(x), 1e-4, f"{backend.FRAMEWORK} {execution} gpu vs cpu")


def test_gpu_bf16_stays_near_fp32(backend, draw: Draw) -> None:
    config, cpu, gpu = _both(backend, precision="bf16")
    x, _ = draw.inputs(config)
    assert_close(gpu.predict(x), cpu.predict(x), 5e-2, f"{backend.FRAMEWORK} bf16 gpu vs fp32 cpu")


def test_gpu_tf32_is_pinned_off_and_on(backend, draw: Draw) -> None:
    """IEEE math on the GPU agrees with the CPU far better than TF32's 10-bit mantissa allows."""
    config, cpu, gpu = _both(backend)
    x, _ = draw.inputs(config)
    want = cpu.predict(x)
    ieee_err = float(np.linalg.norm(gpu.predict(x) - want) / np.linalg.norm(want))
    settings = backend.configure_math("tf32")
    try:
        assert settings["fp32_math"] == "tf32"
    finally:
        backend.configure_math("ieee")
    assert ieee_err < 1e-4, ieee_err


def test_gpu_step_ends_synchronised(backend) -> None:
    """Wall time of one step against the same steps timed back to back: a step that returned before the
    device finished would make the loop's mean far shorter than a single synchronised step."""
    _, _, gpu = _both(backend)
    step = gpu.benchmark_step("forward_backward", 8, seed=0)
    for _ in range(3):
        step()
    singles = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        singles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    loop_mean = (time.perf_counter() - t0) / 10
    assert loop_mean >= 0.5 * float(np.median(singles)), (loop_mean, singles)


def test_gpu_torch_step_agrees_with_cuda_events() -> None:
    if not impls.is_installed("torch"):
        pytest.skip("torch is not installed")
    backend = impls.load("torch")
    _, _, gpu = _both(backend)
    torch = backend.torch
    step = gpu.benchmark_step("forward_backward", 8, seed=0)
    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    walls, events = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        end.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        events.append(start.elapsed_time(end))
    # The wall clock includes the host's launch time, so it is at least the device time and close to it.
    assert float(np.median(walls)) >= 0.95 * float(np.median(events)), (walls, events)
    assert float(np.median(walls)) <= 1.5 * float(np.median(events)) + 1.0, (walls, events)


@pytest.mark.slow
def test_gpu_cell_fills_the_memory_and_nvml_columns(tmp_path: Path, backend) -> None:
    require_gpu(backend)
    args = [sys.executable, "-m", "bench", "run", "--preset", "tiny", "--framework", backend.FRAMEWORK, "--device", "gpu",
            "--execution", "default", "--phase", "forward_backward", "--batch-size", "4", "--iters", "5",
            "--warmup", "2", "--out", str(tmp_path), "--no-report"]  # fmt: skip
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    rows = pd.read_csv(run_dir / "summary.csv")
    model = rows[rows["kind"] == "model"].iloc[0]
    assert model["device"] == "gpu" and model["fp32_math"] == "ieee"
    assert model["gpu_allocator_peak_bytes"] > 0 and model["gpu_allocator_setup_peak_bytes"] > 0
    if backend.FRAMEWORK == "jax":
        assert pd.isna(model["gpu_allocator_timed_peak_bytes"]) and model["compiled_temp_bytes"] > 0
    else:
        assert 0 < model["gpu_allocator_timed_peak_bytes"] <= model["gpu_allocator_peak_bytes"]
    assert model["nvml_process_lookup"] in ("pid", "device_minus_baseline"), model["nvml_process_lookup"]
    assert model["nvml_process_used_bytes"] > 0 and model["nvml_device_used_bytes"] > 0
