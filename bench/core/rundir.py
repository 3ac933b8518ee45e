"""Results on disk: results/<run_id>/{summary.csv, samples.csv, run.json, logs/}, every write atomic.

Rows are rewritten as each cell finishes (temp file + os.replace), so an interrupted run keeps every
finished cell and `--resume` knows which are done. CSVs are read back as text and written back unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.files import atomic_write, read_json, write_json_atomic

CELL_COLUMNS = ["cell_id", "kind", "framework", "execution", "precision", "batch_size", "phase"]
CONFIG_COLUMNS = ["preset", "num_stacks", "depth", "channels", "num_keypoints", "input_height", "input_width"]
SUMMARY_COLUMNS = [
    *CELL_COLUMNS,
    "device",
    "status",
    "error",
    "n_samples",
    "latency_ms_median",
    "latency_ms_mean",
    "latency_ms_std",
    "latency_ms_min",
    "latency_ms_p5",
    "latency_ms_p95",
    "latency_ms_iqr",
    "latency_ms_median_ci95_low",
    "latency_ms_median_ci95_high",
    "noisy",
    "first_call_ms",
    "throughput_img_per_s",
    "gflop_per_step",
    "achieved_gflop_per_s",
    "conv_ceiling_gflop_per_s",
    "ceiling_fraction",
    "framework_ceiling_gflop_per_s",
    "framework_ceiling_fraction",
    "num_params",
    "injected_slowdown",
    "equivalence_max_rel_err",
    "equivalent",
    "gpu_allocator_peak_bytes",
    "nvml_process_used_bytes",
    "nvml_device_used_bytes",
    "host_peak_rss_bytes",
    "warmup_calls",
    "import_s",
    "build_s",
    "setup_s",
    "worker_wall_s",
    *CONFIG_COLUMNS,
]
SAMPLE_COLUMNS = [*CELL_COLUMNS, "iteration", "latency_ns"]
FINAL_STATUSES = ("ok", "failed", "skipped", "timeout", "oom")


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    """CSV without the index, atomically; missing values are empty fields, not zero."""
    atomic_write(Path(path), lambda handle: frame.to_csv(handle, index=False))


def _read_text_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=columns, dtype=str)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def load_summary(path: Path) -> pd.DataFrame:
    """summary.csv with numbers parsed (for tables and reports); empty fields are NaN."""
    frame = pd.read_csv(path)
    for column in SUMMARY_COLUMNS:
        if column not in frame:
            frame[column] = math.nan
    return frame


class RunStore:
    """One run directory: the rows and samples so far, rewritten atomically after every cell."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.summary_path = self.run_dir / "summary.csv"
        self.samples_path = self.run_dir / "samples.csv"
        self.run_json_path = self.run_dir / "run.json"
        self.logs_dir = self.run_dir / "logs"
        self._summary = _read_text_csv(self.summary_path, SUMMARY_COLUMNS)
        self._samples = _read_text_csv(self.samples_path, SAMPLE_COLUMNS)

    def done_cell_ids(self) -> set[str]:
        """Cells that already have a row with a final status."""
        if self._summary.empty:
            return set()
        return set(self._summary.loc[self._summary["status"].isin(FINAL_STATUSES), "cell_id"])

    def rows(self) -> list[dict[str, Any]]:
        """Every row so far (as text for resumed rows, as values for new ones)."""
        return self._summary.to_dict("records")

    def add(self, row: Mapping[str, Any], samples_ns: Iterable[int] = ()) -> None:
        """Add or replace a cell's row and samples, then rewrite both CSVs atomically."""
        cell_id = row["cell_id"]
        new_row = pd.DataFrame([{column: row.get(column) for column in SUMMARY_COLUMNS}], columns=SUMMARY_COLUMNS)
        kept = self._summary[self._summary["cell_id"] != cell_id] if not self._summary.empty else None
        self._summary = new_row if kept is None or kept.empty else pd.concat([kept, new_row], ignore_index=True)
        samples = [
            {**{c: row.get(c) for c in CELL_COLUMNS}, "iteration": i, "latency_ns": ns}
            for i, ns in enumerate(samples_ns)
        ]
        if samples or not self._samples.empty:
            kept_samples = self._samples[self._samples["cell_id"] != cell_id] if not self._samples.empty else None
            new_samples = pd.DataFrame(samples, columns=SAMPLE_COLUMNS)
            parts = [part for part in (kept_samples, new_samples) if part is not None and not part.empty]
            self._samples = pd.concat(parts, ignore_index=True) if parts else new_samples
        write_csv_atomic(self.samples_path, self._samples)
        write_csv_atomic(self.summary_path, self._summary)

    def write_run_json(self, record: Mapping[str, Any]) -> None:
        """run.json, atomically."""
        write_json_atomic(self.run_json_path, record)

    def read_run_json(self) -> dict[str, Any]:
        """run.json as written."""
        return read_json(self.run_json_path)
