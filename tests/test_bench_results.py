"""Results on disk: atomic rewrites, replaced rows, resumed text kept as written, empty not zero."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from bench.core.columns import SUMMARY_COLUMNS
from bench.core.files import write_json_atomic
from bench.core.rundir import RunDirError, RunStore, read_run

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


# ---------------------------------------------------------------- the validated reader


def _written_run(tmp_path: Path) -> Path:
    store = RunStore(tmp_path / "run")
    row = {"cell_id": "torch-eager-fp32-b1-forward", "kind": "model", "framework": "torch", "execution": "eager",
           "precision": "fp32", "batch_size": 1, "phase": "forward", "status": "ok", "latency_ms_median": 2.0}  # fmt: skip
    store.add(row, [2_000_000, 2_100_000])
    store.write_run_json({"run_id": "run", "status": "complete", "settings": {"config": {"depth": 2}}})
    return store.run_dir


def test_read_run_reads_what_run_store_wrote(tmp_path: Path) -> None:
    run = read_run(_written_run(tmp_path))
    assert run.summary.loc[0, "latency_ms_median"] == 2.0
    assert list(run.samples_ms("torch-eager-fp32-b1-forward")) == [2.0, 2.1]


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("summary.csv", lambda t: t[: t.rindex(",") + 1], "ends mid-line: the file was cut short"),
        ("summary.csv", lambda t: t.rstrip("\n").rsplit(",", 3)[0] + "\n", r"line 2 has \d+ fields where the header has"),
        ("summary.csv", lambda t: t.replace(",2.0,", ",inf,"), "column latency_ms_median holds 'inf'"),
        ("summary.csv", lambda t: t + t.splitlines()[1] + "\n", "line 3 repeats cell_id=torch-eager-fp32-b1-forward"),
        ("summary.csv", lambda t: t.replace("cell_id,", "cell_id,bogus,", 1).replace("\ntorch", "\nx,torch"),
         "column\\(s\\) this version does not know: bogus"),
        ("samples.csv", lambda t: t + t.splitlines()[1] + "\n", "repeats cell_id=torch-eager-fp32-b1-forward, round=1, iteration=0"),
        ("run.json", lambda t: t[: len(t) // 2], "is not valid JSON"),
    ],
    ids=["truncated", "missing_fields", "inf_latency", "duplicate_cell", "extra_column", "duplicate_sample", "cut_json"],
)
def test_read_run_names_the_damage_never_skips_it(tmp_path: Path, file: str, damage, message: str) -> None:
    run_dir = _written_run(tmp_path)
    path = run_dir / file
    path.write_text(damage(path.read_text()))
    with pytest.raises(RunDirError, match=message) as info:
        read_run(run_dir)
    assert str(path) in str(info.value) or file == "run.json"


def test_result_files_get_the_umask_permissions_not_0600(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        run_dir = _written_run(tmp_path)
    finally:
        os.umask(old)
    for name in ("summary.csv", "samples.csv", "run.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name
