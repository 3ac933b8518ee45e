"""The implementation variants are what they claim: the tuned ones really reformulate, in every place the
README says, and nowhere else.

The equivalence tests (tests/test_equivalence.py, tests/test_fp64_proof.py) build every variant and prove it
computes the same network; they would pass just as well if a "tuned" variant were the idiomatic code under
another name. These tests look inside the built models and count the reformulated layers against impls.spec.
"""

from __future__ import annotations

import numpy as np
import pytest

import impls
from impls import spec
from tests.conftest import SMALL_CONFIGS, Draw, assert_close


def _pointwise(config: impls.HourglassConfig) -> int:
    """How many of the spec's convolutions are 1x1 with stride 1 (the ones JAX's tuned variant writes as dots)."""
    return sum(1 for c in spec.convs(config) if c.kernel_size == 1 and c.stride == 1)


def _same_padded(config: impls.HourglassConfig) -> int:
    """How many of the spec's convolutions pad exactly as TensorFlow's padding="SAME" would."""
    return sum(
        1 for c in spec.convs(config)
        if c.pad == tuple(spec.same_padding(c.in_hw[a], c.kernel_size, c.stride) for a in range(2))
    )  # fmt: skip


def test_every_framework_offers_its_variants_and_rejects_an_unknown_one() -> None:
    assert impls.DEFAULT_IMPL == "idiomatic" and all(v[0] == "idiomatic" for v in impls.IMPLS.values())
    for fw in impls.installed_frameworks():
        backend = impls.load(fw)
        assert backend.IMPLS == impls.IMPLS[fw]
        with pytest.raises(ValueError, match=f"unknown impl 'fastest' for {fw}; choose one of: "):
            backend.build(SMALL_CONFIGS["tiny"], impl="fastest")


@pytest.mark.parametrize("name", ["tiny", "tiny_preact"])
def test_jax_tuned_writes_every_pointwise_conv_as_a_dot_and_nothing_else(name: str) -> None:
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    from flax import nnx

    from impls import jax_hourglass

    config = SMALL_CONFIGS[name]
    counts = {}
    for impl in ("idiomatic", "tuned"):
        module = jax_hourglass.build(config, impl=impl).module()
        nodes = [node for _, node in nnx.iter_graph(module)]
        counts[impl] = (sum(isinstance(n, jax_hourglass.PointwiseConv) for n in nodes),
                        sum(isinstance(n, nnx.Conv) for n in nodes))  # fmt: skip
    total = len(spec.convs(config))
    assert counts["idiomatic"] == (0, total)
    assert counts["tuned"] == (_pointwise(config), total - _pointwise(config)) and _pointwise(config) > total // 2


@pytest.mark.parametrize("name", ["tiny", "tiny_preact"])
def test_tensorflow_tuned_names_same_padding_and_fuses_batch_norm(name: str) -> None:
    pytest.importorskip("tensorflow")
    from impls import tensorflow_hourglass as tfh

    config = SMALL_CONFIGS[name]
    for impl, precision, execution in (("idiomatic", "fp32", "function"), ("tuned", "fp32", "function"),
                                       ("tuned", "fp64", "function"), ("tuned", "fp32", "xla")):  # fmt: skip
        net = tfh.build(config, impl=impl, precision=precision, execution=execution).net
        convs = [m for m in net.submodules if isinstance(m, tfh.Conv2d)]
        bns = [m for m in net.submodules if isinstance(m, tfh.BatchNorm2d)]
        assert len(convs) == len(spec.convs(config))
        assert len(bns) == sum(isinstance(layer, spec.BatchNormSpec) for layer in spec.layers(config))
        named = sum(c.padding == "SAME" for c in convs)
        assert named == (_same_padded(config) if impl == "tuned" else 0), (impl, precision)
        # The fused op has no float64 kernel, and XLA ran it slower: those keep the unfused batch norm.
        fused = impl == "tuned" and precision == "fp32" and execution != "xla"
        assert all(b.fused for b in bns) == fused, (impl, precision, execution)
        assert any(b.fused for b in bns) == all(b.fused for b in bns)
    # symmetric padding: the 7x7 stride-2 stem conv pads (3, 3), SAME would pad (2, 3): it stays explicit
    assert _same_padded(config) == len(spec.convs(config)) - (config.padding == "symmetric")


@pytest.mark.parametrize("train", [False, True])
def test_tensorflow_tuned_graph_runs_every_batch_norm_as_the_fused_op(train: bool) -> None:
    """The traced graph of the tuned fp32 function has one FusedBatchNormV3 per BN, in the mode asked for
    (eval: over the running statistics, which Grappler's remapper folds into the conv), and the idiomatic
    graph none: the flag on the layers is really what the graph runs."""
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    from impls import tensorflow_hourglass as tfh

    config = SMALL_CONFIGS["tiny"]
    num_bns = sum(isinstance(layer, spec.BatchNormSpec) for layer in spec.layers(config))
    x_spec = tf.TensorSpec([1, *config.input_hw, 3], tf.float32)
    for impl in ("idiomatic", "tuned"):
        model = tfh.build(config, impl=impl, execution="function")
        forward = model._forward_train if train else model._forward_eval
        ops = forward.get_concrete_function(x_spec).graph.get_operations()
        fused = [op for op in ops if op.type == "FusedBatchNormV3"]
        assert len(fused) == (num_bns if impl == "tuned" else 0), impl
        assert all(op.get_attr("is_training") == train for op in fused)


def test_tensorflow_fused_batch_norm_updates_running_statistics_with_the_biased_variance(draw: Draw) -> None:
    """FusedBatchNormV3 returns the batch variance times n/(n-1); the spec's running variance takes the biased
    one (as tf.nn.moments and flax do), so the tuned model must undo that factor before the update."""
    pytest.importorskip("tensorflow")
    from impls import tensorflow_hourglass as tfh

    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config, seed=draw.seed % 1000)
    x, _ = draw.inputs(config, batch_size=4)
    after = {}
    for impl in ("idiomatic", "tuned"):
        model = tfh.build(config, weights=weights, impl=impl)
        model.predict(x, train_mode=True)
        after[impl] = model.export_weights()
    for name in ("stem.bn.var", "stem.bn.mean", "head_1.lin_bn.var"):
        before = weights[name]
        moved = after["idiomatic"][name] - before
        assert np.abs(moved).max() > 0, name  # the update happened, so the comparison below can tell
        assert_close(after["tuned"][name], after["idiomatic"][name], 1e-5, f"{name} (seed {draw.seed})")


@pytest.mark.parametrize("name", ["tiny", "tiny_preact"])
def test_torch_tuned_folds_every_batch_norm_that_follows_a_conv_and_only_for_eval(name: str) -> None:
    """Every BN of the spec that normalises a conv's output directly is folded in the tuned eval forward
    (postact: all of them; preact: all but each block's bn1, which follows the block's input); the module
    that trains keeps them all, and the folded forward gives the idiomatic heatmaps."""
    pytest.importorskip("torch")
    from torch import nn

    from impls import torch_hourglass as th

    config = SMALL_CONFIGS[name]
    weights = impls.init_weights(config, seed=11)
    model = th.build(config, weights=weights, impl="tuned")
    folded = model._eval_fn()
    bns = [layer.name for layer in spec.layers(config) if not isinstance(layer, spec.ConvSpec)]
    left = {n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)}
    residual_bn1 = {n for n in bns if n.endswith(".bn1")}
    assert left == (residual_bn1 if config.block == "preact" else set()) and residual_bn1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.net.modules()) == len(bns)  # training is untouched
    assert all(c.bias is not None for c, _ in ((folded.get_submodule(a), b) for a, b in th.conv_bn_pairs(folded)))
    x = np.random.default_rng(0).standard_normal((2, *config.input_hw, 3)).astype(np.float32)
    idiomatic = th.build(config, weights=weights).predict(x)
    tuned = model.predict(x)
    assert_close(tuned, idiomatic, 1e-5, name)
    assert np.abs(tuned - idiomatic).max() > 0  # folding really changed the arithmetic (rounding differs)
