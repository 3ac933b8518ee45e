"""Starting one worker process and turning whatever it does into a WorkerOutcome.

The worker runs in its own process group with the allocator knobs set; its stdout and stderr go to a
log file. A result file means it finished (ok, or an exception it caught); no result file means it
crashed, and the exit status and the log's tail say how (a SIGKILL is `oom` only on evidence:
bench.engine.oom). Past the timeout, and on any exception in the parent (Ctrl-C, SIGTERM, SIGHUP, a full
disk), the whole group is killed; the worker itself dies with the parent (bench.engine.procs).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from bench.core.files import read_json, write_json_atomic
from bench.core.paths import REPO_ROOT
from bench.engine import oom, procs
from bench.engine.protocol import (
    ERROR_TAIL_LINES,
    OOM_MARKERS,
    STAGE_PREFIX,
    WORKER_ENV,
    ProtocolError,
    WorkerResult,
    WorkerSpec,
    empty_result,
    result_from_json,
    spec_to_json,
)


@dataclass
class WorkerOutcome:
    """What came back from one worker process: how it ended, and its typed result (empty when it wrote none)."""

    status: str  # ok | failed | skipped | timeout | oom
    error: str
    result: WorkerResult
    wall_s: float = math.nan
    stage: str = ""  # the last stage the worker announced (where a crash or timeout struck)
    host: str = ""  # the machine the worker ran on (socket.gethostname() there)
    node_id: str = ""  # which node of the executor ran it: "local", or a Ray node's id (bench.core.nodes)


def worker_env(changes: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The worker's environment: ours with `changes` applied (None removes a variable), plus the allocator
    knobs and the repository on the import path."""
    env = dict(os.environ)
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env.update(WORKER_ENV)
    env[procs.PARENT_PID_ENV] = str(os.getpid())  # the worker exits at once when its parent is already gone
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _log_tail(log_path: Path, lines: int = ERROR_TAIL_LINES) -> tuple[str, str]:
    """(last stage the worker announced, last `lines` lines of its output without stage markers)."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "", ""
    stages = [line[len(STAGE_PREFIX) :] for line in text if line.startswith(STAGE_PREFIX)]
    rest = [line for line in text if not line.startswith(STAGE_PREFIX) and line.strip()]
    return (stages[-1] if stages else "start"), "\n".join(rest[-lines:])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and anything it started (compiler subprocesses), then reap it."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _ended(spec: WorkerSpec, status: str, error: str, wall_s: float, stage: str = "") -> WorkerOutcome:
    return WorkerOutcome(status, error, empty_result(spec, status, error), wall_s, stage)


@dataclass
class _Watch:
    """What the parent notes while a worker runs, to judge a SIGKILL afterwards."""

    pid: int
    oom_kills_before: int | None
    peak_rss: int | None = None


def _crash_outcome(spec: WorkerSpec, returncode: int, stage: str, tail: str, wall_s: float, watch: _Watch) -> WorkerOutcome:
    """Classify a worker that exited without writing a result."""
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        if sig == "SIGKILL":  # the out-of-memory killer, or a person, a container stop, a CI runner
            status, why = oom.classify_sigkill(watch.pid, watch.oom_kills_before, watch.peak_rss)
            error = f"worker killed by SIGKILL during {stage} ({why})\n{tail}"
            return _ended(spec, status, error.rstrip(), wall_s, stage)
        return _ended(spec, "failed", f"worker died of {sig} during {stage}\n{tail}".rstrip(), wall_s, stage)
    status = "oom" if any(m in tail.lower() for m in (*OOM_MARKERS, "memoryerror")) else "failed"
    error = f"worker exited with code {returncode} during {stage} without a result\n{tail}"
    return _ended(spec, status, error.rstrip(), wall_s, stage)


RSS_POLL_S = 0.5  # how often the parent reads the worker's peak RSS while waiting for it


def _wait(proc: subprocess.Popen[bytes], timeout_s: float, watch: _Watch) -> int:
    """The worker's exit status, noting its peak RSS on the way; TimeoutExpired past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        try:
            return proc.wait(timeout=min(remaining, RSS_POLL_S))
        except subprocess.TimeoutExpired:
            watch.peak_rss = oom.peak_rss_bytes(proc.pid) or watch.peak_rss


def run_worker(spec: WorkerSpec, *, workdir: Path, name: str, log_path: Path, timeout_s: float,
               run_dir: Path | None = None, env_changes: Mapping[str, str | None] | None = None) -> WorkerOutcome:  # fmt: skip
    """Run `python -m bench.engine.worker` on `spec` in a fresh process group; never raises for worker faults.

    With `run_dir`, the live worker is recorded in RUN/live_worker.json while it runs (bench.engine.procs).
    `env_changes` adjust the worker's environment (worker_env): how a Ray task passes the driver's switches on.
    """
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    write_json_atomic(spec_path, spec_to_json(spec))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    watch = _Watch(0, oom.cgroup_oom_kills())
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.engine.worker", str(spec_path), str(result_path)],
            cwd=REPO_ROOT,
            env=worker_env(env_changes),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
        watch.pid = proc.pid
        try:
            if run_dir is not None:
                procs.note_live_worker(run_dir, proc.pid, name, workdir)
            returncode = _wait(proc, timeout_s, watch)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stage, tail = _log_tail(log_path)
            wall_s = time.perf_counter() - start
            error = f"no result after --timeout {timeout_s:g} s, during {stage}\n{tail}"
            return _ended(spec, "timeout", error.rstrip(), wall_s, stage)
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP, a full disk: never leave a worker running behind us
            _kill_group(proc)
            raise
        finally:
            if run_dir is not None:
                procs.worker_ended(run_dir, workdir)
    wall_s = time.perf_counter() - start
    stage, tail = _log_tail(log_path)
    if not result_path.exists():
        return _crash_outcome(spec, returncode, stage, tail, wall_s, watch)
    try:
        result = result_from_json(spec.MODE, read_json(result_path))
    except ProtocolError as err:  # a worker of another version, or a bug: its result cannot be trusted
        return _ended(spec, "failed", f"the worker's result does not follow bench.engine.protocol: {err}", wall_s, stage)
    if result.status != "ok" and not result.error:
        result.error = tail
    return WorkerOutcome(result.status, result.error, result, wall_s, stage)
