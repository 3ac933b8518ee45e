"""Paired A/B statistics for CI's timing gate: runs of the reference code (A) and of this checkout (B), made
back to back in pairs, judged on the pairs' ratios so that the machine's drift cancels within each pair.

Per pair k and cell c the gate takes the log of new/base cell medians, d[k, c] = log(median B / median A).
Over the pairs it reports the geometric mean ratio exp(mean_k d[k, c]), its Student-t 95% interval (n - 1
degrees of freedom: the pairs are the independent units, each one a fresh process on each side) and the
one-sided p-value that B is slower. "All cells" is the same statistic on the per-pair mean over cells, which
answers "is the checkout slower overall" with the noise of six cells averaged down.

Why the pair is the unit, not the sample: two runs of identical code a minute apart differ by up to 16% in
a cell (reports/regression-check/), while a run's own samples give an interval a few percent wide. Only
repeating whole pairs measures that noise; the t interval over pairs carries it. Why log ratios: slowdowns
multiply, and a ratio and its inverse must weigh alike.

Verdict: `slower` when the geometric mean ratio exceeds 1 + threshold *and* p < alpha (a size that matters,
and not one wild pair); `faster` mirrors it; `too_few_pairs` below MIN_PAIRS (a t interval from two pairs
is too wide to mean anything). Pure functions on numbers; the gate (bench/regress/ab_check.py) reads runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

MIN_PAIRS = 3
ALL_CELLS = "all cells (geometric mean)"


@dataclass(frozen=True)
class PairedStats:
    """One cell (or all cells) over the pairs of a gate."""

    name: str  # cell_id, or ALL_CELLS
    n_pairs: int
    ratios: tuple[float, ...]  # each pair's new/base ratio of medians, in pair order
    ratio: float  # geometric mean of `ratios`
    ci95_low: float  # Student-t 95% interval of the geometric mean ratio (NaN below MIN_PAIRS)
    ci95_high: float
    log_ratio_sd: float  # between-pair standard deviation of log(new/base)
    p_slower: float  # one-sided p-value of "new is slower" (t test of the mean log ratio against 0)
    threshold: float  # the size a slowdown must exceed (fraction, 0.05 = 5%)
    alpha: float
    verdict: str  # slower, faster, unchanged or too_few_pairs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def paired_stats(name: str, ratios: Sequence[float], threshold: float, alpha: float) -> PairedStats:
    """The gate's statistic for one cell from its pairs' new/base ratios (each > 0)."""
    values = np.asarray(ratios, dtype=np.float64)
    if values.size and not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError(f"{name}: pair ratios must be finite and positive, got {values.tolist()}")
    logs = np.log(values)
    n = int(values.size)
    mean = float(logs.mean()) if n else math.nan
    sd = float(logs.std(ddof=1)) if n >= 2 else math.nan
    low = high = p_slower = math.nan
    if n >= MIN_PAIRS:
        se = sd / math.sqrt(n)
        if se > 0:
            half = float(sps.t.ppf(0.975, n - 1)) * se
            low, high = math.exp(mean - half), math.exp(mean + half)
            p_slower = float(sps.t.sf(mean / se, n - 1))
        else:  # every pair gave the same ratio: the sign of the mean is certain
            low = high = math.exp(mean)
            p_slower = 0.0 if mean > 0 else 1.0 if mean < 0 else 0.5
    ratio = math.exp(mean) if n else math.nan
    return PairedStats(name, n, tuple(float(v) for v in values), ratio, low, high, sd, p_slower, threshold, alpha,
                       _verdict(n, ratio, p_slower, threshold, alpha))  # fmt: skip


def _verdict(n: int, ratio: float, p_slower: float, threshold: float, alpha: float) -> str:
    if n < MIN_PAIRS:
        return "too_few_pairs"
    if ratio > 1.0 + threshold and p_slower < alpha:
        return "slower"
    if ratio < 1.0 / (1.0 + threshold) and 1.0 - p_slower < alpha:
        return "faster"
    return "unchanged"


def all_cells_ratios(per_cell: Mapping[str, Sequence[float]]) -> list[float]:
    """Per pair, the geometric mean over cells of new/base: exp(mean_c log ratio[k, c]).

    Every cell must have one ratio per pair (the gate fails a pair that lacks a cell before it gets here)."""
    lengths = {len(r) for r in per_cell.values()}
    if len(lengths) > 1:
        raise ValueError(f"cells have different numbers of pairs: {sorted(lengths)}; each needs one ratio per pair")
    if not per_cell:
        return []
    logs = np.log(np.array([list(r) for r in per_cell.values()], dtype=np.float64))  # (cells, pairs)
    return [float(v) for v in np.exp(logs.mean(axis=0))]
