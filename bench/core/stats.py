"""Summary statistics derived from the kept per-iteration samples (numpy and scipy only).

A cell is measured in one or more rounds, each a fresh worker process. The process is a level of the
experiment (Kalibera & Jones, "Rigorous benchmarking in reasonable time", 2013): address-space layout,
thread placement, allocator state and the machine's neighbours change from one process to the next, and
that noise is usually larger than the noise between iterations of one process. So with two or more
rounds every interval is built from the round medians m_1..m_R (one number per process: the unit that
varies independently), on the log scale (process noise is a factor, not an offset: a slow process is
1.3x slower, and a latency interval must stay positive), with Student's t and R - 1 degrees of freedom.
With g and s the mean and sample sd of log m_i:

- the 95% interval of a cell, `latency_ms_median_ci95_*`: exp(g +- t s / sqrt(R)), the t interval of the
  typical (geometric mean) round median;
- the 95% interval for a rerun, `latency_ms_rerun_pi95_*`: where the typical round median of another run
  of R rounds should fall, exp(g +- t s sqrt(2 / R)) (a prediction interval: the rerun has noise of its
  own);
- the ratio of two cells (`ratio_of_medians`): Welch's t interval on the log round medians of each side.

A two-level (hierarchical) percentile bootstrap, rounds then samples, was used before and was measured
too narrow with few rounds: with 3 rounds it covered a rerun's median in 52.6% of 114 pairs, where these
intervals cover 84.2% (t) and 92.1% (rerun) (reports/coverage-2026-11-30). A percentile bootstrap over 3
processes hardly reaches beyond the range of their medians. With one round only the within-process level
is known: the interval is the bootstrap of that round's samples, and it says so (`ci_level` =
"within-process").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

NOISY_IQR_RATIO = 0.10  # torch.utils.benchmark's threshold: IQR/median above this is worth a warning
NOISY_ROUND_CV = 0.05  # between-round coefficient of variation of the round medians above this: noisy
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed, so the same samples always give the same interval
_CHUNK = 250  # resamples per vectorised block: bounds memory to ~250 x n floats

CI_ROUNDS = "rounds"  # the interval resamples processes and iterations
CI_WITHIN = "within-process"  # one round: the interval knows only the noise between iterations of one process

Rounds = Sequence[np.ndarray]  # one array of samples per round


def as_rounds(samples: Sequence[float] | np.ndarray | Rounds) -> list[np.ndarray]:
    """A flat sequence of samples is one round; a sequence of arrays is one array per round."""
    if len(samples) and isinstance(samples[0], (np.ndarray, list, tuple)):
        return [np.asarray(r, dtype=np.float64) for r in samples if len(r)]
    return [np.asarray(samples, dtype=np.float64)]


def resampled_medians(rounds: Rounds, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of `n_resamples` two-level bootstrap resamples (rounds, then samples within each round).

    With one round this is the ordinary bootstrap of the samples.
    """
    rounds = [np.asarray(r, dtype=np.float64) for r in rounds]
    out = np.empty(n_resamples)
    if len(rounds) == 1:
        values = rounds[0]
        for start in range(0, n_resamples, _CHUNK):
            stop = min(start + _CHUNK, n_resamples)
            idx = rng.integers(0, values.size, size=(stop - start, values.size))  # (chunk, n)
            out[start:stop] = np.median(values[idx], axis=1)
        return out
    sizes = {r.size for r in rounds}
    if len(sizes) == 1:  # equal rounds (a fixed --iters): one (rounds, n) matrix, fully vectorised
        matrix, n, r = np.stack(rounds), sizes.pop(), len(rounds)
        for start in range(0, n_resamples, _CHUNK):
            stop = min(start + _CHUNK, n_resamples)
            picks = rng.integers(0, r, size=(stop - start, r, 1))  # which round fills each slot
            within = rng.integers(0, n, size=(stop - start, r, n))  # which sample of it
            out[start:stop] = np.median(matrix[picks, within].reshape(stop - start, r * n), axis=1)
        return out
    for b in range(n_resamples):  # rounds of different lengths (a time budget): one resample at a time
        picks = rng.integers(0, len(rounds), size=len(rounds))
        parts = [rounds[p][rng.integers(0, rounds[p].size, size=rounds[p].size)] for p in picks]
        out[b] = np.median(np.concatenate(parts))
    return out


def round_medians(rounds: Rounds) -> np.ndarray:
    """The median of each round's samples: one value per worker process."""
    return np.array([np.median(r) for r in rounds if len(r)], dtype=np.float64)


def _log_t(values_ms: np.ndarray, scale: float) -> tuple[float, float]:
    """exp(g +- t_{0.975, R-1} * s * scale), g and s the mean and sample sd of the logs; NaNs with fewer than 2
    values or a value that is not positive."""
    values = np.asarray(values_ms, dtype=np.float64)
    if values.size < 2 or not np.all(values > 0):
        return (math.nan, math.nan)
    logs = np.log(values)
    half = float(sps.t.ppf(0.975, values.size - 1)) * float(logs.std(ddof=1)) * scale
    return (math.exp(logs.mean() - half), math.exp(logs.mean() + half))


def t_interval(medians_ms: np.ndarray) -> tuple[float, float]:
    """95% t interval of the typical round median, on the log scale: exp(g +- t s / sqrt(R))."""
    return _log_t(medians_ms, 1.0 / math.sqrt(max(len(medians_ms), 1)))


def rerun_interval(medians_ms: np.ndarray) -> tuple[float, float]:
    """95% prediction interval of a rerun's typical round median (as many rounds), on the log scale:
    exp(g +- t s sqrt(2 / R))."""
    return _log_t(medians_ms, math.sqrt(2.0 / max(len(medians_ms), 1)))


def median_ci(samples: Rounds | np.ndarray, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% interval of a cell's median: the t interval of the round medians with two or more rounds, the
    percentile bootstrap of the samples with one round (within-process only); NaNs with < 2 samples."""
    rounds = as_rounds(samples)
    pooled = np.concatenate(rounds) if rounds else np.empty(0)
    if pooled.size < 2:
        return (math.nan, math.nan)
    if np.all(pooled == pooled[0]):
        return (float(pooled[0]), float(pooled[0]))  # every process and iteration took the same time
    if len(rounds) > 1:
        return t_interval(round_medians(rounds))
    medians = resampled_medians(rounds, BOOTSTRAP_RESAMPLES, np.random.default_rng(seed))
    low, high = np.percentile(medians, [2.5, 97.5])
    return (float(low), float(high))


def bootstrap_median_ci(values_ms: np.ndarray, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The within-process interval of one round's samples (median_ci of a single round)."""
    return median_ci([np.asarray(values_ms, dtype=np.float64)], seed)


def round_spread(rounds: Rounds) -> dict[str, float]:
    """Between-round spread: the smallest and largest round median (ms) and their coefficient of variation."""
    medians = round_medians(rounds)
    if medians.size == 0:
        return {"round_median_ms_min": math.nan, "round_median_ms_max": math.nan, "round_cv": math.nan}
    cv = float(medians.std(ddof=1) / medians.mean()) if medians.size > 1 and medians.mean() > 0 else math.nan
    return {"round_median_ms_min": float(medians.min()), "round_median_ms_max": float(medians.max()), "round_cv": cv}


def summarize(samples_ns: Sequence[int] | Sequence[Sequence[int]], batch_size: int, flops: int | None) -> dict[str, object]:
    """Latency statistics in ms over every round's samples, the between-round spread, throughput and
    achieved GFLOP/s, and the `noisy` flag.

    `samples_ns` is one flat list (one round) or one list per round. Throughput and GFLOP/s use the median
    latency (robust to the odd slow iteration); with several rounds the intervals come from the round
    medians (module docstring), and the rerun interval is NaN with one round.
    """
    rounds = [r / 1e6 for r in as_rounds(samples_ns)]  # ms
    if not rounds or sum(r.size for r in rounds) == 0:
        raise ValueError("summarize needs at least one sample")
    ms = np.concatenate(rounds)
    median = float(np.median(ms))
    q25, q75 = np.percentile(ms, [25, 75])
    ci_low, ci_high = median_ci(rounds)
    rerun_low, rerun_high = rerun_interval(round_medians(rounds))
    iqr = float(q75 - q25)
    median_s = median / 1e3
    spread = round_spread(rounds)
    noisy_rounds = not math.isnan(spread["round_cv"]) and spread["round_cv"] > NOISY_ROUND_CV
    return {
        "n_samples": int(ms.size),
        "n_rounds": len(rounds),
        "latency_ms_median": median,
        "latency_ms_mean": float(ms.mean()),
        "latency_ms_std": float(ms.std(ddof=1)) if ms.size > 1 else math.nan,  # sample std
        "latency_ms_min": float(ms.min()),
        "latency_ms_p5": float(np.percentile(ms, 5)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "latency_ms_iqr": iqr,
        "latency_ms_median_ci95_low": ci_low,
        "latency_ms_median_ci95_high": ci_high,
        "ci_level": CI_ROUNDS if len(rounds) > 1 else CI_WITHIN,
        "latency_ms_rerun_pi95_low": rerun_low,
        "latency_ms_rerun_pi95_high": rerun_high,
        **spread,
        "throughput_img_per_s": batch_size / median_s if median_s > 0 else math.nan,
        "achieved_gflop_per_s": flops / median_s / 1e9 if flops is not None and median_s > 0 else math.nan,
        "noisy": bool((median > 0 and iqr / median > NOISY_IQR_RATIO) or noisy_rounds),
    }


# ---------------------------------------------------------------- ratios of two cells


@dataclass(frozen=True)
class RatioStats:
    """Ratio of medians new/base with its 95% interval and p-value (ratio_of_medians says which test) and the
    rounds behind each side."""

    ratio: float
    ci95_low: float
    ci95_high: float
    p_value: float
    rounds_base: int = 1
    rounds_new: int = 1

    @property
    def ci_level(self) -> str:
        """"rounds" when both sides have several rounds (the interval knows the process-to-process noise)."""
        return CI_ROUNDS if min(self.rounds_base, self.rounds_new) > 1 else CI_WITHIN


def _welch_log_ratio(base_medians: np.ndarray, new_medians: np.ndarray) -> tuple[float, float, float]:
    """Welch's t on the log round medians of two sides (2+ rounds each): the 95% interval of
    exp(mean log new - mean log base) and the two-sided p-value of no difference."""
    lb, ln = np.log(base_medians), np.log(new_medians)
    diff = float(ln.mean() - lb.mean())
    vb, vn = lb.var(ddof=1) / lb.size, ln.var(ddof=1) / ln.size
    se = math.sqrt(vb + vn)
    if se == 0.0:  # every round of each side alike: the ratio is what it is
        return math.exp(diff), math.exp(diff), 1.0 if diff == 0.0 else 0.0
    df = (vb + vn) ** 2 / (vb**2 / (lb.size - 1) + vn**2 / (ln.size - 1))  # Welch-Satterthwaite
    t = float(sps.t.ppf(0.975, df))
    p_value = float(2.0 * sps.t.sf(abs(diff) / se, df))
    return math.exp(diff - t * se), math.exp(diff + t * se), p_value


def ratio_of_medians(
    base: Sequence[float] | np.ndarray | Rounds,
    new: Sequence[float] | np.ndarray | Rounds,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> RatioStats:
    """median(new)/median(base) over every round's samples with a 95% interval and a p-value.

    Each side is a flat sequence (one round) or one array per round. With two or more rounds on both sides
    the interval and p-value are Welch's t on the log round medians (the process is the unit); otherwise a
    percentile bootstrap of the ratio (two-level on a side with rounds) and the Mann-Whitney U p-value of
    the pooled samples, which know one process on the one-round side only.
    """
    base_rounds, new_rounds = as_rounds(base), as_rounds(new)
    b, n = np.concatenate(base_rounds), np.concatenate(new_rounds)
    if b.size < 2 or n.size < 2:
        raise ValueError(f"ratio_of_medians needs at least 2 samples per side, got {b.size} and {n.size}")
    ratio = float(np.median(n) / np.median(b))
    if len(base_rounds) > 1 and len(new_rounds) > 1:
        low, high, p_value = _welch_log_ratio(round_medians(base_rounds), round_medians(new_rounds))
        return RatioStats(ratio, low, high, p_value, len(base_rounds), len(new_rounds))
    rng = np.random.default_rng(seed)
    ratios = resampled_medians(new_rounds, n_resamples, rng) / resampled_medians(base_rounds, n_resamples, rng)
    low, high = np.percentile(ratios, [2.5, 97.5])
    if np.all(b == b[0]) and np.all(n == n[0]) and b[0] == n[0]:
        p_value = 1.0  # scipy warns and returns NaN when every value ties
    else:
        p_value = float(sps.mannwhitneyu(n, b, alternative="two-sided").pvalue)
    return RatioStats(ratio, float(low), float(high), p_value, len(base_rounds), len(new_rounds))
