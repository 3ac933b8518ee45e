"""`python -m bench maxbatch`: the largest batch that fits, per framework x execution x precision x phase.

Each probe is one fresh worker that builds the model at a batch size and times a few steps (the `cell`
mode of `bench run`): doubling from --start until a probe does not fit, then bisection between the last
batch that fit and the first that did not. On a GPU "does not fit" is the framework's out-of-memory
(status oom) or, with --memory-budget, an allocator peak above the budget; on a CPU, where nothing runs
out of memory before the machine does, --memory-budget (e.g. 4GiB) against the worker's peak resident
memory stands in for device memory, so the search runs and is tested here. A probe that fails for
another reason (a crash, a timeout) ends that search with its error.

Writes results/<UTC time>-<device>-maxbatch/: probes.csv (one row per probe, rewritten atomically as each
finishes, so an interrupted search keeps every probe), maxbatch.csv (per target: the largest batch, its
throughput and peak memory, and the throughput-optimal batch), run.json and logs/. The CLI then draws
maxbatch.png beside them (throughput and memory against batch, with the budget or capacity line).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.core import envinfo
from bench.core.columns import MAXBATCH_COLUMNS, MAXBATCH_PROBE_COLUMNS
from bench.core.files import check_output_dir, write_json_atomic
from bench.core.rundir import new_run_dir, write_csv_atomic
from bench.core.settings import Cell, LoopSettings, RunSettings, SettingsError, parse_positive_int
from bench.engine.protocol import WORKER_ENV, CellResult, CellSpec
from bench.engine.session import WorkerSession, run_guarded

DEFAULT_START = 1
DEFAULT_LIMIT = 4096  # no search goes beyond this batch: a bound on time, not on memory
PROBE_ITERS = 3  # timed steps per probe: enough for a median; the search is about memory
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(flag: str, text: str) -> int:
    """'4GiB', '512MiB', '2GB' or a number of bytes -> bytes (> 0)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise SettingsError(f"{flag} must be a size such as 4GiB, 512MiB or 2GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Probe:
    """One probe's outcome: did the batch fit, and what it measured."""

    batch_size: int
    status: str
    error: str
    fits: bool
    peak_bytes: int | None
    latency_ms_median: float | None
    throughput_img_per_s: float | None


def search(probe: Callable[[int], Probe], start: int, limit: int) -> list[Probe]:
    """Doubling from `start`, then bisection; stops at a probe that failed for a reason other than memory.

    Returns every probe in the order made. The largest fitting batch is within 1 of the smallest that did
    not fit, or `limit` when everything up to it fit.
    """
    probes: list[Probe] = []

    def run(batch: int) -> Probe:
        result = probe(batch)
        probes.append(result)
        return result

    batch, fit, miss = start, None, None
    while batch <= limit:
        result = run(batch)
        if not result.fits:
            if result.status not in ("ok", "oom"):
                return probes  # not a memory answer: the search cannot go on
            miss = batch
            break
        fit = batch
        if batch == limit:
            break
        batch = min(batch * 2, limit)
    if fit is None or miss is None:
        return probes
    while miss - fit > 1:
        middle = (fit + miss) // 2
        result = run(middle)
        if result.fits:
            fit = middle
        elif result.status in ("ok", "oom"):
            miss = middle
        else:
            break
    return probes


def summarize(target: dict[str, Any], probes: list[Probe], limit: int) -> dict[str, Any]:
    """The largest fitting batch with its throughput and peak, and the throughput-optimal batch."""
    fitting = [p for p in probes if p.fits]
    row: dict[str, Any] = {**target, "probes": len(probes)}
    stopped = next((p for p in probes if not p.fits and p.status not in ("ok", "oom")), None)
    if stopped is not None:
        row.update(status=stopped.status, error=f"probe at batch {stopped.batch_size}: {stopped.error}")
    else:
        row.update(status="ok" if fitting else "none_fit", error="" if fitting else "not even the start batch fit")
    if fitting:
        largest = max(fitting, key=lambda p: p.batch_size)
        best = max(fitting, key=lambda p: p.throughput_img_per_s or 0.0)
        row.update(
            largest_batch=largest.batch_size, largest_throughput_img_per_s=largest.throughput_img_per_s,
            largest_peak_bytes=largest.peak_bytes, best_batch=best.batch_size,
            best_throughput_img_per_s=best.throughput_img_per_s,
            limited_by="search limit" if largest.batch_size >= limit else "memory",
        )  # fmt: skip
    return row


class MaxBatchRunner:
    """One search per target, each probe a fresh worker, probes.csv rewritten after every probe."""

    def __init__(self, settings: RunSettings, budget_bytes: int | None, start: int, limit: int, run_dir: Path,
                 record: dict[str, Any]) -> None:  # fmt: skip
        self.settings, self.budget_bytes, self.start, self.limit = settings, budget_bytes, start, limit
        self.run_dir, self.record = run_dir, record
        self.session = WorkerSession(run_dir, record, settings.frameworks, settings.timeout_s)
        self.probe_rows: list[dict[str, Any]] = []
        self.summary_rows: list[dict[str, Any]] = []

    def save(self) -> None:
        """probes.csv, maxbatch.csv and run.json, atomically."""
        write_csv_atomic(self.run_dir / "probes.csv", pd.DataFrame(self.probe_rows, columns=MAXBATCH_PROBE_COLUMNS))
        write_csv_atomic(self.run_dir / "maxbatch.csv", pd.DataFrame(self.summary_rows, columns=MAXBATCH_COLUMNS))
        write_json_atomic(self.run_dir / "run.json", self.record)

    def _probe(self, cell: Cell, target: dict[str, Any]) -> Callable[[int], Probe]:
        s = self.settings
        loop = LoopSettings(warmup=1, max_iters=PROBE_ITERS, min_time_s=None, min_iters=1)

        def probe(batch: int) -> Probe:
            spec = CellSpec(framework=cell.framework, execution=cell.execution, precision=cell.precision,
                            batch_size=batch, phase=cell.phase, loop=loop, **s.placement())  # fmt: skip
            outcome = self.session.call(spec, f"{cell.framework}-{cell.execution}-{cell.precision}-{cell.phase}-b{batch}")
            result = outcome.result
            assert isinstance(result, CellResult)
            on_gpu = result.device == "gpu"
            peak = result.gpu_allocator_peak_bytes if on_gpu else result.host_peak_rss_bytes
            median = float(np.median(result.samples_ns)) / 1e6 if result.samples_ns else None
            over = self.budget_bytes is not None and peak is not None and peak > self.budget_bytes
            fits = outcome.status == "ok" and not over and (on_gpu or peak is not None)
            p = Probe(batch, outcome.status, outcome.error, fits, peak, median,
                      batch / (median / 1e3) if median else None)  # fmt: skip
            self.probe_rows.append({**target, "batch_size": batch, "status": p.status, "error": p.error,
                                    "fits": p.fits, "peak_bytes": peak, "over_budget": over,
                                    "memory_source": "gpu_allocator_peak_bytes" if on_gpu else "host_peak_rss_bytes",
                                    "latency_ms_median": median, "throughput_img_per_s": p.throughput_img_per_s})  # fmt: skip
            self.save()
            return p

        return probe

    def execute(self) -> int:
        """Search every target; 0 when each found its largest batch, 1 when a search failed."""
        s = self.settings
        # One search per framework x execution x precision x phase (the settings' batch size is a placeholder).
        targets = list({(c.framework, c.execution, c.precision, c.phase): c for c in s.cells()}.values())
        failed = False
        with self.session.workers(len(targets), prefix="hgbench-maxbatch-") as (progress, task):
            for cell in targets:
                target = {"framework": cell.framework, "execution": cell.execution, "precision": cell.precision,
                          "phase": cell.phase, "device": s.device, "memory_budget_bytes": self.budget_bytes}  # fmt: skip
                progress.update(task, description=f"{cell.framework} {cell.execution} {cell.precision} {cell.phase}")
                skip = self.session.skip_reason(cell.framework)
                if skip:
                    self.summary_rows.append({**target, "status": "skipped", "error": skip, "probes": 0})
                else:
                    probes = search(self._probe(cell, target), self.start, self.limit)
                    row = summarize(target, probes, self.limit)
                    failed |= row["status"] not in ("ok",)
                    self.summary_rows.append(row)
                self.save()
                progress.advance(task)
        self.record.update(status="complete", finished_utc=envinfo.utc_now())
        self.save()
        return 1 if failed else 0


def start(settings: RunSettings, budget: str | None, start_batch: str | None, limit: str | None,
          args: list[str]) -> tuple[int, Path]:  # fmt: skip
    """Check the options, make the run directory and search; returns (exit code, run directory)."""
    budget_bytes = parse_bytes("--memory-budget", budget) if budget is not None else None
    if settings.device == "cpu" and budget_bytes is None:
        raise SettingsError("--memory-budget is needed on a CPU (nothing runs out of memory there before the "
                            "machine does): give one such as --memory-budget 4GiB")  # fmt: skip
    first = parse_positive_int("--start", start_batch) if start_batch is not None else DEFAULT_START
    last = parse_positive_int("--limit", limit) if limit is not None else DEFAULT_LIMIT
    if first > last:
        raise SettingsError(f"--start {first} is above --limit {last}; give a start at or below the limit")
    check_output_dir(settings.out_dir, "--out")  # a writable folder before any probe starts
    run_dir = new_run_dir(settings.out_dir, f"{settings.device}-maxbatch")
    record: dict[str, Any] = {
        "run_id": run_dir.name, "kind": "maxbatch", "status": "running", "started_utc": envinfo.utc_now(),
        "command_line": envinfo.command_line(args), "settings": settings.to_dict(),
        "search": {"start": first, "limit": last, "memory_budget_bytes": budget_bytes, "probe_iters": PROBE_ITERS,
                   "method": "doubling, then bisection; one fresh worker per probe"},
        "worker_env": dict(WORKER_ENV), "environment": envinfo.collect(args), "frameworks": {}, "warnings": [],
    }  # fmt: skip
    runner = MaxBatchRunner(settings, budget_bytes, first, last, run_dir, record)
    runner.save()
    hint = f"the probes made so far are in {run_dir / 'probes.csv'}"
    return run_guarded(runner.execute, record, runner.save, runner.session.console, hint), run_dir
