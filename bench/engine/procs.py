"""Which processes a run owns, so that no worker outlives its parent, whatever kills the parent.

- SIGINT, SIGTERM, SIGHUP: the parent catches them (bench.engine.session.run_guarded) and kills the
  worker's process group before it exits.
- SIGKILL of the parent (or its crash): every worker asks the kernel at start-up to SIGKILL it when its
  parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), then checks that its parent is still the process that
  started it, which closes the window before the request took effect.
- Anything a worker starts (a compiler's helper processes) is in the worker's process group. While a loop
  of workers runs, RUN/live_worker.json names its temp folder and the live worker, if any (between two
  workers only the folder); the parent removes the record when the loop ends. A record left behind means
  the parent died, and `bench run --resume` kills whatever of that group is still alive and removes the
  temp folder (`reap_orphans`). run.json names the parent (`process`: pid, host, boot and start time), so
  `--resume` can tell a run that is still being measured from one whose parent was killed (`check_stale_run`).

A process is named by (host, boot id, pid, start time): a pid alone may be reused.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.core.columns import LIVE_WORKER_JSON
from bench.core.files import write_json_atomic
from bench.core.rundir import RunDirError

PARENT_PID_ENV = "HGBENCH_PARENT_PID"  # set by the parent in every worker's environment
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_REAP_WAIT_S = 10.0  # how long reap_orphans waits for a killed group to vanish
WORKDIR_PREFIX = "hgbench-"  # the workers' temp folders (bench.engine.session); only these are ever removed


@dataclass(frozen=True)
class ProcessId:
    """One process, for good: a pid is reused, a pid with its start time and boot is not."""

    pid: int
    host: str
    boot_id: str  # /proc/sys/kernel/random/boot_id ("" where there is none)
    started: float | None  # start time, seconds since the epoch (psutil's create_time, to 10 ms)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ProcessId | None:
        """The ProcessId a record holds, or None when it holds none (older runs) or a malformed one."""
        if not isinstance(data, dict):
            return None
        try:
            started = data.get("started")
            return cls(int(data["pid"]), str(data["host"]), str(data.get("boot_id") or ""),
                       None if started is None else float(started))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> float | None:
    """When a live (not zombie) process started, seconds since the epoch; None when there is none."""
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return round(process.create_time(), 2)
    except (psutil.Error, OSError):
        return None


def identify(pid: int) -> ProcessId:
    """The ProcessId of a process on this machine."""
    return ProcessId(pid, socket.gethostname(), _boot_id(), _started(pid))


def this_process() -> ProcessId:
    """The ProcessId of the calling process (recorded in run.json as `process`)."""
    return identify(os.getpid())


def state(proc: ProcessId) -> str:
    """'alive', 'gone', or 'unknown' (recorded on another host: nothing here can tell)."""
    if proc.host != socket.gethostname():
        return "unknown"
    boot = _boot_id()
    if proc.boot_id and boot and proc.boot_id != boot:
        return "gone"  # the machine rebooted since
    started = _started(proc.pid)
    if started is None:
        return "gone"
    if proc.started is not None and started != proc.started:
        return "gone"  # the pid now names another process
    return "alive"


# ---------------------------------------------------------------- in the worker


def die_with_parent() -> None:
    """In a worker, first thing: be SIGKILLed when the parent dies; exit now if it has died already."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):  # no usable libc: the check below and --resume's reaping remain
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    expected = os.environ.get(PARENT_PID_ENV, "")
    if expected.isdigit() and os.getppid() != int(expected):
        # The parent died before the request above took effect: this worker is an orphan already.
        print(f"hgbench worker: parent {expected} is gone (now {os.getppid()}); exiting", file=sys.stderr)
        os._exit(1)


# ---------------------------------------------------------------- the live worker's record


def note_live_worker(run_dir: Path, pid: int, name: str, workdir: Path) -> None:
    """RUN/live_worker.json: the worker now running (its pid is its process group), for --resume's check."""
    write_json_atomic(Path(run_dir) / LIVE_WORKER_JSON, {
        "worker": identify(pid).to_dict(), "name": name, "workdir": str(workdir), "parent": this_process().to_dict(),
    })  # fmt: skip


def note_workdir(run_dir: Path, workdir: Path) -> None:
    """RUN/live_worker.json with no live worker, only the loop's temp folder: what --resume removes when the
    parent dies between two workers."""
    write_json_atomic(Path(run_dir) / LIVE_WORKER_JSON, {
        "worker": None, "name": "", "workdir": str(workdir), "parent": this_process().to_dict(),
    })  # fmt: skip


def worker_ended(run_dir: Path, workdir: Path) -> None:
    """The worker has ended and was reaped: the record keeps the temp folder only (none when the disk is too
    full to rewrite it: then the folder is not recorded, and nothing worse happens than a folder left in /tmp)."""
    try:
        note_workdir(run_dir, workdir)
    except OSError:
        clear_live_worker(run_dir)


def clear_live_worker(run_dir: Path) -> None:
    """The loop of workers is over (its temp folder is removed next): forget both."""
    (Path(run_dir) / LIVE_WORKER_JSON).unlink(missing_ok=True)


def _group_members(pgid: int, not_before: float | None) -> list[int]:
    """Live (not zombie) processes of process group `pgid` that started no earlier than its leader did."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) != pgid:
                continue
            started = _started(process.pid)
        except OSError:  # gone meanwhile
            continue
        if started is None or (not_before is not None and started < not_before):
            continue  # a zombie, or older than the worker: not one it started, whatever its group says
        members.append(process.pid)
    return members


def reap_orphans(run_dir: Path) -> list[str]:
    """Kill what is left of a worker whose parent died (RUN/live_worker.json); returns what was found and done.

    Raises RunDirError when an orphan is alive and cannot be killed (another user's process).
    """
    path = Path(run_dir) / LIVE_WORKER_JSON
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    worker = ProcessId.from_dict(record.get("worker") if isinstance(record, dict) else None)
    notes: list[str] = []
    where = state(worker) if worker else "gone"
    if worker and where == "unknown":
        notes.append(f"{path} names worker pid {worker.pid} on host {worker.host!r}, not this one ({socket.gethostname()!r}): "
                     "whether it still runs there cannot be checked here; make sure it does not")  # fmt: skip
    elif worker:
        members = _group_members(worker.pid, worker.started)
        if where == "alive" or members:
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                raise RunDirError(f"a worker of this run outlived its parent and is still running (process group "
                                  f"{worker.pid}, {record.get('name')}), and this user cannot stop it; stop it "
                                  f"with: kill -KILL -{worker.pid}, then resume again") from None  # fmt: skip
            deadline = time.monotonic() + _REAP_WAIT_S
            while _group_members(worker.pid, worker.started) and time.monotonic() < deadline:
                time.sleep(0.1)
            left = _group_members(worker.pid, worker.started)
            if left:
                raise RunDirError(f"a worker of this run outlived its parent (process group {worker.pid}) and "
                                  f"processes {left} survived SIGKILL for {_REAP_WAIT_S:g} s; resume once they are gone")  # fmt: skip
            notes.append(f"killed a worker of this run that outlived its parent ({record.get('name')}, process group "
                         f"{worker.pid}, {len(members) or 1} process(es)): it would have competed with the cells measured now")  # fmt: skip
    workdir = Path(str(record.get("workdir", ""))) if isinstance(record, dict) and record.get("workdir") else None
    if workdir is not None and workdir.name.startswith(WORKDIR_PREFIX) and workdir.is_dir():
        shutil.rmtree(workdir, ignore_errors=True)  # the dead parent's temp folder
    path.unlink(missing_ok=True)
    return notes


def check_stale_run(record: dict[str, Any], run_dir: Path) -> list[str]:
    """For --resume: a run.json still 'running' is either being measured now (RunDirError) or was left by a
    parent that died (a note to print). Returns the notes."""
    if record.get("status") != "running":
        return []
    proc = ProcessId.from_dict(record.get("process"))
    if proc is None:
        return [f"{run_dir}/run.json says the run is still running but names no process (an older version wrote "
                "it); make sure no other process is measuring it"]  # fmt: skip
    where = "gone" if proc.pid == os.getpid() else state(proc)  # this process cannot be measuring it too
    if where == "alive":
        raise RunDirError(f"{run_dir} is being measured right now by process {proc.pid} on this machine; wait "
                          f"for it to finish, or stop it (kill -TERM {proc.pid}) and resume then")  # fmt: skip
    if where == "unknown":
        return [f"run.json says the run is still running on host {proc.host!r} (pid {proc.pid}); this is "
                f"{socket.gethostname()!r}, so whether it still runs there cannot be checked: make sure it does not"]  # fmt: skip
    return [f"run.json says the run is still running, but the process that ran it (pid {proc.pid} on this machine) "
            "is gone: it ended without marking the run interrupted (killed by SIGKILL or the out-of-memory killer, "
            "a reboot, or a disk too full to write run.json); resuming"]  # fmt: skip
