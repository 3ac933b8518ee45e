"""Shared fixtures: small configs, per-framework parametrisation, fresh random inputs, closeness checks."""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

import impls
from impls import HourglassConfig
from tests import fp64_record

# Small configs that still exercise every seam: both block variants, both paddings, both stem pools,
# conv biases on and off, and a non-square input (the heatmap is 8x12).
SMALL_CONFIGS: dict[str, HourglassConfig] = {
    "tiny": impls.PRESETS["tiny"],
    "tiny_preact": impls.PRESETS["tiny"].replace(block="preact", stem_pool="max", padding="symmetric", conv_bias=True),
    "nonsquare_postact": HourglassConfig(num_stacks=2, depth=2, channels=16, num_keypoints=3, input_hw=(32, 48)),
    "nonsquare_preact": HourglassConfig(
        num_stacks=3,
        depth=1,
        channels=24,
        num_keypoints=4,
        input_hw=(40, 24),
        block="preact",
        stem_pool="max",
        padding="symmetric",
        conv_bias=True,
    ),
}


# Generated-configuration tests (tests/test_fp64_proof.py). "ci", the default, is a fixed number of
# examples sized for CI's 2-core budget: every example builds and compiles the network anew in each framework
# (JAX's XLA compile of a 4-stack depth-4 network's gradient takes over a minute there). A failing example is
# reported as found, not shrunk (shrinking re-runs it dozens of times), with its config printed in full.
# "thorough" for a local run: `python -m pytest tests/test_fp64_proof.py --hypothesis-profile thorough`
# (50 train-mode and 100 eval-mode examples, a failure shrunk to a simpler config; 25 minutes on 2 cores).
_GENERATED = {"deadline": None, "database": None, "print_blob": True,
              "suppress_health_check": [HealthCheck.too_slow]}  # fmt: skip
settings.register_profile("ci", max_examples=4, phases=[Phase.explicit, Phase.generate], **_GENERATED)
settings.register_profile("thorough", max_examples=50, **_GENERATED)
settings.load_profile("ci")

# The fp32 rules, set from the fp32-against-float64 distribution on generated configs (python -m
# tests.fp32_vs_fp64: reports/fp32-vs-fp64/ and README "What the tests prove"), not from the four configs
# above. What fp32 can tell apart depends on the config: eval mode is well conditioned everywhere; train
# mode is not where a BN normalises few values or the network is deep, and there no fp32 rule both passes
# correct frameworks and means much (the float64 proof, tests/test_fp64_proof.py, covers those).
# Eval-mode heatmaps: all 20 generated configs within 1.0e-6 of float64 and between frameworks; 10x that.
FP32_EVAL_HEATMAP_RTOL = 1e-5
# Train-mode heatmaps: pairs of frameworks differ by 1e-5 in the median of 17 generated configs drawn away
# from kinks, by at most 1e-4 in 82% of them, 3.6e-4 at worst (a 3-stack net with 4 values per innermost BN).
FP32_TRAIN_HEATMAP_RTOL = 1e-4
# The loss: 8.3e-6 at worst over all 32 generated train-mode configs; 10x that.
FP32_LOSS_RTOL = 1e-4
# Gradients, assert_grads_close's rule: the median pair 0.8-1.6e-4, 82% of configs drawn away from kinks
# within 1e-3; in the other 18% fp32 gradients are chaotic (a 1e-6 change of the input moves them by up to
# 60% in every framework), and no tolerance separates rounding from a bug there.
FP32_GRAD_RTOL = 1e-3


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped when none is visible")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After the run: how many generated examples the float64 proof checked and its largest errors."""
    for line in fp64_record.summary_lines():
        terminalreporter.write_line(line)


class Variant:
    """A framework's implementation module with one implementation variant bound: `build` makes that variant
    unless told otherwise, everything else is the module's. What the equivalence tests call `backend`."""

    def __init__(self, module, impl: str) -> None:
        self._module, self.IMPL = module, impl

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def build(self, *args, **kwargs):
        kwargs.setdefault("impl", self.IMPL)
        return self._module.build(*args, **kwargs)

    def profile(self, *args, **kwargs):
        kwargs.setdefault("impl", self.IMPL)
        return self._module.profile(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._module.__name__} impl={self.IMPL}>"


# Every framework's every implementation variant: the default ones keep the framework's name as their id.
VARIANTS = [(fw, impl) for fw in impls.FRAMEWORKS for impl in impls.IMPLS[fw]]


@pytest.fixture(params=VARIANTS, ids=[fw if impl == impls.DEFAULT_IMPL else f"{fw}-{impl}" for fw, impl in VARIANTS])
def backend(request: pytest.FixtureRequest) -> Variant:
    """Each installed framework's implementation, once per variant; skipped cleanly when not installed."""
    name, impl = request.param
    if not impls.is_installed(name):
        pytest.skip(f"{name} is not installed ({impls.install_command(name)})")
    return Variant(impls.load(name), impl)


@pytest.fixture(params=list(SMALL_CONFIGS))
def config(request: pytest.FixtureRequest) -> HourglassConfig:
    return SMALL_CONFIGS[request.param]


class Draw:
    """Fresh random arrays for one test; the seed is kept so a failure can be reproduced."""

    def __init__(self) -> None:
        self.seed = secrets.randbits(32)
        self.rng = np.random.default_rng(self.seed)

    def inputs(self, config: HourglassConfig, batch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """(x, target): x (N, H, W, 3) and target (N, H/4, W/4, K), standard normal float32, never zeros."""
        h, w = config.input_hw
        x = self.rng.standard_normal((batch_size, h, w, 3)).astype(np.float32)
        target = self.rng.standard_normal((batch_size, h // 4, w // 4, config.num_keypoints)).astype(np.float32)
        return x, target

    def inputs_away_from_kinks(
        self, config: HourglassConfig, weights: dict[str, np.ndarray], batch_size: int = 2, min_margin: float = 3e-5
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `inputs`, redrawn until no train-mode ReLU input or max-pool gap lies within `min_margin`
        (relative to its tensor's spread) of a kink.

        Gradients are discontinuous at kinks: where fp32 rounding (~1e-6) puts two frameworks on opposite
        sides of one, their gradients differ by a real jump (seen: 10% on one bias). Comparing gradients
        is only meaningful away from them; 10-40% of draws of the small test configs qualify (0.01 s each).
        """
        from tests.numpy_reference import NumpyHourglass

        reference = NumpyHourglass(config, weights, train_mode=True)
        for _ in range(200):
            x, target = self.inputs(config, batch_size)
            reference(x)
            if reference.kink_margin > min_margin:
                return x, target
        raise AssertionError(f"200 draws all came within {min_margin} of a kink (seed {self.seed})")


@pytest.fixture
def draw() -> Draw:
    return Draw()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def _assert_same_shape_and_finite(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert np.shape(a) == np.shape(b), f"{what}: shape {np.shape(a)} != {np.shape(b)}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"


def assert_close(a: np.ndarray, b: np.ndarray, tol: float, what: str) -> None:
    """Fail with the measured relative error when ||a-b||/||b|| > tol (shapes must match)."""
    _assert_same_shape_and_finite(a, b, what)
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def require_gpu(backend) -> None:
    """Skip without a GPU, unless HGBENCH_REQUIRE_GPU=1 asks for one: then its absence is a failure."""
    if backend.gpu_available():
        return
    message = f"no GPU visible to {backend.FRAMEWORK}"
    if os.environ.get("HGBENCH_REQUIRE_GPU") == "1":
        pytest.fail(f"{message}, but HGBENCH_REQUIRE_GPU=1 asks for one")
    pytest.skip(message)


def assert_grads_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float, what: str) -> None:
    """Every parameter's gradient within ||got - want|| <= tol * (||want|| + rms * sqrt(size)), where rms is
    the root-mean-square element of the whole gradient `want` (all parameters together).

    The second term is numpy's atol next to its rtol: the same `tol`, measured against the norm a typical
    parameter of that size has. It matters only where a gradient nearly cancels. A train-mode BN scale's
    gradient is sum(dy * x_hat) over batch and space, hundreds of products whose total can be ~100x smaller
    than its terms; fp32 rounding of those terms then differs between two correct frameworks by more than
    1e-3 of the tiny total (measured over 30 draws on `tiny`: up to 6.3e-3 of its own norm, only ever on BN
    scales and biases; with this rule at most 5.7e-4). The same rule passes the BN-cancelled biases (exactly
    zero in exact arithmetic, fp32 noise in practice; impls.spec.bn_cancelled_biases), and still fails one
    side ~0 where the other has a real gradient.
    """
    assert sorted(got) == sorted(want), f"{what}: parameter names differ"
    total_sq = sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in want.values())
    rms = math.sqrt(total_sq / sum(np.size(g) for g in want.values()))
    for name in want:
        a, b = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        _assert_same_shape_and_finite(a, b, f"grad {name} {what}")
        err, norm, typical = float(np.linalg.norm(a - b)), float(np.linalg.norm(b)), rms * math.sqrt(b.size)
        assert err <= tol * (norm + typical), (
            f"grad {name} {what}: ||a-b|| {err:.3e} > {tol:.0e} x (||b|| {norm:.3e} + typical {typical:.3e}); "
            f"relative error {err / max(norm, 1e-30):.3e}"
        )


def vanishing_grads(grads: dict[str, np.ndarray]) -> list[str]:
    """Names whose gradient norm is at most 1e-5 of the largest one."""
    floor = 1e-5 * max(float(np.linalg.norm(g)) for g in grads.values())
    return sorted(n for n, g in grads.items() if float(np.linalg.norm(g)) <= floor)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Workers load tests/fake_backend.py (HGBENCH_BACKEND_OVERRIDE, read only by the worker); no GPU; every
    framework installed unless a test says otherwise; no fault, thread or slowdown switch left set."""
    from bench.core import settings

    monkeypatch.setenv("HGBENCH_BACKEND_OVERRIDE", "tests.fake_backend")
    for name in ("HGBENCH_FAKE_FAULTS", "HGBENCH_FAKE_THREADS", "HGBENCH_TEST_SLOWDOWN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(settings.nvml, "gpu_present", lambda: False)
    monkeypatch.setattr(settings, "is_installed", lambda fw: True)
    return monkeypatch
