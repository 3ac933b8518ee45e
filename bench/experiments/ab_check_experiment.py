"""How trustworthy is CI's timing gate (bench/ab_check.py)? Run it again and again, with and without a slowdown.

    python -m bench.experiments.ab_check_experiment --baseline results/baseline --rounds 10 --slowdown 0.25 --out DIR

Round i runs the whole gate twice, one after the other: once on this checkout as it is ("same_code": any
failure is a false alarm, provided the checkout's code is not really slower than the baseline's commit), and
once with the test switch HGBENCH_TEST_SLOWDOWN=s, which reaches the gate's new runs only ("slowdown": a
failure is a detection). Writes DIR/round-i-{same_code,slowdown}/ (the gate's runs and verdict.json) and
DIR/rounds.csv (one row per gate: kind, pairs measured, cells flagged in pair 1, confirmed, exit code, worst
ratio of each pair), and prints the counts. Measure nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.paths import REPO_ROOT
from bench.core.rundir import write_csv_atomic
from bench.engine.protocol import SLOWDOWN_ENV
from bench.regress.ab_check import DEFAULT_THRESHOLD, ABCheckError, check
from bench.regress.compare import CompareError, parse_threshold


def _row(kind: str, round_number: int, verdict: dict[str, Any]) -> dict[str, Any]:
    pairs = verdict["pairs"]
    worst = [max(p["ratios"].values(), default=float("nan")) for p in pairs]
    return {
        "kind": kind, "round": round_number, "pairs_measured": len(pairs),
        "pair1_flagged": len(pairs[0]["regressions"]) if pairs else 0,
        "confirmed": len(verdict["confirmed_regressions"]), "failed": verdict["exit_code"] == 1,
        "pair1_worst_ratio": worst[0] if worst else float("nan"),
        "pair2_worst_ratio": worst[1] if len(worst) > 1 else float("nan"),
    }  # fmt: skip


def main(argv: list[str] | None = None, *, repo: Path | None = None) -> int:
    """Run the rounds; exit 0 when they completed (the findings are in rounds.csv), 2 on bad input.

    repo: where the baseline's commit is looked up (default: this checkout's repository; tests pass another)."""
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.ab_check_experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="results/baseline", help="as for bench.regress.ab_check")
    parser.add_argument("--rounds", type=int, default=10, help="gates of each kind (default 10)")
    parser.add_argument("--slowdown", type=float, default=0.25, help="injected slowdown fraction (default 0.25)")
    parser.add_argument(
        "--threshold", default=DEFAULT_THRESHOLD, help="the gate's threshold (default %(default)s)"
    )
    parser.add_argument("--out", required=True, help="new folder for the gates' runs and rounds.csv")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.rounds < 1 or not 0 < args.slowdown <= 10:
        print("error: --rounds must be >= 1 and --slowdown in (0, 10]", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} is not empty; give a new folder", file=sys.stderr)
        return 2
    rows = []
    try:
        threshold = parse_threshold(args.threshold)
        for i in range(args.rounds):
            for kind in ("same_code", "slowdown"):
                os.environ.pop(SLOWDOWN_ENV, None)
                if kind == "slowdown":
                    os.environ[SLOWDOWN_ENV] = repr(args.slowdown)
                _, verdict = check(Path(args.baseline), out / f"round-{i}-{kind}", threshold, repo=repo or REPO_ROOT)
                rows.append(_row(kind, i, verdict))
                write_csv_atomic(out / "rounds.csv", pd.DataFrame(rows))  # after every gate: a stop loses nothing
    except (ABCheckError, CompareError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        os.environ.pop(SLOWDOWN_ENV, None)
    table = pd.DataFrame(rows).groupby("kind").agg(
        gates=("round", "count"), failed=("failed", "sum"), second_pair_needed=("pairs_measured", lambda s: int((s == 2).sum())),
        worst_ratio_pair1=("pair1_worst_ratio", "max"), least_worst_ratio_pair1=("pair1_worst_ratio", "min"),
    )  # fmt: skip
    print(table.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
