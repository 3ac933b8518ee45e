"""Runs a planned benchmark: each cell in a fresh worker process, rows written as they finish.

Order of a run: equivalence check (one worker per framework), conv calibration (one worker per
framework), then every cell (with --timing-only, the cells alone). Faults are data: a worker that crashes, runs out of memory or passes
--timeout becomes a row with that status and the tail of its output (see bench.engine.launch), and the run
goes on. On this machine (the default executor) one worker runs at a time; on a Ray cluster
(--executor ray, bench.engine.ray_executor) every cell of a round is handed to the cluster at once, each
takes a whole measurement slot of a node, and rows are written as they come back. Every row names the host
and node that measured it; run.json records every node's environment.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.markup import escape

from bench.core import console as out
from bench.core import envinfo, nodes
from bench.core import settings as settings_mod
from bench.core.calibration import calibration_workloads, dominant_conv3x3, dominant_gemm
from bench.core.columns import FAILED_STATUSES
from bench.core.files import DISK_FULL_EXIT_CODE, check_output_dir
from bench.core.numbers import num
from bench.core.rundir import RunDirError, RunStore, new_run_dir
from bench.core.settings import MAX_ITERS, Cell, RunSettings, SettingsError, variant_key
from bench.core.stats import summarize
from bench.engine import procs
from bench.engine.executor import AbstractExecutor, Job, LocalExecutor
from bench.engine.launch import WorkerOutcome
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
    injected_slowdown,
)
from bench.engine.ray_executor import RayExecutor
from bench.engine.session import INTERRUPTED_EXIT_CODES, WorkerSession, run_guarded
from bench.run import data_parallel, gradients, scaling
from bench.run.devices import gpu_fallbacks
from bench.run.equivalence import compare
from bench.run.plan import round_order
from impls import count_flops
from impls.base import smallest_train_batch

BUSY_LOAD_PER_CORE = 0.5  # a 1-minute load above this share of the usable cores triggers a warning
# The parent holds every framework's heatmaps and float64 copies while comparing them (equivalence.compare):
# about this many times their size in all. Loaded only when that fits in half the available memory.
HEATMAP_COMPARE_FACTOR = 6


# ---------------------------------------------------------------- rows


def _base_row(cell: Cell, kind: str, settings: RunSettings) -> dict[str, Any]:
    cfg = settings.config
    return {
        "cell_id": cell.cell_id,
        "kind": kind,
        **cell.to_dict(),
        "device": settings.device,
        "fp32_math": settings.fp32_math if settings.device == "gpu" else "ieee",
        "preset": settings.preset,
        "num_stacks": cfg.num_stacks,
        "depth": cfg.depth,
        "channels": cfg.channels,
        "num_keypoints": cfg.num_keypoints,
        "input_height": cfg.input_hw[0],
        "input_width": cfg.input_hw[1],
    }


def _joined(*values: Any) -> str:
    """Comma-joined distinct non-empty texts, in order: the hosts (or node ids) of a cell's rounds."""
    found: list[str] = []
    for value in values:
        for part in str(value if value is not None else "").split(","):
            if part and part.lower() != "nan" and part not in found:
                found.append(part)
    return ",".join(found)


def _where(outcome: WorkerOutcome) -> dict[str, Any]:
    """The row's host and node_id columns from the outcome of the worker that measured it."""
    return {"host": outcome.host, "node_id": outcome.node_id}


def _result_values(result: WorkerResult) -> dict[str, Any]:
    """A worker result's fields by name, for building a row."""
    return dataclasses.asdict(result)


def _measured_row(
    base: dict[str, Any], status: str, error: str, wall_s: float, result: Mapping[str, Any], flops: int
) -> dict[str, Any]:
    """A row from a worker result: status, error, statistics of its samples, memory and timings."""
    row = {**base, "status": status, "error": error, "worker_wall_s": wall_s}
    for key in ("device", "first_call_ms", "warmup_calls", "import_s", "build_s", "setup_s", "num_params", "injected_slowdown",
                "allreduce_ms", "allreduce_share", "allreduce_method", "gpu_allocator_peak_bytes", "gpu_allocator_setup_peak_bytes",
                "gpu_allocator_timed_peak_bytes", "compiled_argument_bytes", "compiled_output_bytes", "compiled_temp_bytes",
                "nvml_process_used_bytes", "nvml_process_lookup", "nvml_device_used_bytes", "host_peak_rss_bytes"):  # fmt: skip
        if result.get(key) is not None:
            row[key] = result[key]
    if row.get("device") == "cpu":  # a framework that fell back to the CPU computed in IEEE fp32 whatever was asked
        row["fp32_math"] = "ieee"
    samples = result.get("samples_ns") or []
    if status == "ok" and samples:
        row["gflop_per_step"] = flops / 1e9
        row.update(summarize(samples, int(base["batch_size"]), flops))
    return row


CEILING_KINDS = ("conv3x3", "gemm")  # calibration phases on the model's own shapes


def ceilings(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, int], float]:
    """(device, framework, precision, batch size) -> that framework's best GFLOP/s on the model's conv and GEMM
    shapes on that device, and (device, "*", precision, batch size) -> the fastest framework's: the machine's
    ceiling. Keyed by the row's device, so a framework that fell back to the CPU never sets a GPU ceiling."""
    best: dict[tuple[str, str, str, int], float] = {}
    for row in rows:
        rate = num(row.get("achieved_gflop_per_s"))
        if row.get("kind") != "calibration" or row.get("status") != "ok" or row.get("phase") not in CEILING_KINDS:
            continue
        if math.isnan(rate):
            continue
        device, precision, batch = str(row.get("device")), str(row["precision"]), int(num(row["batch_size"]))
        for key in ((device, str(row["framework"]), precision, batch), (device, "*", precision, batch)):
            best[key] = max(best.get(key, 0.0), rate)
    return best


def _calibration_cell(framework: str, workload: CalibrationWorkload) -> Cell:
    """The summary cell of one calibration workload: execution names the probe, phase the workload kind."""
    probe = "gemm_benchmark" if workload.kind == "gemm" else "conv_benchmark"
    return Cell(framework, probe, workload.precision, workload.batch_size, workload.kind)


def _struck(stage: str, workload: CalibrationWorkload) -> bool:
    """Whether a calibration worker that ended during `stage` ended on `workload` (or before any workload)."""
    if not stage.startswith("calibrate "):
        return True
    return stage.partition(":")[0] == f"calibrate {workload.kind} {workload.precision} b{workload.batch_size}"


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

    def __init__(self, settings: RunSettings, store: RunStore, record: dict[str, Any],
                 executor: AbstractExecutor | None = None, args: list[str] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.store = store
        self.record = record
        self.args = list(args or [])
        self.session = WorkerSession(store.run_dir, record, settings.frameworks, settings.timeout_s, executor=executor)
        self.console = self.session.console
        self.active = self.session.active

    # -- helpers

    def _placement(self) -> dict[str, Any]:
        """The spec fields every worker of this run shares: the network, the device and the seed."""
        return self.settings.placement()

    def _save_record(self) -> None:
        self.store.write_run_json(self.record)

    # -- stages

    def check_equivalence(self, progress: Any, task: Any) -> None:
        """Heatmaps of every installed framework on one input, compared; disagreement is shouted.

        Each worker draws the input from the run's seed (the parent allocates nothing sized by --input-size)
        and saves its heatmaps; the parent loads them only when comparing them fits in memory."""
        s = self.settings
        input_shape = [1, *s.config.input_hw, 3]  # (1, H, W, 3)
        outputs: dict[str, Path] = {}
        entries: dict[str, dict[str, Any]] = {}
        for fw, impl in self._variants():
            key = variant_key(fw, impl)  # the framework's name for its default variant, "jax-tuned" for another
            progress.update(task, description=f"{key}: equivalence check")
            execution = settings_mod.EXECUTIONS[fw][0]
            output = self.session.workdir / f"equivalence_{key}.npy"
            spec = EquivalenceSpec(framework=fw, execution=execution, input_shape=input_shape,
                                   output_npy=str(output), impl=impl, **self._placement())  # fmt: skip
            outcome = self.session.call(spec, f"{key}-equivalence")
            entries[key] = {
                "status": outcome.status,
                "error": outcome.error,
                "execution": execution,
                "impl": impl,
                "precision": "fp32",
            }
            if outcome.status == "ok":
                outputs[key] = output
            progress.advance(task)
        heatmaps = self._load_heatmaps(outputs, entries)
        for fw, verdict in compare(heatmaps, s.equivalence_rtol).items():
            entries[fw].update(verdict)
        self.record["equivalence"] = {
            "rtol": s.equivalence_rtol,
            "input_shape": input_shape,
            "weights": "impls.init_weights(config, seed=0)",
            "frameworks": entries,
        }
        self._save_record()
        self._report_equivalence(entries)

    @staticmethod
    def _load_heatmaps(outputs: Mapping[str, Path], entries: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
        """The saved heatmaps, when comparing them fits in half the available memory; else each entry fails."""
        sizes = {fw: int(np.load(path, mmap_mode="r").nbytes) for fw, path in outputs.items()}  # mapped, not read
        need, available = HEATMAP_COMPARE_FACTOR * sum(sizes.values()), psutil.virtual_memory().available
        if need > available / 2:
            error = (f"the heatmaps are too large to compare in this process ({sum(sizes.values()) / 2**30:.1f} GiB "
                     f"in all, about {need / 2**30:.1f} GiB to compare, {available / 2**30:.1f} GiB available); "
                     "give a smaller --input-size")  # fmt: skip
            for fw in outputs:
                entries[fw].update(status="failed", error=error)
            return {}
        return {fw: np.load(path) for fw, path in outputs.items()}

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
        for fw, impl in self._variants():
            key = variant_key(fw, impl)
            progress.update(task, description=f"{key}: gradient check (fp64)")  # not counted in the bar's total
            execution = settings_mod.EXECUTIONS[fw][0]
            output = self.session.workdir / f"gradients_{key}.npz"
            spec = GradientCheckSpec(framework=fw, execution=execution, precision=gradients.GRADIENT_PRECISION,
                                     batch_size=batch_size, output_npz=str(output), impl=impl,
                                     **self._placement())  # fmt: skip
            outcome = self.session.call(spec, f"{key}-gradient-check")
            result = outcome.result
            assert isinstance(result, GradientCheckResult)
            entries[key] = {"status": outcome.status, "error": outcome.error, "execution": execution, "impl": impl,
                            "precision": gradients.GRADIENT_PRECISION, "loss": result.loss}  # fmt: skip
            if outcome.status == "ok" and result.loss is not None:
                with np.load(output) as saved:
                    grads[key] = {name: saved[name] for name in saved.files}
                losses[key] = result.loss
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

    def _variants(self) -> list[tuple[str, str]]:
        """(framework, variant) for every variant of every framework this run can measure, in cell order."""
        return [(fw, impl) for fw in self.active for impl in self.settings.impls_of(fw)]

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
        """Other processes on the cores distort every figure (torch's OpenMP threads most): say so up front.
        On a Ray cluster, of every node that takes cells (its load when it sent its environment record)."""
        if self.record.get("executor") == "ray":
            for node, env in (self.record.get("nodes") or {}).items():
                load, cores = env.get("load_average"), env.get("cpu_cores_usable")
                if load and cores and load[0] > BUSY_LOAD_PER_CORE * cores:
                    self.session.warn(f"node {node} ({env.get('host')}) is busy (1-minute load {load[0]:.1f} on {cores} "
                                      "cores); its timings will be slow and noisy")  # fmt: skip
            return
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
        failed = {(f.kind, f.precision, f.batch_size): f for f in result.failures}
        missing = set(result.missing)
        rows = []
        for workload in workloads:
            cell = _calibration_cell(framework, workload)
            base = _base_row(cell, "calibration", s)
            key = (workload.kind, workload.precision, workload.batch_size)
            found = measured.get(key)
            status, error = outcome.status, outcome.error
            if status == "ok" and workload.kind in missing:
                status, error = "skipped", f"{framework}'s impls module has no {cell.execution} probe"
            elif status == "ok" and key in failed:
                status, error = failed[key].status, failed[key].error
            elif status == "ok" and found is None:
                status, error = "failed", "the worker returned no measurement for this cell"
            elif status != "ok" and not _struck(outcome.stage, workload):
                # The worker died on another workload (the stage it announced last): this one was not the cause.
                status, error = "failed", f"not measured: the calibration worker died during {outcome.stage} ({status})"
            values = {**_result_values(result), **(dataclasses.asdict(found) if found else {})}
            row = _measured_row(base, status, error, outcome.wall_s, values, workload.flops)
            row.update(_where(outcome))
            row["device_fallback"] = framework in self.record.get("device_fallback", {})
            self.store.add(row, found.samples_ns if found and status == "ok" else [])
            rows.append(row)
        return rows

    def _rounds_done(self, cell: Cell) -> int | None:
        """Rounds of `cell` already measured; None when its row is final (skipped or failed: no more rounds)."""
        row = next((r for r in self.store.rows() if r["cell_id"] == cell.cell_id), None)
        if row is None:
            return 0
        if str(row["status"]) != "ok":
            return None
        return len(self.store.rounds_of(cell.cell_id))

    def run_cell(self, cell: Cell, round_number: int = 1) -> dict[str, Any]:
        """Measure one round of one cell (or record why it is skipped) and store its row and samples.

        The row is recomputed from every round so far; first_call_ms, import and build times are round 1's
        (the cold start). A failed round ends the cell: its row says which round failed and why.
        """
        skip = self.session.skip_reason(cell.framework)
        if skip:
            row = {**_base_row(cell, "model", self.settings), "status": "skipped", "error": skip}
            self.store.add(row)
            return row
        job = self._cell_job(cell, round_number)
        return self._cell_row(cell, round_number, self.session.call(job.spec, job.name))

    def _cell_job(self, cell: Cell, round_number: int) -> Job:
        """The worker of one round of a cell; a later round asks for the node of the cell's first round."""
        s = self.settings
        cache = str(self.session.workdir / "compile-cache") if s.rounds > 1 else ""
        spec = CellSpec(framework=cell.framework, execution=cell.execution, precision=cell.precision,
                        batch_size=cell.batch_size, phase=cell.phase, loop=s.loop(), compile_cache_dir=cache,
                        impl=cell.impl, devices=cell.devices, **self._placement())  # fmt: skip
        name = cell.cell_id if s.rounds == 1 else f"{cell.cell_id}-round{round_number}"
        node = ""
        if round_number > 1 and self.session.concurrent:
            previous = next((r for r in self.store.rows() if r["cell_id"] == cell.cell_id), {})
            first = nodes.row_node_ids(previous)[0]
            if self.session.executor.node_alive(first):
                node = first
            else:
                self.session.warn(f"{cell.cell_id}: round {round_number} cannot run on node {first}, where its earlier "
                                  "rounds ran (the node is gone); it runs on another node, so this cell's rounds "
                                  "are not one machine's (its row's node_id lists both)")  # fmt: skip
        return Job(spec, name, node)

    def _cell_row(self, cell: Cell, round_number: int, outcome: WorkerOutcome) -> dict[str, Any]:
        """The cell's row and samples from one more round's outcome, stored."""
        s = self.settings
        base = _base_row(cell, "model", s)
        result = outcome.result
        assert isinstance(result, CellResult)
        if result.math:
            self.record.setdefault("gpu_math", {})[cell.framework] = result.math
        if result.model_settings and round_number == 1:
            self.record.setdefault("cell_settings", {})[cell.cell_id] = result.model_settings
            self._save_record()
        if result.injected_slowdown and round_number == 1:
            self.session.warn(f"{cell.cell_id}: the test switch {SLOWDOWN_ENV} lengthened every timed step by "
                              f"{result.injected_slowdown:.0%}; these timings are not the model's")  # fmt: skip
        earlier = self.store.rounds_of(cell.cell_id) if round_number > 1 else []
        rounds = [*earlier, result.samples_ns] if outcome.status == "ok" else []
        values = _result_values(result)
        where = _where(outcome)
        if round_number > 1:  # keep round 1's cold-start figures; the statistics below cover every round
            previous = next(r for r in self.store.rows() if r["cell_id"] == cell.cell_id)
            values.update({k: previous.get(k) for k in ("first_call_ms", "import_s", "build_s", "setup_s")})
            where = {key: _joined(previous.get(key), value) for key, value in where.items()}
        error = outcome.error if s.rounds == 1 or outcome.status == "ok" else f"round {round_number} of {s.rounds}: {outcome.error}"
        flops = count_flops(s.config, cell.batch_size, cell.phase)
        row = _measured_row(base, outcome.status, error, outcome.wall_s, {**values, "samples_ns": rounds}, flops)
        row.update(where)
        key = variant_key(cell.framework, cell.impl)
        equivalence = self.record.get("equivalence", {}).get("frameworks", {}).get(key, {})
        row["equivalence_max_rel_err"] = equivalence.get("max_rel_err")
        row["equivalent"] = equivalence.get("equivalent")
        # On several devices the gradients that matter are the data-parallel step's (bench.run.data_parallel).
        checks = self.record.get("data_parallel_check" if cell.devices > 1 else "gradient_check") or {}
        gradient = checks.get("frameworks", {}).get(data_parallel.entry_key(key, cell.devices) if cell.devices > 1 else key, {})
        row["gradient_max_rel_err"] = gradient.get("max_rel_err")
        row["gradients_equivalent"] = gradient.get("equivalent")
        row["per_device_batch"] = cell.per_device_batch
        best = ceilings(self.store.rows())
        if row.get("achieved_gflop_per_s") is not None:
            for who, rate_column, share_column in (("*", "conv_ceiling_gflop_per_s", "ceiling_fraction"),
                                                   (cell.framework, "framework_ceiling_gflop_per_s", "framework_ceiling_fraction")):  # fmt: skip
                ceiling = best.get((str(row.get("device")), who, cell.precision, cell.batch_size))
                if ceiling:
                    row[rate_column] = ceiling
                    row[share_column] = row["achieved_gflop_per_s"] / ceiling
        row["device_fallback"] = cell.framework in self.record.get("device_fallback", {})
        self.store.add(row, rounds)
        return row

    def execute(self) -> int:
        """Run everything not yet done, round by round (bench.run.plan); print the table; return the exit code."""
        s, done = self.settings, self.store.done_cell_ids()
        todo = self._todo()
        need_equivalence = s.checks and not self.record.get("equivalence") and bool(self.active)
        workloads = [CalibrationWorkload(**w) for w in calibration_workloads(s.config, s.batch_sizes, s.precisions)]
        calibrations = [fw for fw in self.active if s.checks and any(_calibration_cell(fw, w).cell_id not in done for w in workloads)]
        total = len(todo) + len(calibrations) + (len(self._variants()) if need_equivalence else 0)
        cells = len({cell.cell_id for _, cell in todo})
        self.record["rounds"] = {
            "rounds": s.rounds, "order_seed": s.seed, "order": "bench.run.plan.round_order(cells, rounds, seed)",
            "compile_caches": "off (one round)" if s.rounds == 1 else (
                "round 1 of each cell starts from an empty cache of this run (cold first_call_ms); later rounds reuse "
                "torch inductor's and JAX's compilations (TensorFlow compiles again); a resumed run starts empty"),
        }  # fmt: skip
        self.console.print(
            f"hgbench run [bold]{self.record['run_id']}[/]: {cells} cells to measure on {s.device}"
            f"{f' in {s.rounds} interleaved rounds' if s.rounds > 1 else ''} "
            f"(preset {s.preset}, input {s.config.input_hw[0]}x{s.config.input_hw[1]}), results in {escape(str(self.store.run_dir))}"
        )
        if not s.checks:
            self.console.print("timing only (--timing-only): no equivalence or gradient check and no calibration in this run")
        self._record_executor()
        self._warn_busy()
        for fw, why in self.record.get("device_fallback", {}).items():
            out.warn(self.console, f"{fw} runs on the CPU although the run is on the GPU: {why}")
        started = time.perf_counter()
        with self.session.workers(total) as (progress, task):
            if need_equivalence:
                self.check_equivalence(progress, task)
                self.check_gradients(progress, task)
                self._warn_threads()
            if s.checks and not self.record.get("data_parallel_check") and any(n > 1 for n in s.devices):
                self.record["data_parallel_check"] = data_parallel.check(self, progress, task)
                self._save_record()
                data_parallel.announce(self.console, self.record["data_parallel_check"])
            for fw in calibrations:
                progress.update(task, description=f"{fw}: conv and GEMM calibration")
                self.calibrate(fw)
                progress.advance(task)
            self._save_record()
            if self.session.concurrent:
                self._run_rounds_at_once(todo, progress, task)
            else:
                self._run_one_at_a_time(todo, progress, task)
        self._fill_scaling()
        self._warn_mixed_nodes()
        self.record["bench_wall_s"] = self.record.get("bench_wall_s", 0.0) + time.perf_counter() - started
        self.record["status"] = "complete"
        self.record["load_average_at_end"] = envinfo.load_average()
        self.record["finished_utc"] = envinfo.utc_now()
        self._save_record()
        rows = self.store.rows()
        self.console.print(out.summary_table(rows, f"hgbench {self.record['run_id']} ({s.device}, {s.preset})"))
        out.print_problems(self.console, rows)
        if s.rounds == 1:
            self.console.print("one round per cell: intervals know the noise within one worker process only "
                               "(use --rounds 3 or more for intervals that include the process-to-process noise)")  # fmt: skip
        self.console.print(f"wall time {self.record['bench_wall_s']:.0f} s; results: {escape(str(self.store.run_dir))}")
        return exit_code(rows, {**self.record.get("equivalence", {}).get("frameworks", {}), **self._gradient_entries(),
                                **data_parallel.entries(self.record)})

    def _run_one_at_a_time(self, todo: list[tuple[int, Cell]], progress: Any, task: Any) -> None:
        """The local executor's loop: one worker at a time, in the run's interleaved order."""
        for round_number, cell in todo:
            if self._rounds_done(cell) is None:  # an earlier round of this run failed: the cell is over
                progress.advance(task)
                continue
            label = cell.cell_id if self.settings.rounds == 1 else f"{cell.cell_id} (round {round_number}/{self.settings.rounds})"
            progress.update(task, description=label)
            row = self.run_cell(cell, round_number)
            if row["status"] != "ok":
                progress.console.print(f"[red]{row['status']}[/] {label}")
            progress.advance(task)

    def _run_rounds_at_once(self, todo: list[tuple[int, Cell]], progress: Any, task: Any) -> None:
        """A concurrent executor's loop: round by round, every cell of the round handed over at once (in the
        round's interleaved order), each row written as its worker comes back. A round waits for the one
        before it: a cell's next round needs its earlier rounds' samples, and ends with a failed one."""
        s = self.settings
        for round_number in sorted({r for r, _ in todo}):
            cells: list[Cell] = []
            for r, cell in todo:
                if r != round_number:
                    continue
                if self._rounds_done(cell) is None:  # an earlier round of this run failed: the cell is over
                    progress.advance(task)
                elif self.session.skip_reason(cell.framework):
                    self.run_cell(cell, round_number)  # its skipped row
                    progress.advance(task)
                else:
                    cells.append(cell)
            jobs = [self._cell_job(cell, round_number) for cell in cells]
            of_rounds = f"round {round_number}/{s.rounds}: " if s.rounds > 1 else ""
            progress.update(task, description=f"{of_rounds}{len(jobs)} cells on the Ray cluster")
            with closing(self.session.run_many(jobs)) as outcomes:
                for index, outcome in outcomes:
                    cell = cells[index]
                    row = self._cell_row(cell, round_number, outcome)
                    label = cell.cell_id if s.rounds == 1 else f"{cell.cell_id} (round {round_number}/{s.rounds})"
                    if row["status"] != "ok":
                        progress.console.print(f"[red]{row['status']}[/] {label} on {outcome.host or 'no node'}")
                    progress.advance(task)

    def _record_executor(self) -> None:
        """run.json: where the workers run (executor, Ray address) and every node's environment record; a
        warning when the nodes that take cells are not all of one type."""
        described = self.session.executor.describe(self.args)
        found = described.pop("nodes", None)
        self.record.update(described)
        if found is None:
            return
        self.record.setdefault("nodes", {}).update(found)  # a resumed run keeps the nodes of its earlier rows
        hosts = ", ".join(str(env.get("host", node)) for node, env in found.items())
        self.console.print(f"executor: Ray cluster at {self.record.get('ray_address')} "
                           f"({self.record.get('ray_cluster')}), {len(found)} node(s) with a measurement slot: {escape(hosts)}")  # fmt: skip
        for node, env in found.items():
            if "error" in env:
                self.session.warn(f"node {node} did not send its environment record ({env['error']}); its cells "
                                  "cannot be checked for a different node type")  # fmt: skip
        warning = nodes.cluster_warning({node: env for node, env in found.items() if "error" not in env})
        if warning:
            self.session.warn(warning)
        self._save_record()

    def _warn_mixed_nodes(self) -> None:
        """Rows measured on nodes of different types are not comparable: say so (console, run.json)."""
        model = [r for r in self.store.rows() if r.get("kind") == "model"]
        warning = nodes.mixed_types_warning(model, self.record)
        if warning and warning not in self.record["warnings"]:
            self.session.warn(warning)

    def _fill_scaling(self) -> None:
        """scaling_efficiency of every multi-device cell whose 1-device twin this run measured (bench.run.scaling)."""
        found = scaling.efficiencies(self.store.rows())
        for row in self.store.rows():
            if str(row["cell_id"]) in found:
                self.store.add({**row, "scaling_efficiency": found[str(row["cell_id"])]}, self.store.rounds_of(str(row["cell_id"])))

    def _todo(self) -> list[tuple[int, Cell]]:
        """(round, cell) still to measure, in the run's interleaved order (a resumed run skips what is done)."""
        done = {cell.cell_id: self._rounds_done(cell) for cell in self.settings.cells()}
        return [(r, cell) for r, cell in round_order(self.settings.cells(), self.settings.rounds, self.settings.seed)
                if done[cell.cell_id] is not None and r > done[cell.cell_id]]  # fmt: skip


@dataclass(frozen=True)
class RunResult:
    """How a run ended and where its results are."""

    exit_code: int  # 0 ok, 1 a cell failed or a framework disagreed, 129/130/143 a signal, 75 disk full
    run_dir: Path

    @property
    def interrupted(self) -> bool:
        """True when the run stopped before its last cell."""
        return self.exit_code in INTERRUPTED_EXIT_CODES or self.exit_code == DISK_FULL_EXIT_CODE


def expected_bytes(settings: RunSettings) -> int:
    """About how much disk a run of `settings` needs at most: its rows and samples twice over (each CSV is
    rewritten through a temp copy), plus run.json and the logs."""
    workloads = len(calibration_workloads(settings.config, settings.batch_sizes, settings.precisions))
    rows = len(settings.cells()) + len(settings.frameworks) * workloads
    samples_per_row = settings.iters or MAX_ITERS
    return 2 * rows * (2048 + 120 * samples_per_row) + 512 * 1024


def open_executor(settings: RunSettings) -> AbstractExecutor:
    """Where the run's workers run: this machine, or the Ray cluster it names (connected, or a local one started:
    SettingsError when Ray is missing, the cluster cannot be reached or offers no measurement slot)."""
    return RayExecutor.connect(settings.ray_address) if settings.executor == "ray" else LocalExecutor()


def check_before_measuring(settings: RunSettings, out_dir: str | Path, flag: str) -> None:
    """Before any worker starts: the test switch is well formed and the results folder writable with room."""
    try:
        injected_slowdown(os.environ)
    except ValueError as err:
        raise SettingsError(str(err)) from None
    check_output_dir(out_dir, flag, expected_bytes(settings))


def start(settings: RunSettings, args: list[str], run_id: str | None = None) -> RunResult:
    """A new run of `settings` in a fresh results directory (results/<run_id> when given).

    On a GPU each framework is first asked whether it sees the GPU (bench.run.devices): SettingsError under
    --device gpu when one cannot, a recorded fallback under --device auto."""
    check_before_measuring(settings, settings.out_dir, "--out")
    fallbacks = gpu_fallbacks(settings)
    executor = open_executor(settings)  # a bad --ray-address leaves no run folder
    try:
        return _start(settings, args, run_id, fallbacks, executor)
    finally:
        executor.close()


def _start(settings: RunSettings, args: list[str], run_id: str | None, fallbacks: dict[str, str],
           executor: AbstractExecutor) -> RunResult:  # fmt: skip
    run_dir = new_run_dir(settings.out_dir, settings.device, run_id)
    record: dict[str, Any] = {
        "run_id": run_dir.name,
        "status": "running",
        "process": procs.this_process().to_dict(),  # who measures it: --resume tells a live run from a dead one
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
        "warnings": [f"{fw} runs on the CPU although the run is on the GPU: {why}" for fw, why in fallbacks.items()],
        "device_fallback": fallbacks,
        "resumes": [],
    }
    return _execute(Runner(settings, RunStore.create(run_dir), record, executor, args))


def resume(run_dir: Path, args: list[str]) -> RunResult:
    """Complete an interrupted run with the settings it recorded; RunDirError when it is not one this version reads."""
    store = RunStore.reopen(run_dir)
    record = store.read_run_json()
    settings = settings_from_record(record["settings"], f"--resume: {run_dir / 'run.json'}")
    check_before_measuring(settings, run_dir, "--resume")
    # A run left "running" by a parent that died, and any worker of it still alive: said, and killed.
    notes = procs.check_stale_run(record, run_dir) + procs.reap_orphans(run_dir)
    record.setdefault("resumes", []).append({"utc_time": envinfo.utc_now(), "command_line": envinfo.command_line(args)})
    record.update(status="running", process=procs.this_process().to_dict())
    executor = open_executor(settings)  # the recorded executor, as the run began
    try:
        runner = Runner(settings, store, record, executor, args)
        for note in notes:
            runner.session.warn(note)
        return _execute(runner)
    finally:
        executor.close()


def settings_from_record(recorded: Mapping[str, Any], where: str) -> RunSettings:
    """RunSettings from a run.json's settings, or RunDirError saying the record is not one this version reads."""
    try:
        return RunSettings.from_dict(recorded)
    except (TypeError, ValueError, KeyError) as err:
        raise RunDirError(f"{where}: the recorded settings cannot be used by this version ({type(err).__name__}: "
                          f"{err}); re-run the cells instead of resuming or replaying them") from None  # fmt: skip


def _execute(runner: Runner) -> RunResult:
    run_dir = runner.store.run_dir
    hint = f"finished cells are in {run_dir}; complete the run with: python -m bench run --resume {run_dir}"

    def body() -> int:
        runner._save_record()
        return runner.execute()

    code = run_guarded(body, runner.record, runner._save_record, runner.console, hint)
    return RunResult(code, run_dir)
