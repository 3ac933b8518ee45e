"""`--devices`: the data-parallel dimension of a run, end to end on the fake backend (fast), and its bad input.

The frameworks' own data-parallel engines are tested in tests/test_data_parallel_<framework>.py; a real
torch DDP run with a crashing and a hanging rank is at the end of this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import cli
from bench.core import settings
from bench.core.rundir import read_run
from bench.core.settings import Cell, SettingsError, build_settings, check_devices
from bench.run import scaling
from impls import get_preset

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--iters", "3", "--warmup", "1", "--no-report", "--device", "cpu", "--impl", "idiomatic"]


@pytest.fixture
def fake(fake: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """tests/conftest.py's fake backend, with two CPU devices on offer whatever this machine has."""
    fake.setattr(settings, "offered_devices", lambda device: 2)
    return fake


def run(out: Path, *args: str) -> tuple[int, Path]:
    code = cli.main(["run", *TINY, "--out", str(out), *args])
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return code, run_dir


def test_devices_plan_forward_backward_cells_at_n_times_the_per_device_batch() -> None:
    config = get_preset("tiny")
    s = build_settings(framework="torch,jax", preset="tiny", devices="1,2", device="cpu", execution="all")
    assert s.devices == (1, 2) and s.batch_per_device
    multi = [c for c in s.cells() if c.devices == 2]
    # Only the training step, only the executions the data-parallel engines run, and twice the batch.
    assert {(c.framework, c.execution, c.phase, c.batch_size) for c in multi} == {
        ("torch", "eager", "forward_backward", 2), ("jax", "jit", "forward_backward", 2)}
    assert multi[0].cell_id == "torch-eager-fp32-d2-b2-forward_backward" and multi[0].per_device_batch == 1
    single = [c for c in s.cells() if c.devices == 1]
    assert {c.phase for c in single} == {"forward", "forward_backward"} and {c.batch_size for c in single} == {1}
    # Given explicitly, the batch is the global one on every count.
    explicit = build_settings(framework="torch", preset="tiny", devices="1,2", device="cpu", batch_size="4")
    assert {(c.devices, c.batch_size) for c in explicit.cells()} == {(1, 4), (2, 4)}
    assert not explicit.batch_per_device and config.num_stacks == 2


@pytest.mark.parametrize(("devices", "extra", "message"), [
    ("0", [], "--devices must be a positive integer, got '0'"),
    ("-2", [], "--devices must be a positive integer, got '-2'"),
    ("1,two", [], "--devices must be a positive integer, got 'two'"),
    ("1,3", [], "this machine offers 2 CPU devices (one per usable core), not 3; use at most --devices 2"),
    ("2", ["--batch-size", "3"], "--batch-size 3 is the global batch and does not split over 2 devices"),
    ("2", ["--phase", "forward"], "add --phase forward_backward or --phase all"),
])  # fmt: skip
def test_bad_devices_are_one_line_and_exit_2(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], devices: str, extra: list[str],
    message: str,
) -> None:
    code = cli.main(["run", *TINY, "--framework", "torch", "--out", str(tmp_path), "--devices", devices, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_per_device_batch_too_small_for_train_mode_bn_is_refused() -> None:
    config = get_preset("tiny").replace(input_hw=(16, 16))  # innermost level 1x1: train-mode BN needs 2 images
    with pytest.raises(SettingsError, match="give each device at least 2 images"):
        check_devices((1, 2), "cpu", ("forward_backward",), (2,), config, given_batch=True)


def test_a_devices_run_checks_the_data_parallel_gradients_and_fills_scaling(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, run_dir = run(tmp_path, "--framework", "torch,jax", "--execution", "default", "--devices", "1,2")
    assert code == 0
    data = read_run(run_dir)
    model = data.summary[data.summary["kind"] == "model"].set_index("cell_id")
    assert set(model["status"]) == {"ok"} and len(model) == 6  # 2 frameworks x (2 phases on 1 + 1 on 2 devices)
    two = model.loc["torch-eager-fp32-d2-b2-forward_backward"]
    one = model.loc["torch-eager-fp32-b1-forward_backward"]
    assert two["devices"] == 2 and two["per_device_batch"] == 1 and one["devices"] == 1
    assert two["scaling_efficiency"] == pytest.approx(two["throughput_img_per_s"] / (2 * one["throughput_img_per_s"]))
    assert pd.isna(one["scaling_efficiency"])
    assert two["gradients_equivalent"] and two["gradient_max_rel_err"] < 1e-8
    check = data.record["data_parallel_check"]
    assert set(check["frameworks"]) == {"torch d2", "jax d2"}
    entry = check["frameworks"]["jax d2"]
    assert entry["equivalent"] and entry["cross_reference"] == "torch" and entry["batch_size"] == 2
    samples = data.samples[data.samples["cell_id"] == "jax-jit-fp32-d2-b2-forward_backward"]
    assert len(samples) == 3 and set(samples["devices"].astype(int)) == {2}


def test_the_report_and_compare_of_a_devices_run_show_and_match_the_multi_device_cells(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--framework", "jax", "--execution", "default", "--devices", "1,2", "--phase", "forward_backward"]
    assert run(tmp_path / "a", *args)[0] == 0 and run(tmp_path / "b", *args)[0] == 0
    (first,), (second,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert cli.main(["report", str(first), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Data parallelism (--devices)" in page and "jax-jit-fp32-d2-b2-forward_backward" in page
    assert "not how it scales on separate devices" in page and "| jax d2 | ok | jit | 2 |" in page
    assert (tmp_path / "report" / "scaling.png").stat().st_size > 10_000
    capsys.readouterr()
    cli.main(["compare", str(first), str(second)])  # its verdict on fake timings is beside the point
    assert "jax-jit-fp32-d2-b2-forward_backward" in capsys.readouterr().out


def test_data_parallel_gradients_off_their_reference_fail_the_run(fake: pytest.MonkeyPatch, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    fake.setenv("HGBENCH_FAKE_FAULTS", "dpdisagree@jax")
    code, run_dir = run(tmp_path, "--framework", "torch,jax", "--execution", "default", "--devices", "2",
                        "--phase", "forward_backward", "--batch-size", "2")  # fmt: skip
    assert code == 1
    assert "DATA-PARALLEL GRADIENTS DISAGREE: jax d2" in capsys.readouterr().out
    entry = json.loads((run_dir / "run.json").read_text())["data_parallel_check"]["frameworks"]["jax d2"]
    assert entry["equivalent"] is False and entry["reference_max_rel_err"] > 1e-7


def test_a_crashing_data_parallel_cell_is_a_failed_row(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "exit@torch/eager/forward_backward")
    code, run_dir = run(tmp_path, "--framework", "torch", "--devices", "2", "--phase", "forward_backward",
                        "--batch-size", "2", "--timing-only")  # fmt: skip
    row = pd.read_csv(run_dir / "summary.csv").set_index("cell_id").loc["torch-eager-fp32-d2-b2-forward_backward"]
    assert code == 1 and row["status"] == "failed" and "exit" in row["error"]


def test_scaling_efficiency_needs_the_one_device_twin_at_the_per_device_batch() -> None:
    def row(devices: int, batch: int, throughput: float) -> dict[str, object]:
        cell = Cell("torch", "eager", "fp32", batch, "forward_backward", devices=devices)
        return {"cell_id": cell.cell_id, "kind": "model", "status": "ok", **cell.to_dict(),
                "throughput_img_per_s": throughput}  # fmt: skip

    rows = [row(1, 2, 10.0), row(2, 4, 15.0), row(2, 8, 30.0)]
    assert scaling.efficiencies(rows) == {"torch-eager-fp32-d2-b4-forward_backward": pytest.approx(0.75)}


# ---------------------------------------------------------------- real torch DDP through `bench run`


def _rank_processes() -> list[str]:
    """Command lines of live torch rank processes (impls.torch_data_parallel), zombies excluded."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "impls.torch_data_parallel" in cmdline and state != "Z":
            found.append(cmdline)
    return found


def _bench_run(out: Path, fault: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], pd.Series]:
    """A real two-rank torch run of one training cell with a rank fault injected; its row."""
    env = {**os.environ, "HGBENCH_TEST_RANK_FAULT": fault}
    env.pop("HGBENCH_BACKEND_OVERRIDE", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--framework", "torch", "--preset", "tiny", "--device", "cpu",
         "--devices", "2", "--phase", "forward_backward", "--batch-size", "2", "--iters", "3", "--warmup", "1",
         "--timing-only", "--no-report", "--out", str(out), "--run-id", "r", *extra],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    row = pd.read_csv(out / "r" / "summary.csv").set_index("cell_id").loc["torch-eager-fp32-d2-b2-forward_backward"]
    return done, row


@pytest.mark.skipif(sys.platform != "linux" or os.cpu_count() < 2, reason="needs Linux /proc and two cores")
def test_a_crashing_torch_rank_is_a_failed_row_naming_the_rank(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    done, row = _bench_run(tmp_path, "crash@1")
    assert done.returncode == 1, done.stderr
    assert row["status"] == "failed" and "rank 1" in row["error"], row["error"]
    assert _rank_processes() == []


@pytest.mark.skipif(sys.platform != "linux" or os.cpu_count() < 2, reason="needs Linux /proc and two cores")
def test_a_hanging_torch_rank_times_out_and_no_rank_survives(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    done, row = _bench_run(tmp_path, "hang@1", "--timeout", "25")
    assert done.returncode == 1, done.stderr
    assert row["status"] == "timeout", row["error"]
    assert _rank_processes() == []
