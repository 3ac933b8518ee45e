"""Faults and bad input (issue 17) on the fake backend: signals sent to a real parent process, a full
disk, orphaned workers, killed workers, unwritable output paths, huge sizes and damaged run records.

No assertion is on a wall-clock time: waits for processes are generous bounded polls, so a slow
machine makes these tests slower, never red.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd
import psutil
import pytest

from bench import cli
from bench.core import files, rundir
from bench.engine import oom, procs
from bench.engine.protocol import STAGE_PREFIX
from bench.run import runner

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--execution", "default", "--iters", "3", "--warmup", "1", "--no-report", "--impl", "idiomatic"]
HANGING_CELL = "torch-eager-fp32-b1-forward_backward"
WAIT_S = 120.0  # generous: the machine is shared; nothing here is timed



def _run(out: Path, *args: str) -> tuple[int, Path]:
    code = cli.main(["run", *TINY, "--out", str(out), *args])
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return code, run_dir


def _summary(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "summary.csv").set_index("cell_id")


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie waiting to be reaped is not alive)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _wait_until(condition, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def _live_worker(out: Path, name: str) -> dict | None:
    """RUN/live_worker.json once it names the worker `name` and that worker has reached its first step (so
    it is past start-up, where it checks its parent itself, and only the parent-death signal can stop it)."""
    for path in out.glob("*/live_worker.json"):
        with suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            log = (path.parent / "logs" / f"{name}.log").read_text()
            worker = record.get("worker") or {}  # between two workers the record names only the temp folder
            if record.get("name") == name and _alive(worker["pid"]) and f"{STAGE_PREFIX}first_call" in log:
                return record
    return None


@contextmanager
def _parent_run(out: Path, faults: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m bench run` as a real process (torch only, one hanging cell); killed with its workers at the end."""
    env = {**os.environ, "HGBENCH_BACKEND_OVERRIDE": "tests.fake_backend", "HGBENCH_FAKE_FAULTS": faults}
    args = [sys.executable, "-m", "bench", "run", *TINY, "--framework", "torch", "--out", str(out)]
    log = out.parent / f"{out.name}-parent.log"
    with open(log, "w") as handle:
        parent = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                  stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        yield parent
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for path in out.glob("*/live_worker.json"):  # a test that failed half-way: leave nothing behind
            with suppress(OSError, ValueError, ProcessLookupError, PermissionError, KeyError):
                os.killpg(json.loads(path.read_text())["worker"]["pid"], signal.SIGKILL)


# ---------------------------------------------------------------- signals to the parent


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_parent_stopped_by_signal_kills_its_worker_keeps_rows_and_marks_the_run_interrupted(
    fake: pytest.MonkeyPatch, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    out = tmp_path / "out"
    with _parent_run(out, "hang@torch/*/forward_backward") as parent:
        worker = _wait_until(lambda: _live_worker(out, HANGING_CELL), "the hanging worker to start")
        parent.send_signal(sig)
        assert parent.wait(timeout=WAIT_S) == code
        worker_pid = worker["worker"]["pid"]
        _wait_until(lambda: not _alive(worker_pid), f"worker {worker_pid} to die")  # before the clean-up could kill it
    (run_dir,) = out.iterdir()
    record = _record(run_dir)
    assert record["status"] == "interrupted" and record["interrupted_by"] == sig.name
    assert not (run_dir / "live_worker.json").exists()
    rows = _summary(run_dir)
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] == "ok" and HANGING_CELL not in rows.index
    log = (tmp_path / "out-parent.log").read_text()
    assert f"interrupted by {sig.name}" in log and f"--resume {run_dir}" in log and "Traceback" not in log


def test_parent_killed_with_sigkill_takes_its_worker_along_and_resume_says_so(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with _parent_run(out, "hang@torch/*/forward_backward") as parent:
        worker = _wait_until(lambda: _live_worker(out, HANGING_CELL), "the hanging worker to start")
        parent.kill()  # SIGKILL: nothing in the parent runs
        parent.wait(timeout=WAIT_S)
        worker_pid = worker["worker"]["pid"]
        _wait_until(lambda: not _alive(worker_pid), f"worker {worker_pid} to die with its parent")  # before the clean-up
    (run_dir,) = out.iterdir()
    assert _record(run_dir)["status"] == "running"  # nobody could say otherwise
    assert (run_dir / "live_worker.json").exists()

    assert cli.main(["run", "--resume", str(run_dir)]) == 0  # the fault is gone in this process's environment
    assert "run.json says the run is still running, but the process that ran it" in capsys.readouterr().out
    record = _record(run_dir)
    assert record["status"] == "complete" and record["process"]["pid"] == os.getpid()
    assert any(f"the process that ran it (pid {parent.pid} on this machine) is gone" in text for text in record["warnings"])
    assert not (run_dir / "live_worker.json").exists()
    assert set(_summary(run_dir)["status"]) == {"ok"}


def test_a_run_stopped_before_its_first_cell_can_be_resumed_and_compared(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped before any row (during calibration, say): the run directory is still one that --resume
    completes and that compare judges incomplete (exit 1), not "not a run directory" (exit 2)."""
    code, base = _run(tmp_path / "base", "--framework", "torch", "--phase", "forward")
    assert code == 0

    def stopped_at_once(self: runner.Runner) -> int:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner.Runner, "execute", stopped_at_once)
        code, run_dir = _run(tmp_path / "new", "--framework", "torch", "--phase", "forward")
    assert code == 130 and _record(run_dir)["status"] == "interrupted"
    assert (run_dir / "summary.csv").read_text().count("\n") == 1  # the header alone
    capsys.readouterr()
    assert cli.main(["compare", str(base), str(run_dir)]) == 1
    assert "incomplete new run" in capsys.readouterr().out
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    assert _record(run_dir)["status"] == "complete" and set(_summary(run_dir)["status"]) == {"ok"}


def _sleeper() -> subprocess.Popen[bytes]:
    """A process in its own group, standing for a worker (or its helper) that outlived its parent."""
    return subprocess.Popen(["sleep", "600"], start_new_session=True)


def test_resume_kills_an_orphaned_worker_of_the_run(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward")
    assert code == 0
    orphan = _sleeper()
    try:
        stale_workdir = tmp_path / "hgbench-stale"
        stale_workdir.mkdir()
        procs.note_live_worker(run_dir, orphan.pid, "torch-eager-fp32-b1-forward", stale_workdir)
        assert cli.main(["run", "--resume", str(run_dir)]) == 0
        assert orphan.wait(timeout=WAIT_S) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    warnings = _record(run_dir)["warnings"]
    assert any(w.startswith("killed a worker of this run that outlived its parent (torch-eager-fp32-b1-forward, "
                            f"process group {orphan.pid}") for w in warnings), warnings  # fmt: skip
    assert not (run_dir / "live_worker.json").exists() and not stale_workdir.exists()


def test_resume_removes_the_temp_folder_of_a_parent_killed_between_workers(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Killed between two workers, the parent leaves RUN/live_worker.json naming its temp folder and no
    worker (while a loop runs the record is always there); --resume removes the folder."""
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward")
    assert code == 0 and not (run_dir / "live_worker.json").exists()  # a loop that ended clears it
    stale_workdir = tmp_path / "hgbench-stale"
    stale_workdir.mkdir()
    (stale_workdir / "torch-calibration.result.json").write_text("{}")
    procs.note_workdir(run_dir, stale_workdir)
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    assert not stale_workdir.exists() and not (run_dir / "live_worker.json").exists()


def test_resume_refuses_a_run_whose_parent_is_still_measuring_it(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward")
    assert code == 0
    alive = _sleeper()
    try:
        record = _record(run_dir)
        record.update(status="running", process=procs.identify(alive.pid).to_dict())
        (run_dir / "run.json").write_text(json.dumps(record))
        assert cli.main(["run", "--resume", str(run_dir)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line == (f"error: {run_dir} is being measured right now by process {alive.pid} on this machine; wait "
                        f"for it to finish, or stop it (kill -TERM {alive.pid}) and resume then")  # fmt: skip
        assert alive.poll() is None  # a live run is never killed, only refused
    finally:
        alive.kill()
        alive.wait()


def test_worker_module_answers_help_and_names_a_wrong_call(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.engine import worker

    assert worker.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m bench.engine.worker SPEC.json RESULT.json")
    assert worker.main(["only-one"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: expected two paths, got 1 argument(s); usage:")


def test_a_reused_pid_is_not_the_recorded_process() -> None:
    me = procs.this_process()
    assert procs.state(me) == "alive"
    assert procs.state(procs.ProcessId(me.pid, me.host, me.boot_id, me.started - 100.0)) == "gone"
    assert procs.state(procs.ProcessId(me.pid, "another-host", me.boot_id, me.started)) == "unknown"
    assert procs.state(procs.ProcessId(me.pid, me.host, "another-boot", me.started)) == "gone"


def test_worker_exits_at_once_when_its_parent_is_already_gone(tmp_path: Path) -> None:
    env = {**os.environ, procs.PARENT_PID_ENV: "1" if os.getpid() != 1 else "2"}  # not its parent
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"  # never read: it exits first
    done = subprocess.run([sys.executable, "-m", "bench.engine.worker", str(spec), str(result)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=WAIT_S, check=False)  # fmt: skip
    assert done.returncode == 1 and "hgbench worker: parent 1 is gone" in done.stderr and "Traceback" not in done.stderr
    assert not result.exists()


# ---------------------------------------------------------------- a full disk


class _FullDisk:
    """Stands for a disk that fills up: the Nth CSV write (and every one after) raises ENOSPC."""

    def __init__(self, real, after: int) -> None:
        self.real, self.after, self.calls = real, after, 0

    def __call__(self, path: Path, frame: pd.DataFrame) -> None:
        self.calls += 1
        if self.calls > self.after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.real(path, frame)


def test_disk_full_during_a_run_keeps_rows_marks_it_interrupted_and_resume_completes_it(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = _FullDisk(rundir.write_csv_atomic, after=10)  # 2 headers, 3 calibration rows x 2 CSVs, the first cell's 2
    fake.setattr(rundir, "write_csv_atomic", full)
    code, run_dir = _run(tmp_path, "--framework", "torch")
    captured = capsys.readouterr()
    assert code == files.DISK_FULL_EXIT_CODE == 75
    record = _record(run_dir)
    assert record["status"] == "interrupted" and record["interrupted_by"].startswith("disk full (No space left on device")
    assert "free some space, then: finished cells are in" in captured.out and f"--resume {run_dir}" in captured.out
    assert "Traceback" not in captured.out + captured.err
    before = _summary(run_dir)
    assert len(before) == 4 and "torch-eager-fp32-b1-forward" in before.index  # every row written before is kept
    assert not (run_dir / "live_worker.json").exists()

    fake.setattr(rundir, "write_csv_atomic", full.real)  # space freed
    assert cli.main(["run", "--resume", str(run_dir)]) == 0
    after = _summary(run_dir)
    assert len(after) == 5 and set(after["status"]) == {"ok"}
    pd.testing.assert_frame_equal(after.loc[before.index], before)


def test_disk_full_that_blocks_run_json_too_still_exits_75_with_the_hint(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = _FullDisk(rundir.write_csv_atomic, after=8)  # the headers and calibration rows, then the first cell's fails
    real_atomic_write = files.atomic_write

    def json_write(path: Path, write) -> None:
        if full.calls > full.after:  # the disk is full for run.json too
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_atomic_write(path, write)

    fake.setattr(rundir, "write_csv_atomic", full)
    fake.setattr(files, "atomic_write", json_write)
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward")
    printed = capsys.readouterr().out
    assert code == 75 and _record(run_dir)["status"] == "running"  # what --resume then notices
    assert "run.json could not be marked interrupted (No space left on device)" in printed
    assert f"--resume {run_dir}" in printed
    assert len(_summary(run_dir)) == 3


def test_disk_full_writing_compare_json_exits_75_with_one_line(tmp_path: Path, fake: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code, run_dir = _run(tmp_path / "runs", "--framework", "torch", "--phase", "forward")
    assert code == 0

    def no_space(path: Path, write) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    from bench.regress import compare

    fake.setattr(compare, "atomic_write", no_space)
    assert cli.main(["compare", str(run_dir), str(run_dir), "--json", str(tmp_path / "c.json")]) == 75
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: the disk is full (No space left on device writing ")


# ---------------------------------------------------------------- a worker killed by a signal


def test_worker_killed_by_sigkill_without_oom_evidence_is_failed_not_oom(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "sigkill@torch/*/forward")
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward")
    row = _summary(run_dir).loc["torch-eager-fp32-b1-forward"]
    assert code == 1 and row["status"] == "failed"
    assert "worker killed by SIGKILL during first_call" in row["error"]
    assert "out-of-memory killer" in row["error"]  # "not by the ..." or "no sign of the ...": what was checked


def test_worker_killed_while_the_cgroup_oom_counter_rose_is_oom(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    counts = iter(range(100))
    fake.setattr(oom, "cgroup_oom_kills", lambda: next(counts))  # every reading is one higher: a kill happened
    fake.setenv("HGBENCH_FAKE_FAULTS", "sigkill@torch/*/forward")
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward")
    row = _summary(run_dir).loc["torch-eager-fp32-b1-forward"]
    assert code == 1 and row["status"] == "oom"
    assert "the memory cgroup's oom_kill counter went from" in row["error"]


def test_sigkill_classification_needs_evidence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oom, "kernel_log_says_oom", lambda pid: None)
    monkeypatch.setattr(oom, "memory_limit_bytes", lambda: 1000 * 2**20)
    monkeypatch.setattr(oom, "cgroup_oom_kills", lambda: 3)
    assert oom.classify_sigkill(1234, 3, 240 * 2**20) == ("failed", (
        "not by the out-of-memory killer: the memory cgroup's oom_kill counter did not change; its peak RSS was "
        "240 MiB of a 1,000 MiB limit"))  # fmt: skip
    status, why = oom.classify_sigkill(1234, None, 900 * 2**20)
    assert status == "oom" and "peak RSS 900 MiB reached 90% of the 1,000 MiB memory limit" in why
    monkeypatch.setattr(oom, "kernel_log_says_oom", lambda pid: pid == 1234)
    assert oom.classify_sigkill(1234, None, None)[0] == "oom"
    monkeypatch.setattr(oom, "kernel_log_says_oom", lambda pid: None)
    monkeypatch.setattr(oom, "cgroup_oom_kills", lambda: None)
    status, why = oom.classify_sigkill(1234, None, None)
    assert status == "failed" and why.startswith("no sign of the out-of-memory killer")


def test_worker_death_by_another_signal_names_it(fake: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.setenv("HGBENCH_FAKE_FAULTS", "crash@torch/*/forward")
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward")
    assert code == 1
    assert "worker died of SIGABRT during first_call" in _summary(run_dir).loc["torch-eager-fp32-b1-forward", "error"]


# ---------------------------------------------------------------- sizes the parent must not allocate


def test_huge_input_size_gives_failed_rows_not_a_parent_crash(fake: pytest.MonkeyPatch, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward", "--input-size", "160000x160000")
    assert code == 1
    rows = _summary(run_dir)
    assert rows.loc["torch-eager-fp32-b1-forward", "status"] in ("oom", "failed")
    assert "Unable to allocate" in rows.loc["torch-eager-fp32-b1-forward", "error"]
    equivalence = _record(run_dir)["equivalence"]
    assert equivalence["input_shape"] == [1, 160000, 160000, 3]
    assert equivalence["frameworks"]["torch"]["status"] in ("oom", "failed")
    assert "Traceback" not in capsys.readouterr().err


def test_huge_batch_fails_its_own_calibration_rows_not_the_batch_1_reference_conv(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, run_dir = _run(tmp_path, "--framework", "torch", "--phase", "forward", "--batch-size", "1000000000")
    rows = _summary(run_dir)
    assert code == 1
    assert rows.loc["torch-conv_benchmark-fp32-b1-reference_conv", "status"] == "ok"
    for cell in ("torch-conv_benchmark-fp32-b1000000000-conv3x3", "torch-gemm_benchmark-fp32-b1000000000-gemm",
                 "torch-eager-fp32-b1000000000-forward"):  # fmt: skip
        assert rows.loc[cell, "status"] == "oom" and "Unable to allocate" in rows.loc[cell, "error"], cell


def test_heatmaps_too_large_to_compare_fail_the_equivalence_check_with_the_fix(
    fake: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class _Little:
        available, total = 1024, 2**34

    fake.setattr(runner.psutil, "virtual_memory", _Little)
    code, run_dir = _run(tmp_path, "--framework", "torch,jax", "--phase", "forward")
    entries = _record(run_dir)["equivalence"]["frameworks"]
    assert code == 1
    for entry in entries.values():
        assert entry["status"] == "failed" and "too large to compare" in entry["error"]
        assert entry["error"].endswith("give a smaller --input-size")


def test_calibration_crash_is_charged_to_the_workload_it_struck() -> None:
    from bench.engine.protocol import CalibrationWorkload

    def workload(kind: str, batch: int) -> CalibrationWorkload:
        return CalibrationWorkload(kind=kind, shape={}, batch_size=batch, precision="fp32", flops=1)

    stage = "calibrate conv3x3 fp32 b64: timed"
    assert runner._struck(stage, workload("conv3x3", 64))
    assert not runner._struck(stage, workload("reference_conv", 1))
    assert not runner._struck(stage, workload("conv3x3", 6))  # b6 is not b64
    assert runner._struck("import", workload("reference_conv", 1))  # died before any workload: all of them


# ---------------------------------------------------------------- unwritable output paths


@pytest.mark.parametrize(("command", "target", "message"), [
    (["run", *TINY, "--framework", "torch"], "{file}", "--out '{file}' is a file, not a folder"),
    (["run", *TINY, "--framework", "torch"], "{file}/sub", "--out '{file}/sub': {file} is a file, so no folder"),
    (["run", *TINY, "--framework", "torch"], "", "--out is empty; give a folder, e.g. --out results"),
    (["run", *TINY, "--framework", "torch"], "/proc/hgbench", "--out '/proc/hgbench' cannot be made in /proc"),
    (["profile", "--preset", "tiny", "--framework", "torch"], "{file}", "--out '{file}' is a file, not a folder"),
])  # fmt: skip
def test_unwritable_out_exits_2_with_one_line_before_any_worker(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], target: str,
    message: str,
) -> None:  # fmt: skip
    file = tmp_path / "F"
    file.write_text("\n")
    assert cli.main([*command, "--out", target.format(file=file)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: " + message.format(file=file))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F"]  # no run folder: nothing was started


def test_default_out_is_checked_too(fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results").write_text("not a folder\n")
    fake.chdir(tmp_path)
    assert cli.main(["run", *TINY, "--framework", "torch"]) == 2
    assert "--out 'results' is a file, not a folder" in capsys.readouterr().err


def test_run_refuses_when_the_disk_has_less_room_than_the_run_needs(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.setattr(files.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})())
    assert cli.main(["run", *TINY, "--framework", "torch", "--out", str(tmp_path)]) == 2
    line = capsys.readouterr().err.strip()
    assert "only 4.0 KiB free on its disk, and this needs about" in line and list(tmp_path.iterdir()) == []


def test_report_out_that_is_a_file_exits_2(fake: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code, run_dir = _run(tmp_path / "runs", "--framework", "torch", "--phase", "forward")
    assert code == 0
    (tmp_path / "F").write_text("\n")
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "F")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out '{tmp_path / 'F'}' is a file, not a folder")
    assert cli.main(["report", str(run_dir), "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err


# ---------------------------------------------------------------- damaged run records and switches


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "is not valid JSON"),
    ('{"settings": {"config": {"num_stacks": 2}}}', "the recorded settings cannot be used by this version"),
    ('["a list"]', "is not an hgbench run record"),
])  # fmt: skip
def test_bad_or_foreign_run_json_is_exit_2_for_resume_and_like(
    fake: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    code, run_dir = _run(tmp_path / "runs", "--framework", "torch", "--phase", "forward")
    assert code == 0
    (run_dir / "run.json").write_text(text)
    for args in (["run", "--resume", str(run_dir)], ["run", "--like", str(run_dir), "--out", str(tmp_path / "new")]):
        assert cli.main(args) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: ") and message in line


def test_ci_threshold_variable_is_named_when_malformed(fake: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from bench.regress import ab_check

    fake.setenv("HGBENCH_CI_THRESHOLD", "abc")
    assert ab_check.main(["--baseline", str(tmp_path), "--out", str(tmp_path / "gate")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "error: HGBENCH_CI_THRESHOLD must be a fraction or a percentage such as 0.1 or 10%, got 'abc'"
    fake.setenv("HGBENCH_CI_THRESHOLD", "25%")
    fake.setenv("HGBENCH_TEST_SLOWDOWN", "abc")
    assert ab_check.main(["--baseline", str(tmp_path), "--out", str(tmp_path / "gate")]) == 2
    assert "HGBENCH_TEST_SLOWDOWN='abc'" in capsys.readouterr().err
    assert not (tmp_path / "gate").exists()
