"""Was a worker that died of SIGKILL killed by the out-of-memory killer? Evidence, not a guess.

SIGKILL also comes from a person (`kill -9`), a container stop or a CI runner, so a killed worker is
recorded as `oom` only when one of these says so:
  1. the oom_kill counter of this process's memory cgroup (v2 memory.events, v1 memory.oom_control) went up
     while the worker ran (it counts every OOM kill of a process in the cgroup, limit or machine-wide);
  2. the kernel log (/dev/kmsg, when readable) says the OOM killer killed that pid;
  3. the worker's peak RSS, sampled while it ran, reached OOM_RSS_SHARE of the memory limit (the cgroup's,
     else the machine's RAM).
Otherwise the row is `failed`, and its error says what was checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

OOM_RSS_SHARE = 0.8  # a peak RSS at or above this share of the memory limit counts as evidence
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63
_KMSG_MAX_RECORDS = 200_000  # bounds the read of the kernel log


def _cgroup_dirs(controller_file: str) -> list[Path]:
    """Candidate folders of this process's memory cgroup holding `controller_file` (v2 first, then v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    candidates = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2
            candidates += [Path("/sys/fs/cgroup") / rel, Path("/sys/fs/cgroup")]
        elif "memory" in controllers.split(","):
            candidates += [Path("/sys/fs/cgroup/memory") / rel, Path("/sys/fs/cgroup/memory")]
    return [c for c in candidates if (c / controller_file).is_file()]


def _read_key(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def cgroup_oom_kills() -> int | None:
    """The oom_kill counter of this process's memory cgroup, or None where no cgroup file has one."""
    for name in ("memory.events", "memory.oom_control"):
        for folder in _cgroup_dirs(name):
            count = _read_key(folder / name, "oom_kill")
            if count is not None:
                return count
    return None


def memory_limit_bytes() -> int | None:
    """The memory limit a worker lives under: its cgroup's, else the machine's RAM; None when unknown."""
    for name in ("memory.max", "memory.limit_in_bytes"):
        for folder in _cgroup_dirs(name):
            text = (folder / name).read_text().strip()
            if text.isdigit() and int(text) < _UNLIMITED:
                return int(text)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set so far (VmHWM), or None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def kernel_log_says_oom(pid: int) -> bool | None:
    """True when the kernel log records an OOM kill of `pid`, False when it does not, None when unreadable."""
    pattern = re.compile(rf"(Killed process {pid}\b|oom-kill:.*[,:]pid={pid}\b)")
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        for _ in range(_KMSG_MAX_RECORDS):
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                return False  # read to the end
            except BrokenPipeError:
                continue  # a record was overwritten while reading: go on with the next
            except OSError:
                return None
            if not record:
                return False
            if pattern.search(record.decode(errors="replace")):
                return True
        return False
    finally:
        os.close(fd)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def classify_sigkill(pid: int, oom_kills_before: int | None, peak_rss: int | None) -> tuple[str, str]:
    """('oom' or 'failed', why) for a worker killed by SIGKILL, from the evidence in the module docstring."""
    checked, definite = [], False
    oom_kills_after = cgroup_oom_kills()
    if oom_kills_before is not None and oom_kills_after is not None:
        if oom_kills_after > oom_kills_before:
            return "oom", (f"the out-of-memory killer: the memory cgroup's oom_kill counter went from "
                           f"{oom_kills_before} to {oom_kills_after} while it ran")  # fmt: skip
        checked.append("the memory cgroup's oom_kill counter did not change")
        definite = True
    logged = kernel_log_says_oom(pid)
    if logged:
        return "oom", f"the out-of-memory killer: the kernel log says it killed pid {pid}"
    if logged is False:
        checked.append("the kernel log records no out-of-memory kill of it")
        definite = True
    limit = memory_limit_bytes()
    if peak_rss is not None and limit:
        if peak_rss >= OOM_RSS_SHARE * limit:
            return "oom", (f"most likely the out-of-memory killer: its peak RSS {_mib(peak_rss)} reached "
                           f"{peak_rss / limit:.0%} of the {_mib(limit)} memory limit")  # fmt: skip
        checked.append(f"its peak RSS was {_mib(peak_rss)} of a {_mib(limit)} limit")
    if not checked:
        return "failed", ("no sign of the out-of-memory killer, though none could be read here (no cgroup "
                          "counter, kernel log or RSS): something or someone sent it SIGKILL")  # fmt: skip
    lead = "not by the out-of-memory killer" if definite else "no sign of the out-of-memory killer"
    return "failed", f"{lead}: {'; '.join(checked)}"
