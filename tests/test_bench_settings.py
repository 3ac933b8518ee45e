"""Settings: parsing, defaults per device, and every bad input as a one-line error with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli
from bench.core import settings
from bench.core.settings import RunSettings, SettingsError, build_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.nvml, "gpu_present", lambda: False)


@pytest.fixture
def with_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.nvml, "gpu_present", lambda: True)


def test_parse_int_list_accepts_spaces_and_drops_repeats() -> None:
    assert settings.parse_int_list("--batch-size", " 1, 8,16,8") == (1, 8, 16)


def test_default_settings_on_cpu_measure_seed_at_batch_one_with_time_budget(cpu_only: None) -> None:
    s = build_settings()
    assert s.device == "cpu" and s.preset == "seed" and s.config.input_hw == (256, 256)
    assert s.batch_sizes == (1,) and s.phases == ("forward", "forward_backward")
    assert s.min_time_s is not None and s.iters is not None
    # Every framework with its compiled modes: comparing one framework's best against another's eager
    # mode would be unfair. TensorFlow's eager mode (a debugging mode) is left out of the CPU default.
    assert dict(s.executions) == {**settings.EXECUTIONS, "tensorflow": ("function", "xla")}


def test_default_settings_on_gpu_use_the_seed_batch_and_every_execution(with_gpu: None) -> None:
    s = build_settings()
    assert s.device == "gpu" and s.batch_sizes == (16,)
    assert dict(s.executions) == settings.EXECUTIONS


def test_protocol_seed_reproduces_the_seed_loop(cpu_only: None) -> None:
    s = build_settings(protocol="seed")
    assert (s.batch_sizes, s.warmup + 1, s.iters, s.min_time_s) == ((16,), 10, 100, None)


def test_iters_alone_gives_an_exact_count(cpu_only: None) -> None:
    s = build_settings(iters="3")
    assert (s.iters, s.min_time_s) == (3, None)


def test_execution_items_resolve_per_framework(cpu_only: None) -> None:
    s = build_settings(framework="torch,tf,jax", execution="eager,xla,jax:jit,torch:compile")
    assert dict(s.executions) == {"torch": ("eager", "compile"), "tensorflow": ("eager", "xla"), "jax": ("jit",)}


def test_config_overrides_replace_preset_fields(cpu_only: None) -> None:
    s = build_settings(preset="tiny", stacks="3", channels="24", keypoints="7", input_size="32x48")
    assert (s.config.num_stacks, s.config.channels, s.config.num_keypoints, s.config.input_hw) == (3, 24, 7, (32, 48))


def test_run_settings_round_trip_through_dict(cpu_only: None) -> None:
    s = build_settings(preset="tiny", batch_size="1,2", precision="fp32,bf16")
    assert RunSettings.from_dict(s.to_dict()) == s


def test_cells_cover_the_product_in_stable_order(cpu_only: None) -> None:
    s = build_settings(framework="torch", execution="all", batch_size="1,2", phase="forward", impl="idiomatic")
    assert [c.cell_id for c in s.cells()] == [
        "torch-eager-fp32-b1-forward", "torch-eager-fp32-b2-forward",
        "torch-compile-fp32-b1-forward", "torch-compile-fp32-b2-forward",
    ]  # fmt: skip


def test_impl_variants_resolve_per_framework_and_name_only_the_non_default_cells(cpu_only: None) -> None:
    s = build_settings(framework="all", preset="tiny", execution="default", phase="forward", impl="all")
    assert dict(s.impls) == {fw: settings.IMPLS[fw] for fw in settings.FRAMEWORKS}
    ids = [c.cell_id for c in s.cells()]
    # The default variant keeps the cell ids of runs made before variants existed, so they stay comparable.
    assert "tensorflow-eager-fp32-b1-forward" in ids and "tensorflow-tuned-eager-fp32-b1-forward" in ids
    assert ids.index("tensorflow-eager-fp32-b1-forward") < ids.index("tensorflow-tuned-eager-fp32-b1-forward")
    assert len(ids) == sum(len(v) for v in settings.IMPLS.values())
    items = build_settings(framework="tf,jax", impl="idiomatic,jax:tuned")
    assert dict(items.impls) == {"tensorflow": ("idiomatic",), "jax": ("idiomatic", "tuned")}
    assert dict(build_settings(framework="tf,jax", impl="tuned").impls) == {"tensorflow": ("tuned",), "jax": ("tuned",)}


def test_the_default_run_measures_every_variant_the_tuned_ones_in_their_fastest_execution(cpu_only: None) -> None:
    s = build_settings(preset="tiny", phase="forward")
    assert all(s.impls_of(fw) == ("idiomatic", "tuned") for fw in s.frameworks)
    tuned = [c.cell_id for c in s.cells() if c.impl == "tuned"]
    assert tuned == ["torch-tuned-eager-fp32-b1-forward", "tensorflow-tuned-function-fp32-b1-forward",
                     "jax-tuned-jit-fp32-b1-forward"]  # fmt: skip
    idiomatic = [c for c in s.cells() if c.impl == "idiomatic"]
    # every execution but TensorFlow's eager (a debugging mode: `--execution all` adds it)
    assert len(idiomatic) == sum(len(ex) for ex in settings.EXECUTIONS.values()) - 1
    assert "tensorflow-eager-fp32-b1-forward" not in {c.cell_id for c in idiomatic}
    assert "eager" in build_settings(preset="tiny", execution="all").executions["tensorflow"]
    assert RunSettings.from_dict(s.to_dict()) == s
    # --impl all: the full matrix; an --execution without the tuned one's drops that variant
    full = build_settings(preset="tiny", phase="forward", impl="all")
    assert len(full.cells()) == 2 * len(idiomatic) and not full.variant_executions
    compiled = build_settings(framework="torch", preset="tiny", phase="forward", execution="compile")
    assert compiled.impls_of("torch") == ("idiomatic",) and len(compiled.cells()) == 1


def test_records_made_before_variants_or_their_narrowing_read_as_they_ran(cpu_only: None) -> None:
    s = build_settings(preset="tiny", impl="idiomatic")
    record = s.to_dict()
    del record["impls"], record["variant_executions"]  # a run.json written before variants existed
    old = RunSettings.from_dict(record)
    assert [c.cell_id for c in old.cells()] == [c.cell_id for c in s.cells()]
    tuned = build_settings(framework="jax", preset="tiny", impl="all")
    assert RunSettings.from_dict(tuned.to_dict()) == tuned


BAD_INPUTS = [
    (["--framework", "mxnet"], "unknown framework 'mxnet'"),
    (["--framework", "torch,"], "comma-separated list"),
    (["--framework", "all,torch"], "'all' stands alone; give all or a list such as torch,jax, got 'all,torch'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got '0'"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer, got '-4'"),
    (["--batch-size", "1,,8"], "comma-separated list such as 1,8,16, got '1,,8'"),
    (["--batch-size", "eight"], "got 'eight'"),
    (["--iters", "-1"], "--iters must be a positive integer"),
    (["--warmup", "-2"], "--warmup must be an integer >= 0"),
    (["--min-time", "0"], "--min-time must be a positive number"),
    (["--timeout", "nan"], "--timeout must be a positive number"),
    (["--stacks", "0"], "--stacks must be a positive integer"),
    (["--input-size", "100"], "not divisible by 4 \\* 2\\^depth = 64"),
    (["--preset", "tiny", "--depth", "5"], "not divisible"),
    (["--input-size", "32x"], "--input-size must be SIZE or HEIGHTxWIDTH"),
    (["--channels", "12"], "channels must be a multiple of 8"),
    (["--phase", "backward"], "unknown value 'backward'"),
    (["--precision", "fp16"], "unknown value 'fp16'"),
    (["--execution", "torch:xla"], "torch has no execution 'xla'"),
    (["--execution", "turbo"], "unknown execution 'turbo'"),
    (["--framework", "torch,jax", "--execution", "eager"], "gives jax nothing to run .*; add one, e.g. jax:jit"),
    (["--impl", "fastest"], "unknown variant 'fastest'; choose from idiomatic, tuned, default or all"),
    (["--impl", "torch:tuned"], "gives tensorflow nothing to run .*; add one, e.g. tensorflow:idiomatic"),
    (["--framework", "jax", "--impl", "tf:tuned"], "names tensorflow, which is not in --framework"),
    (["--device", "tpu"], "--device must be one of auto, cpu, gpu"),
    (["--device", "gpu"], "--device gpu: no GPU is visible"),
    (["--protocol", "seed", "--iters", "5"], "drop --iters"),
    (["--protocol", "fast"], "--protocol must be one of"),
    (["--resume", "/nonexistent"], "not a run directory"),
    (["--resume", "x", "--iters", "2"], "drop --iters"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(
    args: list[str], message: str, cpu_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_explicit_framework_not_installed_exits_2_with_pip_command(
    monkeypatch: pytest.MonkeyPatch, cpu_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(settings, "is_installed", lambda fw: fw != "jax")
    assert cli.main(["run", "--framework", "torch,jax"]) == 2
    assert capsys.readouterr().err == "error: framework 'jax' is not installed; install it with: pip install '.[jax]'\n"


def test_bad_input_in_a_real_process_prints_no_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--batch-size", "0"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr == "error: --batch-size must be a positive integer, got '0'\n"
    assert "Traceback" not in done.stdout + done.stderr


def test_help_and_parent_modules_import_no_framework() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import bench.cli, bench.run.runner, bench.run.inventory, bench.core.rundir, bench.core.console, bench.core.envinfo\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        bench.cli.main(['run', '--help'])\n    except SystemExit:\n        pass\n"
        "bench.core.envinfo.collect([])\n"
        "loaded = {'torch', 'tensorflow', 'jax', 'flax'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_fp32_math_and_autotune_are_parsed_and_recorded(cpu_only: None) -> None:
    s = build_settings(preset="tiny", fp32_math="tf32", autotune="off")
    assert (s.fp32_math, s.autotune) == ("tf32", False)
    assert s.placement()["fp32_math"] == "tf32" and s.placement()["autotune"] is False
    assert RunSettings.from_dict(s.to_dict()) == s
    default = build_settings(preset="tiny")
    assert (default.fp32_math, default.autotune) == ("ieee", True)


@pytest.mark.parametrize(("flag", "value", "message"), [("--fp32-math", "fp16", "--fp32-math: unknown value 'fp16'"),
                                                        ("--autotune", "maybe", "--autotune must be on or off, got 'maybe'")])  # fmt: skip
def test_fp32_math_and_autotune_reject_bad_values(cpu_only: None, capsys, flag: str, value: str, message: str) -> None:
    assert cli.main(["run", "--preset", "tiny", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_a_variant_is_measured_only_in_the_phases_where_its_code_differs(cpu_only: None) -> None:
    """Torch's tuned variant folds eval-mode batch norms: its training step is the idiomatic one, so no run
    times it again under another name; asking for it alone there is bad input."""
    s = build_settings(framework="torch", preset="tiny", execution="eager")
    assert [c.cell_id for c in s.cells()] == ["torch-eager-fp32-b1-forward", "torch-eager-fp32-b1-forward_backward",
                                              "torch-tuned-eager-fp32-b1-forward"]  # fmt: skip
    training = build_settings(framework="torch", preset="tiny", phase="forward_backward")
    assert training.impls_of("torch") == ("idiomatic",)
    with pytest.raises(SettingsError, match="differs from its idiomatic one in the forward phase only"):
        build_settings(framework="torch", preset="tiny", phase="forward_backward", impl="tuned")
