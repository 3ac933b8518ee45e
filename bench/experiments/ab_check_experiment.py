"""How trustworthy is CI's timing gate (bench/regress/ab_check.py)? Run it again and again, with and without a slowdown.

    python -m bench.experiments.ab_check_experiment --baseline results/baseline --gates 10 --slowdowns 0.10,0.05 --out DIR

Gate i runs the whole gate once on this checkout as it is ("same_code": any failure is a false alarm,
provided the checkout's code is not really slower than the baseline's commit), then once per slowdown s with
the test switch HGBENCH_TEST_SLOWDOWN=s, which reaches the gate's new runs only ("slowdown": a failure is a
detection). Writes DIR/gate-i-<kind>/ (the gate's runs and verdict.json) and DIR/gates.csv (one row per
gate: kind, slowdown, pairs, exit, what was judged slower, the all-cells ratio with its interval and p, the
worst cell's ratio), and prints the counts. `--more` adds gates to a DIR that holds some (numbering
continues), so the evidence can grow over several sessions. Measure nothing else on the machine meanwhile.
`--rejudge` measures nothing: it judges the pairs that DIR's gates measured again under other thresholds
or `--alpha` (DIR/gates-rejudged.csv), which is how a change of the rule is checked against evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.paths import REPO_ROOT
from bench.core.rundir import write_csv_atomic
from bench.engine.protocol import SLOWDOWN_ENV
from bench.regress.ab_check import (
    DEFAULT_CELL_THRESHOLD,
    DEFAULT_PAIRS,
    DEFAULT_THRESHOLD,
    GATE_ALPHA,
    ABCheckError,
    GateLimits,
    check,
    judge_pairs,
)
from bench.regress.compare import CompareError, parse_threshold
from bench.regress.paired import ALL_CELLS, MIN_PAIRS


def _row(kind: str, slowdown: float, gate: int, verdict: dict[str, Any]) -> dict[str, Any]:
    judged = {j["name"]: j for j in verdict.get("paired") or []}
    overall = judged.pop(ALL_CELLS, {})
    worst = max(judged.values(), key=lambda j: j["ratio"], default={})
    return {
        "kind": kind, "slowdown": slowdown, "gate": gate, "pairs": len(verdict["pairs"]),
        "failed": verdict["exit_code"] == 1, "slower": ";".join(verdict.get("slower") or []),
        "failures": " | ".join(verdict.get("failures") or []),
        "all_cells_ratio": overall.get("ratio"), "all_cells_ci95_low": overall.get("ci95_low"),
        "all_cells_ci95_high": overall.get("ci95_high"), "all_cells_p_slower": overall.get("p_slower"),
        "all_cells_log_ratio_sd": overall.get("log_ratio_sd"),
        "worst_cell": worst.get("name"), "worst_cell_ratio": worst.get("ratio"),
    }  # fmt: skip


def rejudge(out: Path, limits: GateLimits) -> pd.DataFrame:
    """Judge the pairs every gate in `out` measured again under other limits (their pair count is what was
    measured): one row per gate with the verdict the gate would have given. Writes out/gates-rejudged.csv."""
    rows = []
    for path in sorted(out.glob("gate-*/verdict.json"), key=lambda p: p.parent.name):
        verdict = json.loads(path.read_text())
        per_cell = {j["name"]: list(j["ratios"]) for j in verdict.get("paired") or [] if j["name"] != ALL_CELLS}
        judged = judge_pairs(per_cell, limits) if per_cell else []
        slower = [j.name for j in judged if j.verdict == "slower"]
        overall = next((j for j in judged if j.name == ALL_CELLS), None)
        rows.append({"gate": path.parent.name, "pairs": overall.n_pairs if overall else 0,
                     "measured_failed": verdict.get("exit_code") == 1, "rejudged_slower": ";".join(slower),
                     "rejudged_failed": bool(slower) or bool(verdict.get("failures") and not verdict.get("paired")),
                     "all_cells_ratio": overall.ratio if overall else None,
                     "all_cells_p_slower": overall.p_slower if overall else None})  # fmt: skip
    table = pd.DataFrame(rows)
    write_csv_atomic(out / "gates-rejudged.csv", table)
    return table


def main(argv: list[str] | None = None, *, repo: Path | None = None) -> int:  # noqa: PLR0911 (one return per bad input)
    """Run the gates; exit 0 when they completed (the findings are in gates.csv), 2 on bad input.

    repo: where the baseline's commit is looked up (default: this checkout's repository; tests pass another)."""
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.ab_check_experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="results/baseline", help="as for bench.regress.ab_check")
    parser.add_argument("--gates", type=int, default=10, help="gates of each kind (default 10)")
    parser.add_argument("--slowdowns", default="0.10,0.05",
                        help="injected slowdown fractions, comma list (default %(default)s)")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="the gate's --pairs (default %(default)s)")
    parser.add_argument("--threshold", default=DEFAULT_THRESHOLD, help="the gate's --threshold (default %(default)s)")
    parser.add_argument("--cell-threshold", default=DEFAULT_CELL_THRESHOLD,
                        help="the gate's --cell-threshold (default %(default)s)")  # fmt: skip
    parser.add_argument("--out", required=True, help="new folder for the gates' runs and gates.csv")
    parser.add_argument("--more", action="store_true", help="add gates to an --out that holds some")
    parser.add_argument("--alpha", type=float, default=GATE_ALPHA, help="the gate's alpha (default %(default)s)")
    parser.add_argument("--rejudge", action="store_true",
                        help="measure nothing: judge the pairs the gates in --out measured again, under the "
                             "thresholds and --alpha given, into --out/gates-rejudged.csv")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        limits = GateLimits(parse_threshold(args.threshold), parse_threshold(args.cell_threshold, "--cell-threshold"),
                            args.pairs, args.alpha)  # fmt: skip
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.rejudge:
        if not any(out.glob("gate-*/verdict.json")):
            print(f"error: --out {out} holds no gate-*/verdict.json to judge again", file=sys.stderr)
            return 2
        print(rejudge(out, limits).to_string(index=False))
        return 0
    try:
        slowdowns = [float(x) for x in args.slowdowns.split(",") if x.strip()]
    except ValueError:
        slowdowns = []
    if args.gates < 1 or args.pairs < MIN_PAIRS or not slowdowns or not all(0 < s <= 10 for s in slowdowns):
        print(f"error: --gates must be >= 1, --pairs >= {MIN_PAIRS} and --slowdowns a comma list of fractions in "
              f"(0, 10], got {args.gates}, {args.pairs}, {args.slowdowns!r}", file=sys.stderr)  # fmt: skip
        return 2
    table_path = out / "gates.csv"
    if out.exists() and any(out.iterdir()) and not (args.more and table_path.is_file()):
        print(f"error: --out {out} is not empty; give a new folder, or --more to add gates to one that holds gates.csv",
              file=sys.stderr)  # fmt: skip
        return 2
    rows = pd.read_csv(table_path).to_dict("records") if table_path.is_file() else []
    first = 1 + max((int(r["gate"]) for r in rows), default=0)
    try:
        for gate in range(first, first + args.gates):
            for kind, slowdown in (("same_code", 0.0), *(("slowdown", s) for s in slowdowns)):
                os.environ.pop(SLOWDOWN_ENV, None)
                if slowdown:
                    os.environ[SLOWDOWN_ENV] = repr(slowdown)
                name = f"gate-{gate}-{kind}" + (f"-{slowdown:g}" if slowdown else "")
                _, verdict = check(Path(args.baseline), out / name, limits, repo=repo or REPO_ROOT)
                rows.append(_row(kind, slowdown, gate, verdict))
                write_csv_atomic(table_path, pd.DataFrame(rows))  # after every gate: a stop loses nothing
    except (ABCheckError, CompareError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        os.environ.pop(SLOWDOWN_ENV, None)
    table = pd.DataFrame(rows).groupby(["kind", "slowdown"]).agg(
        gates=("gate", "count"), failed=("failed", "sum"), all_cells_ratio_min=("all_cells_ratio", "min"),
        all_cells_ratio_max=("all_cells_ratio", "max"), worst_cell_ratio_max=("worst_cell_ratio", "max"),
    )  # fmt: skip
    print(table.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
