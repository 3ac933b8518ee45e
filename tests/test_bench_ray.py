"""`bench run --executor ray`: the runner on a local Ray cluster of this machine, against a local run.

One cluster for the module (loopback only, two CPUs, one measurement slot), started with a bounded wait and
shut down by the fixture that started it. Runs use the fake backend (tests/fake_backend.py), whose switches
reach the Ray workers because the executor forwards the driver's HGBENCH_* variables with every task. The
last test runs real torch (eager, tiny preset) both ways.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest

ray = pytest.importorskip("ray")

from bench import cli  # noqa: E402 (after the skip: nothing here runs without Ray)
from bench.core import settings  # noqa: E402
from bench.core.settings import SettingsError, build_settings  # noqa: E402
from bench.engine import ray_executor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--iters", "3", "--warmup", "1", "--no-report", "--device", "cpu", "--impl", "idiomatic"]
CLUSTER_START_S = 120  # a cold start takes ~5 s on two idle cores; past this the fixture gives up
WAIT_S = 60.0
# What a Ray run must reproduce of a local one: every column that does not measure time, memory or the machine.
INVARIANT_COLUMNS = ["cell_id", "kind", "framework", "impl", "execution", "precision", "batch_size", "phase",
                     "devices", "device", "device_fallback", "fp32_math", "per_device_batch", "status", "error",
                     "n_samples", "n_rounds", "gflop_per_step", "num_params", "warmup_calls", "equivalence_max_rel_err",
                     "equivalent", "gradient_max_rel_err", "gradients_equivalent", "preset", "num_stacks", "depth",
                     "channels", "num_keypoints", "input_height", "input_width"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray cluster of this machine for the module; its address. The module's runs connect to it."""
    if ray.is_initialized():
        pytest.fail("this process is connected to Ray already; the module starts its own cluster")

    def give_up(signum: int, frame: object) -> None:
        raise TimeoutError(f"the local Ray cluster did not start within {CLUSTER_START_S} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(CLUSTER_START_S)
    try:
        address = ray_executor.start_local_cluster(num_cpus=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    try:
        yield address
    finally:
        ray.shutdown()  # stops the processes this fixture's ray.init started, and only those



def run(out: Path, *args: str) -> tuple[int, Path]:
    """`python -m bench run` in this process; returns (exit code, run dir)."""
    code = cli.main(["run", *TINY, "--out", str(out), *args])
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return code, run_dir


def summary(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "summary.csv").set_index("cell_id", drop=False).sort_index()


def _invariants(table: pd.DataFrame) -> pd.DataFrame:
    return table[INVARIANT_COLUMNS].astype(str)


def _workers_of(spec_name: str) -> list[psutil.Process]:
    """Live bench workers whose spec file is `spec_name` (their command line names it)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if "bench.engine.worker" in cmdline and any(arg.endswith(spec_name) for arg in cmdline):
            found.append(process)
    return found


def _wait_until(condition, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- bad input (no cluster needed)


def test_ray_executor_without_ray_installed_is_bad_input_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(settings, "ray_installed", lambda: False)
    assert cli.main(["run", *TINY, "--framework", "torch", "--executor", "ray", "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "error: --executor ray needs Ray, which is not installed; install it with: pip install '.[ray]'"
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_executor_options_are_checked_and_recorded_in_the_settings() -> None:
    with pytest.raises(SettingsError, match=r"--executor must be one of local, ray, got 'dask'"):
        build_settings(framework="torch", preset="tiny", device="cpu", executor="dask")
    with pytest.raises(SettingsError, match=r"--ray-address '127.0.0.1:6379' names a Ray cluster, but the run is local; add --executor ray"):
        build_settings(framework="torch", preset="tiny", device="cpu", ray_address="127.0.0.1:6379")
    chosen = build_settings(framework="torch", preset="tiny", device="cpu", executor="ray", ray_address="10.0.0.1:6379")
    assert (chosen.executor, chosen.ray_address) == ("ray", "10.0.0.1:6379")
    assert settings.RunSettings.from_dict(chosen.to_dict()) == chosen
    old = chosen.to_dict()
    del old["executor"], old["ray_address"]  # a run.json written before executors existed
    assert settings.RunSettings.from_dict(old).executor == "local"


def test_a_cluster_without_measurement_slots_is_bad_input_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    executor = ray_executor.RayExecutor("10.0.0.1:6379", started_cluster=False, owns_connection=False)
    node = {"NodeID": "abc", "Alive": True, "Resources": {"CPU": 8.0}, "NodeManagerHostname": "n1"}
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    with pytest.raises(SettingsError, match=r"has no alive node with an 'hgbench_slot' resource.*ray start --head --resources '\{\"hgbench_slot\": 1\}'"):
        executor._check_slots()


def test_spec_paths_in_the_drivers_folder_move_to_the_nodes_folder_and_back() -> None:
    from bench.engine.protocol import EquivalenceResult, EquivalenceSpec

    spec = EquivalenceSpec(framework="torch", execution="eager", input_shape=[1, 32, 32, 3], output_npy="/tmp/hgbench-x/eq.npy")
    moved, moves = ray_executor._move_paths(spec, "/tmp/hgbench-x", "/var/tmp/hgbench-ray-1")
    assert moved.output_npy == "/var/tmp/hgbench-ray-1/eq.npy" and moves == {"/tmp/hgbench-x/eq.npy": moved.output_npy}
    back, _ = ray_executor._move_paths(EquivalenceResult(mode="equivalence", framework="torch", status="ok", output_npy=moved.output_npy), "/var/tmp/hgbench-ray-1", "/tmp/hgbench-x")
    assert back.output_npy == spec.output_npy
    other, none = ray_executor._move_paths(spec, "/tmp/hgbench-xy", "/elsewhere")  # a prefix of a name is no folder
    assert other is spec and none == {}


# ---------------------------------------------------------------- runs on the cluster


def test_ray_run_matches_a_local_run_in_everything_but_timings(fake: pytest.MonkeyPatch, cluster: str, tmp_path: Path) -> None:
    args = ["--framework", "torch,jax", "--execution", "default", "--batch-size", "1,2"]
    code_local, local_dir = run(tmp_path / "local", *args)
    code_ray, ray_dir = run(tmp_path / "ray", *args, "--executor", "ray", "--ray-address", cluster)
    assert code_local == code_ray == 0
    local, remote = summary(local_dir), summary(ray_dir)
    assert len(remote[remote["kind"] == "model"]) == 8  # 2 frameworks x 2 batch sizes x 2 phases
    pd.testing.assert_frame_equal(_invariants(remote), _invariants(local))
    here = socket.gethostname()
    record = json.loads((ray_dir / "run.json").read_text())
    (node_id,) = record["nodes"]
    assert set(remote["host"]) == {here} and set(remote["node_id"]) == {node_id}
    assert set(local["host"]) == {here} and set(local["node_id"]) == {"local"}
    assert record["executor"] == "ray" and record["ray_address"] == cluster
    assert record["settings"]["executor"] == "ray" and record["settings"]["ray_address"] == cluster
    assert {"cpu_model", "packages", "gpus", "host"} <= set(record["nodes"][node_id])
    local_record = json.loads((local_dir / "run.json").read_text())
    assert local_record["executor"] == "local" and "nodes" not in local_record
    for check in ("equivalence", "gradient_check"):
        for fw, entry in local_record[check]["frameworks"].items():
            assert record[check]["frameworks"][fw]["status"] == entry["status"] == "ok"
            assert record[check]["frameworks"][fw]["max_rel_err"] == entry["max_rel_err"]
    logs = sorted(p.name for p in (ray_dir / "logs").iterdir())
    assert logs == sorted(p.name for p in (local_dir / "logs").iterdir())
    assert "hgbench-worker: stage" in (ray_dir / "logs" / "torch-eager-fp32-b2-forward.log").read_text()
    assert not list(Path(ray_executor.tempfile.gettempdir()).glob(f"{ray_executor.NODE_DIR_PREFIX}*"))  # cleaned up


def test_ray_run_turns_worker_faults_into_rows(fake: pytest.MonkeyPatch, cluster: str, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "exit@torch/*/forward,hang@jax/*/forward")
    code, run_dir = run(tmp_path, "--framework", "torch,jax", "--execution", "default", "--timeout", "5",
                        "--executor", "ray", "--ray-address", cluster)  # fmt: skip
    rows = summary(run_dir)
    assert code == 1
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] == "failed"
    assert "worker exited with code 3 during first_call" in rows.loc["torch-eager-fp32-b1-forward", "error"]
    assert rows.loc["jax-jit-fp32-b1-forward", "status"] == "timeout"
    assert "no result after --timeout 5 s, during first_call" in rows.loc["jax-jit-fp32-b1-forward", "error"]
    assert set(rows.loc[["torch-eager-fp32-b1-forward_backward", "jax-jit-fp32-b1-forward_backward"], "status"]) == {"ok"}
    assert rows["node_id"].notna().all()


def test_ray_task_whose_process_is_killed_is_a_failed_row_naming_the_ray_error(
    fake: pytest.MonkeyPatch, cluster: str, tmp_path: Path
) -> None:
    """The Ray worker running a cell's task dies (SIGKILL, as the OOM killer or a node's shutdown would): the
    cell is a failed row that names the node and Ray's error, its bench worker dies with it, the run goes on."""
    fake.setenv("HGBENCH_FAKE_FAULTS", "hang@torch/*/forward")
    killed: dict[str, int] = {}

    def kill_the_task() -> None:
        (worker,) = _wait_until(lambda: _workers_of("torch-eager-fp32-b1-forward.spec.json"), "the hung worker")
        task = worker.parent()
        assert task is not None and "ray::" in " ".join(task.cmdline()), task.cmdline()
        killed.update(worker=worker.pid, task=task.pid)
        task.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_the_task, daemon=True)
    killer.start()
    code, run_dir = run(tmp_path, "--framework", "torch", "--execution", "default", "--timeout", "60",
                        "--executor", "ray", "--ray-address", cluster)  # fmt: skip
    killer.join(timeout=5)
    assert killed, "the task was never found"
    rows = summary(run_dir)
    assert code == 1
    error = rows.loc["torch-eager-fp32-b1-forward", "error"]
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] == "failed"
    assert error.startswith("the Ray task of torch-eager-fp32-b1-forward on node ") and "ended without a result" in error
    assert "WorkerCrashedError" in error, error
    assert rows.loc["torch-eager-fp32-b1-forward_backward", "status"] == "ok"  # the run went on
    _wait_until(lambda: not psutil.pid_exists(killed["worker"]) or psutil.Process(killed["worker"]).status() == psutil.STATUS_ZOMBIE,
                "the bench worker to die with its task", 10)  # fmt: skip
    assert error in (run_dir / "logs" / "torch-eager-fp32-b1-forward.log").read_text()


def test_ray_node_that_stops_answering_is_a_timeout_row_and_its_task_is_cancelled(
    fake: pytest.MonkeyPatch, cluster: str, tmp_path: Path
) -> None:
    """The driver's guard: a node that does not answer within --timeout + the margin (shrunk here, so that a
    worker still hanging on its node stands for a node that stopped answering)."""
    fake.setenv("HGBENCH_FAKE_FAULTS", "hang@torch/*/forward")
    fake.setattr(ray_executor, "GUARD_MARGIN_S", -55.0)  # the guard strikes at 5 s, the node's own timeout at 60 s
    code, run_dir = run(tmp_path, "--framework", "torch", "--execution", "default", "--phase", "forward",
                        "--timing-only", "--timeout", "60", "--executor", "ray", "--ray-address", cluster)  # fmt: skip
    rows = summary(run_dir)
    assert code == 1 and rows.loc["torch-eager-fp32-b1-forward", "status"] == "timeout"
    assert rows.loc["torch-eager-fp32-b1-forward", "error"].startswith("no answer from node ")
    _wait_until(lambda: not _workers_of("torch-eager-fp32-b1-forward.spec.json"), "the cancelled task's worker to die", 20)


def test_ray_run_interrupted_keeps_rows_and_resume_submits_only_what_is_missing(
    fake: pytest.MonkeyPatch, cluster: str, tmp_path: Path
) -> None:
    env = {**os.environ, "HGBENCH_FAKE_FAULTS": "hang@jax/*/forward_backward"}
    args = [sys.executable, "-m", "bench", "run", *TINY, "--framework", "torch,jax", "--execution", "default",
            "--executor", "ray", "--ray-address", cluster, "--out", str(tmp_path)]  # fmt: skip
    stderr_path = tmp_path.parent / f"{tmp_path.name}-parent-stderr.txt"
    with open(stderr_path, "w") as stderr:
        parent = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 (no threads fork here)  # fmt: skip
    try:
        _wait_until(lambda: _workers_of("jax-jit-fp32-b1-forward_backward.spec.json"), "the hanging cell to start")
        parent.send_signal(signal.SIGINT)
        try:
            code = parent.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not stop after SIGINT; its stderr:\n{stderr_path.read_text()}") from None
        assert code == 130, stderr_path.read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
    _wait_until(lambda: not _workers_of("jax-jit-fp32-b1-forward_backward.spec.json"), "the cancelled worker to die", 20)
    (run_dir,) = list(tmp_path.iterdir())
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    before = summary(run_dir)
    assert "jax-jit-fp32-b1-forward_backward" not in before.index and len(before) == 9
    logs = {p.name: p.stat().st_mtime_ns for p in (run_dir / "logs").iterdir()}

    fake.delenv("HGBENCH_FAKE_FAULTS", raising=False)
    assert cli.main(["run", "--resume", str(run_dir)]) == 0  # the recorded executor and cluster
    after = summary(run_dir)
    assert len(after) == 10 and set(after["status"]) == {"ok"}
    pd.testing.assert_frame_equal(after.loc[before.index], before)  # finished rows were not measured again
    now = {p.name: p.stat().st_mtime_ns for p in (run_dir / "logs").iterdir()}
    assert {name for name in now if now[name] != logs.get(name)} == {"jax-jit-fp32-b1-forward_backward.log"}
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and record["executor"] == "ray" and len(record["resumes"]) == 1


def test_ray_rounds_of_a_cell_run_on_the_node_of_its_first_round(fake: pytest.MonkeyPatch, cluster: str, tmp_path: Path) -> None:
    code, run_dir = run(tmp_path, "--framework", "jax", "--phase", "forward", "--timing-only", "--rounds", "2",
                        "--executor", "ray", "--ray-address", cluster)  # fmt: skip
    rows = summary(run_dir)
    assert code == 0 and rows.loc["jax-jit-fp32-b1-forward", "n_rounds"] == 2
    (node_id,) = json.loads((run_dir / "run.json").read_text())["nodes"]
    assert rows.loc["jax-jit-fp32-b1-forward", "node_id"] == node_id  # one node, named once


def test_ray_data_parallel_check_brings_both_gradient_files_back(fake: pytest.MonkeyPatch, cluster: str, tmp_path: Path) -> None:
    """The data-parallel check's worker writes two files (its gradients and its shard-by-shard reference) on the
    node; the driver compares them, so both must come back."""
    fake.setattr(settings, "offered_devices", lambda device: 2)
    code, run_dir = run(tmp_path, "--framework", "torch", "--execution", "default", "--phase", "forward_backward",
                        "--devices", "1,2", "--executor", "ray", "--ray-address", cluster)  # fmt: skip
    assert code == 0
    entry = json.loads((run_dir / "run.json").read_text())["data_parallel_check"]["frameworks"]["torch d2"]
    assert entry["status"] == "ok" and entry["equivalent"] is True and entry["reference_max_rel_err"] == 0
    assert set(summary(run_dir)["status"]) == {"ok"}


def test_ray_run_of_real_torch_matches_a_local_run_in_everything_but_timings(cluster: str, tmp_path: Path) -> None:
    if not settings.is_installed("torch"):
        pytest.skip(f"torch is not installed ({settings.install_hint('torch')})")
    args = ["--framework", "torch", "--execution", "eager"]
    code_local, local_dir = run(tmp_path / "local", *args)
    code_ray, ray_dir = run(tmp_path / "ray", *args, "--executor", "ray", "--ray-address", cluster)
    assert code_local == code_ray == 0
    local, remote = summary(local_dir), summary(ray_dir)
    pd.testing.assert_frame_equal(_invariants(remote), _invariants(local))
    model = remote[remote["kind"] == "model"]
    assert set(remote["status"]) == {"ok"} and (model["num_params"] > 0).all()
    # The worker saw the thread count a local worker sees (Ray's OMP_NUM_THREADS=1 did not reach it).
    local_threads = json.loads((local_dir / "run.json").read_text())["frameworks"]["torch"]["intra_op_threads"]
    record = json.loads((ray_dir / "run.json").read_text())
    assert record["frameworks"]["torch"]["intra_op_threads"] == local_threads
    # ... and at a local worker's niceness, not the 15 Ray starts its workers at (the task lowers it where it may).
    niced = [w for w in record["warnings"] if "niceness" in w]
    assert niced == [] if os.geteuid() == 0 else len(niced) == 1
