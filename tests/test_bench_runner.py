"""The runner end to end on the fake backend: real worker processes, fake framework (fast).

Faults (crash, exit, OOM, hang, build error, disagreement) are injected through tests/fake_backend.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench import cli
from bench.core import settings
from bench.core.columns import SUMMARY_COLUMNS

REPO_ROOT = Path(__file__).resolve().parent.parent
# --no-report: these tests are about the runner; the report at the end of a run is tested in test_bench_report.py.
TINY = ["--preset", "tiny", "--iters", "3", "--warmup", "1", "--no-report", "--impl", "idiomatic"]  # variants: test_bench_settings



def run(out: Path, *args: str) -> tuple[int, Path]:
    """`python -m bench run` in this process (workers are real processes); returns (exit code, run dir)."""
    code = cli.main(["run", *TINY, "--out", str(out), *args])
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return code, run_dir


def summary(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "summary.csv").set_index("cell_id")


def test_runner_writes_tidy_summary_samples_and_run_json(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, run_dir = run(tmp_path, "--framework", "all", "--execution", "default")
    assert code == 0
    table = pd.read_csv(run_dir / "summary.csv")
    assert list(table.columns) == SUMMARY_COLUMNS
    model = table[table["kind"] == "model"]
    assert len(model) == 6 and set(model["status"]) == {"ok"}  # 3 frameworks x default execution x 2 phases
    calibration = table[table["kind"] == "calibration"]
    kinds = {fw: sorted(calibration[calibration["framework"] == fw]["phase"]) for fw in ("torch", "tensorflow", "jax")}
    assert kinds == {fw: ["conv3x3", "gemm", "reference_conv"] for fw in kinds}
    assert (model["num_params"] > 0).all() and model["injected_slowdown"].isna().all()
    assert (model["framework_ceiling_fraction"] >= model["ceiling_fraction"]).all()
    assert (model["n_samples"] == 3).all() and (model["warmup_calls"] == 1).all()
    assert (model["first_call_ms"] > 0).all() and (model["host_peak_rss_bytes"] > 0).all()
    assert model["latency_ms_median"].between(model["latency_ms_min"], model["latency_ms_p95"]).all()
    assert (model["ceiling_fraction"] > 0).all() and model["equivalent"].all()
    # No GPU: the GPU memory figures are empty, not zero.
    for column in ("gpu_allocator_peak_bytes", "nvml_process_used_bytes", "nvml_device_used_bytes"):
        assert model[column].isna().all(), column
    samples = pd.read_csv(run_dir / "samples.csv")
    ok = table[table["status"] == "ok"]
    assert samples.groupby("cell_id").size().to_dict() == dict.fromkeys(ok["cell_id"], 3)
    cell = model.iloc[0]
    mine = samples[samples["cell_id"] == cell["cell_id"]]["latency_ns"] / 1e6
    assert cell["latency_ms_median"] == pytest.approx(mine.median())
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["worker_env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert record["settings"]["preset"] == "tiny" and record["settings"]["iters"] == 3
    assert {"utc_time", "cpu_model", "ram_bytes", "git", "packages", "python"} <= set(record["environment"])
    assert record["command_line"].startswith("python -m bench run --preset tiny")
    assert set(record["frameworks"]) == {"torch", "tensorflow", "jax"}
    assert all(e["equivalent"] for e in record["equivalence"]["frameworks"].values())


def test_runner_worker_crash_becomes_failed_row_and_run_goes_on(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "crash@torch/*/forward,exit@jax/*/forward,error@jax/*/forward_backward")
    code, run_dir = run(tmp_path, "--framework", "torch,jax")
    rows = summary(run_dir)
    assert code == 1
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] == "failed"
    assert "SIGABRT during first_call" in rows.loc["torch-eager-fp32-b1-forward", "error"]
    assert "exited with code 3" in rows.loc["jax-jit-fp32-b1-forward", "error"]
    assert "ValueError: fake setup failure" in rows.loc["jax-jit-fp32-b1-forward_backward", "error"]
    assert rows.loc["torch-eager-fp32-b1-forward_backward", "status"] == "ok"
    assert "failed torch-eager-fp32-b1-forward" in capsys.readouterr().out


def test_runner_out_of_memory_becomes_oom_row(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "oom@torch/*/forward_backward")
    code, run_dir = run(tmp_path, "--framework", "torch")
    rows = summary(run_dir)
    assert code == 1
    assert rows.loc["torch-eager-fp32-b1-forward_backward", "status"] == "oom"
    assert "CUDA out of memory" in rows.loc["torch-eager-fp32-b1-forward_backward", "error"]
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] == "ok"


def test_runner_hung_worker_times_out_and_is_killed(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "hang@torch/*/forward")
    code, run_dir = run(tmp_path, "--framework", "torch", "--timeout", "4")
    rows = summary(run_dir)
    assert code == 1
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] == "timeout"
    assert "no result after --timeout 4 s, during first_call" in rows.loc["torch-eager-fp32-b1-forward", "error"]
    assert rows.loc["torch-eager-fp32-b1-forward_backward", "status"] == "ok"


def test_runner_skips_frameworks_not_installed_under_all(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setattr(settings, "is_installed", lambda fw: fw != "tensorflow")
    code, run_dir = run(tmp_path, "--framework", "all", "--phase", "forward")
    rows = summary(run_dir)
    assert code == 0
    skipped = rows.loc["tensorflow-function-fp32-b1-forward"]
    assert skipped["status"] == "skipped"
    assert skipped["error"] == "framework 'tensorflow' is not installed; install it with: pip install '.[tensorflow]'"
    assert rows.loc["jax-jit-fp32-b1-forward", "status"] == "ok"


def test_runner_flags_a_framework_that_disagrees_loudly(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "disagree@jax")
    code, run_dir = run(tmp_path, "--framework", "all", "--phase", "forward")
    rows = summary(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert code == 1
    assert record["equivalence"]["frameworks"]["jax"]["equivalent"] is False
    assert record["equivalence"]["frameworks"]["jax"]["max_rel_err"] == pytest.approx(0.1, rel=1e-3)
    assert record["equivalence"]["frameworks"]["torch"]["equivalent"] is True
    assert not rows.loc["jax-jit-fp32-b1-forward", "equivalent"]
    assert "FRAMEWORK DISAGREES: jax" in capsys.readouterr().out


def test_runner_gradient_check_compares_fp64_gradients_and_records_them(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, run_dir = run(tmp_path, "--framework", "all", "--phase", "forward")
    assert code == 0
    check = json.loads((run_dir / "run.json").read_text())["gradient_check"]
    assert check["precision"] == "fp64" and check["batch_size"] == 1 and check["rtol"] == 1e-8
    for entry in check["frameworks"].values():
        assert entry["status"] == "ok" and entry["equivalent"] is True
        assert entry["max_rel_err"] == 0 and entry["reference"].startswith("elementwise median")
    rows = summary(run_dir)
    model = rows[rows["kind"] == "model"]
    assert (model["gradient_max_rel_err"] == 0).all() and model["gradients_equivalent"].all()
    assert "gradients (fp64, batch 1, largest error per parameter): torch 0.0e+00" in capsys.readouterr().out


def test_runner_flags_gradients_that_disagree_in_fp64_though_heatmaps_agree(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "graddisagree@jax")
    code, run_dir = run(tmp_path, "--framework", "all", "--phase", "forward")
    assert code == 1
    record = json.loads((run_dir / "run.json").read_text())
    assert all(e["equivalent"] for e in record["equivalence"]["frameworks"].values())
    gradients = record["gradient_check"]["frameworks"]
    assert gradients["jax"]["equivalent"] is False and gradients["jax"]["max_rel_err"] == pytest.approx(1e-6, rel=1e-2)
    assert gradients["torch"]["equivalent"] is True
    rows = summary(run_dir)
    assert not rows.loc["jax-jit-fp32-b1-forward", "gradients_equivalent"]
    assert rows.loc["torch-eager-fp32-b1-forward", "gradients_equivalent"]
    assert "GRADIENTS DISAGREE: jax" in capsys.readouterr().out


def test_runner_measures_fp64_cells_like_the_others(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, run_dir = run(tmp_path, "--framework", "torch", "--precision", "fp32,fp64")
    rows = summary(run_dir)
    assert code == 0
    assert rows.loc["torch-eager-fp64-b1-forward_backward", "status"] == "ok"
    assert set(rows[rows["kind"] == "calibration"]["precision"]) == {"fp32", "fp64"}


def test_runner_calibration_without_conv_benchmark_is_skipped_with_reason(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "noconv@torch")
    code, run_dir = run(tmp_path, "--framework", "torch,jax", "--phase", "forward")
    rows = summary(run_dir)
    assert code == 0
    assert rows.loc["torch-conv_benchmark-fp32-b1-conv3x3", "status"] == "skipped"
    assert "has no conv_benchmark" in rows.loc["torch-conv_benchmark-fp32-b1-conv3x3", "error"]
    # The machine's ceiling still comes from the framework that has probes; torch has no ceiling of its own.
    jax_best = max(rows.loc[f"jax-{probe}-fp32-b1-{kind}", "achieved_gflop_per_s"]
                   for probe, kind in (("conv_benchmark", "conv3x3"), ("gemm_benchmark", "gemm")))  # fmt: skip
    assert rows.loc["torch-eager-fp32-b1-forward", "conv_ceiling_gflop_per_s"] == pytest.approx(jax_best)
    assert math.isnan(rows.loc["torch-eager-fp32-b1-forward", "framework_ceiling_fraction"])
    assert rows.loc["jax-jit-fp32-b1-forward", "framework_ceiling_gflop_per_s"] == pytest.approx(jax_best)


def test_runner_warns_when_thread_counts_differ(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_FAKE_THREADS", "torch=4")
    code, run_dir = run(tmp_path, "--framework", "torch,jax", "--phase", "forward")
    record = json.loads((run_dir / "run.json").read_text())
    assert code == 0
    assert "frameworks use different intra_op_threads: torch 4, jax 1" in record["warnings"]
    assert "different intra_op_threads" in capsys.readouterr().out


def test_runner_min_time_collects_at_least_min_iters(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code = cli.main(
        [
            "run",
            "--preset",
            "tiny",
            "--min-time",
            "0.05",
            "--warmup",
            "0",
            "--framework",
            "jax",
            "--phase",
            "forward",
            "--out",
            str(tmp_path),
        ]
    )
    (run_dir,) = list(tmp_path.iterdir())
    assert code == 0
    assert summary(run_dir).loc["jax-jit-fp32-b1-forward", "n_samples"] >= settings.MIN_ITERS


def _wait_for_rows(path: Path, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(pd.read_csv(path)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {count} rows")


def test_runner_interrupted_run_keeps_finished_cells_and_resume_completes_it(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {**os.environ, "HGBENCH_FAKE_FAULTS": "hang@jax/*/forward_backward"}
    args = [sys.executable, "-m", "bench", "run", *TINY, "--framework", "torch,jax", "--execution", "default", "--out", str(tmp_path)]
    # The parent's stderr goes to a file: an unread pipe could fill and block it.
    stderr_path = tmp_path.parent / f"{tmp_path.name}-parent-stderr.txt"
    with open(stderr_path, "w") as stderr:
        # SIGINT at its default, whatever pytest inherited: a shell starts background jobs with SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler (the run would never stop).
        parent = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 (no threads fork here)  # fmt: skip
    try:
        # Two frameworks' calibration rows (3 workloads each) and three cells come before the hanging one.
        _wait_for_rows(_summary_path(tmp_path), 9)
        time.sleep(0.5)
        parent.send_signal(signal.SIGINT)
        try:
            code = parent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not stop after SIGINT; its stderr:\n{stderr_path.read_text()}") from None
        assert code == 130
    finally:
        if parent.poll() is None:
            parent.kill()
    (run_dir,) = list(tmp_path.iterdir())
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    before = summary(run_dir)
    assert "jax-jit-fp32-b1-forward_backward" not in before.index
    assert len(before) == 9

    fake.delenv("HGBENCH_FAKE_FAULTS", raising=False)
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    after = summary(run_dir)
    assert len(after) == 10 and set(after["status"]) == {"ok"}
    pd.testing.assert_frame_equal(after.loc[before.index], before)  # finished cells were not measured again
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and len(record["resumes"]) == 1
    samples = pd.read_csv(run_dir / "samples.csv")
    assert samples.groupby("cell_id").size().to_dict() == dict.fromkeys(after.index, 3)


def _summary_path(out: Path, timeout_s: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list(out.glob("*/summary.csv"))
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no summary.csv under {out}")


def test_runner_resume_of_a_complete_run_measures_nothing(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, run_dir = run(tmp_path, "--framework", "jax", "--phase", "forward")
    logs = {p.name: p.stat().st_mtime_ns for p in (run_dir / "logs").iterdir()}
    assert code == 0 and cli.main(["run", "--resume", str(run_dir)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "logs").iterdir()} == logs
    assert not math.isnan(summary(run_dir).loc["jax-jit-fp32-b1-forward", "latency_ms_median"])


def test_runner_warns_when_the_machine_is_busy(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench.core import envinfo

    fake.setattr(envinfo, "load_average", lambda: [64.0, 64.0, 64.0])
    code, run_dir = run(tmp_path, "--framework", "jax", "--phase", "forward")
    record = json.loads((run_dir / "run.json").read_text())
    assert code == 0
    assert any(w.startswith("the machine is busy (1-minute load 64.0") for w in record["warnings"])
    assert record["load_average_at_end"] == [64.0, 64.0, 64.0]


def test_run_id_names_the_folder_and_never_overwrites(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, run_dir = run(tmp_path, "--framework", "jax", "--phase", "forward", "--run-id", "ci-tiny")
    assert code == 0 and run_dir == (tmp_path / "ci-tiny").resolve()
    assert cli.main(["run", *TINY, "--out", str(tmp_path), "--framework", "jax", "--run-id", "ci-tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["run", *TINY, "--out", str(tmp_path), "--run-id", "../escape"]) == 2
    assert "not a plain folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci-tiny"]


def test_test_slowdown_switch_is_recorded_and_warned(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_TEST_SLOWDOWN", "0.5")
    code, run_dir = run(tmp_path, "--framework", "torch", "--phase", "forward")
    rows = summary(run_dir)
    assert code == 0 and rows.loc["torch-eager-fp32-b1-forward", "injected_slowdown"] == 0.5
    # Only model steps are slowed: the calibration yardstick must stay the machine's own.
    assert rows[rows["kind"] == "calibration"]["injected_slowdown"].isna().all()
    warnings = json.loads((run_dir / "run.json").read_text())["warnings"]
    assert any("HGBENCH_TEST_SLOWDOWN" in text for text in warnings)


def test_test_slowdown_switch_rejects_a_malformed_value_before_measuring(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_TEST_SLOWDOWN", "lots")
    assert cli.main(["run", *TINY, "--out", str(tmp_path), "--framework", "torch"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: HGBENCH_TEST_SLOWDOWN='lots' is not a fraction between 0 and 10")
    assert list(tmp_path.iterdir()) == []  # no run folder, no worker started


def test_slowed_step_lasts_at_least_the_fraction_longer() -> None:
    from bench.engine.worker import slowed

    def step() -> None:
        time.sleep(0.002)

    t0 = time.perf_counter_ns()
    slowed(step, 1.0)()
    # By construction: the busy wait runs until (1 + fraction) x the step's own duration has passed.
    assert time.perf_counter_ns() - t0 >= 2 * 2_000_000
    assert slowed(step, 0.0) is step


def test_run_like_measures_the_same_cells_into_a_new_run(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, base_dir = run(tmp_path / "base", "--framework", "torch,jax", "--phase", "forward", "--batch-size", "2")
    assert code == 0
    out = tmp_path / "new"
    assert cli.main(["run", "--like", str(base_dir), "--out", str(out), "--run-id", "again", "--no-report"]) == 0
    base, new = summary(base_dir), summary(out / "again")
    assert list(new.index) == list(base.index)
    again = json.loads((out / "again" / "run.json").read_text())["settings"]
    assert again == {**json.loads((base_dir / "run.json").read_text())["settings"], "out_dir": str(out)}
    assert cli.main(["run", "--like", str(base_dir), "--preset", "seed"]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert cli.main(["run", "--like", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err
    # --timing-only: the same cells timed, with no equivalence or gradient check and no calibration first.
    argv = ["run", "--like", str(base_dir), "--out", str(out), "--run-id", "bare", "--no-report", "--timing-only"]
    assert cli.main(argv) == 0
    assert "timing only" in capsys.readouterr().out
    bare = json.loads((out / "bare" / "run.json").read_text())
    assert bare["settings"]["checks"] is False and not bare["equivalence"] and not bare.get("gradient_check")
    assert list(summary(out / "bare").index) == list(base[base["kind"] == "model"].index)
    assert not any((out / "bare" / "logs").glob("*calibration*")) and not any((out / "bare" / "logs").glob("*equivalence*"))


def test_regression_check_experiment_writes_pairs_and_summary(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench.experiments import regression_check

    code, base_dir = run(tmp_path / "base", "--framework", "jax", "--phase", "forward")
    assert code == 0
    out = tmp_path / "experiment"
    assert regression_check.main(["--like", str(base_dir), "--pairs", "1", "--slowdowns", "1.0",
                                  "--thresholds", "10%", "--out", str(out)]) == 0  # fmt: skip
    pairs = pd.read_csv(out / "pairs.csv")
    # One same-code pair, two normal runs and the slowed run against the --like run, one slowed pair;
    # each with and without --normalize.
    assert sorted(zip(pairs["kind"], pairs["normalize"], strict=True)) == sorted(
        [(kind, norm) for kind in ("same_code", "same_code_vs_like", "same_code_vs_like", "slowdown", "slowdown_vs_like")
         for norm in (False, True)]
    )
    assert (pairs["cells"] == 1).all() and (pairs["invariant_mismatches"] == 0).all()
    slowed = summary(out / "runs" / "slow1-0")
    assert slowed.loc["jax-jit-fp32-b1-forward", "injected_slowdown"] == 1.0
    assert set(pd.read_csv(out / "summary.csv")["kind"]) == {"same_code", "same_code_vs_like", "slowdown", "slowdown_vs_like"}
    assert regression_check.main(["--like", str(tmp_path), "--out", str(out)]) == 2


# ---------------------------------------------------------------- rounds


def test_runner_measures_every_cell_in_interleaved_rounds(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, run_dir = run(tmp_path, "--framework", "torch,jax", "--execution", "default", "--rounds", "3")
    assert code == 0
    rows = summary(run_dir)
    model = rows[rows["kind"] == "model"]
    assert set(model["n_rounds"]) == {3} and set(model["ci_level"]) == {"rounds"}
    assert (model["round_median_ms_min"] <= model["latency_ms_median"]).all()
    assert (model["latency_ms_median"] <= model["round_median_ms_max"]).all()
    samples = pd.read_csv(run_dir / "samples.csv")
    cell = samples[samples["cell_id"] == "torch-eager-fp32-b1-forward"]
    assert sorted(set(cell["round"])) == [1, 2, 3] and len(cell) == 3 * 3  # --iters 3 per round
    record = json.loads((run_dir / "run.json").read_text())
    assert record["rounds"]["rounds"] == 3 and record["rounds"]["order_seed"] == 0
    logs = sorted(p.name for p in (run_dir / "logs").glob("torch-eager-fp32-b1-forward-round*.log"))
    assert logs == [f"torch-eager-fp32-b1-forward-round{r}.log" for r in (1, 2, 3)]


def test_runner_failed_round_ends_the_cell_and_says_which_round(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "error@torch/*/forward")
    code, run_dir = run(tmp_path, "--framework", "torch", "--execution", "default", "--rounds", "2")
    rows = summary(run_dir)
    assert code == 1
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] == "failed"
    assert rows.loc["torch-eager-fp32-b1-forward", "error"].startswith("round 1 of 2: ")
    assert rows.loc["torch-eager-fp32-b1-forward_backward", "n_rounds"] == 2


def test_runner_one_round_is_labelled_within_process(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, run_dir = run(tmp_path, "--framework", "jax", "--phase", "forward")
    assert code == 0
    assert summary(run_dir).loc["jax-jit-fp32-b1-forward", "ci_level"] == "within-process"


# ---------------------------------------------------------------- the GPU branch, on the fake backend


def test_runner_on_a_gpu_records_a_framework_that_falls_back_to_the_cpu(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """NVML sees a GPU, the (fake) frameworks do not: under --device auto the run goes on, warns, marks every
    row device_fallback and keeps those rows out of GPU ceilings."""
    fake.setattr(settings.nvml, "gpu_present", lambda: True)
    code, run_dir = run(tmp_path, "--framework", "torch", "--execution", "default", "--phase", "forward", "--batch-size", "1")
    assert code == 0
    rows = summary(run_dir)
    assert set(rows["device"]) == {"cpu"} and rows["device_fallback"].all()
    record = json.loads((run_dir / "run.json").read_text())
    assert "torch" in record["device_fallback"] and "pip install '.[torch-gpu]'" in record["device_fallback"]["torch"]
    assert any("torch runs on the CPU although the run is on the GPU" in w for w in record["warnings"])


def test_runner_device_gpu_with_a_cpu_build_is_bad_input_naming_the_cuda_install(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setattr(settings.nvml, "gpu_present", lambda: True)
    assert cli.main(["run", *TINY, "--out", str(tmp_path), "--framework", "jax", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device gpu: NVML sees a GPU but jax cannot use it") and err.count("\n") == 1
    assert "pip install '.[jax-gpu]'" in err
    assert not any(tmp_path.iterdir())  # nothing was measured or written


def test_ceilings_are_per_device_so_a_cpu_fallback_never_sets_a_gpu_ceiling() -> None:
    from bench.run.runner import ceilings

    rows = [{"kind": "calibration", "status": "ok", "phase": "gemm", "framework": fw, "device": device,
             "precision": "fp32", "batch_size": 16, "achieved_gflop_per_s": rate}
            for fw, device, rate in (("torch", "gpu", 50_000.0), ("jax", "cpu", 90.0))]  # fmt: skip
    best = ceilings(rows)
    assert best[("gpu", "*", "fp32", 16)] == 50_000.0 and best[("cpu", "*", "fp32", 16)] == 90.0
    assert ("gpu", "jax", "fp32", 16) not in best
