"""The runner with real frameworks: real parent and worker processes on the tiny preset.

Every installed framework whose implementation exists takes part; the others are left out cleanly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.core.settings import EXECUTIONS
from impls import FRAMEWORKS, is_installed, load

REPO_ROOT = Path(__file__).resolve().parent.parent
AVAILABLE = [fw for fw in FRAMEWORKS if is_installed(fw) and (REPO_ROOT / "impls" / f"{fw}_hourglass.py").exists()]


@pytest.mark.parametrize("framework", AVAILABLE)
def test_impls_modules_take_their_executions_from_the_registry(framework: str) -> None:
    """The runner plans cells from impls.registry.EXECUTIONS without importing a framework; the module
    that runs them must offer exactly those modes."""
    assert load(framework).EXECUTIONS == EXECUTIONS[framework]


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason="no framework with an implementation is installed")
def test_runner_real_frameworks_measure_tiny_end_to_end(tmp_path: Path) -> None:
    args = ["--preset", "tiny", "--iters", "3", "--warmup", "1", "--phase", "forward", "--execution", "default"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", "run", *args, "--framework", ",".join(AVAILABLE), "--out", str(tmp_path)],
        check=False,
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (run_dir,) = list(tmp_path.iterdir())
    rows = pd.read_csv(run_dir / "summary.csv").set_index("cell_id")
    errors = rows.loc[rows["status"] != "ok", "error"].to_dict()
    model = rows[rows["kind"] == "model"]
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{errors}"
    assert sorted(set(model["framework"])) == sorted(AVAILABLE)
    # The default run's variants: each framework's tuned one where its fastest mode is the default execution
    # (torch eager, JAX jit; TensorFlow's default execution here is eager, which its tuned variant skips).
    tuned = set(model[model["impl"] == "tuned"]["framework"])
    assert tuned == set(AVAILABLE) & {"torch", "jax"}
    assert (model["status"] == "ok").all() and (model["n_samples"] == 3).all()
    assert (model["latency_ms_median"] > 0).all() and (model["first_call_ms"] > 0).all()
    assert (model["achieved_gflop_per_s"] > 0).all() and (model["host_peak_rss_bytes"] > 0).all()
    record = json.loads((run_dir / "run.json").read_text())
    assert set(record["frameworks"]) == set(AVAILABLE)
    assert all(info.get("version") for info in record["frameworks"].values())
    if len(AVAILABLE) > 1:
        verdicts = record["equivalence"]["frameworks"]
        assert all(v["equivalent"] and v["max_rel_err"] < 1e-4 for v in verdicts.values()), verdicts
        gradients = record["gradient_check"]["frameworks"]  # one fp64 train step, compared per parameter
        assert all(v["equivalent"] and v["max_rel_err"] < 1e-10 for v in gradients.values()), gradients
        assert model["gradients_equivalent"].all()
    samples = pd.read_csv(run_dir / "samples.csv")
    assert (samples[samples["kind"] == "model"].groupby("cell_id").size() == 3).all()
    # Memory columns: XLA's plan of the compiled step for JAX; the CPU has no allocator peak, so those stay empty.
    if "jax" in AVAILABLE:
        jax_row = model[model["framework"] == "jax"].iloc[0]
        assert jax_row["compiled_temp_bytes"] > 0 and jax_row["compiled_argument_bytes"] > 0
    assert model["gpu_allocator_timed_peak_bytes"].isna().all() and model["gpu_allocator_setup_peak_bytes"].isna().all()
    assert set(model["fp32_math"]) == {"ieee"} and not model["device_fallback"].astype(bool).any()
