"""`python -m bench report`: figures, report.md and a self-contained report.html from one or more run dirs.

Reads what `bench run` wrote (summary.csv, samples.csv, run.json), checks it is that and nothing else,
and what `bench profile` wrote (stages.csv and the rest: bench/report/profile_section.py adds a Profile section),
and writes into one folder: the PNGs of bench.report.plots, report.md (figures beside it) and report.html (the
same figures embedded as data: URIs, no script, no network). Several runs are shown side by side, as
series. A user's mistake (a missing folder, a foreign or malformed CSV) is a ReportError whose one-line
message names the path and the fix (bench.core.rundir reads and validates every file); the CLI prints it and exits 2.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape

from bench.core import nodes
from bench.core.columns import SAMPLE_COLUMNS, SUMMARY_COLUMNS
from bench.core.console import make_console, warn
from bench.core.files import check_output_dir
from bench.core.numbers import fmt
from bench.core.rundir import RunData, is_profile_dir, read_profile, read_run
from bench.core.settings import EXECUTIONS, execution_rank
from bench.core.stats import CI_WITHIN, ratio_of_medians
from bench.report import data_parallel_section as dp_section
from bench.report import plots, profile_section, render
from impls import FRAMEWORKS
from impls.registry import DEFAULT_IMPL, IMPL_CHANGES

# Figures in the order the report shows them; the two batch sweeps only when a run swept batch sizes.
FIGURES: dict[str, str] = {
    "latency": "Median latency per framework and execution mode",
    "throughput_vs_batch": "Throughput against batch size",
    "memory_vs_batch": "Peak memory against batch size",
    "distribution": "Every timed iteration per cell",
    "compile_cost": "First call against steady state, and when compiling pays back",
    "efficiency": "Achieved GFLOP/s and share of the measured conv/GEMM ceiling",
    "scaling": "Data-parallel throughput against devices, beside perfect scaling",
}


class ReportError(ValueError):
    """Input that is not a usable run directory; the message names the path and the fix."""


# ---------------------------------------------------------------- loading and validation


def load_runs(run_dirs: Sequence[str | Path]) -> list[RunData]:
    """Every run, validated (bench.core.rundir.read_run), with unique labels (a repeated run id gets #2, #3, ...)."""
    if not run_dirs:
        raise ReportError("no run directory given; give a results/<run_id> folder written by `python -m bench run`")
    runs = [read_run(d) for d in run_dirs]
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"
    return runs


# ---------------------------------------------------------------- derived tables


def model_table(runs: Sequence[RunData]) -> pd.DataFrame:
    """Every model cell of every run, with `run`, `run_index`, `execution_rank` and compile payback."""
    parts = []
    for index, run in enumerate(runs):
        rows = run.summary[run.summary["kind"] == "model"].copy()
        rows["run"], rows["run_index"] = run.label, index
        parts.append(rows)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SUMMARY_COLUMNS)
    table["batch_size"] = pd.to_numeric(table["batch_size"], errors="coerce").astype("Int64")
    table["execution_rank"] = [
        execution_rank(fw, ex) for fw, ex in zip(table["framework"], table["execution"], strict=True)
    ]
    table["payback_iterations"] = math.nan
    table["payback_note"] = ""
    for i, row in table.iterrows():
        if row["execution"] == "eager" or row["status"] != "ok":
            continue
        eager = table[(table["run"] == row["run"]) & (table["framework"] == row["framework"])
                      & (table["impl"] == row["impl"]) & (table["execution"] == "eager") & (table["precision"] == row["precision"])
                      & (table["batch_size"] == row["batch_size"]) & (table["phase"] == row["phase"])
                      & (table["devices"] == row["devices"]) & (table["status"] == "ok")]  # fmt: skip
        if eager.empty:
            has_eager = "eager" in EXECUTIONS.get(str(row["framework"]), ())
            table.at[i, "payback_note"] = "no eager cell to compare" if has_eager else "no eager mode"
            continue
        payback = plots.payback_iterations(
            float(row["first_call_ms"]), float(eager["latency_ms_median"].iloc[0]), float(row["latency_ms_median"])
        )
        table.at[i, "payback_iterations"] = payback
        if math.isinf(payback):
            table.at[i, "payback_note"] = "never pays back (not faster than eager)"
        elif not math.isnan(payback):
            table.at[i, "payback_note"] = f"pays back after {math.ceil(payback):,} iterations"
    return table


def best_per_framework(table: pd.DataFrame, baseline: str, samples: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per run and phase, each framework's fastest ok cell (highest images/s) and its speedup vs `baseline`.

    With the runs' samples, the speedup gets a 95% interval (bench.core.stats.ratio_of_medians: Welch's t on
    the log round medians when both cells have several rounds, else a bootstrap labelled within-process).
    A framework with no ok cell keeps a row that says why, so nothing is silently dropped.
    """
    rows = []
    # One device: a data-parallel cell's throughput is several devices' (the scaling section shows those).
    for (run_index, run, phase), group in table[table["devices"] == 1].groupby(["run_index", "run", "phase"], sort=True):
        ok = group[(group["status"] == "ok") & group["throughput_img_per_s"].notna()]
        base = ok[ok["framework"] == baseline]
        base_rate = base["throughput_img_per_s"].max() if not base.empty else math.nan
        base_best = base.sort_values("throughput_img_per_s", ascending=False).iloc[0] if not base.empty else None
        frameworks = [fw for fw in plots.FRAMEWORK_ORDER if fw in set(group["framework"])]
        frameworks += sorted(set(group["framework"]) - set(frameworks))
        for fw in frameworks:
            mine = ok[ok["framework"] == fw]
            if mine.empty:
                counts = group[group["framework"] == fw]["status"].value_counts()
                rows.append({"run": run, "run_index": run_index, "phase": phase, "framework": fw,
                             "status": ", ".join(f"{n} {s}" for s, n in counts.items())})  # fmt: skip
                continue
            best = mine.sort_values("throughput_img_per_s", ascending=False).iloc[0]
            rows.append({
                "run": run, "run_index": run_index, "phase": phase, "framework": fw, "status": "ok",
                "impl": best["impl"], "execution": best["execution"], "precision": best["precision"],
                "batch_size": best["batch_size"],
                "latency_ms_median": best["latency_ms_median"], "latency_ms_median_ci95_low": best["latency_ms_median_ci95_low"],
                "latency_ms_median_ci95_high": best["latency_ms_median_ci95_high"],
                "latency_ms_rerun_pi95_low": best.get("latency_ms_rerun_pi95_low", math.nan),
                "latency_ms_rerun_pi95_high": best.get("latency_ms_rerun_pi95_high", math.nan),
                "throughput_img_per_s": best["throughput_img_per_s"], "achieved_gflop_per_s": best["achieved_gflop_per_s"],
                "ceiling_fraction": best["ceiling_fraction"], "framework_ceiling_fraction": best["framework_ceiling_fraction"],
                "speedup_vs_baseline": best["throughput_img_per_s"] / base_rate if base_rate > 0 else math.nan,
                **_speedup_interval(samples, run, best, base_best),
            })  # fmt: skip
    return pd.DataFrame(rows)


def _speedup_interval(samples: pd.DataFrame | None, run: str, cell: pd.Series, base: pd.Series | None) -> dict[str, Any]:
    """The speedup's 95% interval and the level it knows (rounds or within-process); empty without samples.

    speedup = (batch / median latency) over the baseline's, so its interval is the inverted interval of
    median(cell) / median(baseline), scaled by the batch ratio.
    """
    if samples is None or base is None or samples.empty:
        return {}
    mine = samples[samples["run"] == run]

    def rounds(cell_id: str) -> list[np.ndarray]:
        rows = mine[mine["cell_id"] == cell_id]
        if "round" not in rows or rows["round"].isna().all():
            return [rows["latency_ns"].to_numpy(dtype=np.float64)]
        return [g["latency_ns"].to_numpy(dtype=np.float64) for _, g in rows.groupby("round", sort=True)]

    fw_rounds, base_rounds = rounds(str(cell["cell_id"])), rounds(str(base["cell_id"]))
    if sum(r.size for r in fw_rounds) < 2 or sum(r.size for r in base_rounds) < 2:
        return {}
    if cell["cell_id"] == base["cell_id"]:
        return {"speedup_ci95_low": 1.0, "speedup_ci95_high": 1.0, "speedup_ci_level": ""}
    stats = ratio_of_medians(base_rounds, fw_rounds)  # median(cell) / median(baseline)
    scale = float(cell["batch_size"]) / float(base["batch_size"])
    return {"speedup_ci95_low": scale / stats.ci95_high, "speedup_ci95_high": scale / stats.ci95_low,
            "speedup_ci_level": stats.ci_level}  # fmt: skip


def collect_warnings(runs: Sequence[RunData], table: pd.DataFrame, best: pd.DataFrame, baseline: str) -> list[str]:
    """Everything a reader must not miss: failed/skipped/noisy cells, thread or precision differences, disagreement."""
    notes: list[str] = []
    types: dict[str, set[str]] = {}  # run -> node types its model cells ran on
    for run in runs:
        prefix = f"[{run.label}] " if len(runs) > 1 else ""
        notes += [prefix + str(w) for w in run.record.get("warnings", [])]
        model = run.summary[run.summary["kind"] == "model"].to_dict("records")
        types[run.label] = set(nodes.row_types(model, run.record))
        mixed = nodes.mixed_types_warning(model, run.record)
        if mixed and mixed not in run.record.get("warnings", []):
            notes.append(prefix + mixed)
        if run.record.get("status") not in (None, "complete"):
            notes.append(f"{prefix}the run is {run.record.get('status')}, not complete; finish it with "
                         f"`python -m bench run --resume {run.path}`")  # fmt: skip
        for key in ("intra_op_threads", "inter_op_threads"):
            counts = {fw: t[key] for fw, t in render.threads(run.record).items() if t.get(key)}
            text = f"frameworks use different {key}: " + ", ".join(f"{fw} {n}" for fw, n in counts.items())
            if len(set(map(str, counts.values()))) > 1 and text not in run.record.get("warnings", []):
                notes.append(prefix + text)
        for fw, entry in (run.record.get("equivalence", {}).get("frameworks", {}) or {}).items():
            if entry.get("equivalent") is False:
                notes.append(f"{prefix}{fw} DISAGREES with the other frameworks (largest relative error "
                             f"{entry.get('max_rel_err'):.3g}); its timings do not measure the same network")  # fmt: skip
            elif entry.get("status") not in (None, "ok"):
                notes.append(
                    f"{prefix}{fw}'s equivalence check {entry.get('status')}: {_last_line(entry.get('error'))}"
                )
        for fw, entry in ((run.record.get("gradient_check") or {}).get("frameworks", {}) or {}).items():
            if entry.get("equivalent") is False:
                notes.append(f"{prefix}{fw}'s fp64 GRADIENTS DISAGREE with the other frameworks (largest error "
                             f"{entry.get('max_rel_err'):.3g}, {entry.get('worst_parameter')}); its backward pass "
                             "is not the same computation")  # fmt: skip
            elif entry.get("status") not in (None, "ok"):
                notes.append(f"{prefix}{fw}'s gradient check {entry.get('status')}: {_last_line(entry.get('error'))}")
        for name, entry in ((run.record.get("data_parallel_check") or {}).get("frameworks") or {}).items():
            if entry.get("status") != "ok":
                notes.append(f"{prefix}{name}: the data-parallel check {entry.get('status')}: {_last_line(entry.get('error'))}")
            elif entry.get("equivalent") is False:
                notes.append(f"{prefix}{name}: the data-parallel GRADIENTS DISAGREE (largest error "
                             f"{entry.get('max_rel_err'):.3g}); its timings do not measure the same computation")  # fmt: skip
    for _, row in table.iterrows():
        prefix = f"[{row['run']}] " if len(runs) > 1 else ""
        cell = f"{row['cell_id']}"
        if row["status"] != "ok":
            notes.append(f"{prefix}{cell} {row['status']}: {_last_line(row['error']) or 'no error recorded'}")
        elif row["noisy"]:
            iqr = row["latency_ms_iqr"] / row["latency_ms_median"] * 100 if row["latency_ms_median"] else math.nan
            notes.append(f"{prefix}{cell} is noisy: IQR is {iqr:.0f}% of the median (> 10%); compare it with care")
    if len(runs) > 1 and len(set().union(*types.values())) > 1:
        detail = "; ".join(f"{label}: {' | '.join(sorted(kinds))}" for label, kinds in types.items())
        notes.append(f"the runs were measured on different node types ({detail}); side by side they compare the "
                     "machines as well as the frameworks")  # fmt: skip
    ok_best = best[best["status"] == "ok"] if not best.empty else best
    for (run, phase), group in ok_best.groupby(["run", "phase"]) if not ok_best.empty else []:
        if group["precision"].nunique() > 1:
            detail = ", ".join(f"{r.framework} {r.precision}" for r in group.itertuples())
            notes.append(f"[{run}] {phase}: the best cells differ in precision ({detail}); speedups mix precisions")
    if not table.empty and baseline not in set(table["framework"]):
        notes.append(f"the baseline framework {baseline!r} is not in any run, so no speedups are given; "
                     f"choose one with --baseline {'|'.join(FRAMEWORKS)}")  # fmt: skip
    return notes


def _last_line(text: Any) -> str:
    lines = [line for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _title(table: pd.DataFrame, runs: Sequence[RunData]) -> str:
    """Config, device, batch and precision, for figure titles."""
    parts = []
    for run in runs:
        cfg = run.record.get("settings", {}).get("config", {})
        hw = cfg.get("input_hw", ["?", "?"])
        parts.append(
            f"{run.record.get('settings', {}).get('preset', '?')} preset ({cfg.get('num_stacks', '?')} stacks, "
            f"{cfg.get('channels', '?')} ch, {hw[0]}x{hw[1]} input)"
        )
    devices = sorted(set(table["device"].dropna().astype(str))) or ["?"]
    batches = sorted({int(b) for b in table["batch_size"].dropna()})
    precisions = sorted(set(table["precision"].dropna().astype(str)))
    return (f"{'; '.join(dict.fromkeys(parts))}, {'/'.join(devices)}, batch {','.join(map(str, batches)) or '?'}, "
            f"{'/'.join(precisions)}")  # fmt: skip


def _ceilings(runs: Sequence[RunData]) -> list[str]:
    texts = []
    for run in runs:
        cal = run.summary[(run.summary["kind"] == "calibration") & (run.summary["status"] == "ok")]
        cal = cal[cal["phase"].isin(["conv3x3", "gemm"])]  # the model's own shapes; not the reference conv
        if cal.empty:
            continue
        best = cal.sort_values("achieved_gflop_per_s", ascending=False).iloc[0]
        prefix = f"[{run.label}] " if len(runs) > 1 else ""
        what = "3x3 conv" if best["phase"] == "conv3x3" else "1x1 conv as GEMM"
        texts.append(f"{prefix}{best['achieved_gflop_per_s']:.1f} GFLOP/s ({best['framework']} {what})")
    return texts


# ---------------------------------------------------------------- formatting


def _share(fraction: Any) -> float:
    """A fraction as percent; NaN when absent (runs made before a column existed)."""
    try:
        return float(fraction) * 100
    except (TypeError, ValueError):
        return math.nan


def _summary_display(best: pd.DataFrame, baseline: str, multi: bool) -> pd.DataFrame:
    rows = []
    # Runs with rounds: where a rerun's median should fall (bench.core.stats.rerun_interval).
    rerun = "latency_ms_rerun_pi95_low" in best and best["latency_ms_rerun_pi95_low"].notna().any()
    for r in best.to_dict("records"):
        ok = r["status"] == "ok"
        rerun_text = (f"{r['latency_ms_rerun_pi95_low']:.2f}-{r['latency_ms_rerun_pi95_high']:.2f}"
                      if ok and pd.notna(r.get("latency_ms_rerun_pi95_low")) else "")  # fmt: skip
        rows.append({
            **({"run": r["run"]} if multi else {}),
            "phase": r["phase"], "framework": r["framework"],
            "best configuration": (f"{'' if r['impl'] == DEFAULT_IMPL else r['impl'] + ' '}{r['execution']} {r['precision']} "
                                   f"batch {int(r['batch_size'])}") if ok else f"none ({r['status']})",
            "median ms": fmt(r.get("latency_ms_median"), ".2f") if ok else "",
            "95% CI ms": f"{r['latency_ms_median_ci95_low']:.2f}-{r['latency_ms_median_ci95_high']:.2f}"
            if ok and pd.notna(r.get("latency_ms_median_ci95_low")) else "",
            **({"rerun 95% ms": rerun_text} if rerun else {}),
            "images/s": fmt(r.get("throughput_img_per_s"), ".2f") if ok else "",
            "GFLOP/s": fmt(r.get("achieved_gflop_per_s"), ".1f") if ok else "",
            "% ceiling": fmt(_share(r.get("ceiling_fraction")), ".0f") if ok else "",
            "% own fw ceiling": fmt(_share(r.get("framework_ceiling_fraction")), ".0f") if ok else "",
            f"speedup vs {baseline}": _speedup_text(r, baseline) if ok and pd.notna(r.get("speedup_vs_baseline")) else "n/a",
        })  # fmt: skip
    return pd.DataFrame(rows)


def variant_gap(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, framework, execution, precision, batch and phase where a framework has several variants: each
    variant's median against the default variant's (ratio < 1: faster), and what the variant changes.

    Every framework's variants are one computation (the equivalence checks), so the ratio is what the
    formulation alone is worth: the gap between the network as the framework's users write it and at its best.
    """
    keys = ["run_index", "run", "framework", "execution", "precision", "devices", "batch_size", "phase"]
    ok = table[table["status"] == "ok"]
    rows = []
    for key, group in ok.groupby(keys, sort=True):
        base = group[group["impl"] == DEFAULT_IMPL]
        if base.empty or len(group) < 2:
            continue
        base_ms = float(base["latency_ms_median"].iloc[0])
        for r in group[group["impl"] != DEFAULT_IMPL].to_dict("records"):
            rows.append({**dict(zip(keys, key, strict=True)), "impl": r["impl"],
                         "idiomatic_ms": base_ms, "variant_ms": float(r["latency_ms_median"]),
                         "ratio": float(r["latency_ms_median"]) / base_ms,
                         "changes": IMPL_CHANGES.get((str(r["framework"]), str(r["impl"])), "")})  # fmt: skip
    return pd.DataFrame(rows)


def _gap_display(gap: pd.DataFrame, multi: bool) -> pd.DataFrame:
    rows = []
    for r in gap.to_dict("records"):
        rows.append({
            **({"run": r["run"]} if multi else {}),
            "phase": r["phase"], "framework": r["framework"],
            "cell": f"{r['execution']} {r['precision']} batch {int(r['batch_size'])}",
            "idiomatic ms": f"{r['idiomatic_ms']:.2f}", "variant ms": f"{r['variant_ms']:.2f}",
            "variant": r["impl"], "variant / idiomatic": f"{r['ratio']:.2f}x", "what the variant changes": r["changes"],
        })  # fmt: skip
    return pd.DataFrame(rows)


def _speedup_text(r: dict[str, Any], baseline: str) -> str:
    """'0.78x (0.74-0.82)'; when the interval holds 1, the two are not ranked: 'not distinguishable'."""
    text = f"{r['speedup_vs_baseline']:.2f}x"
    low, high = r.get("speedup_ci95_low"), r.get("speedup_ci95_high")
    if low is None or high is None or pd.isna(low) or pd.isna(high) or r["framework"] == baseline:
        return text
    text += f" ({low:.2f}-{high:.2f}"
    text += ", one round: within-process interval)" if r.get("speedup_ci_level") == CI_WITHIN else ")"
    return f"{text}, not distinguishable from {baseline}" if low <= 1.0 <= high else text


def _cells_display(table: pd.DataFrame, multi: bool) -> pd.DataFrame:
    ordered = plots.sort_cells(table.assign(_ph=table["phase"].map({"forward": 0, "forward_backward": 1})))
    ordered = ordered.sort_values(["run_index", "_ph"], kind="stable")
    rows = []
    for r in ordered.to_dict("records"):
        rows.append({
            **({"run": r["run"]} if multi else {}),
            "cell": r["cell_id"], "status": r["status"],
            "median ms": fmt(r["latency_ms_median"], ".2f"),
            "IQR %": fmt(r["latency_ms_iqr"] / r["latency_ms_median"] * 100, ".1f") if r["latency_ms_median"] else "",
            "noisy": "yes" if r["noisy"] else "",
            "first call ms": fmt(r["first_call_ms"], ".1f"),
            "images/s": fmt(r["throughput_img_per_s"], ".2f"),
            "GFLOP/s": fmt(r["achieved_gflop_per_s"], ".1f"),
            "% ceiling": fmt(_share(r.get("ceiling_fraction")), ".0f"),
            "% own fw ceiling": fmt(_share(r.get("framework_ceiling_fraction")), ".0f"),
            "compile payback": r["payback_note"],
            "error": _last_line(r["error"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _equivalence_display(runs: Sequence[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        eq = run.record.get("equivalence", {}) or {}
        grad = run.record.get("gradient_check", {}) or {}  # absent in runs made before the gradient check
        for fw, entry in (eq.get("frameworks", {}) or {}).items():
            g = (grad.get("frameworks", {}) or {}).get(fw, {})
            rows.append({
                **({"run": run.label} if len(runs) > 1 else {}),
                "framework": fw, "status": entry.get("status", ""), "execution": entry.get("execution", ""),
                "largest relative error": fmt(entry.get("max_rel_err"), ".2e"),
                "tolerance": fmt(eq.get("rtol"), "g"),
                "agrees": {True: "yes", False: "NO"}.get(entry.get("equivalent"), ""),
                "compared with": entry.get("reference", "") or _last_line(entry.get("error")),
                "gradients (fp64, batch " + str(grad.get("batch_size", 1)) + "): largest error":
                    fmt(g.get("max_rel_err"), ".2e") if g.get("status") == "ok" else g.get("status", ""),
                "gradient tolerance": fmt(grad.get("rtol"), "g"),
                "gradients agree": {True: "yes", False: "NO"}.get(g.get("equivalent"), ""),
            })  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the report


def _failure_banners(runs: Sequence[RunData], table: pd.DataFrame) -> list[str]:
    banners = []
    for run in runs:
        mine = table[table["run"] == run.label]
        if mine.empty:
            banners.append(f"Run {run.label} has no model cells: nothing was measured.")
        elif not (mine["status"] == "ok").any():
            counts = ", ".join(f"{n} {s}" for s, n in mine["status"].value_counts().items())
            banners.append(f"No cell of run {run.label} succeeded ({counts}): nothing was measured, "
                           "see the cell table and warnings for why.")  # fmt: skip
    return banners


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, baseline: str = "torch") -> Path:
    """Write the figures, report.md and report.html for `run_dirs` into `out_dir`; returns report.html."""
    if baseline not in FRAMEWORKS:
        raise ReportError(f"--baseline must be one of {', '.join(FRAMEWORKS)}, got {baseline!r}")
    # `bench profile` folders (stages.csv) add a section, or are the whole report when given alone.
    profiles = [read_profile(d) for d in run_dirs if is_profile_dir(d)]
    run_dirs = [d for d in run_dirs if not (is_profile_dir(d) and not (Path(d) / "summary.csv").is_file())]
    if profiles and not run_dirs:
        return profile_section.build_profile_only(profiles, out_dir)
    runs = load_runs(run_dirs)
    table = model_table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = pd.concat(
        [run.samples.assign(run=run.label) for run in runs if not run.samples.empty]
        or [pd.DataFrame(columns=[*SAMPLE_COLUMNS, "run"])],
        ignore_index=True,
    )
    title = _title(table, runs) if not table.empty else ", ".join(run.label for run in runs)
    swept = not table.empty and table.groupby("run")["batch_size"].nunique().max() > 1
    figures: dict[str, Path] = {"latency": plots.latency(table, out / "latency.png", title)}
    if swept:
        figures["throughput_vs_batch"] = plots.throughput_vs_batch(table, out / "throughput_vs_batch.png", title)
        figures["memory_vs_batch"] = plots.memory_vs_batch(table, out / "memory_vs_batch.png", title)
    figures["distribution"] = plots.distribution(table, samples, out / "distribution.png", title)
    figures["compile_cost"] = plots.compile_cost(table, out / "compile_cost.png", title)
    figures["efficiency"] = plots.efficiency(table, out / "efficiency.png", title, _ceilings(runs))
    parallel = not table.empty and bool((table["devices"] > 1).any())
    if parallel:
        figures["scaling"] = plots.scaling(table, out / "scaling.png", title)

    best = best_per_framework(table, baseline, samples) if not table.empty else pd.DataFrame()
    multi = len(runs) > 1
    sections = {
        "summary": _summary_display(best, baseline, multi),
        "variants": _gap_display(variant_gap(table), multi) if not table.empty else pd.DataFrame(),
        "cells": _cells_display(table, multi) if not table.empty else pd.DataFrame(),
        "equivalence": _equivalence_display(runs),
        "environment": render.environment_display(runs),
        "scaling": dp_section.scaling_display(table, multi) if parallel else pd.DataFrame(),
        "data_parallel_check": dp_section.check_display(runs),
    }
    notes = collect_warnings(runs, table, best, baseline)
    banners = _failure_banners(runs, table)
    heading = "hgbench report: " + ", ".join(run.label for run in runs)
    markdown = _markdown(heading, title, baseline, banners, figures, sections, notes)
    page = _html(heading, title, baseline, banners, figures, sections, notes)
    if profiles:
        extra = profile_section.section(profiles, out)
        markdown, page = markdown + "\n" + extra.markdown, page.replace("\n</body>", "\n" + extra.html + "\n</body>", 1)
    (out / "report.md").write_text(markdown)
    html_path = out / "report.html"
    html_path.write_text(page)
    return html_path


_SUMMARY_NOTE = ("Best configuration = the framework's cell with the highest images/s in that phase; speedup = its "
                 "images/s over the baseline framework's best, with a 95% interval (bootstrap of the ratio of "
                 "medians; it includes the process-to-process noise only when the cells ran in several rounds). "
                 "Where the interval holds 1 the two are not distinguishable and are not ranked. Every cell, "
                 "including failed and skipped ones, is listed under Cells.")  # fmt: skip


_VARIANTS_NOTE = ("A framework's variants are the same computation (each passes the same equivalence checks); the "
                  "ratio of medians is what the formulation alone changes. Below 1: the variant is faster.")


def _markdown(heading: str, title: str, baseline: str, banners: list[str], figures: dict[str, Path],
              sections: dict[str, pd.DataFrame], notes: list[str]) -> str:  # fmt: skip
    parts = [f"# {heading}\n", f"{title}\n"]
    parts += [f"> **{b}**\n" for b in banners]
    parts += [f"## Summary (baseline: {baseline})\n", _SUMMARY_NOTE + "\n", render.md_table(sections["summary"])]
    if not sections["variants"].empty:
        parts += ["## Implementation variants (each against the framework's idiomatic one, same cell)\n",
                  _VARIANTS_NOTE + "\n", render.md_table(sections["variants"])]
    if not sections["scaling"].empty or not sections["data_parallel_check"].empty:
        parts += [f"## {dp_section.TITLE}\n", dp_section.note(sections) + "\n", render.md_table(sections["scaling"]),
                  f"### {dp_section.CHECK_TITLE}\n", render.md_table(sections["data_parallel_check"])]
    parts += ["## Warnings\n", render.warnings_md(notes)]
    parts.append("## Figures\n")
    for name, path in figures.items():
        parts.append(f"### {FIGURES[name]}\n\n![{name}]({path.name})\n")
    parts += ["## Cells\n", render.md_table(sections["cells"])]
    parts += ["## Equivalence (heatmaps of one weight set in fp32, and one train step's gradients in fp64, before timing)\n",
              render.md_table(sections["equivalence"])]
    parts += ["## Environment\n", render.md_table(sections["environment"])]
    return "\n".join(parts)


def _html(heading: str, title: str, baseline: str, banners: list[str], figures: dict[str, Path],
          sections: dict[str, pd.DataFrame], notes: list[str]) -> str:  # fmt: skip
    esc = html.escape
    body = [f"<h1>{esc(heading)}</h1>", f"<p>{esc(title)}</p>"]
    body += [f'<p class="alert">{esc(b)}</p>' for b in banners]
    body += [f"<h2>Summary (baseline: {esc(baseline)})</h2>", f"<p>{esc(_SUMMARY_NOTE)}</p>",
             render.html_table(sections["summary"], "summary-table")]  # fmt: skip
    if not sections["variants"].empty:
        body += ["<h2>Implementation variants (each against the framework's idiomatic one, same cell)</h2>",
                 f"<p>{esc(_VARIANTS_NOTE)}</p>", render.html_table(sections["variants"], "variants-table")]
    if not sections["scaling"].empty or not sections["data_parallel_check"].empty:
        body += [f"<h2>{esc(dp_section.TITLE)}</h2>", f"<p>{esc(dp_section.note(sections))}</p>",
                 render.html_table(sections["scaling"], "scaling-table"), f"<h3>{esc(dp_section.CHECK_TITLE)}</h3>",
                 render.html_table(sections["data_parallel_check"], "data-parallel-check-table")]  # fmt: skip
    body += ["<h2>Warnings</h2>", render.warnings_html(notes), "<h2>Figures</h2>"]
    body += [render.figure_html(name, FIGURES[name], path) for name, path in figures.items()]
    body += ["<h2>Cells</h2>", render.html_table(sections["cells"], "cells-table")]
    body += ["<h2>Equivalence (heatmaps of one weight set in fp32, and one train step's gradients in fp64, before timing)</h2>",
             render.html_table(sections["equivalence"], "equivalence-table")]  # fmt: skip
    body += ["<h2>Environment</h2>", render.html_table(sections["environment"], "environment-table")]
    return render.page(heading, body)


def report_dir_for(run_dir: str | Path) -> Path:
    """Where `bench run` puts its automatic report: reports/<run_id>/ beside the results folder."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent.parent / "reports" / run_dir.name


def write_after_run(run_dir: Path) -> None:
    """The automatic report of a finished `bench run` in reports/<run_id>/; a failure here never loses the run."""
    console = make_console()
    try:
        html_path = build_report([run_dir], report_dir_for(run_dir))
    except Exception as err:  # the results are on disk already; a report bug must not change the run's outcome
        warn(console, f"the report could not be written ({type(err).__name__}: {err}); the results are intact, "
                      f"retry with: python -m bench report {run_dir}")  # fmt: skip
        return
    console.print(f"report: {escape(str(html_path))}")


def run(run_dirs: Sequence[str], out: str | None = None, baseline: str = "torch") -> int:
    """The `report` command: writes the report and prints where; ReportError propagates to the CLI."""
    if out is None:
        target = check_output_dir(Path("reports") / "-vs-".join(Path(d).resolve().name for d in run_dirs[:3]),
                                  "the report folder (default reports/<RUN_DIR name>; choose one with --out)")  # fmt: skip
    else:
        target = check_output_dir(out, "--out")
    html_path = build_report(run_dirs, target, baseline)
    print(f"report: {html_path} (and report.md, figures, in {html_path.parent})")
    return 0
