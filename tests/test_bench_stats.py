"""Statistics and the sampling loop, against hand-computed values (no framework, no wall clock)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.core import stats
from bench.core.calibration import ConvShape, dominant_conv3x3
from bench.engine import timing
from bench.run.equivalence import compare, relative_error
from impls import get_preset

# Five samples of 1..5 ms, in nanoseconds, shuffled: order must not matter.
SAMPLES_NS = [3_000_000, 1_000_000, 5_000_000, 2_000_000, 4_000_000]


def test_summarize_matches_hand_computed_values() -> None:
    s = stats.summarize(SAMPLES_NS, batch_size=2, flops=6_000_000_000)
    assert s["n_samples"] == 5
    assert s["latency_ms_median"] == pytest.approx(3.0)
    assert s["latency_ms_mean"] == pytest.approx(3.0)
    assert s["latency_ms_std"] == pytest.approx(math.sqrt(2.5))  # sum of squares 10 over n-1 = 4
    assert s["latency_ms_min"] == pytest.approx(1.0)
    assert s["latency_ms_p5"] == pytest.approx(1.2)  # linear interpolation: 1 + 0.05 * 4 * (2 - 1)
    assert s["latency_ms_p95"] == pytest.approx(4.8)
    assert s["latency_ms_iqr"] == pytest.approx(2.0)  # q75 = 4, q25 = 2
    assert s["throughput_img_per_s"] == pytest.approx(2 / 0.003)
    assert s["achieved_gflop_per_s"] == pytest.approx(6.0 / 0.003)
    assert s["noisy"] is True  # IQR/median = 0.67


def test_summarize_flags_not_noisy_when_iqr_is_small() -> None:
    samples = [100_000_000 + i * 1_000_000 for i in range(9)]  # 100..108 ms: IQR 4 ms, median 104 ms
    s = stats.summarize(samples, batch_size=1, flops=None)
    assert s["latency_ms_iqr"] == pytest.approx(4.0)
    assert s["noisy"] is False
    assert math.isnan(s["achieved_gflop_per_s"])


def test_summarize_single_sample_has_nan_spread() -> None:
    s = stats.summarize([2_000_000], batch_size=1, flops=None)
    assert s["latency_ms_median"] == pytest.approx(2.0)
    assert math.isnan(s["latency_ms_std"])
    assert math.isnan(s["latency_ms_median_ci95_low"])


def test_bootstrap_ci_is_deterministic_and_brackets_the_median() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(10.0, 1.0, size=50)
    first = stats.bootstrap_median_ci(values)
    assert first == stats.bootstrap_median_ci(values)  # fixed seed
    assert first[0] < np.median(values) < first[1]
    assert values.min() <= first[0] and first[1] <= values.max()


def test_bootstrap_ci_of_constant_samples_has_zero_width() -> None:
    assert stats.bootstrap_median_ci(np.full(10, 4.0)) == (4.0, 4.0)


class FakeClock:
    """A clock that stands still except when a step runs, which takes `step_ns`."""

    def __init__(self, step_ns: int) -> None:
        self.now = 0
        self.step_ns = step_ns
        self.calls = 0

    def __call__(self) -> int:
        return self.now

    def step(self) -> None:
        self.calls += 1
        self.now += self.step_ns


def test_sample_without_min_time_runs_exactly_max_iters() -> None:
    clock = FakeClock(step_ns=1_000)
    samples = timing.sample(clock.step, max_iters=7, clock=clock)
    assert samples == [1_000] * 7
    assert clock.calls == 7


def test_sample_with_min_time_stops_after_the_budget() -> None:
    clock = FakeClock(step_ns=100_000_000)  # 0.1 s per step
    samples = timing.sample(clock.step, max_iters=1000, min_time_s=1.0, min_iters=3, clock=clock)
    assert len(samples) == 10


def test_sample_with_min_time_still_collects_min_iters() -> None:
    clock = FakeClock(step_ns=2_000_000_000)  # 2 s per step, over the 1 s budget at once
    samples = timing.sample(clock.step, max_iters=1000, min_time_s=1.0, min_iters=5, clock=clock)
    assert len(samples) == 5


def test_sample_max_iters_caps_a_time_budget() -> None:
    clock = FakeClock(step_ns=1_000)
    assert len(timing.sample(clock.step, max_iters=4, min_time_s=100.0, clock=clock)) == 4


def test_measure_times_first_call_alone_then_warms_up() -> None:
    durations = iter([5_000, 10, 10, 1, 2, 3])  # first call, 2 warm-ups, 3 timed
    clock = FakeClock(step_ns=0)
    stages: list[str] = []

    def step() -> None:
        clock.now += next(durations)

    result = timing.measure(step, warmup=2, max_iters=3, clock=clock, on_stage=stages.append)
    assert result.first_call_ns == 5_000
    assert result.warmup_calls == 2
    assert result.samples_ns == [1, 2, 3]
    assert stages == ["first_call", "warmup", "timed", "done"]


def test_dominant_conv3x3_of_seed_is_the_top_resolution_bottleneck() -> None:
    shape = dominant_conv3x3(get_preset("seed"))
    assert shape == ConvShape(64, 64, 64, 64)
    assert shape.flops(2) == 2 * 2 * 64 * 64 * 9 * 64 * 64


def test_compare_median_consensus_singles_out_the_framework_that_disagrees() -> None:
    base = np.random.default_rng(0).standard_normal((2, 1, 4, 4, 3)).astype(np.float32)
    verdict = compare({"torch": base, "tensorflow": base * (1 + 1e-7), "jax": base * 1.5}, rtol=1e-3)
    assert verdict["torch"]["equivalent"] and verdict["tensorflow"]["equivalent"]
    assert verdict["jax"]["equivalent"] is False
    assert verdict["jax"]["max_rel_err"] == pytest.approx(0.5, rel=1e-6)


def test_compare_two_frameworks_flags_both_and_one_framework_is_unchecked() -> None:
    base = np.ones((1, 1, 2, 2, 1), dtype=np.float32)
    pair = compare({"torch": base, "jax": base * 2}, rtol=1e-3)
    assert pair["torch"]["equivalent"] is False and pair["jax"]["equivalent"] is False
    assert compare({"torch": base}, rtol=1e-3)["torch"]["equivalent"] is None


def test_relative_error_is_infinite_for_nan_or_wrong_shape() -> None:
    ref = np.ones((1, 1, 2, 2, 1))
    assert relative_error(np.full_like(ref, np.nan), ref) == math.inf
    assert relative_error(np.ones((1, 1, 2, 2, 2)), ref) == math.inf


# ---------------------------------------------------------------- rounds: the process as a level


def _rounds_with_offsets(rng: np.random.Generator, offsets: np.ndarray, n: int = 30) -> list[np.ndarray]:
    """One round per offset: samples around 10 ms + that round's offset, with small within-round noise."""
    return [10.0 + off + rng.normal(0.0, 0.02, size=n) for off in offsets]


def test_two_level_interval_covers_a_known_between_round_offset() -> None:
    """Rounds differ by offsets drawn around 0 (sd 0.3 ms, within-round sd 0.02 ms): the two-level interval
    covers the true centre (10 ms) far more often than the within-process interval of the pooled samples."""
    rng = np.random.default_rng(7)
    covered_rounds = covered_within = 0
    trials = 60
    for trial in range(trials):
        rounds = _rounds_with_offsets(rng, rng.normal(0.0, 0.3, size=5))
        low, high = stats.median_ci(rounds, seed=trial)
        covered_rounds += low <= 10.0 <= high
        low, high = stats.bootstrap_median_ci(np.concatenate(rounds), seed=trial)
        covered_within += low <= 10.0 <= high
    assert covered_rounds / trials >= 0.85
    assert covered_within / trials <= 0.5


def test_summarize_of_rounds_gives_the_between_round_spread() -> None:
    rounds = [[10_000_000] * 5, [11_000_000] * 5, [12_000_000] * 5]  # round medians 10, 11, 12 ms
    s = stats.summarize(rounds, batch_size=1, flops=None)
    assert s["n_rounds"] == 3 and s["n_samples"] == 15 and s["ci_level"] == "rounds"
    assert s["round_median_ms_min"] == pytest.approx(10.0) and s["round_median_ms_max"] == pytest.approx(12.0)
    assert s["round_cv"] == pytest.approx(1.0 / 11.0)  # sd of (10, 11, 12) is 1
    assert s["noisy"] is True  # between-round CV 9% > 5%, though each round is constant
    # Round medians 10, 11, 12 on the log scale: mean g = 2.39513, sd s = 0.091192, t(0.975, 2 df) = 4.30265.
    assert s["latency_ms_median_ci95_low"] == pytest.approx(8.7460, abs=1e-3)  # exp(g - t s / sqrt 3)
    assert s["latency_ms_median_ci95_high"] == pytest.approx(13.7586, abs=1e-3)  # exp(g + t s / sqrt 3)
    assert s["latency_ms_rerun_pi95_low"] == pytest.approx(7.9626, abs=1e-3)  # exp(g - t s sqrt(2/3))
    assert s["latency_ms_rerun_pi95_high"] == pytest.approx(15.1121, abs=1e-3)  # exp(g + t s sqrt(2/3))


def test_round_intervals_cover_what_they_promise_with_three_rounds() -> None:
    """Three rounds whose medians scatter by a factor around 10 ms (log sd 0.05): the t interval covers the
    centre in about 95% of draws, and the rerun interval covers the next run's typical (geometric mean)
    round median in about 95%, where the
    t interval covers it less often (P(|T_2| <= 4.30 / sqrt 2) = 0.907 with three rounds; 0.83 with many)
    and the range of three values (all a percentile bootstrap over three rounds can reach) in far fewer."""
    rng = np.random.default_rng(11)
    trials, hits = 2000, {"t_centre": 0, "rerun_next": 0, "t_next": 0, "range_next": 0}
    for _ in range(trials):
        medians = 10.0 * np.exp(rng.normal(0.0, 0.05, size=3))
        rerun = 10.0 * math.exp(rng.normal(0.0, 0.05, size=3).mean())
        t_low, t_high = stats.t_interval(medians)
        p_low, p_high = stats.rerun_interval(medians)
        hits["t_centre"] += t_low <= 10.0 <= t_high
        hits["rerun_next"] += p_low <= rerun <= p_high
        hits["t_next"] += t_low <= rerun <= t_high
        hits["range_next"] += medians.min() <= rerun <= medians.max()
    share = {k: v / trials for k, v in hits.items()}
    assert 0.93 <= share["t_centre"] <= 0.97
    assert 0.93 <= share["rerun_next"] <= 0.97
    assert 0.87 <= share["t_next"] <= 0.93
    assert share["range_next"] <= 0.70


def test_round_intervals_are_nan_with_one_round_and_positive_however_wide() -> None:
    assert all(math.isnan(v) for v in (*stats.t_interval(np.array([5.0])), *stats.rerun_interval(np.array([5.0]))))
    wild = np.array([1.0, 2.0, 10.0])  # a spread an arithmetic m +- t s interval would take below zero
    assert 0 < stats.rerun_interval(wild)[0] < 1.0 and stats.rerun_interval(wild)[1] > 10.0
    s = stats.summarize(SAMPLES_NS, batch_size=1, flops=None)
    assert math.isnan(s["latency_ms_rerun_pi95_low"]) and math.isnan(s["latency_ms_rerun_pi95_high"])


def test_ratio_of_rounds_is_welch_on_log_round_medians() -> None:
    """Both sides with rounds: the interval of new/base covers a known ratio of 1.2 (lognormal process noise
    of 3%) in about 95% of draws, and its centre is the ratio of geometric means of the round medians."""
    rng = np.random.default_rng(5)
    trials, covered = 400, 0
    for _ in range(trials):
        base = [np.full(8, 10.0 * math.exp(rng.normal(0, 0.03))) for _ in range(4)]
        new = [np.full(8, 12.0 * math.exp(rng.normal(0, 0.03))) for _ in range(3)]
        r = stats.ratio_of_medians(base, new)
        assert r.ci_level == "rounds" and (r.rounds_base, r.rounds_new) == (4, 3)
        covered += r.ci95_low <= 1.2 <= r.ci95_high
    assert 0.91 <= covered / trials <= 0.99
    base, new = [np.full(5, 10.0), np.full(5, 10.0)], [np.full(5, 11.0), np.full(5, 11.0)]
    exact = stats.ratio_of_medians(base, new)  # no spread between rounds: the interval is the ratio itself
    assert exact.ci95_low == pytest.approx(1.1) and exact.ci95_high == pytest.approx(1.1) and exact.p_value == 0.0


def test_summarize_of_one_round_is_labelled_within_process() -> None:
    s = stats.summarize(SAMPLES_NS, batch_size=1, flops=None)
    assert s["n_rounds"] == 1 and s["ci_level"] == "within-process"
    assert math.isnan(s["round_cv"])


def test_resampled_medians_handles_rounds_of_different_lengths() -> None:
    rng = np.random.default_rng(0)
    rounds = [np.full(3, 1.0), np.full(7, 2.0)]
    medians = stats.resampled_medians(rounds, 400, rng)
    assert set(np.unique(medians)) <= {1.0, 1.5, 2.0}  # all-1 or all-2 resamples, or one of each (median of 10 values)
    assert 1.0 in medians and 2.0 in medians
