"""`python -m bench profile`: where a step's time goes, per stage and per op, in each framework's own profiler.

One fresh worker process per (framework, execution, phase) cell calls the implementation's `profile()`
(the contract is impls/profiling.py), which writes the profiler's traces under
<run>/traces/<framework>-<execution>-<phase>/ and returns a dict. The parent checks that dict against
the contract (a breach becomes a failed row with the broken promise as its error), then rewrites
stages.csv, ops.csv, flops.csv and compile.csv (bench/profile_tables.py) after every cell. Faults are
data, as in `run`: a crash, out-of-memory or timeout becomes a row, and the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.core import console as out
from bench.core import envinfo
from bench.core.columns import FAILED_STATUSES
from bench.core.files import check_output_dir
from bench.core.rundir import ProfileStore, new_run_dir
from bench.core.settings import (
    Cell,
    RunSettings,
    SettingsError,
    build_settings,
    parse_choices,
    parse_int_list,
    parse_positive_int,
)
from bench.engine import procs
from bench.engine.protocol import WORKER_ENV, ProfileResult, ProfileSpec
from bench.engine.session import WorkerSession, run_guarded
from bench.profile import tables
from impls.base import PRECISIONS
from impls.profiling import ProfileContractError, check_profile
from impls.registry import DEFAULT_IMPL

DEFAULT_STEPS = 5  # profiled steps: enough for a median, few enough that trace files stay small
DEFAULT_TOP_K = 15  # ops per cell in the op table
# Self times of distinct ops add up to at most the step unless ops overlap; 5% allows for timer granularity.
OP_SUM_TOLERANCE = 1.05
RUN_DIR_SUFFIX = "profile"  # results/<UTC time>-<device>-profile, beside `run`'s folders
MIN_BYTES_PER_CELL = 1 << 20  # free space a profile run needs at least per cell (tables, a small trace)


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile run measures: `run`'s settings restricted to one batch size and one precision, plus its loop."""

    base: RunSettings  # frameworks, config, phases, executions, device, warmup, timeout, out dir
    steps: int  # profiled steady-state steps per cell, after `base.warmup` untimed ones
    top_k: int  # ops kept per cell, by self time

    @property
    def batch_size(self) -> int:
        """The one batch size profiled."""
        return self.base.batch_sizes[0]

    @property
    def precision(self) -> str:
        """The one precision profiled."""
        return self.base.precisions[0]

    def cells(self) -> list[Cell]:
        """Every cell, in a stable order: framework, execution, phase."""
        return self.base.cells()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for run.json (only what a profile run uses)."""
        b = self.base
        return {
            "frameworks": list(b.frameworks),
            "framework_selection": b.framework_selection,
            "preset": b.preset,
            "config": b.config.to_dict(),
            "batch_size": self.batch_size,
            "precision": self.precision,
            "phases": list(b.phases),
            "executions": {fw: list(ex) for fw, ex in b.executions.items()},
            "impls": {fw: list(b.impls_of(fw)) for fw in b.frameworks},
            "device": b.device,
            "device_requested": b.device_requested,
            "warmup": b.warmup,
            "steps": self.steps,
            "top_k": self.top_k,
            "seed": b.seed,
            "timeout_s": b.timeout_s,
            "out_dir": b.out_dir,
        }


def build_profile_settings(
    *,
    steps: str | None = None,
    top_k: str | None = None,
    batch_size: str | None = None,
    precision: str | None = None,
    **options: Any,
) -> ProfileSettings:
    """ProfileSettings from the `profile` command's option strings (None = not given); raises SettingsError.

    Everything `run` also has is parsed by bench.core.settings.build_settings, so the two commands accept and
    reject the same values.
    """
    if batch_size is not None and len(parse_int_list("--batch-size", batch_size)) > 1:
        raise SettingsError(
            f"--batch-size takes one batch size for profile, got {batch_size!r}; profile one per run, "
            f"e.g. --batch-size {batch_size.split(',')[0].strip()}"
        )
    if precision is not None and len(parse_choices("--precision", precision, PRECISIONS)) > 1:
        raise SettingsError(f"--precision takes one precision for profile (fp32 or bf16), got {precision!r}")
    # One variant per profile: the default one unless --impl names another (a run measures both by default).
    options["impl"] = options.get("impl") or DEFAULT_IMPL
    base = build_settings(batch_size=batch_size, precision=precision, **options)
    several = [fw for fw in base.frameworks if len(base.impls_of(fw)) > 1]
    if several:
        raise SettingsError(
            f"--impl takes one variant per framework for profile (a profile run's tables are per framework and "
            f"execution), got {options.get('impl')!r}, which gives {several[0]} {len(base.impls_of(several[0]))}; "
            "profile each variant in its own run, e.g. --impl tuned, then --impl idiomatic"
        )
    return ProfileSettings(
        base=base,
        steps=parse_positive_int("--steps", steps) if steps is not None else DEFAULT_STEPS,
        top_k=parse_positive_int("--top-k", top_k) if top_k is not None else DEFAULT_TOP_K,
    )


# ---------------------------------------------------------------- the run


class ProfileRunner:
    """One profile run: a worker per cell, every result checked, the CSVs rewritten after each cell."""

    def __init__(self, settings: ProfileSettings, run_dir: Path, record: dict[str, Any]) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.record = record
        self.store = ProfileStore(run_dir)
        # Warnings go to stderr, so they do not drown in the tables printed on stdout.
        errors = Console(stderr=True, highlight=False)
        self.session = WorkerSession(run_dir, record, settings.base.frameworks, settings.base.timeout_s, errors)
        self.console = out.make_console()

    def save_record(self) -> None:
        """run.json, atomically."""
        self.store.write_run_json(self.record)

    def _fail(self, cell: Cell, status: str, error: str) -> None:
        self.store.add("stages.csv", [tables.failure_row(cell, status, error)])

    def _spec(self, cell: Cell, trace_dir: Path) -> ProfileSpec:
        s, b = self.settings, self.settings.base
        return ProfileSpec(
            framework=cell.framework, execution=cell.execution, precision=cell.precision, batch_size=cell.batch_size,
            phase=cell.phase, **b.placement(), warmup=b.warmup, steps=s.steps, top_k=s.top_k, trace_dir=str(trace_dir),
            impl=cell.impl,
        )  # fmt: skip

    def profile_cell(self, cell: Cell) -> str:
        """Profile one cell (or record why not) and store its rows; returns the cell's status."""
        key = tables.cell_key(cell)
        entry: dict[str, Any] = self.record["cells"].setdefault(key, {})
        error = self.session.skip_reason(cell.framework)
        if error:
            entry.update(status="skipped", error=error)
            self._fail(cell, "skipped", error)
            return "skipped"
        trace_dir = self.run_dir / "traces" / key
        trace_dir.mkdir(parents=True, exist_ok=True)
        outcome = self.session.call(self._spec(cell, trace_dir), key)
        entry.update(
            status=outcome.status,
            error=outcome.error,
            worker_wall_s=outcome.wall_s,
            device=outcome.result.device,
            trace_dir=str(trace_dir.relative_to(self.run_dir)),
        )
        if outcome.status != "ok":
            self._fail(cell, outcome.status, outcome.error)
            return outcome.status
        assert isinstance(outcome.result, ProfileResult)
        result = outcome.result.profile
        try:
            check_profile(result, self.settings.base.config, cell.phase)
            tables.check_result_tables(result, trace_dir)
        except (ProfileContractError, KeyError, TypeError) as err:  # a malformed dict is the worker's breach, not ours
            error = f"profile() broke the contract in impls/profiling.py: {type(err).__name__}: {err}"
            entry.update(status="failed", error=error)
            self._fail(cell, "failed", error)
            return "failed"
        self._store_result(cell, result, entry)
        return "ok"

    def _store_result(self, cell: Cell, result: Mapping[str, Any], entry: dict[str, Any]) -> None:
        config = self.settings.base.config
        self.store.add("stages.csv", tables.stage_rows(cell, result, config))
        self.store.add("ops.csv", tables.op_rows(cell, result))
        self.store.add("flops.csv", [tables.flop_row(cell, result, config)])
        self.store.add("compile.csv", [tables.compile_row(cell, result)])
        entry.update(
            stage_method=result["stage_method"],
            stage_note=result.get("stage_note", ""),
            trace_files=list(result["trace_files"]),
            step_ms=result["step_ms"],
        )
        if not result["trace_files"]:
            self.session.warn(f"{tables.cell_key(cell)}: profile() wrote no trace file")
        op_self_ms, op_step_ms = sum(float(row["self_ms"]) for row in result["ops"]), float(result["op_step_ms"])
        if op_self_ms > OP_SUM_TOLERANCE * op_step_ms:
            self.session.warn(
                f"{tables.cell_key(cell)}: the listed ops' self times sum to {op_self_ms:.3g} ms per step, "
                f"{op_self_ms / op_step_ms:.0%} of the profiled step ({op_step_ms:.3g} ms): only ops that overlap "
                "(inter-op threads, GPU streams) can do that; otherwise the op rows are not per profiled step"
            )
        count = tables.recompilations(result)
        if count:
            self.session.warn(
                f"{tables.cell_key(cell)} recompiled {count} time(s) in the timed loop: its step times "
                "include compilation, and the profile does not show the steady state"
            )

    def execute(self) -> int:
        """Profile every cell; print the tables; return 1 when a cell failed, else 0."""
        s, b = self.settings, self.settings.base
        cells = s.cells()
        self.console.print(
            f"hgbench profile [bold]{self.record['run_id']}[/]: {len(cells)} cells on {b.device} (preset {b.preset}, "
            f"input {b.config.input_hw[0]}x{b.config.input_hw[1]}, batch {s.batch_size}, {s.precision}, "
            f"{b.warmup} warm-up + {s.steps} profiled steps), results in {escape(str(self.run_dir))}"
        )
        started = time.perf_counter()
        statuses = []
        with self.session.workers(len(cells), prefix="hgbench-profile-") as (progress, task):
            for cell in cells:
                progress.update(task, description=tables.cell_key(cell))
                status = self.profile_cell(cell)
                statuses.append(status)
                self.store.write()
                self.save_record()
                if status != "ok":
                    progress.console.print(f"[red]{status}[/] {tables.cell_key(cell)}")
                progress.advance(task)
        self.record.update(
            status="complete", bench_wall_s=time.perf_counter() - started, finished_utc=envinfo.utc_now()
        )
        self.save_record()
        print_tables(self.console, self.run_dir, self.store, self.record)
        return 1 if any(status in FAILED_STATUSES for status in statuses) else 0


def new_record(settings: ProfileSettings, run_dir: Path, args: list[str]) -> dict[str, Any]:
    """run.json of a new profile run: kind "profile", settings, environment, and room for the cells."""
    return {
        "run_id": run_dir.name,
        "kind": "profile",
        "status": "running",
        "process": procs.this_process().to_dict(),
        "started_utc": envinfo.utc_now(),
        "command_line": envinfo.command_line(args),
        "settings": settings.to_dict(),
        "worker_env": dict(WORKER_ENV),
        "stage_methods": {
            "profiler": "framework profiler events inside each stage's named scope",
            "staged": "one compiled function per stage, device sync after each (impls.profiling.time_staged)",
        },
        "environment": envinfo.collect(args),
        "frameworks": {},
        "cells": {},
        "warnings": [],
    }


def start(settings: ProfileSettings, args: list[str]) -> int:
    """A new profile run of `settings` in results/<UTC time>-<device>-profile/; returns the exit code."""
    # Trace sizes are not known in advance: the floor is the tables and a small trace per cell.
    check_output_dir(settings.base.out_dir, "--out", MIN_BYTES_PER_CELL * len(settings.cells()))
    run_dir = new_run_dir(settings.base.out_dir, f"{settings.base.device}-{RUN_DIR_SUFFIX}")
    runner = ProfileRunner(settings, run_dir, new_record(settings, run_dir, args))
    hint = f"the cells profiled so far are in {run_dir}"

    def body() -> int:
        runner.save_record()
        return runner.execute()

    return run_guarded(body, runner.record, runner.save_record, runner.console, hint)


# ---------------------------------------------------------------- terminal output


def _rich_table(frame: pd.DataFrame, title: str, caption: str | None = None, left: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, caption=caption, header_style="bold", box=None, pad_edge=False, caption_justify="left")
    for column in frame.columns:
        # A cell's share column sits right of its ms column, whose header names the cell: "%" suffices.
        header = "%" if str(column).endswith("] %") else str(column)
        justify = "left" if column in left else "right"
        if column in ("note", "op"):  # may run long: cut here, kept whole in the CSVs and the report
            table.add_column(escape(header), justify=justify, overflow="ellipsis", no_wrap=True, max_width=60)
        else:  # values never wrap (headers may): the long columns above give way
            widest = max((len(str(value)) for value in frame[column]), default=1)
            table.add_column(escape(header), justify=justify, min_width=max(widest, 1))
    for row in frame.astype(str).itertuples(index=False):
        cells = [escape(value) for value in row]
        table.add_row(*[f"[bold red]{c}[/]" if c.endswith(("RECOMPILED", "NO")) else c for c in cells])
    return table


def print_tables(console: Console, run_dir: Path, store: ProfileStore, record: Mapping[str, Any]) -> None:
    """Stage tables per phase, op tables per cell, the FLOP check, the compile table, problems and traces."""
    stages, ops = store.frame("stages.csv"), store.frame("ops.csv")
    phases = [p for p in ("forward", "forward_backward") if p in set(stages["phase"])]
    for phase in phases:
        if not tables.ok_cells(stages, phase):
            continue
        frame = tables.stage_display(stages, phase)
        console.print(_rich_table(frame, f"Where a {phase} step goes, per stage", tables.METHOD_FOOTNOTE, ("stage",)))
    for phase in phases:
        for cell in tables.ok_cells(stages, phase):
            frame = tables.op_display(ops, cell["framework"], cell["execution"], phase)
            title = f"Top {len(frame)} ops by self time: {cell['framework']} {cell['execution']} {phase} (per step)"
            console.print(_rich_table(frame, title, left=("rank", "op")))
    flops, compiles = store.frame("flops.csv"), store.frame("compile.csv")
    if not flops.empty:
        caption = (
            "analytic = impls.count_flops (convolutions only, 2 FLOPs per multiply-add); diff = reported / analytic - 1"
        )
        console.print(
            _rich_table(
                tables.flop_display(flops),
                "Conv FLOPs: analytic vs framework-reported",
                caption,
                ("cell", "source", "note"),
            )
        )
    if not compiles.empty:
        console.print(_rich_table(tables.compile_display(compiles), "Compilation", None, ("cell", "note")))
    problems = tables.problem_rows(stages)
    for row in problems.itertuples():
        style = "yellow" if row.status == "skipped" else "red"
        console.print(f"[{style}]{row.status}[/] {row.cell}: {escape(row.error)}", soft_wrap=True)
    _print_traces(console, run_dir, record)
    console.print(
        f"results: {escape(str(run_dir))} (stages.csv, ops.csv, flops.csv, compile.csv, run.json); "
        f"report: python -m bench report {escape(str(run_dir))}"
    )


def _print_traces(console: Console, run_dir: Path, record: Mapping[str, Any]) -> None:
    files = [
        run_dir / entry["trace_dir"] / name
        for entry in record["cells"].values()
        for name in entry.get("trace_files", [])
    ]
    if not files:
        return
    console.print(f"traces: {escape(str(run_dir / 'traces'))}/<framework>-<execution>-<phase>/ ({len(files)} files)")
    if any(f.name.endswith((".json", ".json.gz")) for f in files):
        console.print(
            "  Chrome/Perfetto JSON (*.json, *.json.gz): open https://ui.perfetto.dev -> Open trace file, or chrome://tracing"
        )
    logdirs = sorted({str(tables.tensorboard_logdir(f)) for f in files if f.name.endswith(".pb")})
    for logdir in logdirs:  # TensorBoard needs the folder above plugins/profile/<run>/
        console.print(f"  TensorBoard: tensorboard --logdir {escape(logdir)}")
    if logdirs:
        console.print("  (the Profile tab needs the plugin: pip install tensorboard-plugin-profile)")
