"""Does `bench compare` with its defaults tell a busy machine from the noise of a quiet one? Measured.

    python -m bench.experiments.busy_check --out DIR [--like RUN] [--repeats N] [--burners K]

Makes, N times over, three consecutive runs of the same code with `bench run`'s default rounds: quiet,
busy (K processes spinning on the CPU for the whole run, started just before it and killed after it:
"both cores busy with other work" on a 2-core machine with K = 2), quiet again; then judges each pair with
`bench compare` and its defaults: quiet -> quiet must pass (same code, same quiet machine: a failure is a
false alarm), quiet -> busy must fail (a detection). Without `--like` each run is the default run, `bench
run --framework all --timing-only`; with it, `bench run --like RUN --timing-only` (fewer cells, cheaper);
`--checks` drops `--timing-only`, so a quiet run is exactly the default run and its wall time that run's cost.
Writes DIR/runs/ (not committed), DIR/verdicts.csv (one row per judged pair) and each comparison's JSON.
The burners are plain Python busy loops, so the experiment needs nothing but this checkout.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench.core.rundir import RunDirError, read_run, write_csv_atomic
from bench.core.settings import SettingsError, parse_positive_int
from bench.regress.compare import CompareError, compare_runs, write_json

_BURNER = "while True: pass"


def _run(runs: Path, run_id: str, like: Path | None, checks: bool) -> tuple[Path, float]:
    """One `bench run` into runs/run_id; its wall time in s."""
    spec = ["--like", str(like)] if like is not None else ["--framework", "all"]
    command = [sys.executable, "-m", "bench", "run", *spec, "--out", str(runs), "--run-id", run_id,
               "--no-report", *([] if checks else ["--timing-only"])]  # fmt: skip
    print(f"+ {' '.join(command[1:])}", flush=True)
    start = time.monotonic()
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
    return runs / run_id, time.monotonic() - start


def _busy_run(runs: Path, run_id: str, like: Path | None, checks: bool, burners: int) -> tuple[Path, float]:
    """The same run with `burners` busy loops beside it (each its own process group, killed afterwards)."""
    procs = [subprocess.Popen([sys.executable, "-c", _BURNER], start_new_session=True) for _ in range(burners)]
    try:
        return _run(runs, run_id, like, checks)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _judge(out: Path, base: Path, new: Path, expected: str) -> dict[str, object]:
    """`bench compare base new` with its defaults, as one row of verdicts.csv."""
    comparison = compare_runs(base, new)
    write_json(comparison, out / f"compare-{base.name}-{new.name}.json")
    level = comparison.run_level
    looked = [c.cell_id for c in comparison.cells if c.verdict == "slower" and c.kind == "model"]
    return {"base": base.name, "new": new.name, "expected": expected, "failed": comparison.exit_code == 1,
            "correct": (comparison.exit_code == 1) == (expected == "fail"),
            "run_level_cells": level.cells, "run_level_ratio": level.ratio, "run_level_ci95_low": level.ci95_low,
            "run_level_ci95_high": level.ci95_high, "run_level_verdict": level.verdict,
            "cells_decided_slower": ";".join(c.cell_id for c in comparison.regressions),
            "cells_looking_slower_alone": ";".join(looked)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 0 when the experiment ran (the verdicts are data), 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.busy_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs and the CSV (new or empty)")
    parser.add_argument("--like", default=None, help="repeat this run's cells instead of the default run")
    parser.add_argument("--repeats", default="1", help="quiet, busy, quiet triples (default %(default)s)")
    parser.add_argument("--checks", action="store_true",
                        help="runs with the equivalence and gradient checks (as a plain bench run), not --timing-only")
    parser.add_argument("--burners", default="2", help="busy-loop processes during the busy run (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        repeats = parse_positive_int("--repeats", args.repeats)
        burners = parse_positive_int("--burners", args.burners)
        out, like = Path(args.out), Path(args.like) if args.like else None
        if like is not None:
            read_run(like)
        runs = out / "runs"
        if runs.exists() and any(runs.iterdir()):
            raise SettingsError(f"--out {out}: {runs} is not empty; give a new folder")
        runs.mkdir(parents=True, exist_ok=True)
        rows, walls = [], []
        for index in range(repeats):
            quiet_1, wall_1 = _run(runs, f"{index:02d}-quiet-1", like, args.checks)
            busy, wall_b = _busy_run(runs, f"{index:02d}-busy", like, args.checks, burners)
            quiet_2, wall_2 = _run(runs, f"{index:02d}-quiet-2", like, args.checks)
            walls += [(quiet_1.name, wall_1), (busy.name, wall_b), (quiet_2.name, wall_2)]
            rows += [_judge(out, quiet_1, quiet_2, "pass"), _judge(out, quiet_1, busy, "fail"),
                     _judge(out, busy, quiet_2, "faster: pass")]  # fmt: skip
    except (SettingsError, RunDirError, CompareError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = pd.DataFrame(rows)
    write_csv_atomic(out / "verdicts.csv", table)
    write_csv_atomic(out / "walls.csv", pd.DataFrame(walls, columns=["run", "wall_s"]))
    print(table[["base", "new", "expected", "failed", "run_level_ratio", "run_level_ci95_low",
                 "run_level_ci95_high", "run_level_verdict"]].to_string(index=False))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
