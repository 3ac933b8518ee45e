"""The coverage experiment counts, per cell, how often a run's median falls in the previous run's interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.core.rundir import RunStore
from bench.experiments import coverage


def _run(root: Path, name: str, median: float, low: float, high: float) -> Path:
    store = RunStore(root / "runs" / name)
    row = {"cell_id": "torch-eager-fp32-b1-forward", "kind": "model", "framework": "torch", "execution": "eager",
           "precision": "fp32", "batch_size": 1, "phase": "forward", "status": "ok", "latency_ms_median": median,
           "latency_ms_median_ci95_low": low, "latency_ms_median_ci95_high": high, "num_params": 1000}  # fmt: skip
    store.add(row, [int(median * 1e6)] * 3)
    store.write_run_json({"run_id": name, "status": "complete", "settings": {"config": {}}})
    return store.run_dir


def test_coverage_counts_medians_inside_the_previous_interval(tmp_path: Path, capsys) -> None:
    # rounds=1: narrow intervals that the next run misses; rounds=3: wide ones that hold it.
    for index, (median, half) in enumerate([(10.0, 0.1), (11.0, 0.1), (10.05, 0.1)]):
        _run(tmp_path, f"r1-{index:02d}", median, median - half, median + half)
    for index, (median, half) in enumerate([(10.0, 1.2), (11.0, 1.2), (10.05, 1.2)]):
        _run(tmp_path, f"r3-{index:02d}", median, median - half, median + half)
    argv = ["--out", str(tmp_path), "--runs", "3", "--rounds", "1,3", "--judge-only"]
    assert coverage.main(argv) == 0
    table = pd.read_csv(tmp_path / "summary.csv")
    overall = table[table["cell_id"] == "all"].set_index("rounds")
    assert overall.loc[1, "coverage"] == 0.0 and overall.loc[3, "coverage"] == 1.0
    assert overall.loc[1, "pairs"] == 2
    assert "coverage" in capsys.readouterr().out


def test_round_intervals_are_student_t_over_the_log_round_medians() -> None:
    # medians 1, 2, 4 ms: logs 0, ln 2, 2 ln 2: mean ln 2, sd ln 2, t(0.975, 2 df) = 4.302653
    got = coverage.round_intervals(np.array([1.0, 2.0, 4.0]))
    assert got["t_low"] == pytest.approx(2 * np.exp(-4.302653 * np.log(2) / np.sqrt(3)), rel=1e-6)
    assert got["t_high"] == pytest.approx(2 * np.exp(4.302653 * np.log(2) / np.sqrt(3)), rel=1e-6)
    assert got["prediction_high"] == pytest.approx(2 * np.exp(4.302653 * np.log(2) * np.sqrt(2 / 3)), rel=1e-6)
    assert coverage.round_intervals(np.array([5.0])) == {}  # one round: the process level is unknown


def test_coverage_judges_round_intervals_where_the_previous_run_had_rounds(tmp_path: Path) -> None:
    for index, medians in enumerate([(9.0, 10.0, 11.0), (10.5, 10.5, 10.5), (30.0, 30.0, 30.0)]):
        store = RunStore(tmp_path / "runs" / f"r3-{index:02d}")
        pooled = float(np.median(medians))
        row = {"cell_id": "jax-jit-fp32-b1-forward", "kind": "model", "framework": "jax", "execution": "jit",
               "precision": "fp32", "batch_size": 1, "phase": "forward", "status": "ok", "latency_ms_median": pooled,
               "latency_ms_median_ci95_low": pooled - 0.01, "latency_ms_median_ci95_high": pooled + 0.01,
               "num_params": 1000}  # fmt: skip
        store.add(row, [[int(m * 1e6)] * 3 for m in medians])
        store.write_run_json({"run_id": store.run_dir.name, "status": "complete", "settings": {"config": {}}})
    assert coverage.main(["--out", str(tmp_path), "--runs", "3", "--rounds", "3", "--judge-only"]) == 0
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    # run 0 (9, 10, 11): its t interval (7.8-12.8 on the log scale) holds run 1's 10.5; run 1 has no spread, so nothing holds 30
    assert pairs["covered_t"].tolist() == [True, False] and pairs["covered"].tolist() == [False, False]
    # bench compare of each pair, with its defaults: 10.5 against (9, 10, 11) is within the noise; 30
    # against a steady 10.5 is slower (same code in the experiment, so that would be a false alarm).
    assert pairs["compare_verdict"].tolist() == ["unchanged", "slower"]
    assert pairs["compare_failed"].tolist() == [False, True] and pairs["compare_cell_decides"].all()
    overall = pd.read_csv(tmp_path / "summary.csv").set_index("cell_id").loc["all"]
    assert overall["compare_slower"] == 1 and overall["compare_faster"] == 0
