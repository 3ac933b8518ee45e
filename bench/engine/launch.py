"""Starting one worker process and turning whatever it does into a WorkerOutcome.

The worker runs in its own process group with the allocator knobs set; its stdout and stderr go to a
log file. A result file means it finished (ok, or an exception it caught); no result file means it
crashed, and the exit status and the log's tail say how. Past the timeout the whole group is killed.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from bench.core.files import read_json, write_json_atomic
from bench.core.paths import REPO_ROOT
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


def worker_env() -> dict[str, str]:
    """The worker's environment: ours, plus the allocator knobs and the repository on the import path."""
    env = dict(os.environ)
    env.update(WORKER_ENV)
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


def _ended(spec: WorkerSpec, status: str, error: str, wall_s: float) -> WorkerOutcome:
    return WorkerOutcome(status, error, empty_result(spec, status, error), wall_s)


def _crash_outcome(spec: WorkerSpec, returncode: int, stage: str, tail: str, wall_s: float) -> WorkerOutcome:
    """Classify a worker that exited without writing a result."""
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        if sig == "SIGKILL":  # nobody else sends it here: the kernel's out-of-memory killer
            error = f"worker killed by SIGKILL during {stage} (most likely the out-of-memory killer)\n{tail}"
            return _ended(spec, "oom", error.rstrip(), wall_s)
        return _ended(spec, "failed", f"worker died of {sig} during {stage}\n{tail}".rstrip(), wall_s)
    status = "oom" if any(m in tail.lower() for m in (*OOM_MARKERS, "memoryerror")) else "failed"
    return _ended(spec, status, f"worker exited with code {returncode} during {stage} without a result\n{tail}".rstrip(), wall_s)


def run_worker(spec: WorkerSpec, *, workdir: Path, name: str, log_path: Path, timeout_s: float) -> WorkerOutcome:
    """Run `python -m bench.engine.worker` on `spec` in a fresh process group; never raises for worker faults."""
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    write_json_atomic(spec_path, spec_to_json(spec))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.engine.worker", str(spec_path), str(result_path)],
            cwd=REPO_ROOT,
            env=worker_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stage, tail = _log_tail(log_path)
            wall_s = time.perf_counter() - start
            return _ended(spec, "timeout", f"no result after --timeout {timeout_s:g} s, during {stage}\n{tail}".rstrip(), wall_s)
        except BaseException:  # Ctrl-C: never leave a worker running behind us
            _kill_group(proc)
            raise
    wall_s = time.perf_counter() - start
    stage, tail = _log_tail(log_path)
    if not result_path.exists():
        return _crash_outcome(spec, returncode, stage, tail, wall_s)
    try:
        result = result_from_json(spec.MODE, read_json(result_path))
    except ProtocolError as err:  # a worker of another version, or a bug: its result cannot be trusted
        return _ended(spec, "failed", f"the worker's result does not follow bench.engine.protocol: {err}", wall_s)
    if result.status != "ok" and not result.error:
        result.error = tail
    return WorkerOutcome(result.status, result.error, result, wall_s)
