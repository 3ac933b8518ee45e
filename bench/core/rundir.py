"""The run directory, the one API that writes and reads it: results/<run_id>/{summary.csv, samples.csv,
run.json, logs/} of `bench run`, and {stages,ops,flops,compile}.csv + run.json of `bench profile`.

Writers (`RunStore`, `ProfileStore`) rewrite a CSV atomically after every cell (temp file + os.replace),
so an interrupted run keeps every finished cell and `--resume` knows which are done. Readers
(`read_run`, `read_profile`, `read_record`) validate what they read and raise `RunDirError` naming the
file, the line and the fix: a file cut short, a line with missing or extra fields, a column this version
does not know, text or a non-finite value where a number belongs, an unknown status, a repeated cell.
Nothing damaged is ever skipped silently. Schema: bench.core.columns.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.core import columns as cols
from bench.core.files import atomic_write, write_json_atomic
from impls.registry import DEFAULT_IMPL

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_FIX_RUN = "give a results/<run_id> folder written by `python -m bench run`"
_FIX_PROFILE = "give a results/<run_id>-profile folder written by `python -m bench profile`"


class RunDirError(ValueError):
    """A path that is not a usable run directory, or a damaged file in one; the message names it and the fix."""


# ---------------------------------------------------------------- creating a run directory


def new_run_dir(out_dir: str | Path, suffix: str, run_id: str | None = None) -> Path:
    """OUT/<UTC time>-<suffix>[-n]: sortable, and never reuses an existing directory.

    With `run_id`, OUT/<run_id> exactly (for scripts such as CI that need a fixed path); it must not exist
    yet, so no run is ever overwritten.
    """
    if run_id is not None:
        if not RUN_ID_PATTERN.fullmatch(run_id):
            raise RunDirError(f"--run-id {run_id!r} is not a plain folder name; use letters, digits, '.', '_' or '-' "
                              "(starting with a letter or digit), e.g. --run-id ci-tiny")  # fmt: skip
        path = Path(out_dir).resolve() / run_id
        if path.exists():
            raise RunDirError(f"--run-id {run_id!r}: {path} already exists; choose another id or remove that folder")
        path.mkdir(parents=True)
        return path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = Path(out_dir).resolve() / f"{stamp}-{suffix}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    """CSV without the index, atomically; missing values are empty fields, not zero."""
    atomic_write(Path(path), lambda handle: frame.to_csv(handle, index=False))


# ---------------------------------------------------------------- validated reading


def _read_csv_checked(path: Path, known: Sequence[str], required: Sequence[str], fix: str) -> pd.DataFrame:
    """A CSV this project wrote, as text: every line complete, every column known, the required ones present."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is not a text CSV (not UTF-8); {fix}") from None
    except OSError as err:
        raise RunDirError(f"{path} cannot be read ({err.strerror}); {fix}") from None
    if not text.strip():
        raise RunDirError(f"{path} is empty; re-run the command that wrote it or {fix}")
    if not text.endswith("\n"):
        raise RunDirError(f"{path} ends mid-line: the file was cut short (disk full or a copy interrupted); "
                          f"re-run the command that wrote it (or --resume the run) or {fix}")  # fmt: skip
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    missing = [c for c in required if c not in header]
    if missing:
        raise RunDirError(f"{path} is not an hgbench results file (missing columns {', '.join(missing)}); {fix}")
    unknown = [c for c in header if c not in known]
    if unknown:
        raise RunDirError(f"{path} has column(s) this version does not know: {', '.join(unknown)}; "
                          f"read it with the hgbench version that wrote it, or {fix}")  # fmt: skip
    if len(set(header)) != len(header):
        raise RunDirError(f"{path} repeats a column in its header; {fix}")
    rows = []
    for row in reader:
        if len(row) != len(header):
            raise RunDirError(f"{path} is not a readable CSV (line {reader.line_num} has {len(row)} fields where the "
                              f"header has {len(header)}: the file is damaged); re-run the command that wrote it or {fix}")  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows, columns=header, dtype=object)


def _numbers(path: Path, frame: pd.DataFrame, column: str, fix: str, *, finite: bool = True) -> pd.Series:
    """A column of numbers (empty fields NaN); text, or inf/NaN written out where `finite`, is an error."""
    text = frame[column].astype(str).str.strip()
    parsed = pd.to_numeric(text.replace("", np.nan), errors="coerce")
    bad = parsed.isna() & (text != "")
    if finite:
        bad |= text.ne("") & ~np.isfinite(parsed.fillna(0.0))
    if bad.any():
        index = int(np.flatnonzero(bad.to_numpy())[0])
        raise RunDirError(f"{path} is malformed: column {column} holds {frame[column].iloc[index]!r} (line "
                          f"{index + 2}), not a finite number; the file is damaged or edited: {fix}")  # fmt: skip
    return parsed.astype(np.float64)


def _no_repeats(path: Path, frame: pd.DataFrame, keys: list[str], fix: str) -> None:
    repeated = frame.duplicated(subset=keys, keep="first")
    if repeated.any():
        index = int(np.flatnonzero(repeated.to_numpy())[0])
        values = [frame[k].iloc[index] for k in keys]
        what = ", ".join(f"{k}={int(v) if isinstance(v, float) and v.is_integer() else v}" for k, v in zip(keys, values, strict=True))
        raise RunDirError(f"{path} line {index + 2} repeats {what}; each must appear once: {fix}")


def read_record(run_dir: str | Path, fix: str = _FIX_RUN) -> dict[str, Any]:
    """run.json of a run directory, checked to be a record this version reads (an object with settings.config)."""
    path = Path(run_dir) / cols.RUN_JSON
    if not Path(run_dir).is_dir():
        raise RunDirError(f"run directory {str(run_dir)!r} does not exist (not a run directory); {fix}")
    if not path.is_file():
        raise RunDirError(f"{str(run_dir)!r} is not a run directory (no run.json in it); {fix}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise RunDirError(f"{path} is not an hgbench run record (no settings object); {fix}")
    if not isinstance(record["settings"].get("config"), dict):
        raise RunDirError(f"{path} has no settings.config; {fix}")
    status = record.get("status")
    if status is not None and status not in cols.RUN_STATUSES:
        raise RunDirError(f"{path}: status {status!r} is not one of {', '.join(cols.RUN_STATUSES)}; {fix}")
    return record


@dataclass
class RunData:
    """A `bench run` directory read back and validated: its record, summary rows and samples."""

    label: str  # how figures and tables name the run (its run_id)
    path: Path
    record: dict[str, Any]
    summary: pd.DataFrame  # every row (model and calibration); numbers parsed, empty fields NaN
    samples: pd.DataFrame  # one row per timed iteration; latency_ns as float64

    def samples_ms(self, cell_id: str) -> np.ndarray:
        """One cell's per-iteration latencies in ms, every round's, in round and iteration order."""
        rows = self.samples[self.samples["cell_id"] == cell_id]
        return rows["latency_ns"].to_numpy(dtype=np.float64) / 1e6

    def samples_by_round(self, cell_id: str) -> list[np.ndarray]:
        """One cell's latencies in ms, one array per round (runs written before rounds existed: one round)."""
        rows = self.samples[self.samples["cell_id"] == cell_id]
        if rows.empty:
            return []
        if "round" not in rows or rows["round"].isna().all():
            return [rows["latency_ns"].to_numpy(dtype=np.float64) / 1e6]
        return [group["latency_ns"].to_numpy(dtype=np.float64) / 1e6 for _, group in rows.groupby("round", sort=True)]

    @property
    def status(self) -> str:
        """run.json's status: running, complete or interrupted ("complete" for records that predate it)."""
        return str(self.record.get("status") or "complete")


def _read_summary(path: Path) -> pd.DataFrame:
    frame = _read_csv_checked(path, cols.SUMMARY_COLUMNS, cols.SUMMARY_REQUIRED, _FIX_RUN)
    for column in cols.SUMMARY_COLUMNS:
        if column not in frame:  # runs written before a column existed
            frame[column] = ""
    frame["impl"] = frame["impl"].replace("", DEFAULT_IMPL)  # before variants: the default variant
    for column in cols.SUMMARY_COLUMNS:
        if column not in cols.SUMMARY_TEXT_COLUMNS:
            # Statistics may be inf only where a worker reported one (never in a finished cell's latency).
            frame[column] = _numbers(path, frame, column, _FIX_RUN, finite=column.startswith("latency_ms"))
    frame["devices"] = frame["devices"].fillna(1.0)  # before data parallelism: one device
    frame["per_device_batch"] = frame["per_device_batch"].fillna(frame["batch_size"] / frame["devices"])
    unknown = sorted(set(frame["status"].astype(str)) - set(cols.FINAL_STATUSES))
    if unknown:
        raise RunDirError(f"{path}: unknown status {unknown[0]!r} (expected one of "
                          f"{', '.join(cols.FINAL_STATUSES)}); {_FIX_RUN}")  # fmt: skip
    _no_repeats(path, frame, ["cell_id"], _FIX_RUN)
    frame["error"] = frame["error"].astype(str)
    frame["noisy"] = frame["noisy"].astype(str).str.lower() == "true"
    return frame


def _read_samples(path: Path) -> pd.DataFrame:
    frame = _read_csv_checked(path, cols.SAMPLE_COLUMNS, cols.SAMPLES_REQUIRED, _FIX_RUN)
    latency = pd.to_numeric(frame["latency_ns"].astype(str), errors="coerce")
    bad = latency.isna() | ~np.isfinite(latency.fillna(0.0)) | (latency <= 0)
    if bad.any():
        index = int(np.flatnonzero(bad.to_numpy())[0])
        raise RunDirError(f"{path} line {index + 2}: latency_ns must be positive integers, got "
                          f"{frame['latency_ns'].iloc[index]!r}; {_FIX_RUN}")  # fmt: skip
    frame["latency_ns"] = latency.astype(np.float64)
    keys = ["cell_id"]
    for column in ("round", "iteration"):
        if column in frame:
            frame[column] = _numbers(path, frame, column, _FIX_RUN)
            keys.append(column)
    if "iteration" in frame:
        _no_repeats(path, frame, keys, _FIX_RUN)
    return frame


def read_run(run_dir: str | Path) -> RunData:
    """Read and validate a `bench run` directory; raises RunDirError naming the file, the line and the fix."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{str(path)!r} is not a directory; {_FIX_RUN}")
    if not path.is_dir():
        read_record(path)  # raises, naming the missing folder
    if not (path / cols.SUMMARY_CSV).is_file():
        raise RunDirError(f"{str(path)!r} is not a run directory (no summary.csv in it); {_FIX_RUN}")
    summary = _read_summary(path / cols.SUMMARY_CSV)  # before run.json: a foreign folder is named by its CSV
    record = read_record(path)
    samples_path = path / cols.SAMPLES_CSV
    if samples_path.is_file():
        samples = _read_samples(samples_path)
    elif (summary["status"] == cols.OK).any():
        raise RunDirError(f"{samples_path} is missing but summary.csv has measured cells; {_FIX_RUN}")
    else:  # a run whose every cell failed or was skipped writes none
        samples = pd.DataFrame({c: pd.Series(dtype=object) for c in cols.SAMPLE_COLUMNS})
    return RunData(str(record.get("run_id") or path.name), path, record, summary, samples)


# ---------------------------------------------------------------- writing a run


class RunStore:
    """One run directory being written: the rows and samples so far, rewritten atomically after every cell.

    Rows read back on --resume stay text and are written back unchanged.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.summary_path = self.run_dir / cols.SUMMARY_CSV
        self.samples_path = self.run_dir / cols.SAMPLES_CSV
        self.run_json_path = self.run_dir / cols.RUN_JSON
        self.logs_dir = self.run_dir / cols.LOGS_DIR
        self._summary = self._text(self.summary_path, cols.SUMMARY_COLUMNS)
        self._samples = self._text(self.samples_path, cols.SAMPLE_COLUMNS)

    @classmethod
    def create(cls, run_dir: Path) -> RunStore:
        """A new run directory's store: summary.csv and samples.csv are written at once (header only), so a
        run stopped before its first cell is still a run directory that --resume and compare can read."""
        store = cls(run_dir)
        write_csv_atomic(store.samples_path, store._samples)
        write_csv_atomic(store.summary_path, store._summary)
        return store

    @classmethod
    def reopen(cls, run_dir: Path) -> RunStore:
        """A run directory to complete (--resume): validated first, so a damaged file is an error, not lost rows."""
        read_run(run_dir)
        return cls(run_dir)

    @staticmethod
    def _text(path: Path, columns: list[str]) -> pd.DataFrame:
        if not path.exists():
            return pd.DataFrame(columns=columns, dtype=str)
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    def done_cell_ids(self) -> set[str]:
        """Cells that already have a row with a final status."""
        if self._summary.empty:
            return set()
        return set(self._summary.loc[self._summary["status"].isin(cols.FINAL_STATUSES), "cell_id"])

    def rows(self) -> list[dict[str, Any]]:
        """Every row so far (as text for resumed rows, as values for new ones)."""
        return self._summary.to_dict("records")

    def rounds_of(self, cell_id: str) -> list[list[int]]:
        """The samples (ns) stored for a cell, one list per round in round order (a resumed run's included)."""
        if self._samples.empty:
            return []
        rows = self._samples[self._samples["cell_id"] == cell_id]
        if "round" not in rows:  # a run recorded before rounds existed: one round
            return [[int(v) for v in rows["latency_ns"]]] if not rows.empty else []
        rounds = pd.to_numeric(rows["round"], errors="coerce").fillna(1).astype(int)
        return [[int(v) for v in rows.loc[rounds == r, "latency_ns"]] for r in sorted(set(rounds))]

    def add(self, row: Mapping[str, Any], samples_ns: Iterable[int] | Sequence[Sequence[int]] = ()) -> None:
        """Add or replace a cell's row and samples (one flat list, or one list per round), then rewrite both
        CSVs atomically."""
        cell_id = row["cell_id"]
        columns = cols.SUMMARY_COLUMNS
        new_row = pd.DataFrame([{column: row.get(column) for column in columns}], columns=columns)
        kept = self._summary[self._summary["cell_id"] != cell_id] if not self._summary.empty else None
        self._summary = new_row if kept is None or kept.empty else pd.concat([kept, new_row], ignore_index=True)
        given = list(samples_ns)
        per_round = given if given and isinstance(given[0], (list, tuple)) else [given] if given else []
        key = {c: row.get(c) for c in cols.CELL_COLUMNS}
        samples = [
            {**key, "round": number, "iteration": i, "latency_ns": ns}
            for number, values in enumerate(per_round, start=1)
            for i, ns in enumerate(values)
        ]
        if samples or not self._samples.empty:
            kept_samples = self._samples[self._samples["cell_id"] != cell_id] if not self._samples.empty else None
            new_samples = pd.DataFrame(samples, columns=cols.SAMPLE_COLUMNS)
            parts = [part for part in (kept_samples, new_samples) if part is not None and not part.empty]
            self._samples = pd.concat(parts, ignore_index=True) if parts else new_samples
        write_csv_atomic(self.samples_path, self._samples)
        write_csv_atomic(self.summary_path, self._summary)

    def write_run_json(self, record: Mapping[str, Any]) -> None:
        """run.json, atomically."""
        write_json_atomic(self.run_json_path, record)

    def read_run_json(self) -> dict[str, Any]:
        """run.json, validated (read_record)."""
        return read_record(self.run_dir)


# ---------------------------------------------------------------- profile runs


def is_profile_dir(path: str | Path) -> bool:
    """True for a folder written by `bench profile` (it holds stages.csv)."""
    return (Path(path) / "stages.csv").is_file()


@dataclass
class ProfileData:
    """A `bench profile` directory read back and validated."""

    label: str
    path: Path
    record: dict[str, Any]
    tables: dict[str, pd.DataFrame]  # stages.csv, ops.csv, flops.csv, compile.csv (a missing one is empty)


def _read_profile_csv(path: Path, name: str) -> pd.DataFrame:
    columns = cols.PROFILE_CSVS[name]
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    frame = _read_csv_checked(path, columns, cols.PROFILE_REQUIRED.get(name, []), _FIX_PROFILE)
    for column in columns:
        if column not in frame:
            frame[column] = ""
        if column not in cols.PROFILE_TEXT_COLUMNS:
            frame[column] = _numbers(path, frame, column, _FIX_PROFILE, finite=False)
    if "status" in frame:
        unknown = sorted(set(frame["status"].astype(str)) - set(cols.FINAL_STATUSES))
        if unknown:
            raise RunDirError(f"{path}: unknown status {unknown[0]!r}; {_FIX_PROFILE}")
    return frame


def read_profile(run_dir: str | Path) -> ProfileData:
    """Read and validate a `bench profile` directory; raises RunDirError naming the file and the fix."""
    path = Path(run_dir)
    record = read_record(path, _FIX_PROFILE)
    tables = {name: _read_profile_csv(path / name, name) for name in cols.PROFILE_CSVS}
    _no_repeats(path / "stages.csv", tables["stages.csv"], ["framework", "execution", "phase", "stage"], _FIX_PROFILE)
    return ProfileData(str(record.get("run_id") or path.name), path, record, tables)


class ProfileStore:
    """The four CSVs of a profile run, rewritten atomically after every cell so an interruption keeps them."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in cols.PROFILE_CSVS}

    def add(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows to one table (a key of PROFILE_CSVS)."""
        self.rows[name].extend(dict(row) for row in rows)

    def frame(self, name: str) -> pd.DataFrame:
        """One table with its fixed columns (missing values empty)."""
        columns = cols.PROFILE_CSVS[name]
        return pd.DataFrame([{c: row.get(c) for c in columns} for row in self.rows[name]], columns=columns)

    def write(self) -> None:
        """Every CSV, atomically (an empty table still gets its header)."""
        for name in cols.PROFILE_CSVS:
            write_csv_atomic(self.run_dir / name, self.frame(name))

    def write_run_json(self, record: Mapping[str, Any]) -> None:
        """run.json, atomically."""
        write_json_atomic(self.run_dir / cols.RUN_JSON, record)
