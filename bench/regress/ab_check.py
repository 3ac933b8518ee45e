"""`python -m bench.regress.ab_check`: CI's timing gate. Is this checkout slower than the code that made the committed
baseline, when both are measured side by side on this machine?

    python -m bench.regress.ab_check --baseline results/baseline --out DIR [--pairs 5] [--threshold 5%] [--cell-threshold 20%]

Why not compare against the baseline's committed numbers: those were measured on another machine, and no
single yardstick carries timings across machines. CI's machine once ran the tiny cells 1.2x (jax) to 1.6x
(torch) faster than the machine that made the baseline, while its reference conv sped up 1.6x (torch),
1.3x (tensorflow) and 2.0x (jax, whose XLA:CPU conv is bimodal from run to run); normalising by the median
yardstick turned jax's smaller gain into a 1.33x "regression". So the committed baseline fixes *what* to
measure (its cells and settings, `bench run --like`) and *which code* is the reference (the git commit in
its run.json); this tool measures that code and this checkout alternately on the machine it runs on, in
`--pairs` pairs of whole runs ordered A B, B A, A B, ... (base-1 new-1 new-2 base-2 base-3 new-3 ...), so a
machine that drifts one way during the check favours neither side.

Judged on the pairs (bench/regress/paired.py): per pair and cell the ratio of medians new/base; over the
pairs their geometric mean, a Student-t interval and a one-sided p-value. It fails when the checkout is
slower overall (the per-pair geometric mean over all cells) by more than `--threshold` with p < GATE_ALPHA,
or one cell by more than `--cell-threshold` with p < GATE_ALPHA / cells (Bonferroni). Pair 1 runs the
equivalence and gradient checks and the calibration on both sides; later pairs pass `--timing-only` (when
both codes have it), which halves a run. Why pairs and a test over them: the design
before this one judged each pair by its runs' own samples (which know nothing of run-to-run noise) and failed
when a cell was flagged in two pairs; on CI's busy machine it failed tensorflow's forward cell as >20% slower
in both, on code that measured 0.90x the base on an idle machine.

HGBENCH_TEST_SLOWDOWN (the runner's test switch) reaches the new runs only: it stands for slower code
under test, which is how the gate's detection rate is measured. Writes OUT/runs/{base,new}-{1..pairs} and
OUT/verdict.json. Exit codes: 0 pass, 1 fail, 2 bad input (HGBENCH_CI_THRESHOLD, which overrides the
default threshold, included) or the baseline's code could not be run (or a base run did not complete),
75 the disk filled up.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.files import DISK_FULL_EXIT_CODE, OutputPathError, check_output_dir, is_disk_full, write_json_atomic
from bench.core.paths import REPO_ROOT
from bench.core.rundir import RunDirError, read_record
from bench.engine.protocol import SLOWDOWN_ENV, injected_slowdown
from bench.regress.compare import CompareError, Comparison, compare_runs, parse_threshold, print_comparison
from bench.regress.paired import ALL_CELLS, MIN_PAIRS, PairedStats, all_cells_ratios, paired_stats

DEFAULT_THRESHOLD = "5%"  # all cells together (geometric mean); README "How far to trust the gate"
DEFAULT_CELL_THRESHOLD = "20%"  # any one cell
DEFAULT_PAIRS = 8  # about 13 minutes on this 2-core machine: pair 1 2 x 80 s with the checks, later ones 2 x 42 s
# One-sided, per test: "slower" needs the two-sided 95% interval wholly above 1, as `bench compare` does.
# The first same-code gate measured with 0.05 failed at p = 0.031 (reports/ab-check/).
GATE_ALPHA = 0.025
THRESHOLD_ENV = "HGBENCH_CI_THRESHOLD"  # overrides DEFAULT_THRESHOLD when --threshold is not given
CODE_PATHS = ("bench", "impls")  # the packages a run imports; everything else is data


class ABCheckError(RuntimeError):
    """The check cannot be made; the message says what was found, what was expected and the fix."""


class BaseCodeMissing(ABCheckError):
    """The baseline's commit cannot be had from this repository (no git, no history, a foreign commit)."""


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        # safe.directory: CI may run as another user than the one who cloned; git then refuses to read the repo.
        command = ["git", "-c", "safe.directory=*", "-C", str(repo), *args]
        return subprocess.run(command, capture_output=True, check=False, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BaseCodeMissing(f"git {' '.join(args)} in {repo} could not run ({err}); install git") from err


def baseline_commit(baseline: Path) -> str:
    """The commit recorded in the baseline's run.json; it must be a clean checkout, or its code is unknown."""
    try:
        record = json.loads((baseline / "run.json").read_text())
    except (OSError, ValueError) as err:
        raise ABCheckError(f"--baseline {baseline}: no readable run.json ({err}); give a run directory") from err
    git = (record.get("environment") or {}).get("git") or {}
    commit, dirty = git.get("commit"), git.get("dirty")
    if not commit:
        raise ABCheckError(f"--baseline {baseline}: run.json records no git commit, so the code that made it "
                           "is unknown; make the baseline from a git checkout (README, 'The CI regression check': Refresh the baseline)")  # fmt: skip
    if dirty is not False:
        raise ABCheckError(f"--baseline {baseline}: it was made from a checkout with uncommitted changes "
                           f"(commit {commit[:12]}, dirty={dirty}), so no commit holds its code; remake it from a "
                           "clean checkout")  # fmt: skip
    return str(commit)


def extract_code(repo: Path, commit: str, dest: Path) -> None:
    """Write the baseline commit's bench/ and impls/ into dest (a folder outside any git checkout).

    A shallow clone may lack the commit: then one `git fetch --unshallow` is tried before giving up."""
    if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        shallow = _git(repo, "rev-parse", "--is-shallow-repository").stdout.decode().strip() == "true"
        if shallow:
            _git(repo, "fetch", "--quiet", "--unshallow")
        if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
            raise BaseCodeMissing(f"the baseline's commit {commit[:12]} is not in the git repository at {repo}"
                               f"{' (a shallow clone; fetching its history failed)' if shallow else ''}; "
                               "clone with full history, or refresh the baseline from a commit on this branch")  # fmt: skip
    archive = _git(repo, "archive", "--format=tar", commit, *CODE_PATHS)
    if archive.returncode != 0:
        raise BaseCodeMissing(f"git archive {commit[:12]} {' '.join(CODE_PATHS)} failed: "
                           f"{archive.stderr.decode(errors='replace').strip()}")  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")


def supports_timing_only(code_root: Path) -> bool:
    """Whether the code in code_root has `bench run --timing-only` (baselines made before it do not)."""
    cli = code_root / "bench" / "cli.py"
    return cli.is_file() and '"--timing-only"' in cli.read_text(errors="replace")


def _run(code_root: Path, baseline: Path, runs: Path, run_id: str, slowdown: bool, timing_only: bool = False) -> int:
    """`bench run --like baseline` with the code in code_root (its own folder first on the import path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code_root), env.get("PYTHONPATH", "")) if p)
    if not slowdown:
        env.pop(SLOWDOWN_ENV, None)
    # The installed checkout (an editable install) must not shadow code_root: ask the interpreter itself.
    probe = [sys.executable, "-c", "import bench, impls; print(bench.__file__); print(impls.__file__)"]
    found = subprocess.run(probe, cwd=code_root, env=env, capture_output=True, text=True, check=False).stdout.split()
    if len(found) != 2 or not all(Path(f).resolve().is_relative_to(code_root.resolve()) for f in found):
        raise ABCheckError(f"with {code_root} first on the import path, Python imports bench and impls from "
                           f"{found or 'nowhere'}; check PYTHONPATH and .pth files for an entry that shadows it")  # fmt: skip
    command = [sys.executable, "-m", "bench", "run", "--like", str(baseline.resolve()), "--out", str(runs.resolve()),
               "--run-id", run_id, "--no-report", *(["--timing-only"] if timing_only else [])]  # fmt: skip
    print(f"+ ({code_root}) python {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, cwd=code_root, env=env, check=False).returncode


def _pair(order: tuple[str, str], number: int, base_code: Path, baseline: Path, runs: Path,
          timing_only: bool = False) -> tuple[Path, Path]:  # fmt: skip
    """Measure base-N and new-N in the given order; a base run that cannot finish is an error (exit 2)."""
    dirs = {}
    for side in order:
        run_id = f"{side}-{number}"
        code = _run(base_code if side == "base" else REPO_ROOT, baseline, runs, run_id, slowdown=side == "new",
                    timing_only=timing_only)  # fmt: skip
        if not (runs / run_id / "summary.csv").is_file():
            raise ABCheckError(f"{side} run {runs / run_id} wrote no summary.csv (exit {code}); see its output "
                               "above. A base run that fails here means the baseline's code cannot run with these "
                               "packages or on this machine: refresh it (README, 'The CI regression check': Refresh the baseline)")  # fmt: skip
        if side == "base" and _run_status(runs / run_id) != "complete":
            raise ABCheckError(f"base run {runs / run_id} did not complete (run.json status "
                               f"{_run_status(runs / run_id)}, exit {code}); see its output above")  # fmt: skip
        dirs[side] = runs / run_id
    return dirs["base"], dirs["new"]


def _run_status(run_dir: Path) -> str:
    """run.json's status of a run the gate made, or why it cannot be read."""
    try:
        return str(read_record(run_dir).get("status") or "complete")
    except RunDirError as err:
        return f"unreadable ({err})"


def _incomplete(comparison: Comparison, label: str) -> list[str]:
    """Failure reasons for a new run that cannot vouch for every cell (not-ok cells are reported apart)."""
    reasons = [f"{label}: new run is {comparison.new_status}, not complete"] if comparison.new_status != "complete" else []
    return reasons + [f"{label}: new run: cell missing: {cell}" for cell in comparison.missing_in_new]


def _cells_not_ok(run_dir: Path) -> list[str]:
    """Model cells of a run that are not ok (a crash, OOM or timeout cannot pass the gate: nothing was timed)."""
    summary = pd.read_csv(run_dir / "summary.csv")
    bad = summary[(summary["kind"] == "model") & (summary["status"] != "ok")]
    return [f"{row.cell_id} ({row.status})" for row in bad.itertuples()]


def _summary(comparison: Comparison) -> dict[str, Any]:
    d = comparison.to_dict()
    keys = ("base_run", "new_run", "normalized", "machine_ratio", "calibration_ratios", "regressions",
            "invariant_mismatches", "exit_code")  # fmt: skip
    ratios = {c.cell_id: c.ratio for c in comparison.cells if c.status == "compared"}
    return {**{k: d[k] for k in keys}, "ratios": ratios}


def pair_order(number: int) -> tuple[str, str]:
    """A B, B A, A B, ...: pair 1 measures the base first, pair 2 the checkout first, and so on."""
    return ("base", "new") if number % 2 == 1 else ("new", "base")


@dataclass(frozen=True)
class GateLimits:
    """What the gate judges: the thresholds (fractions), the number of pairs and the significance level."""

    threshold: float  # all cells together
    cell_threshold: float  # any one cell
    pairs: int = DEFAULT_PAIRS
    alpha: float = GATE_ALPHA


def judge_pairs(per_cell: dict[str, list[float]], limits: GateLimits) -> list[PairedStats]:
    """Every cell's paired statistic (at the cell threshold), then all cells' (at the overall threshold).

    Each cell is tested at alpha / cells (Bonferroni): six cells each tested at alpha would give identical
    code about six chances to fail instead of one."""
    cell_alpha = limits.alpha / max(len(per_cell), 1)
    judged = [paired_stats(cell, ratios, limits.cell_threshold, cell_alpha) for cell, ratios in per_cell.items()]
    if per_cell:
        judged.append(paired_stats(ALL_CELLS, all_cells_ratios(per_cell), limits.threshold, limits.alpha))
    return judged


def print_paired(judged: list[PairedStats], commit: str) -> None:
    """The gate's table: one row per cell and one for all cells."""
    alphas = ", ".join(sorted({f"{j.alpha:.2g}" for j in judged}))
    print(f"\npaired verdict over the pairs (new = this checkout, base = commit {commit[:12]}; "
          f"slower = ratio beyond its threshold and one-sided p below its alpha: {alphas})")  # fmt: skip
    width = max([len(j.name) for j in judged] + [4])
    print(f"{'cell':<{width}}  pairs  new/base  95% CI         p(slower)  threshold  sd(log)  verdict   per-pair new/base")
    for j in judged:
        ci = "" if math.isnan(j.ci95_low) else f"{j.ci95_low:.3f}-{j.ci95_high:.3f}"
        p = "" if math.isnan(j.p_slower) else f"{j.p_slower:.2g}"
        sd = "" if math.isnan(j.log_ratio_sd) else f"{j.log_ratio_sd:.3f}"
        per_pair = " ".join(f"{r:.3f}" for r in j.ratios)
        print(f"{j.name:<{width}}  {j.n_pairs:>5}  {j.ratio:>8.3f}  {ci:<13}  {p:>9}  {j.threshold:>9.0%}  {sd:>7}  "
              f"{j.verdict:<8}  {per_pair}")  # fmt: skip


def _ab_pairs(commit: str, base_code: Path, baseline: Path, runs: Path, limits: GateLimits,
              verdict: dict[str, Any]) -> tuple[Path, list[str]]:  # fmt: skip
    """Measure the pairs and judge them; returns (new-1, the failure reasons).

    A pair whose new run has a failed, missing or incomplete cell, or changed invariants, ends the gate:
    that is a failure whatever the timings say, and CI time is better spent reporting it."""
    reasons: list[str] = []
    per_cell: dict[str, list[float]] = {}
    new_1 = runs / "new-1"
    # Pair 1 runs the checks (equivalence, gradients, calibration) on both sides; later pairs time the cells
    # alone, which halves a run (about 37 of 75 s here are checks) and so doubles the pairs in the same time.
    timing_only = supports_timing_only(base_code) and supports_timing_only(REPO_ROOT)
    verdict["later_pairs_timing_only"] = timing_only
    for number in range(1, limits.pairs + 1):
        order = pair_order(number)
        base_dir, new_dir = _pair(order, number, base_code, baseline, runs, timing_only=timing_only and number > 1)
        comparison = compare_runs(base_dir, new_dir, threshold=limits.cell_threshold)
        print(f"\npair {number} of {limits.pairs} ({order[0]} first): base = commit {commit[:12]}, new = this checkout "
              "(one pair's verdicts are for information: the gate judges all pairs together, after the last)",
              flush=True)  # fmt: skip
        print_comparison(comparison)
        verdict["pairs"].append(_summary(comparison))
        reasons += [f"pair {number}: invariant mismatch: {m}" for m in comparison.invariant_mismatches]
        reasons += _incomplete(comparison, f"pair {number}")
        for side, run_dir in (("base", base_dir), ("new", new_dir)):
            reasons += [f"pair {number}: {side} run: cell not ok: {m}" for m in _cells_not_ok(run_dir)]
        if reasons:
            break
        for cell in comparison.cells:
            if cell.status == "compared":
                per_cell.setdefault(cell.cell_id, []).append(cell.ratio)
    if reasons:
        return new_1, reasons
    judged = judge_pairs(per_cell, limits)
    print_paired(judged, commit)
    verdict["paired"] = [j.to_dict() for j in judged]
    slower = [j for j in judged if j.verdict == "slower"]
    verdict["slower"] = [j.name for j in slower]
    too_few = [j.name for j in judged if j.verdict == "too_few_pairs"]
    if too_few:
        reasons.append(f"fewer than {MIN_PAIRS} pairs for {', '.join(too_few)}: nothing was judged; run with --pairs {MIN_PAIRS} or more")
    reasons += [f"{j.name}: {j.ratio:.3f}x the base over {j.n_pairs} pairs (95% CI {j.ci95_low:.3f}-{j.ci95_high:.3f}, "
                f"p = {j.p_slower:.2g} < {j.alpha:.2g}): slower by more than {j.threshold:.0%}" for j in slower]  # fmt: skip
    return new_1, reasons


def check(
    baseline: Path, out: Path, limits: GateLimits, repo: Path = REPO_ROOT, if_base_code_missing: str = "fail"
) -> tuple[int, dict[str, Any]]:
    """Run the gate; returns (exit code 0|1, the verdict record). Raises ABCheckError when it cannot.

    if_base_code_missing="warn": when the baseline's commit cannot be had (BaseCodeMissing), measure this
    checkout once and gate only what needs no timing (failed cells, invariants against the committed numbers),
    with a loud warning that timing was not gated; verdict.json then says timing_gated: false."""
    commit = baseline_commit(baseline)
    runs = check_output_dir(out / "runs", "--out")
    runs.mkdir(parents=True, exist_ok=True)
    taken = sorted(p.name for p in runs.iterdir())
    if taken:
        raise ABCheckError(f"--out {out}: {runs} already holds {', '.join(taken)}; give an empty or new folder")
    verdict: dict[str, Any] = {"baseline": str(baseline), "base_commit": commit, "threshold": limits.threshold,
                               "cell_threshold": limits.cell_threshold, "pairs_planned": limits.pairs,
                               "alpha": limits.alpha, "timing_gated": True, "pairs": [], "paired": [],
                               "slower": []}  # fmt: skip
    reasons: list[str] = []
    base_code = Path(tempfile.mkdtemp(prefix="hgbench-base-code-"))  # outside the checkout: git sees no repo there
    try:
        try:
            extract_code(repo, commit, base_code)
        except BaseCodeMissing as err:
            if if_base_code_missing != "warn":
                raise
            print(f"WARNING: timing is NOT gated: {err}", file=sys.stderr, flush=True)
            verdict["timing_gated"], verdict["timing_not_gated_because"] = False, str(err)
            code = _run(REPO_ROOT, baseline, runs, "new-1", slowdown=True)
            if not (runs / "new-1" / "summary.csv").is_file():
                raise ABCheckError(
                    f"the run {runs / 'new-1'} wrote no summary.csv (exit {code}); see its output"
                ) from err
            new_1 = runs / "new-1"
            reasons += [f"new run: cell not ok: {m}" for m in _cells_not_ok(new_1)]
        else:
            print(f"base code: commit {commit[:12]} ({', '.join(CODE_PATHS)}) in {base_code}", flush=True)
            new_1, pair_reasons = _ab_pairs(commit, base_code, baseline, runs, limits, verdict)
            reasons += pair_reasons

        # For information: this machine against the machine that made the baseline (numbers, not code).
        # Only its invariants gate: parameters and FLOPs cannot depend on the machine.
        print("\nfor information: new-1 against the committed numbers (another machine; normalised, does not gate)")
        committed = compare_runs(baseline, new_1, threshold=limits.cell_threshold, normalize=True)
        print_comparison(committed)
        verdict["against_committed"] = _summary(committed)
        reasons += [f"against the committed baseline: invariant mismatch: {m}" for m in committed.invariant_mismatches]
        if not verdict["timing_gated"]:  # the pairs did not check the new run's completeness
            reasons += _incomplete(committed, "against the committed baseline")
    finally:
        shutil.rmtree(base_code, ignore_errors=True)
    verdict["failures"] = reasons
    verdict["exit_code"] = 1 if reasons else 0
    write_json_atomic(out / "verdict.json", verdict)
    print()
    for reason in reasons:
        print(f"FAIL {reason}")
    if not reasons and verdict["timing_gated"]:
        print(f"PASS: over {limits.pairs} pairs, not significantly slower than commit {commit[:12]} by more than "
              f"{limits.threshold:.0%} overall or {limits.cell_threshold:.0%} in any cell")  # fmt: skip
    elif not reasons:
        print("PASS (invariants and cell status only; timing NOT gated, see the warning above)")
    return verdict["exit_code"], verdict


def _check_slowdown_switch() -> None:
    """A malformed test switch would fail every new run: say so before measuring anything."""
    try:
        injected_slowdown(os.environ)
    except ValueError as err:
        raise ABCheckError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.regress.ab_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="results/baseline",
                        help="committed baseline run: its cells and its git commit (default results/baseline)")  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for the runs and verdict.json (new or empty)")
    parser.add_argument("--threshold",
                        help=f"smallest overall slowdown (geometric mean over cells) that fails (default ${THRESHOLD_ENV} "
                             f"when set, else {DEFAULT_THRESHOLD})".replace("%", "%%"))  # fmt: skip
    parser.add_argument("--cell-threshold", default=DEFAULT_CELL_THRESHOLD,
                        help="smallest slowdown of any one cell that fails (default %(default)s)")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                        help=f"pairs of runs, base and new, ordered A B, B A, ... (default %(default)s; at least {MIN_PAIRS})")  # fmt: skip
    parser.add_argument("--if-base-code-missing", choices=("fail", "warn"), default="fail",
                        help="the baseline's commit is not in this repository: exit 2 (default), or warn, "
                             "measure this checkout once and gate only failed cells and invariants")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.threshold is not None:
            threshold = parse_threshold(args.threshold)
        elif os.environ.get(THRESHOLD_ENV, "").strip():
            threshold = parse_threshold(os.environ[THRESHOLD_ENV], THRESHOLD_ENV)
        else:
            threshold = parse_threshold(DEFAULT_THRESHOLD)
        if args.pairs < MIN_PAIRS:
            raise ABCheckError(f"--pairs {args.pairs}: a paired verdict needs at least {MIN_PAIRS} pairs; give "
                               f"--pairs {MIN_PAIRS} or more (default {DEFAULT_PAIRS})")  # fmt: skip
        limits = GateLimits(threshold, parse_threshold(args.cell_threshold, "--cell-threshold"), args.pairs)
        _check_slowdown_switch()
        check_output_dir(args.out, "--out")
        code, _ = check(Path(args.baseline), Path(args.out), limits, if_base_code_missing=args.if_base_code_missing)
    except (ABCheckError, CompareError, OutputPathError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(f"error: the disk is full ({err.strerror}); free some space and run the gate again", file=sys.stderr)
        return DISK_FULL_EXIT_CODE
    return code


if __name__ == "__main__":
    raise SystemExit(main())
