"""Runs a planned benchmark: each cell in a fresh worker process, one at a time, rows written as they finish.

Order of a run: equivalence check (one worker per framework), conv calibration (one worker per
framework), then every cell. Faults are data: a worker that crashes, runs out of memory or passes
--timeout becomes a row with that status and the tail of its output (see bench.engine.launch), and the run
goes on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from bench.core import console as out
from bench.core import envinfo
from bench.core import settings as settings_mod
from bench.core.calibration import calibration_workloads, dominant_conv3x3, dominant_gemm
from bench.core.columns import FAILED_STATUSES
from bench.core.numbers import num
from bench.core.rundir import RunDirError, RunStore, new_run_dir
from bench.core.settings import Cell, RunSettings
from bench.core.stats import summarize
from bench.engine.protocol import (
    SLOWDOWN_ENV,
    WORKER_ENV,
    CalibrationResult,
    CalibrationSpec,
    CalibrationWorkload,
    CellResult,
    CellSpec,
    EquivalenceSpec,
    GradientCheckResult,
    GradientCheckSpec,
    WorkerResult,
)
from bench.engine.session import INTERRUPTED_EXIT_CODE, WorkerSession, run_guarded
from bench.run import gradients
from bench.run.equivalence import compare
from impls import count_flops
from impls.base import smallest_train_batch

BUSY_LOAD_PER_CORE = 0.5  # a 1-minute load above this share of the usable cores triggers a warning


# ---------------------------------------------------------------- rows


def _base_row(cell: Cell, kind: str, settings: RunSettings) -> dict[str, Any]:
    cfg = settings.config
    return {
        "cell_id": cell.cell_id,
        "kind": kind,
        **cell.to_dict(),
        "device": settings.device,
        "preset": settings.preset,
        "num_stacks": cfg.num_stacks,
        "depth": cfg.depth,
        "channels": cfg.channels,
        "num_keypoints": cfg.num_keypoints,
        "input_height": cfg.input_hw[0],
        "input_width": cfg.input_hw[1],
    }


def _result_values(result: WorkerResult) -> dict[str, Any]:
    """A worker result's fields by name, for building a row."""
    return dataclasses.asdict(result)


def _measured_row(
    base: dict[str, Any], status: str, error: str, wall_s: float, result: Mapping[str, Any], flops: int
) -> dict[str, Any]:
    """A row from a worker result: status, error, statistics of its samples, memory and timings."""
    row = {**base, "status": status, "error": error, "worker_wall_s": wall_s}
    for key in ("device", "first_call_ms", "warmup_calls", "import_s", "build_s", "setup_s", "num_params", "injected_slowdown", "gpu_allocator_peak_bytes",
                "nvml_process_used_bytes", "nvml_device_used_bytes", "host_peak_rss_bytes"):  # fmt: skip
        if result.get(key) is not None:
            row[key] = result[key]
    samples = result.get("samples_ns") or []
    if status == "ok" and samples:
        row["gflop_per_step"] = flops / 1e9
        row.update(summarize(samples, int(base["batch_size"]), flops))
    return row


CEILING_KINDS = ("conv3x3", "gemm")  # calibration phases on the model's own shapes


def ceilings(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, int], float]:
    """(framework, precision, batch size) -> that framework's best GFLOP/s on the model's conv and GEMM
    shapes, and ("*", precision, batch size) -> the fastest framework's: the machine's ceiling."""
    best: dict[tuple[str, str, int], float] = {}
    for row in rows:
        rate = num(row.get("achieved_gflop_per_s"))
        if row.get("kind") != "calibration" or row.get("status") != "ok" or row.get("phase") not in CEILING_KINDS:
            continue
        if math.isnan(rate):
            continue
        precision, batch = str(row["precision"]), int(num(row["batch_size"]))
        for key in ((str(row["framework"]), precision, batch), ("*", precision, batch)):
            best[key] = max(best.get(key, 0.0), rate)
    return best


def _calibration_cell(framework: str, workload: CalibrationWorkload) -> Cell:
    """The summary cell of one calibration workload: execution names the probe, phase the workload kind."""
    probe = "gemm_benchmark" if workload.kind == "gemm" else "conv_benchmark"
    return Cell(framework, probe, workload.precision, workload.batch_size, workload.kind)


def exit_code(rows: Iterable[Mapping[str, Any]], equivalence: Mapping[str, Mapping[str, Any]]) -> int:
    """1 when any cell failed, timed out or ran out of memory, or a framework disagreed; else 0."""
    if any(str(row.get("status")) in FAILED_STATUSES for row in rows):
        return 1
    return (
        1
        if any(
            entry.get("equivalent") is False or entry.get("status") in FAILED_STATUSES for entry in equivalence.values()
        )
        else 0
    )


# ---------------------------------------------------------------- the run


class Runner:
    """One run (new or resumed): plans the remaining work, runs it and records it."""

    def __init__(self, settings: RunSettings, store: RunStore, record: dict[str, Any]) -> None:
        self.settings = settings
        self.store = store
        self.record = record
        self.session = WorkerSession(store.run_dir, record, settings.frameworks, settings.timeout_s)
        self.console = self.session.console
        self.active = self.session.active

    # -- helpers

    def _placement(self) -> dict[str, Any]:
        """The spec fields every worker of this run shares: the network, the device and the seed."""
        s = self.settings
        return {"config": s.config.to_dict(), "device": s.device, "device_requested": s.device_requested, "seed": s.seed}

    def _save_record(self) -> None:
        self.store.write_run_json(self.record)

    # -- stages

    def check_equivalence(self, progress: Any, task: Any) -> None:
        """Heatmaps of every installed framework on one input, compared; disagreement is shouted."""
        s = self.settings
        rng = np.random.default_rng(s.seed)
        x = rng.standard_normal((1, *s.config.input_hw, 3)).astype(np.float32)  # (1, H, W, 3)
        input_path = self.session.workdir / "equivalence_input.npy"
        np.save(input_path, x)
        heatmaps: dict[str, np.ndarray] = {}
        entries: dict[str, dict[str, Any]] = {}
        for fw in self.active:
            progress.update(task, description=f"{fw}: equivalence check")
            execution = settings_mod.EXECUTIONS[fw][0]
            output = self.session.workdir / f"equivalence_{fw}.npy"
            spec = EquivalenceSpec(framework=fw, execution=execution, input_npy=str(input_path),
                                   output_npy=str(output), **self._placement())  # fmt: skip
            outcome = self.session.call(spec, f"{fw}-equivalence")
            entries[fw] = {
                "status": outcome.status,
                "error": outcome.error,
                "execution": execution,
                "precision": "fp32",
            }
            if outcome.status == "ok":
                heatmaps[fw] = np.load(output)
            progress.advance(task)
        for fw, verdict in compare(heatmaps, s.equivalence_rtol).items():
            entries[fw].update(verdict)
        self.record["equivalence"] = {
            "rtol": s.equivalence_rtol,
            "input_shape": list(x.shape),
            "weights": "impls.init_weights(config, seed=0)",
            "frameworks": entries,
        }
        self._save_record()
        self._report_equivalence(entries)

    def _report_equivalence(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        for fw, entry in entries.items():
            if entry["status"] != "ok":
                last = (entry["error"] or "").splitlines()[-1:] or [""]
                out.alarm(
                    self.console,
                    f"EQUIVALENCE CHECK {entry['status'].upper()}: {fw}",
                    f"{fw} could not predict heatmaps: {last[0]}",
                )
            elif entry.get("equivalent") is False:
                out.alarm(
                    self.console,
                    f"FRAMEWORK DISAGREES: {fw}",
                    f"{fw}'s heatmaps differ from {entry['reference']}: largest relative error "
                    f"{entry['max_rel_err']:.3g} > {self.settings.equivalence_rtol:g}. Its timings are recorded, "
                    "but they do not measure the same network.",
                )
        checked = {fw: e["max_rel_err"] for fw, e in entries.items() if e.get("max_rel_err") is not None}
        if checked:
            text = ", ".join(f"{fw} {err:.1e}" for fw, err in checked.items())
            self.console.print(f"equivalence (largest relative error of heatmaps): {text}")

    def check_gradients(self, progress: Any, task: Any) -> None:
        """One train-mode step of every framework in fp64 on the same batch, gradients compared per parameter
        (bench.run.gradients); recorded in run.json under "gradient_check", disagreement shouted."""
        s = self.settings
        batch_size = smallest_train_batch(s.config)  # 1, or 2 where the innermost level is 1x1
        grads: dict[str, dict[str, np.ndarray]] = {}
        losses: dict[str, float] = {}
        entries: dict[str, dict[str, Any]] = {}
        for fw in self.active:
            progress.update(task, description=f"{fw}: gradient check (fp64)")  # not counted in the bar's total
            execution = settings_mod.EXECUTIONS[fw][0]
            output = self.session.workdir / f"gradients_{fw}.npz"
            spec = GradientCheckSpec(framework=fw, execution=execution, precision=gradients.GRADIENT_PRECISION,
                                     batch_size=batch_size, output_npz=str(output), **self._placement())  # fmt: skip
            outcome = self.session.call(spec, f"{fw}-gradient-check")
            result = outcome.result
            assert isinstance(result, GradientCheckResult)
            entries[fw] = {"status": outcome.status, "error": outcome.error, "execution": execution,
                           "precision": gradients.GRADIENT_PRECISION, "loss": result.loss}  # fmt: skip
            if outcome.status == "ok" and result.loss is not None:
                with np.load(output) as saved:
                    grads[fw] = {name: saved[name] for name in saved.files}
                losses[fw] = result.loss
        for fw, verdict in gradients.compare(grads, losses, gradients.GRADIENT_RTOL).items():
            entries[fw].update(verdict)
        self.record["gradient_check"] = {
            "rtol": gradients.GRADIENT_RTOL,
            "rule": "per parameter ||a - b|| / (||b|| + 1e-4 x typical), typical = RMS element of the whole "
                    "gradient x sqrt(size); the loss relative; both <= rtol",
            "precision": gradients.GRADIENT_PRECISION,
            "batch_size": batch_size,
            "inputs": f"impls.spec.random_batch(config, {batch_size}, seed={s.seed})",
            "weights": "impls.init_weights(config, seed=0)",
            "frameworks": entries,
        }
        self._save_record()
        for fw, entry in entries.items():
            if entry["status"] != "ok":
                last = (entry["error"] or "").splitlines()[-1:] or [""]
                out.alarm(self.console, f"GRADIENT CHECK {entry['status'].upper()}: {fw}",
                          f"{fw} could not compute fp64 gradients: {last[0]}")  # fmt: skip
            elif entry.get("equivalent") is False:
                out.alarm(self.console, f"GRADIENTS DISAGREE: {fw}",
                          f"{fw}'s fp64 gradients differ from {entry['reference']}: largest error "
                          f"{entry['max_rel_err']:.3g} ({entry['worst_parameter']}), loss {entry['loss_rel_err']:.3g}, "
                          f"> {gradients.GRADIENT_RTOL:g}. Its timings are recorded, but its backward pass is not "
                          "the same computation.")  # fmt: skip
        checked = {fw: e["max_rel_err"] for fw, e in entries.items() if e.get("max_rel_err") is not None}
        if checked:
            text = ", ".join(f"{fw} {err:.1e}" for fw, err in checked.items())
            self.console.print(f"gradients (fp64, batch {batch_size}, largest error per parameter): {text}")

    def _gradient_entries(self) -> dict[str, Mapping[str, Any]]:
        """The gradient check's per-framework entries, keyed apart from the forward check's for exit_code."""
        entries = (self.record.get("gradient_check") or {}).get("frameworks", {})
        return {f"{fw} gradients": entry for fw, entry in entries.items()}

    def _warn_threads(self) -> None:
        """Frameworks that use different thread counts are not compared like for like: say so.

        0 or None means "the framework's own default" (TF reports 0); those are recorded but not compared.
        """
        for key in ("intra_op_threads", "inter_op_threads"):
            counts = {fw: info.get(key) for fw, info in self.record["frameworks"].items() if info.get(key)}
            if len(set(map(str, counts.values()))) > 1:
                self.session.warn(f"frameworks use different {key}: " + ", ".join(f"{fw} {n}" for fw, n in counts.items()))

    def _warn_busy(self) -> None:
        """Other processes on the cores distort every figure (torch's OpenMP threads most): say so up front."""
        load, cores = envinfo.load_average(), self.record["environment"].get("cpu_cores_usable")
        if load and cores and load[0] > BUSY_LOAD_PER_CORE * cores:
            self.session.warn(f"the machine is busy (1-minute load {load[0]:.1f} on {cores} cores); timings will be slow and noisy")

    def calibrate(self, framework: str) -> list[dict[str, Any]]:
        """Calibration rows of one framework: conv3x3 and GEMM GFLOP/s per precision and batch size, and
        the fixed reference conv per precision (see bench/calibration.py)."""
        s = self.settings
        workloads = [CalibrationWorkload(**w) for w in calibration_workloads(s.config, s.batch_sizes, s.precisions)]
        spec = CalibrationSpec(framework=framework, workloads=workloads, loop=s.loop(), **self._placement())
        outcome = self.session.call(spec, f"{framework}-calibration")
        result = outcome.result
        assert isinstance(result, CalibrationResult)
        measured = {(m.kind, m.precision, m.batch_size): m for m in result.measurements}
        missing = set(result.missing)
        rows = []
        for workload in workloads:
            cell = _calibration_cell(framework, workload)
            base = _base_row(cell, "calibration", s)
            found = measured.get((workload.kind, workload.precision, workload.batch_size))
            status, error = outcome.status, outcome.error
            if status == "ok" and workload.kind in missing:
                status, error = "skipped", f"{framework}'s impls module has no {cell.execution} probe"
            elif status == "ok" and found is None:
                status, error = "failed", "the worker returned no measurement for this cell"
            values = {**_result_values(result), **(dataclasses.asdict(found) if found else {})}
            row = _measured_row(base, status, error, outcome.wall_s, values, workload.flops)
            self.store.add(row, found.samples_ns if found and status == "ok" else [])
            rows.append(row)
        return rows

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Measure one cell (or record why it is skipped) and store its row and samples."""
        s = self.settings
        base = _base_row(cell, "model", s)
        skip = self.session.skip_reason(cell.framework)
        if skip:
            row = {**base, "status": "skipped", "error": skip}
            self.store.add(row)
            return row
        spec = CellSpec(framework=cell.framework, execution=cell.execution, precision=cell.precision,
                        batch_size=cell.batch_size, phase=cell.phase, loop=s.loop(), **self._placement())  # fmt: skip
        outcome = self.session.call(spec, cell.cell_id)
        result = outcome.result
        assert isinstance(result, CellResult)
        if result.model_settings:
            self.record.setdefault("cell_settings", {})[cell.cell_id] = result.model_settings
            self._save_record()
        if result.injected_slowdown:
            self.session.warn(f"{cell.cell_id}: the test switch {SLOWDOWN_ENV} lengthened every timed step by "
                              f"{result.injected_slowdown:.0%}; these timings are not the model's")  # fmt: skip
        flops = count_flops(s.config, cell.batch_size, cell.phase)
        row = _measured_row(base, outcome.status, outcome.error, outcome.wall_s, _result_values(result), flops)
        equivalence = self.record.get("equivalence", {}).get("frameworks", {}).get(cell.framework, {})
        row["equivalence_max_rel_err"] = equivalence.get("max_rel_err")
        row["equivalent"] = equivalence.get("equivalent")
        gradient = (self.record.get("gradient_check") or {}).get("frameworks", {}).get(cell.framework, {})
        row["gradient_max_rel_err"] = gradient.get("max_rel_err")
        row["gradients_equivalent"] = gradient.get("equivalent")
        best = ceilings(self.store.rows())
        if row.get("achieved_gflop_per_s") is not None:
            for who, rate_column, share_column in (("*", "conv_ceiling_gflop_per_s", "ceiling_fraction"),
                                                   (cell.framework, "framework_ceiling_gflop_per_s", "framework_ceiling_fraction")):  # fmt: skip
                ceiling = best.get((who, cell.precision, cell.batch_size))
                if ceiling:
                    row[rate_column] = ceiling
                    row[share_column] = row["achieved_gflop_per_s"] / ceiling
        self.store.add(row, result.samples_ns if outcome.status == "ok" else [])
        return row

    def execute(self) -> int:
        """Run everything not yet done; print the table; return the exit code."""
        s, done = self.settings, self.store.done_cell_ids()
        cells = [cell for cell in s.cells() if cell.cell_id not in done]
        need_equivalence = not self.record.get("equivalence") and bool(self.active)
        workloads = [CalibrationWorkload(**w) for w in calibration_workloads(s.config, s.batch_sizes, s.precisions)]
        calibrations = [fw for fw in self.active if any(_calibration_cell(fw, w).cell_id not in done for w in workloads)]
        total = len(cells) + len(calibrations) + (len(self.active) if need_equivalence else 0)
        self.console.print(
            f"hgbench run [bold]{self.record['run_id']}[/]: {len(cells)} cells to measure on {s.device} "
            f"(preset {s.preset}, input {s.config.input_hw[0]}x{s.config.input_hw[1]}), results in {escape(str(self.store.run_dir))}"
        )
        self._warn_busy()
        started = time.perf_counter()
        with self.session.workers(total) as (progress, task):
            if need_equivalence:
                self.check_equivalence(progress, task)
                self.check_gradients(progress, task)
                self._warn_threads()
            for fw in calibrations:
                progress.update(task, description=f"{fw}: conv and GEMM calibration")
                self.calibrate(fw)
                progress.advance(task)
            self._save_record()
            for cell in cells:
                progress.update(task, description=cell.cell_id)
                row = self.run_cell(cell)
                if row["status"] != "ok":
                    progress.console.print(f"[red]{row['status']}[/] {cell.cell_id}")
                progress.advance(task)
        self.record["bench_wall_s"] = self.record.get("bench_wall_s", 0.0) + time.perf_counter() - started
        self.record["status"] = "complete"
        self.record["load_average_at_end"] = envinfo.load_average()
        self.record["finished_utc"] = envinfo.utc_now()
        self._save_record()
        rows = self.store.rows()
        self.console.print(out.summary_table(rows, f"hgbench {self.record['run_id']} ({s.device}, {s.preset})"))
        out.print_problems(self.console, rows)
        self.console.print(f"wall time {self.record['bench_wall_s']:.0f} s; results: {escape(str(self.store.run_dir))}")
        return exit_code(rows, {**self.record.get("equivalence", {}).get("frameworks", {}), **self._gradient_entries()})


@dataclass(frozen=True)
class RunResult:
    """How a run ended and where its results are."""

    exit_code: int  # 0 ok, 1 a cell failed or a framework disagreed, 130 interrupted
    run_dir: Path

    @property
    def interrupted(self) -> bool:
        """True when the run stopped before its last cell."""
        return self.exit_code == INTERRUPTED_EXIT_CODE


def start(settings: RunSettings, args: list[str], run_id: str | None = None) -> RunResult:
    """A new run of `settings` in a fresh results directory (results/<run_id> when given)."""
    run_dir = new_run_dir(settings.out_dir, settings.device, run_id)
    record: dict[str, Any] = {
        "run_id": run_dir.name,
        "status": "running",
        "started_utc": envinfo.utc_now(),
        "command_line": envinfo.command_line(args),
        "settings": settings.to_dict(),
        "worker_env": dict(WORKER_ENV),
        "phases": {
            "forward": "eval-mode BN (running statistics), no gradients",
            "forward_backward": "train-mode BN (batch statistics), loss summed over all stacks, gradients of every trainable parameter, no optimizer update",
        },
        "environment": envinfo.collect(args),
        "frameworks": {},
        "equivalence": {},
        "calibration": {
            "conv_shape": dominant_conv3x3(settings.config).to_dict(),
            "gemm_shape": dominant_gemm(settings.config).to_dict(),
            "note": "conv3x3: the model's dominant 3x3 stride-1 conv; gemm: its dominant 1x1 conv as a GEMM "
            "(batch*m_per_image, k) @ (k, n); reference_conv: a fixed 64x64, 64->64 conv at batch 1 for "
            "bench compare --normalize. Ceilings: per framework the faster of conv3x3 and gemm; the machine's "
            "is the fastest framework's.",
        },
        "warnings": [],
        "resumes": [],
    }
    return _execute(Runner(settings, RunStore(run_dir), record))


def resume(run_dir: Path, args: list[str]) -> RunResult:
    """Complete an interrupted run with the settings it recorded; RunDirError when it is not one this version reads."""
    store = RunStore.reopen(run_dir)
    record = store.read_run_json()
    settings = settings_from_record(record["settings"], f"--resume: {run_dir / 'run.json'}")
    record.setdefault("resumes", []).append({"utc_time": envinfo.utc_now(), "command_line": envinfo.command_line(args)})
    record["status"] = "running"
    return _execute(Runner(settings, store, record))


def settings_from_record(recorded: Mapping[str, Any], where: str) -> RunSettings:
    """RunSettings from a run.json's settings, or RunDirError saying the record is not one this version reads."""
    try:
        return RunSettings.from_dict(recorded)
    except (TypeError, ValueError, KeyError) as err:
        raise RunDirError(f"{where}: the recorded settings cannot be used by this version ({type(err).__name__}: "
                          f"{err}); re-run the cells instead of resuming or replaying them") from None  # fmt: skip


def _execute(runner: Runner) -> RunResult:
    run_dir = runner.store.run_dir
    runner.store.write_run_json(runner.record)
    hint = f"finished cells are in {run_dir}; complete the run with: python -m bench run --resume {run_dir}"
    code = run_guarded(runner.execute, runner.record, runner._save_record, runner.console, hint)
    return RunResult(code, run_dir)
