"""The cell loop that `bench run` and `bench profile` share: one worker per cell, faults as data, Ctrl-C kept.

A `WorkerSession` holds what every such loop needs: which frameworks are installed (a missing one is a
skipped row with the install command), a temporary folder for the workers' spec and result files, one
worker call per cell (log in RUN/logs/<name>.log, the run's timeout) through the run's executor (this
machine, or a Ray cluster that also runs a batch of cells at once: bench.engine.executor), each framework's runtime record kept
once in run.json, warnings on the console and in run.json, and a progress bar. `run_guarded` turns Ctrl-C,
SIGTERM, SIGHUP and a full disk into run.json status "interrupted", the resume hint and an exit code of
its own (INTERRUPTED_EXIT_CODES, DISK_FULL_EXIT_CODE), with every row already written kept.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID

from bench.core import console as out
from bench.core import envinfo, settings
from bench.core.columns import LOGS_DIR
from bench.core.files import DISK_FULL_EXIT_CODE, is_disk_full
from bench.engine import procs
from bench.engine.executor import AbstractExecutor, Job, LocalExecutor
from bench.engine.launch import WorkerOutcome
from bench.engine.procs import WORKDIR_PREFIX
from bench.engine.protocol import WorkerResult, WorkerSpec

# 128 + the signal's number, as shells report a process a signal ended: Ctrl-C (SIGINT) 130, SIGHUP 129,
# SIGTERM 143 (what `timeout`, `docker stop` and CI cancellation send).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP)
INTERRUPTED_EXIT_CODES: frozenset[int] = frozenset({INTERRUPTED_EXIT_CODE, *(128 + s for s in STOP_SIGNALS)})


class StopSignal(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (workers killed on the way), then the run is saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class WorkerSession:
    """One run's workers: installed frameworks, the temp folder, the worker call, runtime records, warnings."""

    def __init__(self, run_dir: Path, record: dict[str, Any], frameworks: Sequence[str], timeout_s: float,
                 console: Console | None = None, executor: AbstractExecutor | None = None) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.executor = executor or LocalExecutor()
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
        return f"framework {framework!r} is not installed; install it with: {settings.install_hint(framework)}"

    @property
    def workdir(self) -> Path:
        """The temporary folder of the current loop (inside `workers()`), for files passed to workers."""
        if self._workdir is None:
            raise RuntimeError("WorkerSession used outside `with session.workers(...)`")
        return self._workdir

    @property
    def concurrent(self) -> bool:
        """Whether the executor runs several workers at once (then the runner hands it a round at a time)."""
        return self.executor.concurrent

    def call(self, spec: WorkerSpec, name: str) -> WorkerOutcome:
        """Run one worker on `spec` (inside `workers()`); its runtime record is kept once per framework."""
        outcome = self.executor.call(Job(spec, name), workdir=self.workdir, logs_dir=self.run_dir / LOGS_DIR,
                                     timeout_s=self.timeout_s, run_dir=self.run_dir)  # fmt: skip
        self.note_runtime(spec.framework, outcome.result)
        self._executor_notes()
        return outcome

    def run_many(self, jobs: Sequence[Job]) -> Iterator[tuple[int, WorkerOutcome]]:
        """(index into `jobs`, outcome) as each worker finishes (inside `workers()`); whatever stops the caller
        early (Ctrl-C, SIGTERM) stops the workers still running."""
        outcomes = self.executor.run_many(jobs, workdir=self.workdir, logs_dir=self.run_dir / LOGS_DIR,
                                          timeout_s=self.timeout_s, run_dir=self.run_dir)  # fmt: skip
        with closing(outcomes):
            for index, outcome in outcomes:
                self.note_runtime(jobs[index].spec.framework, outcome.result)
                self._executor_notes()
                yield index, outcome

    def _executor_notes(self) -> None:
        for text in self.executor.take_notes():
            self.warn(text)

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
    def workers(self, total: int, prefix: str = WORKDIR_PREFIX) -> Iterator[tuple[Progress, TaskID]]:
        """The temp folder the workers' files live in and a progress bar of `total` steps, for one loop."""
        with tempfile.TemporaryDirectory(prefix=prefix) as workdir, out.make_progress(self.console) as progress:
            self._workdir = Path(workdir)
            procs.note_workdir(self.run_dir, self._workdir)  # a parent killed between workers leaves it to --resume
            task = progress.add_task("starting", total=total)
            try:
                yield progress, task
            finally:
                self._workdir = None
                procs.clear_live_worker(self.run_dir)  # before the folder goes: a record never names a missing one
            progress.update(task, description="done")


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise StopSignal (once; a second one while saving is ignored)."""
    raised: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if not raised:
            raised.append(signum)
            raise StopSignal(signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals cannot be caught here; the workers still die with us
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_guarded(body: Callable[[], int], record: dict[str, Any], save: Callable[[], None], console: Console,
                resume_hint: str) -> int:  # fmt: skip
    """`body()`'s exit code; stopped early (Ctrl-C, SIGTERM, SIGHUP, a full disk), run.json says
    "interrupted" (and why, in `interrupted_by`), the hint is printed and the stop's exit code returned."""
    with _stop_signals_raise():
        try:
            return body()
        except KeyboardInterrupt:
            return _stopped(record, save, console, "SIGINT (Ctrl-C)", resume_hint, INTERRUPTED_EXIT_CODE)
        except StopSignal as stop:
            return _stopped(record, save, console, stop.args[0], resume_hint, 128 + stop.signum)
        except OSError as err:
            if not is_disk_full(err):
                raise
            where = f" writing {err.filename}" if err.filename else ""
            return _stopped(record, save, console, f"disk full ({err.strerror}{where})",
                            f"free some space, then: {resume_hint}", DISK_FULL_EXIT_CODE)  # fmt: skip


def _stopped(record: dict[str, Any], save: Callable[[], None], console: Console, why: str, hint: str,
             code: int) -> int:  # fmt: skip
    """Mark the run interrupted (when run.json can still be written), print why and the hint; `code`."""
    record.update(status="interrupted", interrupted_by=why, interrupted_utc=envinfo.utc_now())
    try:
        save()
    except OSError as err:  # the disk is still full: the rows are safe, run.json keeps saying "running"
        console.print(f"[red]run.json could not be marked interrupted[/] ({escape(err.strerror or str(err))}); "
                      "--resume will notice the run's parent is gone", soft_wrap=True)  # fmt: skip
    console.print(f"[red]interrupted by {escape(why)}[/]: {escape(hint)}", soft_wrap=True)  # one line, to copy
    return code
