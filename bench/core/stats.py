"""Summary statistics derived from the kept per-iteration samples (numpy/scipy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

NOISY_IQR_RATIO = 0.10  # torch.utils.benchmark's threshold: IQR/median above this is worth a warning
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed, so the same samples always give the same interval


def bootstrap_median_ci(values_ms: np.ndarray, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap 95% confidence interval of the median; NaNs with fewer than 2 samples."""
    if values_ms.size < 2:
        return (math.nan, math.nan)
    if np.all(values_ms == values_ms[0]):
        return (float(values_ms[0]), float(values_ms[0]))  # every resample has the same median
    result = sps.bootstrap(
        (values_ms,),
        np.median,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=0.95,
        method="percentile",  # BCa degenerates on the ties a median produces
        rng=np.random.default_rng(seed),
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def summarize(samples_ns: Sequence[int], batch_size: int, flops: int | None) -> dict[str, object]:
    """Latency statistics in ms, throughput and achieved GFLOP/s, and the `noisy` flag.

    Throughput and GFLOP/s use the median latency (robust to the odd slow iteration).
    """
    if len(samples_ns) == 0:
        raise ValueError("summarize needs at least one sample")
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    median = float(np.median(ms))
    q25, q75 = np.percentile(ms, [25, 75])
    ci_low, ci_high = bootstrap_median_ci(ms)
    iqr = float(q75 - q25)
    median_s = median / 1e3
    return {
        "n_samples": int(ms.size),
        "latency_ms_median": median,
        "latency_ms_mean": float(ms.mean()),
        "latency_ms_std": float(ms.std(ddof=1)) if ms.size > 1 else math.nan,  # sample std
        "latency_ms_min": float(ms.min()),
        "latency_ms_p5": float(np.percentile(ms, 5)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "latency_ms_iqr": iqr,
        "latency_ms_median_ci95_low": ci_low,
        "latency_ms_median_ci95_high": ci_high,
        "throughput_img_per_s": batch_size / median_s if median_s > 0 else math.nan,
        "achieved_gflop_per_s": flops / median_s / 1e9 if flops is not None and median_s > 0 else math.nan,
        "noisy": bool(median > 0 and iqr / median > NOISY_IQR_RATIO),
    }
