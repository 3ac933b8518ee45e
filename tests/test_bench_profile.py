"""`python -m bench profile` end to end on the fake backend (real worker processes, no framework), and once for real.

Faults (crash, contract breach, recompilation) are injected through tests/fake_backend.py.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import impls
from bench import cli
from bench.core import settings
from bench.core.columns import PROFILE_CSVS
from bench.profile import tables as profile_tables
from impls.profiling import stage_names

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--steps", "2", "--warmup", "1"]



def profile(out: Path, *args: str) -> tuple[int, Path]:
    """`python -m bench profile` in this process (workers are real processes); returns (exit code, run dir)."""
    code = cli.main(["profile", *TINY, "--out", str(out), *args])
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return code, run_dir


def read(run_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / name, keep_default_na=True)


# ---------------------------------------------------------------- the happy path


def test_profile_writes_every_csv_run_json_and_a_trace_per_cell(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, run_dir = profile(tmp_path, "--framework", "torch,jax", "--top-k", "2")
    assert code == 0
    assert re.fullmatch(r"\d{8}T\d{6}Z-cpu-profile", run_dir.name)
    for name, columns in PROFILE_CSVS.items():
        assert list(read(run_dir, name).columns) == columns, name
    cells = {("torch", "eager"), ("torch", "compile"), ("jax", "jit")}
    stages = read(run_dir, "stages.csv")
    assert set(stages["status"]) == {"ok"}
    assert set(zip(stages["framework"], stages["execution"], strict=True)) == cells
    tiny = impls.PRESETS["tiny"]
    for (fw, ex, phase), rows in stages.groupby(["framework", "execution", "phase"]):
        expected = stage_names(tiny) + (["loss"] if phase == "forward_backward" else []) + ["other"]
        assert list(rows["stage"]) == expected, (fw, ex, phase)
        trace = run_dir / "traces" / f"{fw}-{ex}-{phase}" / "fake.trace.json"
        assert json.loads(trace.read_text())["traceEvents"], f"{trace} holds no events"
    ops = read(run_dir, "ops.csv")
    assert ops.groupby(["framework", "execution", "phase"]).size().max() == 2  # --top-k 2
    assert (ops["self_ms"] > 0).all() and (ops["share_of_step"] > 0).all()
    flops = read(run_dir, "flops.csv")
    assert len(flops) == 6
    for row in flops.itertuples():
        assert row.analytic_conv_flops == impls.count_flops(tiny, 1, row.phase)
    assert (read(run_dir, "compile.csv")["first_call_ms"] > 0).all()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["kind"] == "profile" and record["status"] == "complete"
    assert record["settings"]["steps"] == 2 and record["settings"]["top_k"] == 2
    assert record["settings"]["batch_size"] == 1 and record["settings"]["precision"] == "fp32"
    assert {"cpu_model", "git", "packages"} <= set(record["environment"])
    assert record["cells"]["jax-jit-forward"]["trace_files"] == ["fake.trace.json"]
    printed = " ".join(capsys.readouterr().out.split())
    assert "Where a forward step goes, per stage" in printed and "other / unattributed" in printed
    assert "[profiler] ms" in printed and "[staged] ms" in printed  # the method is in each column's header
    assert "Conv FLOPs: analytic vs framework-reported" in printed and "Top 2 ops by self time: jax jit" in printed
    assert "https://ui.perfetto.dev" in printed and str(run_dir / "traces") in printed


def test_profile_stage_rows_partition_the_step(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, run_dir = profile(tmp_path, "--framework", "tensorflow", "--phase", "forward_backward", "--execution", "all")
    stages = read(run_dir, "stages.csv")
    assert code == 0 and len(stages.groupby("execution")) == 3
    for execution, rows in stages.groupby("execution"):
        step_ms = rows["stage_step_ms"].iloc[0]
        measured = rows[rows["stage"] != "other"]
        other = rows[rows["stage"] == "other"]["ms"].iloc[0]
        assert (measured["ms"] > 0).all(), execution
        assert measured["ms"].sum() <= step_ms * (1 + 1e-9), execution
        assert other == pytest.approx(step_ms - measured["ms"].sum(), abs=1e-9)
        assert rows["share_of_step"].sum() == pytest.approx(1.0)
        network = measured[measured["stage"] != "loss"]
        rate = network["analytic_conv_flops"] / network["ms"] / 1e6
        assert network["conv_gflop_per_s"].to_numpy() == pytest.approx(rate.to_numpy())
    assert set(stages["method"]) == {"profiler", "staged"}  # the fake's eager uses "profiler", compiled "staged"


# ---------------------------------------------------------------- faults become rows


def test_profile_crash_and_contract_breach_become_failed_rows_and_exit_1(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "crash@torch/eager/forward,badprofile@jax/*/forward_backward")
    code, run_dir = profile(tmp_path, "--framework", "torch,jax")
    stages = read(run_dir, "stages.csv").fillna({"error": ""})
    assert code == 1
    by_cell = {(r.framework, r.execution, r.phase): r for r in stages.drop_duplicates(["framework", "execution", "phase"]).itertuples()}
    crashed = by_cell[("torch", "eager", "forward")]
    assert crashed.status == "failed" and "SIGABRT" in crashed.error
    breached = by_cell[("jax", "jit", "forward_backward")]
    assert breached.status == "failed"
    assert "broke the contract" in breached.error and "more than the step they partition" in breached.error
    assert by_cell[("torch", "eager", "forward_backward")].status == "ok"
    assert by_cell[("jax", "jit", "forward")].status == "ok"
    # A failed cell has no op, FLOP or compile rows, but the run kept everything else.
    ops = read(run_dir, "ops.csv")
    assert not ((ops["framework"] == "jax") & (ops["phase"] == "forward_backward")).any()
    assert len(read(run_dir, "flops.csv")) == 4
    printed = " ".join(capsys.readouterr().out.split())
    assert "failed torch eager forward" in printed and "failed jax jit forward_backward" in printed


def test_profile_backend_without_profile_is_a_failed_row_naming_the_contract(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "noprofile@jax")
    code, run_dir = profile(tmp_path, "--framework", "jax", "--phase", "forward")
    (row,) = read(run_dir, "stages.csv").itertuples()
    assert code == 1 and row.status == "failed"
    assert "has no profile(" in row.error and "impls/profiling.py" in row.error


def test_profile_recompilation_warns_on_stderr_and_is_flagged(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "recompile@torch/compile/forward")
    code, run_dir = profile(tmp_path, "--framework", "torch", "--execution", "compile", "--phase", "forward")
    captured = capsys.readouterr()
    assert code == 0
    assert "torch-compile-forward recompiled 2 time(s) in the timed loop" in " ".join(captured.err.split())
    assert "2 RECOMPILED" in captured.out
    assert read(run_dir, "compile.csv")["recompilations_in_timed_loop"].tolist() == [2]
    assert any("recompiled 2" in w for w in json.loads((run_dir / "run.json").read_text())["warnings"])


def test_profile_skips_frameworks_not_installed_under_all(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setattr(settings, "is_installed", lambda fw: fw != "tensorflow")
    code, run_dir = profile(tmp_path, "--phase", "forward", "--execution", "default")
    stages = read(run_dir, "stages.csv")
    skipped = stages[stages["framework"] == "tensorflow"]
    assert code == 0
    assert skipped["status"].tolist() == ["skipped"]
    assert skipped["error"].iloc[0] == "framework 'tensorflow' is not installed; install it with: pip install '.[tensorflow]'"
    assert set(stages.loc[stages["framework"] != "tensorflow", "status"]) == {"ok"}


# ---------------------------------------------------------------- bad input: exit 2, one line, no traceback


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--framework", "mxnet"], "--framework: unknown framework 'mxnet'"),
        (["--steps", "0"], "--steps must be a positive integer, got '0'"),
        (["--top-k", "-3"], "--top-k must be a positive integer, got '-3'"),
        (["--phase", "backward"], "--phase: unknown value 'backward'; choose from forward, forward_backward or all"),
        (["--batch-size", "x"], "--batch-size must be a positive integer, got 'x'"),
        (["--batch-size", "1,8"], "--batch-size takes one batch size for profile, got '1,8'"),
        (["--precision", "fp32,bf16"], "--precision takes one precision for profile"),
        (["--execution", "turbo"], "--execution: unknown execution 'turbo'"),
    ],
    ids=["framework", "steps", "top_k", "phase", "batch_size", "batch_list", "precision_list", "execution"],
)
def test_profile_bad_input_exits_2_with_one_line(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = cli.main(["profile", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert not list(tmp_path.iterdir()), "bad input must not leave a run folder"


# ---------------------------------------------------------------- the report


def test_report_of_a_profile_run_shows_the_stage_figure_and_tables(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "crash@jax/*/forward")
    _, run_dir = profile(tmp_path / "results", "--framework", "torch,jax")
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    figure = tmp_path / "report" / "stage_shares.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report" / "report.html").read_text()
    embedded = re.search(r'data-figure="stage_shares.png" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == figure.read_bytes()
    text = (tmp_path / "report" / "report.md").read_text()
    assert "![stage_shares](stage_shares.png)" in text
    for heading in ("## Profile", "### Stages, forward", "### Conv FLOPs: analytic vs framework-reported", "### Compilation"):
        assert heading in text
    assert "| jax jit forward | failed |" in text  # the crashed cell is listed, not dropped
    assert "| torch eager forward | 0." in text and "| yes |" in text  # FLOP check rows


def test_report_of_a_run_with_its_profile_adds_the_profile_section(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture_run = Path(__file__).resolve().parent / "fixtures" / "tiny_run"
    _, run_dir = profile(tmp_path / "results", "--framework", "torch", "--execution", "eager", "--phase", "forward")
    assert cli.main(["report", str(fixture_run), str(run_dir), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Summary (baseline: torch)" in text and "## Profile" in text
    assert "](latency.png)" in text and "](stage_shares.png)" in text


def test_tensorboard_logdir_is_the_folder_above_plugins_profile() -> None:
    xplane = Path("/r/traces/tensorflow-eager-forward/tensorflow_logdir/plugins/profile/2026_11_25/host.xplane.pb")
    assert profile_tables.tensorboard_logdir(xplane) == Path("/r/traces/tensorflow-eager-forward/tensorflow_logdir")
    assert profile_tables.tensorboard_logdir(Path("/r/t/host.xplane.pb")) == Path("/r/t")


# ---------------------------------------------------------------- once for real


@pytest.mark.slow
def test_profile_real_torch_eager_forward_end_to_end(tmp_path: Path) -> None:
    if not impls.is_installed("torch"):
        pytest.skip(f"torch is not installed ({impls.install_command('torch')})")
    args = [sys.executable, "-m", "bench", "profile", "--framework", "torch", "--preset", "tiny", "--phase", "forward",
            "--execution", "eager", "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    (run_dir,) = list(tmp_path.iterdir())
    stages = read(run_dir, "stages.csv")
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{stages.get('error')}"
    assert set(stages["status"]) == {"ok"}
    assert set(stage_names(impls.PRESETS["tiny"])) <= set(stages["stage"])
    measured = stages[stages["stage"] != "other"]
    assert measured["ms"].sum() <= stages["stage_step_ms"].iloc[0] * (1 + 1e-9)
    assert len(read(run_dir, "ops.csv")) > 0
    record = json.loads((run_dir / "run.json").read_text())
    trace_files = record["cells"]["torch-eager-forward"]["trace_files"]
    assert trace_files and all((run_dir / "traces" / "torch-eager-forward" / f).is_file() for f in trace_files)
    flops = read(run_dir, "flops.csv").iloc[0]
    assert flops["analytic_conv_flops"] == impls.count_flops(impls.PRESETS["tiny"], 1, "forward")
