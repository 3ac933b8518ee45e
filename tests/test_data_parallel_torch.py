"""impls/torch_data_parallel.py: DDP over rank processes computes the shard-by-shard reference step, rejects bad
arguments in words, and never leaves a rank behind, whether a rank crashes, hangs, or the caller is killed.

Every build starts rank processes that import torch (a few seconds each on 2 cores); the file runs in about a
minute there.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import impls
from impls import spec, torch_hourglass
from impls import torch_data_parallel as tdp
from impls.data_parallel import shardwise_reference
from tests.conftest import FP32_GRAD_RTOL, FP32_LOSS_RTOL, assert_grads_close

CONFIG = impls.get_preset("tiny")  # 2 stacks, depth 2, 16 channels, 5 keypoints, 32x32: innermost BN sees 2x2
BATCH = 4  # global: 2 images per replica on 2 devices (tiny's smallest_train_batch is 1)
REPO = Path(__file__).resolve().parent.parent
FP64_RTOL = 1e-10  # what float64 rounding leaves between two orders of the same sums, with a wide margin
# A hang guard, not a speed assertion: without rank-death detection the step would wait for gloo's
# PG_TIMEOUT_S (120 s) and only then fail.
FAILURE_DEADLINE_S = 60.0


def _children() -> set[int]:
    """Pids of this process's live descendants (psutil where installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        parents = {os.getpid()}
        found: set[int] = set()
        grew = True
        while grew:  # descendants: repeat until no process has a parent in the set
            grew = False
            for pid, (state, ppid, _) in _proc_table().items():
                if ppid in parents and pid not in parents and state != "Z":
                    parents.add(pid)
                    found.add(pid)
                    grew = True
        return found
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def _proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, parent pid, process group) for every process in /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        state, ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]  # after "pid (comm) ": comm may hold spaces
        table[int(stat.parent.name)] = (state, int(ppid), int(pgrp))
    return table


def _group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes in process group `pgid`."""
    return {pid for pid, (state, _, pgrp) in _proc_table().items() if pgrp == pgid and state != "Z"}


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    return impls.init_weights(CONFIG, seed=5)


@pytest.fixture
def batch() -> tuple[np.ndarray, np.ndarray]:
    return spec.random_batch(CONFIG, BATCH, seed=11)  # x (4, 32, 32, 3), target (4, 8, 8, 5)


def test_two_devices_fp64_equals_shardwise_reference(weights, batch) -> None:
    x, target = batch
    with tdp.build_data_parallel(CONFIG, weights, devices=2, precision="fp64") as dp:
        loss, grads = dp.loss_and_grads(x, target)
        single = torch_hourglass.build(CONFIG, weights, precision="fp64")
        want_loss, want_grads = shardwise_reference(single, x, target, 2)
        full_batch_grads = torch_hourglass.build(CONFIG, weights, precision="fp64").loss_and_grads(x, target)[1]
    assert sorted(grads) == sorted(spec.trainable_names(CONFIG))
    assert all(g.dtype == np.float64 for g in grads.values())
    assert abs(loss - want_loss) <= FP64_RTOL * abs(want_loss), f"loss {loss} vs {want_loss}"
    assert_grads_close(grads, want_grads, FP64_RTOL, "fp64 DDP vs shardwise reference")
    # Per-replica BN is in force: one BN over the whole batch gives another gradient, far beyond rounding.
    stem = "stem.conv.kernel"
    assert np.linalg.norm(grads[stem] - full_batch_grads[stem]) > 1e-6 * np.linalg.norm(full_batch_grads[stem])


@pytest.fixture(scope="class")
def dp():
    """One fp32 model on 2 devices for a class's tests (a build costs a rank process's torch import); class
    scope, since a process holds one data-parallel model at a time and the other tests build their own."""
    with tdp.build_data_parallel(CONFIG, impls.init_weights(CONFIG, seed=5), devices=2) as model:
        yield model


class TestTwoDevicesFp32:
    """The checks that need a live model."""

    def test_two_devices_fp32_matches_shardwise_reference(self, dp, weights, batch) -> None:
        x, target = batch
        loss, grads = dp.loss_and_grads(x, target)
        # Built while the DP model lives: this process runs with the ranks' thread count, as rank 0 does.
        want_loss, want_grads = shardwise_reference(torch_hourglass.build(CONFIG, weights), x, target, 2)
        assert all(g.dtype == np.float32 for g in grads.values())
        assert abs(loss - want_loss) <= FP32_LOSS_RTOL * abs(want_loss), f"loss {loss} vs {want_loss}"
        assert_grads_close(grads, want_grads, FP32_GRAD_RTOL, "fp32 DDP vs shardwise reference")

    def test_benchmark_step_records_every_rank_step(self, dp) -> None:
        before = dp.rank_step_ns()
        step = dp.benchmark_step("forward_backward", BATCH, seed=3)
        for _ in range(3):
            step()
        after = dp.rank_step_ns()
        assert len(after) == 1  # ranks 1..N-1
        assert len(after[0]) == len(before[0]) + 3
        assert all(isinstance(ns, int) and ns > 0 for ns in after[0])

    def test_stale_step_callable_is_refused(self, dp) -> None:
        old = dp.benchmark_step("forward_backward", BATCH, seed=1)
        dp.benchmark_step("forward_backward", BATCH, seed=2)
        with pytest.raises(RuntimeError, match="replaced by a later benchmark_step"):
            old()

    def test_allreduce_profile_times_gloo_all_reduce_and_keeps_the_step_usable(self, dp) -> None:
        step = dp.benchmark_step("forward_backward", BATCH, seed=3)
        before = dp.rank_step_ns()
        result = dp.allreduce_profile(BATCH, seed=0, steps=3)
        assert set(result) == {"allreduce_ms", "step_ms", "allreduce_share", "method", "ops"}
        assert math.isfinite(result["step_ms"]) and result["step_ms"] > 0
        # DDP's gloo collective shows in rank 0's profile: a share of the step, neither nothing nor all of it.
        assert 0 < result["allreduce_share"] < 1, result
        assert result["ops"] == ["gloo:all_reduce"], result
        assert result["allreduce_ms"] == pytest.approx(result["allreduce_share"] * result["step_ms"])
        assert "rank 0" in result["method"] and "overlap" in result["method"]
        step()  # the earlier callable is still the latest: its inputs were placed on the ranks again
        after = dp.rank_step_ns()
        assert len(after[0]) == len(before[0]) + 1  # the profile's own steps are not recorded as benchmark steps

    def test_allreduce_profile_rejects_bad_steps(self, dp) -> None:
        with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
            dp.allreduce_profile(BATCH, steps=0)
        with pytest.raises(ValueError, match="does not split over 2 devices"):
            dp.allreduce_profile(3)

    @pytest.mark.parametrize(
        ("phase", "batch_size", "message"),
        [
            ("forward_backward", 3, "the global batch 3 does not split over 2 devices; use a multiple of 2"),
            ("forward", BATCH, "phase must be 'forward_backward', got 'forward'"),
            ("backward", BATCH, "unknown phase 'backward'"),
            ("forward_backward", 0, "batch_size must be a positive integer, got 0"),
        ],
    )
    def test_bad_step_args_raise_value_error_and_leave_model_usable(self, dp, phase, batch_size, message) -> None:
        with pytest.raises(ValueError, match=message):
            dp.benchmark_step(phase, batch_size)
        dp.benchmark_step("forward_backward", BATCH)()  # nothing was sent to the ranks: still in step

    def test_loss_and_grads_rejects_a_batch_that_does_not_split(self, dp, batch) -> None:
        x, target = batch
        with pytest.raises(ValueError, match="does not split over 2 devices"):
            dp.loss_and_grads(x[:3], target[:3])
        with pytest.raises(ValueError, match="x has 4 images but target 3"):
            dp.loss_and_grads(x, target[:3])


def test_one_device_equals_single_device_model(weights, batch) -> None:
    x, target = batch
    with tdp.build_data_parallel(CONFIG, weights, devices=1) as dp:
        loss, grads = dp.loss_and_grads(x, target)
        want_loss, want_grads = torch_hourglass.build(CONFIG, weights).loss_and_grads(x, target)
        assert dp.rank_step_ns() == []
        assert dp.num_params() == impls.count_params(CONFIG)
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss), f"loss {loss} vs {want_loss}"
    assert_grads_close(grads, want_grads, 1e-6, "DDP on one device vs single-device")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": 0}, "devices must be a positive integer, got 0; pass how many replicas to run"),
        ({"devices": True}, "devices must be a positive integer, got True"),
        ({"devices": 10_000}, r"devices=10000 but this machine offers \d+ cpu cores"),
        ({"devices": 1, "execution": "compile"}, "unknown execution 'compile' for torch data parallelism; choose one of: eager"),
        ({"devices": 1, "precision": "fp16"}, "unknown precision 'fp16'"),
        ({"devices": 1, "impl": "fastest"}, "unknown impl 'fastest' for torch"),
    ],
)
def test_bad_build_args_raise_value_error_before_any_process_starts(kwargs, message) -> None:
    before = _children()
    with pytest.raises(ValueError, match=message):
        tdp.build_data_parallel(CONFIG, **kwargs)
    assert _children() == before


def test_available_devices_counts_cores_on_cpu() -> None:
    assert tdp.available_devices("cpu") >= 1
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        tdp.available_devices("tpu")


@pytest.mark.parametrize("call", ["benchmark_step", "loss_and_grads"])
def test_crashed_rank_raises_runtime_error_naming_it_and_close_reaps_all(monkeypatch, batch, call) -> None:
    monkeypatch.setenv(tdp.FAULT_ENV, "crash@1")  # read by the rank processes, which inherit it
    before = _children()
    dp = tdp.build_data_parallel(CONFIG, devices=2)
    try:
        assert len(_children() - before) == 1
        step = dp.benchmark_step("forward_backward", BATCH) if call == "benchmark_step" else lambda: dp.loss_and_grads(*batch)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="data-parallel rank 1 exited with code 3"):
            step()
        assert time.monotonic() - t0 < FAILURE_DEADLINE_S
        with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
            dp.benchmark_step("forward_backward", BATCH)
    finally:
        dp.close()
    dp.close()  # idempotent
    assert _children() == before
    assert not dp._workdir.exists()


def test_crashed_rank_is_named_before_the_peers_it_broke(monkeypatch) -> None:
    # Three ranks on this (2-core) machine: one thread each. Rank 2 crashes; rank 1, in the same all-reduce,
    # then fails on the broken connection and ends with code 1. The report names rank 2.
    monkeypatch.setattr(tdp, "_cpu_cores", lambda: 3)
    monkeypatch.setenv(tdp.FAULT_ENV, "crash@2")
    with tdp.build_data_parallel(CONFIG, devices=3) as dp:
        step = dp.benchmark_step("forward_backward", 3)
        with pytest.raises(RuntimeError, match=r"^data-parallel rank 2 exited with code 3 during a step"):
            step()


HANG_SCRIPT = """
import impls
from impls.torch_data_parallel import build_data_parallel
dp = build_data_parallel(impls.get_preset("tiny"), devices=2)
step = dp.benchmark_step("forward_backward", 4)
print("stepping", flush=True)
step()
print("returned", flush=True)
"""


def test_hung_rank_dies_with_the_callers_process_group(tmp_path) -> None:
    env = {**os.environ, tdp.FAULT_ENV: "hang@1", "TMPDIR": str(tmp_path)}  # TMPDIR: rank 0 cannot clean up after SIGKILL
    caller = subprocess.Popen([sys.executable, "-c", HANG_SCRIPT], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + FAILURE_DEADLINE_S
        line = b""
        while not line and time.monotonic() < deadline:
            if select.select([caller.stdout], [], [], 1.0)[0]:
                line = caller.stdout.readline()
        assert line == b"stepping\n", f"the caller did not reach its step (exit code {caller.poll()})"
        time.sleep(1.0)  # rank 1 sleeps in its step, rank 0 waits for it in the all-reduce
        assert caller.poll() is None, "the step returned although rank 1 hangs"
        members = _group_members(caller.pid)
        assert caller.pid in members
        assert len(members) >= 2, f"the rank is not in the caller's process group: {members}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already when the caller failed early
            os.killpg(caller.pid, signal.SIGKILL)  # what the benchmark does to a worker past its timeout
        caller.wait(timeout=30)
    deadline = time.monotonic() + 10.0
    while _group_members(caller.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_members(caller.pid)
