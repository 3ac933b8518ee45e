"""`python -m bench overhead`: does the harness add measurable time? Harness loop vs bare loop, one process.

A worker builds one cell's model and alternates rounds of the harness's sampling loop (`bench.engine.timing`)
with a bare `perf_counter` loop on the same step; the medians of both are printed with their difference.
The full cell (fresh worker, the run's own path) is measured too, for comparison with a run's row.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from rich.markup import escape

from bench.core import console as out
from bench.core.settings import LoopSettings, RunSettings
from bench.engine.launch import run_worker
from bench.engine.protocol import CellResult, CellSpec, OverheadResult, OverheadSpec, WorkerResult, WorkerSpec


def measure_overhead(settings: RunSettings, rounds: int = 20) -> int:
    """Print harness, bare-loop and full-cell medians for the first cell of `settings`; 1 if a worker failed."""
    console = out.make_console()
    cell = settings.cells()[0]
    common = {"framework": cell.framework, "execution": cell.execution, "precision": cell.precision,
              "batch_size": cell.batch_size, "phase": cell.phase, **settings.placement()}  # fmt: skip
    chunk = settings.iters or 5
    with tempfile.TemporaryDirectory(prefix="hgbench-overhead-") as workdir:

        def worker(spec: WorkerSpec, name: str) -> WorkerResult | None:
            outcome = run_worker(
                spec,
                workdir=Path(workdir),
                name=name,
                log_path=Path(workdir) / f"{name}.log",
                timeout_s=settings.timeout_s,
            )
            if outcome.status != "ok":
                console.print(f"[red]{outcome.status}[/] {name}: {escape(outcome.error)}")
                return None
            return outcome.result

        paired = worker(OverheadSpec(**common, warmup=settings.warmup, iters=chunk, rounds=rounds), "overhead")
        loop = LoopSettings(warmup=settings.warmup, max_iters=chunk * rounds, min_time_s=None, min_iters=1)
        full = worker(CellSpec(**common, loop=loop), "cell")
    if not isinstance(paired, OverheadResult) or not isinstance(full, CellResult):
        return 1
    harness = float(np.median(paired.harness_samples_ns)) / 1e6
    bare = float(np.median(paired.bare_samples_ns)) / 1e6
    cell_median = float(np.median(full.samples_ns)) / 1e6
    console.print(
        f"{cell.cell_id}, preset {settings.preset}, {chunk * rounds} samples each ({rounds} alternating rounds of {chunk}):\n"
        f"  harness loop {harness:.3f} ms vs bare loop {bare:.3f} ms in one process: {(harness / bare - 1) * 100:+.2f}%\n"
        f"  full cell worker (a fresh process, as in a run) {cell_median:.3f} ms: {(cell_median / bare - 1) * 100:+.2f}% vs that bare loop"
    )
    return 0
