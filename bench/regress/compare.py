"""`python -m bench compare BASE_RUN NEW_RUN`: is the new run significantly slower than the base, cell by cell?

Cells are matched by `cell_id`. For each matched cell that is `ok` on both sides the per-iteration samples
give the ratio of medians new/base, a bootstrap 95% confidence interval of that ratio (each side resampled
independently, fixed seed) and a two-sided Mann-Whitney U p-value.

Verdict rule (asv's "no regression claimed when confidence intervals overlap", plus a size threshold):
a cell is `slower` only when all three hold
  1. the CI of the ratio lies wholly above 1 (the slowdown is statistically real),
  2. the Mann-Whitney p-value is below ALPHA (a rank test agrees, robust to the odd outlier),
  3. the ratio itself exceeds 1 + threshold (the slowdown is big enough to matter).
Significance alone is not enough: on a shared machine two runs of the same code differ by a few percent
(the machine's state drifts between runs, which no within-run resampling can see), and with 30 samples
per side such a drift is already "significant". Demanding the whole CI lie above 1 + threshold instead
would miss slowdowns a little above the threshold about half the time. `faster` mirrors the rule with
1 / (1 + threshold). Exit code 1 when any model cell is `slower` or an invariant differs; 2 for bad input.

Rounds: when both runs measured the cell in several rounds (worker processes; `bench run --rounds`), the
interval is Welch's t on the log round medians of each side (bench.core.stats.ratio_of_medians): the
process is the unit, so the interval already carries the process-to-process drift that the rank test
cannot see. The verdict is then rule 3 and Welch's p below FAMILY_ALPHA / k, k the cells compared with
rounds (Bonferroni: compare makes one decision over all its cells; at 0.05 per cell, consecutive
same-code three-round runs were flagged in 3 of 19 pairs, reports/coverage-2026-11-30/).

One round on a side (the CPU default of `bench run`): the cell's interval knows one process per side, and
on a shared 2-core machine a cell's median moves by tens of percent from one process to the next
(consecutive same-code one-round runs: cell ratios 0.56-2.2, 14 of 19 pairs flagged cell by cell). Such a
cell's verdict is shown but does not decide. What decides is the run level: the cells are independent
processes, so the geometric mean of their ratios, with a t interval over the cells (the spread between
cells is the process noise), is judged by rule 1 and rule 3: `slower` when the geometric mean exceeds
1 + threshold and its interval lies wholly above 1. That needs MIN_RUN_LEVEL_CELLS one-round cells; with
fewer, their cell verdicts decide as above, labelled within-process (nothing better is known).

A comparison is only as good as the new run is whole: a model cell that is ok in the base but failed,
missing or not ok in the new run, or a new run whose run.json is not "complete" (interrupted, or still
running), also exits 1, and says which: nothing shows such a cell is not slower. `--allow-partial` turns
these into warnings, for a deliberate comparison of part of a run.

`--normalize` divides every sample of the new run by the machine ratio: the median over frameworks of
new/base calibration time, each framework timing the fixed reference conv (64x64, 64 -> 64, batch 1; the
same workload whatever the config; runs that lack it use the model's dominant 3x3 conv). A rough guide for
runs from two machines: frameworks do not speed up alike from one CPU to another, so CI does not gate on it
(bench/regress/ab_check.py measures the reference code beside the new code instead). A median over
frameworks, not each framework's own ratio: one framework's yardstick can be bimodal from run to run (XLA:CPU's conv took 2.2-2.5 ms in some runs of identical code
and 3.3-4.0 ms in others), and dividing by it would invent a 1.7x change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats as sps

from bench.core import nodes
from bench.core.files import atomic_write, check_output_file
from bench.core.numbers import num
from bench.core.rundir import RunData, read_run
from bench.core.stats import CI_ROUNDS, CI_WITHIN, RatioStats, ratio_of_medians

ALPHA = 0.01  # Mann-Whitney significance level; strict, because CI runs are many and false alarms are costly
FAMILY_ALPHA = 0.05  # cells with rounds: Welch's p must be below FAMILY_ALPHA / (cells with rounds)
MIN_RUN_LEVEL_CELLS = 3  # one-round cells needed for the run-level judgement (a t interval over 2 is useless)
DEFAULT_THRESHOLD = 0.10
# Equivalence errors are deterministic on one machine (bit-identical between runs of the same code) but
# differ at the ~1e-7 level across BLAS builds; 1e-5 absolute is 100x below the run's own 1e-3 tolerance.
EQUIVALENCE_ERR_ATOL = 1e-5
METRICS = ("latency_ms", "first_call_ms")



class CompareError(ValueError):
    """Bad input to `bench compare`; the message names the path or value, what was expected and the fix."""


@dataclass
class CellComparison:
    """One cell's comparison; `status` says whether it could be compared and why not."""

    cell_id: str
    kind: str
    status: str  # compared | base_only | new_only | not_ok | no_calibration
    base_value: float = math.nan  # median of the metric (ms; the new side divided by the machine ratio when normalised)
    new_value: float = math.nan
    ratio: float = math.nan
    ci95_low: float = math.nan
    ci95_high: float = math.nan
    p_value: float = math.nan
    n_base: int = 0
    n_new: int = 0
    rounds_base: int = 0
    rounds_new: int = 0
    ci_level: str = ""  # rounds | within-process (one round on a side: the interval misses the process level)
    verdict: str = ""  # slower | faster | unchanged, empty when not compared
    note: str = ""
    decides: bool = True  # False: a one-round cell whose verdict the run-level judgement replaces


@dataclass
class RunLevel:
    """The judgement of the one-round cells together: geometric mean of their ratios new/base with a t
    interval over the cells (each cell is its own worker process, so their spread is the process noise)."""

    cells: int = 0  # one-round model cells compared
    ratio: float = math.nan  # geometric mean of their ratios
    ci95_low: float = math.nan
    ci95_high: float = math.nan
    verdict: str = ""  # slower | faster | unchanged; "too_few_cells" below MIN_RUN_LEVEL_CELLS; empty when none


@dataclass
class Comparison:
    """Everything `bench compare` found, ready for the table, JSON and CSV."""

    base_run: str
    new_run: str
    metric: str
    threshold: float
    alpha: float
    normalized: bool
    cells: list[CellComparison] = field(default_factory=list)
    invariant_mismatches: list[str] = field(default_factory=list)
    calibration_ratios: dict[str, float] = field(default_factory=dict)  # framework -> new/base yardstick median
    machine_ratio: float = math.nan  # median of calibration_ratios: how much slower the new run's machine was
    warnings: list[str] = field(default_factory=list)  # each run's own warnings (a busy machine above all)
    base_status: str = "complete"  # each run.json's status: running, complete or interrupted
    new_status: str = "complete"
    missing_in_new: list[str] = field(default_factory=list)  # model cells ok in the base, absent from the new run
    not_ok_in_new: list[str] = field(default_factory=list)  # model cells ok in the base, not ok in the new run
    allow_partial: bool = False  # --allow-partial: an incomplete new run is a warning, not a failure
    # How the node types differ between base and new (cpu_model, cores, Python, framework versions) -> the
    # cells measured across that difference; printed as warnings (different GPUs are invariant mismatches)
    node_differences: dict[str, list[str]] = field(default_factory=dict)
    run_level: RunLevel = field(default_factory=RunLevel)  # the one-round cells judged together

    @property
    def regressions(self) -> list[CellComparison]:
        """Model cells whose own verdict decides and says significantly slower by more than the threshold."""
        return [c for c in self.cells if c.verdict == "slower" and c.kind == "model" and c.decides]

    @property
    def incomplete(self) -> list[str]:
        """Why the new run cannot vouch for every cell the base measured (empty when it can)."""
        reasons = []
        if self.new_status != "complete":
            reasons.append(f"the new run is {self.new_status} (run.json status), not complete")
        reasons += [f"{cell}: ok in the base, missing from the new run" for cell in self.missing_in_new]
        reasons += [f"{cell}: ok in the base, {why} in the new run" for cell, why in map(_split_note, self.not_ok_in_new)]
        return reasons

    @property
    def exit_code(self) -> int:
        """1 on a regression (a deciding cell, or the one-round cells together), an invariant mismatch or
        (without allow_partial) an incomplete new run, else 0."""
        partial = bool(self.incomplete) and not self.allow_partial
        run_slower = self.run_level.verdict == "slower"
        return 1 if self.regressions or run_slower or self.invariant_mismatches or partial else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (NaN becomes null)."""
        d = asdict(self)
        d["regressions"] = [c.cell_id for c in self.regressions]
        d["incomplete"] = self.incomplete
        d["exit_code"] = self.exit_code
        return _nan_to_none(d)


def _split_note(entry: str) -> tuple[str, str]:
    """'cell_id: why' -> (cell_id, why)."""
    cell, _, why = entry.partition(": ")
    return cell, why


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


# ---------------------------------------------------------------- statistics


def verdict(stats: RatioStats, threshold: float, alpha: float = ALPHA) -> str:
    """slower / faster / unchanged under the rule in this module's docstring.

    With several rounds on both sides the interval already carries the process-to-process noise, so the
    interval beyond 1 and the ratio beyond the threshold decide. With one round on a side the interval knows
    only one process, and the rank test must agree as well (the rule of one-process runs).
    """
    significant = stats.ci_level == CI_ROUNDS or stats.p_value < alpha
    if significant and stats.ci95_low > 1.0 and stats.ratio > 1.0 + threshold:
        return "slower"
    if significant and stats.ci95_high < 1.0 and stats.ratio < 1.0 / (1.0 + threshold):
        return "faster"
    return "unchanged"


def judge_rounds_cells(cells: list[CellComparison], threshold: float, family_alpha: float = FAMILY_ALPHA) -> None:
    """Set the verdict of every compared cell with rounds on both sides: its ratio beyond the threshold and
    Welch's p below family_alpha / k, k the number of such cells (their 95% interval then lies beyond 1 too)."""
    judged = [c for c in cells if c.status == "compared" and c.ci_level == CI_ROUNDS]
    for c in judged:
        significant = c.p_value < family_alpha / len(judged)
        c.verdict = ("slower" if significant and c.ratio > 1.0 + threshold else
                     "faster" if significant and c.ratio < 1.0 / (1.0 + threshold) else "unchanged")  # fmt: skip


def judge_run_level(cells: list[CellComparison], threshold: float) -> RunLevel:
    """The one-round cells judged together (see the module docstring). With MIN_RUN_LEVEL_CELLS or more the
    run level decides and their own verdicts stop deciding (`decides` False); with fewer, their verdicts
    decide and the run level says "too_few_cells"."""
    single = [c for c in cells if c.status == "compared" and c.ci_level == CI_WITHIN and c.ratio > 0]
    if not single:
        return RunLevel()
    if len(single) < MIN_RUN_LEVEL_CELLS:
        return RunLevel(cells=len(single), verdict="too_few_cells")
    logs = np.log([c.ratio for c in single])
    mean, se = float(logs.mean()), float(logs.std(ddof=1) / math.sqrt(logs.size))
    t = float(sps.t.ppf(0.975, logs.size - 1))
    level = RunLevel(len(single), math.exp(mean), math.exp(mean - t * se), math.exp(mean + t * se))
    level.verdict = ("slower" if level.ci95_low > 1.0 and level.ratio > 1.0 + threshold else
                     "faster" if level.ci95_high < 1.0 and level.ratio < 1.0 / (1.0 + threshold) else "unchanged")  # fmt: skip
    for c in single:
        c.decides = False
    return level


def parse_threshold(text: str, source: str = "--threshold") -> float:
    """'10%' or '0.1' -> 0.1; must be >= 0 and below 10 (1000%). `source` names where the text came from."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value < 10:
        raise CompareError(f"{source} must be a fraction or a percentage such as 0.1 or 10%, got {text!r}")
    return value


# ---------------------------------------------------------------- loading and validating runs


def _check_same_config(base: RunData, new: RunData) -> None:
    """Runs of different models or devices are not comparable: CompareError naming the first difference."""
    base_cfg, new_cfg = base.record["settings"]["config"], new.record["settings"]["config"]
    for key in sorted(set(base_cfg) | set(new_cfg)):
        if base_cfg.get(key) != new_cfg.get(key):
            raise CompareError(
                f"the runs measure different models: config {key} is {base_cfg.get(key)!r} in {str(base.path)!r} "
                f"but {new_cfg.get(key)!r} in {str(new.path)!r}; compare runs of the same preset and overrides"
            )
    base_dev, new_dev = base.record["settings"].get("device"), new.record["settings"].get("device")
    if base_dev != new_dev:
        raise CompareError(
            f"the runs are on different devices: {base_dev!r} in {str(base.path)!r} but {new_dev!r} in "
            f"{str(new.path)!r}; compare runs on the same kind of device"
        )
    if base_dev == "gpu":
        base_gpus, new_gpus = _gpu_names(base), _gpu_names(new)
        # On one machine each, different GPUs refuse the whole comparison. A run on a cluster may have used
        # several GPU models: refused only when the two share none; its cells are checked one by one
        # (_node_type_checks).
        cluster = "nodes" in base.record or "nodes" in new.record
        if base_gpus and new_gpus and (not set(base_gpus) & set(new_gpus) if cluster else base_gpus != new_gpus):
            raise CompareError(f"the runs are on different GPUs: {', '.join(base_gpus)} in {str(base.path)!r} but "
                               f"{', '.join(new_gpus)} in {str(new.path)!r}; compare runs on the same GPU model")  # fmt: skip


def _gpu_names(run: RunData) -> list[str]:
    """The GPU models NVML saw when the run started, on every node that took cells (run.json's environment, or
    its nodes for a run on a Ray cluster)."""
    return sorted({name for env in nodes.node_records(run.record).values() for name in nodes.gpu_names(env)})


def _node_type_checks(cell_id: str, base: RunData, new: RunData, b: Mapping[str, Any], n: Mapping[str, Any],
                      result: Comparison) -> None:  # fmt: skip
    """A cell measured on nodes of different types in the two runs: on different GPU models an invariant
    mismatch (as two runs on different GPUs are refused); otherwise (CPU model or cores, Python, framework
    versions) a warning, as comparisons across two machines' CPUs always were (see --normalize)."""
    base_env, new_env = nodes.row_environment(b, base.record), nodes.row_environment(n, new.record)
    if base_env is None or new_env is None:  # a run folder without environment records: nothing to tell
        return
    if str(b.get("device")) == "gpu" and str(n.get("device")) == "gpu":
        base_gpus, new_gpus = nodes.gpu_names(base_env), nodes.gpu_names(new_env)
        if base_gpus and new_gpus and base_gpus != new_gpus:
            result.invariant_mismatches.append(
                f"{cell_id}: ran on {', '.join(base_gpus)} (base, host {b.get('host') or base_env.get('host')}) but on "
                f"{', '.join(new_gpus)} (new, host {n.get('host') or new_env.get('host')}); compare cells measured on "
                "the same GPU model")  # fmt: skip
            return
    differences = nodes.differences(base_env, new_env)
    if differences:
        result.node_differences.setdefault("; ".join(differences), []).append(cell_id)


# ---------------------------------------------------------------- invariants


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _params(run: RunData, row: Mapping[str, Any]) -> float:
    """The row's `num_params` when the run recorded one, else the analytic count of the run's config."""
    if "num_params" in row and not math.isnan(num(row["num_params"])):
        return num(row["num_params"])
    from impls import HourglassConfig, count_params  # impls imports no framework

    config = dict(run.record["settings"]["config"])
    config["input_hw"] = tuple(config["input_hw"])
    return float(count_params(HourglassConfig(**config)))


def _invariant_mismatches(
    cell_id: str, base: RunData, new: RunData, b: Mapping[str, Any], n: Mapping[str, Any]
) -> list[str]:
    """Quantities that need no timing and must agree: where the cell ran, parameters, FLOPs, equivalence."""
    problems = []
    base_math, new_math = str(b.get("fp32_math") or "ieee"), str(n.get("fp32_math") or "ieee")
    if base_math != new_math:
        problems.append(f"{cell_id}: fp32 math {base_math} (base) but {new_math} (new); compare runs made with "
                        "the same --fp32-math")  # fmt: skip
    base_device, new_device = str(b.get("device") or ""), str(n.get("device") or "")
    if base_device and new_device and base_device != new_device:  # a GPU run whose framework fell back to the CPU
        problems.append(f"{cell_id}: ran on {base_device} (base) but on {new_device} (new); a framework that cannot "
                        "see the GPU falls back to the CPU (see run.json device_fallback)")  # fmt: skip
    if not _same(_params(base, b), _params(new, n)):
        problems.append(f"{cell_id}: parameter count {_params(base, b):.0f} (base) != {_params(new, n):.0f} (new)")
    if not _same(num(b.get("gflop_per_step")), num(n.get("gflop_per_step"))):
        problems.append(
            f"{cell_id}: gflop_per_step {b.get('gflop_per_step')} (base) != {n.get('gflop_per_step')} (new)"
        )
    base_eq, new_eq = str(b.get("equivalent")).lower(), str(n.get("equivalent")).lower()
    if base_eq != new_eq:
        problems.append(f"{cell_id}: equivalent {b.get('equivalent')} (base) != {n.get('equivalent')} (new)")
    base_err, new_err = num(b.get("equivalence_max_rel_err")), num(n.get("equivalence_max_rel_err"))
    if math.isnan(base_err) != math.isnan(new_err) or abs(base_err - new_err) > EQUIVALENCE_ERR_ATOL:
        problems.append(
            f"{cell_id}: equivalence_max_rel_err {base_err:.3g} (base) vs {new_err:.3g} (new) differ by more "
            f"than {EQUIVALENCE_ERR_ATOL:g}"
        )
    return problems


# ---------------------------------------------------------------- calibration (--normalize)


def _calibration_median_ms(run: RunData, framework: str, precision: str, batch_size: Any) -> float:
    """Median ms of the run's calibration yardstick for this framework.

    The fixed reference conv (the same workload in every run, a few ms) when the run has one; otherwise,
    for runs made before it existed, the model's dominant conv3x3 at the same precision and batch size.
    """
    rows = run.summary[(run.summary["kind"] == "calibration") & (run.summary["status"] == "ok")]
    rows = rows[rows["framework"] == framework]
    reference = rows[(rows["phase"] == "reference_conv") & (rows["precision"] == precision)]
    conv = rows[rows["phase"] == "conv3x3"]
    exact = conv[(conv["precision"] == precision) & (conv["batch_size"].astype(str) == str(batch_size))]
    for candidates in (reference, exact, conv):
        for cell_id in candidates["cell_id"]:
            samples = run.samples_ms(cell_id)
            if samples.size:
                return float(np.median(samples))
    return math.nan


# ---------------------------------------------------------------- the comparison


def compare_runs(
    base_dir: str | Path,
    new_dir: str | Path,
    metric: str = "latency_ms",
    threshold: float = DEFAULT_THRESHOLD,
    normalize: bool = False,
    alpha: float = ALPHA,
    allow_partial: bool = False,
) -> Comparison:
    """Load, validate and compare two runs; raises CompareError on bad input."""
    if metric not in METRICS:
        raise CompareError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if normalize and metric != "latency_ms":
        raise CompareError(f"--normalize applies to latency_ms only, got --metric {metric}; drop one of them")
    base, new = read_run(base_dir), read_run(new_dir)
    _check_same_config(base, new)
    result = Comparison(str(base.path), str(new.path), metric, threshold, alpha, normalize,
                        base_status=base.status, new_status=new.status, allow_partial=allow_partial)  # fmt: skip
    if base.status != "complete":
        result.warnings.append(f"base run: run.json status is {base.status}, not complete: cells it lacks are not compared")
    for side, run in (("base", base), ("new", new)):
        # A busy machine (the runner's warning) makes timings slow and bimodal: a verdict then says more
        # about the machine than the code, so the reader must see it next to the table.
        result.warnings += [f"{side} run: {text}" for text in run.record.get("warnings") or [] if isinstance(text, str)]

    for framework in sorted(set(base.summary["framework"]) & set(new.summary["framework"])):
        first = base.summary[(base.summary["kind"] == "calibration") & (base.summary["framework"] == framework)]
        if not first.empty:
            row = first.iloc[0]
            b_cal = _calibration_median_ms(base, framework, row["precision"], row["batch_size"])
            n_cal = _calibration_median_ms(new, framework, row["precision"], row["batch_size"])
            if not math.isnan(b_cal) and not math.isnan(n_cal):
                result.calibration_ratios[framework] = n_cal / b_cal
    if result.calibration_ratios:
        result.machine_ratio = float(np.median(list(result.calibration_ratios.values())))

    base_rows = {r["cell_id"]: r for r in base.summary.to_dict("records") if r["kind"] == "model"}
    new_rows = {r["cell_id"]: r for r in new.summary.to_dict("records") if r["kind"] == "model"}
    for cell_id in [*base_rows, *(c for c in new_rows if c not in base_rows)]:
        b, n = base_rows.get(cell_id), new_rows.get(cell_id)
        if b is None or n is None:
            result.cells.append(CellComparison(cell_id, "model", "new_only" if b is None else "base_only"))
            if b is not None and b["status"] == "ok":
                result.missing_in_new.append(cell_id)
            continue
        if b["status"] != "ok" or n["status"] != "ok":
            note = f"status {b['status']} (base), {n['status']} (new)"
            result.cells.append(CellComparison(cell_id, "model", "not_ok", note=note))
            if b["status"] == "ok":
                result.not_ok_in_new.append(f"{cell_id}: {n['status']} ({_last_line(n.get('error'))})")
            continue
        result.invariant_mismatches.extend(_invariant_mismatches(cell_id, base, new, b, n))
        _node_type_checks(cell_id, base, new, b, n, result)
        cell = _compare_cell(cell_id, base, new, b, n, metric, threshold, result.machine_ratio if normalize else None, alpha)
        if cell.status == "not_ok" and cell.n_base >= 2 and cell.n_new < 2:
            result.not_ok_in_new.append(f"{cell_id}: ok but with {cell.n_new} sample(s) in samples.csv")
        result.cells.append(cell)
    if metric == "latency_ms":
        judge_rounds_cells(result.cells, threshold)
        result.run_level = judge_run_level(result.cells, threshold)
    for difference, cells in result.node_differences.items():
        result.warnings.append(f"{len(cells)} cell(s) ran on different node types in the two runs ({difference}), "
                               f"e.g. {cells[0]}: a verdict on them measures the machines as much as the code")  # fmt: skip
    return result


def _last_line(text: Any) -> str:
    lines = [line for line in str(text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error recorded"


def _compare_cell(
    cell_id: str, base: RunData, new: RunData, b: Mapping[str, Any], n: Mapping[str, Any],
    metric: str, threshold: float, machine_ratio: float | None, alpha: float,
) -> CellComparison:  # fmt: skip
    """One cell's verdict; with `machine_ratio` (normalising) the new run's samples are divided by it first."""
    if metric == "first_call_ms":
        # One value per run: no spread to resample, so the verdict is the threshold alone (noted).
        base_v, new_v = num(b.get("first_call_ms")), num(n.get("first_call_ms"))
        ratio = new_v / base_v if base_v > 0 else math.nan
        word = "slower" if ratio > 1 + threshold else "faster" if ratio < 1 / (1 + threshold) else "unchanged"
        return CellComparison(cell_id, "model", "compared", base_v, new_v, ratio, n_base=1, n_new=1,
                              verdict=word, note="one value per run: threshold only, no CI")  # fmt: skip
    base_r, new_r = base.samples_by_round(cell_id), new.samples_by_round(cell_id)
    base_s, new_s = np.concatenate([np.empty(0), *base_r]), np.concatenate([np.empty(0), *new_r])
    if base_s.size < 2 or new_s.size < 2:
        return CellComparison(cell_id, "model", "not_ok", n_base=base_s.size, n_new=new_s.size,
                              note="fewer than 2 samples on a side")  # fmt: skip
    if machine_ratio is not None:
        if math.isnan(machine_ratio):
            return CellComparison(cell_id, "model", "no_calibration",
                                  note="no framework has an ok calibration row in both runs")  # fmt: skip
        new_r = [r / machine_ratio for r in new_r]
        new_s = new_s / machine_ratio
    stats = ratio_of_medians(base_r, new_r)
    note = "" if stats.ci_level == CI_ROUNDS else "one round on a side: within-process interval only"
    return CellComparison(
        cell_id, "model", "compared", float(np.median(base_s)), float(np.median(new_s)), stats.ratio,
        stats.ci95_low, stats.ci95_high, stats.p_value, int(base_s.size), int(new_s.size),
        stats.rounds_base, stats.rounds_new, stats.ci_level, verdict(stats, threshold, alpha), note,
    )  # fmt: skip


# ---------------------------------------------------------------- output


def write_json(comparison: Comparison, path: str | Path) -> None:
    """The whole comparison as JSON, atomically."""
    text = json.dumps(comparison.to_dict(), indent=2) + "\n"
    atomic_write(Path(path), lambda handle: handle.write(text))


def write_csv(comparison: Comparison, path: str | Path) -> None:
    """One row per cell (one-sided and not-ok cells included), with the run-level settings repeated; atomically."""
    frame = pd.DataFrame([asdict(c) for c in comparison.cells])
    for column, value in (("metric", comparison.metric), ("normalized", comparison.normalized),
                          ("threshold", comparison.threshold)):  # fmt: skip
        frame[column] = value
    atomic_write(Path(path), lambda handle: frame.to_csv(handle, index=False))


_VERDICT_STYLE = {"slower": "bold red", "faster": "green", "unchanged": "default"}


def print_comparison(comparison: Comparison) -> None:
    """The terminal table, the one-sided cells, the invariant mismatches and the outcome line."""
    from rich.markup import escape
    from rich.table import Table

    from bench.core.console import make_console

    console = make_console()
    unit = "ms (new normalised)" if comparison.normalized else "ms"
    title = f"bench compare ({comparison.metric}, threshold {comparison.threshold:.0%})"
    table = Table(title=title, header_style="bold", pad_edge=False, box=None)
    for name in ("cell", f"base {unit}", f"new {unit}", "new/base", "95% CI", "p", "n", "rounds", "verdict"):
        table.add_column(name, justify="left" if name in ("cell", "verdict") else "right", no_wrap=True)
    for c in comparison.cells:
        if c.status != "compared":
            continue
        ci = "" if math.isnan(c.ci95_low) else f"{c.ci95_low:.3f}-{c.ci95_high:.3f}"
        p = "" if math.isnan(c.p_value) else f"{c.p_value:.2g}"
        table.add_row(
            c.cell_id, f"{c.base_value:.4g}", f"{c.new_value:.4g}", f"{c.ratio:.3f}", ci, p,
            f"{c.n_base}/{c.n_new}", f"{c.rounds_base}/{c.rounds_new}",
            f"[{_VERDICT_STYLE[c.verdict]}]{c.verdict}[/]" if c.decides else f"[dim]{c.verdict} (one process)[/dim]",
        )  # fmt: skip
    console.print(table)
    _print_run_level(console, comparison)
    if comparison.normalized:
        console.print(f"normalised: the new run's samples divided by the machine ratio {comparison.machine_ratio:.3f} "
                      "(median over frameworks of new/base reference conv time)")  # fmt: skip
    if comparison.calibration_ratios:
        parts = ", ".join(f"{fw} {r:.3f}" for fw, r in comparison.calibration_ratios.items())
        console.print(f"reference conv new/base per framework: {parts}")
    for c in comparison.cells:
        if c.status in ("base_only", "new_only"):
            console.print(f"[yellow]{c.status.replace('_', ' ')}[/yellow]: {c.cell_id}")
        elif c.status != "compared":
            console.print(f"[yellow]not compared[/yellow]: {c.cell_id} ({escape(c.status)}: {escape(c.note)})")
    for text in comparison.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)
    for problem in comparison.invariant_mismatches:
        console.print(f"[bold red]invariant mismatch[/bold red]: {escape(problem)}")
    label = "[yellow]partial (allowed)[/yellow]" if comparison.allow_partial else "[bold red]incomplete new run[/bold red]"
    for reason in comparison.incomplete:
        console.print(f"{label}: {escape(reason)}", soft_wrap=True)
    if comparison.regressions:
        console.print(f"[bold red]{len(comparison.regressions)} cell(s) significantly slower by more than "
                      f"{comparison.threshold:.0%}[/bold red]")  # fmt: skip
    if comparison.run_level.verdict == "slower":
        console.print(f"[bold red]the one-round cells are significantly slower together by more than "
                      f"{comparison.threshold:.0%}[/bold red] (geometric mean {comparison.run_level.ratio:.3f})")  # fmt: skip
    if comparison.incomplete and not comparison.allow_partial:
        console.print("[bold red]the new run cannot vouch for every cell of the base[/bold red] (above): nothing shows "
                      "those cells are not slower; finish it (bench run --resume) or pass --allow-partial to compare "
                      "only what both runs measured", soft_wrap=True)  # fmt: skip
    elif comparison.exit_code == 0:
        partial = " among the cells both runs measured" if comparison.incomplete else ""
        console.print(f"no significant regression{partial}")


def _print_run_level(console: Any, comparison: Comparison) -> None:
    """What decided for the one-round cells: the run level, or (too few cells) each cell's own verdict."""
    level = comparison.run_level
    if level.verdict == "too_few_cells":
        console.print(f"[yellow]one round on a side[/yellow] ({level.cells} cell(s), fewer than "
                      f"{MIN_RUN_LEVEL_CELLS} to judge the run as a whole): each verdict rests on one process per "
                      "side and knows nothing of the process-to-process noise; measure with --rounds 3 or more to "
                      "trust a verdict near the threshold", soft_wrap=True)  # fmt: skip
    elif level.verdict:
        style = _VERDICT_STYLE[level.verdict]
        console.print(f"[yellow]one round on a side[/yellow] ({level.cells} cells): a cell's interval knows one "
                      "process per side, so those cells are judged together: geometric mean new/base "
                      f"{level.ratio:.3f} (95% CI {level.ci95_low:.3f}-{level.ci95_high:.3f} over the cells): "
                      f"[{style}]{level.verdict}[/]; measure with --rounds 3 or more for cell-by-cell verdicts",
                      soft_wrap=True)  # fmt: skip


def run_compare(
    base_dir: str, new_dir: str, metric: str = "latency_ms", threshold: str = "10%", normalize: bool = False,
    json_path: str | None = None, csv_path: str | None = None, allow_partial: bool = False,
) -> int:  # fmt: skip
    """The `compare` command: compare, print, write the requested files; returns the exit code (0 or 1).

    The output files are checked before anything is read (OutputPathError)."""
    for flag, path in (("--json", json_path), ("--csv", csv_path)):
        if path is not None:
            check_output_file(path, flag)
    comparison = compare_runs(base_dir, new_dir, metric, parse_threshold(threshold), normalize,
                              allow_partial=allow_partial)  # fmt: skip
    print_comparison(comparison)
    if json_path:
        write_json(comparison, json_path)
    if csv_path:
        write_csv(comparison, csv_path)
    return comparison.exit_code
