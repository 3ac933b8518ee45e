"""The coverage experiment counts, per cell, how often a run's median falls in the previous run's interval."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.core.rundir import RunStore
from bench.experiments import coverage


def _run(root: Path, name: str, median: float, low: float, high: float) -> Path:
    store = RunStore(root / "runs" / name)
    row = {"cell_id": "torch-eager-fp32-b1-forward", "kind": "model", "framework": "torch", "execution": "eager",
           "precision": "fp32", "batch_size": 1, "phase": "forward", "status": "ok", "latency_ms_median": median,
           "latency_ms_median_ci95_low": low, "latency_ms_median_ci95_high": high}  # fmt: skip
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
