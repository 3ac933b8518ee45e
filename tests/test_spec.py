"""The framework-free core: config validation, the layer walk, analytic counts, weights, the registry."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import impls
from impls import ConfigError, HourglassConfig, base, spec, stages
from tests.conftest import SMALL_CONFIGS

ALL_CONFIGS = {**SMALL_CONFIGS, "seed": impls.PRESETS["seed"], "newell": impls.PRESETS["newell"]}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_count_params_closed_form_equals_layer_walk(name: str) -> None:
    config = ALL_CONFIGS[name]
    walked = sum(int(np.prod(shape)) for shape, trainable in spec.param_shapes(config).values() if trainable)
    assert impls.count_params(config) == walked


def test_count_params_seed_preset_by_hand() -> None:
    """The seed network counted by hand from the architecture text, block by block."""
    def res(c_in: int, c_out: int) -> int:  # postact, no conv bias, BN scale+offset
        m = c_out // 4
        n = c_in * m + 2 * m + 9 * m * m + 2 * m + m * c_out + 2 * c_out
        return n + (c_in * c_out + 2 * c_out if c_in != c_out else 0)

    stem = 7 * 7 * 3 * 64 + 2 * 64 + res(64, 128) + res(128, 128) + res(128, 256)
    hourglass = 13 * res(256, 256)  # depth 4: 3 residuals per level + the innermost one
    head = res(256, 256) + 256 * 256 + 2 * 256 + 256 * 68 + 68
    merge = 256 * 256 + 256 + 68 * 256 + 256
    assert impls.count_params(impls.PRESETS["seed"]) == stem + 4 * (hourglass + head) + 3 * merge


def test_same_padding_is_asymmetric_for_stride_two() -> None:
    assert spec.same_padding(256, 7, 2) == (2, 3)
    assert spec.same_padding(64, 3, 1) == (1, 1)
    assert spec.same_padding(64, 1, 1) == (0, 0)
    stem_conv = spec.convs(impls.PRESETS["seed"])[0]
    assert stem_conv.pad == ((2, 3), (2, 3))
    assert spec.convs(impls.PRESETS["newell"])[0].pad == ((3, 3), (3, 3))


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_layer_walk_shapes_are_consistent(name: str) -> None:
    config = ALL_CONFIGS[name]
    conv_list = spec.convs(config)
    h, w = config.input_hw
    assert conv_list[0].out_hw == (h // 2, w // 2)
    heads = [c for c in conv_list if c.name.endswith("heatmap_conv") and c.name.startswith("head_")]
    assert len(heads) == config.num_stacks
    assert all(c.out_hw == config.heatmap_hw and c.c_out == config.num_keypoints for c in heads)
    merges = [c for c in conv_list if c.name.startswith("merge_")]
    assert len(merges) == 2 * (config.num_stacks - 1)
    innermost = f"hourglass_0{'.low2' * config.depth}.conv2"
    conv2 = next(c for c in conv_list if c.name == innermost)
    assert conv2.out_hw == (h // 4 // 2**config.depth, w // 4 // 2**config.depth)


def test_count_flops_scales_with_batch_and_phase() -> None:
    config = impls.PRESETS["tiny"]
    one = impls.count_flops(config)
    assert impls.count_flops(config, batch_size=8) == 8 * one
    first = spec.convs(config)[0].macs_per_image * 2
    assert impls.count_flops(config, phase="forward_backward") == 3 * one - first
    with pytest.raises(ValueError, match="phase"):
        impls.count_flops(config, phase="backward")


def test_count_flops_seed_stem_conv_by_hand() -> None:
    """The stem conv alone: 128x128 outputs, each a 7x7x3 window into 64 channels."""
    stem = spec.convs(impls.PRESETS["seed"])[0]
    assert 2 * stem.macs_per_image == 2 * 128 * 128 * 7 * 7 * 3 * 64


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"input_hw": (250, 256)}, r"250x256 is not divisible by 4 \* 2\^depth = 64"),
        ({"depth": 0}, "depth must be a positive integer, got 0"),
        ({"num_stacks": -1}, "num_stacks must be a positive integer, got -1"),
        ({"channels": 20}, "channels must be a multiple of 8"),
        ({"block": "dense"}, "block must be one of postact, preact, got 'dense'"),
        ({"stem_pool": "min"}, "stem_pool must be one of avg, max"),
        ({"padding": "valid"}, "padding must be one of same, symmetric"),
        ({"input_hw": (64,)}, r"input_hw must be a \(height, width\) tuple"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        impls.PRESETS["seed"].replace(**changes)


def test_config_is_frozen_and_non_square_allowed() -> None:
    config = HourglassConfig(input_hw=(128, 192), depth=3)
    assert config.heatmap_hw == (32, 48)
    with pytest.raises(AttributeError):
        config.depth = 2  # type: ignore[misc]


def test_get_preset_unknown_lists_choices() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'big'; choose one of: seed, newell, tiny"):
        impls.get_preset("big")


def test_init_weights_is_deterministic_and_canonical() -> None:
    config = SMALL_CONFIGS["tiny_preact"]
    a, b, c = impls.init_weights(config, 0), impls.init_weights(config, 0), impls.init_weights(config, 1)
    assert sorted(a) == sorted(spec.param_shapes(config))
    for name, (shape, _) in spec.param_shapes(config).items():
        assert a[name].shape == shape and a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["stem.conv.kernel"], c["stem.conv.kernel"])
    assert np.all(a["stem.bn.var"] > 0)


def test_check_weights_names_missing_entries() -> None:
    config = SMALL_CONFIGS["tiny"]
    weights = impls.init_weights(config)
    del weights["stem.bn.scale"]
    with pytest.raises(ValueError, match=r"missing \['stem.bn.scale'\]"):
        spec.check_weights(config, weights)


def test_canonical_name_accepts_aliases() -> None:
    assert impls.canonical_name("PyTorch") == "torch"
    assert impls.canonical_name("tf") == "tensorflow"
    assert impls.canonical_name("jax") == "jax"
    with pytest.raises(impls.UnknownFrameworkError, match="unknown framework 'mxnet'; choose one of: torch"):
        impls.canonical_name("mxnet")


def test_load_missing_framework_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    assert not impls.is_installed("jax")
    with pytest.raises(impls.FrameworkNotInstalledError, match=r"pip install '\.\[jax\]'"):
        impls.load("jax")


def test_import_impls_imports_no_framework() -> None:
    code = "import sys, impls; impls.installed_frameworks(); print(sorted({'torch','tensorflow','jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["tiny", "nonsquare_preact"])
def test_random_batch_draws_x_then_target_from_one_seeded_generator(name: str) -> None:
    """The draw every framework's benchmark step used before it was shared: x first, then the target."""
    config = SMALL_CONFIGS[name]
    rng = np.random.default_rng(7)
    want_x = rng.standard_normal((3, *config.input_hw, 3), dtype=np.float32)
    want_target = rng.standard_normal((3, *config.heatmap_hw, config.num_keypoints), dtype=np.float32)
    x, target = spec.random_batch(config, 3, seed=7)
    assert x.dtype == target.dtype == np.float32
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(target, want_target)
    assert not np.array_equal(spec.random_batch(config, 3, seed=8)[0], x)


def test_probe_arrays_draw_input_then_kernel_and_a_then_b() -> None:
    rng = np.random.default_rng(3)
    want_x = rng.standard_normal((2, 8, 6, 4), dtype=np.float32)
    want_kernel = rng.standard_normal((3, 3, 4, 5), dtype=np.float32)
    x, kernel = spec.conv_probe_arrays((2, 8, 6, 4), 5, 3, seed=3)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(kernel, want_kernel)
    rng = np.random.default_rng(3)
    want_a, want_b = rng.standard_normal((7, 4), dtype=np.float32), rng.standard_normal((4, 9), dtype=np.float32)
    a, b = spec.gemm_probe_arrays(7, 4, 9, seed=3)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b, want_b)


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
@pytest.mark.parametrize("phase", impls.PHASES)
def test_stage_plan_reads_only_tensors_written_before(name: str, phase: str) -> None:
    config = ALL_CONFIGS[name]
    plan = stages.stage_plan(config, phase)
    written = {stages.IMAGE}
    for stage in plan:
        assert set(stage.inputs) <= written, f"{stage.name} reads {set(stage.inputs) - written} before any stage writes it"
        assert not set(stage.outputs) & written, f"{stage.name} overwrites {set(stage.outputs) & written}"
        written |= set(stage.outputs)
    names = [stage.name for stage in plan]
    assert names[: len(stages.stage_names(config))] == stages.stage_names(config)
    assert (names[-1] == "loss") == (phase == "forward_backward")
    # every stage is a top-level block whose parameters carry its name: the plan and the spec agree
    assert {stages.stage_of(conv.name) for conv in spec.convs(config)} == set(stages.stage_names(config))


def test_stage_plan_loss_reads_every_stacks_heatmaps() -> None:
    config = SMALL_CONFIGS["nonsquare_preact"]  # 3 stacks
    loss = stages.stage_plan(config, "forward_backward")[-1]
    assert loss == stages.Stage("loss", ("heatmaps_0", "heatmaps_1", "heatmaps_2"), ("loss",))
    assert stages.stage_plan(config)[3] == stages.Stage("merge_0", ("x_0", "previous_0", "heatmaps_0"), ("x_1",))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: base.check_step_args("backward", 1), ValueError,
         r"unknown phase 'backward'; choose one of: forward, forward_backward"),
        (lambda: base.check_step_args("forward", 0), ValueError,
         r"batch_size must be a positive integer, got 0; pass the number of images per step"),
        (lambda: base.check_step_args("forward", True), ValueError, r"batch_size must be a positive integer, got True"),
        (lambda: base.check_device_args("jax", "fp8", "cpu", lambda: True), ValueError,
         r"unknown precision 'fp8'; choose one of: fp32, bf16"),
        (lambda: base.check_device_args("jax", "fp32", "tpu", lambda: True), ValueError,
         r"unknown device 'tpu'; choose one of: cpu, gpu"),
        (lambda: base.check_device_args("jax", "fp32", "gpu", lambda: False), RuntimeError,
         r"no GPU visible to jax; use --device cpu"),
        (lambda: base.check_build_args("jax", ("jit",), "eager", "fp32", "cpu", lambda: False), ValueError,
         r"unknown execution 'eager' for jax; choose one of: jit"),
        (lambda: base.check_build_args("torch", ("eager",), "eager", "fp32", "cpu", lambda: False, {"fast": 1},
                                       ("channels_last",)), ValueError,
         r"unknown build option\(s\) fast for torch; it takes only channels_last; remove them"),
        (lambda: base.check_profile_args("jax", ("jit",), lambda: False, phase="forward", batch_size=1,
                                         execution="jit", precision="fp32", device="cpu", warmup=-1, steps=1,
                                         top_k=1), ValueError,
         r"warmup must be an integer >= 0, got -1; pass 0 to profile without warm-up steps"),
        (lambda: base.check_profile_args("jax", ("jit",), lambda: False, phase="forward", batch_size=1,
                                         execution="jit", precision="fp32", device="cpu", warmup=0, steps=1,
                                         top_k=0), ValueError,
         r"top_k must be a positive integer, got 0; keep at least one row of the op table"),
    ],
)  # fmt: skip
def test_argument_checks_say_what_was_given_expected_and_the_fix(call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()
