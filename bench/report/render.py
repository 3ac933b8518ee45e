"""Rendering shared by the run report and the profile section: tables as Markdown and HTML, the page's CSS,
the page frame, and the environment table of any run directories.

Takes pandas frames and run records; reads no files and draws no figures.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.rundir import ProfileData, RunData


def threads(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {fw: {k: info.get(k) for k in ("intra_op_threads", "inter_op_threads")}
            for fw, info in record.get("frameworks", {}).items() if isinstance(info, dict)}  # fmt: skip


def environment_display(runs: Sequence[RunData | ProfileData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        env = run.record.get("environment", {}) or {}
        gpus = env.get("gpus") or []
        packages = env.get("packages", {}) or {}
        thread_counts = threads(run.record)
        git = env.get("git", {}) or {}
        items = {
            "run": run.label,
            "started (UTC)": run.record.get("started_utc", ""),
            "command": run.record.get("command_line", ""),
            "host / OS": f"{env.get('host', '')} / {env.get('os', '')}",
            "CPU": f"{env.get('cpu_model', '')}, {env.get('cpu_cores_usable', '?')} usable cores",
            "RAM": f"{env.get('ram_bytes', 0) / 2**30:.1f} GiB" if env.get("ram_bytes") else "",
            "GPU": "; ".join(f"{g.get('name', '?')} (driver {g.get('driver', '?')})" for g in gpus if isinstance(g, dict)) or "none",
            "Python": env.get("python", ""),
            "packages": ", ".join(f"{k} {v}" for k, v in packages.items()),
            "threads (intra/inter)": ", ".join(f"{fw} {threads_text(t)}" for fw, t in thread_counts.items()),
            "git": f"{str(git.get('commit', ''))[:12]}{' (dirty)' if git.get('dirty') else ''}",
            "wall time": f"{run.record['bench_wall_s']:.0f} s" if run.record.get("bench_wall_s") else "",
        }  # fmt: skip
        rows.append(items)
    return pd.DataFrame(rows).set_index("run").T.reset_index(names="")


def threads_text(threads: dict[str, Any]) -> str:
    """'2/2'; 0 or None is the framework's own default (TF reports 0), written as such."""
    return "/".join(str(n) if n else "default" for n in (threads["intra_op_threads"], threads["inter_op_threads"]))


def md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_none_\n"
    cells = frame.astype(str).map(lambda s: s.replace("|", "\\|").replace("\n", " "))
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def html_table(frame: pd.DataFrame, table_id: str) -> str:
    if frame.empty:
        return "<p><em>none</em></p>"
    table = frame.to_html(index=False, escape=True, na_rep="", border=0, table_id=table_id, classes="data")
    return f'<div class="scroll">{table}</div>'  # wide tables scroll inside the page, not the page itself


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1450px; color: #222; }
table.data { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
table.data th { background: #f2f2f2; }
table.data td { overflow-wrap: anywhere; max-width: 40em; }
div.scroll { overflow-x: auto; max-width: 100%; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.alert { background: #fde8ea; border: 2px solid #b00020; color: #b00020; padding: 0.8em; font-weight: bold; }
li.warning { color: #8a4b00; }
"""


def page(heading: str, body: Sequence[str]) -> str:
    """A self-contained HTML page: the title, the shared CSS and the body's parts, one per line."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(heading)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def warnings_md(notes: Sequence[str]) -> str:
    """A Markdown bullet list of warnings, or "_none_"."""
    return "\n".join(f"- {n}" for n in notes) + "\n" if notes else "_none_\n"


def warnings_html(notes: Sequence[str]) -> str:
    """An HTML list of warnings, or "none"."""
    if not notes:
        return "<p><em>none</em></p>"
    return "<ul>" + "".join(f'<li class="warning">{html.escape(n)}</li>' for n in notes) + "</ul>"


def figure_html(name: str, title: str, path: Path) -> str:
    """A figure with its PNG embedded (base64), so report.html stands alone."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure id="figure-{name}"><figcaption><h3>{html.escape(title)}</h3></figcaption>'
        f'<img alt="{name}" data-figure="{path.name}" src="data:image/png;base64,{data}"></figure>'
    )
