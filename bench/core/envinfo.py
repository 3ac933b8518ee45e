"""The environment record of a run (run.json's `environment`), collected without importing a framework."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from bench.core import nvml
from bench.core.paths import REPO_ROOT

# Distribution names whose versions matter to the numbers; several names cover one framework's builds.
PACKAGES: tuple[str, ...] = (
    "torch", "tensorflow", "tensorflow-cpu", "keras", "jax", "jaxlib", "flax",
    "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
    "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12",
    "numpy", "scipy", "pandas", "nvidia-ml-py", "rich",
)  # fmt: skip


def utc_now() -> str:
    """Current UTC time, ISO 8601 with a Z."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_version(name: str) -> str | None:
    """Installed version of a distribution, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    with suppress(OSError):  # not Linux: fall through to the portable (if vaguer) answer
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_state(root: Path = REPO_ROOT) -> dict[str, object]:
    """Commit of the checkout and whether tracked or untracked files differ from it; None outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], check=False, cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none): a busy machine makes noisy numbers."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def command_line(args: list[str]) -> str:
    """The command as typed: `python -m bench` and its arguments, shell-quoted."""
    return shlex.join(["python", "-m", "bench", *args])


def collect(args: list[str] | None = None) -> dict[str, Any]:
    """Time, host, CPU, RAM, GPUs, Python and package versions, git state and the command line."""
    args = sys.argv[1:] if args is None else args
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "utc_time": utc_now(),
        "host": socket.gethostname(),
        "os": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_usable": affinity,
        "ram_bytes": psutil.virtual_memory().total,
        "load_average": load_average(),
        "gpus": nvml.gpus(),
        "gpu_state": nvml.device_state(),  # clocks, power, throttling, persistence/MIG, other processes
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "packages": {name: package_version(name) for name in PACKAGES if package_version(name) is not None},
        "git": git_state(),
        "command_line": command_line(args),
    }
