"""The data-parallel training step in PyTorch: DistributedDataParallel, one process per device.

The contract is impls.data_parallel's. The calling process is rank 0; build_data_parallel starts ranks
1..N-1 itself as `python -m impls.torch_data_parallel` (a fresh interpreter each, never a fork of a process
that may hold CUDA or oneDNN state), all of them in the caller's process group. Every rank builds the same
torch_hourglass.TorchHourglass from the same weights and wraps its module in DistributedDataParallel:
per-replica batch norm (no SyncBatchNorm), and after backward every .grad holds the replica-mean gradient.

Rendezvous needs no server: a FileStore in a temp folder that build makes and close removes. The collectives
run on gloo (CPU; its sockets bound to the loopback interface) or NCCL (GPU; rank r on the r-th visible GPU).

Commands go from rank 0 to each rank over a private socket pair, not over a collective: a rank waiting for
its next command then waits on a plain read, with no collective timeout to expire while the caller does
something else for minutes (a gloo broadcast would fail after the process group's timeout), it sees
end-of-file the moment rank 0 is gone, and rank 0 sees a rank's death as end-of-file or an exit code.
Lock-step comes from DDP's all-reduce itself: no rank's step completes before every rank has joined it.

On the CPU the N processes share the cores: each runs max(1, cores // N) intra-op threads (rank 0 too, for
as long as the model is open). A rank never outlives rank 0 (PR_SET_PDEATHSIG, and it stays in the caller's
process group), and a rank that dies makes rank 0 raise a RuntimeError naming it instead of waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from impls import base, spec
from impls.base import check_build_args, check_train_batch, resolve_weights
from impls.config import HourglassConfig
from impls.data_parallel import (
    PROFILE_WARMUP_STEPS,
    AllreduceProfile,
    allreduce_result,
    check_allreduce_profile_args,
    check_data_parallel_args,
    check_device_count,
    describe_overlap,
    is_allreduce,
    overlap_fraction,
    shards,
)
from impls.torch_hourglass import IMPLS, TorchHourglass, gpu_available

FRAMEWORK = "torch"
# No "compile": torch.compile of a DDP module splits the graph at every gradient bucket (DDPOptimizer) and
# compiles in every rank process; on a 2-core CPU that is minutes per cell, and it was not shown to be
# reliable here. Add it with a test that it matches eager.
EXECUTIONS: tuple[str, ...] = ("eager",)
PRECISIONS: tuple[str, ...] = base.PRECISIONS  # gloo and NCCL all-reduce fp32, bf16 and fp64 alike

# Bounds init_process_group's rendezvous and every collective: a rank that never joins, or hangs inside a
# step, makes rank 0 raise after this long rather than wait forever (the benchmark's own cell timeout is
# usually shorter and kills the whole process group first).
PG_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0  # close(): how long a rank told to stop may take to exit before it is killed
# After a collective fails, how long rank 0 waits for the peer that broke it to show up as exited: the
# peer's sockets close as it dies, a moment before its exit status can be collected.
_EXIT_GRACE_S = 5.0
_SETTLE_S = 0.5  # then how long it lets the other ranks, whose collective that death broke, end too
_LIVENESS_CHECK_NS = 1_000_000  # GPU: how often rank 0 looks at its ranks while it waits for a step's kernels

# Test-only fault injection, read by the rank processes only: "crash@R" makes rank R exit with code 3 at
# its first step (benchmark or loss_and_grads), "hang@R" makes it sleep there forever.
FAULT_ENV = "HGBENCH_TEST_RANK_FAULT"
SCRATCH_ENV = "HGBENCH_SCRATCH_DIR"  # where the rank folder goes (default: the system's temp folder)
_CRASH_EXIT_CODE = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Bind gloo's and NCCL's sockets to the loopback interface: every rank is on this machine, and nothing
# should listen on a network interface. A value the user set already is kept.
_SOCKET_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
_STEP_MESSAGE = pickle.dumps(("step",))  # sent once per timed step: pickled once here
# A step the ranks run without recording its time (allreduce_profile's): rank_step_ns lists benchmark steps only.
_UNRECORDED_STEP_MESSAGE = pickle.dumps(("step", False))
# Collective calls in torch.profiler's events ("gloo:broadcast", "c10d::allreduce_", "nccl:all_reduce"): not
# compute, whether or not they are the all-reduce (DDP's buffer broadcast is one too).
_COLLECTIVE_PREFIXES = ("gloo:", "c10d::", "nccl:")


def configure_devices(devices: int, device: str) -> None:
    """Nothing to do for torch: every rank is its own process and claims its own device when it starts."""


def _cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_devices(device: str) -> int:
    """GPUs torch sees on "gpu"; on "cpu" the cores this process may use: one rank process per core is the
    most a CPU can honestly offer (more would time-share cores and measure the scheduler)."""
    if device not in base.DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(base.DEVICES)}")
    return torch.cuda.device_count() if device == "gpu" else _cpu_cores()


def _threads_per_rank(devices: int) -> int:
    """Intra-op threads for each of `devices` rank processes on this CPU: its cores shared out evenly.

    Every rank would otherwise start one thread per core, so N ranks would run N x cores threads on the
    cores and time the OS scheduler's interleaving instead of the model.
    """
    return max(1, _cpu_cores() // devices)


def _check_devices(devices: object, device: str) -> None:
    """ValueError unless `devices` is a positive int no larger than what available_devices offers."""
    check_device_count(devices)
    available = available_devices(device)
    if devices > available:
        unit = "cores (one rank process per core)" if device == "cpu" else "GPUs"
        raise ValueError(
            f"devices={devices} but this machine offers {available} {device} {unit} to torch; "
            f"use at most {available} devices"
        )


def _math_settings() -> dict[str, object]:
    """This process's GPU math settings (the worker sets them with torch_hourglass.configure_math before
    building), for every rank to copy: they change both the numbers and the speed."""
    return {
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def _apply_math_settings(settings: dict[str, Any]) -> None:
    """Set what _math_settings read in rank 0."""
    torch.backends.cuda.matmul.allow_tf32 = settings["cuda_matmul_allow_tf32"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_allow_tf32"]
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]


class _Replica(TorchHourglass):
    """One rank's TorchHourglass with its module wrapped in DistributedDataParallel.

    Every forward and backward through self._fn is the data-parallel one. DDP's defaults are kept (plain
    DDP, as users write it): it broadcasts rank 0's parameters when it is built (the ranks load the same
    weights, so nothing changes) and rank 0's BN buffers before every forward (train-mode BN normalises
    with batch statistics, so the step's numbers do not depend on them); rank 0's running statistics then
    follow its own shard, as the single-device model's follow its batch.
    """

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], *, device: str, precision: str,
                 impl: str) -> None:
        super().__init__(config, weights, device=device, precision=precision, execution="eager", impl=impl)
        device_ids = [self.torch_device.index] if self.torch_device.type == "cuda" else None
        self._fn = DistributedDataParallel(self.net, device_ids=device_ids)

    def shard_inputs(self, x: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One replica's shard on its device: x (n, 3, H, W) and target (n, K, H/4, W/4)."""
        return self._input(x), self._input(target)

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The DDP forward, loss and backward; returns when this replica's gradients are all-reduced."""
        return self._train_step(x, target)


def _release(procs: list[subprocess.Popen], conns: list[Connection], workdir: Path) -> None:
    """Close the command sockets, kill every rank still alive, reap them, remove the temp folder.

    Also runs as the model's finalizer (garbage collection, interpreter exit), so it refers to no model.
    """
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.close()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL is prompt; a stuck reap is no reason to hang
            proc.wait(timeout=STOP_TIMEOUT_S)
    shutil.rmtree(workdir, ignore_errors=True)


class TorchDataParallel:
    """A Stacked Hourglass trained data-parallel over `devices` DDP rank processes (impls.data_parallel)."""

    framework = FRAMEWORK

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], *, devices: int, device: str,
                 precision: str, execution: str, impl: str) -> None:
        if dist.is_initialized():
            raise RuntimeError(
                "a torch.distributed process group is already initialised in this process (another data-parallel "
                "model still open?); close() it first: one data-parallel model per process at a time"
            )
        self.config, self.devices, self.device = config, devices, device
        self.precision, self.execution, self.impl = precision, execution, impl
        self.backend = "nccl" if device == "gpu" else "gloo"
        self._threads_before = torch.get_num_threads()
        self.threads_per_rank = _threads_per_rank(devices) if device == "cpu" else self._threads_before
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        # Inside the caller's scratch folder when it names one (bench's worker: the run's temp folder, which the
        # run removes at its end and --resume removes after a killed run), so a rank folder never outlives the
        # run even when this process is killed before close() or its finalizer can run.
        scratch = os.environ.get(SCRATCH_ENV) or None
        self._workdir = Path(tempfile.mkdtemp(prefix="hgbench-dp-torch-", dir=scratch))
        self._finalizer = weakref.finalize(self, _release, self._procs, self._conns, self._workdir)
        self._env_set: list[str] = []  # the variables of _SOCKET_ENV this model set, unset again by close()
        self._closed = False
        self._broken: str | None = None  # why the ranks are out of step (a failed step): no further steps
        self._errors: dict[int, str] = {}  # rank -> the traceback it reported before it ended
        self._generation = 0  # the latest benchmark_step's number: the ranks hold only its inputs
        self._held: tuple[int, int] | None = None  # (batch_size, seed) of the inputs the ranks hold
        self._replica: _Replica | None = None
        try:
            self._start(weights)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ start and stop

    def _start(self, weights: dict[str, np.ndarray]) -> None:
        """Write the job, start ranks 1..N-1, join the process group and build rank 0's replica."""
        np.savez(self._workdir / "weights.npz", **weights)
        job = {
            "config": self.config.to_dict(), "device": self.device, "precision": self.precision,
            "impl": self.impl, "backend": self.backend, "threads": self.threads_per_rank, "math": _math_settings(),
        }  # fmt: skip
        (self._workdir / "job.json").write_text(json.dumps(job))
        for name, value in _SOCKET_ENV.items():
            if name not in os.environ:
                self._env_set.append(name)
                os.environ[name] = value  # read when the process group (gloo) or communicator (NCCL) starts
        for rank in range(1, self.devices):
            self._start_rank(rank)
        for rank in range(1, self.devices):
            self._expect(rank, "hello", "while starting")
        if self.device == "cpu":
            torch.set_num_threads(self.threads_per_rank)  # rank 0 is one of the N processes sharing the cores
        try:
            _init_process_group(self.backend, self._workdir, rank=0, world=self.devices)
            self._replica = _Replica(self.config, weights, device=self.device, precision=self.precision,
                                     impl=self.impl)  # fmt: skip
        except Exception as exc:
            dead = self._dead_rank(exc, "while starting")
            if dead is None:
                raise
            raise dead from exc
        self._num_params = self._replica.num_params()
        for rank in range(1, self.devices):
            self._expect(rank, "ready", "while building its replica")

    def _start_rank(self, rank: int) -> None:
        """Start rank `rank` as `python -m impls.torch_data_parallel`, talking over a private socket pair."""
        ours, theirs = socket.socketpair()
        root = Path(__file__).resolve().parent.parent  # the folder holding this `impls`: the ranks import the same code
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        if self.device == "gpu":
            # Rank r sees only the r-th visible GPU, as its cuda:0: torch_hourglass's "gpu" device.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            env["CUDA_VISIBLE_DEVICES"] = ids[rank].strip()
        command = [sys.executable, "-m", "impls.torch_data_parallel", "--rank", str(rank), "--world",
                   str(self.devices), "--workdir", str(self._workdir), "--fd", str(theirs.fileno()),
                   "--parent-pid", str(os.getpid())]  # fmt: skip
        try:
            # Same session and process group as the caller (no setsid): whoever kills the caller's group
            # kills the ranks too. cwd=root: `-m` puts the working folder first on sys.path.
            proc = subprocess.Popen(command, env=env, cwd=root, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the rank holds its end now; ours must go, or its death would not read as end-of-file
        self._procs.append(proc)
        self._conns.append(Connection(ours.detach()))

    def close(self) -> None:
        """Tell the ranks to stop, kill any still alive after STOP_TIMEOUT_S, leave the process group, remove
        the temp folder, restore this process's threads and environment. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._broken is None:
                for conn in self._conns:
                    with contextlib.suppress(OSError):  # a rank gone already is killed and reaped below
                        conn.send(("stop",))
                deadline = time.monotonic() + STOP_TIMEOUT_S
                for proc in self._procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._finalizer()
            self._replica = None  # drops the DDP reducer before its process group goes
            if dist.is_initialized():
                if self._broken is not None and self.backend == "nccl":
                    # A communicator stuck in a collective with a dead peer would hang a clean shutdown.
                    dist.distributed_c10d._abort_process_group()
                else:
                    dist.destroy_process_group()
            torch.set_num_threads(self._threads_before)
            for name in self._env_set:
                os.environ.pop(name, None)
            self._env_set.clear()

    def __enter__(self) -> TorchDataParallel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ talking to the ranks

    def _check_usable(self) -> None:
        """RuntimeError when the model is closed or a failed step left its ranks out of step."""
        if self._closed:
            raise RuntimeError("this data-parallel model is closed; build a new one")
        if self._broken is not None:
            raise RuntimeError(f"this data-parallel model is unusable after an earlier failure ({self._broken}); "
                               "close() it and build a new one")  # fmt: skip
        for rank, proc in enumerate(self._procs, start=1):
            if proc.poll() is not None:
                raise self._rank_failed(rank, "between steps")

    def _send(self, rank: int, message: tuple[Any, ...] | bytes) -> None:
        """Send `message` (pickled already when bytes) to rank `rank`; RuntimeError naming it if it is gone."""
        conn = self._conns[rank - 1]
        try:
            if isinstance(message, bytes):
                conn.send_bytes(message)
            else:
                conn.send(message)
        except OSError as exc:  # BrokenPipeError, ConnectionResetError
            raise self._rank_failed(rank, "while receiving a command") from exc

    def _send_all(self, message: tuple[Any, ...] | bytes) -> None:
        """Send `message` to every rank 1..N-1."""
        for rank in range(1, self.devices):
            self._send(rank, message)

    def _expect(self, rank: int, kind: str, what: str) -> tuple[Any, ...]:
        """The next message from `rank`, which must be of `kind`; RuntimeError naming the rank if it died
        or reported an error instead. Waits as long as the rank lives: a hang is the caller's timeout's."""
        conn, proc = self._conns[rank - 1], self._procs[rank - 1]
        while True:
            if conn.poll(0.5):
                try:
                    message = conn.recv()
                except (EOFError, OSError) as exc:
                    raise self._rank_failed(rank, what) from exc
                if message[0] == "error":
                    raise self._rank_failed(rank, what, message[1])
                if message[0] != kind:
                    raise AssertionError(f"rank {rank} answered {message[0]!r}, expected {kind!r}")
                return message
            if proc.poll() is not None:
                raise self._rank_failed(rank, what)

    def _rank_failed(self, rank: int, what: str, detail: str | None = None) -> RuntimeError:
        """The RuntimeError for rank `rank` having died or reported an error (`detail`, its traceback) `what`,
        naming every other rank that has ended too; marks the model unusable.

        When one rank dies inside a collective, its peers fail there too and end (code 1) a moment later,
        each reporting the broken connection. The rank that ended without a word (os._exit, a signal, the
        OOM killer) is the likelier cause, so it is named first.
        """
        if detail is not None:
            self._errors[rank] = detail
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._procs[rank - 1].wait(timeout=_EXIT_GRACE_S)  # a rank that reported an error exits right after
        ended = [r for r in range(1, self.devices) if r == rank or self._procs[r - 1].poll() is not None]
        for r in ended:
            self._read_last_words(r)
        culprit = min(ended, key=lambda r: (r in self._errors, r != rank, r))
        message = f"data-parallel {self._describe(culprit)} {what}"
        if culprit in self._errors:
            message += f": {self._errors[culprit].strip().splitlines()[-1]}"
        others = [self._describe(r) + (f" ({self._errors[r].strip().splitlines()[-1]})" if r in self._errors else "")
                  for r in ended if r != culprit]  # fmt: skip
        if others:
            message += f"; also ended: {'; '.join(others)}"
        message += "; tracebacks, if any, are on stderr"
        self._broken = message
        return RuntimeError(message)

    def _describe(self, rank: int) -> str:
        """"rank R exited with code C", or "rank R failed (still running)"."""
        code = self._procs[rank - 1].poll()
        return f"rank {rank} exited with code {code}" if code is not None else f"rank {rank} failed (still running)"

    def _read_last_words(self, rank: int) -> None:
        """Keep the error report `rank` sent before it ended, if any is waiting on its socket."""
        conn = self._conns[rank - 1]
        with contextlib.suppress(EOFError, OSError):
            while conn.poll(0):
                message = conn.recv()
                if message[0] == "error":
                    self._errors[rank] = message[1]

    def _dead_rank(self, exc: BaseException, what: str) -> RuntimeError | None:
        """For `exc`, raised on rank 0 inside a step: a RuntimeError naming the rank whose death broke the
        collective (a gloo peer that closed its connection), or None when every rank lives and `exc` is rank
        0's own (an out-of-memory, say), for the caller to re-raise. Either way the model is unusable after."""
        deadline = time.monotonic() + _EXIT_GRACE_S
        while self._procs:
            dead = [rank for rank, proc in enumerate(self._procs, start=1) if proc.poll() is not None]
            if dead:
                time.sleep(_SETTLE_S)  # the peers it broke end too: let them, so the report can tell them apart
                return self._rank_failed(dead[0], what)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self._broken = f"rank 0 failed {what}: {type(exc).__name__}: {exc}".splitlines()[0]
        return None

    def _wait_for_device(self, done: torch.cuda.Event | None) -> None:
        """Return when rank 0's step is complete on its device, raising if a rank dies meanwhile.

        On the CPU the step is complete when backward returns (DDP waits for gloo's all-reduce there). On a
        GPU, NCCL's kernels would wait forever for a dead peer, so rank 0 polls an event instead of
        blocking in torch.cuda.synchronize, and looks at its ranks every millisecond while it does.
        """
        if done is None:
            return
        done.record()
        next_check_ns = time.perf_counter_ns() + _LIVENESS_CHECK_NS
        while not done.query():
            if self._procs and time.perf_counter_ns() >= next_check_ns:
                for rank, proc in enumerate(self._procs, start=1):
                    if proc.poll() is not None:
                        raise self._rank_failed(rank, "during a step")
                next_check_ns = time.perf_counter_ns() + _LIVENESS_CHECK_NS

    # ------------------------------------------------------------ the contract

    def num_params(self) -> int:
        """Trainable parameters of one replica (every replica holds the same)."""
        return self._num_params

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The mean over replicas of each shard's loss, and rank 0's all-reduced (replica-mean) gradients under
        canonical names and layouts; every replica's BN running statistics follow its own shard."""
        if len(target) != len(x):
            raise ValueError(f"x has {len(x)} images but target {len(target)}; pass one target per image")
        per_replica = check_data_parallel_args(self.devices, "forward_backward", len(x))
        check_train_batch(self.config, per_replica)
        self._check_usable()
        assert self._replica is not None
        x_shards, target_shards = shards(np.asarray(x), self.devices), shards(np.asarray(target), self.devices)
        for rank in range(1, self.devices):
            self._send(rank, ("loss", x_shards[rank], target_shards[rank]))
        try:
            loss, grads = self._replica.loss_and_grads(x_shards[0], target_shards[0])
        except Exception as exc:
            dead = self._dead_rank(exc, "during loss_and_grads")
            if dead is None:
                raise
            raise dead from exc
        losses = [loss] + [self._expect(rank, "loss", "during loss_and_grads")[1] for rank in range(1, self.devices)]
        return float(np.mean(losses)), grads

    def benchmark_step(self, phase: str, batch_size: int, seed: int = 0) -> Callable[[], None]:
        """A zero-argument data-parallel forward_backward step on impls.spec.random_batch(config, batch_size,
        seed), every shard placed on its rank's device here; a call returns when rank 0's gradients are
        all-reduced and its device is done. Only the latest benchmark_step's callable may be called: the
        ranks hold only its inputs."""
        per_replica = check_data_parallel_args(self.devices, phase, batch_size)
        check_train_batch(self.config, per_replica)
        return self._prepared_step(batch_size, seed, _STEP_MESSAGE)

    def _prepared_step(self, batch_size: int, seed: int, message: bytes) -> Callable[[], None]:
        """benchmark_step's callable (arguments checked already), telling the ranks `message` at every call."""
        self._check_usable()
        assert self._replica is not None
        self._prepare_ranks(batch_size, seed)
        x, target = spec.random_batch(self.config, batch_size, seed)  # (N, H, W, 3), (N, H/4, W/4, K)
        x_0, target_0 = self._replica.shard_inputs(shards(x, self.devices)[0], shards(target, self.devices)[0])
        self._generation += 1
        generation, replica = self._generation, self._replica
        done = torch.cuda.Event() if replica.torch_device.type == "cuda" else None

        def step() -> None:
            if generation != self._generation:
                raise RuntimeError("this step callable was replaced by a later benchmark_step(), whose inputs the "
                                   "ranks now hold; call the latest one")  # fmt: skip
            self._check_usable()
            self._send_all(message)
            try:
                replica.train_step(x_0, target_0)  # gradients stay in .grad until the next step, as single-device
            except Exception as exc:
                dead = self._dead_rank(exc, "during a step")
                if dead is None:
                    raise
                raise dead from exc
            self._wait_for_device(done)

        return step

    def _prepare_ranks(self, batch_size: int, seed: int) -> None:
        """Have every rank draw the global batch and keep its shard, on its device."""
        self._send_all(("prepare", batch_size, seed))
        for rank in range(1, self.devices):
            self._expect(rank, "ok", "while placing its inputs")
        self._held = (batch_size, seed)

    def allreduce_profile(self, batch_size: int, seed: int = 0, steps: int = 5) -> AllreduceProfile:
        """`steps` DDP steps on benchmark_step's inputs under torch.profiler on rank 0, after PROFILE_WARMUP_STEPS
        untimed ones: rank 0's time in the gradient all-reduce ops per step, beside the profiled steps' wall clock.

        The ranks do not record these steps (rank_step_ns is unchanged), and the callable of the latest
        benchmark_step stays valid: its inputs are placed on the ranks again afterwards. The BN running
        statistics move as in any training step."""
        check_allreduce_profile_args(self.config, self.devices, batch_size, steps)
        held, generation = self._held, self._generation
        step = self._prepared_step(batch_size, seed, _UNRECORDED_STEP_MESSAGE)
        for _ in range(PROFILE_WARMUP_STEPS):
            step()
        assert self._replica is not None
        cuda = self._replica.torch_device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        wall_ms: list[float] = []
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            for _ in range(steps):
                t0_ns = time.perf_counter_ns()
                step()
                wall_ms.append((time.perf_counter_ns() - t0_ns) / 1e6)
        if held is not None:  # the latest benchmark_step's callable works again, on its own inputs
            self._prepare_ranks(*held)
            self._generation = generation
        return _allreduce_profile(prof.events(), wall_ms, steps, cuda, self.devices)

    def rank_step_ns(self) -> list[list[int]]:
        """For each rank 1..N-1, the duration of every benchmark step it ran so far (perf_counter_ns around its
        DDP forward and backward and its device sync), in call order; [] with one device."""
        self._check_usable()
        self._send_all(("times",))
        return [list(self._expect(rank, "times", "while reporting its step times")[1]) for rank in range(1, self.devices)]

    def reset_peak_memory(self) -> bool:
        """Reset rank 0's CUDA allocator peak counter (False on the CPU, where there is none)."""
        return self._replica.reset_peak_memory() if self._replica is not None else False

    def peak_memory_bytes(self) -> int | None:
        """Rank 0's CUDA allocator peak since the last reset; None on the CPU. Every rank holds the same model
        and shard size, so rank 0 stands for each."""
        return self._replica.peak_memory_bytes() if self._replica is not None else None

    def memory_analysis(self, phase: str, batch_size: int, seed: int = 0) -> dict[str, int] | None:
        """None: torch has no compiled memory plan."""
        return None

    def settings(self) -> dict[str, object]:
        """Rank 0's model settings, and how the replicas run: engine, backend, processes, threads."""
        replica = self._replica.settings() if self._replica is not None else {}
        return {
            **replica,
            "execution": self.execution, "impl": self.impl, "precision": self.precision, "device": self.device,
            "devices": self.devices, "engine": "torch.nn.parallel.DistributedDataParallel",
            "backend": self.backend, "processes": self.devices, "threads_per_rank": self.threads_per_rank,
            "sync_batchnorm": False, "broadcast_buffers": True,
        }  # fmt: skip


def build_data_parallel(config: HourglassConfig, weights: dict[str, np.ndarray] | None = None, *, devices: int,
                        device: str = "cpu", precision: str = "fp32", execution: str = EXECUTIONS[0],
                        impl: str = IMPLS[0]) -> TorchDataParallel:
    """A TorchDataParallel over `devices` rank processes; weights default to impls.init_weights(config, seed=0).

    Use it as a context manager or close() it: it holds processes, a temp folder and this process's
    torch.distributed default group (one data-parallel model per process at a time).
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"unknown execution {execution!r} for torch data parallelism; choose one of: "
                         f"{', '.join(EXECUTIONS)} (torch.compile of a DDP model is not offered)")  # fmt: skip
    check_build_args(FRAMEWORK, EXECUTIONS, execution, precision, device, gpu_available, impl=impl, impls=IMPLS)
    _check_devices(devices, device)
    weights = resolve_weights(config, weights)
    return TorchDataParallel(config, weights, devices=devices, device=device, precision=precision,
                             execution=execution, impl=impl)  # fmt: skip


def _allreduce_profile(events: Any, wall_ms: list[float], steps: int, cuda: bool, devices: int) -> AllreduceProfile:
    """The AllreduceProfile of rank 0's torch.profiler events (FunctionEvents) over `steps` profiled steps.

    Counted: the backend's collective, gloo:all_reduce on gloo's worker thread (CPU), or the NCCL AllReduce
    kernels' device time (GPU); not c10d::allreduce_, DDP's launch of it from the autograd thread, which
    can last as long as the collective itself and would count that time twice. Overlap: the share of the
    counted time during which rank 0's compute ran (CPU ops outside every collective call and not enclosing
    one, such as the AccumulateGrad whose hook launches the all-reduce; on a GPU, the other kernels).
    """
    from torch.autograd import DeviceType

    events = list(events)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    calls = sum(e.name.startswith("c10d::allreduce") for e in cpu) / steps  # DDP's launches: one per bucket
    kernels = [e for e in events if e.device_type == DeviceType.CUDA] if cuda else []
    allreduce = [e for e in kernels if is_allreduce(e.name)]
    if allreduce:
        compute = [e for e in kernels if not is_allreduce(e.name)]
        where = "the NCCL AllReduce kernels' device time on rank 0's GPU"
    else:
        collectives = [e for e in cpu if e.name.startswith(_COLLECTIVE_PREFIXES)]
        allreduce = [e for e in collectives if is_allreduce(e.name) and not e.name.startswith("c10d::")]
        allreduce = allreduce or [e for e in collectives if is_allreduce(e.name)]  # a backend without its own event
        enclosing = set()
        for event in collectives:
            parent = event.cpu_parent
            while parent is not None:
                enclosing.add(id(parent))
                parent = parent.cpu_parent
        compute = [e for e in cpu if not e.name.startswith(_COLLECTIVE_PREFIXES) and id(e) not in enclosing]
        where = "rank 0's CPU events (the collective on the process group's worker thread)"
    if not allreduce:
        why = ("one device: DDP runs no all-reduce" if devices == 1
               else f"rank 0's profile holds no all-reduce event among its {len(events)} events")  # fmt: skip
        return allreduce_result(None, wall_ms, f"torch.profiler on rank 0: {why}", [])
    names = sorted({e.name for e in allreduce})
    total_us = sum(e.time_range.end - e.time_range.start for e in allreduce)
    overlap = overlap_fraction([(e.time_range.start, e.time_range.end) for e in allreduce],
                               [(e.time_range.start, e.time_range.end) for e in compute])  # fmt: skip
    method = (f"torch.profiler, rank 0's view only: durations of {', '.join(names)} in {where}"
              + (f", {calls:g} per step (one per DDP gradient bucket)" if calls else "")
              + "; c10d::allreduce_ (the launch) and DDP's buffer broadcasts (gloo:broadcast) not counted; the "
              "collective's time includes waiting for the other ranks to join it; DDP launches each bucket's "
              "all-reduce from its autograd hook as soon as the bucket is full, so it may overlap the rest of "
              f"backward: {describe_overlap(overlap, 'rank 0')}; the share is of all-reduce op time, not of "
              "exposed (non-overlapped) time")  # fmt: skip
    return allreduce_result(total_us / 1e3 / steps, wall_ms, method, names)


def _init_process_group(backend: str, workdir: Path, *, rank: int, world: int) -> None:
    """Join the `world`-rank default process group through the FileStore in `workdir` (no server)."""
    options: dict[str, Any] = {}
    if backend == "nccl":
        options["device_id"] = torch.device("cuda", 0)  # each rank's only (or first) visible GPU: NCCL starts now
    dist.init_process_group(backend, init_method=f"file://{workdir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S), **options)  # fmt: skip


# ---------------------------------------------------------------- in a rank process


def _die_with_parent(parent_pid: int) -> None:
    """Be SIGKILLed when rank 0 dies (Linux PR_SET_PDEATHSIG); exit now if it has died already.

    The idea of bench.engine.procs.die_with_parent (impls imports nothing from bench). The kernel sends the
    signal when the *thread* that started this process exits: build from a thread that outlives the model.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no usable libc: EOF on the command socket remains
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # rank 0 died before the request above took effect
        os._exit(1)


def _parse_fault(value: str, rank: int) -> str | None:
    """"crash" or "hang" when HGBENCH_TEST_RANK_FAULT's value names this rank, else None."""
    if not value:
        return None
    kind, _, target = value.partition("@")
    if kind not in ("crash", "hang") or not target.isdigit():
        raise ValueError(f"{FAULT_ENV}={value!r} is not crash@RANK or hang@RANK (RANK >= 1); unset it or fix it")
    return kind if int(target) == rank else None


def _inject(fault: str) -> None:
    """The test fault: exit abruptly (as a crash would), or hang for good (as a deadlock would)."""
    if fault == "crash":
        os._exit(_CRASH_EXIT_CODE)
    while True:
        time.sleep(3600)


def _serve(conn: Connection, replica: _Replica, config: HourglassConfig, rank: int, world: int,
           fault: str | None) -> None:
    """Run rank 0's commands until "stop" (or end-of-file: rank 0 is gone)."""
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None
    step_ns: list[int] = []
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:
            return
        if command in ("step", "loss") and fault is not None:
            _inject(fault)
        if command == "prepare":
            batch_size, seed = args
            x, target = spec.random_batch(config, batch_size, seed)  # the global batch, drawn as rank 0 does
            inputs = replica.shard_inputs(shards(x, world)[rank], shards(target, world)[rank])
            conn.send(("ok",))
        elif command == "step":  # ("step",) or ("step", record): allreduce_profile's steps are not recorded
            assert inputs is not None, "step before prepare"
            t0_ns = time.perf_counter_ns()
            replica.train_step(*inputs)
            replica.sync()
            if not args or args[0]:
                step_ns.append(time.perf_counter_ns() - t0_ns)
        elif command == "loss":
            loss, _ = replica.loss_and_grads(*args)
            conn.send(("loss", loss))
        elif command == "times":
            conn.send(("times", step_ns))
        elif command == "stop":
            return
        else:
            raise ValueError(f"unknown command {command!r} from rank 0")


def _rank_main(argv: Sequence[str] | None = None) -> None:
    """A rank process: join the group, build the replica, serve rank 0's commands, exit."""
    parser = argparse.ArgumentParser(prog="python -m impls.torch_data_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True, help="this rank's end of the command socket")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    conn = Connection(args.fd)
    try:
        fault = _parse_fault(os.environ.get(FAULT_ENV, ""), args.rank)
        job = json.loads((args.workdir / "job.json").read_text())
        conn.send(("hello",))
        if job["device"] == "cpu":
            torch.set_num_threads(job["threads"])
        else:
            _apply_math_settings(job["math"])  # the same GPU math as rank 0
        config = HourglassConfig(**{**job["config"], "input_hw": tuple(job["config"]["input_hw"])})
        with np.load(args.workdir / "weights.npz") as stored:
            weights = {name: stored[name] for name in stored.files}
        _init_process_group(job["backend"], args.workdir, rank=args.rank, world=args.world)
        replica = _Replica(config, weights, device=job["device"], precision=job["precision"], impl=job["impl"])
        conn.send(("ready",))
        _serve(conn, replica, config, args.rank, args.world, fault)
        dist.destroy_process_group()
    except BaseException as exc:  # reported to rank 0, then this process ends
        with contextlib.suppress(OSError):
            conn.send(("error", "".join(traceback.format_exception(exc))))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: nothing is left to save, and gloo's threads need no goodbye


if __name__ == "__main__":
    _rank_main()
