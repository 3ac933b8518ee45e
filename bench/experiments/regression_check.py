"""How trustworthy is `bench compare` on this machine? Measure its false alarms and its detection rate.

    python -m bench.experiments.regression_check --like results/baseline --pairs 10 --slowdowns 0.25,0.15,0.10

Runs, interleaved so slow drift of the machine spreads over every kind: normal runs N_0..N_pairs (each
`bench run --like`: the same cells as the given run), and per slowdown s and pair i a run S_i with the test
switch HGBENCH_TEST_SLOWDOWN=s, which lengthens every timed model step by the fraction s of its own duration
(calibration workloads are left alone). Then, for every threshold and with and without --normalize:
- false alarms: compare(N_i, N_i+1) for i < pairs, the same code against itself ("same_code"), and
  compare(LIKE, N_i) for every normal run, the same code against the given run as CI compares against its
  committed baseline ("same_code_vs_like"); any cell judged `slower` is a false alarm;
- detection: compare(N_i, S_i) ("slowdown"), and compare(LIKE, S_i) as CI would see it ("slowdown_vs_like");
  `flagged` counts comparisons that exit 1 (CI red), `all_cells_slower` those where every model cell is
  judged slower (the slowdown is applied to every cell).
Writes pairs.csv (one row per comparison and setting) and summary.csv (counts per setting) under --out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.rundir import write_csv_atomic
from bench.engine.protocol import SLOWDOWN_ENV
from bench.regress.compare import compare_runs, parse_threshold

DEFAULT_THRESHOLDS = "5%,10%,15%,20%,25%"


def _run(like: Path, out: Path, run_id: str, slowdown: float) -> Path:
    """One `bench run --like` into out/run_id, with the slowdown switch when slowdown > 0."""
    env = dict(os.environ)
    env.pop(SLOWDOWN_ENV, None)
    if slowdown > 0:
        env[SLOWDOWN_ENV] = repr(slowdown)
    command = [sys.executable, "-m", "bench", "run", "--like", str(like), "--out", str(out), "--run-id", run_id, "--no-report"]
    print(f"+ {SLOWDOWN_ENV + '=' + repr(slowdown) + ' ' if slowdown else ''}{' '.join(command[1:])}", flush=True)
    subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL)
    return out / run_id


def _judge(base: Path, new: Path, kind: str, slowdown: float, pair: int, thresholds: list[float]) -> list[dict]:
    rows = []
    for normalize in (False, True):
        for threshold in thresholds:
            result = compare_runs(base, new, threshold=threshold, normalize=normalize)
            model = [c for c in result.cells if c.kind == "model" and c.status == "compared"]
            slower = [c for c in model if c.verdict == "slower"]
            rows.append({
                "kind": kind, "slowdown": slowdown, "pair": pair, "base": base.name, "new": new.name,
                "normalize": normalize, "threshold": threshold, "cells": len(model), "cells_slower": len(slower),
                "cells_faster": sum(c.verdict == "faster" for c in model),
                "flagged": result.exit_code == 1, "invariant_mismatches": len(result.invariant_mismatches),
                "ratio_min": min((c.ratio for c in model), default=float("nan")),
                "ratio_max": max((c.ratio for c in model), default=float("nan")),
            })  # fmt: skip
    return rows


def most_typical(runs: list[Path]) -> Path:
    """The run whose model-cell medians stray least (largest |log ratio|) from the per-cell median over runs:
    a baseline candidate that represents the machine's usual state rather than one fast or slow spell."""
    medians = {}
    for run_dir in runs:
        summary = pd.read_csv(run_dir / "summary.csv")
        model = summary[(summary["kind"] == "model") & (summary["status"] == "ok")]
        medians[run_dir] = model.set_index("cell_id")["latency_ms_median"]
    table = pd.DataFrame(medians).T  # (runs, cells)
    spread = np.log(table / table.median()).abs().max(axis=1)
    return Path(spread.idxmin())


def summarize(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, slowdown, normalize, threshold): comparisons, false alarms or detections, worst ratios."""
    grouped = pairs.groupby(["kind", "slowdown", "normalize", "threshold"], as_index=False)
    return grouped.agg(
        comparisons=("pair", "count"),
        flagged=("flagged", "sum"),
        all_cells_slower=("cells_slower", lambda s: int((s == pairs.loc[s.index, "cells"]).sum())),
        ratio_min=("ratio_min", "min"),
        ratio_max=("ratio_max", "max"),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; exit 0 when it completed (its findings are in the CSVs), 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.regression_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--like", required=True, help="run directory whose cells every run measures (e.g. results/baseline)")
    parser.add_argument("--pairs", type=int, default=10, help="same-code pairs and slowed runs per slowdown (default 10)")
    parser.add_argument("--slowdowns", default="0.25", help="comma list of injected slowdown fractions (default 0.25)")
    parser.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="compare thresholds (default %(default)s)")
    parser.add_argument("--out", required=True, help="folder for the runs and the CSVs")
    parser.add_argument("--judge-only", action="store_true", help="measure nothing: judge the runs already in OUT/runs again")
    args = parser.parse_args(argv)
    like, out = Path(args.like), Path(args.out)
    if not (like / "run.json").is_file():
        print(f"error: --like {args.like!r} is not a run directory (no run.json)", file=sys.stderr)
        return 2
    try:
        slowdowns = [float(s) for s in args.slowdowns.split(",")]
        thresholds = [parse_threshold(t) for t in args.thresholds.split(",")]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.pairs < 1 or any(not 0 < s <= 10 for s in slowdowns):
        print("error: --pairs must be >= 1 and every slowdown in (0, 10]", file=sys.stderr)
        return 2
    runs = out / "runs"
    if args.judge_only:
        normal = [runs / f"normal-{i}" for i in range(args.pairs + 1)]
        slowed = {s: [runs / f"slow{s:g}-{i}" for i in range(args.pairs)] for s in slowdowns}
        missing = [str(p) for p in [*normal, *(p for paths in slowed.values() for p in paths)] if not (p / "summary.csv").is_file()]
        if missing:
            print(f"error: --judge-only: {len(missing)} run(s) missing, e.g. {missing[0]}; run without it first", file=sys.stderr)
            return 2
    else:
        normal = [_run(like, runs, "normal-0", 0.0)]
        slowed = {s: [] for s in slowdowns}
        for i in range(args.pairs):
            for s in slowdowns:
                slowed[s].append(_run(like, runs, f"slow{s:g}-{i}", s))
            normal.append(_run(like, runs, f"normal-{i + 1}", 0.0))
    rows = []
    for i, run_dir in enumerate(normal):
        if run_dir.resolve() != like.resolve():  # the --like run may be one of the normal runs
            rows += _judge(like, run_dir, "same_code_vs_like", 0.0, i, thresholds)
    for i in range(args.pairs):
        rows += _judge(normal[i], normal[i + 1], "same_code", 0.0, i, thresholds)
        for s in slowdowns:
            rows += _judge(normal[i], slowed[s][i], "slowdown", s, i, thresholds)
            rows += _judge(like, slowed[s][i], "slowdown_vs_like", s, i, thresholds)
    pairs = pd.DataFrame(rows)
    write_csv_atomic(out / "pairs.csv", pairs)
    table = summarize(pairs)
    write_csv_atomic(out / "summary.csv", table)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(table.to_string(index=False))
    typical = most_typical(normal)
    print(f"most typical normal run (closest to the per-cell medians of all {len(normal)}): {typical}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
