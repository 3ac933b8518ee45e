"""The float64 proof of one generated case: every framework against the float64 oracles and against each other.

In float64 the three frameworks differ by rounding of ~1e-16 amplified by the network's conditioning,
so a relative 1e-9 leaves a wide margin for correct code and none for a different computation. Checked
for one Case (tests/generated_configs.py), each framework's default execution built with precision="fp64":

- heatmaps (eval- or train-mode BN, as the case says) against the numpy float64 forward
  (tests/numpy_reference.py), per stack, ||a - b|| / ||b|| <= FP64_RTOL;
- in train mode, the loss against the reference's, and the gradient along a random direction of all
  parameters, <grad, d>, against the complex-step derivative of the reference along d (exact to float64
  rounding, tests/numpy_reference.directional_derivative), both relative <= FP64_RTOL;
- between every pair of frameworks: heatmaps, loss and every parameter's gradient, each relative
  <= FP64_RTOL of its own norm, plus FP64_ATOL of the norm a typical parameter of its size has (the RMS
  element of the whole gradient times sqrt(size)). That floor, 1e-4 of the relative bound, matters only for
  gradients 1e4 times smaller than a typical one, which are sums that nearly cancel: behind a BN that
  normalises two values (batch 1 at a 1x2 level), x_hat is +-1 up to epsilon / variance, and the gradient
  through it is what that epsilon leaves, ~1e-11 of a typical one, found by subtracting O(1) terms, so its
  relative error is ~1e-16 times 1e11 (measured: 1.05e-9 on such a kernel, whose difference was 6e-20 of a
  typical norm). The BN-cancelled biases (impls.spec.bn_cancelled_biases), zero in exact arithmetic, have
  no relative error at all: they are held to FP64_RTOL x the typical norm, and must be that small in
  every framework.

Gradients are discontinuous at ReLU and max-pool kinks, so where a ReLU input or a max-pool gap lies
within rounding of a kink, correct frameworks may differ. In float64 that needs a genuine tie (two equal
non-zero values in a pool window) or a value within TIE_MARGIN of one: then the inputs are redrawn, and
the redraw is counted and reported.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

import impls
from impls import base, spec
from tests.generated_configs import Case
from tests.numpy_reference import NumpyHourglass, directional_derivative, loss

FP64_RTOL = 1e-9
FP64_ATOL = 1e-13  # of a typical parameter's gradient norm: the floor for nearly cancelled gradients (above)
TIE_MARGIN = 1e-10  # relative to the tensor's spread; float64 frameworks differ by ~1e-15 of it
MAX_REDRAWS = 20


@dataclass
class Outcome:
    """The largest error of each kind in one case (or over many), with where it was seen, and the redraws."""

    largest: dict[str, tuple[float, str]] = field(default_factory=dict)
    redraws: int = 0
    refused: int = 0  # train-mode cases every framework refused (base.check_train_batch)
    examples: int = 0
    train_examples: int = 0
    frameworks: tuple[str, ...] = ()

    def note(self, kind: str, error: float, where: str) -> None:
        """Keep `error` if it is the largest of its kind so far."""
        if kind not in self.largest or error > self.largest[kind][0]:
            self.largest[kind] = (error, where)

    def merge(self, other: Outcome) -> None:
        """Fold another case's outcome into this running total."""
        for kind, (error, where) in other.largest.items():
            self.note(kind, error, where)
        self.redraws += other.redraws
        self.refused += other.refused
        self.examples += other.examples
        self.train_examples += other.train_examples
        self.frameworks = tuple(dict.fromkeys((*self.frameworks, *other.frameworks)))


@dataclass
class Outputs:
    """What one framework computed for a case (float64 numpy)."""

    heatmaps: np.ndarray  # (S, N, H/4, W/4, K)
    loss: float | None = None
    grads: dict[str, np.ndarray] | None = None


def rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    """||a - b|| / ||b||; 0 when both are 0, inf when only b is."""
    diff, norm = float(np.linalg.norm(np.subtract(a, b))), float(np.linalg.norm(b))
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def run_framework(framework: str, case: Case, weights: dict[str, np.ndarray], x: np.ndarray,
                  target: np.ndarray) -> Outputs:  # fmt: skip
    """One framework's fp64 heatmaps (and in train mode its loss and gradients) for the case; `framework` is a
    framework, or "framework-variant" for an implementation variant (variant_names)."""
    fw, _, impl = framework.partition("-")
    model = impls.load(fw).build(case.config, weights=weights, precision="fp64", impl=impl or impls.DEFAULT_IMPL)
    heatmaps = model.predict(x, train_mode=case.train_mode)
    assert heatmaps.dtype == np.float64, f"{framework} fp64 heatmaps are {heatmaps.dtype}"
    if not case.train_mode:
        return Outputs(heatmaps)
    loss_value, grads = model.loss_and_grads(x, target)  # batch statistics: the update above changes nothing here
    return Outputs(heatmaps, loss_value, grads)


def variant_names(frameworks: list[str]) -> list[str]:
    """Every implementation variant of `frameworks`: the framework's name for its default one, "jax-tuned"
    for another, so the proof compares every variant with the oracles and with every other."""
    return [fw if impl == impls.DEFAULT_IMPL else f"{fw}-{impl}" for fw in frameworks for impl in impls.IMPLS[fw]]


def check_refused(case: Case, frameworks: list[str]) -> None:
    """Every framework refuses train-mode BN over a single value, with the shared message."""
    x, target = case.inputs()
    for name in frameworks:
        fw, _, impl = name.partition("-")
        model = impls.load(fw).build(case.config, weights=case.weights(), precision="fp64", impl=impl or impls.DEFAULT_IMPL)
        for call in (lambda m: m.predict(x, train_mode=True), lambda m: m.loss_and_grads(x, target)):
            try:
                call(model)
            except ValueError as err:
                assert "more than one value per channel" in str(err), f"{name}: {err}"
            else:
                raise AssertionError(f"{name} accepted train-mode BN over one value per channel: {case!r}")


def draw_inputs(case: Case, reference: NumpyHourglass) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(x, target, reference heatmaps, redraws): in train mode redrawn while a genuine tie is in reach."""
    for redraw in range(MAX_REDRAWS):
        x, target = case.inputs(redraw)
        want = reference(x)
        if not case.train_mode or reference.kink_margin > TIE_MARGIN:
            return x, target, want, redraw
    raise AssertionError(f"{MAX_REDRAWS} draws all had a value within {TIE_MARGIN} of a kink: {case!r}")


def check_grads(got: dict[str, np.ndarray], want: dict[str, np.ndarray], vanishing: set[str], what: str,
                outcome: Outcome) -> None:  # fmt: skip
    """Every parameter's gradient within FP64_RTOL x its norm + FP64_ATOL x a typical one; the BN-cancelled
    biases within FP64_RTOL x a typical norm, and that small themselves."""
    assert sorted(got) == sorted(want), f"{what}: parameter names differ"
    total_sq = sum(float(np.sum(np.square(g))) for g in want.values())
    rms = math.sqrt(total_sq / sum(g.size for g in want.values()))
    for name, b in want.items():
        a = got[name]
        assert a.shape == b.shape and a.dtype == np.float64, f"{what} {name}: {a.shape} {a.dtype} vs {b.shape}"
        typical = rms * math.sqrt(b.size)
        diff, norm = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
        if name in vanishing:
            size = max(norm, float(np.linalg.norm(a))) / typical
            outcome.note("BN-cancelled bias, max ||g|| / typical", size, f"{what} {name}")
            assert size <= FP64_RTOL, f"{what} {name}: BN-cancelled bias has gradient {size:.3e} x typical"
            continue
        error = diff / (norm + FP64_ATOL / FP64_RTOL * typical)
        outcome.note("gradient per parameter, ||a-b|| / (||b|| + 1e-4 typical)", error, f"{what} {name}")
        assert error <= FP64_RTOL, (
            f"{what} grad {name}: ||a-b|| {diff:.3e} > {FP64_RTOL:.0e} x ||b|| {norm:.3e} + {FP64_ATOL:.0e} x "
            f"typical {typical:.3e}; relative error {diff / max(norm, 1e-300):.3e}"
        )
        if norm >= 1e-4 * typical:
            outcome.note("gradient per parameter (>= 1e-4 typical), relative", diff / norm, f"{what} {name}")


def check_case(case: Case, frameworks: list[str]) -> Outcome:
    """Run the proof for one case over `frameworks`; AssertionError (naming the case) on any disagreement."""
    outcome = Outcome(examples=1, train_examples=int(case.train_mode), frameworks=tuple(frameworks))
    config, weights = case.config, case.weights()
    if case.train_mode and case.batch_size < base.smallest_train_batch(config):
        check_refused(case, frameworks)  # batch 1 at a 1x1 innermost level: every framework refuses alike
        outcome.refused = 1
        return outcome
    reference = NumpyHourglass(config, weights, train_mode=case.train_mode)
    x, target, want, outcome.redraws = draw_inputs(case, reference)
    mode = "train" if case.train_mode else "eval"
    vanishing = set(spec.bn_cancelled_biases(config))
    derivative = direction = None
    if case.train_mode:
        rng = np.random.default_rng((case.seed, 1_000_003))
        direction = {n: rng.standard_normal(spec.param_shapes(config)[n][0]) for n in spec.trainable_names(config)}
        derivative = directional_derivative(config, weights, x, target, direction)
    results: dict[str, Outputs] = {}
    for fw in frameworks:
        got = results[fw] = run_framework(fw, case, weights, x, target)
        tag = f"{fw} vs numpy float64 reference, {mode} mode, {case!r}"
        assert got.heatmaps.shape == want.shape, f"{tag}: heatmaps {got.heatmaps.shape} != {want.shape}"
        error = max(rel(got.heatmaps[s], want[s]) for s in range(config.num_stacks))
        outcome.note(f"heatmaps vs numpy ({mode})", error, tag)
        assert error <= FP64_RTOL, f"{tag}: heatmaps relative error {error:.3e} > {FP64_RTOL:.0e}"
        if case.train_mode:
            assert got.loss is not None and got.grads is not None and direction is not None
            error = rel(got.loss, float(loss(want, target)))
            outcome.note("loss vs numpy", error, tag)
            assert error <= FP64_RTOL, f"{tag}: loss relative error {error:.3e}"
            analytic = sum(float(np.sum(got.grads[n] * direction[n])) for n in direction)
            error = rel(analytic, derivative)
            outcome.note("<grad, d> vs complex step", error, tag)
            assert error <= FP64_RTOL, f"{tag}: <grad, d> = {analytic!r}, complex step {derivative!r}: {error:.3e}"
    for a, b in itertools.combinations(frameworks, 2):
        ra, rb, tag = results[a], results[b], f"{a} vs {b}, {mode} mode, {case!r}"
        error = max(rel(ra.heatmaps[s], rb.heatmaps[s]) for s in range(config.num_stacks))
        outcome.note(f"heatmaps between frameworks ({mode})", error, tag)
        assert error <= FP64_RTOL, f"{tag}: heatmaps relative error {error:.3e} > {FP64_RTOL:.0e}"
        if case.train_mode:
            assert ra.loss is not None and rb.loss is not None and ra.grads is not None and rb.grads is not None
            error = rel(ra.loss, rb.loss)
            outcome.note("loss between frameworks", error, tag)
            assert error <= FP64_RTOL, f"{tag}: loss relative error {error:.3e}"
            check_grads(ra.grads, rb.grads, vanishing, tag, outcome)
    return outcome
