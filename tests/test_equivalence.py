"""Proof that the three implementations are one computation.

Every installed framework is checked against an independent float64 numpy forward pass and against
every other installed framework, on one canonical weight set, for small configs covering both block
variants, both paddings and a non-square input. Inputs are drawn fresh per test (seed in the messages).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import impls
from impls import spec
from tests.conftest import (
    FP32_EVAL_HEATMAP_RTOL,
    FP32_GRAD_RTOL,
    FP32_LOSS_RTOL,
    FP32_TRAIN_HEATMAP_RTOL,
    SMALL_CONFIGS,
    Draw,
    assert_close,
    assert_grads_close,
    require_gpu,
    vanishing_grads,
)
from tests.numpy_reference import NumpyHourglass

# ||a-b||/||b|| of heatmaps (per stack, or all stacks), fp32 against float64 or another framework; the loss;
# gradients per parameter (assert_grads_close). Set from measurement: tests/conftest.py.
HEATMAP_TOL = {False: FP32_EVAL_HEATMAP_RTOL, True: FP32_TRAIN_HEATMAP_RTOL}  # by train_mode
GRAD_TOL = FP32_GRAD_RTOL


def _installed() -> list[str]:
    return list(impls.installed_frameworks())


def test_num_params_equals_analytic_count(backend, config) -> None:
    model = backend.build(config)
    assert model.num_params() == impls.count_params(config)


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_heatmaps_match_numpy_reference(backend, config, draw: Draw, train_mode: bool) -> None:
    weights = impls.init_weights(config, seed=draw.seed % 1000)
    x, _ = draw.inputs(config)
    model = backend.build(config, weights=weights)
    got = model.predict(x, train_mode=train_mode)
    want = NumpyHourglass(config, weights, train_mode=train_mode)(x)
    h, w = config.heatmap_hw
    assert got.shape == (config.num_stacks, 2, h, w, config.num_keypoints)
    assert got.dtype == np.float32
    for s in range(config.num_stacks):
        assert_close(got[s], want[s], HEATMAP_TOL[train_mode], f"{backend.FRAMEWORK} stack {s} (seed {draw.seed})")


def test_loss_matches_numpy_reference(backend, config, draw: Draw) -> None:
    weights = impls.init_weights(config, seed=1)
    x, target = draw.inputs(config)
    loss, _ = backend.build(config, weights=weights).loss_and_grads(x, target)
    want = spec.loss_numpy(NumpyHourglass(config, weights, train_mode=True)(x), target)
    assert isinstance(loss, float)
    assert abs(loss - want) / abs(want) <= FP32_LOSS_RTOL, f"loss {loss} vs reference {want} (seed {draw.seed})"


def test_grads_cover_every_trainable_parameter(backend, config, draw: Draw) -> None:
    x, target = draw.inputs(config)
    _, grads = backend.build(config).loss_and_grads(x, target)
    shapes = spec.param_shapes(config)
    assert sorted(grads) == sorted(spec.trainable_names(config))
    for name, g in grads.items():
        assert g.shape == shapes[name][0], name
        assert g.dtype == np.float32, name
        assert np.all(np.isfinite(g)), name
    # A parameter the loss does not reach gets a zero gradient. Only biases may vanish: those fed straight
    # into a train-mode BN always do; in pre-activation networks a per-channel constant also passes
    # identity skips, 1x1 convs and pooling unchanged into a later BN. Post-activation ReLUs stop that.
    vanishing = set(vanishing_grads(grads))
    assert set(spec.bn_cancelled_biases(config)) <= vanishing
    assert all(n.endswith(".bias") for n in vanishing), sorted(vanishing)
    assert not any(n.startswith("head_") and n.endswith("heatmap_conv.bias") for n in vanishing)
    if config.block == "postact":
        assert vanishing == set(spec.bn_cancelled_biases(config))


def test_grads_match_finite_difference_of_numpy_reference(backend, draw: Draw) -> None:
    """The gradient is right, not only consistent: <grad, d> equals a float64 difference quotient along d.

    ReLU and max pooling make the loss piecewise smooth, and a random direction often crosses a kink
    within 1e-7 of the weights (rarely within 1e-9). Where the two one-sided slopes agree, the central difference is
    used; where they do not, a kink lies on one side and the other side's slope is the derivative at the
    weights themselves, so the gradient must match one of them.
    """
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=2)
    # Away from kinks: within fp32 rounding of a ReLU or max-pool kink the fp32 gradient may take the other
    # side's slope than the float64 reference (seen in a CI rehearsal: TensorFlow 1.1% off, seed 1007085518).
    x, target = draw.inputs_away_from_kinks(config, weights)
    _, grads = backend.build(config, weights=weights).loss_and_grads(x, target)
    eps = 1e-9  # float64 reference: rounding stays near 1e-5 of the slope, and few kinks lie this close
    direction = {n: draw.rng.standard_normal(weights[n].shape) for n in grads}

    def loss_at(step: float) -> float:
        moved = {n: (w.astype(np.float64) + step * direction[n] if n in direction else w) for n, w in weights.items()}
        return spec.loss_numpy(NumpyHourglass(config, moved, train_mode=True)(x), target)

    f_minus, f_zero, f_plus = loss_at(-eps), loss_at(0.0), loss_at(eps)
    forward, backward = (f_plus - f_zero) / eps, (f_zero - f_minus) / eps
    smooth = abs(forward - backward) <= 1e-4 * abs(forward + backward)
    candidates = [(f_plus - f_minus) / (2 * eps)] if smooth else [forward, backward]
    analytic = sum(float(np.sum(grads[n].astype(np.float64) * direction[n])) for n in grads)
    errors = [abs(analytic - c) / abs(c) for c in candidates]
    assert min(errors) <= GRAD_TOL, f"<grad, d> = {analytic} vs {candidates} (seed {draw.seed})"


def test_frameworks_agree_on_heatmaps_loss_and_grads(config, draw: Draw) -> None:
    names = _installed()
    if len(names) < 2:
        pytest.skip(f"needs two installed frameworks, found {names}")
    weights = impls.init_weights(config, seed=3)
    x, target = draw.inputs_away_from_kinks(config, weights)
    results = {}
    for name in names:
        backend = impls.load(name)
        eval_maps = backend.build(config, weights=weights).predict(x)
        train_maps = backend.build(config, weights=weights).predict(x, train_mode=True)
        loss, grads = backend.build(config, weights=weights).loss_and_grads(x, target)
        results[name] = (eval_maps, train_maps, loss, grads)
    for a, b in itertools.combinations(names, 2):
        (ea, ta, la, ga), (eb, tb, lb, gb) = results[a], results[b]
        tag = f"{a} vs {b} (seed {draw.seed})"
        assert_close(ea, eb, HEATMAP_TOL[False], f"eval heatmaps {tag}")
        assert_close(ta, tb, HEATMAP_TOL[True], f"train heatmaps {tag}")
        assert abs(la - lb) / abs(lb) <= FP32_LOSS_RTOL, f"loss {la} vs {lb}, {tag}"
        assert_grads_close(ga, gb, GRAD_TOL, tag)


def _compiled_modes() -> list[tuple[str, str]]:
    """(framework, execution) for every non-default execution mode; the default is checked above."""
    out = []
    for name in impls.FRAMEWORKS:
        if impls.is_installed(name):
            out += [(name, e) for e in impls.load(name).EXECUTIONS[1:]]
    return out


@pytest.mark.parametrize(("framework", "execution"), _compiled_modes())
def test_compiled_mode_matches_eager(framework: str, execution: str, draw: Draw) -> None:
    backend = impls.load(framework)
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=4)
    x, target = draw.inputs_away_from_kinks(config, weights)
    eager = backend.build(config, weights=weights)
    compiled = backend.build(config, weights=weights, execution=execution)
    tag = f"{framework} {execution} vs {backend.EXECUTIONS[0]} (seed {draw.seed})"
    assert_close(compiled.predict(x), eager.predict(x), HEATMAP_TOL[False], f"eval heatmaps {tag}")
    assert_close(compiled.predict(x, train_mode=True), eager.predict(x, train_mode=True), HEATMAP_TOL[True], f"train heatmaps {tag}")
    loss_c, grads_c = compiled.loss_and_grads(x, target)
    loss_e, grads_e = eager.loss_and_grads(x, target)
    assert abs(loss_c - loss_e) / abs(loss_e) <= FP32_LOSS_RTOL, tag
    assert_grads_close(grads_c, grads_e, GRAD_TOL, tag)


def test_compiled_mode_jax_jit_matches_unjitted(draw: Draw) -> None:
    """JAX's only mode is jit; check it against the same functions run op by op."""
    if not impls.is_installed("jax"):
        pytest.skip("jax is not installed")
    import jax  # only this test needs it

    backend = impls.load("jax")
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=5)
    x, target = draw.inputs_away_from_kinks(config, weights)
    jitted = backend.build(config, weights=weights).loss_and_grads(x, target)
    with jax.disable_jit():
        plain = backend.build(config, weights=weights).loss_and_grads(x, target)
    assert abs(jitted[0] - plain[0]) / abs(plain[0]) <= FP32_LOSS_RTOL
    assert_grads_close(jitted[1], plain[1], GRAD_TOL, f"jit vs op by op (seed {draw.seed})")


def test_export_weights_round_trips_exactly(backend, config) -> None:
    weights = impls.init_weights(config, seed=6)
    exported = backend.build(config, weights=weights).export_weights()
    assert sorted(exported) == sorted(weights)
    for name, value in weights.items():
        assert exported[name].dtype == np.float32, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    again = backend.build(config, weights=exported).export_weights()
    for name, value in weights.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_train_step_updates_running_statistics(backend, draw: Draw) -> None:
    """Running means follow new = 0.9 * old + 0.1 * batch mean in every framework (variance: see README)."""
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=7)
    x, target = draw.inputs(config)
    model = backend.build(config, weights=weights)
    model.loss_and_grads(x, target)
    after = model.export_weights()
    # The stem BN sees relu-free conv outputs of x: its batch mean is computable from the reference.
    ref = NumpyHourglass(config, weights)
    conv_out = ref.conv("stem.conv", x.astype(np.float64), stride=2)
    want = spec.BN_DECAY * weights["stem.bn.mean"] + (1 - spec.BN_DECAY) * conv_out.mean(axis=(0, 1, 2))
    assert_close(after["stem.bn.mean"], want, 1e-4, f"{backend.FRAMEWORK} running mean (seed {draw.seed})")
    assert not np.array_equal(after["stem.bn.var"], weights["stem.bn.var"])


def test_bf16_predict_stays_close_to_fp32(backend, draw: Draw) -> None:
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=8)
    x, _ = draw.inputs(config)
    fp32 = backend.build(config, weights=weights).predict(x)
    bf16 = backend.build(config, weights=weights, precision="bf16").predict(x)
    assert bf16.dtype == np.float32
    assert_close(bf16, fp32, 0.1, f"{backend.FRAMEWORK} bf16 vs fp32 (seed {draw.seed})")


def test_build_rejects_unknown_execution_and_precision(backend) -> None:
    config = SMALL_CONFIGS["tiny"]
    with pytest.raises(ValueError, match="execution"):
        backend.build(config, execution="warp-speed")
    with pytest.raises(ValueError, match="precision"):
        backend.build(config, precision="fp8")


def test_build_rejects_weights_of_another_config(backend) -> None:
    config = SMALL_CONFIGS["tiny"]
    other = impls.init_weights(config.replace(channels=24))
    with pytest.raises(ValueError, match="shape"):
        backend.build(config, weights=other)


@pytest.mark.parametrize("phase", impls.PHASES)
def test_benchmark_step_never_updates_parameters(backend, phase: str) -> None:
    """A timed step computes (and for forward_backward, differentiates) but applies no optimizer update."""
    config = SMALL_CONFIGS["tiny"]
    model = backend.build(config)
    before = model.export_weights()
    step = model.benchmark_step(phase, batch_size=2)
    assert step() is None
    step()
    after = model.export_weights()
    for name in spec.trainable_names(config):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.gpu
def test_gpu_predict_matches_cpu(backend, draw: Draw) -> None:
    require_gpu(backend)
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=9)
    x, _ = draw.inputs(config)
    cpu = backend.build(config, weights=weights).predict(x)
    gpu = backend.build(config, weights=weights, device="gpu").predict(x)
    # GPUs may use TF32 for convolutions by default; 1e-2 bounds that, fp32 proper gives ~1e-6.
    assert_close(gpu, cpu, 1e-2, f"{backend.FRAMEWORK} gpu vs cpu (seed {draw.seed})")


def test_tensorflow_bn_batch_statistics_keep_float32_accuracy_on_large_maps() -> None:
    """TensorFlow's BN sums its batch statistics one axis at a time (impls.tensorflow_hourglass.batch_moments):
    tf.nn.moments' single reduction over N*H*W adds the rows in turn and was 2.3e-6 off on these 131072 rows
    per channel, 20x torch's and JAX's error; summed by axis it is ~1e-7."""
    if not impls.is_installed("tensorflow"):
        pytest.skip("tensorflow is not installed")
    import tensorflow as tf

    x = (np.random.default_rng(0).standard_normal((16, 64, 64, 32)) + 0.5).astype(np.float32)  # (N, H, W, C)
    mean, var = impls.load("tensorflow").batch_moments(tf.constant(x))
    x64 = x.astype(np.float64)
    want_mean, want_var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    assert np.max(np.abs(mean.numpy() - want_mean) / np.abs(want_mean)) < 5e-7
    assert np.max(np.abs(var.numpy() - want_var) / want_var) < 5e-7
