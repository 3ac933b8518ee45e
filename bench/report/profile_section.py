"""The profile section of `python -m bench report`: stage-share figure, stage tables, FLOP check, compile table.

A run directory holding stages.csv was written by `python -m bench profile`. bench/report.py calls
`is_profile_dir` on each directory it is given; a profile directory adds this section to the report of the
`bench run` directories given with it, or, given alone, gets a report of its own (`build_profile_only`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.core.columns import PROFILE_CSVS
from bench.core.rundir import ProfileData
from bench.profile import tables
from bench.report import plots, render

FIGURE_NAME = "stage_shares"
FIGURE_TITLE = "Where the step goes, per stage (% of the step the stages partition)"


def _combined(profiles: Sequence[ProfileData], name: str) -> pd.DataFrame:
    parts = [p.tables[name].assign(run=p.label) for p in profiles if not p.tables[name].empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*PROFILE_CSVS[name], "run"])


def _title(profiles: Sequence[ProfileData]) -> str:
    parts = []
    for p in profiles:
        s = p.record.get("settings", {})
        cfg = s.get("config", {})
        hw = cfg.get("input_hw", ["?", "?"])
        parts.append(
            f"{s.get('preset', '?')} preset ({cfg.get('num_stacks', '?')} stacks, {hw[0]}x{hw[1]} input), "
            f"{s.get('device', '?')}, batch {s.get('batch_size', '?')}, {s.get('precision', '?')}"
        )
    return "; ".join(dict.fromkeys(parts))


@dataclass
class Section:
    """The profile section, as markdown and as HTML, and the figure it shows."""

    markdown: str
    html: str
    figure: Path


def section(profiles: Sequence[ProfileData], out_dir: Path) -> Section:
    """Draw the stage-share figure into `out_dir` and render the section's tables."""
    stages = _combined(profiles, "stages.csv")
    order = tables.stage_order(stages)
    labels = {tables.OTHER_STAGE: tables.OTHER_LABEL}
    figure = plots.stage_shares(stages, out_dir / f"{FIGURE_NAME}.png", _title(profiles), order, labels)
    blocks: list[tuple[str, pd.DataFrame, str]] = []  # (heading, table, note)
    for phase in [p for p in ("forward", "forward_backward") if p in set(stages["phase"])]:
        if tables.ok_cells(stages, phase):
            blocks.append(
                (
                    f"Stages, {phase}",
                    tables.stage_display(stages, phase, gflops=True),
                    "GFLOP/s = the stage's analytic conv FLOPs (impls.profiling.stage_conv_flops) over its time.",
                )
            )
    flops, compiles = _combined(profiles, "flops.csv"), _combined(profiles, "compile.csv")
    blocks.append(
        (
            "Conv FLOPs: analytic vs framework-reported",
            tables.flop_display(flops),
            "analytic = impls.count_flops (convolutions only, 2 FLOPs per multiply-add); within 1% is the bar.",
        )
    )
    blocks.append(
        (
            "Compilation",
            tables.compile_display(compiles),
            "RECOMPILED: the timed loop recompiled; its profile is not the steady state.",
        )
    )
    problems = tables.problem_rows(stages)
    if not problems.empty:
        blocks.append(("Cells that did not profile", problems, ""))
    traces = ", ".join(str(p.path / "traces") for p in profiles)
    trace_note = (
        f"Traces: {traces} (one folder per framework-execution-phase). Chrome/Perfetto JSON: https://ui.perfetto.dev "
        "-> Open trace file, or chrome://tracing; TensorBoard logdirs (*.xplane.pb): tensorboard --logdir <folder> "
        "with tensorboard-plugin-profile."
    )
    return Section(_markdown(figure, blocks, trace_note), _html(figure, blocks, trace_note), figure)


def _markdown(figure: Path, blocks: list[tuple[str, pd.DataFrame, str]], trace_note: str) -> str:
    parts = ["## Profile\n", tables.METHOD_FOOTNOTE + "\n", f"### {FIGURE_TITLE}\n\n![{FIGURE_NAME}]({figure.name})\n"]
    for heading, frame, note in blocks:
        parts += [f"### {heading}\n", *([note + "\n"] if note else []), render.md_table(frame)]
    parts.append(trace_note + "\n")
    return "\n".join(parts)


def _html(figure: Path, blocks: list[tuple[str, pd.DataFrame, str]], trace_note: str) -> str:
    esc = html.escape
    body = [
        '<section id="profile"><h2>Profile</h2>',
        f"<p>{esc(tables.METHOD_FOOTNOTE)}</p>",
        render.figure_html(FIGURE_NAME, FIGURE_TITLE, figure),
    ]
    for index, (heading, frame, note) in enumerate(blocks):
        body += [
            f"<h3>{esc(heading)}</h3>",
            *([f"<p>{esc(note)}</p>"] if note else []),
            render.html_table(frame, f"profile-table-{index}"),
        ]
    body += [f"<p>{esc(trace_note)}</p>", "</section>"]
    return "\n".join(body)


def build_profile_only(profiles: Sequence[ProfileData], out_dir: str | Path) -> Path:
    """report.md and report.html for profile runs alone: warnings, the profile section, the environment."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    part = section(profiles, out)
    heading = "hgbench profile report: " + ", ".join(p.label for p in profiles)
    title = _title(profiles)
    notes = [str(w) for p in profiles for w in p.record.get("warnings", [])]
    notes += [
        f"{r.cell} {r.status}: {r.error}" for r in tables.problem_rows(_combined(profiles, "stages.csv")).itertuples()
    ]
    environment = render.environment_display(profiles)
    md = [
        f"# {heading}\n",
        f"{title}\n",
        "## Warnings\n",
        render.warnings_md(notes),
        part.markdown,
        "## Environment\n",
        render.md_table(environment),
    ]
    (out / "report.md").write_text("\n".join(md))
    esc = html.escape
    body = [
        f"<h1>{esc(heading)}</h1>",
        f"<p>{esc(title)}</p>",
        "<h2>Warnings</h2>",
        render.warnings_html(notes),
        part.html,
        "<h2>Environment</h2>",
        render.html_table(environment, "environment-table"),
    ]
    page = render.page(heading, body)
    html_path = out / "report.html"
    html_path.write_text(page)
    return html_path
