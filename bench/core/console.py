"""Everything the runner prints: progress bar, warnings, the closing table. Prints only; measures nothing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.core.numbers import num
from impls.registry import DEFAULT_IMPL

_STATUS_STYLE = {"ok": "green", "skipped": "yellow", "failed": "bold red", "oom": "bold red", "timeout": "bold red"}


def make_console() -> Console:
    """The console for run output (stdout); wide enough for the table when writing to a file or pipe."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 150)
    return console


def make_progress(console: Console) -> Progress:
    """Progress bar: current cell, cells done of total, elapsed and estimated time left."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def warn(console: Console, text: str) -> None:
    """A one-line warning."""
    console.print(f"[yellow]warning:[/yellow] {escape(text)}")


def alarm(console: Console, title: str, text: str) -> None:
    """A loud boxed message for results that must not be overlooked (a framework that disagrees)."""
    console.print(Panel(escape(text), title=escape(title), style="bold red"))


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    number = num(value)
    return "" if math.isnan(number) else format(number * scale, spec)


def _memory(row: Mapping[str, Any]) -> str:
    for column in ("gpu_allocator_peak_bytes", "host_peak_rss_bytes"):
        number = num(row.get(column))
        if not math.isnan(number):
            label = "gpu" if column.startswith("gpu") else "rss"
            return f"{number / 2**20:,.0f} MiB {label}"
    return ""


_PHASE_SHORT = {"forward": "fwd", "forward_backward": "fwd+bwd", "conv3x3": "conv3x3"}


def summary_table(rows: Iterable[Mapping[str, Any]], title: str) -> Table:
    """The compact closing table: one line per cell; IQR% in yellow when the cell is noisy."""
    table = Table(title=title, header_style="bold", pad_edge=False, box=None)
    for name in (
        "cell",
        "status",
        "median ms",
        "95% CI ms",
        "IQR %",
        "img/s",
        "GFLOP/s",
        "% ceiling",
        "1st call s",
        "memory",
    ):
        table.add_column(name, justify="left" if name in ("cell", "status") else "right", no_wrap=True)
    for row in rows:
        status = str(row.get("status", ""))
        median = num(row.get("latency_ms_median"))
        iqr_pct = num(row.get("latency_ms_iqr")) / median * 100 if median else math.nan
        low, high = (
            _fmt(row.get("latency_ms_median_ci95_low"), ".2f"),
            _fmt(row.get("latency_ms_median_ci95_high"), ".2f"),
        )
        noisy = str(row.get("noisy")).lower() == "true"
        phase = str(row.get("phase", ""))
        impl = row.get("impl")
        variant = f"{row.get('framework')}" + (f" {impl}" if impl and impl != DEFAULT_IMPL else "")
        devices = num(row.get("devices"))
        where = f" d{int(devices)}" if devices > 1 else ""  # data parallel: devices, then the global batch
        cell = (f"{variant} {row.get('execution')} {row.get('precision')}{where} b{row.get('batch_size')} "
                f"{_PHASE_SHORT.get(phase, phase)}")  # fmt: skip
        table.add_row(
            cell,
            f"[{_STATUS_STYLE.get(status, 'default')}]{status}[/]",
            _fmt(median, ".2f"),
            f"{low}-{high}" if low else "",
            f"[yellow]{_fmt(iqr_pct, '.1f')}[/]" if noisy else _fmt(iqr_pct, ".1f"),
            _fmt(row.get("throughput_img_per_s"), ".2f"),
            _fmt(row.get("achieved_gflop_per_s"), ".1f"),
            _fmt(row.get("ceiling_fraction"), ".0f", 100.0),
            _fmt(row.get("first_call_ms"), ".1f", 1e-3),
            _memory(row),
        )
    return table


def print_problems(console: Console, rows: Iterable[Mapping[str, Any]]) -> None:
    """One line per cell that did not finish ok: its status and the last line of its error."""
    for row in rows:
        status = str(row.get("status", ""))
        if status == "ok":
            continue
        lines = [line for line in str(row.get("error", "")).splitlines() if line.strip()]
        style = "yellow" if status == "skipped" else "red"
        console.print(
            f"[{style}]{status}[/] {row.get('cell_id')}: {escape(lines[-1]) if lines else ''}", soft_wrap=True
        )
