"""Where workers run: on this machine one at a time (LocalExecutor, the default), or as tasks of a Ray cluster
(bench.engine.ray_executor.RayExecutor, `bench run --executor ray`).

Either way each worker is a fresh `python -m bench.engine.worker` process (bench.engine.launch.run_worker) and
comes back as a WorkerOutcome that names the host and node that ran it. The local executor is the code that
ran every worker before executors existed, unchanged; it runs one worker at a time, so `concurrent` is False
and the runner keeps its sequential loop. A concurrent executor also takes a batch of jobs (`run_many`) and
yields each outcome as it finishes. Which one a run uses is its settings' `executor` (bench.run.runner).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bench.core.nodes import LOCAL_NODE
from bench.engine.launch import WorkerOutcome, run_worker
from bench.engine.protocol import WorkerSpec


@dataclass(frozen=True)
class Job:
    """One worker to run: what it measures, its name (its log is RUN/logs/<name>.log) and where it must run."""

    spec: WorkerSpec
    name: str
    node_id: str = ""  # run it on this node ("" = any): a cell's later rounds run where its first round ran


class AbstractExecutor:
    """The contract: run one job (`call`) or a batch (`run_many`), describe where for run.json, `close` at the end."""

    name: ClassVar[str] = ""
    concurrent: ClassVar[bool] = False  # True: run_many runs several jobs at once

    def call(self, job: Job, *, workdir: Path, logs_dir: Path, timeout_s: float, run_dir: Path | None) -> WorkerOutcome:
        """Run one worker and wait for it; never raises for the worker's own faults."""
        raise NotImplementedError

    def run_many(self, jobs: Sequence[Job], *, workdir: Path, logs_dir: Path, timeout_s: float,
                 run_dir: Path | None) -> Iterator[tuple[int, WorkerOutcome]]:  # fmt: skip
        """(index into `jobs`, outcome) for every job, as each finishes; here one after another, in order."""
        for index, job in enumerate(jobs):
            yield index, self.call(job, workdir=workdir, logs_dir=logs_dir, timeout_s=timeout_s, run_dir=run_dir)

    def describe(self, args: list[str]) -> dict[str, Any]:
        """What run.json records about where the workers ran."""
        return {"executor": self.name}

    def take_notes(self) -> list[str]:
        """Warnings about how workers ran since the last call (the run prints and records them)."""
        return []

    def node_alive(self, node_id: str) -> bool:
        """Whether `node_id` can still take jobs."""
        return node_id == LOCAL_NODE

    def close(self) -> None:
        """Release what the executor holds (a local Ray cluster it started); called once, also after Ctrl-C."""


class LocalExecutor(AbstractExecutor):
    """Every worker on this machine, one at a time: the harness as it always ran."""

    name: ClassVar[str] = "local"

    def call(self, job: Job, *, workdir: Path, logs_dir: Path, timeout_s: float, run_dir: Path | None) -> WorkerOutcome:
        """run_worker, with this host and node "local" named on the outcome."""
        outcome = run_worker(job.spec, workdir=workdir, name=job.name, log_path=logs_dir / f"{job.name}.log",
                             timeout_s=timeout_s, run_dir=run_dir)  # fmt: skip
        outcome.host, outcome.node_id = socket.gethostname(), LOCAL_NODE
        return outcome

