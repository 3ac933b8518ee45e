"""The tables of a profile run: CSV columns, rows from one checked `profile()` result, and display tables.

Framework-free and print-free: bench/profile/runner.py writes the CSVs and the terminal tables from these,
and bench/report/profile_section.py the report's. Units are in the column names except where the CSV layout was fixed
by the profiling contract (`ms` in stages.csv is milliseconds per step).

Shares: a stage's `share_of_step` is its ms over `stage_step_ms`, the step the stage rows partition (the
profiled step for method "profiler", the staged step for "staged"), so the stages plus "other" make 100%;
`step_ms`, the ordinary step with the profiler off, is kept beside it for reference. An op's
`share_of_step` is its self time over `op_step_ms`, the profiled step the op rows come from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.columns import (
    COMPILE_COLUMNS,
)
from bench.core.numbers import fmt
from bench.core.settings import Cell, execution_rank
from impls import count_flops
from impls.config import HourglassConfig
from impls.profiling import EXTRA_STAGES, ProfileContractError, stage_conv_flops, stage_names

OTHER_STAGE = "other"  # the step minus the stage rows: time no stage scope covers
OTHER_LABEL = "other / unattributed"
CONV_FLOPS_TOLERANCE_PERCENT = 1.0  # the bar for analytic vs framework-reported conv FLOPs: within 1%

METHOD_FOOTNOTE = (
    "profiler = stage times are the framework profiler's events inside each stage's named scope "
    "(record_function / name_scope / named_scope) in a profiled step; staged = the profiler cannot see stages "
    "(XLA fuses across their boundaries), so the step was run as one compiled function per stage with a "
    "device sync after each, and that staged step is longer than the fused step by what fusion saves. "
    f"% = share of the step the stages partition (profiled or staged step); {OTHER_LABEL} = that step minus "
    "the stages (time no stage scope covers: framework and launch overhead, glue between stages). "
    "'ordinary step' = the fused step with the profiler off, for reference."
)


def cell_key(cell: Cell) -> str:
    """framework-execution-phase: the name of the cell's trace folder and log."""
    return f"{cell.framework}-{cell.execution}-{cell.phase}"


def _identity(cell: Cell) -> dict[str, Any]:
    return {"framework": cell.framework, "execution": cell.execution, "phase": cell.phase}


def tensorboard_logdir(xplane: Path) -> Path:
    """The TensorBoard logdir of an .xplane.pb file: the folder above plugins/profile/<run>/, else its own."""
    parents = xplane.parents
    if len(parents) > 3 and parents[1].name == "profile" and parents[2].name == "plugins":
        return parents[3]
    return xplane.parent


def check_result_tables(result: Mapping[str, Any], trace_dir: Path) -> None:
    """Raise ProfileContractError for what check_profile leaves open but the tables rely on.

    Every op row needs op/calls/total_ms/self_ms as numbers, and every listed trace file must exist.
    """
    for row in result["ops"]:
        for key in ("calls", "total_ms", "self_ms"):
            value = row.get(key) if isinstance(row, Mapping) else None
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ProfileContractError(f"op row {row!r}: {key} must be a non-negative number, got {value!r}")
        if not str(row.get("op", "")):
            raise ProfileContractError(f"op row {row!r} has no op name")
    for name in result["trace_files"]:
        if not (trace_dir / str(name)).is_file():
            raise ProfileContractError(f"trace file {name!r} is listed but not in {trace_dir}")


def stage_rows(cell: Cell, result: Mapping[str, Any], config: HourglassConfig) -> list[dict[str, Any]]:
    """stages.csv rows of a checked result: the stages in execution order, then loss, then 'other'."""
    base = {
        **_identity(cell),
        "batch_size": cell.batch_size,
        "precision": cell.precision,
        "method": result["stage_method"],
        "stage_step_ms": float(result["stage_step_ms"]),
        "step_ms": float(result["step_ms"]),
        "status": "ok",
        "error": "",
    }
    per_stage_flops = stage_conv_flops(config, cell.batch_size, cell.phase)
    measured = {row["stage"]: float(row["ms"]) for row in result["stages"]}
    order = [name for name in [*stage_names(config), *EXTRA_STAGES] if name in measured]
    rows = []
    for name in order:
        ms, flops = measured[name], per_stage_flops.get(name)  # no conv FLOPs for the loss
        rows.append(
            {
                **base,
                "stage": name,
                "ms": ms,
                "share_of_step": ms / base["stage_step_ms"],
                "analytic_conv_flops": flops,
                "conv_gflop_per_s": flops / ms / 1e6 if flops else None,
            }
        )
    # check_profile allows the stages to exceed the step by a rounding error (1e-9): clamp, never negative.
    other_ms = max(base["stage_step_ms"] - sum(measured.values()), 0.0)
    rows.append({**base, "stage": OTHER_STAGE, "ms": other_ms, "share_of_step": other_ms / base["stage_step_ms"]})
    return rows


def failure_row(cell: Cell, status: str, error: str) -> dict[str, Any]:
    """The one stages.csv row of a cell that did not produce a usable profile."""
    return {
        **_identity(cell),
        "batch_size": cell.batch_size,
        "precision": cell.precision,
        "stage": "",
        "status": status,
        "error": error,
    }


def op_rows(cell: Cell, result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """ops.csv rows, ranked by self time as returned (already per step, top_k)."""
    op_step_ms = float(result["op_step_ms"])
    ranked = sorted(result["ops"], key=lambda row: float(row["self_ms"]), reverse=True)
    return [
        {
            **_identity(cell),
            "rank": rank,
            "op": str(row["op"]),
            "calls": float(row["calls"]),
            "total_ms": float(row["total_ms"]),
            "self_ms": float(row["self_ms"]),
            "share_of_step": float(row["self_ms"]) / op_step_ms,
        }
        for rank, row in enumerate(ranked, start=1)
    ]


def flop_row(cell: Cell, result: Mapping[str, Any], config: HourglassConfig) -> dict[str, Any]:
    """flops.csv row: the analytic conv FLOPs against what the framework reported (None when it reported none)."""
    flops = result["flops"]
    analytic = count_flops(config, cell.batch_size, cell.phase)
    reported = flops.get("conv_flops")
    return {
        **_identity(cell),
        "batch_size": cell.batch_size,
        "analytic_conv_flops": analytic,
        "reported_conv_flops": reported,
        "conv_diff_percent": (reported - analytic) / analytic * 100 if reported is not None and analytic else None,
        "reported_total_flops": flops.get("total_flops"),
        "source": flops.get("source", ""),
        "note": flops.get("note", ""),
    }


def compile_row(cell: Cell, result: Mapping[str, Any]) -> dict[str, Any]:
    """compile.csv row: first call, trace/compile time, recompilations while timing, program size."""
    info = result["compile"]
    return {**_identity(cell), **{key: info.get(key) for key in COMPILE_COLUMNS[3:]}}


def recompilations(result: Mapping[str, Any]) -> int:
    """Recompilations the framework saw in the timed loop (0 when it could not tell)."""
    count = result["compile"].get("recompilations_in_timed_loop")
    return int(count) if isinstance(count, (int, float)) and count > 0 else 0


# ---------------------------------------------------------------- display tables (strings, for terminal and report)


def ok_cells(stages: pd.DataFrame, phase: str) -> list[dict[str, Any]]:
    """The phase's ok cells in the fixed order (framework, execution; then run): framework, execution, method, steps."""
    frameworks = ("torch", "tensorflow", "jax")
    ok = stages[(stages["phase"] == phase) & (stages["status"] == "ok")]
    keys = ["run", "framework", "execution"] if "run" in ok else ["framework", "execution"]
    cells = [dict(zip(keys, key, strict=True)) | {"rows": rows} for key, rows in ok.groupby(keys, sort=False)]
    for cell in cells:
        first = cell["rows"].iloc[0]
        cell.update(
            method=first["method"], stage_step_ms=float(first["stage_step_ms"]), step_ms=float(first["step_ms"])
        )
    fw_rank = {fw: i for i, fw in enumerate(frameworks)}
    return sorted(
        cells,
        key=lambda c: (fw_rank.get(c["framework"], 9), c["framework"], execution_rank(c["framework"], c["execution"])),
    )


def stage_order(stages: pd.DataFrame) -> list[str]:
    """Every stage name present, in execution order (stem, hourglass_0, head_0, merge_0, ...), loss, other."""
    names = [str(s) for s in dict.fromkeys(stages.loc[stages["status"] == "ok", "stage"]) if str(s)]
    net = [n for n in names if n not in (*EXTRA_STAGES, OTHER_STAGE)]
    # stage_names() order without the config at hand: stem first, then by stack index, hourglass < head < merge.
    kind_rank = {"stem": 0, "hourglass": 1, "head": 2, "merge": 3}

    def key(name: str) -> tuple[int, int, str]:
        kind, _, index = name.rpartition("_")
        if not kind or not index.isdigit():
            return (-1 if name == "stem" else 10**6, 0, name)
        return (int(index), kind_rank.get(kind, 9), name)

    return [
        *sorted(net, key=key),
        *[n for n in EXTRA_STAGES if n in names],
        *([OTHER_STAGE] if OTHER_STAGE in names else []),
    ]


def cell_label(cell: Mapping[str, Any], with_run: bool = False) -> str:
    """'torch eager [profiler]' (with '(run)' when several runs are shown)."""
    text = f"{cell['framework']} {cell['execution']} [{cell['method']}]"
    return f"{text} ({cell['run']})" if with_run and "run" in cell else text


def stage_display(stages: pd.DataFrame, phase: str, gflops: bool = False) -> pd.DataFrame:
    """Rows = stages (+ loss, + other / unattributed, + the two step times); per ok cell: ms, % (, GFLOP/s)."""
    cells = ok_cells(stages, phase)
    with_run = "run" in stages and stages["run"].nunique() > 1
    table: dict[str, list[str]] = {"stage": []}
    order = stage_order(stages[stages["phase"] == phase])
    for cell in cells:
        label = cell_label(cell, with_run)
        by_stage = cell["rows"].set_index("stage")
        table[f"{label} ms"] = [fmt(by_stage["ms"].get(s), ".3f") for s in order]
        table[f"{label} %"] = [fmt(by_stage["share_of_step"].get(s), ".1f", 100) for s in order]
        if gflops:
            table[f"{label} GFLOP/s"] = [fmt(by_stage["conv_gflop_per_s"].get(s), ".1f") for s in order]
    table["stage"] = [OTHER_LABEL if s == OTHER_STAGE else s for s in order]
    frame = pd.DataFrame(table)
    totals = []
    for name, column in (("step the stages partition", "stage_step_ms"), ("ordinary step, profiler off", "step_ms")):
        row = {"stage": name}
        for cell in cells:
            label = cell_label(cell, with_run)
            row[f"{label} ms"] = fmt(cell[column], ".3f")
            row[f"{label} %"] = "100.0" if column == "stage_step_ms" else ""
        totals.append(row)
    return pd.concat([frame, pd.DataFrame(totals)], ignore_index=True).fillna("")


def op_display(ops: pd.DataFrame, framework: str, execution: str, phase: str) -> pd.DataFrame:
    """One cell's top-k ops: rank, op, calls per step, total and self ms per step, % of the profiled step."""
    mine = ops[(ops["framework"] == framework) & (ops["execution"] == execution) & (ops["phase"] == phase)]
    return pd.DataFrame(
        {
            "rank": mine["rank"].astype(int).astype(str),
            "op": mine["op"].astype(str),
            "calls/step": [fmt(v, ".3g") for v in mine["calls"]],
            "total ms": [fmt(v, ".3f") for v in mine["total_ms"]],
            "self ms": [fmt(v, ".3f") for v in mine["self_ms"]],
            "% of step": [fmt(v, ".1f", 100) for v in mine["share_of_step"]],
        }
    )


def within_tolerance(diff_percent: Any) -> str:
    """'yes' / 'NO' for a conv FLOP difference against the 1% bar; 'n/a' when nothing was reported."""
    text = fmt(diff_percent, ".6g")
    if not text:
        return "n/a"
    return "yes" if abs(float(text)) <= CONV_FLOPS_TOLERANCE_PERCENT else "NO"


def flop_display(flops: pd.DataFrame) -> pd.DataFrame:
    """Analytic vs reported conv GFLOP per cell, the difference in %, and whether it is within 1%."""
    return pd.DataFrame(
        {
            "cell": [f"{r.framework} {r.execution} {r.phase}" for r in flops.itertuples()],
            "analytic conv GFLOP": [fmt(v, ".4f", 1e-9) for v in flops["analytic_conv_flops"]],
            "reported conv GFLOP": [fmt(v, ".4f", 1e-9) for v in flops["reported_conv_flops"]],
            "diff %": [fmt(v, "+.3f") for v in flops["conv_diff_percent"]],
            "within 1%": [within_tolerance(v) for v in flops["conv_diff_percent"]],
            "reported total GFLOP": [fmt(v, ".4f", 1e-9) for v in flops["reported_total_flops"]],
            "source": flops["source"].fillna("").astype(str),
            "note": flops["note"].fillna("").astype(str),
        }
    )


def compile_display(compiles: pd.DataFrame) -> pd.DataFrame:
    """First call, trace/compile, recompilations (flagged when > 0) and program size per cell."""

    def recompiled(value: Any) -> str:
        text = fmt(value, ".0f")
        return f"{text} RECOMPILED" if text and float(text) > 0 else text or "unknown"

    sizes = [
        f"{fmt(size, ',.0f')} {unit}".strip() if fmt(size, ".0f") else ""
        for size, unit in zip(compiles["program_size"], compiles["program_size_unit"].fillna(""), strict=True)
    ]
    return pd.DataFrame(
        {
            "cell": [f"{r.framework} {r.execution} {r.phase}" for r in compiles.itertuples()],
            "first call ms": [fmt(v, ".1f") for v in compiles["first_call_ms"]],
            "trace + compile ms": [fmt(v, ".1f") for v in compiles["trace_compile_ms"]],
            "recompilations in timed loop": [recompiled(v) for v in compiles["recompilations_in_timed_loop"]],
            "program size": sizes,
            "note": compiles["note"].fillna("").astype(str),
        }
    )


def problem_rows(stages: pd.DataFrame) -> pd.DataFrame:
    """The cells that did not profile: framework, execution, phase, status and the last line of the error."""
    bad = stages[stages["status"] != "ok"]
    last = [
        next((ln.strip() for ln in reversed(str(e or "").splitlines()) if ln.strip()), "")[:300] for e in bad["error"]
    ]
    return pd.DataFrame(
        {
            "cell": [f"{r.framework} {r.execution} {r.phase}" for r in bad.itertuples()],
            "status": bad["status"].astype(str).tolist(),
            "error": last,
        }
    )
