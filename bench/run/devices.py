"""Device truth before a GPU run: does each framework see the GPU that NVML sees?

`pip install '.[all]'` installs CPU builds; on a GPU machine such a framework would build on the CPU
without a word. So before a run on a GPU each installed framework is asked in a worker (the parent imports
none). Under `--device gpu` a framework that cannot see the GPU is bad input (exit 2, naming its CUDA
install); under `--device auto` it is warned about, recorded in run.json, and its rows say
`device_fallback` and stay out of the GPU ceilings.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.core import settings as settings_mod
from bench.core.settings import RunSettings, SettingsError
from bench.engine.launch import run_worker
from bench.engine.protocol import InfoSpec
from impls import install_command

PROBE_TIMEOUT_S = 180.0


def ask_framework(framework: str) -> dict[str, Any]:
    """The framework's `info` worker result as a dict (status, gpu_available, runtime_info)."""
    with tempfile.TemporaryDirectory(prefix="hgbench-devices-") as workdir:
        outcome = run_worker(InfoSpec(framework=framework), workdir=Path(workdir), name=f"{framework}-info",
                             log_path=Path(workdir) / f"{framework}-info.log", timeout_s=PROBE_TIMEOUT_S)  # fmt: skip
    return dataclasses.asdict(outcome.result)


def gpu_fallbacks(settings: RunSettings, ask: Callable[[str], dict[str, Any]] = ask_framework) -> dict[str, str]:
    """Frameworks of a GPU run that cannot see the GPU -> why; empty on a CPU run.

    Raises SettingsError under --device gpu, naming the CUDA install of the first such framework.
    """
    if settings.device != "gpu":
        return {}
    fallbacks = {}
    for fw in settings.frameworks:
        if not settings_mod.is_installed(fw):
            continue
        info = ask(fw)
        if info.get("status") != "ok":
            reason = f"its worker failed ({(info.get('error') or '').strip().splitlines()[-1:] or ['?']})"
        elif not info.get("gpu_available"):
            devices = ", ".join(map(str, (info.get("runtime_info") or {}).get("devices", []))) or "none"
            reason = f"it sees no GPU (devices: {devices}); a CPU build? install its CUDA build: {install_command(fw, gpu=True)}"
        else:
            continue
        if settings.device_requested == "gpu":
            raise SettingsError(f"--device gpu: NVML sees a GPU but {fw} cannot use it: {reason}")
        fallbacks[fw] = reason
    return fallbacks
