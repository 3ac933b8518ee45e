"""The cell loop that `bench run` and `bench profile` share: one worker per cell, faults as data, Ctrl-C kept.

A `WorkerSession` holds what every such loop needs: which frameworks are installed (a missing one is a
skipped row with the install command), a temporary folder for the workers' spec and result files, one
worker call per cell (log in RUN/logs/<name>.log, the run's timeout), each framework's runtime record kept
once in run.json, warnings on the console and in run.json, and a progress bar. `run_guarded` turns Ctrl-C
into run.json status "interrupted", the resume hint and exit code 130.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID

from bench.core import console as out
from bench.core import settings
from bench.core.columns import LOGS_DIR
from bench.engine.launch import WorkerOutcome, run_worker
from bench.engine.protocol import WorkerResult, WorkerSpec
from impls import install_command

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report Ctrl-C


class WorkerSession:
    """One run's workers: installed frameworks, the temp folder, the worker call, runtime records, warnings."""

    def __init__(self, run_dir: Path, record: dict[str, Any], frameworks: Sequence[str], timeout_s: float,
                 console: Console | None = None) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.record = record  # run.json being built; the caller saves it
        self.timeout_s = timeout_s
        self.console = console or out.make_console()
        self.installed = {fw: settings.is_installed(fw) for fw in frameworks}  # the one place to ask (and to patch in tests)
        self.active = [fw for fw in frameworks if self.installed[fw]]
        self._workdir: Path | None = None
        self.record.setdefault("frameworks", {})
        self.record.setdefault("warnings", [])

    def skip_reason(self, framework: str) -> str | None:
        """Why a cell of `framework` cannot run (not installed, with the fix), or None."""
        if self.installed.get(framework):
            return None
        return f"framework {framework!r} is not installed; install it with: {install_command(framework)}"

    @property
    def workdir(self) -> Path:
        """The temporary folder of the current loop (inside `workers()`), for files passed to workers."""
        if self._workdir is None:
            raise RuntimeError("WorkerSession used outside `with session.workers(...)`")
        return self._workdir

    def call(self, spec: WorkerSpec, name: str) -> WorkerOutcome:
        """Run one worker on `spec` (inside `workers()`); its runtime record is kept once per framework."""
        outcome = run_worker(spec, workdir=self.workdir, name=name,
                             log_path=self.run_dir / LOGS_DIR / f"{name}.log", timeout_s=self.timeout_s)  # fmt: skip
        self.note_runtime(spec.framework, outcome.result)
        return outcome

    def note_runtime(self, framework: str, result: WorkerResult) -> None:
        """Keep the framework's runtime_info() in run.json the first time a worker reports it."""
        info = result.runtime_info
        if info and framework not in self.record["frameworks"]:
            self.record["frameworks"][framework] = info
            if "error" in info:
                self.warn(f"{framework}'s runtime_info() failed, so its settings are not recorded: {info['error']}")

    def warn(self, text: str) -> None:
        """A warning on the console and in run.json."""
        out.warn(self.console, text)
        self.record["warnings"].append(text)

    @contextmanager
    def workers(self, total: int, prefix: str = "hgbench-") -> Iterator[tuple[Progress, TaskID]]:
        """The temp folder the workers' files live in and a progress bar of `total` steps, for one loop."""
        with tempfile.TemporaryDirectory(prefix=prefix) as workdir, out.make_progress(self.console) as progress:
            self._workdir = Path(workdir)
            task = progress.add_task("starting", total=total)
            try:
                yield progress, task
            finally:
                self._workdir = None
            progress.update(task, description="done")


def run_guarded(body: Callable[[], int], record: dict[str, Any], save: Callable[[], None], console: Console,
                resume_hint: str) -> int:  # fmt: skip
    """`body()`'s exit code; on Ctrl-C, run.json says "interrupted", the hint is printed and 130 returned."""
    try:
        return body()
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        save()
        console.print(f"[red]interrupted[/]: {escape(resume_hint)}")
        return INTERRUPTED_EXIT_CODE
