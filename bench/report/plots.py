"""Figures of one or more runs' results, as PNG files. Plots only; measures nothing.

Every function takes the tidy table that bench.report.run_report builds (one row per model cell, a `run` column
naming the run it came from) and writes one PNG of a fixed pixel size (`FIGURE_PX`), so reports line up
and tests can check the size. Framework colours and order are fixed across every figure; execution modes
are told apart by hatching, runs by position and alpha. A cell that failed or was skipped is drawn as a
labelled gap, never left out, and a figure with nothing to draw says so instead of being missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window (the harness runs headless)

import matplotlib.patches
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from impls.registry import DEFAULT_IMPL

FRAMEWORK_ORDER: tuple[str, ...] = ("torch", "tensorflow", "jax")
FRAMEWORK_COLORS: dict[str, str] = {"torch": "#EE4C2C", "tensorflow": "#2E8B57", "jax": "#3F6FD8"}
_OTHER_COLOR = "#777777"
# Eager modes plain, compiled ones hatched; the same execution name has the same hatch in every framework.
EXECUTION_HATCH: dict[str, str] = {"eager": "", "compile": "//", "function": "..", "xla": "xx", "jit": "\\\\"}
EXECUTION_LINESTYLE: dict[str, str] = {"eager": "-", "compile": "--", "function": ":", "xla": "-.", "jit": "--"}
_RUN_MARKERS = ("o", "s", "^", "D", "v", "P")
PHASE_TITLE: dict[str, str] = {"forward": "forward", "forward_backward": "forward + backward"}

DPI = 100
# Pixel size of every figure (width, height); savefig keeps it exactly (no bbox_inches="tight").
FIGURE_PX: dict[str, tuple[int, int]] = {
    "latency": (1400, 700),
    "throughput_vs_batch": (1400, 600),
    "memory_vs_batch": (1400, 600),
    "distribution": (1400, 750),
    "compile_cost": (1400, 700),
    "efficiency": (1400, 700),
    "stage_shares": (1400, 700),
    "maxbatch": (1400, 900),
    "scaling": (1400, 650),
}
_FAILED_COLOR = "#B00020"


def framework_color(framework: str) -> str:
    """The fixed colour of a framework (grey for anything unknown)."""
    return FRAMEWORK_COLORS.get(framework, _OTHER_COLOR)


def sort_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in the fixed order: framework (torch, tensorflow, jax), execution, precision, batch, run."""
    order = {fw: i for i, fw in enumerate(FRAMEWORK_ORDER)}
    keyed = frame.assign(
        _fw=frame["framework"].map(lambda fw: order.get(fw, len(order))),
        _run=frame["run_index"] if "run_index" in frame else 0,
    )
    keyed = keyed.assign(_impl=keyed["impl"].fillna(DEFAULT_IMPL).ne(DEFAULT_IMPL) if "impl" in keyed else False)
    keyed = keyed.sort_values(["_fw", "framework", "_impl", "execution_rank", "precision", "batch_size", "_run"], kind="stable")
    return keyed.drop(columns=["_fw", "_run", "_impl"])


def variant_label(row: pd.Series | dict) -> str:
    """'jax' for a framework's default variant, 'jax tuned' for another."""
    impl = str(row.get("impl") or DEFAULT_IMPL)
    return str(row["framework"]) if impl == DEFAULT_IMPL else f"{row['framework']} {impl}"


def _figure(name: str, ncols: int = 1, nrows: int = 1) -> tuple[plt.Figure, np.ndarray]:
    width, height = FIGURE_PX[name]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False, layout="constrained"
    )
    return fig, axes.ravel()


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _empty(name: str, path: Path, title: str, message: str) -> Path:
    """A figure that says why there is nothing to plot (so the report never has a missing image)."""
    fig, (ax,) = _figure(name)
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color=_FAILED_COLOR, wrap=True)
    return _save(fig, path)


def _phases(frame: pd.DataFrame) -> list[str]:
    return [p for p in ("forward", "forward_backward") if p in set(frame["phase"])] or sorted(set(frame["phase"]))


def _multi_run(frame: pd.DataFrame) -> bool:
    return frame["run"].nunique() > 1


def _cell_label(row: pd.Series, multi_run: bool, show_batch: bool, show_precision: bool) -> str:
    parts = [variant_label(row), str(row["execution"])]
    if show_precision:
        parts.append(str(row["precision"]))
    if row.get("devices", 1) > 1:
        parts.append(f"d{int(row['devices'])}")
    if show_batch:
        parts.append(f"b{row['batch_size']}")
    if multi_run:
        parts.append(f"[{row['run']}]")
    return " ".join(parts)


def _labels(frame: pd.DataFrame) -> list[str]:
    multi, batches, precisions = _multi_run(frame), frame["batch_size"].nunique() > 1, frame["precision"].nunique() > 1
    return [_cell_label(row, multi, batches, precisions) for _, row in frame.iterrows()]


def _run_alpha(row: pd.Series) -> float:
    return max(0.35, 1.0 - 0.3 * int(row.get("run_index", 0)))


def _legend_handles(frame: pd.DataFrame) -> list[matplotlib.patches.Patch]:
    handles = [
        matplotlib.patches.Patch(facecolor=framework_color(fw), label=fw)
        for fw in FRAMEWORK_ORDER
        if fw in set(frame["framework"])
    ]
    for execution in dict.fromkeys(frame["execution"]):
        handles.append(
            matplotlib.patches.Patch(
                facecolor="white", edgecolor="black", hatch=EXECUTION_HATCH.get(execution, ""), label=execution
            )
        )
    return handles


def _gap_label(ax: plt.Axes, y: float, status: str, error: str) -> None:
    """A failed/skipped/empty cell: its status written where its bar would be."""
    first = (error or "").strip().splitlines()[-1:] or [""]
    text = status.upper() + (f": {first[0][:70]}" if first[0] else "")
    ax.text(0.01, y, text, transform=ax.get_yaxis_transform(), va="center", ha="left", color=_FAILED_COLOR, fontsize=8)


def _short(number: float) -> str:
    """A bar label: three significant figures, no exponent for everyday magnitudes."""
    return f"{number:,.0f}" if abs(number) >= 100 else f"{number:.3g}"


def _hbars(ax: plt.Axes, panel: pd.DataFrame, value: str, low: pd.Series | None, high: pd.Series | None) -> None:
    """Horizontal bars of `value` per cell, top to bottom in the fixed order; gaps labelled with the status."""
    labels = _labels(panel)
    ys = np.arange(len(panel))[::-1]
    for y, (_, row) in zip(ys, panel.iterrows(), strict=True):
        number = row[value]
        if row["status"] != "ok" or pd.isna(number):
            _gap_label(ax, y, str(row["status"]) if row["status"] != "ok" else "not measured", str(row["error"]))
            continue
        xerr = None
        if low is not None and high is not None and not (pd.isna(low[row.name]) or pd.isna(high[row.name])):
            xerr = [[max(number - low[row.name], 0.0)], [max(high[row.name] - number, 0.0)]]
        ax.barh(
            y, number, xerr=xerr, color=framework_color(row["framework"]), alpha=_run_alpha(row),
            hatch=EXECUTION_HATCH.get(row["execution"], ""), edgecolor="black", linewidth=0.6, capsize=3,
        )  # fmt: skip
        end = high[row.name] if xerr is not None else number
        ax.text(end, y, f" {_short(number)}", va="center", ha="left", fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_ylim(-0.7, len(panel) - 0.3)
    ax.margins(x=0.15)


def latency(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Median latency per cell, one panel per phase, error bars = bootstrap 95% CI of the median (else IQR)."""
    if frame.empty:
        return _empty("latency", path, title, "no model cells in this run")
    phases = _phases(frame)
    fig, axes = _figure("latency", ncols=len(phases))
    for ax, phase in zip(axes, phases, strict=True):
        panel = sort_cells(frame[frame["phase"] == phase])
        low, high = panel["latency_ms_median_ci95_low"], panel["latency_ms_median_ci95_high"]
        no_ci = low.isna() | high.isna()
        low = low.where(~no_ci, panel["latency_ms_median"] - panel["latency_ms_iqr"] / 2)
        high = high.where(~no_ci, panel["latency_ms_median"] + panel["latency_ms_iqr"] / 2)
        _hbars(ax, panel, "latency_ms_median", low, high)
        measured = panel["latency_ms_median"].dropna()
        wide = not measured.empty and measured.min() > 0 and measured.max() / measured.min() > 30
        if wide:  # cells three orders apart: a linear axis would hide the fast ones
            ax.set_xscale("log")
        scale = ", log scale" if wide else ""
        ax.set_xlabel(f"median ms per step (lower is better{scale}), error bar: 95% CI")
        ax.set_title(PHASE_TITLE.get(phase, phase))
        ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=_legend_handles(frame), loc="outside lower center", ncols=8, fontsize=8)
    fig.suptitle(f"Latency - {title}")
    return _save(fig, path)


def distribution(frame: pd.DataFrame, samples: pd.DataFrame, path: Path, title: str) -> Path:
    """Every timed iteration per cell as a box plot (whiskers 1.5 IQR, outliers as points), per phase."""
    if frame.empty:
        return _empty("distribution", path, title, "no model cells in this run")
    phases = _phases(frame)
    fig, axes = _figure("distribution", ncols=len(phases))
    for ax, phase in zip(axes, phases, strict=True):
        panel = sort_cells(frame[frame["phase"] == phase])
        labels, ys = _labels(panel), np.arange(len(panel))[::-1]
        for y, (_, row) in zip(ys, panel.iterrows(), strict=True):
            mine = samples[(samples["run"] == row["run"]) & (samples["cell_id"] == row["cell_id"])]
            values = mine["latency_ns"].to_numpy(dtype=float) / 1e6  # ns -> ms
            if row["status"] != "ok" or values.size == 0:
                _gap_label(ax, y, str(row["status"]) if row["status"] != "ok" else "no samples", str(row["error"]))
                continue
            box = ax.boxplot(
                values, positions=[y], orientation="horizontal", widths=0.6, patch_artist=True,
                flierprops={"marker": ".", "markersize": 4, "alpha": 0.6}, medianprops={"color": "black"},
            )  # fmt: skip
            for patch in box["boxes"]:
                patch.set(facecolor=framework_color(row["framework"]), alpha=_run_alpha(row),
                          hatch=EXECUTION_HATCH.get(row["execution"], ""))  # fmt: skip
            ax.plot(values, np.full(values.size, y + 0.33), "|", color="black", alpha=0.5, markersize=5)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_ylim(-0.7, len(panel) - 0.3)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _short(v)))
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _short(v)))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("latency per iteration (ms, log scale); ticks above a box: every sample")
        ax.set_title(PHASE_TITLE.get(phase, phase))
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.legend(handles=_legend_handles(frame), loc="outside lower center", ncols=8, fontsize=8)
    fig.suptitle(f"Per-iteration latency - {title}")
    return _save(fig, path)


def _versus_batch(frame: pd.DataFrame, path: Path, name: str, value: str, ylabel: str, title: str) -> Path:
    phases = _phases(frame)
    fig, axes = _figure(name, ncols=len(phases))
    multi = _multi_run(frame)
    for ax, phase in zip(axes, phases, strict=True):
        panel = sort_cells(frame[frame["phase"] == phase])
        for (run_index, run, fw, impl, execution, precision), group in panel.groupby(
            ["run_index", "run", "framework", "impl", "execution", "precision"], sort=False
        ):
            line = group.sort_values("batch_size")
            ok = line[(line["status"] == "ok") & line[value].notna()]
            label = f"{variant_label({'framework': fw, 'impl': impl})} {execution}"
            label += f" {precision}" if frame["precision"].nunique() > 1 else ""
            label += f" [{run}]" if multi else ""
            ax.plot(
                ok["batch_size"], ok[value], color=framework_color(fw), linestyle=EXECUTION_LINESTYLE.get(execution, "-"),
                marker=_RUN_MARKERS[int(run_index) % len(_RUN_MARKERS)], label=label,
            )  # fmt: skip
            for _, gap in line[~line.index.isin(ok.index)].iterrows():  # failed cells: an x on the axis
                ax.plot(gap["batch_size"], 0, marker="x", color=_FAILED_COLOR, markersize=9, clip_on=False)
                ax.annotate(str(gap["status"]), (gap["batch_size"], 0), textcoords="offset points", xytext=(3, 5),
                            color=_FAILED_COLOR, fontsize=7)  # fmt: skip
        batches = sorted(set(panel["batch_size"]))
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size (images)")
        ax.set_ylabel(ylabel)
        ax.set_title(PHASE_TITLE.get(phase, phase))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def throughput_vs_batch(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Images per second against batch size, a line per framework x execution (x run)."""
    return _versus_batch(
        frame, path, "throughput_vs_batch", "throughput_img_per_s",
        "throughput (images/s, from the median), higher is better", f"Throughput vs batch size - {title}",
    )  # fmt: skip


def memory_source(frame: pd.DataFrame) -> tuple[str, str]:
    """(column, axis label): the GPU allocator peak where any cell measured it, else the host peak RSS."""
    if frame["gpu_allocator_peak_bytes"].notna().any():
        return "gpu_allocator_peak_bytes", "GPU allocator peak (MiB)"
    return "host_peak_rss_bytes", "host peak RSS of the worker process (MiB; no GPU allocator measured)"


def memory_vs_batch(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Peak memory against batch size: GPU allocator peak where measured, else host peak RSS (labelled)."""
    column, label = memory_source(frame)
    scaled = frame.assign(memory_mib=frame[column] / 2**20)  # bytes -> MiB
    return _versus_batch(scaled, path, "memory_vs_batch", "memory_mib", label, f"Peak memory vs batch size - {title}")


def payback_iterations(first_call_ms: float, eager_median_ms: float, compiled_median_ms: float) -> float:
    """Iterations after which a compiled mode has paid back its first call: first_call / (eager - compiled).

    NaN when not meaningful (a figure missing) and inf when the compiled mode is not faster than eager.
    """
    if any(math.isnan(v) for v in (first_call_ms, eager_median_ms, compiled_median_ms)):
        return math.nan
    saving = eager_median_ms - compiled_median_ms
    return first_call_ms / saving if saving > 0 else math.inf


def compile_cost(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """First call (trace + compile) against the steady-state median per cell, log scale, with payback."""
    if frame.empty:
        return _empty("compile_cost", path, title, "no model cells in this run")
    phases = _phases(frame)
    fig, axes = _figure("compile_cost", ncols=len(phases))
    for ax, phase in zip(axes, phases, strict=True):
        panel = sort_cells(frame[frame["phase"] == phase])
        labels, ys = _labels(panel), np.arange(len(panel))[::-1]
        for y, (_, row) in zip(ys, panel.iterrows(), strict=True):
            if row["status"] != "ok" or pd.isna(row["latency_ms_median"]):
                _gap_label(ax, y, str(row["status"]) if row["status"] != "ok" else "not measured", str(row["error"]))
                continue
            color, hatch = framework_color(row["framework"]), EXECUTION_HATCH.get(row["execution"], "")
            if pd.notna(row["first_call_ms"]):
                ax.barh(y + 0.2, row["first_call_ms"], height=0.38, color=color, alpha=0.45, hatch=hatch,
                        edgecolor="black", linewidth=0.5)  # fmt: skip
            ax.barh(y - 0.2, row["latency_ms_median"], height=0.38, color=color, hatch=hatch, edgecolor="black",
                    linewidth=0.5)  # fmt: skip
            note = row.get("payback_note", "")
            end = max(row["first_call_ms"] if pd.notna(row["first_call_ms"]) else 0, row["latency_ms_median"])
            ax.text(end * 1.1, y, note, va="center", ha="left", fontsize=8)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_ylim(-0.7, len(panel) - 0.3)
        ax.set_xscale("log")
        ax.set_xlim(right=ax.get_xlim()[1] * 12)  # room for the payback notes
        ax.set_xlabel("ms, log scale: pale upper bar = first call, solid lower bar = steady-state median")
        ax.set_title(PHASE_TITLE.get(phase, phase))
        ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=_legend_handles(frame), loc="outside lower center", ncols=8, fontsize=8)
    fig.suptitle(
        f"Compile cost: first call vs steady state; payback = first call / (eager - compiled median) - {title}"
    )
    return _save(fig, path)


def efficiency(frame: pd.DataFrame, path: Path, title: str, ceilings: Sequence[str] = ()) -> Path:
    """Achieved GFLOP/s per cell and its share of the run's measured conv/GEMM ceiling, per phase."""
    if frame.empty:
        return _empty("efficiency", path, title, "no model cells in this run")
    panel = sort_cells(frame.assign(_ph=frame["phase"].map({"forward": 0, "forward_backward": 1})))
    panel = panel.sort_values("_ph", kind="stable")
    phase_short = {"forward": "fwd", "forward_backward": "fwd+bwd"}
    labels = [f"{lab} {phase_short.get(ph, ph)}" for lab, ph in zip(_labels(panel), panel["phase"], strict=True)]
    fig, axes = _figure("efficiency", ncols=2)
    for ax, value, xlabel in (
        (axes[0], "achieved_gflop_per_s", "achieved GFLOP/s (analytic conv FLOPs / median latency)"),
        (axes[1], "ceiling_percent", "share of the machine's measured conv/GEMM ceiling (%)"),
    ):
        _hbars(ax, panel.assign(ceiling_percent=panel["ceiling_fraction"] * 100), value, None, None)
        ax.set_yticks(np.arange(len(panel))[::-1], labels, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    if panel["ceiling_fraction"].notna().any():
        axes[1].axvline(100, color="black", linestyle="--", linewidth=1)
        axes[1].set_title(
            "share of ceiling: " + ("; ".join(ceilings) if ceilings else "measured in the run"), fontsize=9
        )
    else:
        axes[1].text(0.5, 0.5, "no ceiling measured in this run", transform=axes[1].transAxes, ha="center",
                     color=_FAILED_COLOR)  # fmt: skip
    axes[0].set_title("achieved GFLOP/s, higher is better")
    fig.legend(handles=_legend_handles(frame), loc="outside lower center", ncols=8, fontsize=8)
    fig.suptitle(f"Efficiency - {title}")
    return _save(fig, path)


# ---------------------------------------------------------------- profile runs (bench profile)

# Stages coloured by kind, shaded by stack index: the eye finds "all hourglasses" and "stack 2" alike.
_STAGE_CMAPS: dict[str, str] = {"hourglass": "Blues", "head": "Oranges", "merge": "Greens"}
_STAGE_FIXED: dict[str, str] = {"stem": "#7B3294", "loss": "#444444", "other": "#DDDDDD"}


def stage_color(stage: str, num_stacks: int) -> str:
    """The fixed colour of a stage: stem purple, hourglass_i blues, head_i oranges, merge_i greens, loss dark."""
    if stage in _STAGE_FIXED:
        return _STAGE_FIXED[stage]
    kind, _, index = stage.rpartition("_")
    if kind not in _STAGE_CMAPS or not index.isdigit():
        return _OTHER_COLOR
    shade = 0.45 + 0.45 * int(index) / max(num_stacks - 1, 1)
    return matplotlib.colors.to_hex(matplotlib.colormaps[_STAGE_CMAPS[kind]](shade))


def stage_shares(stages: pd.DataFrame, path: Path, title: str, order: Sequence[str], labels: dict[str, str]) -> Path:
    """Stacked horizontal bars: each profiled cell's step split into its stages (% of the step they partition).

    `stages` is stages.csv (plus a `run` column); one panel per phase, one bar per framework x execution
    (x run), segments in `order` (execution order, then loss and other); `labels` renames stages in the
    legend. Cells that did not profile are labelled gaps.
    """
    if stages.empty:
        return _empty("stage_shares", path, title, "no profiled cells in this run")
    phases = _phases(stages)
    num_stacks = sum(1 for name in order if name.startswith("hourglass_")) or 1
    fig, axes = _figure("stage_shares", ncols=len(phases))
    multi = "run" in stages and stages["run"].nunique() > 1
    for ax, phase in zip(axes, phases, strict=True):
        panel = stages[stages["phase"] == phase]
        keys = ["run", "framework", "execution"] if "run" in panel else ["framework", "execution"]
        cells = list(panel.groupby(keys, sort=False))
        fw_rank = {fw: i for i, fw in enumerate(FRAMEWORK_ORDER)}
        cells.sort(key=lambda item: fw_rank.get(dict(zip(keys, item[0], strict=True))["framework"], len(fw_rank)))
        ys = np.arange(len(cells))[::-1]
        names = []
        for y, (key, rows) in zip(ys, cells, strict=True):
            cell = dict(zip(keys, key, strict=True))
            first = rows.iloc[0]
            ok = str(first["status"]) == "ok"
            method = f" [{first['method']}]" if ok else ""
            names.append(f"{cell['framework']} {cell['execution']}{method}" + (f" ({cell['run']})" if multi else ""))
            if not ok:
                _gap_label(ax, y, str(first["status"]), str(first["error"]))
                continue
            shares = rows.set_index("stage")["share_of_step"].astype(float) * 100  # fraction -> %
            left = 0.0
            for stage in order:
                width = float(shares.get(stage, 0.0))
                if width <= 0:
                    continue
                color = stage_color(stage, num_stacks)
                ax.barh(y, width, left=left, color=color, edgecolor="white", linewidth=0.6,
                        hatch="//" if stage == "other" else "")  # fmt: skip
                if width >= 6:  # a label only where it fits, white on dark segments
                    dark = sum(matplotlib.colors.to_rgb(color)) < 1.5
                    ax.text(left + width / 2, y, f"{width:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")  # fmt: skip
                left += width
            ax.text(101, y, f"{_short(float(first['stage_step_ms']))} ms", va="center", ha="left", fontsize=7)
        ax.set_yticks(ys, names, fontsize=8)
        ax.set_ylim(-0.7, len(cells) - 0.3)
        ax.set_xlim(0, 112)  # room for the step time after 100%
        ax.set_xticks(range(0, 101, 20))
        ax.set_xlabel("% of the step the stages partition (its time in ms at the right)")
        ax.set_title(PHASE_TITLE.get(phase, phase))
        ax.grid(axis="x", alpha=0.3)
    present = set(stages.loc[stages["status"] == "ok", "stage"].astype(str))
    handles = [
        matplotlib.patches.Patch(
            facecolor=stage_color(stage, num_stacks), hatch="//" if stage == "other" else "", edgecolor="white",
            label=labels.get(stage, stage),
        )
        for stage in order
        if stage in present
    ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 10), fontsize=8)
    fig.suptitle(f"Where the step goes, per stage - {title}")
    return _save(fig, path)


def maxbatch(probes: pd.DataFrame, path: Path, title: str) -> Path:
    """Throughput (top) and peak memory (bottom) against batch per searched target, one column per phase,
    with the memory budget as a line; probes that did not fit are crosses at their batch."""
    phases = _phases(probes)
    fig, axes = _figure("maxbatch", ncols=len(phases), nrows=2)
    for column, phase in enumerate(phases):
        top, bottom = axes[column], axes[len(phases) + column]
        panel = probes[probes["phase"] == phase]
        for (fw, execution, precision), group in panel.groupby(["framework", "execution", "precision"], sort=False):
            line = group.sort_values("batch_size")
            fits = line[line["fits"].astype(str).str.lower() == "true"]
            style = {"color": framework_color(str(fw)), "linestyle": EXECUTION_LINESTYLE.get(str(execution), "-"), "marker": "o"}
            label = f"{fw} {execution}" + (f" {precision}" if probes["precision"].nunique() > 1 else "")
            top.plot(fits["batch_size"], fits["throughput_img_per_s"], label=label, **style)
            bottom.plot(fits["batch_size"], fits["peak_bytes"] / 2**30, label=label, **style)
            misses = line[~line.index.isin(fits.index)]
            bottom.plot(misses["batch_size"], misses["peak_bytes"].fillna(0) / 2**30, linestyle="none", marker="x",
                        color=_FAILED_COLOR, markersize=9)  # fmt: skip
        budget = pd.to_numeric(panel["memory_budget_bytes"], errors="coerce").dropna()
        if not budget.empty:
            bottom.axhline(budget.iloc[0] / 2**30, color=_FAILED_COLOR, linestyle="--", label="memory budget")
        for ax, ylabel in ((top, "images/s"), (bottom, f"peak memory (GiB, {panel['memory_source'].iloc[0]})")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size (images)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        top.set_title(PHASE_TITLE.get(phase, phase))
    fig.suptitle(title)
    return _save(fig, path)



def scaling(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Data-parallel images/s against the device count, one line per framework, variant, execution, precision and
    per-device batch, beside perfect scaling (N x the 1-device images/s, dashed); one panel per phase."""
    ok = frame[(frame["status"] == "ok") & frame["throughput_img_per_s"].notna()].assign(
        per_device=lambda f: f["batch_size"].astype(int) // f["devices"].astype(int))
    phases = [p for p in _phases(frame) if (frame.loc[frame["phase"] == p, "devices"] > 1).any()]
    if ok.empty or not phases:
        return _empty("scaling", path, title, "no data-parallel cell was measured")
    fig, axes = _figure("scaling", ncols=len(phases))
    keys = ["run", "framework", "impl", "execution", "precision", "per_device"]
    for ax, phase in zip(axes, phases, strict=True):
        for key, group in ok[ok["phase"] == phase].groupby(keys, sort=True):
            line = group.sort_values("devices")
            if line["devices"].nunique() < 2 and (line["devices"] == 1).all():
                continue
            row = line.iloc[0]
            label = f"{_cell_label(row, _multi_run(frame), False, ok['precision'].nunique() > 1)} b{key[-1]}/device"
            ax.plot(line["devices"], line["throughput_img_per_s"], marker="o", color=framework_color(row["framework"]),
                    linestyle=EXECUTION_LINESTYLE.get(row["execution"], "-"), label=label)  # fmt: skip
            one = line[line["devices"] == 1]
            if not one.empty:
                counts = np.array(sorted(set(line["devices"])))
                ax.plot(counts, counts * float(one["throughput_img_per_s"].iloc[0]), color=framework_color(row["framework"]),
                        linestyle=(0, (1, 3)), alpha=0.5)  # fmt: skip
        ax.set_xticks(sorted(set(ok["devices"].astype(int))))
        ax.set_xlabel("devices (data-parallel replicas)")
        ax.set_ylabel("images/s (global batch / step time)")
        ax.set_title(f"{PHASE_TITLE.get(phase, phase)}: dotted = perfect scaling from 1 device")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
