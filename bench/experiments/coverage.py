"""Do the intervals of `bench run` cover what a rerun measures? The coverage of the 95% interval, measured.

    python -m bench.experiments.coverage --like results/baseline --runs 20 --rounds 1,3 --out DIR

For each round count R, makes `--runs` consecutive runs of the same cells (`bench run --like LIKE --rounds
R --timing-only`: coverage asks about timings alone, so the equivalence checks are skipped; the round
counts alternate run by run, so slow drift of the machine spreads over both), then asks, for
every model cell and every run after the first: does this run's median fall inside the previous run's 95%
interval of the median? A 95% interval that knows all the noise a rerun sees covers the next run's median
a little less than 95% of the time (the next median has noise of its own); one that knows only the noise
within one process covers far less. Each consecutive pair is also judged by `bench compare PREVIOUS
CURRENT` with its defaults: the code is the same, so every slower or faster verdict is a false alarm.
Writes DIR/runs/, pairs.csv (one row per cell and consecutive pair) and summary.csv (coverage and
compare's false alarms per round count and cell, and overall).

Beside the interval each run recorded (`latency_ms_median_ci95_*` as written by the version that made the
run: a two-level bootstrap before 2026-11-30's change), runs of two or more rounds are judged with the two
intervals bench.core.stats now builds from the round medians m_1..m_R on the log scale (g and s the mean and
sample sd of log m_i, Student t with R - 1 degrees of freedom), recomputed from samples.csv: the t
interval of the typical round median, exp(g +- t s / sqrt(R)) (what `bench run` reports), and the
prediction interval for the next run's, exp(g +- t s sqrt(2 / R)) (`latency_ms_rerun_pi95_*`). Even with
lognormal, independent rounds the t interval covers the next run's typical round median less often than
95% (the rerun has noise of its own): 91% with three rounds, 83% with many; the prediction interval is
the one built to cover it 95%.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core import stats
from bench.core.rundir import RunDirError, read_run, write_csv_atomic
from bench.core.settings import SettingsError, parse_int_list, parse_positive_int
from bench.regress.compare import compare_runs


def _run(like: Path, runs: Path, run_id: str, rounds: int) -> Path:
    command = [sys.executable, "-m", "bench", "run", "--like", str(like), "--rounds", str(rounds),
               "--out", str(runs), "--run-id", run_id, "--no-report", "--timing-only"]  # fmt: skip
    print(f"+ {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
    return runs / run_id


def round_intervals(round_medians_ms: np.ndarray) -> dict[str, float]:
    """The t interval of the typical round median and the prediction interval of the next run's (as many
    rounds), both on the log scale (bench.core.stats); empty with fewer than two rounds."""
    if len(round_medians_ms) < 2:
        return {}
    (t_low, t_high), (p_low, p_high) = stats.t_interval(round_medians_ms), stats.rerun_interval(round_medians_ms)
    return {"t_low": t_low, "t_high": t_high, "prediction_low": p_low, "prediction_high": p_high}


def covered(previous: Path, current: Path) -> list[dict[str, object]]:
    """Per model cell ok in both runs: is the current median inside the previous run's interval (and inside
    the round-median intervals, where the previous run had several rounds)?"""
    earlier = read_run(previous)
    before, after = earlier.summary, read_run(current).summary
    # What `bench compare PREVIOUS CURRENT` says with its defaults: for runs of identical code, any
    # slower or faster verdict is a false alarm.
    comparison = compare_runs(previous, current)
    judged = {c.cell_id: c for c in comparison.cells if c.status == "compared"}
    before = before[(before["kind"] == "model") & (before["status"] == "ok")].set_index("cell_id")
    after = after[(after["kind"] == "model") & (after["status"] == "ok")].set_index("cell_id")
    rows = []
    for cell_id in sorted(set(before.index) & set(after.index)):
        low, high = before.loc[cell_id, "latency_ms_median_ci95_low"], before.loc[cell_id, "latency_ms_median_ci95_high"]
        median = after.loc[cell_id, "latency_ms_median"]
        row = {"cell_id": cell_id, "previous": previous.name, "current": current.name,
               "previous_ci95_low": low, "previous_ci95_high": high, "current_median": median,
               "covered": bool(low <= median <= high),
               "relative_width": (high - low) / before.loc[cell_id, "latency_ms_median"],
               "compare_verdict": judged[cell_id].verdict if cell_id in judged else "",
               # False: a one-round cell, which the run-level judgement replaces (bench.regress.compare)
               "compare_cell_decides": judged[cell_id].decides if cell_id in judged else "",
               "compare_run_level": comparison.run_level.verdict, "compare_failed": comparison.exit_code == 1}  # fmt: skip
        extra = round_intervals(stats.round_medians(earlier.samples_by_round(cell_id)))
        for kind in ("t", "prediction"):
            if extra:
                row[f"{kind}_low"], row[f"{kind}_high"] = extra[f"{kind}_low"], extra[f"{kind}_high"]
                row[f"covered_{kind}"] = bool(extra[f"{kind}_low"] <= median <= extra[f"{kind}_high"])
                row[f"relative_width_{kind}"] = (extra[f"{kind}_high"] - extra[f"{kind}_low"]) / before.loc[cell_id, "latency_ms_median"]
        rows.append(row)
    return rows


def summarize(pairs: pd.DataFrame) -> pd.DataFrame:
    """Coverage per round count, per cell and over all cells."""
    aggregates = {"pairs": ("covered", "size"), "covered": ("covered", "sum"),
                  "median_relative_width": ("relative_width", "median"),
                  "compare_slower": ("compare_verdict", lambda v: int((v == "slower").sum())),
                  "compare_faster": ("compare_verdict", lambda v: int((v == "faster").sum()))}  # fmt: skip
    for kind in ("t", "prediction"):
        if f"covered_{kind}" in pairs:
            pairs[f"covered_{kind}"] = pairs[f"covered_{kind}"].astype(float)  # NaN: a one-round previous run
            aggregates[f"coverage_{kind}"] = (f"covered_{kind}", "mean")
            aggregates[f"median_relative_width_{kind}"] = (f"relative_width_{kind}", "median")
    per_cell = pairs.groupby(["rounds", "cell_id"], as_index=False).agg(**aggregates)
    overall = pairs.groupby("rounds", as_index=False).agg(**aggregates)
    overall.insert(1, "cell_id", "all")
    table = pd.concat([overall, per_cell], ignore_index=True)
    table.insert(table.columns.get_loc("covered") + 1, "coverage", table["covered"] / table["pairs"])
    return table


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 0 when the experiment ran (coverage is data, not a verdict), 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--like", default="results/baseline", help="the run whose cells and settings are repeated")
    parser.add_argument("--runs", default="20", help="consecutive runs per round count (default %(default)s)")
    parser.add_argument("--rounds", default="1,3", help="round counts to compare (default %(default)s)")
    parser.add_argument("--out", required=True, help="folder for the runs and the CSVs (new or empty)")
    parser.add_argument("--judge-only", action="store_true", help="recompute the CSVs from the runs in --out")
    args = parser.parse_args(argv)
    try:
        n_runs = parse_positive_int("--runs", args.runs, minimum=2)
        round_counts = parse_int_list("--rounds", args.rounds)
        out, like = Path(args.out), Path(args.like)
        runs = out / "runs"
        if not args.judge_only:
            read_run(like)
            if runs.exists() and any(runs.iterdir()):
                raise SettingsError(f"--out {out}: {runs} is not empty; give a new folder or use --judge-only")
            for index in range(n_runs):
                for rounds in round_counts:  # alternate the round counts run by run
                    _run(like, runs, f"r{rounds}-{index:02d}", rounds)
        rows = []
        for rounds in round_counts:
            names = [runs / f"r{rounds}-{index:02d}" for index in range(n_runs)]
            present = [p for p in names if (p / "summary.csv").is_file()]
            for previous, current in itertools.pairwise(present):
                rows += [{"rounds": rounds, **row} for row in covered(previous, current)]
    except (SettingsError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pairs = pd.DataFrame(rows)
    if pairs.empty:
        print("error: no two consecutive runs with ok model cells; see the runs' logs", file=sys.stderr)
        return 2
    table = summarize(pairs)
    write_csv_atomic(out / "pairs.csv", pairs)
    write_csv_atomic(out / "summary.csv", table)
    print(table[table["cell_id"] == "all"].to_string(index=False))
    for rounds, group in pairs.groupby("rounds"):
        by_pair = group.groupby(["previous", "current"])
        flagged = by_pair["compare_verdict"].agg(lambda v: bool((v == "slower").any()))
        failed = by_pair["compare_failed"].agg(lambda v: bool(v.astype(bool).any()))
        print(f"{rounds} round(s): of {flagged.size} consecutive pairs of same-code runs, bench compare (defaults) "
              f"failed {int(failed.sum())} (exit 1); {int(flagged.sum())} had a cell that looked slower on its "
              "own")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
