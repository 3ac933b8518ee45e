"""Results on disk: atomic rewrites, replaced rows, resumed text kept as written, empty not zero."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bench.core.columns import SUMMARY_COLUMNS
from bench.core.files import write_json_atomic
from bench.core.rundir import RunStore

ROW = {"cell_id": "torch-eager-fp32-b1-forward", "kind": "model", "framework": "torch", "execution": "eager",
       "precision": "fp32", "batch_size": 1, "phase": "forward", "status": "ok", "latency_ms_median": 1.25}  # fmt: skip


def test_run_store_writes_rows_and_samples_without_temp_files(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.add(ROW, [1_000_000, 1_500_000])
    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(table.columns) == SUMMARY_COLUMNS and len(table) == 1
    assert math.isnan(table.loc[0, "gpu_allocator_peak_bytes"])  # not measured: empty, not zero
    assert pd.read_csv(tmp_path / "samples.csv")["latency_ns"].tolist() == [1_000_000, 1_500_000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.csv", "summary.csv"]


def test_run_store_replaces_a_cell_and_its_samples(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.add(ROW, [1, 2, 3])
    store.add({**ROW, "latency_ms_median": 2.5}, [7])
    assert pd.read_csv(tmp_path / "summary.csv")["latency_ms_median"].tolist() == [2.5]
    assert pd.read_csv(tmp_path / "samples.csv")["latency_ns"].tolist() == [7]


def test_run_store_reopened_keeps_finished_rows_byte_for_byte(tmp_path: Path) -> None:
    RunStore(tmp_path).add({**ROW, "latency_ms_median": 0.1 + 0.2, "host_peak_rss_bytes": 123456789}, [5])
    before = (tmp_path / "summary.csv").read_text()
    reopened = RunStore(tmp_path)
    assert reopened.done_cell_ids() == {ROW["cell_id"]}
    reopened.add({**ROW, "cell_id": "jax-jit-fp32-b1-forward", "framework": "jax", "execution": "jit"}, [6])
    after = (tmp_path / "summary.csv").read_text().splitlines()
    assert after[:2] == before.splitlines()


def test_write_json_atomic_writes_nan_as_null(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "run.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}})
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
