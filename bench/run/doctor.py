"""`python -m bench doctor`: does this machine give trustworthy numbers right now? Each problem with its fix.

Checks, each ok, warn or FAIL:
- frameworks: installed or not (with the install command); each installed one asked in a worker (the
  parent imports none) for its devices, threads, CUDA/cuDNN build and TF32 setting;
- GPU truth: when NVML sees a GPU, a framework that does not (a CPU build) fails, naming the install; GPU
  clocks below their maximum, throttling other than idle, persistence mode off, MIG on, and other processes
  on the GPU are reported from NVML;
- CPU: load against the usable cores (a busy machine makes every figure slow and noisy), the frequency
  governor where Linux exposes it, thread settings that differ between frameworks or from OMP_NUM_THREADS.
Exit code 1 when a run now would be untrustworthy (any FAIL), else 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from bench.core import console as out
from bench.core import envinfo, nvml
from bench.core import settings as settings_mod
from bench.run.inventory import probe
from impls import FRAMEWORKS, install_command

OK, WARN, FAIL = "ok", "warn", "FAIL"
BUSY_LOAD_PER_CORE = 0.5  # as the runner's warning: a 1-minute load above half the usable cores
_GOVERNOR = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it stands, what was seen, and the fix when it is not ok."""

    name: str
    status: str  # ok | warn | FAIL
    detail: str
    fix: str = ""


def framework_checks(infos: Mapping[str, Mapping[str, Any]], gpu_visible: bool) -> list[Check]:
    """Installed frameworks, the devices they see, their CUDA builds and TF32 defaults."""
    checks = []
    for fw in FRAMEWORKS:
        info = infos.get(fw)
        if info is None:
            checks.append(Check(f"{fw}: installed", WARN, "not installed (its cells are skipped under --framework all)",
                                f"install it with: {settings_mod.install_hint(fw)}"))  # fmt: skip
            continue
        runtime = info.get("runtime_info") or {}
        if info.get("status", "ok") != "ok" or info.get("error"):
            checks.append(Check(f"{fw}: starts", FAIL, f"its worker failed: {info.get('error')}", "see `python -m bench list`"))
            continue
        sees_gpu = bool(info.get("gpu_available"))
        devices = ", ".join(map(str, runtime.get("devices", []))) or "?"
        if gpu_visible and not sees_gpu:
            checks.append(Check(f"{fw}: sees the GPU", FAIL, f"NVML sees a GPU but {fw} sees only: {devices} (a CPU build)",
                                f"install its CUDA build: {install_command(fw, gpu=True)}"))  # fmt: skip
        else:
            checks.append(Check(f"{fw}: devices", OK, devices))
        cuda = {k: runtime.get(k) for k in ("cuda_version", "cudnn_version") if runtime.get(k)}
        if cuda:
            checks.append(Check(f"{fw}: CUDA build", OK, ", ".join(f"{k} {v}" for k, v in cuda.items())))
        tf32 = [k for k in ("cuda_matmul_allow_tf32", "cudnn_allow_tf32", "tf32_enabled") if runtime.get(k)]
        if sees_gpu and tf32:
            checks.append(Check(f"{fw}: TF32 default", WARN, f"on ({', '.join(tf32)}): fp32 convolutions and matmuls "
                                "may run in TF32 unless a run pins the math", "compare frameworks with the same fp32 math"))  # fmt: skip
    return checks


def gpu_checks(states: Sequence[Mapping[str, Any]], own_pid: int) -> list[Check]:
    """Clocks, throttling, persistence and MIG mode, and other processes on each GPU (NVML)."""
    checks = []
    for s in states:
        name = f"GPU {s['index']}"
        clock, top = s.get("sm_clock_mhz"), s.get("sm_clock_max_mhz")
        if clock and top:
            status = OK if clock >= 0.9 * top else WARN
            checks.append(Check(f"{name}: SM clock", status, f"{clock} of {top} MHz",
                                "" if status == OK else "an idle GPU clocks down; a run's warm-up brings it up, else check power and cooling"))  # fmt: skip
        reasons = [r for r in s.get("throttle_reasons", []) if r != "gpu_idle"]
        if reasons:
            checks.append(Check(f"{name}: throttling", WARN, ", ".join(reasons), "check power limit and cooling"))
        if s.get("persistence_mode") == 0:
            checks.append(Check(f"{name}: persistence mode", WARN, "off: the driver unloads between processes",
                                "nvidia-smi -pm 1 (as root)"))  # fmt: skip
        if s.get("mig_mode") == 1:
            checks.append(Check(f"{name}: MIG", WARN, "on: a slice of the GPU, not the whole", "say so beside every figure"))
        others = [p for p in s.get("compute_processes", []) if p.get("pid") != own_pid]
        if others:
            pids = ", ".join(str(p["pid"]) for p in others)
            checks.append(Check(f"{name}: other processes", FAIL, f"{len(others)} compute process(es) on it (PIDs {pids})",
                                "stop them; they share the GPU's time and memory with every cell"))  # fmt: skip
    return checks


def cpu_checks(load: Sequence[float] | None, cores: int | None, governor: str | None,
               threads: Mapping[str, Any], omp: str | None) -> list[Check]:  # fmt: skip
    """Load against usable cores, the frequency governor, and thread settings."""
    checks = []
    if load and cores:
        busy = load[0] > BUSY_LOAD_PER_CORE * cores
        checks.append(Check("CPU load", FAIL if busy else OK, f"1-minute load {load[0]:.1f} on {cores} usable cores",
                            "wait until other work is done: every figure would be slow and noisy" if busy else ""))  # fmt: skip
    if governor is not None:
        checks.append(Check("CPU governor", OK if governor == "performance" else WARN, governor,
                            "" if governor == "performance" else "cpupower frequency-set -g performance (as root)"))  # fmt: skip
    counts = {fw: n for fw, n in threads.items() if n}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{fw} {n}" for fw, n in counts.items())
        checks.append(Check("intra-op threads", WARN, f"frameworks differ: {detail}", "set OMP_NUM_THREADS for all"))
    elif counts:
        checks.append(Check("intra-op threads", OK, ", ".join(f"{fw} {n}" for fw, n in counts.items())))
    if omp:
        checks.append(Check("OMP_NUM_THREADS", OK, omp))
    return checks


def _governor() -> str | None:
    try:
        return _GOVERNOR.read_text().strip()
    except OSError:  # a VM or container without cpufreq: unknown
        return None


def diagnose(ask: Callable[[str], dict[str, Any]] = probe) -> list[Check]:
    """Every check on this machine; `ask(framework)` is the info worker (a stand-in in tests)."""
    gpu_visible = nvml.gpu_present()
    infos = {fw: ask(fw) for fw in FRAMEWORKS if settings_mod.is_installed(fw)}
    threads = {fw: (i.get("runtime_info") or {}).get("intra_op_threads") for fw, i in infos.items()}
    env = envinfo.collect([])
    return [
        Check("GPU (NVML)", OK, ", ".join(f"{g['index']}: {g['name']}" for g in env["gpus"]) or "none visible"),
        *framework_checks(infos, gpu_visible),
        *gpu_checks(env["gpu_state"], os.getpid()),
        *cpu_checks(env["load_average"], env["cpu_cores_usable"], _governor(), threads, os.environ.get("OMP_NUM_THREADS")),
    ]


def run_doctor(ask: Callable[[str], dict[str, Any]] = probe) -> int:
    """Print every check; exit 1 when any FAILs (a run now would be untrustworthy)."""
    console = out.make_console()
    checks = diagnose(ask)
    table = Table(title="hgbench doctor", header_style="bold")
    for column in ("check", "status", "seen", "fix"):
        table.add_column(column, overflow="fold")
    style = {OK: "green", WARN: "yellow", FAIL: "bold red"}
    for c in checks:
        table.add_row(escape(c.name), f"[{style[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
    console.print(table)
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        console.print(f"[bold red]{len(failed)} problem(s) make a run now untrustworthy[/]: "
                      + "; ".join(escape(c.name) for c in failed))  # fmt: skip
        return 1
    console.print("no problem that would make a run untrustworthy")
    return 0
